"""A real Docker engine for tests/test_docker_engine.py, and the stand-in base images it builds from.

Nothing here is part of what a user runs. docker/server.Dockerfile starts FROM
public images (a Python 3.11 stage and a node stage) that machines without a
registry of images cannot pull, and package downloads there may go through
TLS interception. So, for the test only, each FROM name is given a local
stand-in: Debian bookworm made by mmdebstrap from the machine's own Debian
mirror, with python3 (3.11 in bookworm) or nodejs (and npm from its registry), this machine's CA
bundle, pip and npm told to use it, Debian's EXTERNALLY-MANAGED marker removed
and `python` provided. An image already present under a FROM name that is not
one of ours (the real one, on a machine that can pull) is used as it is.

Stand-ins carry the label `org.gluscope.standin`, whose value is a hash of their
recipe, so they are reused between runs and rebuilt when the recipe, the
mirror or the CA bundle changes. Likewise a built image's lower layers can be
kept under a `gluscope-test-cache:NAME` tag (Engine.keep_layers), so that the
builder's own cache reuses them while the instructions and files they came
from are unchanged (the probe image's torch and dependencies, minutes to
install). dockerd is started only if no engine answers,
and stopped again by whoever started it; a lock file keeps two test runs on one
machine from sharing an engine that one of them is about to stop.
"""

from __future__ import annotations

import configparser
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(os.environ.get("GLUSCOPE_CACHE", Path.home() / ".cache" / "gluscope")) / "docker"
LABEL = "org.gluscope.standin"
CACHE_REPO = "gluscope-test-cache"
# Debian 12, whose python3 is the 3.11 that server.Dockerfile's `FROM python:3.11-slim` names.
SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
CA_IN_IMAGE = "/usr/local/share/ca-certificates/gluscope-test-host-ca.crt"
# Legacy builds leave every layer as an image the test can list and remove; BuildKit's
# cache could only be pruned as a whole, which would take other projects' cache with it.
BUILD_ENV = {"DOCKER_BUILDKIT": "0", "COMPOSE_DOCKER_CLI_BUILD": "0"}


class Unavailable(Exception):
    """No engine can be used here; the message says why (the test skips with it)."""


# --- stand-in recipes ------------------------------------------------------------

# npm from its registry rather than Debian's npm package, whose ~470 small packages take dpkg
# over a minute here; 10.x is the newest line that runs on bookworm's nodejs 18.
NPM_VERSION = "10.9.2"
NPM_FROM_REGISTRY = (
    "node -e \"fetch('https://registry.npmjs.org/npm/-/npm-{v}.tgz')"
    ".then(r => r.ok ? r.arrayBuffer() : Promise.reject(new Error('HTTP ' + r.status)))"
    ".then(b => require('fs').writeFileSync('/tmp/npm.tgz', Buffer.from(b)))\" \\\n"
    " && mkdir -p /usr/local/lib/node_modules/npm \\\n"
    " && tar -xzf /tmp/npm.tgz -C /usr/local/lib/node_modules/npm --strip-components=1 && rm /tmp/npm.tgz \\\n"
    " && ln -s ../lib/node_modules/npm/bin/npm-cli.js /usr/local/bin/npm && npm --version"
).format(v=NPM_VERSION)

# Per FROM repository: the Debian packages, and what else makes them behave like that
# image (a `python` command, pip allowed into the system, an npm).
STANDINS: dict[str, tuple[list[str], str]] = {
    "python": (["python3", "python3-pip", "python-is-python3"], "rm -f /usr/lib/python3*/EXTERNALLY-MANAGED"),
    "node": (["nodejs"], NPM_FROM_REGISTRY),
}

