#!/usr/bin/env bash
# Builds spotable-bench at an earlier revision, for `compare --baseline` (an A/B of two
# builds on one machine, in the same rounds: these machines are shared and their absolute
# figures move between runs). Prints the binary's path.
#
#   benches/baseline.sh REV        e.g. benches/baseline.sh HEAD~5
#   bash benches/compare.sh --baseline "$(benches/baseline.sh REV)"
#
# The source goes to target/baseline/src (a git worktree) and the build to its own target
# directory, so the current build is left alone. The first build takes ~10 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
rev=${1:?usage: benches/baseline.sh REV}
commit=$(git rev-parse --verify "$rev^{commit}")
src=target/baseline/src
if [ -d "$src" ]; then
  git -C "$src" checkout -q --detach "$commit" >&2
else
  mkdir -p target/baseline
  git worktree add -q --detach "$src" "$commit" >&2
fi
cargo build -q --release -p spotable-bench --manifest-path "$src/Cargo.toml" \
  --target-dir target/baseline/build >&2
echo "$PWD/target/baseline/build/release/spotable-bench"
