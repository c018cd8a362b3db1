#!/usr/bin/env python3
"""Write tests/fixtures/models/gemma2_seqcls_bnb4/: a bitsandbytes 4-bit checkpoint serialized
by transformers, and the outputs it must give.

Run with the fixture venv (tools/requirements-fixtures.txt + bitsandbytes==0.50.2):

    /work/venv/bin/python tools/make_bnb_fixture.py

1. The checkpoint is transformers' own: `from_pretrained` of the f32 fixture
   tests/fixtures/models/gemma2_seqcls with `BitsAndBytesConfig(load_in_4bit=True,
   bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=float32)`
   on the CPU (transformers 5.23 + bitsandbytes 0.50.2 quantize on CPU), then
   `save_pretrained`. config.json carries `quantization_config`; model.safetensors holds each
   projection as `weight` (u8 [n/2, 1]), `weight.absmax` (u8), `weight.nested_absmax`,
   `weight.nested_quant_map`, `weight.quant_map`, `weight.quant_state.bitsandbytes__nf4`;
   embeddings, norms and the score head stay f32 (transformers never quantizes `score`).
2. expected.json holds the outputs of transformers' modelling code on the dequantized
   weights in float32 (eager attention): the saved folder is reloaded by transformers (its
   bnb loading path, `Linear4bit` modules with their `QuantState`), every 4-bit weight is
   dequantized with bitsandbytes' generic flat-block float32 path (`dequantize_blockwise` of
   the nested absmax plus the offset, then `_dequantize_4bit_compute`), and those weights
   replace the projections of a float32 `Gemma2ForSequenceClassification`.
   Why not the quantized model's own forward: on a CPU with AVX512-BF16, bitsandbytes 0.50.2
   repacks each weight for its bfloat16 CPU kernels on the first forward, reshaping absmax
   per row (`_convert_weight_packed_for_cpu`); for `down_proj` (96 columns, not a multiple of
   the blocksize 64) that raises, and its native dequantizer has the same per-row indexing
   (see tools/make_nf4_fixtures.py). What that forward gives (differences, or the error) is
   recorded as `bnb_forward`.
3. expected.json also records the f32 fixture's own outputs on the same inputs
   (`f32_hidden`, `f32_logits`) and the largest difference between them and the NF4 outputs
   (`nf4_vs_f32_max_diff`): the quantization error the Rust tests reason about.
"""

import argparse
import json
import os
import shutil
from pathlib import Path

# bnb wraps _dequantize_4bit_compute in torch.compile; eager float32 is the plain reference.
os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

import bitsandbytes  # noqa: E402
import bitsandbytes.functional as F  # noqa: E402
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute  # noqa: E402
from bitsandbytes.backends.utils import _get_4bit_code  # noqa: E402
from transformers import BitsAndBytesConfig, Gemma2ForSequenceClassification  # noqa: E402

assert bitsandbytes.__version__ == "0.50.2", f"pinned to bitsandbytes 0.50.2, found {bitsandbytes.__version__}"
assert transformers.__version__ == "5.23.0", f"pinned to transformers 5.23.0, found {transformers.__version__}"
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent


def f32_list(t):
    """Tensor -> nested list of floats, 9 significant digits (enough to round-trip f32)."""
    def rounded(v):
        return [rounded(x) for x in v] if isinstance(v, list) else float(f"{v:.9g}")
    return rounded(t.detach().float().tolist())


def load(folder, **kw):
    return Gemma2ForSequenceClassification.from_pretrained(folder, attn_implementation="eager", **kw).eval()


@torch.no_grad()
def run(model, inputs, pad_id):
    """Pooled final-norm hidden state and score logits of each input, one at a time."""
    hidden, logits = [], []
    for ids in inputs:
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
        pooled = max(i for i, t in enumerate(ids) if t != pad_id) if any(t != pad_id for t in ids) else 0
        hidden.append(out.hidden_states[-1][0, pooled].float())
        logits.append(out.logits[0].float())
    return hidden, logits


def max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def dequantize(module):
    """The f32 weight of a Linear4bit, by bnb's generic flat-block path."""
    state = module.weight.quant_state
    assert state.quant_type == "nf4" and state.nested, "the fixture is NF4 with double quantization"
    absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    code = _get_4bit_code("nf4", absmax.device)
    packed = module.weight.data.view(torch.uint8).reshape(-1)
    return _dequantize_4bit_compute(packed, absmax.float(), code, state.blocksize, state.shape, torch.float32)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", default=ROOT / "tests/fixtures/models/gemma2_seqcls", type=Path)
    parser.add_argument("--out", default=ROOT / "tests/fixtures/models/gemma2_seqcls_bnb4", type=Path)
    args = parser.parse_args()

    src_expected = json.loads((args.src / "expected.json").read_text())
    inputs = [i["ids"] for i in src_expected["inputs"]]
    pad_id = src_expected["pad_token_id"]

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    quantized = load(args.src, quantization_config=quant, device_map="cpu", dtype=torch.float32)
    if args.out.exists():
        shutil.rmtree(args.out)
    quantized.save_pretrained(args.out)
    assert sorted(p.name for p in args.out.iterdir()) == ["config.json", "model.safetensors"]

    # Reload what was written, so the reference is computed from the files under test.
    reloaded = load(args.out, device_map="cpu")
    dense = load(args.src, dtype=torch.float32)
    replaced = 0
    for name, module in reloaded.named_modules():
        if isinstance(module, bitsandbytes.nn.Linear4bit):
            target = dense.get_submodule(name)
            weight = dequantize(module)
            assert weight.shape == target.weight.shape, (name, weight.shape, target.weight.shape)
            with torch.no_grad():
                target.weight.copy_(weight)
            replaced += 1
    layers = dense.config.num_hidden_layers
    assert replaced == 7 * layers, f"expected 7 quantized projections per layer, found {replaced}"
    hidden, logits = run(dense, inputs, pad_id)

    f32_hidden, f32_logits = run(load(args.src, dtype=torch.float32), inputs, pad_id)
    try:
        bnb_hidden, bnb_logits = run(reloaded, inputs, pad_id)
        bnb_forward = {"hidden": max_diff(hidden, bnb_hidden), "logits": max_diff(logits, bnb_logits)}
    except RuntimeError as e:
        bnb_forward = f"{type(e).__name__}: {e}"
    expected = {
        "case": "gemma2_seqcls_bnb4",
        "architecture": dense.config.architectures[0],
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "bitsandbytes_version": bitsandbytes.__version__,
        "has_avx512bf16": bool(F.has_avx512bf16()),
        "pad_token_id": pad_id,
        "inputs": [{"ids": ids} for ids in inputs],
        "hidden": [f32_list(h) for h in hidden],
        "logits": [f32_list(l) for l in logits],
        "f32_hidden": [f32_list(h) for h in f32_hidden],
        "f32_logits": [f32_list(l) for l in f32_logits],
        "nf4_vs_f32_max_diff": {"hidden": max_diff(hidden, f32_hidden), "logits": max_diff(logits, f32_logits)},
        "bnb_forward": bnb_forward,
    }
    (args.out / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    size = sum(p.stat().st_size for p in args.out.iterdir())
    print(f"wrote {args.out} ({size} bytes)")
    print(f"  NF4 vs f32 model:            {expected['nf4_vs_f32_max_diff']}")
    print(f"  bnb's own CPU forward:       {bnb_forward}")


if __name__ == "__main__":
    main()
