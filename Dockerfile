# syntax=docker/dockerfile:1
# fhirbridge, one image for three commands (see README "Deployment"):
#   the API (default):  docker run -p 8080:8080 -v fhirbridge-data:/data IMAGE
#   migrations (once per release, before the API; an init container or a job):
#                       docker run --rm -v fhirbridge-data:/data IMAGE fhirbridge db upgrade
#   the sync worker:    docker run -v fhirbridge-data:/data -e FHIRBRIDGE_TARGETS=... IMAGE fhirbridge worker
# Every setting is an environment variable (FHIRBRIDGE_<NAME>) or, for secrets, a mounted file
# (FHIRBRIDGE_<NAME>_FILE=/run/secrets/...). The API binds 0.0.0.0, so it refuses to start
# without authentication (FHIRBRIDGE_AUTH_API_KEYS[_FILE] or FHIRBRIDGE_AUTH_JWT_*).
# tests/test_container.py replays the RUN steps in a fresh virtualenv and runs the CMD.

# --- build: a virtualenv with fhirbridge and its dependencies, bytecode compiled ------------
FROM python:3.11-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY fhirbridge ./fhirbridge
# The pip cache is a build cache mount: it speeds up rebuilds and never enters the image.
RUN --mount=type=cache,target=/root/.cache/pip /opt/venv/bin/pip install ".[postgres]"
RUN /opt/venv/bin/python -m compileall -q -j 0 /opt/venv

# --- runtime: the virtualenv and the mapping pack, run as an unprivileged user ---------------
FROM python:3.11-slim-bookworm
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin fhirbridge
RUN mkdir -p /data /tmp/prometheus && chown 10001:10001 /data /tmp/prometheus
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY mappings ./mappings
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    FHIRBRIDGE_MAPPINGS_DIR=/app/mappings \
    FHIRBRIDGE_DATABASE_URL=sqlite:////data/fhirbridge.db \
    PROMETHEUS_MULTIPROC_DIR=/tmp/prometheus \
    GUNICORN_CMD_ARGS="--bind 0.0.0.0:8080"
# Numeric, so Kubernetes' runAsNonRoot can check it.
USER 10001:10001
VOLUME ["/data"]
EXPOSE 8080
# Ready = database reachable and at the latest migration, mappings loaded (503 otherwise).
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/readyz', timeout=4)"]
# The master checks the bind, settings, mappings and migrations and builds the app once, before
# any socket or worker exists (fhirbridge/gunicorn_conf.py): a refusal is one log line and exit
# status 2; the workers are forked from the built app and share its memory.
CMD ["gunicorn", "-c", "python:fhirbridge.gunicorn_conf", "fhirbridge:create_app()"]
