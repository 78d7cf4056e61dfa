# GLUScope probe: loads the model each database in /data was recorded from and answers the server's
# live requests (a neuron on your text, the neurons firing at a token, ablations).
#   docker compose --profile probe up -d --build          (see docker-compose.yml)
#
# torch is a CPU build by default, from the PyTorch CPU index (PyPI's torch is the CUDA build, gigabytes
# larger). Where that index cannot be reached, put a torch wheel for Python 3.11 in docker/wheels/: it is
# installed instead (the newest one there that TORCH_SPEC admits), and nothing is fetched from
# TORCH_INDEX_URL; the wheel then stays in a layer of the image.
# For an NVIDIA GPU, docker/probe-gpu.yml builds with TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# and REQUIRE_CUDA=1 (which fails the build if torch is a CPU build, from a CPU wheel in docker/wheels/).
# uv installs the packages (the same resolution as pip, from the same indexes, in less than half the time).
FROM python:3.11-slim
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_SPEC="torch>=2.4,<3"
ARG REQUIRE_CUDA=0
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_NO_CACHE=1 \
    UV_SYSTEM_PYTHON=1 \
    UV_COMPILE_BYTECODE=1 \
    GLUSCOPE_CACHE=/home/gluscope/.cache/gluscope \
    HF_HOME=/home/gluscope/.cache/huggingface \
    HF_HUB_DISABLE_TELEMETRY=1

# 1. torch, in a layer that neither pyproject.toml nor the sources invalidate: from docker/wheels/ (then its
#    dependencies from PyPI, the wheel kept by its exact version), else from TORCH_INDEX_URL.
COPY docker/wheels/ /tmp/wheels/
RUN pip install -q uv \
 && if ls /tmp/wheels/torch-*.whl >/dev/null 2>&1; then \
        uv pip install --no-deps --no-index --find-links /tmp/wheels "$TORCH_SPEC" \
        && uv pip install "torch==$(python -c 'import importlib.metadata as m; print(m.version("torch"))')"; \
    else \
        uv pip install --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"; \
    fi \
 && rm -rf /tmp/wheels \
 && python -c "import torch; print('torch==' + torch.__version__); assert torch.version.cuda or '$REQUIRE_CUDA' != '1', \
        'REQUIRE_CUDA=1, but torch ' + torch.__version__ + ' is a CPU build (a CPU wheel in docker/wheels/?)'" \
        > /etc/gluscope-torch.txt

# 2. The recorder's packages, from pyproject.toml alone (source changes keep this layer); the constraint
#    keeps the torch installed above.
WORKDIR /src
COPY pyproject.toml README.md ./
RUN uv pip install -c /etc/gluscope-torch.txt -r pyproject.toml --extra record

# 3. The project itself.
COPY gluscope gluscope
COPY recorder recorder
COPY server server
COPY probe probe
COPY templates templates
COPY frontend frontend
RUN uv pip install -c /etc/gluscope-torch.txt ".[record]" \
 && cd / && rm -rf /src \
 && useradd --create-home --uid 1000 gluscope \
 && mkdir -p /data /models /home/gluscope/.cache/gluscope /home/gluscope/.cache/huggingface \
 && chown -R gluscope:gluscope /home/gluscope/.cache
WORKDIR /home/gluscope
USER gluscope
EXPOSE 8001
VOLUME ["/data"]
# The models of files recorded elsewhere go in /models, under the last part of their recorded source.
# Models are loaded before the port opens: the healthcheck (GET /models) passes once all are loaded.
CMD ["gluscope", "probe", "/data", "--host", "0.0.0.0", "--port", "8001", "--model-dir", "/models"]
