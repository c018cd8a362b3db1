#!/usr/bin/env bash
# The memory plan of BENCHMARKS.md without a GPU: one allocation-only training step
# (`--device emu --emu-alloc-only`) of shapes-only Gemma2-2B and Gemma2-9B checkpoints
# (`verdict init --no-values`: real safetensors headers, sparse data), NF4 projections, LoRA
# r = 16 on all seven projections, per-layer recomputation (the default); then, per preset,
# the longest sequence (one sequence per step, --max-len = --batch-tokens = L) whose step fits
# in 15 GiB of device memory, by bisection on L (each try is one process of about a second).
#
# Usage: tools/memplan.sh [VERDICT_BINARY] [SCRATCH_DIR]
#   defaults: target/release/verdict, a fresh temporary folder.
# Output: one line per run (preset, tokens, peak GiB, the split), then the longest context.
set -euo pipefail
verdict=${1:-target/release/verdict}
scratch=${2:-$(mktemp -d)}
arch=${EMU_ARCH:-emu}
mkdir -p "$scratch"

# One battle whose text is far longer than any --max-len tried: the formatter truncates it
# to exactly --max-len tokens (byte-level tokenizer: one token per byte).
python3 - "$scratch/long.csv" <<'EOF'
import csv, json, sys
w = csv.writer(open(sys.argv[1], "w", newline=""))
w.writerow("id,model_a,model_b,prompt,response_a,response_b,winner_model_a,winner_model_b,winner_tie".split(","))
w.writerow(["1", "a", "b", json.dumps(["p" * 20000]), json.dumps(["a" * 100000]), json.dumps(["b" * 100000]), 1, 0, 0])
EOF

# step PRESET TOKENS MEMORY -> prints the summary's memory line, or fails (out of memory).
step() {
  local preset=$1 tokens=$2 memory=$3 run="$scratch/run-$1-$2-$3"
  rm -rf "$run"
  "$verdict" train --device "$arch" --emu-alloc-only --emu-memory "$memory" \
    --model "$scratch/gemma2-$preset" --quant nf4 --lora-r 16 --train "$scratch/long.csv" \
    --out "$run" --max-steps 1 --max-len "$tokens" --batch-tokens "$tokens" --no-swap-pairs \
    >"$run.log" 2>&1 || return 1
  python3 - "$run/summary.json" "$preset" "$tokens" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
m = s["memory"]
assert s["tokens_seen"] == int(sys.argv[3]), s["tokens_seen"]
gib = lambda b: b / 2**30
split = " ".join(f"{k}={gib(v):.3f}" for k, v in m["at_peak"].items())
print(f"{sys.argv[2]} tokens={sys.argv[3]} peak={gib(m['peak_in_use_bytes']):.3f}GiB ({m['peak_in_use_bytes']} B) {split}")
EOF
}

for preset in 2b 9b; do
  [ -d "$scratch/gemma2-$preset" ] ||
    "$verdict" init --arch gemma2 --preset "$preset" --no-values --out "$scratch/gemma2-$preset" >/dev/null
  step "$preset" 2048 16GiB
done

for preset in 2b 9b; do
  lo=2048 hi=131072 # lo fits; hi is past anything a 15 GiB card fits
  while [ $((hi - lo)) -gt 64 ]; do
    mid=$(((lo + hi) / 2))
    if step "$preset" "$mid" 15GiB >/dev/null; then lo=$mid; else hi=$mid; fi
  done
  echo "$preset longest context in 15 GiB: $lo tokens (fits; $hi does not, within 64 tokens)"
  step "$preset" "$lo" 15GiB
done
