#!/usr/bin/env python3
"""transformers' outputs on the real checkpoints, for tests/real_models.rs.

Place in the data flow: tools/fetch-models.sh builds the HF folders; this script runs
transformers on them once and writes tests/fixtures/real/<folder>.json, which the Rust
test compares verdict against (so the test itself needs no Python).

For each folder: a fixed English text (TEXT below, written for this test, ~270 tokens,
with digits so SmolLM2's one-digit-per-token rule is exercised) is tokenized with the
folder's tokenizer.json through transformers' AutoTokenizer with its default special
tokens (SmolLM2 adds none; Gemma 3 prepends <bos>). The bf16 weights are loaded upcast to
float32 (dtype=torch.float32), attn_implementation="eager", one sequence, no mask. Recorded:
  ids            the token ids
  mean_nll       mean next-token cross-entropy, -log softmax(logits[t])[ids[t+1]] over
                 t = 0 .. n-2, computed in float32 from the LM logits
  last_hidden    final-norm hidden state at the last token (outputs.hidden_states[-1])
  last_logits_top20  the 20 largest LM logits at the last position: ids and values
  model_safetensors_sha256  which weights these numbers belong to

Usage: /work/venv/bin/python tools/real_model_reference.py \
           [--models DIR] [--out tests/fixtures/real] [smollm2-135m-instruct gemma3-270m]
DIR defaults to ${VERDICT_MODELS:-~/.cache/verdict/models}. Versions used for the committed
fixtures: transformers 5.23.0, torch 2.15.0 (recorded in each file).
"""
import argparse
import hashlib
import json
import os

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

TEXT = (
    "The old lighthouse stood at the end of a narrow spit of land, where the river met the sea. "
    "For more than 120 years its lamp had turned every night, warning ships away from the sandbanks "
    "that shifted with each storm. The keeper, a patient woman named Ada, kept a logbook in which she "
    "wrote the weather, the passing vessels and, now and then, a short thought of her own.\n\n"
    "One winter evening in 1987 the wind rose so quickly that the gulls flew inland before dark. Ada "
    "climbed the 93 steps to the lantern room, trimmed the wick and wound the clockwork that turned the "
    "great lens. Far out on the water she saw the lights of a small fishing boat struggling against the "
    "waves. She could not leave the tower, but she could make sure the light never failed. All night she "
    "watched, refilling the oil and wiping the salt from the glass. At dawn the boat came slowly into the "
    "harbour, its crew tired but safe, and Ada wrote a single line in her book: \"Wind from the north-east, "
    "heavy sea, all lamps burning.\""
)

# folder -> whether its tokenizer must prepend BOS (checked, so a tokenizer change is caught here).
MODELS = {"smollm2-135m-instruct": False, "gemma3-270m": True}


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def reference(folder, adds_bos):
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(TEXT)["input_ids"]
    if (ids[0] == tokenizer.bos_token_id) != adds_bos:
        raise SystemExit(f"{folder}: expected BOS prepended = {adds_bos}, got ids[0] = {ids[0]}")
    if tokenizer.decode(ids, skip_special_tokens=True) != TEXT:
        raise SystemExit(f"{folder}: the tokenizer does not round-trip the text")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_hidden_states=True)
    logits = out.logits[0].float()
    nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="mean")
    top = torch.topk(logits[-1], 20)
    return {
        "model": os.path.basename(folder.rstrip("/")),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__.split("+")[0],
        "model_safetensors_sha256": sha256(os.path.join(folder, "model.safetensors")),
        "load": "bf16 safetensors upcast to float32, attn_implementation=eager, batch of 1, no mask",
        "text": TEXT,
        "ids": ids,
        "mean_nll": nll.item(),
        "last_hidden": out.hidden_states[-1][0, -1].tolist(),
        "last_logits_top20": {"ids": top.indices.tolist(), "values": top.values.tolist()},
    }


def main():
    default_models = os.environ.get("VERDICT_MODELS") or os.path.expanduser("~/.cache/verdict/models")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=default_models, help="folder holding the converted checkpoints")
    ap.add_argument("--out", default="tests/fixtures/real", help="where to write <folder>.json")
    ap.add_argument("names", nargs="*", default=list(MODELS), help="checkpoint folders (default: all)")
    args = ap.parse_args()
    torch.manual_seed(0)
    os.makedirs(args.out, exist_ok=True)
    for name in args.names:
        result = reference(os.path.join(args.models, name), MODELS[name])
        path = os.path.join(args.out, f"{name}.json")
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
        print(f"{path}: {len(result['ids'])} tokens, mean NLL {result['mean_nll']:.4f}")


if __name__ == "__main__":
    main()
