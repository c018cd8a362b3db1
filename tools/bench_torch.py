#!/usr/bin/env python3
"""PyTorch / transformers / bitsandbytes / PEFT on the same card, shapes and rows as verdict.

The other half of `verdict bench kernels` (tools/gpu-check.sh runs both): no internet on the GPU
machine, so the models are random, built in code from the Gemma 2 config of `--preset` (the
shapes of `verdict init --arch gemma2 --preset`, copied into PRESETS below). Three parts, each
within its share of `--seconds`:

  linear  the projections verdict times (q, o, gate, down at m = 1, 16, 512, 2048 rows) through
          torch: bf16 (cuBLAS), f32 with TF32 on and off, and bitsandbytes NF4 (Linear4bit,
          double quant, bf16 compute); plus the ceilings (a 512 MiB device copy, 8192^3 bf16
          product). Rows carry verdict's labels ("q 2304->2048 m=16") and its "kernel" objects,
          so the two JSON files join on them.
  attention  causal attention forward and backward at verdict's attention shapes (4x512, 1x2048,
          1x4096 tokens): torch SDPA on its FlashAttention-2 backend at head_dim 128 without
          soft-cap or window (the preset's heads regrouped, verdict's "d128" rows), and eager
          attention as transformers' Gemma 2 runs it (bf16, repeat_kv, soft-cap, window mask,
          f32 softmax) at the preset's own settings (verdict's "d256 ... cap50" rows). The rows
          carry verdict's labels and kernel objects, so `verdict bench kernels` joins them.
  infer   rows/s and peak memory of Gemma2ForSequenceClassification (3 labels) forwards on
          batches of rows x tokens (no padding: every row full length), bf16 and then with the
          7 projections of every layer in bitsandbytes NF4 (double quant, bf16 compute): what
          `verdict predict --quant nf4` will be compared with.
  train   QLoRA steps: NF4 base, PEFT LoRA r16 alpha 32 dropout 0.05 on all 7 projections, the
          score head trained, gradient checkpointing, AdamW; tokens/s and peak memory at 1024
          and 2048 tokens per row (4096 tokens per step, `verdict train`'s default batch), and
          one row of 2048 (`verdict bench train --max-len 2048`'s step; with --vocab 256000
          the same model as `verdict init --preset 2b|9b`).

Timing: CUDA events around each call after warm-up, median of the calls, inputs rotated
through sets larger than 3x L2 where one set fits in it (the rule verdict uses).

Usage:
  python3 tools/bench_torch.py --out bench-torch.json [--mode infer|train|linear|attention|all] [--seconds 100] [--preset 2b]
  python3 tools/bench_torch.py --dry-run --out /tmp/t.json   # tiny preset on the CPU: checks the code paths

Without bitsandbytes (not on the GPU image: carry its wheel, see BENCHMARKS.md) the NF4 rows
and the train part are skipped with the reason in the JSON's "skipped".
"""
import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time
import traceback

import torch

SCHEMA = "verdict-bench-torch/1"
# The Gemma 2 shapes of verdict's presets (src/model/init.rs): hidden, intermediate, layers,
# heads, kv_heads, head_dim, sliding window.
PRESETS = {
    "tiny": dict(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, head_dim=32, window=8),
    "2b": dict(hidden=2304, intermediate=9216, layers=26, heads=8, kv_heads=4, head_dim=256, window=4096),
    "9b": dict(hidden=3584, intermediate=14336, layers=42, heads=16, kv_heads=8, head_dim=256, window=4096),
}
LINEAR_ROWS = [1, 16, 512, 2048]  # verdict's cases::LINEAR_ROWS
PEAK_SIDE = 8192  # verdict's cases::PEAK_GEMM_SIDE
COPY_BYTES = 512 << 20  # verdict's cases::COPY_BYTES
L2_MULTIPLE, MAX_SETS = 3, 64  # verdict's rotation rule
ATTENTION_BATCHES = [(4, 512), (1, 2048), (1, 4096)]  # verdict's cases::ATTENTION_BATCHES
FA2_HEAD_DIM = 128  # verdict's cases::FA2_HEAD_DIM
ATTN_SOFTCAP = 50.0  # Gemma 2's attn_logit_softcapping (query_pre_attn_scalar = head_dim)
INFER_BATCHES = [(32, 512), (8, 2048)]  # (rows, tokens per row)
# (rows, tokens per row); (1, 2048) is `verdict bench train --max-len 2048`'s step and
# BENCHMARKS.md's memory plan (use --vocab 256000 to compare peak memory with them).
TRAIN_BATCHES = [(4, 1024), (2, 2048), (1, 2048)]
VOCAB = 32000  # the embedding's rows do not change the decoder's cost; a small table saves memory
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def linear_label(name, in_features, out_features, m):
    """verdict's cases::linear_label."""
    return f"{name} {in_features}->{out_features} m={m}"


