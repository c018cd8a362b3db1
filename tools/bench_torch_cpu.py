#!/usr/bin/env python3
"""CPU forward speed of transformers on a checkpoint, the baseline for benches/cpu_forward.rs.

Loads the decoder of an HF folder (AutoModel: no head) in float32, runs one forward over
`--tokens` random-but-seeded ids with `--threads` threads, and prints one JSON line:
{"tokens": N, "threads": T, "seconds": best-of-reps, "tokens_per_s": ..., "last_hidden": [...]}
(`last_hidden`: final-norm hidden state of the last token, so the caller can check that both
implementations computed the same thing, not just equally fast).

Usage: python tools/bench_torch_cpu.py --model DIR [--tokens 512] [--threads 2] [--reps 3]
"""
import argparse
import json
import time

import torch
from transformers import AutoModel


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--ids", help="comma-separated ids (default: seeded random)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    model = AutoModel.from_pretrained(args.model, dtype=torch.float32).eval()
    if args.ids:
        ids = torch.tensor([[int(i) for i in args.ids.split(",")]])
    else:
        ids = torch.randint(0, model.config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    best = float("inf")
    with torch.inference_mode():
        model(ids)  # warm-up: first-call allocations and kernel selection
        for _ in range(args.reps):
            start = time.perf_counter()
            out = model(ids).last_hidden_state
            best = min(best, time.perf_counter() - start)
    print(json.dumps({
        "tokens": ids.shape[1],
        "threads": args.threads,
        "attn_implementation": model.config._attn_implementation,
        "seconds": best,
        "tokens_per_s": ids.shape[1] / best,
        "last_hidden": out[0, -1].tolist(),
    }))


if __name__ == "__main__":
    main()
