#!/usr/bin/env bash
# Build a minimal Debian bookworm root file system image for Ebb guests that need a disk
# (fio and friends), plus the initramfs that boots it. Everything comes from Debian
# packages (mmdebstrap, variant minbase, from the Debian mirror the host's apt uses or
# deb.debian.org) and from this repository; no prebuilt image is downloaded.
#
# Boot path: Ebb boots the same stock Debian kernel as the default guest (fetch-kernel.sh)
# with the default guest's busybox initramfs (build-guest.sh) followed by a second,
# separately gzipped cpio archive made here (the kernel unpacks concatenated archives). The
# second archive adds the disk and file system modules, which Debian's kernel builds as
# modules (CONFIG_VIRTIO_BLK=m, CONFIG_EXT4_FS=m), and their list /etc/ebb/modules.root.
# Given root=/dev/vda on the kernel command line, the initramfs's /init
# (resources/guest/init) loads its usual modules (virtio_ring virtio virtio_mmio
# virtio_balloon evdev button), then those of modules.root (crc32c_generic virtio_blk
# crc16 mbcache jbd2 ext4 for Debian's 6.1 kernel; crc32c first because ext4 and jbd2
# look it up by name for metadata checksums), mounts /dev/vda read-write on /newroot,
# moves /dev, /proc and /sys there and switch_roots to /sbin/ebb-init in the image
# (resources/rootfs/ebb-init), which execs the guest tool `ebb-guest init`: the same PID 1
# supervisor and console command server as the busybox guest (GUEST-PROTOCOL.md). The
# image holds no kernel modules (the initramfs loads all the guest needs), so it does not
# depend on the kernel version. Without root= the combined initramfs behaves exactly like
# the default guest's (the extra modules stay unused). The default guest's own initramfs
# does not carry the disk modules, so it keeps its size and memory footprint.
#
# Kernel command line for Ebb (the disk as the first virtio-blk device, /dev/vda):
#   console=ttyS0 panic=-1 root=/dev/vda
# (also: ro, rootfstype=, rootflags=, init=; see resources/guest/init)
#
# Usage: resources/build-rootfs.sh     (as root: the image build needs it; see below)
#
# Output directory (printed on stdout; logs go to stderr):
#   $EBB_CACHE_DIR/rootfs/rootfs.ext4         the raw ext4 image (sparse), label ebb-root
#   $EBB_CACHE_DIR/rootfs/packages            the image's packages ("name version" lines)
#   $EBB_CACHE_DIR/rootfs/inputs.sha256       the image's input stamp
#   $EBB_CACHE_DIR/rootfs/initramfs.cpio.gz   the default guest's initramfs + the disk modules
#   $EBB_CACHE_DIR/rootfs/vmlinuz, vmlinux    the kernel (hard links or copies)
#   $EBB_CACHE_DIR/rootfs/kver                the kernel release
#   $EBB_CACHE_DIR/rootfs/modules.root        the extra modules /init loads, in order
#   $EBB_CACHE_DIR/rootfs/cmdline             the kernel command line above
#   $EBB_CACHE_DIR/rootfs/boot.sha256         the boot files' input stamp
# The image is rebuilt only when its stamp changes (this script, common.sh, ebb-init, the
# guest tool's sources, the package list, suite, mirrors, size); the boot files follow the
# default guest (a new kernel) without touching the image.
#
# Environment:
#   EBB_CACHE_DIR               see common.sh
#   EBB_ROOTFS_SIZE             image size for truncate(1) and mke2fs (default 1G)
#   EBB_ROOTFS_PACKAGES         extra packages, space-separated, on top of the fixed list
#   EBB_ROOTFS_MIRROR           Debian mirror (default: the host's apt source for bookworm,
#                               else http://deb.debian.org/debian)
#   EBB_ROOTFS_SECURITY_MIRROR  security mirror (default: the host's bookworm-security
#                               source, else http://deb.debian.org/debian-security)
#   EBB_ROOTFS_BOOTSTRAP        mmdebstrap (default) or debootstrap (the fallback, used
#                               on its own only when mmdebstrap cannot be installed)
#   EBB_ROOTFS_FORCE=1          rebuild the image and the boot files regardless of stamps
#
# Root: mmdebstrap's root mode and `mke2fs -d` write the tree as root, so that the image's
# files belong to root; neither a loop device nor a mount is needed, so the build works
# in containers.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$here/common.sh"

