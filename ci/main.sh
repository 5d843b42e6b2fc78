#!/usr/bin/env bash
# The main job: build Ebb, fetch and build the default guest (stock Debian kernel +
# busybox initramfs), boot it with a virtio-balloon device and free page reporting, and
# show the balloon and reporting giving guest memory back to the host; then boot the
# Debian root file system guest (root on a virtio-blk disk) and show a file written,
# synced and read back from the disk.
# Runs directly on a host with usable KVM, otherwise inside the nested test host.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash ci/setup.sh
cargo build --release -p ebb-vmm -p ebb-ctl -p ebb-tests
resources/build-guest.sh >/dev/null
exec target/release/ebb-demo "$@"