def projections(shape):
    attn = shape["heads"] * shape["head_dim"]
    h, i = shape["hidden"], shape["intermediate"]
    return [("q", h, attn), ("o", attn, h), ("gate", h, i), ("down", i, h)]


class Clock:
    """Per-call device time: CUDA events on a GPU, the host clock (after a sync) elsewhere."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def time_each(self, fn, reps):
        if not self.cuda:
            out = []
            for i in range(reps):
                start = time.perf_counter()
                fn(i)
                out.append((time.perf_counter() - start) * 1e3)
            return out
        events = [torch.cuda.Event(enable_timing=True) for _ in range(reps + 1)]
        events[0].record()
        for i in range(reps):
            fn(i)
            events[i + 1].record()
        torch.cuda.synchronize()
        return [events[i].elapsed_time(events[i + 1]) for i in range(reps)]

    def measure(self, fn, budget_ms, min_reps=10, max_reps=2000, warmup=3):
        """verdict's Bench::time: warm-up calls estimate a call, then enough to fill the budget."""
        estimate = statistics.median(self.time_each(fn, warmup))
        reps = max_reps if estimate <= 0 else min(max(math.ceil(budget_ms / estimate), min_reps), max_reps)
        return timing(self.time_each(fn, reps))


def timing(samples_ms):
    us = sorted(s * 1e3 for s in samples_ms)

    def q(p):
        pos = p * (len(us) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return us[lo] + (us[hi] - us[lo]) * (pos - lo)

    return dict(reps=len(us), median_us=q(0.5), min_us=us[0], p10_us=q(0.1), p90_us=q(0.9))


def rotation_sets(set_bytes, l2_bytes):
    if set_bytes <= 0:
        return 1
    wanted = math.ceil(L2_MULTIPLE * l2_bytes / set_bytes)
    affordable = math.floor(4 * 2**30 / set_bytes)
    return max(1, min(wanted, affordable, MAX_SETS))


def nf4_weight_bytes(elements):
    """verdict's cases::nf4_weight_bytes (blocksize 64, double quant)."""
    blocks = -(-elements // 64)
    return -(-elements // 2) + blocks + 4 * -(-blocks // 256) + 4 * 256 + 4


def linear_bytes(m, n, k, storage):
    act, weight = {"nf4": (2, nf4_weight_bytes(n * k)), "f32": (4, 4 * n * k), "bf16": (2, 2 * n * k)}[storage]
    return act * (m * k + m * n) + weight


def row(op, variant, label, kernel, flops, nbytes, sets, t):
    r = dict(op=op, variant=variant, label=label, kernel=kernel, flops=flops, bytes=nbytes, sets=sets, timing=t)
    if t and t["median_us"] > 0:
        r["tflops"] = flops / t["median_us"] * 1e-6 if flops else None
        r["gbps"] = nbytes / t["median_us"] * 1e-3
    return r


def bnb_or_reason():
    try:
        import bitsandbytes as bnb

        return bnb, None
    except Exception as e:  # ImportError, or a CUDA library it cannot load
        return None, f"bitsandbytes not importable: {type(e).__name__}: {e}"


def nf4_linear(bnb, weight, device):
    """A bitsandbytes Linear4bit holding `weight` (bf16 [out, in]): NF4, double quant, bf16 compute,
    as transformers' BitsAndBytesConfig(load_in_4bit, nf4, double quant, bf16) makes it."""
    out_f, in_f = weight.shape
    layer = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.bfloat16,
                              compress_statistics=True, quant_type="nf4", device="meta")
    layer.weight = bnb.nn.Params4bit(weight.detach(), requires_grad=False, compress_statistics=True,
                                     quant_type="nf4", module=layer).to(device)
    return layer


def bench_linear(args, device, clock, report, budget_ms):
    shape = PRESETS[args.preset]
    l2 = torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 32 << 20
    bnb, reason = bnb_or_reason()
    if reason:
        report["skipped"].append(f"linear bnb_nf4: {reason}")
    rows = report["rows"]
    gen = torch.Generator(device=device).manual_seed(args.seed)

    def rand(*size, dtype=torch.float32):
        return (torch.rand(*size, generator=gen, device=device) * 2 - 1).to(dtype)

    # Ceilings, as verdict measures them.
    copy_elems = (COPY_BYTES if not args.dry_run else 8 << 20) // 4
    src, dst = rand(copy_elems), torch.empty(copy_elems, device=device)
    t = clock.measure(lambda i: dst.copy_(src), budget_ms)
    rows.append(row("copy", "torch_copy", f"{copy_elems * 4 >> 20} MiB", dict(kind="copy", bytes=copy_elems * 4),
                    0, 2 * copy_elems * 4, 1, t))
    del src, dst
    side = PEAK_SIDE if not args.dry_run else 256
    a, b = rand(side, side, dtype=torch.bfloat16), rand(side, side, dtype=torch.bfloat16)
    t = clock.measure(lambda i: torch.nn.functional.linear(a, b), budget_ms)
    rows.append(row("linear", "torch_bf16", linear_label("square", side, side, side),
                    dict(kind="linear", m=side, n=side, k=side, storage="bf16"), 2 * side**3,
                    linear_bytes(side, side, side, "bf16"), 1, t))
    del a, b

    variants = [("torch_bf16", "bf16", torch.bfloat16, None), ("torch_tf32", "f32", torch.float32, True),
                ("torch_f32", "f32", torch.float32, False), ("bnb_nf4", "nf4", torch.bfloat16, None)]
    for name, k, n in projections(shape):
        w32 = rand(n, k)
        for m in LINEAR_ROWS:
            label = linear_label(name, k, n, m)
            for variant, storage, dtype, tf32 in variants:
                if variant == "bnb_nf4" and bnb is None:
                    continue
                nbytes = linear_bytes(m, n, k, storage)
                sets = rotation_sets(nbytes, l2)
                xs = [rand(m, k, dtype=dtype) for _ in range(sets)]
                if variant == "bnb_nf4":
                    ws = [nf4_linear(bnb, w32.to(torch.bfloat16), device) for _ in range(sets)]
                    fn = lambda i: ws[i % sets](xs[i % sets])  # noqa: E731
                else:
                    ws = [w32.to(dtype).clone() for _ in range(sets)]
                    fn = lambda i: torch.nn.functional.linear(xs[i % sets], ws[i % sets])  # noqa: E731
                if tf32 is not None:
                    torch.backends.cuda.matmul.allow_tf32 = tf32
                with torch.inference_mode():
                    t = clock.measure(fn, budget_ms)
                torch.backends.cuda.matmul.allow_tf32 = False
                rows.append(row("linear", variant, label, dict(kind="linear", m=m, n=n, k=k, storage=storage),
                                2 * m * n * k, nbytes, sets, t))
                del xs, ws
        del w32
    limits = report["limits"]
    limits["copy_gbps"] = next((r["gbps"] for r in rows if r["op"] == "copy"), None)
    limits["torch_bf16_tflops"] = max((r["tflops"] for r in rows if r["variant"] == "torch_bf16"), default=None)


def visible_pairs(length, window):
    """verdict's cases::visible_pairs: query t sees min(t + 1, window) keys."""
    return sum(min(t + 1, window) if window else t + 1 for t in range(length))


def attention_kernel(sequences, seq_len, heads, kv_heads, head_dim, window, softcap, pass_):
    """verdict's cases::Kernel::Attention as JSON, and its label."""
    label = (f"{sequences}x{seq_len} h{heads}/{kv_heads} d{head_dim} w{window or 'none'} "
             f"cap{f'{ATTN_SOFTCAP:g}' if softcap else 'none'}")
    kernel = dict(kind="attention", sequences=sequences, seq_len=seq_len, heads=heads, kv_heads=kv_heads,
                  head_dim=head_dim, window=window, softcap=softcap, **{"pass": pass_})
    return label, kernel


def eager_attention(q, k, v, window, softcap, scale):
    """transformers' Gemma 2 eager attention: repeat_kv, scores, soft-cap, causal + window mask,
    softmax in f32, back to the input dtype. q [b, h, s, d], k, v [b, kv, s, d]."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    s = q.shape[2]
    pos = torch.arange(s, device=q.device)
    visible = pos[None, :] <= pos[:, None]
    if window:
        visible &= pos[:, None] - pos[None, :] < window
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


def bench_attention(args, device, clock, report, budget_ms):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    shape = PRESETS[args.preset]
    rows = report["rows"]
    gen = torch.Generator(device=device).manual_seed(args.seed)
    # On the CPU (--dry-run) there is no flash backend: the math one checks the code path.
    backend = SDPBackend.FLASH_ATTENTION if device.type == "cuda" else SDPBackend.MATH

    def sdpa(q, k, v):
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    regrouped = shape["heads"] * shape["head_dim"] // FA2_HEAD_DIM, shape["kv_heads"] * shape["head_dim"] // FA2_HEAD_DIM
    settings = [
        ("torch_sdpa_flash", regrouped[0], regrouped[1], FA2_HEAD_DIM, None, False),
        ("torch_eager", shape["heads"], shape["kv_heads"], shape["head_dim"], shape["window"], True),
    ]
    batches = ATTENTION_BATCHES if not args.dry_run else [(2, 16), (1, 32)]
    for sequences, seq_len in batches:
        for variant, heads, kv_heads, head_dim, window, softcap in settings:
            def rand(h, requires_grad=True):
                x = torch.randn(sequences, h, seq_len, head_dim, generator=gen, device=device, dtype=torch.bfloat16)
                return x.requires_grad_(requires_grad)

            q, k, v = rand(heads), rand(kv_heads), rand(kv_heads)
            if variant == "torch_sdpa_flash":
                fn = lambda: sdpa(q, k, v)  # noqa: E731
            else:
                fn = lambda: eager_attention(q, k, v, window, ATTN_SOFTCAP, head_dim**-0.5)  # noqa: E731
            pairs = sequences * visible_pairs(seq_len, window)
            for pass_ in ("forward", "backward"):
                label, kernel = attention_kernel(sequences, seq_len, heads, kv_heads, head_dim, window, softcap, pass_)
                tokens = sequences * seq_len
                # bf16 tensors: forward q, k, v read and out written; backward also dout, dq, dk, dv.
                per_head = 2 if pass_ == "forward" else 4
                nbytes = 2 * tokens * head_dim * per_head * (heads + kv_heads)
                flops = (4 if pass_ == "forward" else 10) * pairs * heads * head_dim
                try:
                    if pass_ == "forward":
                        with torch.inference_mode():
                            t = clock.measure(lambda i: fn(), budget_ms)
                    else:
                        out = fn()
                        dout = torch.randn_like(out)
                        t = clock.measure(lambda i: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True),
                                          budget_ms)
                        del out, dout
                except Exception as e:  # e.g. no flash backend for this card or shape
                    report["skipped"].append(f"attention {variant} {label} {pass_}: {type(e).__name__}: {e}")
                    continue
                rows.append(row("attention" if pass_ == "forward" else "attention_backward", variant, label, kernel,
                                flops, nbytes, 1, t))
            del q, k, v
            if device.type == "cuda":
                torch.cuda.empty_cache()


def gemma2_config(preset, dtype):
    from transformers import Gemma2Config

    s = PRESETS[preset]
    return Gemma2Config(
        vocab_size=VOCAB, hidden_size=s["hidden"], intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
        head_dim=s["head_dim"], sliding_window=s["window"], query_pre_attn_scalar=256,
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0, num_labels=3, pad_token_id=0,
        dtype=dtype,
    )


def build_classifier(args, device, dtype):
    from transformers import Gemma2ForSequenceClassification

    torch.manual_seed(args.seed)
    config = gemma2_config(args.preset, dtype)
    # Made in `dtype` on the device directly: no f32 copy (9B: 36 GB) and no host round trip.
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Gemma2ForSequenceClassification(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def quantize_projections(model, bnb, device):
    """The 7 projections of every layer to bitsandbytes NF4 (what --quant nf4 quantizes)."""
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if name in PROJECTIONS:
                    setattr(parent, name, nf4_linear(bnb, child.weight.data.to(torch.bfloat16), device))
                    del child
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peak_memory_reset(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device):
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def batch(rows, tokens, device, gen):
    ids = torch.randint(1, VOCAB, (rows, tokens), generator=gen, device=device)
    return ids, torch.ones_like(ids)


def bench_infer(args, device, clock, report, budget_ms):
    gen = torch.Generator(device=device).manual_seed(args.seed)
    batches = INFER_BATCHES if not args.dry_run else [(2, 16)]
    dtype = torch.bfloat16
    started = time.perf_counter()
    model = build_classifier(args, device, dtype)
    report["build_seconds"] = time.perf_counter() - started
    report["attn_implementation"] = model.config._attn_implementation
    bnb, reason = bnb_or_reason()
    for variant in ("bf16", "bnb_nf4"):
        if variant == "bnb_nf4":
            if bnb is None:
                report["skipped"].append(f"infer bnb_nf4: {reason}")
                break
            started = time.perf_counter()
            quantize_projections(model, bnb, device)
            report["quantize_seconds"] = time.perf_counter() - started
        for rows, tokens in batches:
            sets = [batch(rows, tokens, device, gen) for _ in range(2)]
            peak_memory_reset(device)
            with torch.inference_mode():
                t = clock.measure(lambda i: model(input_ids=sets[i % 2][0], attention_mask=sets[i % 2][1]).logits,
                                  budget_ms, min_reps=3, max_reps=50, warmup=2)
            seconds = t["median_us"] * 1e-6
            report["infer"].append(dict(
                variant=variant, rows=rows, tokens_per_row=tokens, timing=t,
                rows_per_s=rows / seconds, tokens_per_s=rows * tokens / seconds,
                peak_memory_bytes=peak_memory(device),
            ))
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_train(args, device, clock, report, budget_ms):
    bnb, reason = bnb_or_reason()
    if bnb is None:
        report["skipped"].append(f"train: {reason}")
        return
    from peft import LoraConfig, get_peft_model

    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    model = build_classifier(args, device, torch.bfloat16)
    quantize_projections(model, bnb, device)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=list(PROJECTIONS),
                      modules_to_save=["score"], task_type="SEQ_CLS")
    model = get_peft_model(model, lora)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    report["train_trainable_params"] = sum(p.numel() for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=2e-4)
    batches = TRAIN_BATCHES if not args.dry_run else [(2, 16)]
    for rows, tokens in batches:
        sets = [batch(rows, tokens, device, gen) for _ in range(2)]
        labels = torch.randint(0, 3, (rows,), generator=gen, device=device)

        def step(i):
            ids, mask = sets[i % 2]
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        peak_memory_reset(device)
        t = clock.measure(step, budget_ms, min_reps=3, max_reps=30, warmup=2)
        seconds = t["median_us"] * 1e-6
        report["train"].append(dict(
            variant="qlora_nf4_r16", rows=rows, tokens_per_row=tokens, timing=t,
            tokens_per_s=rows * tokens / seconds, peak_memory_bytes=peak_memory(device),
        ))
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()


def versions():
    out = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("transformers", "peft", "bitsandbytes"):
        try:
            out[name] = __import__(name).__version__
        except Exception as e:
            out[name] = f"missing ({type(e).__name__})"
    return out


def main():
    global VOCAB
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON report (rewritten after each part)")
    ap.add_argument("--mode", choices=["linear", "attention", "infer", "train", "all"], default="all")
    ap.add_argument("--seconds", type=float, default=100.0, help="rough budget for the whole run")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="2b")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab", type=int, default=VOCAB,
                    help="embedding rows (Gemma 2 has 256000; the default saves memory and changes no timing "
                         "but the head's; pass 256000 to compare peak memory with verdict bench train)")
    ap.add_argument("--dry-run", action="store_true",
                    help="tiny preset on the CPU, one short pass of every part: checks the code, times nothing useful")
    args = ap.parse_args()
    VOCAB = args.vocab
    if args.dry_run:
        args.preset = "tiny"
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        sys.exit("bench_torch: no CUDA device (use --dry-run to check the code on the CPU)")
    torch.backends.cuda.matmul.allow_tf32 = False
    clock = Clock(device)
    report = dict(
        schema=SCHEMA, status="running", date_utc=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        preset=args.preset, shapes=PRESETS[args.preset], dry_run=args.dry_run, versions=versions(),
        device=dict(name=torch.cuda.get_device_name(device), capability=torch.cuda.get_device_capability(device),
                    l2_cache_bytes=torch.cuda.get_device_properties(device).L2_cache_size,
                    total_memory_bytes=torch.cuda.get_device_properties(device).total_memory)
        if device.type == "cuda" else dict(name="cpu"),
        limits={}, rows=[], infer=[], train=[], skipped=[], errors=[],
    )
    # Shares of --seconds per part, spread over its cases (linear: ~70 cases; attention: 12;
    # infer: 4; train: 2), leaving room for model building and quantization.
    parts = {"linear": (bench_linear, 0.15 / 70), "attention": (bench_attention, 0.1 / 12),
             "infer": (bench_infer, 0.2 / 4), "train": (bench_train, 0.25 / 2)}
    chosen = list(parts) if args.mode == "all" else [args.mode]
    started = time.perf_counter()
    for name in chosen:
        fn, share = parts[name]
        part_started = time.perf_counter()
        try:
            fn(args, device, clock, report, budget_ms=args.seconds * share * 1e3)
        except Exception as e:
            traceback.print_exc()
            report["errors"].append(f"{name}: {type(e).__name__}: {e}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
        report[f"{name}_seconds"] = time.perf_counter() - part_started
        write(args.out, report)
        print(f"bench_torch: {name} done in {report[f'{name}_seconds']:.1f} s", flush=True)
    report["seconds"] = time.perf_counter() - started
    report["status"] = "failed" if report["errors"] else "ok"
    write(args.out, report)
    print_summary(report)
    sys.exit(1 if report["errors"] else 0)


def write(path, report):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, path)


def print_summary(report):
    print(f"bench_torch on {report['device']['name']} ({report['versions']}), preset {report['preset']}")
    print(f"ceilings: {report['limits']}")
    for r in report["rows"]:
        t = r["timing"]
        tflops = f"{r['tflops']:.2f}" if r.get("tflops") else "-"
        print(f"{r['op']:<7} {r['variant']:<16} {r['label']:<36} {t['median_us']:>10.1f} us {tflops:>8} TFLOP/s {r['gbps']:>7.0f} GB/s")
    for part in ("infer", "train"):
        for r in report[part]:
            extra = ""
            if "rows_per_s" in r:
                extra += "  %.1f rows/s" % r["rows_per_s"]
            if r["peak_memory_bytes"]:
                extra += "  peak %.2f GiB" % (r["peak_memory_bytes"] / 2**30)
            print(f"{part:<5} {r['variant']:<14} {r['rows']:>3} x {r['tokens_per_row']:<5} "
                  f"{r['timing']['median_us'] / 1e3:>9.1f} ms/batch {r['tokens_per_s']:>9.0f} tokens/s{extra}")
    for s in report["skipped"]:
        print(f"skipped: {s}")
    for e in report["errors"]:
        print(f"ERROR: {e}")


if __name__ == "__main__":
    main()
