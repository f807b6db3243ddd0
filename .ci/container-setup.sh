#!/usr/bin/env bash
# Prepare this machine for the container / compose / deploy tests.
#
# Idempotent: every step checks first and only does what is missing.
#   1. install Debian's container engine (docker.io 20.10), debootstrap, docker-compose 1.29,
#      prometheus (for promtool and the scrape test), redis-server and haproxy;
#   2. start dockerd if `docker info` does not answer (removing a stale pid file first);
#   3. build the offline base images local/python-base:bookworm, local/redis:bookworm,
#      local/prometheus:bookworm and local/haproxy:bookworm with debootstrap (reused when they
#      already exist).
#
# Fails loudly (non-zero exit, message on stderr) on any error.
# Always uses /usr/bin/docker: a newer /usr/local/bin/docker without buildx breaks BuildKit.
set -Eeuo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
DOCKER=/usr/bin/docker
DOCKERD_LOG="${DOCKERD_LOG:-/tmp/dockerd.log}"

log() { printf '[container-setup] %s\n' "$*"; }
die() { printf '[container-setup] ERROR: %s\n' "$*" >&2; exit 1; }
trap 'die "failed at line $LINENO: $BASH_COMMAND"' ERR

[ "$(id -u)" -eq 0 ] || die "must run as root (installs packages, starts dockerd)"

# --- 1. packages -------------------------------------------------------------------------
want=(docker.io debootstrap debian-archive-keyring ca-certificates docker-compose prometheus
      redis-server haproxy)
missing=()
for p in "${want[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$p")
    fi
done
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    # policy-rc.d (if present) keeps the packaged services from starting; we start what we need.
    apt-get install -y -q --no-install-recommends "${missing[@]}"
else
    log "packages already installed: ${want[*]}"
fi
for b in "$DOCKER" /usr/sbin/dockerd /usr/sbin/debootstrap /usr/bin/docker-compose \
         /usr/bin/promtool /usr/bin/prometheus /usr/bin/redis-server /usr/sbin/haproxy; do
    [ -x "$b" ] || die "expected binary $b is missing after install"
done

# --- 2. engine ---------------------------------------------------------------------------
# A dockerd killed hard leaves /var/run/docker.pid behind; its pid may be gone, reused by
# another program, or a zombie nobody reaps (kill -0 succeeds on those), so look at /proc.
dockerd_alive() {
    local pid="$1"
    [ -n "$pid" ] && [ -r "/proc/$pid/status" ] || return 1
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = dockerd ] || return 1
    ! grep -q '^State:[[:space:]]*Z' "/proc/$pid/status"
}
if "$DOCKER" info >/dev/null 2>&1; then
    log "dockerd already running ($("$DOCKER" version -f '{{.Server.Version}}'))"
else
    if [ -f /var/run/docker.pid ]; then
        pid="$(cat /var/run/docker.pid 2>/dev/null || true)"
        if dockerd_alive "$pid"; then
            log "dockerd pid $pid exists but does not answer yet; waiting for it"
        else
            log "removing stale /var/run/docker.pid (pid '${pid}' is not running)"
            rm -f /var/run/docker.pid
        fi
    fi
    if [ ! -f /var/run/docker.pid ]; then
        log "starting dockerd (log: $DOCKERD_LOG)"
        setsid /usr/sbin/dockerd >"$DOCKERD_LOG" 2>&1 </dev/null &
    fi
    for _ in $(seq 1 60); do
        "$DOCKER" info >/dev/null 2>&1 && break
        sleep 0.5
    done
    if ! "$DOCKER" info >/dev/null 2>&1; then
        tail -n 40 "$DOCKERD_LOG" >&2 || true
        die "dockerd did not come up within 30 s (see $DOCKERD_LOG)"
    fi
    log "dockerd is up ($("$DOCKER" version -f '{{.Server.Version}}'))"
fi

# --- 3. offline base images -------------------------------------------------------------
log "building offline base images (reused when present)"
DOCKER="$DOCKER" bash "$ROOT/deploy/offline/build-base-image.sh" all
"$DOCKER" image ls --format '{{.Repository}}:{{.Tag}}  {{.Size}}' | grep '^local/' || true
log "done"
