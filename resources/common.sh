# Shared helpers for Ebb's resource scripts. Source it; do not run it.
# Artifacts live outside git in the cache directory:
#   ${EBB_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ebb}

EBB_CACHE_DIR="${EBB_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ebb}"
export EBB_CACHE_DIR

log() { printf '[ebb-resources] %s\n' "$*" >&2; }
die() { printf '[ebb-resources] error: %s\n' "$*" >&2; exit 1; }

# ensure_packages PKG... : install missing Debian packages (needs root or sudo).
ensure_packages() {
    local missing=() pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' \
            || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    local sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null || die "need root or sudo to install: ${missing[*]}"
        sudo=(sudo)
    fi
    log "installing Debian packages: ${missing[*]}"
    if ! "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y \
            --no-install-recommends "${missing[@]}" >&2; then
        "${sudo[@]}" apt-get update >&2 || die "apt-get update failed"
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y \
            --no-install-recommends "${missing[@]}" >&2 \
            || die "could not install: ${missing[*]}"
    fi
}
