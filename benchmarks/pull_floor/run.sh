#!/usr/bin/env bash
# The native floor of a small pull (see pull_floor.c): builds it with gcc,
# runs each exchange on one CPU, on two and unpinned, and writes
# benchmarks/results/pull-floor.md with the command that produced it.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${KVBRIDGE_RESULTS_DIR:-$here/../results}/pull-floor.md"
bin="$(mktemp -d)/pull_floor"
trap 'rm -rf "$(dirname "$bin")"' EXIT
gcc -O2 -Wall -o "$bin" "$here/pull_floor.c"
cpus=$(nproc)
rows=()
for kind in bare pull; do
  rows+=("$("$bin" "$kind" 0 0)")
  if [ "$cpus" -ge 2 ]; then rows+=("$("$bin" "$kind" 0 1)"); fi
  rows+=("$("$bin" "$kind")")
done
{
  echo "# pull-floor"
  echo
  echo "Produced by \`bash benchmarks/pull_floor/run.sh\` on $(date -u +%Y-%m-%dT%H:%M:%SZ) ($cpus CPUs, $(uname -sr))."
  echo
  echo "| exchange | placement | p10 µs | p50 µs | p90 µs |"
  echo "|---|---|---|---|---|"
  for r in "${rows[@]}"; do echo "| ${r//$'\t'/ | } |"; done
  echo
  echo "20000 round trips each, two processes over TCP on 127.0.0.1. bare = 48-byte request, 4 KiB reply (the shape of \`kvbridge bench transport\`'s raw-socket baseline); pull = kvbridge tcp's exchange in C: Pull, grant + 4 KiB in one writev, digest checked, ReadDone sent without waiting. unpinned = where the scheduler puts them."
} | tee "$out"
