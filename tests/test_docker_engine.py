"""`docker compose up -d --build server` against a real Docker engine, as a user self-hosts.

A copy of the checkout (the committed docker-compose.yml and Dockerfiles,
unchanged) gets a ./data folder holding the recorded test database, and the
server service is built and started there under a unique compose project name
on a free port (GLUSCOPE_PORT), with one override file that only renames the
image, so that a user's own gluscope-server image is left alone. It must turn healthy and serve a neuron page, its JSON twin and
an examples fragment identical to what the app serves in-process; inside, it
must run as a non-root user, be unable to write to /data and have no torch.
Everything the run created is removed after it, except the stand-in base images
(see tests/docker_engine.py), which later runs reuse.

Skipped, with the reason, where no engine can be used: not root and none
running, or Debian's docker.io / docker-compose / mmdebstrap not installed
(`make test` installs them as root).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import stat
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import docker_engine
from tests.processes import free_port
from tests.recordings import content_hash

pytestmark = [pytest.mark.system, pytest.mark.slow, pytest.mark.xdist_group("docker-engine")]

yaml = pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parent.parent
SERVER_DOCKERFILE = REPO / "docker" / "server.Dockerfile"
RECORDER_DOCKERFILE = REPO / "docker" / "recorder.Dockerfile"
HEALTH_TIMEOUT_S = 180  # the compose healthcheck first runs `interval` (30 s) after the start
NEURON = (1, 3)
HX = {"HX-Request": "true"}


@dataclass
class Served:
    engine: docker_engine.Engine
    compose: list[str]        # the compose command for this project, files included
    container: str
    port: int
    data: Path
    db_sha256: str
    waited_s: float           # until the health status left "starting"
    logs: str = ""


def copy_checkout(dest: Path) -> None:
    """The files a clone of this checkout would hold (tracked, plus new ones git does not ignore)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


@pytest.fixture(scope="module")
def engine():
    try:
        with docker_engine.running_engine() as e:
            yield e
    except docker_engine.Unavailable as e:
        pytest.skip(f"no Docker engine: {e}")


@pytest.fixture(scope="module")
def project(engine, tmp_path_factory):
    """A copy of the checkout and the compose command for a project of its own, cleaned up after."""
    root = tmp_path_factory.mktemp("compose")
    checkout = root / "gluscope"
    checkout.mkdir()
    copy_checkout(checkout)
    name = f"gluscope-test-{os.getpid()}-{secrets.token_hex(3)}"
    # Only the image's name differs from what a user runs, so that a user's own gluscope-server is left alone.
    override = root / "test-image-name.yml"
    override.write_text(json.dumps({"services": {"server": {"image": f"{name}-server"}}}))
    images_before, containers_before = engine.image_ids(), engine.container_ids()
    compose = [*engine.compose, "-p", name, "-f", str(checkout / "docker-compose.yml"), "-f", str(override)]
    try:
        yield checkout, compose, images_before, containers_before
    finally:
        subprocess.run([*compose, "down", "--rmi", "all", "--volumes", "--remove-orphans", "-t", "10"],
                       capture_output=True, timeout=300, env={**os.environ, **docker_engine.BUILD_ENV})
        engine.remove_new(images_before, containers_before)


