ARG BASE_IMAGE=python:3.12-slim
FROM ${BASE_IMAGE} AS wheels
# chat-svc container image.
#
#   docker build -t chat-svc .
#   docker run --rm -p 9009:9009 chat-svc
#
# Without registry access, build on the offline base from deploy/offline/build-base-image.sh:
#   docker build --build-arg BASE_IMAGE=local/python-base:bookworm -t chat-svc .
#
# Works with the classic builder (DOCKER_BUILDKIT=0) and with BuildKit; no `# syntax=` line on
# purpose, since that makes the builder pull a frontend image from a registry.
# Stages: wheels (build every wheel) -> venv (install them, offline) -> runtime (only the venv).
# The classic builder keeps each earlier stage as an untagged image (it is also its layer
# cache); the label finds them:  docker image prune -f --filter label=chat-svc.build-stage
LABEL chat-svc.build-stage=wheels

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# .dockerignore lets in only pyproject.toml, README/LICENSE and service/.
COPY . .
RUN python3 -m venv /tmp/build-venv \
 && /tmp/build-venv/bin/pip wheel --wheel-dir /wheels . \
 && ls -1 /wheels

FROM ${BASE_IMAGE} AS venv
LABEL chat-svc.build-stage=venv
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
COPY --from=wheels /wheels /wheels
RUN python3 -m venv /opt/chat-svc \
 && /opt/chat-svc/bin/pip install --no-index --find-links /wheels chat-svc \
 && /opt/chat-svc/bin/pip uninstall -y pip setuptools \
 && /opt/chat-svc/bin/chat-svc --help >/dev/null

FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="chat-svc" \
      org.opencontainers.image.description="gevent TCP chat microservice with Prometheus metrics" \
      org.opencontainers.image.licenses="MIT"
# Fixed numeric uid/gid so Kubernetes runAsNonRoot can verify it without a passwd lookup.
RUN groupadd --system --gid 10001 chat \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin chat
COPY --from=venv /opt/chat-svc /opt/chat-svc
# Configuration is environment only: every flag is also CHAT_<NAME> (`chat-svc --help`).
ENV PATH=/opt/chat-svc/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CHAT_HOST=0.0.0.0 \
    CHAT_PORT=9009 \
    CHAT_LOG_FORMAT=json
USER 10001:10001
WORKDIR /tmp
EXPOSE 9009
# The server is PID 1 (exec-form CMD, no shell) and drains on SIGTERM.
STOPSIGNAL SIGTERM
# The service's own probe (GET /healthz on the chat port); no curl in the image.
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=3 \
    CMD ["chat-svc", "healthcheck"]
CMD ["chat-svc"]
