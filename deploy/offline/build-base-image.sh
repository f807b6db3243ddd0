#!/usr/bin/env bash
# Build base images without any container registry, from Debian packages only.
#
#   deploy/offline/build-base-image.sh [python|redis|prometheus|haproxy|all]...   (default: python)
#
#   local/python-base:bookworm   bookworm minbase + python3 python3-venv python3-pip ca-certificates
#   local/redis:bookworm         bookworm minbase + redis-server        (runs as user redis, :6379)
#   local/prometheus:bookworm    bookworm minbase + prometheus          (runs as user prometheus, :9090)
#   local/haproxy:bookworm       bookworm minbase + haproxy             (runs as user haproxy; reads
#                                /usr/local/etc/haproxy/haproxy.cfg like the official haproxy image)
#
# An image that already exists is reused (FORCE=1 rebuilds it).  debootstrap runs once (mostly
# downloads, so its time depends on the mirror); its minbase tree is kept in $OFFLINE_CACHE and
# copied for each image.  Each step logs how long it took.
# The host's extra CA certificates (/usr/local/share/ca-certificates/*.crt, needed behind a
# TLS-intercepting proxy) are installed into every image with update-ca-certificates.
#
# Environment: DOCKER (/usr/bin/docker), SUITE (bookworm), DEBIAN_MIRROR
# (http://deb.debian.org/debian), OFFLINE_CACHE (/var/cache/chat-svc-offline), FORCE (0).
# Needs root (no sudo inside: run it as root), debootstrap and a running docker engine.
set -Eeuo pipefail

DOCKER="${DOCKER:-/usr/bin/docker}"
SUITE="${SUITE:-bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
CACHE="${OFFLINE_CACHE:-/var/cache/chat-svc-offline}"
FORCE="${FORCE:-0}"

