#!/usr/bin/env python3
"""Write tests/fixtures/nf4/bnb_nf4.safetensors: NF4 references from bitsandbytes itself.

Run with the fixture venv (torch + bitsandbytes==0.50.2 + safetensors + numpy):

    /work/venv/bin/python tools/make_nf4_fixtures.py [--out tests/fixtures/nf4/bnb_nf4.safetensors]

For every case `<case>` the file holds
    <case>.input                      f32 [rows, cols]   the weight we quantize
    <case>.<mode>.weight              u8  [ceil(n/2), 1] packed nibbles, as bnb serializes them
    <case>.<mode>.weight.absmax       f32 [blocks] (plain) or u8 [blocks] (double quant)
    <case>.<mode>.weight.quant_map    f32 [16]
    <case>.<mode>.weight.nested_absmax / .nested_quant_map      (double quant only)
    <case>.<mode>.weight.quant_state.bitsandbytes__nf4         u8 JSON bytes
    <case>.<mode>.dequant             f32 [rows, cols]   bnb's dequantized weight
with <mode> = `plain` (compress_statistics=False) or `dq` (compress_statistics=True); the
`weight.*` tensors are exactly `QuantState.as_dict(packed=True)`, i.e. what a bnb-4bit
checkpoint stores. Also `dynamic_map` (create_dynamic_map(signed=True)), `nf4_code`, and
`torch_mean.lengths` / `torch_mean.values`: torch's float32 mean (the double-quant offset) of
`mean_probe(n)` for lengths that exercise every path of torch's cascade sum.

How we make sure these are bnb's f32 CPU results (bnb 0.50.2):
* quantize_4bit on CPU has no native kernel; it runs the pure-torch "default" backend in
  float32 (`A.reshape(-1).float()`). We feed float32 inputs, so no half/bf16 rounding
  happens anywhere. The bf16 math that bnb does on CPUs with AVX512-BF16
  (`has_avx512bf16()`) lives only in `gemv_4bit` (the fused inference matmul), which we
  never call; we record `has_avx512bf16` in the metadata for the record.
* quantize_blockwise (the 8-bit double quantization of the absmax) runs the native
  `cquantize_blockwise_cpu_fp32` on float32 absmax values.
* offset = absmax.mean() is torch's float32 cascade sum. With more than one torch thread and
  more than 32768 blocks the sum is split across threads and its rounding depends on the
  thread count, so we pin torch to one thread (the Rust side emulates the one-thread sum).
* Dequantization: bnb 0.50.2's native AVX512 CPU kernel (`cdequantize_blockwise_cpu_nf4_fp32`)
  indexes absmax per row (`row * (cols / blocksize) + col / blocksize`), which is wrong
  whenever cols is not a multiple of the blocksize (e.g. 17x96 at blocksize 64) - bnb's own
  quantizer and CUDA kernels use flat blocks over the row-major weight. We therefore take the
  reference dequantization from bnb's generic backend (`_dequantize_4bit_compute`, flat
  blocks, float32) and assert it equals the native kernel wherever the native kernel is
  correct (it is used for blocksize < 2048 when cols % 16 == 0 on AVX512 machines).
"""

import argparse
import json
import os

# bnb wraps _dequantize_4bit_compute in torch.compile; eager float32 is the plain reference
# (one multiply per element either way) and keeps the run quiet and fast.
os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import bitsandbytes  # noqa: E402
import bitsandbytes.functional as F  # noqa: E402
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute  # noqa: E402
from bitsandbytes.backends.utils import _get_4bit_code  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

assert bitsandbytes.__version__ == "0.50.2", f"fixtures are pinned to bitsandbytes 0.50.2, found {bitsandbytes.__version__}"
torch.set_num_threads(1)

NF4 = F.get_4bit_type("nf4", device="cpu")
BOUNDS = (NF4[:-1] + NF4[1:]) / 2  # the float32 midpoints bnb's torch.bucketize compares against


def rng_weight(rng, rows, cols, spread=True):
    """Gaussian rows with row scales spread over three decades, like real projections."""
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    if spread:
        w *= (10.0 ** rng.uniform(-3, 0, size=(rows, 1))).astype(np.float32)
    return w


