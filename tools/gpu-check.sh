#!/usr/bin/env bash
# The one script a GPU session runs on the lent GPU machine, from the repository root, with
# the release binary built on a Rust machine and carried along (the GPU machine has no Rust):
#
#   here:  VERDICT_REQUIRE_KERNELS=1 NVCC=$(bash tools/install-nvcc.sh | tail -n 1) cargo build --release
#   there: bash tools/gpu-check.sh                 # carry target/release/verdict
#
# Steps, each with its own time limit (all together well under 8 minutes):
#   1. the card and driver (nvidia-smi);
#   2. `verdict selftest --device cuda` with the prebuilt kernels: every CUDA op and the tiny
#      model fixtures against the CPU reference; every module must have loaded prebuilt;
#   3. the same with VERDICT_KERNELS=nvrtc: the run-time compilation Kaggle's CUDA 12 drivers
#      need (they cannot load CUDA 13 fatbins); every module must come from NVRTC;
#   4. benchmark hooks: `verdict bench kernels` and tools/bench_torch.py run once they exist.
# Writes under $OUT (default gpu-check-out/): gpu-check.log (everything), selftest.json,
# selftest-nvrtc.json, bench-kernels.json. Prints a summary last. Exits non-zero if any step
# failed.
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

# NVRTC for step 3: the system's if the loader knows one, else the toolkit's or PyTorch's
# pip wheel (nvidia-cuda-nvrtc), added to LD_LIBRARY_PATH.
if ! ldconfig -p 2>/dev/null | grep -qE 'libnvrtc\.so\.1[23]'; then
    purelib=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null || true)
    for dir in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
        "$purelib"/nvidia/cu13/lib "$purelib"/nvidia/cuda_nvrtc/lib; do
        if compgen -G "$dir/libnvrtc.so.1[23]" >/dev/null; then
            export LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
            say "NVRTC from $dir"
            break
        fi
    done
fi

run_step selftest 200 "$bin" selftest --device cuda --json "$out/selftest.json"
check_step prebuilt-modules "$out/selftest.json" prebuilt

run_step selftest-nvrtc 200 env VERDICT_KERNELS=nvrtc "$bin" selftest --device cuda --json "$out/selftest-nvrtc.json"
check_step nvrtc-modules "$out/selftest-nvrtc.json" nvrtc

# Benchmark hooks: each runs once its tool exists in this checkout / binary.
if "$bin" bench --help >/dev/null 2>&1; then
    run_step bench-kernels 120 "$bin" bench kernels --device cuda --json "$out/bench-kernels.json"
else
    summary+=("$(printf '%-18s %-36s' bench-kernels 'SKIP (no verdict bench yet)')")
fi
if [[ -f tools/bench_torch.py ]]; then
    run_step bench-torch 120 python3 tools/bench_torch.py --out "$out/bench-torch.json"
else
    summary+=("$(printf '%-18s %-36s' bench-torch 'SKIP (no tools/bench_torch.py yet)')")
fi

for report in "$out/selftest.json" "$out/selftest-nvrtc.json"; do
    if [[ -f $report ]]; then
        say "== $(basename "$report")"
        worst_cases "$report" 2>&1 | tee -a "$log"
    fi
done
say "== summary"
for line in "${summary[@]}"; do
    say "$line"
done
say "gpu-check: $([[ $failed -eq 0 ]] && echo passed || echo FAILED) (logs in $out)"
exit $failed
