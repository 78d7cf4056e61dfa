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

from gluscope.cli import build_parser

from .processes import free_port
from .recordings import content_hash

yaml = pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO / "docker-compose.yml"
SERVER_DOCKERFILE = REPO / "docker" / "server.Dockerfile"
RECORDER_DOCKERFILE = REPO / "docker" / "recorder.Dockerfile"
PROBE_DOCKERFILE = REPO / "docker" / "probe.Dockerfile"
PROBE_GPU_OVERRIDE = REPO / "docker" / "probe-gpu.yml"
EXPECTED_SERVER_CMD = ["gluscope", "serve", "--host", "0.0.0.0", "--port", "8000", "--data-dir", "/data"]
EXPECTED_PROBE_CMD = ["gluscope", "probe", "/data", "--host", "0.0.0.0", "--port", "8001", "--model-dir", "/models"]


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
    assert {"server", "recorder", "probe"} <= set(services)
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
    assert (REPO / services["probe"]["build"]["context"] / services["probe"]["build"]["dockerfile"]).resolve() \
        == PROBE_DOCKERFILE


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


def dockerfile_env(dockerfile: Path) -> dict[str, str]:
    """The ENV settings of `dockerfile` (KEY=value form)."""
    env: dict[str, str] = {}
    for args in instruction_args(dockerfile, "ENV"):
        env.update(dict(pair.split("=", 1) for pair in shlex.split(args)))
    return env


def dockerfile_args(dockerfile: Path) -> dict[str, str]:
    """The ARG defaults of `dockerfile` (an ARG without one: "")."""
    return {name: shlex.split(value)[0] if value else "" for name, _, value in
            (args.partition("=") for args in instruction_args(dockerfile, "ARG"))}


@pytest.mark.unit
def test_probe_service():
    probe = service("probe")
    assert probe["profiles"] == ["probe"], "the probe needs its model in ./models: `up` without --profile skips it"
    assert probe["command"] == EXPECTED_PROBE_CMD
    args = build_parser().parse_args(probe["command"][1:])  # every flag is one `gluscope probe` takes
    assert args.command == "probe" and args.port == 8001 and str(args.model_dir) == "/models"
    assert "ports" not in probe, "only the server talks to the probe, over the compose network"
    assert "./data:/data:ro" in probe["volumes"], "the data folder must be mounted read-only at /data"
    assert "./models:/models:ro" in probe["volumes"], "the models folder must be mounted read-only at /models"
    (cache,) = [v for v in probe["volumes"] if v.startswith("probe-cache:")]
    assert "probe-cache" in compose()["volumes"]
    # GGUF conversions ($GLUSCOPE_CACHE) and hub downloads ($HF_HOME) land in the volume, owned by the image's user.
    target = cache.split(":")[1]
    env = dockerfile_env(PROBE_DOCKERFILE)
    for name in ("GLUSCOPE_CACHE", "HF_HOME"):
        assert env[name].startswith(target + "/"), (name, env[name], target)
    assert probe["restart"] == "unless-stopped"
    health = probe["healthcheck"]
    test = " ".join(health["test"]) if isinstance(health["test"], list) else health["test"]
    assert "urllib" in test and "127.0.0.1:8001/models" in test
    assert "curl" not in test and "wget" not in test
    assert "deploy" not in probe, "the probe runs on the CPU by default (docker/probe-gpu.yml adds the GPU)"


@pytest.mark.unit
def test_server_finds_the_probe_but_does_not_need_it():
    server, probe = service("server"), service("probe")
    url = server["environment"]["GLUSCOPE_PROBE_URL"]
    port = probe["command"][probe["command"].index("--port") + 1]
    assert url == f"http://probe:{port}"
    assert "depends_on" not in server, "the server must start, and serve, without the probe"


@pytest.mark.unit
def test_probe_gpu_override():
    """docker/probe-gpu.yml only adds to the probe: a CUDA build of torch, the GPU reservation, --device cuda."""
    override = yaml.safe_load(PROBE_GPU_OVERRIDE.read_text())
    assert set(override) == {"services"} and set(override["services"]) == {"probe"}
    gpu = override["services"]["probe"]
    assert gpu["deploy"] == service("recorder")["deploy"], "the same NVIDIA reservation as the recorder"
    build_args = gpu["build"]["args"]
    assert set(build_args) <= set(dockerfile_args(PROBE_DOCKERFILE)), "build args the Dockerfile does not take"
    assert build_args["TORCH_INDEX_URL"].startswith("https://download.pytorch.org/whl/cu")
    assert str(build_args["REQUIRE_CUDA"]) == "1"
    assert gpu["command"] == EXPECTED_PROBE_CMD + ["--device", "cuda"]
    assert build_parser().parse_args(gpu["command"][1:]).device == "cuda"
    assert gpu["image"] != service("probe")["image"], "the CUDA image must not replace the CPU one"
    assert "build" not in gpu or set(gpu["build"]) == {"args"}, "context and Dockerfile stay the main file's"


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
def test_probe_dockerfile():
    """Python 3.11 with a CPU build of torch (the PyTorch CPU index, else a wheel in docker/wheels/), the
    recorder's packages with that torch kept, run as uid 1000 with the compose command as its CMD."""
    (base,) = instruction_args(PROBE_DOCKERFILE, "FROM")
    assert base == "python:3.11-slim", base
    args = dockerfile_args(PROBE_DOCKERFILE)
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert args["REQUIRE_CUDA"] == "0"
    copies = instruction_args(PROBE_DOCKERFILE, "COPY")
    assert any(c.split()[0].rstrip("/") == "docker/wheels" for c in copies), copies
    assert (REPO / "docker" / "wheels").is_dir()
    wheel = REPO / "docker" / "wheels" / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"
    assert subprocess.run(["git", "check-ignore", "-q", str(wheel)], cwd=REPO).returncode == 0, \
        "a torch wheel put in docker/wheels/ must stay out of git"
    runs = " ".join(instruction_args(PROBE_DOCKERFILE, "RUN"))
    assert "--no-index --find-links /tmp/wheels" in runs and '--index-url "$TORCH_INDEX_URL"' in runs
    # Each install that could pull another torch is constrained to the one installed first.
    installs = [i for run in instruction_args(PROBE_DOCKERFILE, "RUN")
                for i in re.findall(r"uv pip install[^&;|]*", run)]
    later = [i for i in installs if "pyproject.toml" in i or ".[record]" in i]
    assert len(later) == 2 and all("-c /etc/gluscope-torch.txt" in i for i in later), installs
    assert "useradd --create-home --uid 1000" in runs
    final = final_stage(PROBE_DOCKERFILE)
    users = [a for kw, a in final if kw == "USER"]
    assert users and users[-1] not in ("root", "0"), users
    assert exec_form(PROBE_DOCKERFILE, "CMD") == EXPECTED_PROBE_CMD == service("probe")["command"]
    assert not instruction_args(PROBE_DOCKERFILE, "ENTRYPOINT")
    assert "8001" in " ".join(instruction_args(PROBE_DOCKERFILE, "EXPOSE"))


@pytest.mark.unit
@pytest.mark.parametrize("dockerfile", [SERVER_DOCKERFILE, RECORDER_DOCKERFILE, PROBE_DOCKERFILE],
                         ids=["server", "recorder", "probe"])
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
    for needed in (".venv", ".git", "data", "models"):
        assert needed in patterns, needed
    assert not any(p.startswith("docker") or p.endswith(".whl") for p in patterns), \
        "docker/wheels/ is the probe build's wheel folder"
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
