#!/usr/bin/env bash
# The one script a GPU session runs on the lent GPU machine, from the repository root, with
# the release binary built on a Rust machine and carried along (the GPU machine has no Rust):
#
#   here:  VERDICT_REQUIRE_KERNELS=1 VERDICT_NVRTC=$(bash tools/install-nvcc.sh | tail -n 1) cargo build --release
#          (optional, for the NF4 rows of bench-torch) bash tools/bnb-wheel.sh   # .whl/, 10 MB
#   there: bash tools/gpu-check.sh                 # carry target/release/verdict (and .whl)
#
# Made for one device call of at most ten minutes whose output comes back as at most eight
# files: everything is written to a scratch folder, and only these files go to $OUT (default
# gpu-check-out/), refreshed every 5 s, after every step and once more on exit (also from the
# trap on TERM/INT, so a call cut short keeps what was measured):
#   gpu-check.log          everything every step printed
#   summary.txt            one screen: each step's verdict and time, the failed cases
#   selftest.jsonl         the prebuilt-kernel selftest, one op family per process, a JSON line
#                          per case appended as the case ends (`verdict selftest --jsonl`)
#   selftest-memcheck.jsonl  the op selftest under compute-sanitizer memcheck
#   selftest-nvrtc.jsonl   the selftest with every module compiled by NVRTC
#   bench-kernels.json     `verdict bench kernels` (written case by case by bench itself)
#   bench-torch.json       tools/bench_torch.py
#   rest.tar.gz            the scratch folder less the files above (per-step outputs)
#
# A global deadline ($VERDICT_GPU_CHECK_DEADLINE seconds, default 540, leaving a 600 s call
# time to copy the files back) clips each step's time limit to the time left and skips a
# step whose minimum does not fit any more (recorded as SKIP with the reason). Steps, in order
# of information per second:
#   1. card and driver (nvidia-smi);
#   2. `verdict selftest` with the prebuilt kernels, one process per op family (a fault in
#      one family cannot hide the others: a new context after an illegal address inherits
#      the fault), then a check that every module loaded prebuilt;
#   3. compute-sanitizer memcheck on the op families, where the image has compute-sanitizer;
#   4. the selftest with VERDICT_KERNELS=nvrtc, again one process per family: the run-time
#      compilation to the device's sm_XY cubin that a card no embedded image fits relies on;
#   5. train parity: a four-step `verdict train` on the device against the CPU's adapter;
#   6. logits parity: `verdict logits` on every fixture (f32, NF4, adapter), device vs CPU;
#   7. `verdict bench kernels --preset 2b` at a short --ms-per-case;
#   8. tools/bench_torch.py (torch, bitsandbytes from .whl/, transformers);
#   9. the demo with its prediction stages on the device, and `verdict predict` with
#      --device and --devices 0 against the CPU.
# `tools/gpu-check.sh checks` runs steps 1-6 and 9, `bench` steps 1, 7 and 8; no argument
# runs everything. Exits non-zero if any step failed (a skipped step is not a failure).
#
# Rehearsal without a GPU (CI: tests/gpu_check_rehearsal.rs):
#   VERDICT_GPU_CHECK_DEVICE=emu OUT=DIR bash tools/gpu-check.sh
# runs the same steps on the emulated device; what cannot run there (nvidia-smi, the module
# source checks, compute-sanitizer, the benchmarks, which refuse the emulator, torch when
# absent, --devices 0) is recorded as skipped with the reason. $VERDICT_GPU_CHECK_FAMILIES
# (comma-separated) narrows the selftest families; $VERDICT_GPU_CHECK_FIXTURES (glob under
# tests/fixtures/models, default *) narrows the logits fixtures.
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
device="${VERDICT_GPU_CHECK_DEVICE:-cuda}"
deadline="${VERDICT_GPU_CHECK_DEADLINE:-540}"
if ! [[ $deadline =~ ^[0-9]+$ ]] || ((deadline < 10)); then
    echo "VERDICT_GPU_CHECK_DEADLINE must be a whole number of seconds >= 10, found '$deadline'" >&2
    exit 2