@pytest.fixture(scope="module")
def served(engine, project, recorded_db) -> Served:
    checkout, compose, _, _ = project
    kinds = engine.ensure_bases(docker_engine.from_images(SERVER_DOCKERFILE))
    assert kinds, "server.Dockerfile names no base image"

    data = checkout / "data"
    data.mkdir()
    # World-writable, so that only the read-only mount keeps the server (uid 1000) from writing there.
    data.chmod(0o777)
    db = data / recorded_db.name
    shutil.copy(recorded_db, db)
    db.chmod(0o644)

    port = free_port()
    env = {**os.environ, **docker_engine.BUILD_ENV, "GLUSCOPE_PORT": str(port)}
    up = subprocess.run([*compose, "up", "-d", "--build", "server"], capture_output=True, text=True,
                        timeout=900, env=env)
    assert up.returncode == 0, f"`docker compose up -d --build server` failed:\n{up.stdout[-6000:]}{up.stderr[-6000:]}"
    container = subprocess.run([*compose, "ps", "-q", "server"], capture_output=True, text=True, env=env,
                               check=True).stdout.strip()
    assert container, "compose started no server container"

    started = time.monotonic()
    while health(engine, container)["Status"] == "starting" and time.monotonic() < started + HEALTH_TIMEOUT_S:
        time.sleep(1)
    logs = subprocess.run([*compose, "logs", "--no-color", "server"], capture_output=True, text=True,
                          env=env).stdout
    return Served(engine, compose, container, port, data, content_hash(db), time.monotonic() - started, logs)


def health(engine: docker_engine.Engine, container: str) -> dict:
    state = json.loads(engine.run("inspect", "--format", "{{json .State}}", container).stdout)
    assert "Health" in state, "the server container has no healthcheck"
    return {**state["Health"], "Running": state["Running"]}


