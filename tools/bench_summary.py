#!/usr/bin/env python3
"""`verdict bench kernels` and tools/bench_torch.py side by side (tools/gpu-check.sh, last step).

Usage: python3 tools/bench_summary.py bench-kernels.json bench-torch.json

Prints the ceilings each measured on the card, then one line per linear shape (median
microseconds of each implementation at the same label, "-" where absent), then verdict's other
ops against the copy bandwidth, then transformers inference and PEFT QLoRA training. Either
file may be missing or partial (a run that was cut short): what is there is printed.
"""
import json
import sys

# (source, variant, column header): verdict's NF4 linear as the backend runs it and each NF4
# kernel, the adapted projection (rank-16 LoRA fused), verdict's dense products on tensor
# cores and in f32, cuBLAS through verdict and through torch, bitsandbytes.
LINEAR = [("verdict", "nf4", "nf4"), ("verdict", "nf4_gemv", "gemv"), ("verdict", "nf4_mma_bf16", "mma_bf16"),
          ("verdict", "nf4_mma_f16", "mma_f16"), ("verdict", "nf4_dequant_gemm", "dequant"),
          ("verdict", "nf4_lora", "nf4_lora"), ("torch", "bnb_nf4", "bnb_nf4"), ("verdict", "gemm_mma", "gemm_mma"),
          ("verdict", "f32", "f32"), ("verdict", "cublas_bf16", "cuB_bf16"),
          ("torch", "torch_bf16", "torch_bf16"), ("verdict", "cublas_f32", "cuB_f32"), ("torch", "torch_f32", "torch_f32")]


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        print(f"({path}: {e})")
        return {}


def median(row):
    t = row.get("timing")
    return t["median_us"] if t else None


def fmt(value, digits=1):
    return "-" if value is None else f"{value:.{digits}f}"


def main():
    verdict, torch = load(sys.argv[1]), load(sys.argv[2])
    vl, tl = verdict.get("limits", {}), torch.get("limits", {})
    card = (verdict.get("device") or {}).get("name") or (torch.get("device") or {}).get("name")
    print(f"card: {card}; verdict status {verdict.get('status')}, bench_torch status {torch.get('status')}")
    print(f"copy GB/s: verdict {fmt(vl.get('copy_gbps'), 0)}, torch {fmt(tl.get('copy_gbps'), 0)}; "
          f"bf16 TFLOP/s: cuBLAS via verdict {fmt(vl.get('cublas_bf16_tflops'))}, "
          f"torch {fmt(tl.get('torch_bf16_tflops'))}; cuBLAS tf32 {fmt(vl.get('cublas_tf32_tflops'))}, "
          f"f32 {fmt(vl.get('cublas_f32_tflops'))}")
    times = {}
    for source, report in (("verdict", verdict), ("torch", torch)):
        for r in report.get("rows", []):
            times[(source, r.get("op"), r["variant"], r["label"])] = median(r)
    print("median us: " + ", ".join(f"{h} = {s} {v}" for s, v, h in LINEAR))
    for op in ("linear", "linear_backward"):
        labels = []
        for r in verdict.get("rows", []) + torch.get("rows", []):
            if r.get("op") == op and r["label"] not in labels:
                labels.append(r["label"])
        if labels:
            print(f"{op:<26}" + "".join(f"{h:>11}" for _, _, h in LINEAR))
        for label in labels:
            print(f"{label:<26}" + "".join(f"{fmt(times.get((s, op, v, label))):>11}" for s, v, _ in LINEAR))
    others = [r for r in verdict.get("rows", []) if r.get("op") not in ("linear", "linear_backward", "copy")]
    if others:
        print("verdict ops: median us, GB/s, % of copy bandwidth, TFLOP/s")
        for r in others:
            pct = r.get("of_copy_bandwidth")
            print(f"  {r['op']:<17} {r['label']:<34} {fmt(median(r)):>10} {fmt(r.get('gbps'), 0):>7} "
                  f"{fmt(pct * 100 if pct is not None else None, 0):>5}% {fmt(r.get('tflops'), 2):>7}")
    for part in ("infer", "train"):
        for r in torch.get(part, []):
            mem = r.get("peak_memory_bytes")
            rows_per_s = f", {r['rows_per_s']:.1f} rows/s" if "rows_per_s" in r else ""
            print(f"torch {part} {r['variant']} {r['rows']}x{r['tokens_per_row']}: {r['tokens_per_s']:.0f} tokens/s"
                  f"{rows_per_s}, peak {fmt(mem / 2**30 if mem else None, 2)} GiB")
    for line in torch.get("skipped", []) + torch.get("errors", []) + ([verdict["cublas_error"]] if verdict.get("cublas_error") else []):
        print(f"note: {line}")


if __name__ == "__main__":
    main()
