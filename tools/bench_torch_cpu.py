#!/usr/bin/env python3
"""CPU forward speed of transformers on a checkpoint, the baseline for benches/cpu_forward.rs.

Loads the decoder of an HF folder (AutoModel: no head) in `--dtype` (float32 or bfloat16),
runs one forward over the given ids with `--threads` threads, and prints one JSON line:
{"tokens": N, "threads": T, "seconds": best-of-reps, "tokens_per_s": ..., "last_hidden": [...]}
(`last_hidden`: the last token's hidden state in float32, so the caller can check that both
implementations computed the same thing, not just equally fast). `--batch B` splits the ids
into B equal sequences run as one batch; `--layers L` keeps the bottom L layers and drops the
final norm, so the output is the residual stream after L layers (the probe's embedding pass).

Usage: python tools/bench_torch_cpu.py --model DIR --ids 1,2,3 [--batch 1] [--layers L]
       [--dtype float32] [--threads 2] [--reps 3]
"""
import argparse
import json
import time

import torch
from transformers import AutoModel


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--ids", required=True, help="comma-separated ids")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    model = AutoModel.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).eval()
    if args.layers is not None:
        model.layers = model.layers[: args.layers]
        model.norm = torch.nn.Identity()
    ids = torch.tensor([int(i) for i in args.ids.split(",")]).reshape(args.batch, -1)
    best = float("inf")
    with torch.inference_mode():
        model(ids)  # warm-up: first-call allocations and kernel selection
        for _ in range(args.reps):
            start = time.perf_counter()
            out = model(ids).last_hidden_state
            best = min(best, time.perf_counter() - start)
    print(json.dumps({
        "tokens": ids.numel(),
        "threads": args.threads,
        "dtype": args.dtype,
        "attn_implementation": model.config._attn_implementation,
        "seconds": best,
        "tokens_per_s": ids.numel() / best,
        "last_hidden": out[-1, -1].float().tolist(),
    }))


if __name__ == "__main__":
    main()