suite=bookworm
size="${EBB_ROOTFS_SIZE:-1G}"
# What a test workload needs on top of minbase (Essential and Priority: required).
packages=(fio procps util-linux mount e2fsprogs kmod)
read -r -a extra_packages <<<"${EBB_ROOTFS_PACKAGES:-}"
packages+=("${extra_packages[@]}")
# Loaded by /init for root= after the default guest's modules (dependencies from
# modules.dep come along); crc32c_generic first: see the header.
root_modules=(crc32c_generic virtio_blk ext4)
cmdline="console=ttyS0 panic=-1 root=/dev/vda"
# ext4 features, spelled out so that a newer host mke2fs cannot pick ones Debian's 6.1
# kernel lacks.
ext4_features=has_journal,ext_attr,resize_inode,dir_index,filetype,extent,64bit,flex_bg,sparse_super,large_file,huge_file,dir_nlink,extra_isize,metadata_csum

out="$EBB_CACHE_DIR/rootfs"
init_script="$here/rootfs/ebb-init"
start_time=$SECONDS
force="${EBB_ROOTFS_FORCE:-0}"

[ -f "$init_script" ] || die "missing $init_script"
truncate_bytes="$(numfmt --from=iec "${size%B}" 2>/dev/null)" \
    || die "EBB_ROOTFS_SIZE=$size is not a size (examples: 1G, 1536M)"
[ "$truncate_bytes" -ge $((256 << 20)) ] || die "EBB_ROOTFS_SIZE=$size is too small (at least 256M)"

# --- mirrors ---------------------------------------------------------------------------------
# apt_source_uri SUITE: the first http(s) URI the host's apt uses for SUITE (one-line .list
# files and deb822 .sources files), or nothing.
apt_source_uri() {
    local f
    {
        for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
            [ -f "$f" ] || continue
            sed -e 's/#.*//' -e 's/\[[^]]*\]//' "$f" \
                | awk -v s="$1" '$1 == "deb" && $3 == s { print $2 }'
        done
        for f in /etc/apt/sources.list.d/*.sources; do
            [ -f "$f" ] || continue
            awk -v s="$1" '
                function flush(  n, i, u, ok) {
                    ok = 0
                    n = split(suites, a, /[ \t]+/)
                    for (i = 1; i <= n; i++) if (a[i] == s) ok = 1
                    if (ok && enabled != "no" && types ~ /(^|[ \t])deb([ \t]|$)/) {
                        n = split(uris, u, /[ \t]+/)
                        for (i = 1; i <= n; i++) if (u[i] != "") print u[i]
                    }
                    types = uris = suites = ""; enabled = "yes"
                }
                BEGIN { enabled = "yes" }
                /^[ \t]*$/ { flush(); next }
                /^#/ || /^[ \t]/ { next }
                {
                    k = tolower($0); sub(/:.*/, "", k)
                    v = $0; sub(/^[^:]*:[ \t]*/, "", v)
                    if (k == "types") types = v
                    else if (k == "uris") uris = v
                    else if (k == "suites") suites = v
                    else if (k == "enabled") enabled = tolower(v)
                }
                END { flush() }' "$f"
        done
    } | grep -E '^https?://' | head -n1 | sed 's|/*$||' || true
}
mirror="${EBB_ROOTFS_MIRROR:-$(apt_source_uri "$suite")}"
mirror="${mirror:-http://deb.debian.org/debian}"
security="${EBB_ROOTFS_SECURITY_MIRROR:-$(apt_source_uri "$suite-security")}"
security="${security:-http://deb.debian.org/debian-security}"

