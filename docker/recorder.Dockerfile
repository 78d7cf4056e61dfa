# GLUScope recorder: streams a model over a corpus on an NVIDIA GPU and writes a .duckdb file.
#   docker compose --profile record run --rm recorder record ...   (see docker-compose.yml)
# The official PyTorch CUDA runtime image brings the CUDA build of torch; pip keeps it
# (a constraint pins the installed version) and adds the recorder's other dependencies.
ARG BASE_IMAGE=pytorch/pytorch:2.9.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/root/.cache/huggingface \
    HF_HUB_DISABLE_TELEMETRY=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gluscope gluscope
COPY recorder recorder
COPY server server
COPY probe probe
COPY templates templates
COPY frontend frontend
RUN python -c "import torch; assert torch.version.cuda, 'base image lacks the CUDA build of torch'; print('torch==' + torch.__version__.split('+')[0])" > /tmp/torch-constraint.txt \
 && pip install -c /tmp/torch-constraint.txt ".[record]" \
 && python -c "import torch; assert torch.version.cuda, 'pip replaced the CUDA build of torch'" \
 && cd / && rm -rf /src /tmp/torch-constraint.txt \
 && mkdir -p /data
WORKDIR /data
ENTRYPOINT ["gluscope"]
CMD ["--help"]
