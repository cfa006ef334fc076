# syntax=docker/dockerfile:1
#
# One image for every streambroker process: `streambroker api` (the default command),
# `streambroker worker`, and the operator commands (`ls`, `tail`, `export`...).
#
#   docker build -t streambroker .
#   docker run --rm -p 8000:8000 -e REDIS_URL=redis://redis:6379/0 streambroker
#   docker run --rm -e REDIS_URL=redis://redis:6379/0 -e BROKER_METRICS_PORT=9100 \
#     streambroker worker
#   docker run --rm -it -e STREAMBROKER_URL=http://api:8000 streambroker tail <id>
#
# Deploying it (compose, Kubernetes, nginx or HAProxy in front): docs/operations.md, "Deploying".
# tests/test_deploy_image.py lints this file with hadolint and checks its command, ports and
# health check against the code.

# --- build: wheels for streambroker and its runtime dependencies ---------------------------
FROM python:3.11-slim AS build
WORKDIR /src
# Only what the package is built from (.dockerignore keeps the rest out of the context).
COPY pyproject.toml README.md ./
COPY broker ./broker
COPY api ./api
COPY workers ./workers
# No extras: the test and bench tools stay out of the image.
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# --- run ----------------------------------------------------------------------------------
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/streambroker/bin:$PATH

# A virtualenv of its own, installed from the build stage's wheels only (no index), without
# copying the wheels into a layer.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m venv /opt/streambroker \
    && /opt/streambroker/bin/pip install --no-cache-dir --no-index --find-links=/wheels \
        /wheels/streambroker-*.whl

# Not root. A numeric user, so that Kubernetes' runAsNonRoot can check it.
RUN useradd --system --no-log-init --uid 10001 --user-group --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin streambroker
USER 10001:10001
WORKDIR /opt/streambroker

# 8000: `streambroker api` (--port). 9100: a worker's /healthz, /readyz and /metrics when
# BROKER_METRICS_PORT=9100 (compose and infra/k8s/ set it).
EXPOSE 8000 9100

# Liveness: GET /healthz on the api's port, or on the worker's BROKER_METRICS_PORT when
# nothing listens on 8000 (a worker). A worker without BROKER_METRICS_PORT has no endpoint
# and shows as unhealthy: give it the port, or run it with --no-healthcheck.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, socket, urllib.request as u; ports = [p for p in ('8000', os.environ.get('BROKER_METRICS_PORT', '0')) if p != '0']; port = next((p for p in ports if socket.socket().connect_ex(('127.0.0.1', int(p))) == 0), ports[0]); u.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=2)"]

# SIGTERM (docker stop, Kubernetes) is what the api drains on and the worker hands over on.
STOPSIGNAL SIGTERM
ENTRYPOINT ["streambroker"]
CMD ["api"]
