#!/usr/bin/env bash
# Extract the ELF vmlinux from a bzImage: find the compressed payload by its magic,
# decompress it, and keep the first candidate that is an ELF file.
# Usage: extract-vmlinux.sh BZIMAGE > vmlinux
set -euo pipefail
img="$1"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

try() { # try MAGIC_HEX TOOL...
    local magic="$1"; shift
    local off
    for off in $(LC_ALL=C grep -obUaP "$magic" "$img" | cut -d: -f1); do
        tail -c "+$((off + 1))" "$img" | "$@" > "$tmp/out" 2>/dev/null || true
        if [ "$(head -c 4 "$tmp/out" | od -An -tx1 | tr -d ' \n')" = "7f454c46" ]; then
            cat "$tmp/out"
            return 0
        fi
    done
    return 1
}

try '\xFD7zXZ\x00' xz -dc && exit 0
try '\x28\xb5\x2f\xfd' zstd -dc && exit 0
try '\x1f\x8b\x08' gzip -dc && exit 0
echo "extract-vmlinux: no ELF payload found in $img" >&2
exit 1