STANDIN_DOCKERFILE = """\
FROM {base}
COPY ca.crt {ca}
ENV SSL_CERT_FILE={ca} PIP_CERT={ca} REQUESTS_CA_BUNDLE={ca} NODE_EXTRA_CA_CERTS={ca} npm_config_cafile={ca} \\
    npm_config_update_notifier=false
RUN echo force-unsafe-io > /etc/dpkg/dpkg.cfg.d/gluscope-test-unsafe-io \\
 && apt-get update -qq \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends {packages} >/dev/null \\
 && rm -rf /var/lib/apt/lists/* \\
 && {extra}
"""


def standin_recipe(image: str, base: str) -> str:
    """The Dockerfile of the stand-in for `image` (e.g. python:3.11-slim) on the Debian `base`."""
    repo = image.rsplit("/", 1)[-1].split(":", 1)[0]
    if repo not in STANDINS:
        raise LookupError(f"no stand-in known for FROM {image}: add one to STANDINS in {__file__}")
    packages, extra = STANDINS[repo]
    return STANDIN_DOCKERFILE.format(base=base, packages=" ".join(packages), extra=extra, ca=CA_IN_IMAGE)


def from_images(dockerfile: Path) -> list[str]:
    """The external images a Dockerfile's stages start FROM (not earlier stages), in order."""
    stages: set[str] = set()
    images: list[str] = []
    for line in dockerfile.read_text().splitlines():
        m = re.match(r"\s*FROM\s+(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", line, re.IGNORECASE)
        if not m:
            continue
        if m.group(1).lower() not in stages and m.group(1) not in images:
            images.append(m.group(1))
        if m.group(2):
            stages.add(m.group(2).lower())
    return images


def debian_mirror(apt_dir: Path = Path("/etc/apt")) -> str:
    """The first Debian archive (not -security) this machine's apt sources name."""
    for path in [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*"))]:
        if not path.is_file():
            continue
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", path.read_text()):
                fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, re.MULTILINE))
                if fields.get("Enabled", "yes").lower() == "no" or "deb" not in fields.get("Types", "").split():
                    continue
                for uri in fields.get("URIs", "").split():
                    if _is_debian_archive(uri):
                        return uri.rstrip("/")
        elif path.suffix == ".list":
            for line in path.read_text().splitlines():
                words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
                if len(words) >= 2 and words[0] == "deb" and _is_debian_archive(words[1]):
                    return words[1].rstrip("/")
    return DEFAULT_MIRROR


def _is_debian_archive(uri: str) -> bool:
    return uri.rstrip("/").endswith("/debian") and uri.startswith(("http://", "https://"))


def host_ca_bundle() -> Path:
    """The CA bundle this machine's pip trusts (SSL_CERT_FILE, PIP_CERT, pip's `cert`), else the system's."""
    candidates = [os.environ.get("SSL_CERT_FILE"), os.environ.get("PIP_CERT")]
    for conf in ["/etc/pip.conf", "/etc/xdg/pip/pip.conf", Path.home() / ".config" / "pip" / "pip.conf",
                 Path.home() / ".pip" / "pip.conf"]:
        parser = configparser.ConfigParser()
        try:
            parser.read(conf)
        except configparser.Error:
            continue
        candidates.append(parser.get("global", "cert", fallback=None))
    candidates.append("/etc/ssl/certs/ca-certificates.crt")
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    raise Unavailable("no CA bundle found for the stand-in base images")


