#!/usr/bin/env bash
# Installs nvcc (CUDA 13.0) from PyPI into a cached virtual environment, so build.rs can
# compile kernels/*.cu on a machine with no CUDA toolkit (CI, developers' machines), and
# beside it NVRTC 12.4 and cuobjdump for the CUDA 12 checks.
#
# Why CUDA 13 nvcc and NVRTC 12.4 (issue #18): a CUDA-13 fatbin needs driver R580, and
# Kaggle's drivers are CUDA 12 (R525+ load CUDA 12.x SASS). But PyPI has no CUDA 12 nvcc:
# nvidia-cuda-nvcc-cu12 (12.0 to 12.9; 12.4.131, 12.6.85, 12.8.93 and 12.9.86 checked) ships
# only ptxas and libnvvm, no nvcc driver, fatbinary or cudafe++, and no crt headers package
# exists for 12. So the embedded fatbins stay CUDA 13.0, and a CUDA 12 driver gets its kernels
# from NVRTC at run time: the fatbin fails to load, `VERDICT_KERNELS=auto` falls back to
# NVRTC, which compiles each kernel to a cubin (SASS) for the device's sm_XY, loadable by every
# R525+ driver when the NVRTC is 12.x (Kaggle's PyTorch wheels bring libnvrtc.so.12; verdict
# finds it in site-packages/nvidia/cuda_nvrtc/lib). nvidia-cuda-nvrtc-cu12 is pinned to 12.4
# (12.4.127): the oldest 12.x that compiles every kernel here for sm_75 to sm_90 (checked;
# CUDA 12.0 already knows sm_90), close to what Kaggle's images carry, and its cubins need
# no newer driver than 12.x's R525. tests/cuda_host.rs compiles every kernel with it for
# sm_75/80/86/89/90. cuobjdump (nvidia-cuda-cuobjdump, 13.x only on PyPI; it reads older
# fatbins too) lets tools/check-bundle.sh list the fatbins' SASS archs and PTX version.
#
#   bash tools/install-nvcc.sh            # prints nvcc's path as the last line of stdout
#
# Folder: $VERDICT_NVCC_VENV, default $HOME/.cache/verdict/nvcc-venv (build.rs looks there
# too). Idempotent: a second run finds the install and returns at once. Progress and errors
# go to stderr; stdout carries only the path. nvcc also needs a host C++ compiler (g++) to
# preprocess .cu files; the compile check below fails clearly without one.
set -euo pipefail

venv="${VERDICT_NVCC_VENV:-$HOME/.cache/verdict/nvcc-venv}"
python="${PYTHON:-python3}"
packages=(
    nvidia-cuda-nvcc==13.0.88
    nvidia-nvvm==13.0.88
    nvidia-cuda-crt==13.0.88
    nvidia-cuda-runtime==13.0.88
    "nvidia-cuda-cccl==13.0.*"
    nvidia-cuda-nvrtc-cu12==12.4.127
    nvidia-cuda-cuobjdump==13.2.51
)
# Written after a successful install and compile check; names the package set, so changing
# the pins above reinstalls.
stamp="$venv/.verdict-nvcc-$(printf '%s\n' "${packages[@]}" | cksum | cut -d' ' -f1)"

find_nvcc() {
    local candidate
    for candidate in "$venv"/lib/python3.*/site-packages/nvidia/cu13/bin/nvcc; do
        if [[ -x $candidate ]]; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

if [[ -f $stamp ]] && nvcc=$(find_nvcc) && "$nvcc" --version >/dev/null 2>&1; then
    echo "$nvcc"
    exit 0
fi

start=$SECONDS
echo "install-nvcc: installing CUDA 13.0 nvcc from PyPI into $venv" >&2
mkdir -p "$(dirname "$venv")"
if [[ ! -x $venv/bin/pip ]]; then
    "$python" -m venv "$venv" >&2 || {
        echo "install-nvcc: '$python -m venv' failed (Debian: apt-get install python3-venv)" >&2
        exit 1
    }
fi
"$venv/bin/pip" install --disable-pip-version-check --quiet "${packages[@]}" >&2
nvcc=$(find_nvcc) || {
    echo "install-nvcc: pip finished but no nvidia/cu13/bin/nvcc under $venv/lib" >&2
    exit 1
}
"$nvcc" --version >&2

# Compile check: the headers kernels use (from the runtime, crt and cccl packages) are
# found through nvcc.profile, so no -I flag is needed; the host compiler comes from PATH.
check=$(mktemp -d)
trap 'rm -rf "$check"' EXIT
printf '%s\n' 'extern "C" __global__ void scale(float* x, float a, int n) {' \
    '    int i = blockIdx.x * blockDim.x + threadIdx.x;' \
    '    if (i < n) x[i] *= a;' '}' >"$check/check.cu"
"$nvcc" --fatbin -gencode arch=compute_75,code=sm_75 -o "$check/check.fatbin" "$check/check.cu" >&2 || {
    echo "install-nvcc: nvcc is installed but cannot compile a trivial kernel;" \
        "it needs a host C++ compiler on PATH (g++; Debian: apt-get install g++)" >&2
    exit 1
}
magic=$(od -An -tx4 -N4 "$check/check.fatbin" | tr -d ' ')
if [[ $magic != ba55ed50 ]]; then
    echo "install-nvcc: nvcc wrote a file without the fatbin magic ($magic)" >&2
    exit 1
fi

touch "$stamp"
echo "install-nvcc: ready in $((SECONDS - start)) s" >&2
echo "$nvcc"
