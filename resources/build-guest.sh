#!/usr/bin/env bash
# Build Ebb's default guest: the stock Debian kernel (via fetch-kernel.sh) plus an initramfs
# with busybox-static, the virtio modules, /init (resources/guest/init) and the guest tool
# ebb-guest (resources/guest-tool, built as a static binary). See GUEST-PROTOCOL.md.
#
# Usage: resources/build-guest.sh
#
# Output directory (printed on stdout; logs go to stderr):
#   $EBB_CACHE_DIR/guest/vmlinuz            the stock bzImage (hard link or copy)
#   $EBB_CACHE_DIR/guest/vmlinux            the ELF kernel (hard link or copy)
#   $EBB_CACHE_DIR/guest/initramfs.cpio.gz  the initramfs
#   $EBB_CACHE_DIR/guest/kver               the kernel release (uname -r)
#   $EBB_CACHE_DIR/guest/modules            the modules /init loads, in order ("name path")
#   $EBB_CACHE_DIR/guest/inputs.sha256      stamp of the inputs; unchanged stamp = no rebuild
#
# Environment: EBB_CACHE_DIR (see common.sh); EBB_GUEST_FORCE=1 rebuilds regardless of the
# stamp.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
. "$here/common.sh"

# Modules the guest needs (with their dependencies from modules.dep), in this order.
required_modules=(virtio_mmio virtio_balloon)
# Loaded if the kernel has them: evdev gives /dev/input/event* (CONFIG_INPUT_EVDEV=m on
# Debian), button is the ACPI power button that ebb-guest watches there.
optional_modules=(evdev button)

guest_dir="$here/guest"
tool_dir="$here/guest-tool"
out="$EBB_CACHE_DIR/guest"
start_time=$SECONDS

kdir="$("$here/fetch-kernel.sh")" || die "fetch-kernel.sh failed"
[ -f "$kdir/kver" ] || die "fetch-kernel.sh gave $kdir without a kver file"
kver="$(cat "$kdir/kver")"
moddir="$kdir/lib/modules/$kver"
[ -f "$moddir/modules.dep" ] || die "no modules.dep in $moddir"

ensure_packages busybox-static cpio file gzip libc6-dev
busybox=/bin/busybox
[ -x "$busybox" ] || die "busybox-static is installed but $busybox is missing"
command -v cargo >/dev/null || die "cargo not found (install Rust: https://rustup.rs)"

mkdir -p "$EBB_CACHE_DIR"
exec 9>"$EBB_CACHE_DIR/guest.lock"
flock 9 || die "cannot lock $EBB_CACHE_DIR/guest.lock"

# --- input stamp -------------------------------------------------------------------------
inputs_stamp() {
    {
        echo "kernel-dir $(basename "$kdir")"
        echo "kernel $kver $(cat "$kdir/package" 2>/dev/null || true)"
        echo "busybox $(dpkg-query -W -f='${Version}' busybox-static)"
        echo "rustc $(rustc -V 2>/dev/null || echo unknown)"
        echo "modules ${required_modules[*]} / ${optional_modules[*]}"
        (
            cd "$repo"
            {
                printf '%s\n' resources/build-guest.sh resources/common.sh \
                    resources/fetch-kernel.sh resources/extract-vmlinux.sh Cargo.toml Cargo.lock
                find resources/guest resources/guest-tool -path '*/target' -prune -o -type f -print
            } | LC_ALL=C sort -u | while read -r f; do
                if [ -f "$f" ]; then sha256sum "$f"; else echo "missing $f"; fi
            done
        )
    } | sha256sum | cut -d' ' -f1
}
stamp="$(inputs_stamp)"

outputs=(vmlinuz vmlinux initramfs.cpio.gz kver modules)
if [ "${EBB_GUEST_FORCE:-0}" != 1 ] && [ -f "$out/inputs.sha256" ] \
        && [ "$(cat "$out/inputs.sha256")" = "$stamp" ]; then
    complete=1
    for f in "${outputs[@]}"; do [ -s "$out/$f" ] || complete=0; done
    if [ "$complete" = 1 ]; then
        log "guest is up to date ($out)"
        echo "$out"
        exit 0
    fi
fi