def _key(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else p.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


# --- the engine -------------------------------------------------------------------

@dataclass
class Engine:
    docker: str
    compose: list[str]

    def run(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([self.docker, *args], capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **BUILD_ENV})
        if check and proc.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)} exited with {proc.returncode}:\n{proc.stdout}{proc.stderr}")
        return proc

    def label(self, image: str) -> str | None:
        """The stand-in label of `image`; "" for an image that is not ours, None when there is no such image."""
        proc = self.run("image", "inspect", "--format", "{{json .Config.Labels}}", image, check=False)
        if proc.returncode != 0:
            return None
        return (json.loads(proc.stdout) or {}).get(LABEL, "")

    def image_id(self, image: str) -> str | None:
        proc = self.run("image", "inspect", "--format", "{{.Id}}", image, check=False)
        return proc.stdout.strip() if proc.returncode == 0 else None

    def image_ids(self) -> set[str]:
        return set(self.run("images", "-aq", "--no-trunc").stdout.split())

    def container_ids(self) -> set[str]:
        return set(self.run("ps", "-aq", "--no-trunc").stdout.split())

    def ensure_bases(self, images: list[str]) -> dict[str, str]:
        """Make each FROM image available; returns image -> "stand-in" or "present" (a real image, used as is)."""
        ca = host_ca_bundle().read_bytes()
        mirror = debian_mirror()
        base = f"gluscope-test-debian:{SUITE}-{_key(SUITE, mirror, 'mmdebstrap minbase')}"
        kinds: dict[str, str] = {}
        wanted: dict[str, str] = {}
        for image in images:
            recipe = standin_recipe(image, base)
            key = _key(recipe, ca)
            label = self.label(image)
            if label == "":
                kinds[image] = "present"
            else:
                kinds[image] = "stand-in"
                if label != key:
                    wanted[image] = recipe
        if wanted:
            if self.label(base) is None:
                self._bootstrap(base, mirror)
            self._build_standins(wanted, ca)
            for stale in self.run("images", "--format", "{{.Repository}}:{{.Tag}}", base.split(":")[0]).stdout.split():
                if stale != base:
                    self.run("rmi", stale, check=False)  # fails, harmlessly, while a real image is built on it
        return kinds

    def _bootstrap(self, tag: str, mirror: str) -> None:
        """A minimal Debian root from `mirror`, streamed as a tar straight into `docker import`."""
        if os.geteuid() != 0:
            raise Unavailable("the stand-in base images are missing, and mmdebstrap needs root to make them")
        if not shutil.which("mmdebstrap"):
            raise Unavailable("mmdebstrap is not installed (make test installs it as root)")
        CACHE.mkdir(parents=True, exist_ok=True)
        with (CACHE / "mmdebstrap.log").open("w+") as log:
            tar = subprocess.Popen(["mmdebstrap", "--quiet", "--variant=minbase", "--dpkgopt=force-unsafe-io",
                                    SUITE, "-", mirror], stdout=subprocess.PIPE, stderr=log)
            imported = subprocess.run([self.docker, "import", "--change", f"LABEL {LABEL}={tag}", "-", tag],
                                      stdin=tar.stdout, capture_output=True, text=True, timeout=900)
            tar.stdout.close()
            if tar.wait(timeout=60) != 0 or imported.returncode != 0:
                log.seek(0)
                raise RuntimeError(f"mmdebstrap {SUITE} from {mirror} | docker import failed:\n"
                                   f"{log.read()[-3000:]}{imported.stderr}")

    def _build_standins(self, recipes: dict[str, str], ca: bytes) -> None:
        """Build the stand-ins side by side (each spends its time on apt's downloads and dpkg)."""
        CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=CACHE, prefix="standin-") as tmp:
            builds = []
            for i, (image, recipe) in enumerate(recipes.items()):
                context = Path(tmp) / str(i)
                context.mkdir()
                (context / "Dockerfile").write_text(recipe)
                (context / "ca.crt").write_bytes(ca)
                old = self.image_id(image)
                log = (context / "build.log").open("w")
                proc = subprocess.Popen([self.docker, "build", "-q", "--label", f"{LABEL}={_key(recipe, ca)}",
                                         "-t", image, str(context)], stdout=log, stderr=subprocess.STDOUT,
                                        env={**os.environ, **BUILD_ENV})
                builds.append((image, proc, log, context, old))
            failures = []
            for image, proc, log, context, old in builds:
                proc.wait(timeout=900)
                log.close()
                if proc.returncode != 0:
                    failures.append(f"stand-in for {image}:\n{(context / 'build.log').read_text()[-3000:]}")
                elif old and old != self.image_id(image):
                    self.run("rmi", old, check=False)  # the stale stand-in, now untagged
            if failures:
                raise RuntimeError("\n".join(failures))

    def keep_layers(self, image: str, step: str, name: str) -> str | None:
        """Tag the layer of `image` that its Dockerfile instruction containing `step` made, as
        gluscope-test-cache:NAME, so that it and the layers below outlive the image, for the next build to
        reuse (the classic builder's cache, which checks the instructions and the files copied). The layer the
        tag named before, if another, is removed. Returns the layer's id; None when the history has none
        (an image not built here by the classic builder)."""
        history = self.run("history", "--no-trunc", "--format", "{{.ID}}\t{{.CreatedBy}}", image).stdout
        ids = [line.split("\t", 1)[0] for line in history.splitlines() if step in line.partition("\t")[2]]
        if not ids or not ids[0].startswith("sha256:"):
            return None
        tag = f"{CACHE_REPO}:{name}"
        old = self.image_id(tag)
        self.run("tag", ids[0], tag)
        if old and old != ids[0]:
            self.run("rmi", old, check=False)  # now untagged; with its own lower layers that nothing else uses
        return ids[0]

    def remove_new(self, images_before: set[str], containers_before: set[str]) -> None:
        """Remove the containers and untagged images made since; tagged ones are someone's (or already gone)."""
        new_images = self.image_ids() - images_before
        for cid in self.container_ids() - containers_before:
            image = self.run("inspect", "--format", "{{.Image}}", cid, check=False).stdout.strip()
            if image in new_images:
                self.run("rm", "-f", cid, check=False)
        for _ in range(5):  # a layer goes only once the layers built on it are gone
            untagged = [i for i in self.image_ids() - images_before
                        if self.run("image", "inspect", "--format", "{{len .RepoTags}}", i,
                                    check=False).stdout.strip() == "0"]
            if not untagged:
                return
            self.run("rmi", *untagged, check=False)


