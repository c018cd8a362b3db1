#!/usr/bin/env bash
# Opens a Kaggle bundle (`verdict bundle --out DIR`) and checks what Kaggle needs of it
# (issue #18):
#   1. the files are there and the notebooks are nbformat-4 JSON;
#   2. the binary's highest GLIBC_ version is <= 2.35 (tools/check-glibc.sh);
#   3. ldd: no Python or libtorch (or any CUDA library: those are opened at run time);
#   4. the embedded fatbins, carved out of the binary and listed by cuobjdump: SASS for
#      sm_75, 80, 86, 89, 90 and PTX, whose ISA version is printed;
#   5. both notebooks' code cells run end to end on the CPU, with the tiny fixtures standing
#      in for the Kaggle inputs (the VERDICT_* variables the notebooks read): the inference
#      notebook writes a submission with one row per test row, the training one an adapter.
#
#   bash tools/check-bundle.sh DIR
#
# cuobjdump: $CUOBJDUMP, PATH, or tools/install-nvcc.sh's venv (nvidia-cuda-cuobjdump). A
# binary built without nvcc has no fatbins: step 4 then fails under VERDICT_REQUIRE_KERNELS=1
# (CI) and is skipped, saying so, otherwise; so is a missing cuobjdump.
set -euo pipefail
cd "$(dirname "$0")/.."

bundle="${1:?usage: tools/check-bundle.sh DIR}"
require="${VERDICT_REQUIRE_KERNELS:-0}"
bin="$bundle/verdict"
for name in verdict README.md verdict-predict.ipynb verdict-train-t4.ipynb; do
    [[ -f $bundle/$name ]] || { echo "check-bundle: no $name in $bundle" >&2; exit 1; }
done
[[ -x $bin ]] || { echo "check-bundle: $bin is not executable" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "== glibc"
bash tools/check-glibc.sh "$bin" 2.35

echo "== ldd"
ldd "$bin" | tee "$work/ldd.txt"
if grep -iE 'python|torch|libc10|cuda|nvrtc|cublas' "$work/ldd.txt"; then
    echo "check-bundle: $bin links the libraries above at load time; it must need none" >&2
    exit 1
fi
echo "no Python, libtorch or CUDA library among $(wc -l <"$work/ldd.txt") dependencies"

echo "== fatbins"
cuobjdump="${CUOBJDUMP:-$(command -v cuobjdump || true)}"
if [[ -z $cuobjdump ]]; then
    venv="${VERDICT_NVCC_VENV:-$HOME/.cache/verdict/nvcc-venv}"
    cuobjdump=$(ls "$venv"/lib/python3.*/site-packages/nvidia/cu13/bin/cuobjdump 2>/dev/null | head -n 1 || true)
fi
# Carves each fatbin (magic 0xBA55ED50, u16 version, u16 header size, u64 payload size) out
# of the binary, where include_bytes! put them.
python3 - "$bin" "$work" <<'EOF'
import struct, sys
data = open(sys.argv[1], "rb").read()
magic = struct.pack("<I", 0xBA55ED50)
count, at = 0, data.find(magic)
while at >= 0:
    version, header, size = struct.unpack_from("<HHQ", data, at + 4)
    if version == 1 and header == 16 and 0 < size < len(data):
        open(f"{sys.argv[2]}/kernel{count:02d}.fatbin", "wb").write(data[at:at + header + size])
        count += 1
        at = data.find(magic, at + header + size)
    else:
        at = data.find(magic, at + 4)
print(f"{count} fatbins in {sys.argv[1]}")
EOF
fatbins=("$work"/kernel*.fatbin)
if [[ ! -f ${fatbins[0]} ]]; then
    if [[ $require == 1 ]]; then
        echo "check-bundle: no fatbin in $bin, and VERDICT_REQUIRE_KERNELS=1" >&2
        exit 1
    fi
    echo "SKIPPED the fatbin check: $bin has no prebuilt kernels (built without nvcc)"
elif [[ -z $cuobjdump ]]; then
    if [[ $require == 1 ]]; then
        echo "check-bundle: no cuobjdump (bash tools/install-nvcc.sh installs it)" >&2
        exit 1
    fi
    echo "SKIPPED the fatbin check: no cuobjdump (bash tools/install-nvcc.sh installs it)"
else
    want="sm_75 sm_80 sm_86 sm_89 sm_90"
    for fatbin in "${fatbins[@]}"; do
        sass=$("$cuobjdump" --list-elf "$fatbin" | grep -oE 'sm_[0-9]+' | sort -u | paste -sd ' ')
        ptx=$("$cuobjdump" --list-ptx "$fatbin" | grep -oE 'sm_[0-9]+' | sort -u | paste -sd ' ')
        "$cuobjdump" --dump-ptx "$fatbin" >"$work/ptx.txt"
        isa=$(grep -oE '^\.version [0-9.]+' "$work/ptx.txt" | sort -u | cut -d' ' -f2 | paste -sd ' ')
        echo "$(basename "$fatbin"): SASS $sass; PTX $ptx (ISA $isa)"
        if [[ $sass != "$want" || -z $ptx || -z $isa ]]; then
            echo "check-bundle: expected SASS $want and PTX" >&2
            exit 1
        fi
    done
fi

echo "== notebooks on the CPU"
# Tiny stand-ins for the competition data: eight sample rows as test.csv (no labels) and as
# train.csv.
python3 - data/sample/arena-sample.csv "$work" <<'EOF'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1], newline="", encoding="utf-8")))[:8]
with open(f"{sys.argv[2]}/test.csv", "w", newline="", encoding="utf-8") as f:
    w = csv.DictWriter(f, ["id", "prompt", "response_a", "response_b"], extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
with open(f"{sys.argv[2]}/train.csv", "w", newline="", encoding="utf-8") as f:
    w = csv.DictWriter(f, list(rows[0]))
    w.writeheader()
    w.writerows(rows)
EOF
# run_notebook NOTEBOOK: its code cells, in order, as one script, in a fresh python3.
run_notebook() {
    python3 - "$1" <<'EOF'
import json, sys
nb = json.load(open(sys.argv[1], encoding="utf-8"))
assert nb["nbformat"] == 4, "not an nbformat-4 notebook"
code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
exec(compile(code, sys.argv[1], "exec"), {"__name__": "__main__"})
EOF
}
# The model: a random tiny Gemma 2 with a byte-level tokenizer (`verdict init`); the training
# notebook makes the adapter that the inference notebook then uses, as on Kaggle.
"$bin" init --arch gemma2 --preset tiny --out "$work/model" >/dev/null
export VERDICT_BINARY="$bin" VERDICT_MODEL="$work/model" VERDICT_WORK="$work/working" VERDICT_FORCE_CPU=1
started=$SECONDS
VERDICT_TRAIN="$work/train.csv" VERDICT_RUN="$work/working/run" \
    VERDICT_TRAIN_ARGS="--max-steps 2 --max-len 64 --lora-r 4 --heads three --save-every 0" \
    run_notebook "$bundle/verdict-train-t4.ipynb"
echo "training notebook ran on the CPU in $((SECONDS - started)) s"
started=$SECONDS
VERDICT_ADAPTER="$work/working/run" VERDICT_TEST="$work/test.csv" VERDICT_OUT="$work/working/submission.csv" \
    VERDICT_PREDICT_ARGS="--max-len 128" run_notebook "$bundle/verdict-predict.ipynb"
echo "inference notebook ran on the CPU in $((SECONDS - started)) s"
echo "check-bundle: $bundle passed"