fi
case $device in
cuda | cuda:[0-9]*) emulated=0 ;;
emu | emu:*) emulated=1 ;;
*)
    echo "VERDICT_GPU_CHECK_DEVICE must be cuda, cuda:N or emu[:smXY], found '$device'" >&2
    exit 2
    ;;
esac
out="${OUT:-gpu-check-out}"
bin="${VERDICT_BIN:-target/release/verdict}"
# Seconds kept back at the end for the summary, the tarball and the copy to $OUT.
reserve=8
start_time=$SECONDS
end_time=$((start_time + deadline - reserve))

out_files=(gpu-check.log summary.txt selftest.jsonl selftest-memcheck.jsonl selftest-nvrtc.jsonl
    bench-kernels.json bench-torch.json rest.tar.gz)
mkdir -p "$out" || exit 2
for name in "${out_files[@]}"; do
    rm -f "$out/$name"
done
scratch=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX") || exit 2
log="$scratch/gpu-check.log"
steps="$scratch/steps.tsv"
: >"$log"
: >"$steps"
say() { echo "$*" | tee -a "$log"; }
others=$(find "$out" -mindepth 1 -maxdepth 1 | wc -l)
((others > 0)) && say "note: $out already holds $others other entries, which count against the file limit"

# record NAME VERDICT SECONDS [NOTE]: one line of steps.tsv (VERDICT: PASS, FAIL, TIMEOUT, SKIP).
record() {
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4:-}" >>"$steps"
    say "-- $1: $2${4:+ ($4)} in $3 s"
}
skip() { record "$1" SKIP 0 "$2"; }
time_left() { echo $((end_time - SECONDS)); }

# The step now running (its child is stopped by the trap), and whether a signal came.
step_pid=
step_name=
step_started=0
signalled=0
# step NAME MIN MAX COMMAND...: runs COMMAND with a limit of MAX seconds clipped to the time
# left, or skips it when less than MIN seconds are left; logs it and records it.
step() {
    local name=$1 min=$2 max=$3 left limit rc started=$SECONDS
    shift 3
    left=$(time_left)
    if ((left < min)); then
        skip "$name" "deadline: needs >= $min s, $left s left"
        return 0
    fi
    limit=$((max < left - 3 ? max : left - 3))
    say "== $name (limit $limit s): $*"
    # In the background, so the TERM/INT trap runs at once instead of after the child.
    (timeout --kill-after=3 "$limit" "$@" 2>&1 | tee -a "$log"; exit "${PIPESTATUS[0]}") &
    step_pid=$! step_name=$name step_started=$started
    wait "$step_pid"
    rc=$?
    step_pid=
    if ((rc == 124 || rc == 137)); then
        record "$name" TIMEOUT $((SECONDS - started)) "killed at its limit of $limit s"
    elif ((rc != 0)); then
        record "$name" FAIL $((SECONDS - started)) "exit $rc"
    else
        record "$name" PASS $((SECONDS - started))
    fi
    sync_out
    return "$rc"
}

# check NAME COMMAND...: a quick check of outputs already there (no limit), recorded.
check() {
    local name=$1
    shift
    say "== $name"
    "$@" 2>&1 | tee -a "$log"
    if ((PIPESTATUS[0] == 0)); then record "$name" PASS 0; else record "$name" FAIL 0; fi
}

# Copies the files that go back ($OUT's list, less the tarball) from the scratch folder.
sync_out() {
    local name
    for name in "${out_files[@]}"; do
        if [[ -f $scratch/$name && $name != rest.tar.gz ]]; then
            cp "$scratch/$name" "$out/.$name.$BASHPID" && mv -f "$out/.$name.$BASHPID" "$out/$name"
        fi
    done
}