# --- boot files: the default guest plus the disk modules --------------------------------------
guest="$("$here/build-guest.sh")" || die "build-guest.sh failed"
kdir="$("$here/fetch-kernel.sh")" || die "fetch-kernel.sh failed"
kver="$(cat "$guest/kver")"
[ "$kver" = "$(cat "$kdir/kver")" ] \
    || die "the default guest ($guest) is for $kver but fetch-kernel.sh gives $(cat "$kdir/kver")"
moddir="$kdir/lib/modules/$kver"

mkdir -p "$out"
exec 8>"$EBB_CACHE_DIR/rootfs.lock"
flock 8 || die "cannot lock $EBB_CACHE_DIR/rootfs.lock"

tmp="$(mktemp -d "$EBB_CACHE_DIR/rootfs-build.XXXXXX")" || die "cannot create a directory in $EBB_CACHE_DIR"
chmod 0755 "$tmp" # apt's _apt user downloads into the tree
cleanup() {
    # --one-file-system: never descend into something a failed bootstrap left mounted.
    rm -rf --one-file-system "$tmp" 2>/dev/null || log "could not remove all of $tmp"
}
trap cleanup EXIT

boot_stamp="$(
    {
        echo "guest $(cat "$guest/inputs.sha256")"
        echo "modules ${root_modules[*]}"
        echo "cmdline $cmdline"
        sha256sum "$here/build-rootfs.sh" "$here/common.sh" | cut -d' ' -f1
    } | sha256sum | cut -d' ' -f1
)"
boot_outputs=(initramfs.cpio.gz vmlinuz vmlinux kver modules.root cmdline)
boot_current=0
if [ "$force" != 1 ] && [ -f "$out/boot.sha256" ] && [ "$(cat "$out/boot.sha256")" = "$boot_stamp" ]; then
    boot_current=1
    for f in "${boot_outputs[@]}"; do [ -s "$out/$f" ] || boot_current=0; done
fi
if [ "$boot_current" = 1 ]; then
    log "boot files are up to date (kernel $kver)"
