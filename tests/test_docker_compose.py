"""docker-compose.yml and docker/*.Dockerfile: their structure, and the server image's command run for real.

No Docker engine is needed: the files are parsed, and the server container's
CMD (taken from docker/server.Dockerfile) is run on this machine with /data
replaced by a folder holding a recorded database and port 8000 by a free port,
with the packages of the optional extras made unimportable (the image installs
the base dependencies only), then probed with the compose healthcheck and page
requests.
"""

from __future__ import annotations

import html
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest

from .processes import free_port
from .recordings import content_hash

yaml = pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO / "docker-compose.yml"
SERVER_DOCKERFILE = REPO / "docker" / "server.Dockerfile"
RECORDER_DOCKERFILE = REPO / "docker" / "recorder.Dockerfile"
EXPECTED_SERVER_CMD = ["gluscope", "serve", "--host", "0.0.0.0", "--port", "8000", "--data-dir", "/data"]


# --- helpers -----------------------------------------------------------------

def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def service(name: str) -> dict:
    return compose()["services"][name]


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, args = line.partition(" ")
        result.append((keyword.upper(), args.strip()))
    assert not pending, f"{dockerfile} ends with a line continuation"
    return result


def instruction_args(dockerfile: Path, keyword: str) -> list[str]:
    return [args for kw, args in instructions(dockerfile) if kw == keyword]


def exec_form(dockerfile: Path, keyword: str) -> list[str]:
    """The last CMD/ENTRYPOINT of `dockerfile`, which must be a JSON exec array."""
    found = instruction_args(dockerfile, keyword)
    assert found, f"{dockerfile.name} has no {keyword}"
    value = json.loads(found[-1])  # raises unless it is the JSON exec form
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


def final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    """The instructions of the last build stage (the image that is shipped)."""
    items = instructions(dockerfile)
    last_from = max(i for i, (kw, _) in enumerate(items) if kw == "FROM")
    return items[last_from:]


def package_dirs() -> list[str]:
    """The source folders pyproject.toml installs as packages."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    return sorted(set(pyproject["tool"]["setuptools"]["package-dir"].values()))


def healthcheck_argv(port: int) -> list[str]:
    """The server's compose healthcheck as an argv for this machine, on `port`."""
    test = service("server")["healthcheck"]["test"]
    if isinstance(test, str):
        test = ["CMD-SHELL", test]
    kind, rest = test[0], [arg.replace(":8000", f":{port}") for arg in test[1:]]
    if kind == "CMD-SHELL":
        rest = shlex.split(rest[0])
    assert kind in ("CMD", "CMD-SHELL"), test
    assert rest[0] in ("python", "python3"), "the healthcheck should use the image's python (no curl there)"
    return [sys.executable, *rest[1:]]


# Distribution names whose import name differs.
IMPORT_NAMES = {"pyyaml": "yaml", "transformer-lens": "transformer_lens"}

BLOCKER = """\
# Written by tests/test_docker_compose.py: the server image installs the project without extras,
# so importing an extra's package must fail here as it would there.
import importlib.abc
import sys

BLOCKED = frozenset({blocked!r})


class _NotInServerImage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(
                f"No module named {{name!r}} (an optional extra, not installed in the server image)", name=name)
        return None


sys.meta_path.insert(0, _NotInServerImage())
"""