# --- ebb-guest, static ----------------------------------------------------------------------
target=x86_64-unknown-linux-gnu
log "building ebb-guest (static, $target)"
# RUSTFLAGS would override the target-specific flags, so it is cleared for this build.
(
    cd "$repo"
    env -u RUSTFLAGS -u CARGO_ENCODED_RUSTFLAGS \
        CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static -C strip=debuginfo" \
        nice -n 10 cargo build --release -p ebb-guest --target "$target" \
        --target-dir "$repo/target/guest" >&2
) || die "cargo build of ebb-guest failed"
tool_bin="$repo/target/guest/$target/release/ebb-guest"
[ -x "$tool_bin" ] || die "cargo did not produce $tool_bin"

assert_static() { # assert_static FILE
    local desc
    desc="$(file -b "$1")"
    case "$desc" in
        *"statically linked"* | *"static-pie linked"*) ;;
        *) die "$1 is not statically linked: $desc" ;;
    esac
    local deps
    deps="$(ldd "$1" 2>&1 || true)"
    if grep -q '=>' <<<"$deps"; then
        die "$1 has shared library dependencies: $(tr '\n' ' ' <<<"$deps")"
    fi
}
assert_static "$tool_bin"
assert_static "$busybox"

# --- staging tree --------------------------------------------------------------------------
mkdir -p "$out"
tmp="$(mktemp -d "$EBB_CACHE_DIR/guest-build.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
root="$tmp/root"
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc/ebb,proc,sys,dev,run,tmp,root,lib/modules/"$kver"}
chmod 1777 "$root/tmp"

cp "$busybox" "$root/bin/busybox"
while read -r applet; do
    [ -n "$applet" ] || continue
    [ -e "$root/$applet" ] || [ -L "$root/$applet" ] || ln -s /bin/busybox "$root/$applet"
done < <("$busybox" --list-full)
[ -L "$root/bin/sh" ] || die "busybox has no sh applet"
[ -L "$root/sbin/insmod" ] || [ -L "$root/bin/insmod" ] || die "busybox has no insmod applet"

install -m 0755 "$guest_dir/init" "$root/init"
install -m 0755 "$tool_bin" "$root/bin/ebb-guest"
echo "$kver" > "$root/etc/ebb/kver"
printf 'root:x:0:0:root:/root:/bin/sh\n' > "$root/etc/passwd"
printf 'root:x:0:\ntty:x:5:\n' > "$root/etc/group"
# Anything else placed in resources/guest/rootfs/ is copied as is.
if [ -d "$guest_dir/rootfs" ]; then
    cp -a "$guest_dir/rootfs/." "$root/"
fi

# --- modules -------------------------------------------------------------------------------
declare -A dep_of=()      # module path -> its dependencies (modules.dep order)
declare -A path_of=()     # module name -> module path
modname() { # modname PATH -> name as the kernel spells it (dashes become underscores)
    local n="${1##*/}"
    n="${n%%.ko*}"
    echo "${n//-/_}"
}
while IFS= read -r line; do
    [ -n "$line" ] || continue
    p="${line%%:*}"
    read -r -a deps <<<"${line#*:}"
    dep_of["$p"]="${deps[*]}"
    n="${p##*/}"
    n="${n%%.ko*}"
    path_of["${n//-/_}"]="$p"
done < "$moddir/modules.dep"

builtin_module() { # builtin_module NAME: is it built into the kernel?
    [ -f "$moddir/modules.builtin" ] || return 1
    # (no grep -q: it would stop reading early and fail the pipeline under pipefail)
    sed 's|.*/||; s|\.ko.*||; s|-|_|g' "$moddir/modules.builtin" | grep -x "$1" >/dev/null
}

declare -A state=()       # path -> visiting | done
order=()
visit() { # visit PATH: dependencies first (in modules.dep order), then PATH
    local p="$1" d
    case "${state[$p]:-}" in
        done) return 0 ;;
        visiting) die "dependency cycle in modules.dep at $p" ;;
    esac
    state["$p"]=visiting
    for d in ${dep_of[$p]:-}; do
        [ -n "${dep_of[$d]+x}" ] || die "modules.dep names $d (needed by $p) but has no entry for it"
        visit "$d"
    done
    state["$p"]=done
    order+=("$p")
}
for m in "${required_modules[@]}" "${optional_modules[@]}"; do
    if [ -n "${path_of[$m]:-}" ]; then
        visit "${path_of[$m]}"
    elif builtin_module "$m"; then
        log "module $m is built into $kver"
    elif [[ " ${required_modules[*]} " == *" $m "* ]]; then
        die "kernel $kver has no module $m (not in modules.dep nor modules.builtin)"
    else
        log "kernel $kver has no module $m; skipping it"
    fi