# The one-screen summary: a line per step, selftest families folded into one line per kind.
write_summary() {
    local verdict=passed
    grep -qE $'\t(FAIL|TIMEOUT|KILLED)\t' "$steps" && verdict=FAILED
    ((signalled)) && verdict="STOPPED by a signal, $verdict so far"
    {
        echo "gpu-check $part on $device: $verdict in $((SECONDS - start_time)) s of a $deadline s deadline"
        [[ -n ${card:-} ]] && echo "card: $card"
        awk -F'\t' '
            function flush() { if (group != "") { print line; group = "" } }
            {
                split($1, parts, "/")
                if (parts[2] != "") {
                    if (parts[1] != group) { flush(); group = parts[1]; line = sprintf("%-22s", group) }
                    line = line " " parts[2] ":" $2 ($2 == "SKIP" ? "" : "(" $3 "s)")
                    if ($4 != "" && $2 != "PASS") line = line "[" $4 "]"
                    next
                }
                flush()
                printf "%-22s %-7s %4s s  %s\n", $1, $2, $3, $4
            }
            END { flush() }' "$steps" | fold -w 160
        if command -v python3 >/dev/null; then
            for kind in selftest selftest-memcheck selftest-nvrtc; do
                [[ -s $scratch/$kind.jsonl ]] && failed_cases "$scratch/$kind.jsonl" "$kind"
            done
        fi
    } >"$scratch/summary.txt"
}

# failed_cases JSONL KIND: case counts and the first failed cases of a selftest stream.
failed_cases() {
    python3 - "$1" "$2" <<'EOF'
import json, sys
cases, failed, ends = 0, [], 0
for line in open(sys.argv[1]):
    try:
        row = json.loads(line)
    except ValueError:
        continue  # a line cut by a kill
    if row.get("event") == "case":
        cases += 1
        if not row["passed"]:
            failed.append(row)
    elif row.get("event") == "end":
        ends += 1
print(f"{sys.argv[2]}: {cases} cases, {len(failed)} failed, {ends} runs ended")
for row in failed[:5]:
    print(f"  FAILED {row['family']}/{row['op']} {row['case']}: max_rel {row['max_rel_err']:.2e} "
          f"{(row.get('error') or '')[:100]}")
EOF
}

finished=0
syncer=
# On exit, from the trap too: stop the running step, write the summary, pack the rest, copy.
finish() {
    ((finished)) && return
    finished=1
    [[ -n $syncer ]] && kill "$syncer" 2>/dev/null && wait "$syncer" 2>/dev/null
    if [[ -n $step_pid ]]; then
        pkill -TERM -P "$step_pid" 2>/dev/null
        kill -TERM "$step_pid" 2>/dev/null
        record "$step_name" KILLED $((SECONDS - step_started)) "the script was stopped by a signal"
    fi
    write_summary
    cat "$scratch/summary.txt" >>"$log"
    cat "$scratch/summary.txt"
    sync_out

    # The models are regenerated by any run (verdict init, the demo): no need to carry them.
    local keep=(--exclude=./gemma2-tiny --exclude=./demo/models)
    for name in "${out_files[@]}"; do keep+=(--exclude="./$name"); done
    tar -czf "$out/.rest.tar.gz.part" -C "$scratch" "${keep[@]}" . 2>/dev/null &&
        mv -f "$out/.rest.tar.gz.part" "$out/rest.tar.gz"
    rm -rf "$scratch"
}
trap finish EXIT
# Every few seconds, a copy to $OUT, so even a kill that no trap sees (SIGKILL at the end of
# the device call) leaves the cases measured up to a few seconds before it.
(while sleep "${VERDICT_GPU_CHECK_SYNC_S:-5}"; do sync_out; done) &
syncer=$!
trap 'signalled=1; say "-- signal: stopping"; exit 143' TERM INT

if [[ ! -x $bin ]]; then
    say "no executable $bin: build it on the Rust machine (VERDICT_REQUIRE_KERNELS=1 cargo build --release) and carry it"
    exit 2
fi

# ---- 1. card and driver
say "== card"
"$bin" --version 2>&1 | tee -a "$log"
if ((emulated)); then
    card="emulated ($device)"
    skip card "emulated device: no nvidia-smi to ask"
