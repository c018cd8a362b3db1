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
#   6. tools/bench_summary.py: the two benchmarks side by side.
# Writes under $OUT (default gpu-check-out/): gpu-check.log (everything), selftest.json,
# selftest-nvrtc.json, bench-kernels.json, bench-torch.json. Prints a summary last. Exits
# non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."

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

run_step selftest 200 "$bin" selftest --device cuda --json "$out/selftest.json"
check_step prebuilt-modules "$out/selftest.json" prebuilt

run_step selftest-nvrtc 200 env VERDICT_KERNELS=nvrtc "$bin" selftest --device cuda --json "$out/selftest-nvrtc.json"
check_step nvrtc-modules "$out/selftest-nvrtc.json" nvrtc

run_step bench-kernels 120 "$bin" bench kernels --device cuda --preset 2b --json "$out/bench-kernels.json"
run_step bench-torch 120 env PYTHONUNBUFFERED=1 python3 tools/bench_torch.py --preset 2b --seconds 60 \
    --out "$out/bench-torch.json"

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
