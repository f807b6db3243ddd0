# Sourced by scripts/serve and scripts/test: make sure .venv exists and has pip, or say plainly
# what the machine lacks (Debian's python3 has no venv/ensurepip without python3-venv, and
# `python3 -m venv` then leaves a .venv without pip behind).
# PYTHON picks the interpreter (default python3; chat-svc needs 3.11 or newer).
ensure_venv() {
    local who="$1" python="${PYTHON:-python3}"
    if .venv/bin/python -m pip --version >/dev/null 2>&1; then
        return 0
    fi
    if ! command -v "$python" >/dev/null 2>&1; then
        echo "$who: $python not found: install Python 3.11 or newer" \
            "(Debian/Ubuntu: apt-get install python3 python3-venv)" >&2
        exit 1
    fi
    if ! "$python" -c 'import ensurepip, venv' >/dev/null 2>&1; then
        echo "$who: $python cannot create a virtualenv: install python3-venv" \
            "(Debian/Ubuntu: apt-get install python3-venv), then run this again" >&2
        exit 1
    fi
    "$python" -m venv --clear .venv
}