else
    log "adding the disk modules to the default guest's initramfs (kernel $kver)"
    ensure_packages cpio gzip xz-utils zstd
    order="$(module_load_order "$moddir" "${root_modules[*]}" "")" \
        || die "cannot resolve the disk modules in $moddir"
    # The default guest loads its own modules first: leave those out.
    declare -A in_guest=()
    while read -r name _; do [ -z "$name" ] || in_guest["$name"]=1; done <"$guest/modules"
    extra=()
    for p in $order; do
        [ -n "${in_guest[$(module_name "$p")]:-}" ] || extra+=("$p")
    done
    [ ${#extra[@]} -gt 0 ] || die "no disk modules to add (are they built into $kver?)"
    stage="$tmp/boot"
    mkdir -p "$stage/etc/ebb"
    : >"$stage/etc/ebb/modules.root"
    install_modules "$moddir" "$stage" "$kver" "$stage/etc/ebb/modules.root" "${extra[@]}"
    cpio_newc "$stage" | gzip -9 -n >"$tmp/root-modules.cpio.gz" || die "cannot pack the disk modules"
    listing="$(gzip -dc "$tmp/root-modules.cpio.gz" | cpio --quiet -it)" \
        || die "the disk module archive does not list with cpio"
    grep -qx 'etc/ebb/modules.root' <<<"$listing" || die "the disk module archive lacks etc/ebb/modules.root"
    cat "$guest/initramfs.cpio.gz" "$tmp/root-modules.cpio.gz" >"$tmp/initramfs.cpio.gz"
    gzip -t "$tmp/initramfs.cpio.gz" || die "the combined initramfs is not valid gzip"

    rm -f "$out/boot.sha256"
    for f in vmlinuz vmlinux; do
        if ! [ "$guest/$f" -ef "$out/$f" ]; then
            rm -f "$out/.$f.tmp"
            ln "$guest/$f" "$out/.$f.tmp" 2>/dev/null || cp "$guest/$f" "$out/.$f.tmp" \
                || die "cannot copy $guest/$f"
            mv -f "$out/.$f.tmp" "$out/$f"
        fi
    done
    mv -f "$tmp/initramfs.cpio.gz" "$out/initramfs.cpio.gz"
    cp "$stage/etc/ebb/modules.root" "$out/modules.root"
    echo "$kver" >"$out/kver"
    echo "$cmdline" >"$out/cmdline"
    echo "$boot_stamp" >"$out/boot.sha256"
    log "disk modules in load order: $(cut -d' ' -f1 "$out/modules.root" | xargs)" \
        "($(stat -c %s "$out/initramfs.cpio.gz") bytes in all)"
fi

# --- image stamp ---------------------------------------------------------------------------
image_stamp="$(
    {
        echo "suite $suite"
        echo "mirror $mirror"
        echo "security $security"
        echo "size $truncate_bytes"
        echo "packages ${packages[*]}"
        echo "features $ext4_features"
        echo "bootstrap ${EBB_ROOTFS_BOOTSTRAP:-mmdebstrap}"
        sha256sum "$here/build-rootfs.sh" "$here/common.sh" "$init_script" | cut -d' ' -f1
        guest_tool_sources_hash
    } | sha256sum | cut -d' ' -f1
)"
if [ "$force" != 1 ] && [ -f "$out/inputs.sha256" ] && [ "$(cat "$out/inputs.sha256")" = "$image_stamp" ] \
        && [ -s "$out/rootfs.ext4" ] && [ -s "$out/packages" ]; then
    log "rootfs image is up to date ($out/rootfs.ext4)"
    echo "$out"
    exit 0
fi

# --- image ---------------------------------------------------------------------------------
[ "$(id -u)" -eq 0 ] || die "building the rootfs image needs root (mmdebstrap's root mode and \
mke2fs -d must create files owned by root): run it as root, e.g. sudo env PATH=\"\$PATH\" \
EBB_CACHE_DIR=\"$EBB_CACHE_DIR\" $0 (cargo must be on the PATH)"
log "building the $suite rootfs image (${packages[*]}) from $mirror"
ensure_packages e2fsprogs debian-archive-keyring file libc6-dev
tool_bin="$(build_guest_tool)" || die "building ebb-guest failed"

# Reachability first, so that a missing network gives a clear error instead of a bootstrap
# failure deep in apt's output.
check_url() { # check_url URL: can the mirror be reached?
    if command -v curl >/dev/null; then
        curl -fsS --max-time 30 -o /dev/null "$1"
    elif command -v wget >/dev/null; then
        wget -q -T 30 -O /dev/null "$1"
    else
        return 0
    fi
}
check_url "$mirror/dists/$suite/InRelease" \
    || die "cannot reach the Debian mirror $mirror (no network? set EBB_ROOTFS_MIRROR to a reachable one)"

bootstrap="${EBB_ROOTFS_BOOTSTRAP:-mmdebstrap}"
case "$bootstrap" in
    mmdebstrap)
        if ! (ensure_packages mmdebstrap) || ! mmdebstrap --version >/dev/null 2>&1; then
            log "mmdebstrap is not usable here; falling back to debootstrap"
            bootstrap=debootstrap
        fi
        ;;
    debootstrap) ;;
    *) die "EBB_ROOTFS_BOOTSTRAP=$bootstrap: use mmdebstrap or debootstrap" ;;
esac

# Documentation, manual pages and translations are left out (the copyright files stay).
dpkg_excludes=(
    'path-exclude=/usr/share/man/*'
    'path-exclude=/usr/share/info/*'
    'path-exclude=/usr/share/locale/*'
    'path-include=/usr/share/locale/locale.alias'
    'path-exclude=/usr/share/doc/*'
    'path-include=/usr/share/doc/*/copyright'
    'path-exclude=/usr/share/lintian/*'
)
sources=("deb $mirror $suite main" "deb $mirror $suite-updates main"
    "deb $security $suite-security main")
