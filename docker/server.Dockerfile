# GLUScope server: browses recorded *.duckdb files. No torch, no recorder extras.
#   docker compose up -d server        (see docker-compose.yml)

# Stage 1: the htmx asset, from the npm lockfile (never from a CDN at run time).
FROM node:22-slim AS assets
WORKDIR /src/frontend
COPY frontend/package.json frontend/package-lock.json ./
RUN npm ci --no-audit --no-fund --loglevel=error \
 && mkdir -p static/vendor \
 && cp node_modules/htmx.org/dist/htmx.min.js static/vendor/htmx.min.js

# Stage 2: the project with its base dependencies only (duckdb, numpy, fastapi, uvicorn, jinja2, orjson).
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gluscope gluscope
COPY recorder recorder
COPY server server
COPY probe probe
COPY templates templates
COPY frontend frontend
COPY --from=assets /src/frontend/static/vendor/htmx.min.js frontend/static/vendor/htmx.min.js
RUN pip install . \
 && python -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)" \
 && cd / && rm -rf /src \
 && useradd --create-home --uid 1000 gluscope \
 && mkdir -p /data
WORKDIR /home/gluscope
USER gluscope
EXPOSE 8000
VOLUME ["/data"]
# No --workers: `gluscope serve` starts one reader per CPU the container may use (its cpuset and --cpus).
CMD ["gluscope", "serve", "--host", "0.0.0.0", "--port", "8000", "--data-dir", "/data"]
