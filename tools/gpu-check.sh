#!/usr/bin/env bash
# The one script a GPU session runs on the lent GPU machine, from the repository root, with
# the release binary built on a Rust machine and carried along (the GPU machine has no Rust):
#
#   here:  VERDICT_REQUIRE_KERNELS=1 NVCC=$(bash tools/install-nvcc.sh | tail -n 1) cargo build --release
#          (optional, for the NF4 rows of bench-torch) python3 -m pip download --no-deps
#            --only-binary=:all: --python-version 3.12 --implementation cp
#            --platform manylinux_2_24_x86_64 -d .whl bitsandbytes==0.50.2
#   there: bash tools/gpu-check.sh                 # carry target/release/verdict (and .whl)
#
# Steps, each with its own time limit against hangs (together 640 s, more than a device
# call's 600 s: call it with timeout_s 600 and expect far less; the benchmarks' budgets are
# sized to end well before their limits, and each writes its JSON as it goes):
#   1. the card and driver (nvidia-smi);
#   2. `verdict selftest --device cuda` with the prebuilt kernels: every CUDA op and the tiny
#      model fixtures against the CPU reference; every module must have loaded prebuilt;
#   3. the same with VERDICT_KERNELS=nvrtc: the run-time compilation Kaggle's CUDA 12 drivers
#      need (they cannot load CUDA 13 fatbins); every module must come from NVRTC;
#   4. `verdict bench kernels --preset 2b`: every CUDA op at Gemma2-2B shapes against a device
#      copy and cuBLAS (bf16, TF32, f32) measured in the same run;
#   5. tools/bench_torch.py: the same linear shapes through torch and bitsandbytes, and
#      transformers inference / PEFT QLoRA training on a random Gemma2-2B (the NF4 parts need
#      bitsandbytes: wheels carried in .whl/ are installed first);
#   6. tools/bench_summary.py: the two benchmarks side by side;
#   7. inference and training on CUDA against the CPU: `verdict logits` on every fixture
#      (f32, NF4, adapter), the demo with its prediction stages on the GPU, `verdict predict`
#      with --device cuda and --devices 0, and a four-step `verdict train --device cuda`
#      whose adapter must match the CPU run's.
# `tools/gpu-check.sh checks` runs steps 1-3 and 7 (correctness), `bench` steps 1 and 4-6,
# so that a session can split them over two device calls; no argument runs everything.
# Writes under $OUT (default gpu-check-out/): gpu-check.log (everything), selftest.json,
# selftest-nvrtc.json, bench-kernels.json, bench-torch.json. Prints a summary last. Exits
# non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."

part="${1:-all}"
case $part in
all | checks | bench) ;;
*)
    echo "usage: tools/gpu-check.sh [all|checks|bench]" >&2
    exit 2
    ;;
esac
out="${OUT:-gpu-check-out}"
bin="${VERDICT_BIN:-target/release/verdict}"
mkdir -p "$out"
log="$out/gpu-check.log"
: >"$log"
say() { echo "$*" | tee -a "$log"; }
summary=()
failed=0

# record NAME EXIT_CODE SECONDS [NOTE]: one summary line; a non-zero exit fails the run.
record() {
    local verdict=PASS
    if [[ $2 -ne 0 ]]; then
        verdict="FAIL (exit $2${4:+, $4})"
        failed=1
    fi
    summary+=("$(printf '%-18s %-36s %4d s' "$1" "$verdict" "$3")")
}

# run_step NAME SECONDS COMMAND...: runs a program with a time limit, logs it, records it.
run_step() {
    local name=$1 limit=$2
    shift 2
    say "== $name: $*"
    local started=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    record "$name" "$rc" $((SECONDS - started)) "$([[ $rc -eq 124 ]] && echo "timed out after $limit s")"
}

# check_step NAME JSON SOURCE: the report exists and every module in it came from SOURCE.
check_step() {
    say "== $1"
    if [[ -f $2 ]]; then
        check_sources "$2" "$3" 2>&1 | tee -a "$log"
        record "$1" "${PIPESTATUS[0]}" 0
    else
        say "no $2"
        record "$1" 1 0 "no report"
    fi
}

