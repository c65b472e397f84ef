# syntax=docker/dockerfile:1
# The gateway's image: `docker build -t mqtt-device-gateway .`
#
#   docker run --rm mqtt-device-gateway db migrate     # once per release (deploy/compose.yaml
#                                                      # runs it as the one-shot `migrate`)
#   docker run mqtt-device-gateway                      # `gateway run`, configured by GATEWAY_*
#
# Two stages: the first builds the project into a virtualenv, the second copies only that
# virtualenv onto a clean Python base, so no compiler, pip or setuptools reaches the image.
# Both stages use the same base: the virtualenv's interpreter links to its Python.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/gateway
WORKDIR /src
# What `pip install .` reads: the project file, the README it names, the schema it
# installs (gateway/schema.sql links to ../schema.sql), and the two packages.
COPY pyproject.toml README.md schema.sql ./
COPY codecs/ codecs/
COPY gateway/ gateway/
RUN /opt/gateway/bin/pip install . \
    && /opt/gateway/bin/pip uninstall --yes pip setuptools

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="mqtt-device-gateway" \
      org.opencontainers.image.description="MQTT device gateway: heartbeats into PostgreSQL, commands and settings out, a device registry over MQTT request/reply" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid gateway --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin gateway
COPY --from=build /opt/gateway /opt/gateway
ENV PATH=/opt/gateway/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    GATEWAY_METRICS_ADDR=0.0.0.0:9108 \
    GATEWAY_LOG_FORMAT=json
USER 10001:10001
EXPOSE 9108
# /healthz on the port of GATEWAY_METRICS_ADDR: 200 while the gateway (every worker, with
# GATEWAY_WORKERS above 1) is connected to the broker and PostgreSQL answers.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('GATEWAY_METRICS_ADDR', '127.0.0.1:9108').rpartition(':')[2]; urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4)"]
# SIGTERM drains accepted work (at most 10 s), then the gateway exits 0: give it a stop
# timeout above that (compose: stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["gateway"]
CMD ["run"]