elif command -v nvidia-smi >/dev/null; then
    card=$(nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader 2>&1 | head -n 4 | paste -sd ';')
    step card 5 20 nvidia-smi
else
    card="unknown (no nvidia-smi)"
    skip card "no nvidia-smi on this image"
fi

# add_library NAME DIR...: unless the loader already knows libNAME.so.13 or .12, the first
# DIR holding one goes on LD_LIBRARY_PATH. The CUDA toolkit's folders, then pip wheels
# (nvidia/cu13/lib for CUDA 13, nvidia/<package>/lib for CUDA 12).
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
if ((!emulated)); then
    add_library nvrtc "$purelib"/nvidia/cu13/lib "$purelib"/nvidia/cuda_nvrtc/lib
    add_library cublas "$purelib"/nvidia/cu13/lib "$purelib"/nvidia/cublas/lib
fi

families=$("$bin" selftest --list-families | paste -sd ' ')
if [[ -n ${VERDICT_GPU_CHECK_FAMILIES:-} ]]; then
    families=${VERDICT_GPU_CHECK_FAMILIES//,/ }
fi
op_families=$(echo "$families" | tr ' ' '\n' | grep -vx models | paste -sd ,)

# module_sources JSONL SOURCE: every module every run of the stream loaded came from SOURCE.
module_sources() {
    python3 - "$1" "$2" <<'EOF'
import json, sys
path, want = sys.argv[1], sys.argv[2]
modules, wrong, images = 0, [], set()
for line in open(path):
    try:
        row = json.loads(line)
    except ValueError:
        continue
    if row.get("event") != "end":
        continue
    for m in row.get("modules") or []:
        modules += 1
        images.add(m.get("image") or m["source"])
        if m["source"] != want:
            wrong.append(f"{m['name']}: {m['source']} ({m.get('prebuilt_error') or ''})")
if not modules or wrong:
    print(f"expected every module from {want}; got: {wrong or 'no modules'}")
    sys.exit(1)
print(f"all {modules} module loads came from {want} ({', '.join(sorted(images))})")
EOF
}

# selftest_families KIND [ENV...]: one `verdict selftest` per family, appended to KIND.jsonl.
selftest_families() {
    local kind=$1 family
    shift
    for family in $families; do
        step "$kind/$family" 5 240 env "$@" "$bin" selftest --device "$device" --only "$family" \
            --jsonl "$scratch/$kind.jsonl" --json "$scratch/$kind-$family.json"
    done
}

if [[ $part != bench ]]; then
    # ---- 2. prebuilt selftest, one op family per process
    selftest_families selftest VERDICT_KERNELS=prebuilt
    if ((emulated)); then
        skip prebuilt-modules "emulated device: kernels are GCC-built, no module is loaded"
    else
        check prebuilt-modules module_sources "$scratch/selftest.jsonl" prebuilt
    fi

    # ---- 3. compute-sanitizer memcheck on the op families
    sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer \
        /usr/local/cuda/compute-sanitizer/compute-sanitizer 2>/dev/null | head -n 1)
    if ((emulated)); then
        skip memcheck "emulated device: its own access checks stand in for compute-sanitizer"
    elif [[ -z $sanitizer ]]; then
        skip memcheck "no compute-sanitizer on this image"
    else
        step memcheck 30 150 "$sanitizer" --tool memcheck --error-exitcode 1 "$bin" selftest \
            --device "$device" --only "$op_families" --jsonl "$scratch/selftest-memcheck.jsonl"
    fi

    # ---- 4. NVRTC selftest, one op family per process
    if ((emulated)); then
        skip selftest-nvrtc "emulated device: it runs GCC-built kernels, NVRTC is not used (CI compiles every kernel through NVRTC: tests/cuda_host.rs)"
    else
        selftest_families selftest-nvrtc VERDICT_KERNELS=nvrtc
        check nvrtc-modules module_sources "$scratch/selftest-nvrtc.jsonl" nvrtc
    fi
fi