done

: > "$root/etc/ebb/modules"
for p in "${order[@]}"; do
    src="$moddir/$p"
    [ -f "$src" ] || die "module file $src is missing"
    dst="${p%.ko*}.ko"
    mkdir -p "$root/lib/modules/$kver/$(dirname "$dst")"
    case "$p" in
        *.ko) cp "$src" "$root/lib/modules/$kver/$dst" ;;
        *.ko.xz) xz -dc "$src" > "$root/lib/modules/$kver/$dst" ;;
        *.ko.zst) zstd -qdc "$src" > "$root/lib/modules/$kver/$dst" ;;
        *.ko.gz) gzip -dc "$src" > "$root/lib/modules/$kver/$dst" ;;
        *) die "unknown module format: $p" ;;
    esac
    echo "$(modname "$p") $dst" >> "$root/etc/ebb/modules"
done
log "modules in load order: $(cut -d' ' -f1 "$root/etc/ebb/modules" | xargs)"

# --- initramfs -----------------------------------------------------------------------------
# /dev/console must exist before /init runs (the kernel opens it for PID 1's stdio). It is
# written as a separate newc archive, so no mknod (and no root) is needed; the kernel unpacks
# concatenated archives.
newc_entry() { # newc_entry INO MODE NLINK RDEVMAJOR RDEVMINOR NAME
    local name="$6" namesize=$((${#6} + 1)) pad
    printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
        "$1" "$2" 0 0 "$3" 0 0 0 0 "$4" "$5" "$namesize" 0
    printf '%s\0' "$name"
    pad=$(((4 - (110 + namesize) % 4) % 4))
    [ "$pad" -eq 0 ] || head -c "$pad" /dev/zero
}
dev_archive() {
    newc_entry $((0x7e0001)) $((0040755)) 2 0 0 dev
    newc_entry $((0x7e0002)) $((0020600)) 1 5 1 dev/console
    newc_entry 0 0 1 0 0 'TRAILER!!!'
}

find "$root" -exec touch -h -d @0 {} +
(
    cd "$root"
    find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort \
        | cpio --quiet -o -H newc -R 0:0 --reproducible
) > "$tmp/main.cpio" || die "cpio failed"
dev_archive > "$tmp/dev.cpio"

# Check both parts (cpio -t stops at the first trailer, so each is listed on its own).
listing="$(cpio --quiet -itv < "$tmp/main.cpio")" || die "the initramfs does not list with cpio"
for f in init bin/busybox bin/sh bin/ebb-guest etc/ebb/modules; do
    grep -q " $f\( ->.*\)\?$" <<<"$listing" || die "initramfs lacks $f"
done
listing="$(cpio --quiet -itv < "$tmp/dev.cpio")" || die "the /dev/console archive is broken"
grep -q '^crw------- .* 5, *1 .* dev/console$' <<<"$listing" \
    || die "the /dev/console archive is wrong: $listing"

cat "$tmp/main.cpio" "$tmp/dev.cpio" | gzip -9 -n > "$tmp/initramfs.cpio.gz"

# --- install -------------------------------------------------------------------------------
place_kernel() { # place_kernel NAME: hard link (or copy) the kernel's file into $out
    [ "$kdir/$1" -ef "$out/$1" ] && return 0
    rm -f "$out/.$1.tmp"
    ln "$kdir/$1" "$out/.$1.tmp" 2>/dev/null || cp "$kdir/$1" "$out/.$1.tmp"
    mv -f "$out/.$1.tmp" "$out/$1"
}
rm -f "$out/inputs.sha256"
place_kernel vmlinuz
place_kernel vmlinux
mv -f "$tmp/initramfs.cpio.gz" "$out/initramfs.cpio.gz"
echo "$kver" > "$out/kver"
cp "$root/etc/ebb/modules" "$out/modules"
echo "$stamp" > "$out/inputs.sha256"

log "built $out/initramfs.cpio.gz ($(stat -c %s "$out/initramfs.cpio.gz") bytes, kernel $kver) in $((SECONDS - start_time)) s"
echo "$out"
