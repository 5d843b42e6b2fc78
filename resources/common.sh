# Shared helpers for Ebb's resource scripts. Source it; do not run it.
# shellcheck shell=bash
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

EBB_RESOURCES_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# assert_static FILE: dies unless FILE is a statically linked executable.
assert_static() {
    local desc deps
    desc="$(file -b "$1")" || die "file(1) cannot read $1"
    case "$desc" in
        *"statically linked"* | *"static-pie linked"*) ;;
        *) die "$1 is not statically linked: $desc" ;;
    esac
    deps="$(ldd "$1" 2>&1 || true)"
    if grep -q '=>' <<<"$deps"; then
        die "$1 has shared library dependencies: $(tr '\n' ' ' <<<"$deps")"
    fi
}

# build_guest_tool: builds the guest tool ebb-guest (resources/guest-tool) as a static
# x86-64 binary (cargo, release, target dir target/guest) and prints its path. Needs cargo,
# file and ldd (packages file, libc6-dev).
build_guest_tool() {
    local repo target bin
    repo="$(cd "$EBB_RESOURCES_DIR/.." && pwd)"
    target=x86_64-unknown-linux-gnu
    command -v cargo >/dev/null || die "cargo not found (install Rust: https://rustup.rs)"
    log "building ebb-guest (static, $target)"
    # RUSTFLAGS would override the target-specific flags, so it is cleared for this build.
    (
        cd "$repo"
        env -u RUSTFLAGS -u CARGO_ENCODED_RUSTFLAGS \
            CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static -C strip=debuginfo" \
            nice -n 10 cargo build --release -p ebb-guest --target "$target" \
            --target-dir "$repo/target/guest" >&2
    ) || die "cargo build of ebb-guest failed"
    bin="$repo/target/guest/$target/release/ebb-guest"
    [ -x "$bin" ] || die "cargo did not produce $bin"
    assert_static "$bin"
    echo "$bin"
}

# guest_tool_sources_hash: one line per input of build_guest_tool (path and sha256), for
# the scripts' input stamps. Run from anywhere.
guest_tool_sources_hash() {
    (
        cd "$EBB_RESOURCES_DIR/.." || exit 1
        {
            printf '%s\n' Cargo.toml Cargo.lock
            find resources/guest-tool -path '*/target' -prune -o -type f -print
        } | LC_ALL=C sort -u | while read -r f; do
            if [ -f "$f" ]; then sha256sum "$f"; else echo "missing $f"; fi
        done
        echo "rustc $(rustc -V 2>/dev/null || echo unknown)"
    )
}

# module_load_order MODDIR REQUIRED OPTIONAL: prints the module files (paths relative to
# MODDIR, as modules.dep spells them) that load the modules named in the space-separated
# lists REQUIRED and OPTIONAL, each after its dependencies from modules.dep, one per line.
# A module built into the kernel (modules.builtin) needs no file; a missing OPTIONAL one is
# skipped with a log line, a missing REQUIRED one is an error.
module_load_order() {
    local moddir="$1" required="$2" optional="$3"
    local line p n m
    local -a deps=()
    local -A _mod_deps=() _mod_path=() _mod_state=()
    local -a _mod_order=()
    [ -f "$moddir/modules.dep" ] || die "no modules.dep in $moddir"
    while IFS= read -r line; do
        [ -n "$line" ] || continue
        p="${line%%:*}"
        read -r -a deps <<<"${line#*:}"
        _mod_deps["$p"]="${deps[*]}"
        n="${p##*/}"
        n="${n%%.ko*}"
        _mod_path["${n//-/_}"]="$p"
    done <"$moddir/modules.dep"
    for m in $required $optional; do
        if [ -n "${_mod_path[$m]:-}" ]; then
            _module_visit "${_mod_path[$m]}"
        elif _module_builtin "$moddir" "$m"; then
            log "module $m is built into the kernel"
        elif [[ " $required " == *" $m "* ]]; then
            die "the kernel in $moddir has no module $m (not in modules.dep nor modules.builtin)"
        else
            log "the kernel in $moddir has no module $m; skipping it"
        fi
    done
    [ ${#_mod_order[@]} -eq 0 ] || printf '%s\n' "${_mod_order[@]}"
}
_module_visit() { # uses module_load_order's _mod_* arrays (bash's dynamic scope)
    local p="$1" d
    case "${_mod_state[$p]:-}" in
        done) return 0 ;;
        visiting) die "dependency cycle in modules.dep at $p" ;;
    esac
    _mod_state["$p"]=visiting
    for d in ${_mod_deps[$p]:-}; do
        [ -n "${_mod_deps[$d]+x}" ] || die "modules.dep names $d (needed by $p) but has no entry for it"
        _module_visit "$d"
    done
    _mod_state["$p"]="done"
    _mod_order+=("$p")
}
_module_builtin() { # _module_builtin MODDIR NAME
    [ -f "$1/modules.builtin" ] || return 1
    # (no grep -q: it would stop reading early and fail the pipeline under pipefail)
    sed 's|.*/||; s|\.ko.*||; s|-|_|g' "$1/modules.builtin" | grep -x "$2" >/dev/null
}

# module_name PATH: the module's name as the kernel spells it (dashes become underscores).
module_name() {
    local n="${1##*/}"
    n="${n%%.ko*}"
    echo "${n//-/_}"
}

# install_modules MODDIR ROOT KVER LIST PATH...: copies each module file PATH (relative to
# MODDIR) uncompressed to ROOT/lib/modules/KVER/ and appends "name path" lines (path
# relative to that directory, ending in .ko) to the file LIST, in the order given.
install_modules() {
    local moddir="$1" root="$2" kver="$3" list="$4" p src dst
    shift 4
    for p in "$@"; do
        src="$moddir/$p"
        [ -f "$src" ] || die "module file $src is missing"
        dst="${p%.ko*}.ko"
        mkdir -p "$root/lib/modules/$kver/$(dirname "$dst")"
        case "$p" in
            *.ko) cp "$src" "$root/lib/modules/$kver/$dst" ;;
            *.ko.xz) xz -dc "$src" >"$root/lib/modules/$kver/$dst" ;;
            *.ko.zst) zstd -qdc "$src" >"$root/lib/modules/$kver/$dst" ;;
            *.ko.gz) gzip -dc "$src" >"$root/lib/modules/$kver/$dst" ;;
            *) die "unknown module format: $p" ;;
        esac || die "cannot unpack $src"
        echo "$(module_name "$p") $dst" >>"$list"
    done
}

# cpio_newc DIR: writes a newc cpio archive of DIR's contents to stdout, owned by root,
# every time stamp 0 and the entries sorted, so equal trees give equal archives.
cpio_newc() {
    find "$1" -exec touch -h -d @0 {} + || die "cannot reset the time stamps in $1"
    (
        cd "$1"
        find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort \
            | cpio --quiet -o -H newc -R 0:0 --reproducible
    ) || die "cpio failed on $1"
}
