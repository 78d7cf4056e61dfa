# Set-up and the project's jobs. `make demo` is the main job; `make test` is what CI runs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# Where this machine keeps a CPU build of torch on disk, take it (an unpinned
# torch would download a multi-GB CUDA build); elsewhere pip resolves the range
# in pyproject.toml, which admits the CUDA build GPU users need.
TORCH_WHEEL := $(firstword $(wildcard /opt/wheels/torch-2.13.0*.whl))
TORCH_PIN   := $(if $(TORCH_WHEEL),--find-links $(dir $(TORCH_WHEEL)) torch==2.13.0,)
HTMX        := frontend/static/vendor/htmx.min.js

.PHONY: install assets browser compiler docker-engine test check demo clean

install: $(VENV)/.installed assets

# The demo needs the recorder's packages only; the tests add theirs on top.
# uv installs the same packages as pip (the same resolution, from the same
# index) in a fraction of the time, which is most of a fresh clone's demo time
# (README, Demo); where uv cannot be had, pip does the work.
comma := ,
INSTALL = if $(PY) -m uv --version >/dev/null 2>&1; then $(PY) -m uv pip install -q --python $(PY) $(1); \
	else $(PY) -m pip install -q $(1); fi

$(VENV)/.installed-record: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q uv || echo "uv unavailable: installing with pip"
	$(call INSTALL,$(TORCH_PIN) -e '.[record]')
	touch $@

$(VENV)/.installed: $(VENV)/.installed-record
	$(call INSTALL,$(TORCH_PIN) -e '.[record$(comma)test]')
	touch $@

assets: $(HTMX)

$(HTMX): frontend/package.json frontend/package-lock.json
	cd frontend && npm ci --no-audit --no-fund --loglevel=error
	mkdir -p $(dir $@)
	cp frontend/node_modules/htmx.org/dist/htmx.min.js $@

# Debian's chromium and chromium-driver for the browser tests.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else echo "chromium/chromedriver missing and not root: browser tests will be skipped"; fi

# g++ builds the recorder's CPU kernel on first use (without it the recorder
# falls back to slower tensor code, and the kernel's tests are skipped).
compiler:
	@if command -v g++ >/dev/null || command -v c++ >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ >/dev/null; \
	else echo "g++ missing and not root: the recorder falls back to its slower tensor code (kernel tests skip)"; fi

# Debian's Docker engine, compose and mmdebstrap for tests/test_docker_engine.py, which builds
# and starts the server service with `docker compose` (mmdebstrap makes its stand-in base images).
docker-engine:
	@if command -v dockerd >/dev/null && command -v mmdebstrap >/dev/null \
		&& { command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1; }; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io docker-compose mmdebstrap >/dev/null; \
	else echo "dockerd, docker-compose or mmdebstrap missing and not root: the Docker engine tests will be skipped"; fi

# The tiers are pytest markers (docs/development.md): `check` runs unit and integration, what a change needs
# between edits; `test` runs every tier, as CI does. Both share each recording across tests and workers
# (tests/recordings.py); PYTEST_WORKERS sets how many processes run the tests.
PYTEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadgroup

test: install browser compiler docker-engine
	$(PYTEST)

check: install compiler
	$(PYTEST) -m "not system"

demo: $(VENV)/.installed-record assets compiler
	$(PY) -m gluscope.cli demo

clean:
	rm -rf $(VENV) frontend/node_modules frontend/static/vendor
