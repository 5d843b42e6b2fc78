#!/usr/bin/env bash
# The test command: formatting, lints, then every test (unit tests, CLI tests, and the
# end-to-end tests that boot real Linux guests, directly on a KVM host or inside the
# nested test host when the local KVM cannot boot stock kernels).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash ci/setup.sh
start=$(date +%s)
cargo fmt --all -- --check
rustfmt --edition 2021 --check tests/fuzz/src/lib.rs tests/fuzz/fuzz_targets/*.rs
cargo clippy --workspace --all-targets --release -- -D warnings
cargo test --workspace --release -- --test-threads=2
# Fuzz targets, a short budget each from the committed corpus (nightly; installs cargo-fuzz).
bash tests/fuzz/run.sh all 30
echo "ci/test.sh: all checks passed in $(( $(date +%s) - start )) s"