def midpoint_weight(rng, rows, cols, blocksize):
    """Every block holds a +-1.0 (so absmax = 1 and scaled = value) and the rest of its
    values sit exactly on the NF4 midpoints: ties must go to the lower code."""
    w = rng.choice(BOUNDS.numpy(), size=(rows * cols,)).astype(np.float32)
    for start in range(0, rows * cols, blocksize):
        w[start] = 1.0 if (start // blocksize) % 2 == 0 else -1.0
    return w.reshape(rows, cols)


def reciprocal_weight(rng, rows, cols, blocksize):
    """Blocks whose values sit within a few ulps of `midpoint * absmax`, chosen so that
    `w * (1 / absmax)` and `w / absmax` fall on different sides of the midpoint: bnb
    multiplies by the reciprocal in full blocks and divides in the short last block, and
    only these values can tell the two apart."""
    bounds = BOUNDS.numpy()
    w = np.empty(rows * cols, dtype=np.float32)
    for start in range(0, rows * cols, blocksize):
        end = min(start + blocksize, rows * cols)
        while True:
            absmax = np.float32(rng.uniform(0.01, 3.0))
            reciprocal = np.float32(1.0) / absmax
            picks = []
            for bound in bounds:
                centre = (bound * absmax).astype(np.float32).view(np.int32)
                for ulps in range(-4, 5):
                    v = np.int32(centre + ulps).view(np.float32)
                    if abs(v) < absmax and ((v * reciprocal).astype(np.float32) <= bound) != (np.float32(v / absmax) <= bound):
                        picks.append(v)
            if len(picks) >= 4:
                break
        w[start] = absmax
        w[start + 1:end] = rng.choice(np.array(picks, dtype=np.float32), size=end - start - 1)
    return w.reshape(rows, cols)


def cases(rng):
    yield "w3x64_bs64", rng_weight(rng, 3, 64), 64
    yield "w17x96_bs64", rng_weight(rng, 17, 96), 64  # blocks straddle rows
    yield "w5x33_bs64", rng_weight(rng, 5, 33), 64  # odd element count: padding nibble, short last block
    yield "w64x300_bs64", rng_weight(rng, 64, 300), 64  # 300 blocks: second nested block is partial
    w = rng_weight(rng, 8, 100)
    w[1, 28:] = 0.0  # flat elements 128..191: block 2 is all zero
    w[7, 36:] = 0.0  # the short last block (elements 768..799) is all zero
    yield "w8x100_bs64_zero_blocks", w, 64
    yield "w4x64_bs64_midpoints", midpoint_weight(rng, 4, 64, 64), 64
    yield "w3x50_bs64_reciprocal", reciprocal_weight(rng, 3, 50, 64), 64  # 64 + 64 + a short 22
    yield "w20x200_bs128", rng_weight(rng, 20, 200), 128
    yield "w7x50_bs32", rng_weight(rng, 7, 50), 32
    yield "w3x4100_bs4096", rng_weight(rng, 3, 4100), 4096


# Lengths for the offset check: the scalar path (< 8), the 8-lane path with a tail, and the
# 1, 2 and 3 cascade levels of torch's sum (level flushes every 16^j groups of 32 values).
MEAN_LENGTHS = list(range(1, 41)) + [100, 513, 1000, 8191, 8192, 8193, 40000, 131109, 300000]


def mean_probe(n):
    """A vector both sides can generate exactly: frac(i * 0.6180339887) * 3 as float32."""
    i = np.arange(n, dtype=np.float64)
    return (np.modf(i * 0.6180339887)[0] * 3.0).astype(np.float32)


def quantize(case, w, blocksize, compress):
    t = torch.from_numpy(w)
    assert t.dtype == torch.float32
    packed, state = F.quantize_4bit(t, blocksize=blocksize, compress_statistics=compress, quant_type="nf4")
    assert state.dtype == torch.float32
    # As F.dequantize_4bit does: double quant first restores the f32 absmax, then adds offset.
    absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset if compress else state.absmax
    code = _get_4bit_code("nf4", packed.device)
    reference = _dequantize_4bit_compute(packed.reshape(-1), absmax, code, blocksize, w.shape, torch.float32)
    native = F.dequantize_4bit(packed, state, quant_type="nf4")
    assert reference.dtype == torch.float32 and native.dtype == torch.float32
    if not torch.equal(native, reference):
        cols = w.shape[1]
        assert cols % blocksize != 0, f"{case}: native dequant differs where it should be correct"
        print(f"  {case}: bnb native AVX512 dequant disagrees (cols % blocksize != 0), using the generic path")
    out = {"weight": packed.numpy()}
    for key, value in state.as_dict(packed=True).items():
        out[f"weight.{key}"] = value.numpy()
    out["dequant"] = reference.numpy()
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "nf4", "bnb_nf4.safetensors"))
    args = parser.parse_args()

    rng = np.random.default_rng(20240607)
    tensors = {
        "dynamic_map": F.create_dynamic_map(signed=True).numpy(),
        "nf4_code": NF4.numpy(),
    }
    tensors["torch_mean.lengths"] = np.array(MEAN_LENGTHS, dtype=np.int64)
    tensors["torch_mean.values"] = np.array([torch.from_numpy(mean_probe(n)).mean().item() for n in MEAN_LENGTHS], dtype=np.float32)
    names = []
    for case, w, blocksize in cases(rng):
        names.append(case)
        tensors[f"{case}.input"] = w
        for mode, compress in (("plain", False), ("dq", True)):
            for key, value in quantize(case, w, blocksize, compress).items():
                tensors[f"{case}.{mode}.{key}"] = np.ascontiguousarray(value)

    # One metadata key: safetensors writes a dict's keys in random order, one key keeps the
    # file byte-identical across runs.
    info = {
        "bitsandbytes": bitsandbytes.__version__,
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "has_avx512bf16": bool(F.has_avx512bf16()),
        "cases": names,
    }
    metadata = {"info": json.dumps(info)}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_file(tensors, args.out, metadata=metadata)
    print(f"wrote {args.out}: {len(names)} cases, {os.path.getsize(args.out)} bytes")


if __name__ == "__main__":
    main()