# compare_outputs CPU DEVICE [TOL]: logits/hidden JSON lines, logits CSVs or safetensors
# files, same shape, max |dev - cpu| <= TOL · max |cpu| (default 5e-2, the selftest's
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
cpu, dev = values(sys.argv[1]), values(sys.argv[2])
if not cpu or len(cpu) != len(dev):
    print(f"{sys.argv[2]}: {len(dev)} values, cpu {len(cpu)}")
    sys.exit(1)
scale = max(abs(x) for x in cpu)
tol = float(sys.argv[3])
worst = max((abs(a - b) if not math.isnan(b) else math.inf) for a, b in zip(cpu, dev))
print(f"{sys.argv[2]}: max |dev - cpu| {worst:.3e}, max |cpu| {scale:.3e}, rel {worst / scale:.2e} (tol {tol:.0e})")
sys.exit(0 if worst <= tol * scale else 1)
EOF
}

if [[ $part != bench ]]; then
    # ---- 5. train parity (issue #7): a random tiny Gemma 2, same seed and data, four steps
    # without dropout; the adapters agree within 5e-2 of the largest value of all tensors
    # (flash attention's bf16 operands through four AdamW steps, whose first updates are
    # lr · sign(g): tests/emu_parity.rs compares per tensor and per step).
    # On the emulator the four steps take about 120 s (2 cores), so a short rehearsal skips
    # them for the deadline; tests/emu_parity.rs checks these numbers there.
    model="$scratch/gemma2-tiny"
    "$bin" init --arch gemma2 --preset tiny --out "$model" >>"$log" 2>&1
    for dev in cpu "$device"; do
        min=10
        [[ $dev != cpu ]] && ((emulated)) && min=130
        step "train/$dev" "$min" 150 "$bin" train --model "$model" --train data/sample/arena-sample.csv \
            --out "$scratch/train-$dev" --device "$dev" --max-len 128 --batch-tokens 2048 --max-steps 4 \
            --lora-r 4 --lora-dropout 0 --heads three --seed 1 --save-every 0
    done
    if [[ -f $scratch/train-cpu/adapter_model.safetensors && -f $scratch/train-$device/adapter_model.safetensors ]]; then
        check train-parity compare_outputs "$scratch/train-cpu/adapter_model.safetensors" \
            "$scratch/train-$device/adapter_model.safetensors" 5e-2
    else
        skip train-parity "an adapter is missing (see the train steps)"
    fi

    # ---- 6. logits parity: every fixture (base; NF4; the adapter where there is one),
    # logits and pooled hidden states, packed batches (--batch-tokens 64) of 1 to 300 tokens.
    python3 - "$scratch/parity-ids.jsonl" <<'EOF'
import json, random, sys
rng = random.Random(0)
with open(sys.argv[1], "w") as f:
    for n in (1, 2, 7, 31, 64, 65, 130, 300, 5, 17):
        f.write(json.dumps({"ids": [rng.randrange(512) for _ in range(n)]}) + "\n")
EOF
    # logits_parity NAME TOL MODEL [FLAGS...]: one fixture on the CPU and the device, compared
    # (one step, so the summary shows one verdict per fixture).
    logits_parity() {
        local name=$1 tol=$2 model=$3 dev
        shift 3
        for dev in cpu "$device"; do
            "$bin" logits --model "$model" --ids "$scratch/parity-ids.jsonl" --hidden \
                --batch-tokens 64 --device "$dev" "$@" >"$scratch/logits-$name-$dev.jsonl" || return
        done
        compare_outputs "$scratch/logits-$name-cpu.jsonl" "$scratch/logits-$name-$device.jsonl" "$tol"
    }
    export -f logits_parity compare_outputs
    export bin scratch device
    for fixture in tests/fixtures/models/${VERDICT_GPU_CHECK_FIXTURES:-*}/; do
        name=$(basename "$fixture")
        step "logits/$name" 5 90 bash -c 'logits_parity "$@"' - "$name" 5e-2 "$fixture"
        # NF4 projections run on tensor cores (bf16/fp16 operands): the selftest's model bound.
        step "logits/$name-nf4" 5 90 bash -c 'logits_parity "$@"' - "$name-nf4" 1e-1 "$fixture" --quant nf4
        if [[ -d $fixture/adapter ]]; then
            step "logits/$name-adapter" 5 90 bash -c 'logits_parity "$@"' - "$name-adapter" 5e-2 \
                "$fixture" --adapter "$fixture/adapter"
        fi
    done