def docker_cli() -> str:
    docker = shutil.which("docker")
    if not docker:
        raise Unavailable("no docker command (make test installs Debian's docker.io as root)")
    return docker


def compose_cli(docker: str) -> list[str]:
    """`docker compose` where the plugin is installed, else Debian's `docker-compose`."""
    if subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    if shutil.which("docker-compose"):
        return [shutil.which("docker-compose")]
    raise Unavailable("neither `docker compose` nor `docker-compose` is installed (make test installs docker-compose)")


def _answers(docker: str) -> bool:
    return subprocess.run([docker, "info"], capture_output=True, timeout=30).returncode == 0


@contextmanager
def running_engine(start_timeout: float = 90) -> Iterator[Engine]:
    """An engine that answers `docker info`: the one running, else a dockerd started here and stopped after."""
    docker = docker_cli()
    compose = compose_cli(docker)
    try:
        CACHE.mkdir(parents=True, exist_ok=True)
        lock = open(CACHE / "engine.lock", "w")
    except OSError as e:
        raise Unavailable(f"no lock file for the engine: {e}") from e
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _answers(docker):
            yield Engine(docker, compose)
            return
        if os.geteuid() != 0:
            raise Unavailable("no Docker engine is running, and starting dockerd needs root")
        dockerd = shutil.which("dockerd")
        if not dockerd:
            raise Unavailable("no Docker engine is running and dockerd is not installed (make test installs docker.io)")
        log_path = CACHE / "dockerd.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen([dockerd], stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + start_timeout
            while not _answers(docker):
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = log_path.read_text(errors="replace")[-2000:]
                    raise Unavailable(f"dockerd could not be started (exit {proc.poll()}):\n{tail}")
                time.sleep(0.5)
            yield Engine(docker, compose)
        finally:
            proc.terminate()  # dockerd stops its containers and the containerd it started
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
