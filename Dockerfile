# syntax=docker/dockerfile:1
# The unified worker: live firehose + (worker 0) backfill. Two stages: the build stage
# installs the wheel and its dependencies into a virtualenv; the runtime stage copies only
# that virtualenv and runs as an unprivileged user.
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY firehose ./firehose
COPY backfill ./backfill
COPY sql ./sql
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --upgrade pip \
    && /opt/venv/bin/pip install --no-cache-dir .

FROM python:3.11-slim-bookworm
RUN groupadd --gid 10001 firehose \
    && useradd --create-home --uid 10001 --gid 10001 firehose \
    && mkdir /data \
    && chown firehose:firehose /data
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    DATA_DIR=/data \
    METRICS_PORT=8000
# Numeric, so Kubernetes' runAsNonRoot can verify it (hadolint DL3066).
USER 10001:10001
WORKDIR /home/firehose
EXPOSE 8000
# /healthz answers while the event loop is alive; python is the only tool the image has.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
# SIGTERM: the worker finishes the batch in hand, saves the cursor and exits 0 (< 10 s).
STOPSIGNAL SIGTERM
CMD ["python", "-m", "firehose"]