fi

if [[ $part != checks ]]; then
    # ---- 7. kernel bench, short cases: every CUDA op at Gemma2-2B shapes against a device
    # copy and cuBLAS.
    if ((emulated)); then
        skip bench-kernels "bench refuses the emulated device: its times say nothing about a GPU"
    else
        step bench-kernels 30 150 "$bin" bench kernels --device "$device" --preset 2b \
            --ms-per-case 30 --json "$scratch/bench-kernels.json"
    fi
    # ---- 8. torch bench (bitsandbytes wheels carried in .whl/ are installed first).
    if ((emulated)); then
        skip bench-torch "emulated device: torch would time a real GPU or nothing"
    elif ! python3 -c 'import torch' 2>/dev/null; then
        skip bench-torch "no torch in $(command -v python3 || echo 'this image (no python3)')"
    else
        if compgen -G ".whl/*.whl" >/dev/null; then
            site="$scratch/site"
            if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                --target "$site" .whl/*.whl >>"$log" 2>&1; then
                export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
                say "installed $(cd .whl && echo *.whl) into $site"
            fi
        fi
        step bench-torch 40 120 env PYTHONUNBUFFERED=1 python3 tools/bench_torch.py --preset 2b \
            --seconds 45 --out "$scratch/bench-torch.json"
        if [[ -f $scratch/bench-kernels.json && -f $scratch/bench-torch.json ]]; then
            check bench-summary python3 tools/bench_summary.py "$scratch/bench-kernels.json" \
                "$scratch/bench-torch.json"
        fi
    fi
fi

if [[ $part != bench ]]; then
    # ---- 9. the demo (training on the CPU, prediction stages on the device), then its
    # classifier on its rows with the CPU, the device and --devices 0, swap TTA.
    # The demo trains on the CPU either way; its prediction stages take about 700 s on the
    # emulator (2 cores), so a rehearsal within a deadline records it as skipped.
    step demo $((emulated ? 720 : 60)) $((emulated ? 900 : 180)) "$bin" demo --tiny --out "$scratch/demo" --device "$device"
    demo_model="$scratch/demo/models/gemma2-tiny"
    predict_on() { # predict_on NAME DEVICE-FLAGS...
        local name=$1
        shift
        step "predict/$name" 5 60 "$bin" predict --model "$demo_model" --adapter "$scratch/demo/run-gemma2-tiny" \
            --test "$scratch/demo/data/rows.csv" --out "$scratch/predict-$name.csv" --max-len 256 \
            --batch-tokens 1024 --logits-out "$scratch/predict-$name-logits.csv" \
            --json "$scratch/predict-$name.json" "$@"
    }
    if [[ -d $demo_model ]]; then
        predict_on cpu --device cpu
        predict_on device --device "$device"
        if ((emulated)); then
            skip predict/devices "emulated device: --devices 0 names a real GPU"
        else
            predict_on devices --devices 0
        fi
        for name in device devices; do
            if [[ -f $scratch/predict-cpu-logits.csv && -f $scratch/predict-$name-logits.csv ]]; then
                check "predict-parity/$name" compare_outputs "$scratch/predict-cpu-logits.csv" \
                    "$scratch/predict-$name-logits.csv"
            fi
        done
    else
        skip predict "the demo made no model"
    fi
fi

if command -v python3 >/dev/null && [[ -f $scratch/bench-kernels.json || -f $scratch/bench-torch.json ]]; then
    say "== benchmarks side by side"
    python3 tools/bench_summary.py "$scratch/bench-kernels.json" "$scratch/bench-torch.json" 2>&1 | tee -a "$log"
fi
grep -qE $'\t(FAIL|TIMEOUT|KILLED)\t' "$steps" && exit 1
exit 0
