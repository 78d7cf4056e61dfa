"""`docker compose --profile probe up -d --build` against a real Docker engine, as a user self-hosts.

A copy of the checkout (the committed docker-compose.yml and Dockerfiles,
unchanged) gets a ./data folder holding the recorded test database and a
./models folder holding the tiny model it was recorded from, and the server
and probe services are built and started there under a unique compose project
name on a free port (GLUSCOPE_PORT), with one override file that only renames
the images, so that a user's own gluscope-server and gluscope-probe images are
left alone. The server must turn healthy and serve a neuron page, its JSON twin
and an examples fragment identical to what the app serves in-process; inside,
it must run as a non-root user, be unable to write to /data and have no torch.
The probe must turn healthy once it has found the model under /models (the
file names the folder it was recorded from, on this machine), run as a
non-root user with /data and /models read-only, and the server must answer a
probe request through it with the probe's own answer, and a 503 while it is
out of reach.

The probe image installs torch from the PyTorch CPU index by default; here
this machine's CPU wheel (/opt/wheels) is put in the copy's docker/wheels/,
which the Dockerfile installs instead. Without such a wheel and with the index
out of reach, the probe's tests are skipped with the reason and the server's
still run. Everything the run created is removed after it, except the stand-in
base images and the probe image's layers up to its installed dependencies
(tagged gluscope-test-cache:probe-deps; see tests/docker_engine.py), which
later runs reuse while docker/probe.Dockerfile, pyproject.toml and the wheel
are unchanged (`docker rmi gluscope-test-cache:probe-deps` drops them).

Skipped, with the reason, where no engine can be used: not root and none
running, or Debian's docker.io / docker-compose / mmdebstrap not installed
(`make test` installs them as root).
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
import stat
import subprocess
import time
import urllib.error
import urllib.parse
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
PROBE_DOCKERFILE = REPO / "docker" / "probe.Dockerfile"
PROBE_GPU_OVERRIDE = REPO / "docker" / "probe-gpu.yml"
HEALTH_TIMEOUT_S = 180  # the compose healthcheck first runs `interval` (30 s) after the start
NEURON = (1, 3)
HX = {"HX-Request": "true"}
# The probe image's python is 3.11; a CPU build of torch on this machine's disk spares the PyTorch index.
TORCH_WHEELS = "/opt/wheels/torch-*+cpu-cp311-*.whl"
TORCH_INDEX = "https://download.pytorch.org/whl/cpu/torch/"
# The probe Dockerfile's instruction that installs the dependencies: the layers up to it are kept between runs.
PROBE_DEPS_STEP = "-r pyproject.toml --extra record"
PROBE_TEXT = "def add(a, b):\n    return a + b\n"


@dataclass
class Probe:
    container: str
    models: Path
    waited_s: float           # until the health status left "starting"
    logs: str = ""


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
    probe: Probe | None = None
    no_probe: str = ""        # why the probe was not started


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
    override.write_text(json.dumps({"services": {s: {"image": f"{name}-{s}"} for s in ("server", "probe")}}))
    images_before, containers_before = engine.image_ids(), engine.container_ids()
    compose = [*engine.compose, "-p", name, "-f", str(checkout / "docker-compose.yml"), "-f", str(override)]
    try:
        yield checkout, compose, images_before, containers_before
    finally:
        subprocess.run([*compose, "down", "--rmi", "all", "--volumes", "--remove-orphans", "-t", "10"],
                       capture_output=True, timeout=300, env={**os.environ, **docker_engine.BUILD_ENV})
        engine.remove_new(images_before, containers_before)


def torch_for_the_probe(checkout: Path) -> str:
    """Put this machine's CPU torch wheel in the copy's docker/wheels/; "" when done or the index answers,
    else why the probe cannot be built here."""
    wheels = sorted(Path(w) for w in glob.glob(TORCH_WHEELS))
    if wheels:
        target = checkout / "docker" / "wheels" / wheels[-1].name
        try:
            os.link(wheels[-1], target)  # 190 MB: a second name for it where the file system allows
        except OSError:
            shutil.copy(wheels[-1], target)
        return ""
    try:
        with urllib.request.urlopen(urllib.request.Request(TORCH_INDEX, method="HEAD"), timeout=15):
            return ""
    except (OSError, ValueError) as e:
        return (f"no CPU torch wheel for Python 3.11 at {TORCH_WHEELS}, and the PyTorch CPU index the probe "
                f"image installs torch from is out of reach ({TORCH_INDEX}: {e})")


def wait_healthy(engine: docker_engine.Engine, containers: list[str]) -> list[float]:
    """Seconds until each container's health status left "starting" (all polled together)."""
    started = time.monotonic()
    waited: dict[str, float] = {}
    while len(waited) < len(containers) and time.monotonic() < started + HEALTH_TIMEOUT_S:
        for c in containers:
            if c not in waited and health(engine, c)["Status"] != "starting":
                waited[c] = time.monotonic() - started
        time.sleep(1)
    return [waited.get(c, time.monotonic() - started) for c in containers]