# check_sources JSON SOURCE: every module in the selftest report loaded from SOURCE.
check_sources() {
    python3 - "$1" "$2" <<'EOF'
import json, sys
path, want = sys.argv[1], sys.argv[2]
report = json.load(open(path))
modules = report.get("modules", [])
wrong = [f"{m['name']}: {m['source']} ({m.get('prebuilt_error') or ''})" for m in modules if m["source"] != want]
if not modules or wrong:
    print(f"expected every module from {want}; got: {wrong or 'no modules'}")
    sys.exit(1)
print(f"all {len(modules)} modules loaded from {want}")
EOF
}

# worst_cases JSON: the worst error per op, and the failed cases.
worst_cases() {
    python3 - "$1" <<'EOF'
import json, sys
report = json.load(open(sys.argv[1]))
worst = {}
for c in report.get("checks", []):
    w = worst.get(c["op"])
    if w is None or c["max_rel_err"] > w["max_rel_err"]:
        worst[c["op"]] = c
print(f"{'op':<28} {'worst max_rel':>13} {'tol':>8}  case")
for op, c in worst.items():
    print(f"{op:<28} {c['max_rel_err']:>13.2e} {c['tolerance']:>8.0e}  {c['case']}")
for c in report.get("checks", []):
    if not c["passed"]:
        print(f"FAILED {c['op']} {c['case']}: max_rel {c['max_rel_err']:.2e} non_finite {c['non_finite']} {c.get('error') or ''}")
print(f"status {report['status']}, {report['failures']} failed of {len(report.get('checks', []))}, "
      f"peak device memory {report['peak_reserved_bytes'] / 2**20:.1f} MiB, {report['seconds']:.1f} s")
EOF
}

if [[ ! -x $bin ]]; then
    say "no executable $bin: build it on the Rust machine (VERDICT_REQUIRE_KERNELS=1 cargo build --release) and carry it"
    exit 2
fi

say "== card"
{ nvidia-smi -L && nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap,clocks.sm,clocks.mem --format=csv; } 2>&1 | tee -a "$log"
"$bin" --version 2>&1 | tee -a "$log"

# add_library NAME DIR...: unless the loader already knows libNAME.so.13 or .12, the first
# DIR holding one goes on LD_LIBRARY_PATH. The CUDA toolkit's folders, then PyTorch's pip
# wheels (nvidia/cu13/lib for CUDA 13, nvidia/<package>/lib for CUDA 12).
purelib=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null || true)
add_library() {
    local name=$1 dir
    shift
    if ldconfig -p 2>/dev/null | grep -qE "lib$name\.so\.1[23]"; then
        return
    fi
    for dir in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib "$@"; do
        if compgen -G "$dir/lib$name.so.1[23]" >/dev/null; then
            export LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
            say "lib$name from $dir"
            return
        fi
    done
    say "no lib$name.so.13 or .12 found"
}
# NVRTC for step 3, cuBLAS for step 4's reference products.
add_library nvrtc "$purelib"/nvidia/cu13/lib "$purelib"/nvidia/cuda_nvrtc/lib
add_library cublas "$purelib"/nvidia/cu13/lib "$purelib"/nvidia/cublas/lib

# Python wheels carried in .whl/ (bitsandbytes is not on the GPU image), installed for step 5.
if compgen -G ".whl/*.whl" >/dev/null; then
    site=/tmp/verdict-site
    if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" .whl/*.whl >>"$log" 2>&1; then
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
        say "installed $(cd .whl && echo *.whl) into $site"
    else
        say "could not install the wheels in .whl/ (see $log)"
    fi
fi

if [[ $part != bench ]]; then
run_step selftest 200 "$bin" selftest --device cuda --json "$out/selftest.json"
check_step prebuilt-modules "$out/selftest.json" prebuilt