tree="$tmp/tree"
bootstrap_log="$tmp/bootstrap.log"
bootstrap_failed() { # bootstrap_failed TOOL
    if grep -qiE 'unable to locate package|has no installation candidate|no packages found' "$bootstrap_log"; then
        die "$1 failed: a package is not in $suite (packages: ${packages[*]}); see the log above"
    elif grep -qiE 'could not resolve|temporary failure resolving|failed to fetch|connection (refused|timed out)' "$bootstrap_log"; then
        die "$1 failed: cannot download from $mirror (network?); see the log above"
    fi
    die "$1 failed; see the log above"
}

bootstrap_start=$SECONDS
if [ "$bootstrap" = mmdebstrap ]; then
    opts=(--mode=root --variant=minbase --format=directory
        --include="$(IFS=,; echo "${packages[*]}")"
        --aptopt='APT::Install-Recommends "false"' --aptopt='Acquire::Languages "none"')
    for x in "${dpkg_excludes[@]}"; do opts+=(--dpkgopt="$x"); done
    # mmdebstrap's own hook lays out merged /usr the way debootstrap does and installs
    # usr-is-merged; without it apt satisfies init-system-helpers' "usrmerge |
    # usr-is-merged" with usrmerge, which pulls in perl (~50 MiB).
    merged_usr_hooks=/usr/share/mmdebstrap/hooks/merged-usr
    if [ -x "$merged_usr_hooks/setup00.sh" ]; then
        opts+=(--hook-dir="$merged_usr_hooks")
    else
        log "no $merged_usr_hooks: the image gets usrmerge and perl"
    fi
    log "running mmdebstrap $(mmdebstrap --version | cut -d' ' -f2)"
    mmdebstrap "${opts[@]}" "$suite" "$tree" "${sources[@]}" 2>&1 | tee "$bootstrap_log" >&2 \
        || bootstrap_failed mmdebstrap
