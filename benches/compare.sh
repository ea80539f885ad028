#!/usr/bin/env bash
# The full comparison in one command: installs the peer proxies (cached after the first
# run), builds Spotable in release mode, and runs `spotable-bench compare`, which rewrites
# benches/BENCHMARKS.md and the plots in benches/results/.
#
# Run as root (it makes a network namespace for the load generator; Quilkin ignores
# loopback clients). Extra arguments go to `spotable-bench compare` (see its --help).
# The first run builds Quilkin from crates.io (about 40 min on 2 cores); later runs take
# about 10 minutes (the jitter runs included).
set -euo pipefail
cd "$(dirname "$0")/.."
benches/peers/install.sh || echo "compare: some peers are missing; their rows will say why" >&2
cargo build --release -p spotable-bench
exec target/release/spotable-bench compare "$@"
