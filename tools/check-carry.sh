#!/usr/bin/env bash
# Whether one device call can carry what tools/gpu-check.sh needs (BENCHMARKS.md "GPU"): the
# release binary, the trimmed bitsandbytes wheel (tools/bnb-wheel.sh; its 0.50.2 size when
# .whl/ is not there) and the tracked tree, within the 64 MiB one call carries. The embedded
# kernel images (five SASS archs + PTX per kernel file) are most of the binary, so a kernel
# change can break the GPU check without failing anything else: CI runs this.
#
# Usage: tools/check-carry.sh [VERDICT_BINARY]   (default target/release/verdict)
set -euo pipefail
bin=${1:-target/release/verdict}
limit=$((64 << 20))
sum() { awk '{ s += $1 } END { print s + 0 }'; }
wheel=0
if [[ -d .whl ]]; then
    wheel=$(find .whl -name '*.whl' -exec stat -c %s {} + | sum)
fi
[[ $wheel -gt 0 ]] || wheel=10407552
tree=$(git ls-files -z | xargs -0 stat -c %s | sum)
binary=$(stat -c %s "$bin")
total=$((binary + wheel + tree))
awk -v b="$binary" -v w="$wheel" -v t="$tree" -v l="$limit" 'BEGIN {
    printf "carry: binary %.1f MB + wheel %.1f MB + tree %.1f MB = %.1f MiB of %d MiB\n",
        b / 1e6, w / 1e6, t / 1e6, (b + w + t) / 1048576, l / 1048576 }'
if ((total > limit)); then
    echo "check-carry: over the limit by $((total - limit)) bytes: the GPU check no longer fits one call" >&2
    exit 1
fi
