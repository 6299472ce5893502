# syntax=docker/dockerfile:1
# fhirbridge: build a wheel in one stage, run it as a non-root user in the next.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY fhirbridge ./fhirbridge
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir ".[postgres]" \
 && /opt/venv/bin/python -m compileall -q /opt/venv/lib

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /app fhirbridge \
 && mkdir -p /app /data && chown fhirbridge /data
COPY --from=build /opt/venv /opt/venv
COPY mappings /app/mappings
WORKDIR /app
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    FHIRBRIDGE_MAPPINGS_DIR=/app/mappings \
    FHIRBRIDGE_DATABASE_URL=sqlite:////data/fhirbridge.db
USER fhirbridge
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/readyz', timeout=2).status == 200 else 1)"
CMD ["gunicorn", "--bind", "0.0.0.0:8080", "--workers", "2", "fhirbridge:create_app()"]
