#!/usr/bin/env bash
# Runs Ebb's fuzz targets: `tests/fuzz/run.sh [TARGET|all] [SECONDS]` (default: all, 30 s
# each) from the committed corpus (tests/fuzz/corpus/TARGET, which grows as it runs).
# Oracles: no panic, no discard outside guest RAM (mmio_balloon, pfn_ranges), and
# libFuzzer's limits: -rss_limit_mb (unbounded memory) and -timeout (unbounded work).
# Needs nightly Rust (rustup toolchain "nightly"); installs cargo-fuzz when missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
target=${1:-all}
seconds=${2:-30}
if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "tests/fuzz/run.sh: nightly Rust is missing: rustup toolchain install nightly" >&2
    exit 1
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "tests/fuzz/run.sh: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi
targets=(mmio_balloon pfn_ranges stats_parser api_request)
[[ $target == all ]] || targets=("$target")
if [[ $target == all ]]; then cargo +nightly fuzz build -O; else cargo +nightly fuzz build -O "$target"; fi
# A smaller quarantine keeps AddressSanitizer's own memory well under the RSS limit.
export ASAN_OPTIONS=${ASAN_OPTIONS:-quarantine_size_mb=16}
for t in "${targets[@]}"; do
    # New inputs go to a scratch corpus under target/ (libFuzzer writes into the first
    # directory), so a run never leaves untracked files in the committed corpus, which
    # reads as the second. Minimize before committing any (cargo fuzz cmin).
    found="target/new-corpus/$t"
    mkdir -p "corpus/$t" "$found"
    log=$(mktemp)
    if ! cargo +nightly fuzz run -O "$t" "$found" "corpus/$t" -- \
        -max_total_time="$seconds" -rss_limit_mb=1024 -timeout=10 -max_len=4096 \
        -print_final_stats=1 >"$log" 2>&1; then
        tail -60 "$log" >&2
        echo "tests/fuzz/run.sh: $t found a failure (artifact above, under tests/fuzz/artifacts/$t)" >&2
        exit 1
    fi
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || true)
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*' || true)
    echo "fuzz $t: ${runs:-?} executions in ${seconds} s, coverage ${cov:-?} edges, corpus $(ls "corpus/$t" | wc -l) inputs (+$(ls "$found" | wc -l) new in tests/fuzz/$found)"
    rm -f "$log"
done