def fetch(served: Served, path: str, headers: dict[str, str] | None = None) -> tuple[int, str, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{served.port}{path}", headers=headers or {})
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status, response.headers.get("content-type", ""), response.read().decode()


def exec_in(served: Served, *argv: str) -> subprocess.CompletedProcess[str]:
    return served.engine.run("exec", served.container, *argv, check=False)


# --- the helper's own parsing (no engine needed) ----------------------------------

def test_from_images_skips_earlier_stages(tmp_path):
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text("FROM node:22-slim AS assets\nRUN true\nfrom --platform=linux/amd64 python:3.11-slim\n"
                          "COPY --from=assets /x /x\nFROM assets AS again\nFROM python:3.11-slim\n")
    assert docker_engine.from_images(dockerfile) == ["node:22-slim", "python:3.11-slim"]


def test_every_server_base_has_a_stand_in():
    for image in docker_engine.from_images(SERVER_DOCKERFILE):
        assert f"FROM base-of-{image}" in docker_engine.standin_recipe(image, f"base-of-{image}")
    with pytest.raises(LookupError):
        docker_engine.standin_recipe("alpine:3", "base")


def test_debian_mirror_from_one_line_and_deb822_sources(tmp_path):
    (tmp_path / "sources.list.d").mkdir()
    assert docker_engine.debian_mirror(tmp_path) == docker_engine.DEFAULT_MIRROR
    (tmp_path / "sources.list.d" / "a.sources").write_text(
        "Types: deb\nURIs: http://security.example/debian-security\nSuites: bookworm-security\n\n"
        "Types: deb-src\nURIs: http://src.example/debian\nSuites: bookworm\n\n"
        "Types: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm bookworm-updates\n")
    assert docker_engine.debian_mirror(tmp_path) == "http://mirror.example/debian"
    (tmp_path / "sources.list").write_text(
        "# deb http://commented.example/debian bookworm main\n"
        "deb [signed-by=/k.gpg] https://list.example/debian bookworm main\n")
    assert docker_engine.debian_mirror(tmp_path) == "https://list.example/debian"


# --- the server service in a real engine ---------------------------------------------

def test_healthcheck_turns_healthy(served):
    state = health(served.engine, served.container)
    assert state["Running"], f"the server container stopped:\n{served.logs}"
    last = (state.get("Log") or [{}])[-1]
    assert state["Status"] == "healthy", (f"health {state['Status']} after {served.waited_s:.0f} s; the last check "
                                          f"exited {last.get('ExitCode')}:\n{last.get('Output')}\n{served.logs}")


def test_neuron_page_json_twin_and_examples_fragment(served, client, model_id):
    layer, neuron = NEURON
    base = f"/models/{model_id}/neurons/{layer}/{neuron}"
    cases = [
        (base, {}, "text/html"),
        (f"{base}.json", {}, "application/json"),
        (f"{base}/examples?quadrant=nn&hook=hook_post", HX, "text/html"),
    ]
    for path, headers, content_type in cases:
        status, got_type, body = fetch(served, path, headers)
        assert status == 200 and got_type.startswith(content_type), (path, status, got_type)
        # The in-process app over the same recorded file is the reference: same bytes through the container.
        expected = client.get(path, headers=headers)
        assert expected.status_code == 200, path
        if content_type == "application/json":
            assert json.loads(body) == expected.json(), path
        else:
            assert body == expected.text, path
    page, fragment = fetch(served, base)[2], fetch(served, cases[2][0], HX)[2]
    assert page.startswith("<!doctype html>") and f"{layer}.{neuron}" in page
    assert "<html" not in fragment and '<div class="examples"' in fragment


def test_runs_as_a_non_root_user(served):
    uid = exec_in(served, "id", "-u")
    assert uid.returncode == 0, uid.stderr
    assert uid.stdout.strip() != "0", "the server container runs as root"
    user = served.engine.run("inspect", "--format", "{{.Config.User}}", served.container).stdout.strip()
    assert user not in ("", "0", "root"), f"the image's USER is {user!r}"


def test_cannot_write_to_data(served):
    probe = ("import errno, sys\n"
             "try:\n    open('/data/written-by-server', 'w').close()\n"
             "except OSError as e:\n    sys.exit(0 if e.errno == errno.EROFS else f'not a read-only mount: {e}')\n"
             "sys.exit('the server could write to /data')\n")
    result = exec_in(served, "python", "-c", probe)
    assert result.returncode == 0, result.stderr
    assert not (served.data / "written-by-server").exists()
    mounts = json.loads(served.engine.run("inspect", "--format", "{{json .Mounts}}", served.container).stdout)
    (data_mount,) = [m for m in mounts if m["Destination"] == "/data"]
    assert data_mount["RW"] is False and Path(data_mount["Source"]).resolve() == served.data.resolve()
    (db,) = served.data.glob("*.duckdb")
    assert content_hash(db) == served.db_sha256, "the server changed the database it serves"
    assert stat.S_IMODE(served.data.stat().st_mode) == 0o777


def test_torch_is_not_installed(served):
    result = exec_in(served, "python", "-c", "import torch")
    assert result.returncode != 0 and "No module named 'torch'" in result.stderr, result.stdout + result.stderr
    server = exec_in(served, "python", "-c", "import gluscope.server.app")
    assert server.returncode == 0, "the check above must fail for want of torch, not of python: " + server.stderr


def test_compose_reads_both_services(engine, project):
    """Compose itself (not a YAML parser) resolves the file: the port variable, the recorder's profile and GPU."""
    _, compose, _, _ = project
    env = {**os.environ, "GLUSCOPE_PORT": "18123"}
    config = subprocess.run([*compose, "--profile", "record", "config"], capture_output=True, text=True,
                            env=env, timeout=60)
    assert config.returncode == 0, config.stderr
    services = yaml.safe_load(config.stdout)["services"]
    (port,) = services["server"]["ports"]
    assert str(port.get("published") if isinstance(port, dict) else port).split(":")[0] == "18123", port
    recorder = services["recorder"]
    assert recorder["profiles"] == ["record"]
    (device,) = recorder["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    targets = {(v["target"] if isinstance(v, dict) else v.split(":")[1]) for v in recorder["volumes"]}
    assert {"/data", "/root/.cache/huggingface"} <= targets

    (base,) = docker_engine.from_images(RECORDER_DOCKERFILE)
    args = {k: v for line in RECORDER_DOCKERFILE.read_text().splitlines()
            if line.startswith("ARG ") and "=" in line for k, v in [line[4:].split("=", 1)]}
    base = args.get(base.strip("${}"), base)
    if engine.label(base) is None:
        pytest.skip(f"the recorder image builds FROM {base}, a CUDA base that cannot be pulled or made here "
                    "(only its compose profile, GPU reservation and volumes are checked)")