run_step selftest-nvrtc 200 env VERDICT_KERNELS=nvrtc "$bin" selftest --device cuda --json "$out/selftest-nvrtc.json"
check_step nvrtc-modules "$out/selftest-nvrtc.json" nvrtc
fi

if [[ $part != bench ]]; then
# Inference on CUDA against the CPU reference (`--device` on logits and predict):
#   logits: every model fixture (base; NF4; the adapter where there is one), logits and
#     pooled hidden states, several packed batches (--batch-tokens 64) with sequences of 1 to
#     300 tokens, `--device cuda` vs `--device cpu`, max |cuda - cpu| <= 5e-2 · max |cpu|
#     (attention runs on tensor cores, bf16 operands on sm_80+: the selftest's
#     flash_model_tolerance; f16 on a T4 measures about 3e-3);
#   predict: the demo (training on the CPU, its prediction stages on the GPU: --device
#     cuda), then the demo's trained tiny Gemma 2 classifier on its test split with
#     `--device cpu`, `--device cuda` and `--devices 0` (the multi-GPU path on one GPU),
#     swap TTA, the logits files compared as above; the JSON names the card and its peak.
# ids for the logits runs: lengths 1..300, ids < 512 (every fixture's vocabulary).
python3 - "$out/parity-ids.jsonl" <<'EOF'
import json, random, sys
rng = random.Random(0)
with open(sys.argv[1], "w") as f:
    for n in (1, 2, 7, 31, 64, 65, 130, 300, 5, 17):
        f.write(json.dumps({"ids": [rng.randrange(512) for _ in range(n)]}) + "\n")
EOF

# compare_outputs CPU CUDA [TOL]: logits/hidden JSON lines, logits CSVs or safetensors
# files, same shape, max |cuda - cpu| <= TOL · max |cpu| (default 5e-2, the selftest's
# whole-model bound with flash attention's bf16 operands; a NaN or a missing value fails).
compare_outputs() {
    python3 - "$1" "$2" "${3:-5e-2}" <<'EOF'
import csv, json, math, sys
def values(path):
    out = []
    if path.endswith(".safetensors"):
        import struct
        raw = open(path, "rb").read()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
        for name in sorted(k for k in header if k != "__metadata__"):
            t = header[name]
            assert t["dtype"] == "F32", f"{name}: {t['dtype']}"
            a, b = t["data_offsets"]
            out += struct.unpack(f"<{(b - a) // 4}f", raw[8 + n + a:8 + n + b])
    elif path.endswith(".csv"):
        for row in csv.DictReader(open(path)):
            out += [float(v) for k, v in row.items() if k != "id"]
    else:
        for line in open(path):
            row = json.loads(line)
            for key in ("logits", "hidden"):
                out += [math.nan if v is None else v for v in (row.get(key) or [])]
    return out
cpu, gpu = values(sys.argv[1]), values(sys.argv[2])
if not cpu or len(cpu) != len(gpu):
    print(f"{sys.argv[2]}: {len(gpu)} values, cpu {len(cpu)}")
    sys.exit(1)
scale = max(abs(x) for x in cpu)
tol = float(sys.argv[3])
worst = max((abs(a - b) if not math.isnan(b) else math.inf) for a, b in zip(cpu, gpu))
print(f"{sys.argv[2]}: max |cuda - cpu| {worst:.3e}, max |cpu| {scale:.3e}, rel {worst / scale:.2e} (tol {tol:.0e})")
sys.exit(0 if worst <= tol * scale else 1)
EOF
}

# logits_parity NAME TOL MODEL [FLAGS...]: one fixture on both devices, compared.
logits_parity() {
    local name=$1 tol=$2 model=$3
    shift 3
    local started=$SECONDS rc=0
    say "== logits $name: $model $*"
    for device in cpu cuda; do
        timeout 60 "$bin" logits --model "$model" --ids "$out/parity-ids.jsonl" --hidden \
            --batch-tokens 64 --device "$device" "$@" >"$out/logits-$name-$device.jsonl" 2>>"$log" || rc=$?
    done
    [[ $rc -eq 0 ]] && { compare_outputs "$out/logits-$name-cpu.jsonl" "$out/logits-$name-cuda.jsonl" "$tol" 2>&1 | tee -a "$log"; rc=${PIPESTATUS[0]}; }
    record "logits-$name" "$rc" $((SECONDS - started))
}

