"""PyTorch-autograd reference for `Model::loss_and_grads` (tests/gradcheck.rs).

Loads tests/fixtures/models/gemma2_seqcls with its PEFT adapter (transformers + peft, float32,
attn_implementation="eager"), takes inputs 1..3 of its expected.json (lengths 5, 17 and 23,
the last ending with pad tokens, so pooling by id, the sliding window of 6 and the
attention soft-cap all take part), and computes

    loss = mean over the 3 sequences of cross_entropy(score logits, label)

each sequence run alone (batch of 1, no padding mask), as `verdict` packs them. It writes
the loss and the gradients of every LoRA matrix of layer 0 and of the last layer, and of the
score head (`modules_to_save`), keyed by PEFT's parameter names without the adapter name
(what `Model::trainable_params` calls them), as float32 values rounded to 7 significant
digits (far below the test's 1e-4 tolerance).

Usage:  /work/venv/bin/python tools/make_grad_fixture.py
        (writes tests/fixtures/grad/gemma2_seqcls.json; deterministic, no randomness)
Versions: tools/requirements-fixtures.txt (torch 2.15, transformers 5.23, peft 0.21.2).
"""

import json
from pathlib import Path

import peft
import torch
import transformers

ROOT = Path(__file__).resolve().parent.parent
CASE = ROOT / "tests/fixtures/models/gemma2_seqcls"
OUT = ROOT / "tests/fixtures/grad/gemma2_seqcls.json"
LABELS = [0, 2, 1]


def main():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    expected = json.loads((CASE / "expected.json").read_text())
    inputs = [x["ids"] for x in expected["inputs"][1:4]]
    base = transformers.AutoModelForSequenceClassification.from_pretrained(
        CASE, dtype=torch.float32, attn_implementation="eager"
    )
    model = peft.PeftModel.from_pretrained(base, CASE / "adapter", is_trainable=True)
    model.eval()  # lora_dropout is 0 in this adapter; eval only fixes every other module
    losses = []
    for ids, label in zip(inputs, LABELS):
        logits = model(input_ids=torch.tensor([ids])).logits
        losses.append(torch.nn.functional.cross_entropy(logits, torch.tensor([label])))
    loss = torch.stack(losses).mean()
    loss.backward()

    last = base.config.num_hidden_layers - 1
    grads = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = name.replace(".default", "").replace("modules_to_save.", "")
        keep = key == "base_model.model.score.weight" or any(
            f"layers.{i}." in key for i in (0, last)
        )
        if keep:
            assert p.grad is not None, name
            grads[key] = {
                "shape": list(p.shape),
                "values": [float(f"{v:.7g}") for v in p.grad.flatten().tolist()],
            }
    assert "base_model.model.score.weight" in grads, sorted(grads)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    # One line per gradient keeps the file small and its diffs readable.
    lines = [f' {json.dumps(k)}: {json.dumps(v, separators=(",", ":"))}' for k, v in grads.items()]
    head = {"case": "gemma2_seqcls", "inputs": inputs, "labels": LABELS, "loss": loss.item()}
    OUT.write_text(json.dumps(head)[:-1] + ', "grads": {\n' + ",\n".join(lines) + "\n}}\n")
    print(f"loss {loss.item():.6f}; {len(grads)} gradients -> {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
