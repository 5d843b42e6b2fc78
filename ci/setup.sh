#!/usr/bin/env bash
# Installs what Ebb's build, tests and demo need on a fresh Debian machine. Idempotent.
# Guest artifacts (the Debian kernel, busybox initramfs) are fetched and built on demand
# by resources/build-guest.sh and resources/build-testhost.sh, into the cache directory.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$here/../resources/common.sh"

# qemu-system-x86: the nested test host and the comparison peer; busybox-static, cpio,
# kmod, xz-utils, zstd: guest and test host images; acpica-tools: iasl for the ACPI tests;
# util-linux: setpriv for the permission tests; procps, curl: handy in scenarios.
ensure_packages qemu-system-x86 busybox-static cpio kmod xz-utils zstd gzip \
    acpica-tools util-linux procps curl

command -v cargo >/dev/null || die "cargo not found: install a Rust toolchain (rustup)"
cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt
cargo clippy --version >/dev/null 2>&1 || rustup component add clippy

# The Debian root file system guest (virtio-blk tests); cached, rebuilt when its inputs
# change.
bash "$here/../resources/build-rootfs.sh" >/dev/null