def extra_modules() -> set[str]:
    """Top-level import names of the packages only the optional extras install."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base = {re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0].lower() for d in pyproject["dependencies"]}
    names = set()
    for deps in pyproject.get("optional-dependencies", {}).values():
        for dep in deps:
            dist = re.split(r"[<>=!~;\[ ]", dep, maxsplit=1)[0].lower()
            if dist not in base:
                names.add(IMPORT_NAMES.get(dist, dist.replace("-", "_")))
    return names


def server_image_env(site_dir: Path) -> dict[str, str]:
    """This environment, minus the extras: a sitecustomize that makes their imports fail."""
    site_dir.mkdir()
    (site_dir / "sitecustomize.py").write_text(BLOCKER.format(blocked=sorted(extra_modules())))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site_dir), env.get("PYTHONPATH")]))
    return env


# --- compose file ---------------------------------------------------------------

@pytest.mark.unit
def test_every_build_context_and_dockerfile_exists():
    services = compose()["services"]
    assert {"server", "recorder"} <= set(services)
    for name, svc in services.items():
        build = svc["build"]
        context = (COMPOSE_FILE.parent / build["context"]).resolve()
        assert context.is_dir(), f"{name}: no build context {context}"
        dockerfile = context / build.get("dockerfile", "Dockerfile")
        assert dockerfile.is_file(), f"{name}: no dockerfile {dockerfile}"
    assert (REPO / services["server"]["build"]["context"] / services["server"]["build"]["dockerfile"]).resolve() \
        == SERVER_DOCKERFILE
    assert (REPO / services["recorder"]["build"]["context"] / services["recorder"]["build"]["dockerfile"]).resolve() \
        == RECORDER_DOCKERFILE


@pytest.mark.unit
def test_server_service():
    server = service("server")
    assert "profiles" not in server, "`docker compose up` must start the server"
    assert any(str(p).split(":")[-1] == "8000" for p in server["ports"]), server["ports"]
    assert "./data:/data:ro" in server["volumes"], "the data folder must be mounted read-only at /data"
    assert server["restart"] == "unless-stopped"
    health = server["healthcheck"]
    test = " ".join(health["test"]) if isinstance(health["test"], list) else health["test"]
    assert "urllib" in test and "/api/models" in test and ":8000" in test
    assert "curl" not in test and "wget" not in test
    assert "command" not in server and "entrypoint" not in server, "the image's CMD is what runs (and is tested)"


@pytest.mark.unit
def test_recorder_service():
    recorder = service("recorder")
    assert recorder["profiles"] == ["record"]
    devices = recorder["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1
    device = devices[0]
    assert device["driver"] == "nvidia"
    assert device["count"] in ("all", 1)
    assert "gpu" in device["capabilities"]
    assert "hf-cache:/root/.cache/huggingface" in recorder["volumes"]
    assert "hf-cache" in compose()["volumes"]
    assert "./data:/data" in recorder["volumes"]


# --- Dockerfiles ----------------------------------------------------------------

@pytest.mark.unit
def test_server_dockerfile_installs_no_torch():
    text = SERVER_DOCKERFILE.read_text()
    runs = " ".join(instruction_args(SERVER_DOCKERFILE, "RUN"))
    pip_installs = re.findall(r"pip install[^&;|]*", runs)
    assert pip_installs, "the server image must pip install the project"
    for cmd in pip_installs:
        assert "torch" not in cmd and "[" not in cmd, f"server image installs extras or torch: {cmd!r}"
    assert any(re.search(r"pip install (\S+ )*\.(\s|$)", cmd + " ") for cmd in pip_installs), pip_installs
    assert "[record]" not in text and "transformer" not in text.lower()
    froms = instruction_args(SERVER_DOCKERFILE, "FROM")
    assert not any("pytorch" in f or "cuda" in f for f in froms), froms


@pytest.mark.unit
def test_server_dockerfile_builds_the_htmx_asset():
    items = instructions(SERVER_DOCKERFILE)
    runs = " ".join(args for kw, args in items if kw == "RUN")
    assert "npm ci" in runs
    assert "node_modules/htmx.org/dist/htmx.min.js" in runs
    final = final_stage(SERVER_DOCKERFILE)
    copies = [args for kw, args in final if kw == "COPY"]
    htmx = [i for i, args in enumerate(copies) if "frontend/static/vendor/htmx.min.js" in args]
    assert htmx, "the final image must receive frontend/static/vendor/htmx.min.js"
    # ... before the package is installed (it is package data).
    pip_at = next(i for i, (kw, args) in enumerate(final) if kw == "RUN" and "pip install" in args)
    copy_at = next(i for i, (kw, args) in enumerate(final)
                   if kw == "COPY" and "frontend/static/vendor/htmx.min.js" in args)
    assert copy_at < pip_at


@pytest.mark.unit
def test_server_dockerfile_cmd():
    assert exec_form(SERVER_DOCKERFILE, "CMD") == EXPECTED_SERVER_CMD
    assert not instruction_args(SERVER_DOCKERFILE, "ENTRYPOINT")


@pytest.mark.unit
def test_recorder_dockerfile():
    items = instructions(RECORDER_DOCKERFILE)
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for kw, a in items if kw == "ARG" and "=" in a}
    base = instruction_args(RECORDER_DOCKERFILE, "FROM")[-1]
    base = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), base)
    assert base.startswith("pytorch/pytorch:") and "cuda" in base and "runtime" in base, base
    runs = " ".join(a for kw, a in items if kw == "RUN")
    assert re.search(r"pip install .*['\"]?\.\[record\]['\"]?", runs), runs
    assert exec_form(RECORDER_DOCKERFILE, "ENTRYPOINT")[0] == "gluscope"


@pytest.mark.unit
@pytest.mark.parametrize("dockerfile", [SERVER_DOCKERFILE, RECORDER_DOCKERFILE], ids=["server", "recorder"])
def test_dockerfile_copies_every_package(dockerfile):
    """Each installed package folder is copied in, and every local COPY source exists."""
    sources: set[str] = set()
    for args in instruction_args(dockerfile, "COPY"):
        parts = args.split()
        if any(p.startswith("--from") for p in parts):
            continue
        parts = [p for p in parts if not p.startswith("--")]
        sources.update(p.rstrip("/") for p in parts[:-1])
    for folder in package_dirs() + ["pyproject.toml"]:
        assert folder in sources, f"{dockerfile.name} does not copy {folder}"
    for src in sources:
        assert (REPO / src).exists(), f"{dockerfile.name} copies {src}, which is not in the repository"


@pytest.mark.unit
def test_dockerignore():
    patterns = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    for needed in (".venv", ".git", "data"):
        assert needed in patterns, needed
    assert {"node_modules", "**/node_modules"} & patterns
    assert {"*.duckdb", "**/*.duckdb"} & patterns


# --- the server image's command, run outside Docker ---------------------------

@pytest.mark.system
@pytest.mark.slow
def test_server_command_serves_recorded_database(recorded_db: Path, tmp_path: Path):
    duckdb = pytest.importorskip("duckdb")
    with duckdb.connect(str(recorded_db), read_only=True) as con:
        model_name = con.execute("SELECT model_name FROM metadata").fetchone()[0]

    data = tmp_path / "data"
    data.mkdir()
    db = data / recorded_db.name
    shutil.copy(recorded_db, db)
    (data / "notes.txt").write_text("not a database\n")
    before = content_hash(db)

    port = free_port()
    cmd = exec_form(SERVER_DOCKERFILE, "CMD")
    assert cmd.count("/data") == 1 and cmd.count("8000") == 1, cmd
    argv = [str(data) if a == "/data" else str(port) if a == "8000" else a for a in cmd]
    # The console script of the environment running the tests (a venv's bin folder is not always on PATH).
    search_path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    exe = shutil.which(argv[0], path=search_path)
    assert exe, f"{argv[0]!r} is not installed (pip install -e .)"
    argv[0] = exe

    # Run it as the image would: from another folder, and with the record/test extras not importable
    # (the image installs the project with its base dependencies only).
    env = server_image_env(tmp_path / "site")
    assert subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True).returncode != 0
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        health = healthcheck_argv(port)
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"`{' '.join(argv)}` exited with {proc.returncode}:\n{log_path.read_text()}")
            if subprocess.run(health, capture_output=True, timeout=15).returncode == 0:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"healthcheck never passed:\n{log_path.read_text()}")
            time.sleep(0.3)

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as response:
            assert response.status == 200
            page = response.read().decode("utf-8", errors="replace")
        names = {model_name, Path(model_name).name}
        assert any(n in page or html.escape(n) in page for n in names), \
            f"the index page does not name the model {model_name!r}"

        # The page's own scripts and stylesheets (htmx among them) are served too.
        assets = re.findall(r"""<(?:script|link)\b[^>]*?(?:src|href)=["'](/[^"']*)["']""", page)
        assert any("htmx" in a for a in assets), assets
        for asset in assets:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{asset}", timeout=30) as response:
                assert response.status == 200, asset

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/models", timeout=30) as response:
            assert response.status == 200
            listing = response.read().decode()
        assert any(n in listing for n in names) or recorded_db.stem in listing, listing[:500]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert content_hash(db) == before, "the server modified a database it should only read"
