#!/usr/bin/env bash
# Installs the CUDA compilers build.rs uses, from PyPI, into a cached virtual environment, so
# the embedded kernels build on a machine with no CUDA toolkit (CI, developers' machines):
# NVRTC 12.4, which compiles every kernels/*.cu, and cuobjdump, which tools/check-bundle.sh
# uses to read the result.
#
# Why NVRTC 12.4 (issue #18): Kaggle's drivers are CUDA 12, and CUDA 12 cubins load on every
# driver since R525 where CUDA 13's need R580. PyPI has no CUDA 12 nvcc:
# nvidia-cuda-nvcc-cu12 (12.0 to 12.9; 12.4.131, 12.6.85, 12.8.93 and 12.9.86 checked) ships
# only ptxas and libnvvm, no nvcc driver, fatbinary or cudafe++. NVRTC is the same front end
# and ptxas in one library, so build.rs opens it (dlopen) and compiles each kernel file to
# SASS for sm_75/80/86/89/90 and compute_90 PTX. Pinned to 12.4.127: the oldest 12.x that
# compiles every kernel here for sm_75 to sm_90 (checked; CUDA 12.0 already knows sm_90),
# close to what Kaggle's images carry; its PTX is ISA 8.4, which drivers from R550 JIT (a newer
# 12.x would write PTX that needs a newer driver; its cubins would load on R525 all the same).
# cuobjdump (nvidia-cuda-cuobjdump, 13.x only on PyPI; it reads CUDA 12 cubins too) lets
# tools/check-bundle.sh print each embedded cubin's arch and the toolkit that wrote it.
#
#   bash tools/install-nvcc.sh            # prints libnvrtc.so.12's path as the last line
#
# Folder: $VERDICT_NVCC_VENV, default $HOME/.cache/verdict/nvcc-venv (build.rs and verdict's
# run-time NVRTC lookup look there too). Idempotent: a second run finds the install and
# returns at once. Progress and errors go to stderr; stdout carries only the path.
set -euo pipefail

venv="${VERDICT_NVCC_VENV:-$HOME/.cache/verdict/nvcc-venv}"
python="${PYTHON:-python3}"
packages=(
    nvidia-cuda-nvrtc-cu12==12.4.127
    nvidia-cuda-cuobjdump==13.2.51
)
# Written after a successful install and compile check; names the package set, so changing
# the pins above reinstalls.
stamp="$venv/.verdict-nvcc-$(printf '%s\n' "${packages[@]}" | cksum | cut -d' ' -f1)"

find_nvrtc() {
    local candidate
    for candidate in "$venv"/lib/python3.*/site-packages/nvidia/cuda_nvrtc/lib/libnvrtc.so.12; do
        if [[ -f $candidate ]]; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

if [[ -f $stamp ]] && nvrtc=$(find_nvrtc); then
    echo "$nvrtc"
    exit 0
fi

start=$SECONDS
echo "install-nvcc: installing NVRTC 12.4 and cuobjdump from PyPI into $venv" >&2
mkdir -p "$(dirname "$venv")"
if [[ ! -x $venv/bin/pip ]]; then
    "$python" -m venv "$venv" >&2 || {
        echo "install-nvcc: '$python -m venv' failed (Debian: apt-get install python3-venv)" >&2
        exit 1
    }
fi
"$venv/bin/pip" install --disable-pip-version-check --quiet "${packages[@]}" >&2
nvrtc=$(find_nvrtc) || {
    echo "install-nvcc: pip finished but no nvidia/cuda_nvrtc/lib/libnvrtc.so.12 under $venv/lib" >&2
    exit 1
}

# Compile check: a trivial kernel to an sm_75 cubin, as build.rs compiles (no include path,
# no host compiler needed).
"$venv/bin/python" - "$nvrtc" >&2 <<'PY' || {
import ctypes, sys
lib = ctypes.CDLL(sys.argv[1])
major, minor = ctypes.c_int(), ctypes.c_int()
lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
source = b'extern "C" __global__ void scale(float* x, float a, int n) {' \
    b' int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < n) x[i] *= a; }'
program = ctypes.c_void_p()
assert lib.nvrtcCreateProgram(ctypes.byref(program), source, b"check.cu", 0, None, None) == 0
options = (ctypes.c_char_p * 1)(b"--gpu-architecture=sm_75")
assert lib.nvrtcCompileProgram(program, 1, options) == 0, "NVRTC cannot compile a trivial kernel"
size = ctypes.c_size_t()
lib.nvrtcGetCUBINSize(program, ctypes.byref(size))
cubin = ctypes.create_string_buffer(size.value)
lib.nvrtcGetCUBIN(program, cubin)
assert cubin.raw[:4] == b"\x7fELF", "NVRTC wrote no ELF cubin"
print(f"install-nvcc: NVRTC {major.value}.{minor.value} compiles to sm_75 cubins")
PY
    echo "install-nvcc: NVRTC is installed but cannot compile a trivial kernel" >&2
    exit 1
}

touch "$stamp"
echo "install-nvcc: ready in $((SECONDS - start)) s" >&2
echo "$nvrtc"
