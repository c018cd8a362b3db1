#!/usr/bin/env python3
"""Checks that a `verdict train` run folder is a PEFT adapter transformers + PEFT load exactly.

Usage: check_peft_adapter.py RUN MODEL_DIR IDS.jsonl [--compare VERDICT_LOGITS.jsonl]

Loads MODEL_DIR with AutoModelForSequenceClassification (3 labels, f32, eager attention),
applies RUN with PeftModel.from_pretrained, and asserts:
  - the base loads with no missing keys except `score.weight` (a causal checkpoint gets a
    new head, which the adapter's saved `score` replaces) and no unexpected keys except
    `lm_head.weight` (unused by a classifier);
  - every tensor of adapter_model.safetensors lands in a parameter of the PEFT model with
    exactly its values, and every LoRA / modules_to_save parameter of the model came from
    the file (PEFT itself only warns about missing LoRA keys and never about a missing
    saved `score`);
then prints {"logits": [...]} per line of IDS.jsonl (one {"ids": [...]} per line), the
format `verdict logits --model MODEL_DIR --adapter RUN --ids IDS.jsonl` prints. With
--compare it reads verdict's output and prints the max abs difference to stderr, exiting 1
above --tolerance (default 1e-3).

Tested with torch 2.x, transformers 5.23, peft 0.21.2 (/work/venv).
"""

import argparse
import json
import os
import sys
import warnings

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification


def peft_param_name(key):
    """PEFT's in-model name of a saved adapter key (adapter name `default` put back)."""
    for part in (".lora_A.weight", ".lora_B.weight"):
        if key.endswith(part):
            return key[: -len(".weight")] + ".default.weight"
    module, _, leaf = key.rpartition(".")
    return f"{module}.modules_to_save.default.{leaf}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("model_dir")
    parser.add_argument("ids")
    parser.add_argument("--compare", help="verdict logits output to compare with")
    parser.add_argument("--tolerance", type=float, default=1e-3)
    args = parser.parse_args()
    torch.manual_seed(0)

    base, info = AutoModelForSequenceClassification.from_pretrained(
        args.model_dir,
        num_labels=3,
        dtype=torch.float32,
        attn_implementation="eager",
        output_loading_info=True,
    )
    missing = set(info["missing_keys"]) - {"score.weight"}
    unexpected = set(info["unexpected_keys"]) - {"lm_head.weight"}
    assert not missing and not unexpected, f"base: missing {missing}, unexpected {unexpected}"

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, args.run)
    for w in caught:
        assert "missing adapter keys" not in str(w.message), str(w.message)
    model.eval()

    saved = load_file(os.path.join(args.run, "adapter_model.safetensors"))
    params = dict(model.named_parameters())
    for key, value in saved.items():
        name = peft_param_name(key)
        assert name in params, f"adapter tensor {key}: no parameter {name} in the PEFT model"
        assert torch.equal(params[name].detach(), value), f"{key} did not load exactly"
    expected = {peft_param_name(k) for k in saved}
    adapted = {n for n in params if "lora_" in n or ".modules_to_save." in n}
    assert adapted <= expected, f"parameters not in the file: {sorted(adapted - expected)[:8]}"
    print(f"ok: {len(saved)} adapter tensors loaded exactly; base keys as expected", file=sys.stderr)

    rows = []
    with open(args.ids) as f:
        for line in f:
            if line.strip():
                ids = json.loads(line)["ids"]
                with torch.no_grad():
                    logits = model(input_ids=torch.tensor([ids])).logits[0]
                rows.append(logits.tolist())
                print(json.dumps({"logits": rows[-1]}))

    if args.compare:
        with open(args.compare) as f:
            ours = [json.loads(l)["logits"] for l in f if l.strip()]
        assert len(ours) == len(rows), f"{len(ours)} verdict rows, {len(rows)} transformers rows"
        diff = max(abs(a - b) for r, o in zip(rows, ours) for a, b in zip(r, o))
        print(f"max abs logit difference vs verdict: {diff:.3e} over {len(rows)} rows", file=sys.stderr)
        if diff > args.tolerance:
            sys.exit(1)


if __name__ == "__main__":
    main()