for model in tests/fixtures/models/*/; do
    name=$(basename "$model")
    logits_parity "$name" 5e-2 "$model"
    # NF4 projections run on tensor cores (bf16/fp16 operands): the selftest's model bound.
    logits_parity "$name-nf4" 1e-1 "$model" --quant nf4
    if [[ -d $model/adapter ]]; then
        logits_parity "$name-adapter" 5e-2 "$model" --adapter "$model/adapter"
    fi
done

rm -rf "$out/demo"
run_step demo-cuda 180 "$bin" demo --out "$out/demo" --device cuda
demo_model="$out/demo/models/gemma2-tiny"
predict_on() {  # predict_on NAME DEVICE-FLAGS...: the demo's classifier on its test split
    local name=$1
    shift
    run_step "predict-$name" 60 "$bin" predict --model "$demo_model" --adapter "$out/demo/run-gemma2-tiny" \
        --test "$out/demo/data/test.csv" --out "$out/predict-$name.csv" --max-len 256 --batch-tokens 1024 \
        --logits-out "$out/predict-$name-logits.csv" --json "$out/predict-$name.json" "$@"
}
predict_on cpu --device cpu
predict_on cuda --device cuda
predict_on devices --devices 0
for name in cuda devices; do
    say "== predict-$name vs cpu"
    compare_outputs "$out/predict-cpu-logits.csv" "$out/predict-$name-logits.csv" 2>&1 | tee -a "$log"
    record "predict-$name-parity" "${PIPESTATUS[0]}" 0
done

# Training on CUDA against the CPU (issue #7): the demo's tiny Gemma 2, same seed and data,
# four steps without dropout; the adapters must agree within 5e-2 of the largest value of
# all tensors together (flash attention's bf16 operands through four AdamW steps, whose
# first updates are lr · sign(g): tests/emu_parity.rs compares per tensor and per step).
for device in cpu cuda; do
    rm -rf "$out/train-$device"
    run_step "train-$device" 120 "$bin" train --model "$demo_model" --train data/sample/arena-sample.csv \
        --out "$out/train-$device" --device "$device" --max-len 128 --batch-tokens 2048 --max-steps 4 \
        --lora-r 4 --lora-dropout 0 --heads three --seed 1 --save-every 0
done
say "== train-cuda vs train-cpu"
compare_outputs "$out/train-cpu/adapter_model.safetensors" "$out/train-cuda/adapter_model.safetensors" 5e-2 2>&1 | tee -a "$log"
record train-parity "${PIPESTATUS[0]}" 0
fi

if [[ $part != checks ]]; then
run_step bench-kernels 120 "$bin" bench kernels --device cuda --preset 2b --json "$out/bench-kernels.json"
run_step bench-torch 120 env PYTHONUNBUFFERED=1 python3 tools/bench_torch.py --preset 2b --seconds 60 \
    --out "$out/bench-torch.json"
fi

for report in "$out/selftest.json" "$out/selftest-nvrtc.json"; do
    if [[ -f $report ]]; then
        say "== $(basename "$report")"
        worst_cases "$report" 2>&1 | tee -a "$log"
    fi
done
if [[ -f $out/bench-kernels.json || -f $out/bench-torch.json ]]; then
    say "== benchmarks side by side"
    python3 tools/bench_summary.py "$out/bench-kernels.json" "$out/bench-torch.json" 2>&1 | tee -a "$log"
fi
say "== summary"
for line in "${summary[@]}"; do
    say "$line"
done
say "gpu-check: $([[ $failed -eq 0 ]] && echo passed || echo FAILED) (logs in $out)"
exit $failed
