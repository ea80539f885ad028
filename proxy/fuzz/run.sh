#!/usr/bin/env bash
# Builds the fuzz targets with libFuzzer's coverage instrumentation on the stable toolchain
# (the flags cargo-fuzz passes, minus the nightly-only sanitizer) and runs each one.
#
#   proxy/fuzz/run.sh [SECONDS_PER_TARGET]   (default 30; 0 only builds)
#
# With a nightly toolchain, `cargo fuzz run dedupe` works as usual from proxy/.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-30}
target=$(rustc -vV | sed -n 's/^host: //p')
export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module \
  -Cllvm-args=-sanitizer-coverage-level=4 \
  -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
  -Cllvm-args=-sanitizer-coverage-pc-table \
  -Cllvm-args=-sanitizer-coverage-trace-compares \
  -Cdebug-assertions -Coverflow-checks"
# An explicit --target keeps these flags off build scripts.
cargo build --release --target "$target" --target-dir target/cov
[ "$seconds" -gt 0 ] || exit 0
for t in dedupe sequence notices tokens proxy_header pcap migration; do
  mkdir -p "corpus/$t"
  echo "fuzzing $t for ${seconds}s"
  "target/cov/$target/release/$t" -max_total_time="$seconds" -max_len=512 \
    -print_final_stats=1 "corpus/$t" 2>&1 | grep -E '^(stat::number_of_executed_units|Done|==|SUMMARY)' || true
  # libFuzzer exits non-zero on a crash; grep above must not hide it.
  "target/cov/$target/release/$t" -runs=0 "corpus/$t" >/dev/null 2>&1
done