else
    ensure_packages debootstrap
    log "running debootstrap $(dpkg-query -W -f='${Version}' debootstrap)"
    debootstrap --variant=minbase --components=main --include="$(IFS=,; echo "${packages[*]}")" \
        "$suite" "$tree" "$mirror" 2>&1 | tee "$bootstrap_log" >&2 \
        || bootstrap_failed debootstrap
    # debootstrap knows one suite and no dpkg filters: add the updates and the filters
    # (for later installs), then drop what the filters would have left out.
    printf '%s\n' "${sources[@]}" >"$tree/etc/apt/sources.list"
    printf '%s\n' "${dpkg_excludes[@]}" >"$tree/etc/dpkg/dpkg.cfg.d/90ebb-excludes"
    mountpoint -q "$tree/proc" || mount -t proc proc "$tree/proc" || die "cannot mount proc in $tree"
    {
        chroot "$tree" apt-get update \
            && chroot "$tree" env DEBIAN_FRONTEND=noninteractive apt-get -y \
                -o APT::Install-Recommends=false upgrade
    } 2>&1 | tee -a "$bootstrap_log" >&2
    upgrade_status=${PIPESTATUS[0]}
    umount "$tree/proc" || die "cannot unmount $tree/proc"
    [ "$upgrade_status" -eq 0 ] || bootstrap_failed "apt-get upgrade in the debootstrap tree"
    chroot "$tree" apt-get clean || die "apt-get clean failed in $tree"
    rm -rf "$tree"/var/lib/apt/lists/* "$tree"/usr/share/man/* "$tree"/usr/share/info/* \
        "$tree"/usr/share/lintian/*
    find "$tree/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
    find "$tree/usr/share/doc" -mindepth 1 ! -type d ! -name copyright -delete
    find "$tree/usr/share/doc" -mindepth 1 -type d -empty -delete
fi
[ -x "$tree/usr/bin/fio" ] || die "the bootstrap finished but $tree has no /usr/bin/fio"
bootstrap_s=$((SECONDS - bootstrap_start))

# --- Ebb's additions -----------------------------------------------------------------------
install -m 0755 "$tool_bin" "$tree/usr/bin/ebb-guest" || die "cannot install ebb-guest"
install -m 0755 "$init_script" "$tree/usr/sbin/ebb-init" || die "cannot install ebb-init"
# A kernel that mounts the disk itself (no initramfs) runs /sbin/init by default.
if [ ! -e "$tree/usr/sbin/init" ] && [ ! -L "$tree/usr/sbin/init" ]; then
    ln -s ebb-init "$tree/usr/sbin/init"
fi
put() { # put PATH: stdin becomes PATH in the tree (mode 0644, whatever was there before)
    { rm -f "$tree$1" && cat >"$tree$1" && chmod 0644 "$tree$1"; } || die "cannot write $1 in the image"
}
echo ebb-guest | put /etc/hostname
printf '127.0.0.1\tlocalhost\n127.0.1.1\tebb-guest\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' \
    | put /etc/hosts
printf '# <file system> <mount point> <type> <options> <dump> <pass>\n/dev/vda / ext4 defaults 0 1\n' \
    | put /etc/fstab
put /etc/resolv.conf </dev/null
mkdir -p "$tree/etc/ebb"
for d in dev proc sys run tmp; do mkdir -p "$tree/$d"; done
chmod 1777 "$tree/tmp"

dpkg-query --admindir="$tree/var/lib/dpkg" -W -f='${db:Status-Abbrev} ${Package} ${Version}\n' \
    | awk '$1 == "ii" { print $2, $3 }' >"$tmp/packages" || die "cannot list the image's packages"
cp "$tmp/packages" "$tree/etc/ebb/packages"
for p in "${packages[@]}"; do
    grep -q "^$p " "$tmp/packages" || die "package $p is not installed in the image"
done
pkg_count="$(wc -l <"$tmp/packages")"
tree_mib="$(du -sm --apparent-size "$tree" | cut -f1)"

# --- ext4 ----------------------------------------------------------------------------------
# Without a loop device: mke2fs -d copies the tree into the new file system. The image is
# sparse (truncate); lazy init is off so that the guest's kernel does not zero inode
# tables behind a workload's back (on a file, mke2fs punches holes instead of writing).
img="$tmp/rootfs.ext4"
truncate -s "$truncate_bytes" "$img" || die "cannot create $img"
if ! mke2fs -q -F -t ext4 -O none,"$ext4_features" -L ebb-root -m 0 \
        -E lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0 -d "$tree" "$img" >&2; then
    die "mke2fs failed to build $img from $tree ($tree_mib MiB of files; image size $size:" \
        "set EBB_ROOTFS_SIZE to more if it ran out of space)"
fi
e2fsck -fn "$img" >&2 || die "e2fsck finds errors in the new image $img"
read -r block_size block_count free_blocks < <(
    dumpe2fs -h "$img" 2>/dev/null | awk -F: '
        /^Block size/ { b = $2 + 0 } /^Block count/ { c = $2 + 0 } /^Free blocks/ { f = $2 + 0 }
        END { print b, c, f }')
[ -n "${free_blocks:-}" ] || die "dumpe2fs cannot read $img"
used_mib=$(((block_count - free_blocks) * block_size >> 20))
alloc_mib="$(du -m "$img" | cut -f1)"

rm -f "$out/inputs.sha256"
mv -f "$img" "$out/rootfs.ext4"
mv -f "$tmp/packages" "$out/packages"
echo "$image_stamp" >"$out/inputs.sha256"

log "built $out/rootfs.ext4 in $((SECONDS - start_time)) s ($bootstrap $bootstrap_s s):" \
    "$((truncate_bytes >> 20)) MiB image, $used_mib MiB used in the file system," \
    "$alloc_mib MiB allocated on the host; $pkg_count packages, $tree_mib MiB of files"
log "kernel command line: $cmdline (initramfs $out/initramfs.cpio.gz)"
echo "$out"