@pytest.fixture(scope="module")
def served(engine, project, recorded_db, tiny_llama) -> Served:
    checkout, compose, _, _ = project
    kinds = engine.ensure_bases(list(dict.fromkeys(docker_engine.from_images(SERVER_DOCKERFILE)
                                                   + docker_engine.from_images(PROBE_DOCKERFILE))))
    assert kinds, "server.Dockerfile names no base image"

    data = checkout / "data"
    data.mkdir()
    # World-writable, so that only the read-only mount keeps the server (uid 1000) from writing there.
    data.chmod(0o777)
    db = data / recorded_db.name
    shutil.copy(recorded_db, db)
    db.chmod(0o644)

    # The model the file was recorded from, where the probe's --model-dir finds it: under the last part of
    # the source recorded in the file (this machine's path, which does not exist in the container).
    # Readable by the probe (uid 1000), as a user's must be: the tiny model's weights are saved 0600.
    models = checkout / "models"
    shutil.copytree(tiny_llama, models / tiny_llama.name)
    for path in [models, *models.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    no_probe = torch_for_the_probe(checkout)

    port = free_port()
    env = {**os.environ, **docker_engine.BUILD_ENV, "GLUSCOPE_PORT": str(port)}
    # As docs/self-hosting.md has it: `--profile probe up -d --build` starts the server and the probe.
    up_cmd = ["--profile", "probe", "up", "-d", "--build"] if not no_probe else ["up", "-d", "--build", "server"]
    up = subprocess.run([*compose, *up_cmd], capture_output=True, text=True, timeout=1500, env=env)
    assert up.returncode == 0, f"`docker compose {' '.join(up_cmd)}` failed:\n{up.stdout[-6000:]}{up.stderr[-6000:]}"
    services = ["server"] if no_probe else ["server", "probe"]
    # The project's containers by their compose label (the engine answers faster than compose v1 starts).
    listed = engine.run("ps", "-a", "--no-trunc", "--filter",
                        f"label=com.docker.compose.project={compose[compose.index('-p') + 1]}",
                        "--format", '{{.Label "com.docker.compose.service"}}\t{{.ID}}').stdout
    by_service = dict(line.split("\t") for line in listed.splitlines() if "\t" in line)
    containers = [by_service.get(s, "") for s in services]
    for s, c in zip(services, containers):
        assert c, f"compose started no {s} container"

    waited = wait_healthy(engine, containers)
    logs = [(lambda r: r.stdout + r.stderr)(engine.run("logs", c, check=False)) for c in containers]
    probe = None
    if not no_probe:
        probe = Probe(containers[1], models, waited[1], logs[1])
        image = engine.run("inspect", "--format", "{{.Image}}", probe.container).stdout.strip()
        engine.keep_layers(image, PROBE_DEPS_STEP, "probe-deps")
    return Served(engine, compose, containers[0], port, data, content_hash(db), waited[0], logs[0], probe, no_probe)


def the_probe(served: Served) -> Probe:
    if served.probe is None:
        pytest.skip(f"the probe service was not built: {served.no_probe}")
    return served.probe


def health(engine: docker_engine.Engine, container: str) -> dict:
    state = json.loads(engine.run("inspect", "--format", "{{json .State}}", container).stdout)
    assert "Health" in state, "the server container has no healthcheck"
    return {**state["Health"], "Running": state["Running"]}


def fetch(served: Served, path: str, headers: dict[str, str] | None = None) -> tuple[int, str, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{served.port}{path}", headers=headers or {})
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status, response.headers.get("content-type", ""), response.read().decode()


def exec_in(served: Served, *argv: str, container: str | None = None) -> subprocess.CompletedProcess[str]:
    return served.engine.run("exec", container or served.container, *argv, check=False)


def ask_probe(served: Served, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    """A request to the probe itself, from inside its container (compose publishes no port of it)."""
    script = ("import json, sys, urllib.error, urllib.request\n"
              "method, path, body = sys.argv[1], sys.argv[2], sys.argv[3]\n"
              "req = urllib.request.Request('http://127.0.0.1:8001' + path, method=method,\n"
              "                             data=body.encode() if body else None,\n"
              "                             headers={'Content-Type': 'application/json'})\n"
              "try:\n    r = urllib.request.urlopen(req, timeout=60)\n"
              "except urllib.error.HTTPError as e:\n    r = e\n"
              "print(r.status); print(r.read().decode())\n")
    result = exec_in(served, "python", "-c", script, method, path, json.dumps(body) if body else "",
                     container=the_probe(served).container)
    assert result.returncode == 0, result.stderr
    status, _, text = result.stdout.partition("\n")
    return int(status), json.loads(text)


def mounts(served: Served, container: str) -> dict[str, dict]:
    return {m["Destination"]: m for m in json.loads(served.engine.run("inspect", "--format", "{{json .Mounts}}",
                                                                      container).stdout)}


# --- the helper's own parsing (no engine needed) ----------------------------------

def test_from_images_skips_earlier_stages(tmp_path):
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text("FROM node:22-slim AS assets\nRUN true\nfrom --platform=linux/amd64 python:3.11-slim\n"
                          "COPY --from=assets /x /x\nFROM assets AS again\nFROM python:3.11-slim\n")
    assert docker_engine.from_images(dockerfile) == ["node:22-slim", "python:3.11-slim"]


def test_every_server_and_probe_base_has_a_stand_in():
    for image in docker_engine.from_images(SERVER_DOCKERFILE) + docker_engine.from_images(PROBE_DOCKERFILE):
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


# --- the probe service, and the server through it --------------------------------------

def test_probe_turns_healthy(served):
    probe = the_probe(served)
    state = health(served.engine, probe.container)
    assert state["Running"], f"the probe container stopped:\n{probe.logs}"
    last = (state.get("Log") or [{}])[-1]
    assert state["Status"] == "healthy", (f"health {state['Status']} after {probe.waited_s:.0f} s; the last check "
                                          f"exited {last.get('ExitCode')}:\n{last.get('Output')}\n{probe.logs}")


def test_server_answers_through_the_probe(served, model_id, con):
    """The server's probe JSON is the probe's own answer, for the model found under /models."""
    weights, tokens = con.execute("SELECT weights_fingerprint, tokenizer_fingerprint FROM metadata").fetchone()
    status, held = ask_probe(served, "GET", "/models")
    assert status == 200, held
    (model,) = held["models"]
    assert (model["model"], model["weights_fingerprint"], model["tokenizer_fingerprint"]) == \
        (model_id, weights, tokens)
    assert model["device"] == "cpu"

    layer, neuron = NEURON
    query = urllib.parse.urlencode({"text": PROBE_TEXT, "neurons": f"{layer}.{neuron}"})
    status, content_type, body = fetch(served, f"/api/models/{model_id}/probe/activations?{query}")
    assert status == 200 and content_type.startswith("application/json"), (status, content_type)
    status, direct = ask_probe(served, "POST", f"/models/{model_id}/activations",
                               {"text": PROBE_TEXT, "neurons": f"{layer}.{neuron}"})
    assert status == 200, direct
    assert json.loads(body) == direct
    assert [(n["layer"], n["neuron"]) for n in direct["neurons"]] == [NEURON]
    status, content_type, page = fetch(served, f"/models/{model_id}/probe/activations?{query}")
    assert status == 200 and content_type.startswith("text/html") and page.startswith("<!doctype html>")


def test_server_works_while_the_probe_is_out_of_reach(served, model_id):
    """Cut off from the compose network, the probe does not answer: the server says so (503) and still serves."""
    probe = the_probe(served)
    networks = json.loads(served.engine.run("inspect", "--format", "{{json .NetworkSettings.Networks}}",
                                            probe.container).stdout)
    (network,) = networks
    query = urllib.parse.urlencode({"text": PROBE_TEXT, "neurons": "{}.{}".format(*NEURON)})
    served.engine.run("network", "disconnect", network, probe.container)
    try:
        with pytest.raises(urllib.error.HTTPError) as answered:
            fetch(served, f"/api/models/{model_id}/probe/activations?{query}")
        assert answered.value.code == 503
        assert "error" in json.loads(answered.value.read())
        status, _, page = fetch(served, "/models/{}/neurons/{}/{}".format(model_id, *NEURON))
        assert status == 200 and page.startswith("<!doctype html>")
    finally:
        served.engine.run("network", "connect", "--alias", "probe", network, probe.container)
    assert fetch(served, f"/api/models/{model_id}/probe/activations?{query}")[0] == 200


def test_probe_runs_as_a_non_root_user_with_read_only_data_and_models(served):
    probe = the_probe(served)
    uid = exec_in(served, "id", "-u", container=probe.container)
    assert uid.returncode == 0 and uid.stdout.strip() != "0", ("the probe container runs as root", uid.stderr)
    user = served.engine.run("inspect", "--format", "{{.Config.User}}", probe.container).stdout.strip()
    assert user not in ("", "0", "root"), f"the image's USER is {user!r}"
    found = mounts(served, probe.container)
    for target, source in (("/data", served.data), ("/models", probe.models)):
        assert found[target]["RW"] is False and Path(found[target]["Source"]).resolve() == source.resolve(), target
    cache = found["/home/gluscope/.cache"]
    assert cache["Type"] == "volume" and cache["RW"] is True
    # The cache volume is the probe's to write (GGUF conversions, hub downloads), and torch a CPU build.
    check = ("import importlib.metadata as m, os, tempfile\n"
             "tempfile.NamedTemporaryFile(dir=os.environ['GLUSCOPE_CACHE']).close()\n"
             "print(m.version('torch'))\n")
    result = exec_in(served, "python", "-c", check, container=probe.container)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("+cpu"), result.stdout


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


def test_compose_reads_the_probe_and_its_gpu_override(project):
    """Compose resolves the probe's profile, the server's probe URL, and docker/probe-gpu.yml merged on top."""
    checkout, compose, _, _ = project
    for gpu in (False, True):
        files = ["-f", str(checkout / PROBE_GPU_OVERRIDE.relative_to(REPO))] if gpu else []
        config = subprocess.run([*compose, *files, "--profile", "probe", "config"], capture_output=True, text=True,
                                timeout=60)
        assert config.returncode == 0, config.stderr
        services = yaml.safe_load(config.stdout)["services"]
        assert services["server"]["environment"]["GLUSCOPE_PROBE_URL"] == "http://probe:8001"
        probe = services["probe"]
        assert probe["profiles"] == ["probe"]
        targets = {(v["target"] if isinstance(v, dict) else v.split(":")[1]): v for v in probe["volumes"]}
        assert {"/data", "/models", "/home/gluscope/.cache"} <= set(targets)
        for ro in ("/data", "/models"):
            v = targets[ro]
            assert (v.get("read_only") if isinstance(v, dict) else v.endswith(":ro")), v
        reservations = probe.get("deploy", {}).get("resources", {}).get("reservations", {})
        if not gpu:
            assert not reservations and "--device" not in probe["command"]
            continue
        (device,) = reservations["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
        assert probe["build"]["args"]["REQUIRE_CUDA"] == "1" and "/cu" in probe["build"]["args"]["TORCH_INDEX_URL"]
        assert probe["command"][-2:] == ["--device", "cuda"]