log() { printf '[build-base-image] %s\n' "$*"; }
die() { printf '[build-base-image] ERROR: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (debootstrap, chroot, mount): run it from a root shell," \
    "or as \`sudo $0 ${*:-python}\` where sudo is installed"
command -v debootstrap >/dev/null || die "debootstrap not installed (apt-get install debootstrap debian-archive-keyring)"
"$DOCKER" info >/dev/null 2>&1 || die "docker engine not reachable with $DOCKER"

MOUNTED=()
WORKDIRS=()
cleanup() {
    local m d
    for m in "${MOUNTED[@]}"; do umount -l "$m" 2>/dev/null || true; done
    for d in "${WORKDIRS[@]}"; do rm -rf --one-file-system "$d"; done
}
trap cleanup EXIT
trap 'die "failed at line $LINENO: $BASH_COMMAND"' ERR

image_exists() { "$DOCKER" image inspect "$1" >/dev/null 2>&1; }

MINBASE=""
minbase() {
    # Debootstrap once; later images copy the cached tree.  Sets MINBASE.
    local dir="$CACHE/$SUITE-minbase"
    if [ -f "$dir/.complete" ]; then
        log "reusing cached $SUITE minbase at $dir" >&2
    else
        log "debootstrap --variant=minbase $SUITE from $MIRROR (downloads; a minute or so)" >&2
        rm -rf --one-file-system "$dir"
        mkdir -p "$CACHE"
        local t0=$SECONDS
        debootstrap --variant=minbase "$SUITE" "$dir" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
            || { tail -n 30 "$CACHE/debootstrap.log" >&2; die "debootstrap failed"; }
        touch "$dir/.complete"
        log "debootstrap took $((SECONDS - t0)) s" >&2
    fi
    MINBASE="$dir"
}

# make_rootfs NAME PACKAGES...  -> sets ROOTFS to a prepared root filesystem (removed at exit)
ROOTFS=""
make_rootfs() {
    local name="$1"; shift
    local root
    minbase
    root="$(mktemp -d "${TMPDIR:-/tmp}/offline-$name.XXXXXX")"
    WORKDIRS+=("$root")
    cp -a "$MINBASE/." "$root/"
    rm -f "$root/.complete"
    # keep package maintainer scripts from starting services inside the chroot
    printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
    chmod 755 "$root/usr/sbin/policy-rc.d"
    mount -t proc proc "$root/proc"; MOUNTED+=("$root/proc")
    cp /etc/resolv.conf "$root/etc/resolv.conf" 2>/dev/null || true
    log "installing into $name rootfs: $*" >&2
    chroot "$root" /usr/bin/env DEBIAN_FRONTEND=noninteractive LC_ALL=C \
        apt-get update -q >&2
    chroot "$root" /usr/bin/env DEBIAN_FRONTEND=noninteractive LC_ALL=C \
        apt-get install -y -q --no-install-recommends ca-certificates "$@" >&2
    # extra CA certificates of this host (TLS-intercepting proxies), then rebuild the bundle
    local n=0 crt
    for crt in /usr/local/share/ca-certificates/*.crt; do
        [ -e "$crt" ] || continue
        mkdir -p "$root/usr/local/share/ca-certificates"
        cp "$crt" "$root/usr/local/share/ca-certificates/"
        n=$((n + 1))
    done
    chroot "$root" update-ca-certificates >&2
    log "added $n extra CA certificate(s) from the host" >&2
    # slim down: package caches, lists, docs, man pages, locales
    chroot "$root" apt-get clean >&2
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/log/*.log \
        "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/tmp/* "$root"/var/tmp/*
    find "$root/usr/share/doc" -type f ! -name copyright -delete 2>/dev/null || true
    find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name 'C.*' -exec rm -rf {} + 2>/dev/null || true
    rm -f "$root/usr/sbin/policy-rc.d"
    : >"$root/etc/resolv.conf"
    umount -l "$root/proc"
    ROOTFS="$root"
}

# import ROOTFS TAG CHANGE...
import_rootfs() {
    local root="$1" tag="$2"; shift 2
    local args=() c
    for c in "$@"; do args+=(--change "$c"); done
    local old new
    old="$("$DOCKER" image inspect -f '{{.Id}}' "$tag" 2>/dev/null || true)"
    log "docker import -> $tag" >&2
    tar --numeric-owner --one-file-system -C "$root" \
        --exclude='./proc/*' --exclude='./sys/*' --exclude='./dev/*' -cf - . \
        | "$DOCKER" import "${args[@]}" -m "offline $SUITE image built by $(basename "$0")" - "$tag" >/dev/null
    log "$tag: $("$DOCKER" image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.1f MB", $1/1e6}')" >&2
    # FORCE=1 leaves the image it replaced untagged: remove it unless something still uses it
    new="$("$DOCKER" image inspect -f '{{.Id}}' "$tag")"
    if [ -n "$old" ] && [ "$old" != "$new" ]; then
        if "$DOCKER" rmi "$old" >/dev/null 2>&1; then
            log "removed the replaced image ${old:7:12}" >&2
        else
            log "kept the replaced image ${old:7:12}: containers or images still use it" >&2
        fi
    fi
}

build_python() {
    local tag=local/python-base:$SUITE
    if [ "$FORCE" != 1 ] && image_exists "$tag"; then log "reusing existing $tag"; return; fi
    make_rootfs python python3 python3-venv python3-pip
    import_rootfs "$ROOTFS" "$tag" \
        'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        'ENV LANG=C.UTF-8' \
        'CMD ["python3"]'
    "$DOCKER" run --rm "$tag" python3 -c 'import ssl, venv, ensurepip; print("python-base ok")'
}

build_redis() {
    local tag=local/redis:$SUITE
    if [ "$FORCE" != 1 ] && image_exists "$tag"; then log "reusing existing $tag"; return; fi
    make_rootfs redis redis-server
    import_rootfs "$ROOTFS" "$tag" \
        'ENV LANG=C.UTF-8' \
        'USER redis' \
        'WORKDIR /var/lib/redis' \
        'EXPOSE 6379' \
        'CMD ["redis-server", "--bind", "0.0.0.0", "--port", "6379", "--protected-mode", "no", "--save", "", "--appendonly", "no"]'
    "$DOCKER" run --rm "$tag" redis-server --version
}

build_prometheus() {
    local tag=local/prometheus:$SUITE
    if [ "$FORCE" != 1 ] && image_exists "$tag"; then log "reusing existing $tag"; return; fi
    make_rootfs prometheus prometheus
    # 212 MB of raw time-zone sources; the web UI only loads moment-timezone-with-data*.min.js
    rm -rf "$ROOTFS/usr/share/javascript/moment-timezone/data"
    mkdir -p "$ROOTFS/prometheus"
    chroot "$ROOTFS" chown prometheus:prometheus /prometheus
    import_rootfs "$ROOTFS" "$tag" \
        'ENV LANG=C.UTF-8' \
        'USER prometheus' \
        'WORKDIR /prometheus' \
        'EXPOSE 9090' \
        'ENTRYPOINT ["/usr/bin/prometheus"]' \
        'CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus", "--web.listen-address=:9090"]'
    "$DOCKER" run --rm "$tag" --version
}

build_haproxy() {
    local tag=local/haproxy:$SUITE
    if [ "$FORCE" != 1 ] && image_exists "$tag"; then log "reusing existing $tag"; return; fi
    make_rootfs haproxy haproxy
    # the official image's layout and command, so one compose file runs either image; its
    # entrypoint adds -W -db, which this image has no entrypoint for, so the command says them
    mkdir -p "$ROOTFS/usr/local/etc/haproxy"
    import_rootfs "$ROOTFS" "$tag" \
        'ENV LANG=C.UTF-8' \
        'USER haproxy' \
        'WORKDIR /var/lib/haproxy' \
        'CMD ["haproxy", "-W", "-db", "-f", "/usr/local/etc/haproxy/haproxy.cfg"]'
    "$DOCKER" run --rm "$tag" haproxy -v
}

timed() { local t0=$SECONDS; "$@"; log "$1 took $((SECONDS - t0)) s"; }

targets=("$@")
[ "${#targets[@]}" -gt 0 ] || targets=(python)
for t in "${targets[@]}"; do
    case "$t" in
        all) timed build_python; timed build_redis; timed build_prometheus; timed build_haproxy ;;
        python|python-base) timed build_python ;;
        redis) timed build_redis ;;
        prometheus) timed build_prometheus ;;
        haproxy) timed build_haproxy ;;
        *) die "unknown image '$t' (python|redis|prometheus|haproxy|all)" ;;
    esac
done
