"""Build tiny random Hugging Face checkpoints and the exact transformers outputs on them.

The Rust tests load each folder under tests/fixtures/models/<case>/ the way a user's
checkpoint would be loaded and compare against expected.json at <= 1e-3 absolute. Every
expected value is computed by transformers itself in float32 with
attn_implementation="eager", one sequence at a time (batch of 1, no padding, no
attention mask).

Usage:  /work/venv/bin/python tools/make_fixtures.py --out tests/fixtures/models
Versions: tools/requirements-fixtures.txt. The script is deterministic (one seeded
torch.Generator per case, every parameter re-initialised explicitly) and rewrites each
case folder from scratch.

Why weights are re-initialised: with the default init (std 0.02) attention logits are
tiny, soft-capping never bites and (1+w) norms are all ones, so a wrong implementation
would still match. Here q/k projections are large (attention logits of several units),
norm weights are random (Gemma's stored w is N(0, 0.3) so 1+w varies; LLaMA's w is
1 + N(0, 0.3)), LoRA B is non-zero and the score head is non-zero. For every feature the
script recomputes with that feature turned off (or mishandled), asserts that the compared
output moves by more than 1e-2, and records the move in expected.json "feature_deltas":
each delta is "how much the compared output would change if this feature were ignored or
done the usual wrong way" (max abs over the inputs of the pooled hidden state, unless the
name says logits / lm_logits / nll).

Cases
-----
gemma2_seqcls  (Gemma2ForSequenceClassification, architectures ["Gemma2ForSequenceClassification"])
    3 layers, hidden 64, 4 heads, 2 KV heads (GQA), head_dim 32 (!= 64/4),
    query_pre_attn_scalar 24 (!= head_dim), sliding_window 6 on layers 0 and 2
    (layer_types in config.json), attn_logit_softcapping 3.0, final_logit_softcapping 30
    (must NOT touch the score head), pad_token_id 0, intermediate 96, vocab 512, f32.
    The last input ends with 3 pad tokens (pooling by id). adapter/: PEFT LoRA r 4,
    lora_alpha 8 (scale 2), all 7 projections, random non-zero A and B,
    modules_to_save ["score"] with a different score matrix.
gemma2_causal_bf16_sharded  (Gemma2ForCausalLM)
    Tied embeddings (no lm_head.weight in the files), weights stored as bfloat16 in
    several shards (model-0000k-of-0000n.safetensors + model.safetensors.index.json).
    attn soft-cap 3.0, final_logit_softcapping 5.0 (small so it bites on the LM logits),
    window 6. Expected values come from the bf16 weights upcast to f32 at load
    (dtype=float32), so only the bf16 -> f32 conversion and sharding are under test.
gemma3_causal  (Gemma3ForCausalLM, model_type "gemma3_text")
    7 layers: layer_types written by transformers are sliding x5, full (layer 5),
    sliding, i.e. (i+1) % 6 == 0 is global. sliding_window 6. RoPE theta 1e4 on
    sliding layers and 1e6 on the full layer: transformers 5 writes both inside
    "rope_parameters" keyed by layer type (no rope_theta / rope_local_base_freq keys).
    QK-norm with random (1+w) weights over head_dim, hidden 48, 4 heads, 2 KV heads,
    head_dim 16 (!= 12), query_pre_attn_scalar 20. No soft-capping (Gemma 3 attention
    never soft-caps; both caps are null in config.json). Tied embeddings.
gemma3_seqcls  (Gemma3TextForSequenceClassification, model_type "gemma3_text",
    architectures ["Gemma3TextForSequenceClassification"]; this is the class
    AutoModelForSequenceClassification picks for gemma3_text. Gemma3ForSequenceClassification
    is the multimodal one with a Gemma3Config.) Same shape family as gemma3_causal,
    6 layers (layer 5 global), pad 0, last input ends with pad tokens.
llama_seqcls  (LlamaForSequenceClassification)
    hidden 48, 4 heads, 2 KV heads, head_dim 16 (!= 12, "head_dim" key), rope_theta 1e4
    with llama3 scaling (factor 8, low_freq_factor 1, high_freq_factor 4,
    original_max_position_embeddings 32): with head_dim 16 the 8 frequencies fall in
    all three llama3 bands (kept, smoothed, divided by 8). tie_word_embeddings true,
    pad_token_id 2, last input ends with pad tokens. adapter/: rsLoRA (use_rslora, r 4,
    alpha 8 -> scale 8/sqrt(4) = 4), targets q_proj, v_proj, gate_proj, down_proj only,
    modules_to_save ["score"].
llama_causal  (LlamaForCausalLM)
    Plain default RoPE (theta 1e4), untied lm_head, GQA, head_dim 16.

Inputs: 4 sequences of lengths 1, 5, 17, 23 with ids in [1, 512) avoiding pad_token_id;
for sequence-classification cases the 23-long one ends with 3 pad tokens. transformers
5.23 (GenericForSequenceClassification) pools at
    argmax_t( t * (ids[t] != pad_token_id) )
i.e. the rightmost position whose id is not the pad id (0 when every id is pad); the
attention mask plays no part. Causal cases use the last position.

expected.json fields: case, architecture, transformers_version, torch_version,
pad_token_id, inputs [{ids}], pooled_index, hidden (outputs.hidden_states[-1] i.e. after
the final norm, at pooled_index), logits (score, seq-cls only), lm_nll (causal: mean
next-token cross-entropy over the sequence from HF's LM logits incl. final soft-cap, null
for length 1), lm_last_logits (causal: LM logits at the last position), adapter (same
fields with PeftModel.from_pretrained(base, "adapter"), unmerged), feature_deltas.
layer0.json: for input 2 (length 17), the scaled embeddings (input of layer 0) and the
output of layer 0 at every position: {input_index, ids, embed, layer0_out}.
config.legacy.json (gemma2_seqcls, gemma3_causal, llama_seqcls): the same config in the
transformers-4 form most Hub checkpoints still carry ("torch_dtype", top-level
"rope_theta", "rope_scaling", Gemma 3 "rope_local_base_freq" and "sliding_window_pattern",
no "layer_types"); the script checks that transformers 5 reads it to bit-identical outputs.

Other checks the script makes: float64 vs float32 outputs agree to < 1e-4 (so a 1e-3
comparison is well-conditioned); the hidden state at our pooled index times score equals
HF's pooled logits; mean NLL equals HF's own loss with labels=ids; a rerun is
byte-identical (adapter target_modules are sorted because PEFT writes a set).
"""

import argparse
import json
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import peft
import torch
import torch.nn.functional as F
import transformers
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma2ForSequenceClassification,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    Gemma3TextForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
)

VOCAB = 512
LENGTHS = (1, 5, 17, 23)
TRAILING_PADS = 3
MIN_DELTA = 1e-2
GEMMA_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def f32_list(t):
    """Tensor -> nested list of floats, 9 significant digits (enough to round-trip f32)."""
    def rounded(v):
        return [rounded(x) for x in v] if isinstance(v, list) else float(f"{v:.9g}")
    return rounded(t.detach().float().tolist())


def make_inputs(seed, pad_id, trailing_pads):
    rng = np.random.default_rng(seed)
    allowed = np.array([i for i in range(1, VOCAB) if i != pad_id])
    inputs = []
    for n in LENGTHS:
        ids = rng.choice(allowed, size=n).tolist()
        inputs.append(ids)
    if trailing_pads:
        inputs[-1] = inputs[-1][: -TRAILING_PADS] + [pad_id] * TRAILING_PADS
    return inputs


def init_weights(model, gen, family, qk_std, embed_std, score_std):
    """Re-initialise every parameter so that each feature changes the outputs."""
    for name, p in model.named_parameters():
        with torch.no_grad():
            if "norm" in name:
                w = torch.randn(p.shape, generator=gen) * 0.3
                p.copy_(w if family == "gemma" else 1.0 + w)
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * embed_std)
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                p.copy_(torch.randn(p.shape, generator=gen) * qk_std)
            elif name.startswith("score"):
                p.copy_(torch.randn(p.shape, generator=gen) * score_std)
            elif p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))
            else:
                raise ValueError(f"no init rule for {name} {tuple(p.shape)}")


def pooled_index(ids, pad_id, is_cls):
    if not is_cls or pad_id is None:
        return len(ids) - 1
    mask = [int(t != pad_id) for t in ids]
    return int(np.argmax([i * m for i, m in enumerate(mask)]))


@torch.no_grad()
def run(model, inputs, pad_id, is_cls):
    """Per-input outputs of one model (base or PEFT-wrapped): pooled hidden, logits, LM stats."""
    res = {"pooled_index": [], "hidden": [], "logits": [], "lm_nll": [], "lm_last_logits": []}
    for ids in inputs:
        x = torch.tensor([ids])
        out = model(input_ids=x, output_hidden_states=True)
        hs = out.hidden_states[-1][0]
        p = pooled_index(ids, pad_id, is_cls)
        res["pooled_index"].append(p)
        res["hidden"].append(hs[p])
        if is_cls:
            # HF pooled by itself; the hidden state taken at our index must give its logits.
            assert torch.allclose(model.score(hs[p]), out.logits[0], atol=1e-6), "pooling index disagrees with HF"
            res["logits"].append(out.logits[0])
        else:
            logits = out.logits[0]
            res["lm_last_logits"].append(logits[-1])
            if len(ids) > 1:
                nll = F.cross_entropy(logits[:-1], x[0, 1:])
                hf_loss = model(input_ids=x, labels=x).loss
                assert abs(nll.item() - hf_loss.item()) < 1e-5, (nll, hf_loss)
                res["lm_nll"].append(nll)
            else:
                res["lm_nll"].append(None)
    return res


def max_delta(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def as_json(res, is_cls):
    return {
        "hidden": [f32_list(h) for h in res["hidden"]],
        "logits": [f32_list(l) for l in res["logits"]] if is_cls else None,
        "lm_nll": None if is_cls else [None if v is None else float(f"{v.item():.9g}") for v in res["lm_nll"]],
        "lm_last_logits": None if is_cls else [f32_list(l) for l in res["lm_last_logits"]],
    }


def load(cls, folder, config=None, dtype=torch.float32):
    kw = {"config": config} if config is not None else {}
    model = cls.from_pretrained(folder, dtype=dtype, attn_implementation="eager", **kw)
    return model.eval()


def variant(cls, folder, edit):
    """The saved checkpoint reloaded with its config changed by `edit` (a feature turned off)."""
    cfg = transformers.AutoConfig.from_pretrained(folder)
    edit(cfg)
    return load(cls, folder, cfg)


class Deltas:
    """Collects feature deltas and enforces that each one bites."""

    def __init__(self, case):
        self.case = case
        self.values = {}

    def add(self, name, value):
        print(f"  {self.case:28s} {name:40s} {value:.4g}")
        assert value > MIN_DELTA, f"{self.case}: feature {name} does not bite ({value:.3g})"
        self.values[name] = float(f"{value:.6g}")


def layer0(model, ids):
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return {"input_index": 2, "ids": ids, "embed": f32_list(out.hidden_states[0][0]),
            "layer0_out": f32_list(out.hidden_states[1][0])}


def write_json(path, obj):
    path.write_text(json.dumps(obj, indent=None, separators=(",", ":")) + "\n")


def add_lora(model, gen, lora_kwargs, score_std):
    """Wrap in PEFT LoRA with random non-zero A and B and a changed score head."""
    cfg = peft.LoraConfig(task_type="SEQ_CLS", lora_dropout=0.0, modules_to_save=["score"], **lora_kwargs)
    pm = peft.get_peft_model(model, cfg)
    n_lora = 0
    for name, p in pm.named_parameters():
        with torch.no_grad():
            if "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))
                n_lora += 1
            elif "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            elif "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * score_std)
    assert n_lora > 0
    return pm


def save_adapter(pm, folder):
    pm.save_pretrained(folder)
    (folder / "README.md").unlink()  # PEFT's model card names the absolute base path; not needed
    cfg_path = folder / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = ".."  # the case folder; keeps the file machine-independent
    cfg["target_modules"] = sorted(cfg["target_modules"])  # PEFT writes a set in hash order
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def build_case(out_root, case, cls, config, seed, family, is_cls, qk_std, embed_std, score_std=0.0,
               save_dtype=torch.float32, max_shard_size=None, lora=None, deltas_fn=None, legacy=False):
    folder = out_root / case
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)

    model = cls(config).eval()
    init_weights(model, gen, family, qk_std, embed_std, score_std)
    save_kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.to(save_dtype).save_pretrained(folder, **save_kw)

    # Expected values come from the checkpoint as saved (bf16 weights upcast to f32 at load).
    base = load(cls, folder)
    assert all(p.dtype == torch.float32 for p in base.parameters())
    pad_id = config.pad_token_id
    inputs = make_inputs(seed, pad_id, TRAILING_PADS if is_cls else 0)
    res = run(base, inputs, pad_id, is_cls)

    check_conditioning(case, cls, folder, inputs, res, pad_id, is_cls)
    if legacy:
        check_legacy_config(case, cls, folder, inputs, res, pad_id, is_cls)

    deltas = Deltas(case)
    if deltas_fn is not None:
        deltas_fn(deltas, folder, inputs, res)

    expected = {
        "case": case,
        "architecture": cls.__name__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "pad_token_id": pad_id,
        "inputs": [{"ids": ids} for ids in inputs],
        "pooled_index": res["pooled_index"],
        **as_json(res, is_cls),
        "adapter": None,
        "feature_deltas": deltas.values,
    }

    write_json(folder / "layer0.json", layer0(base, inputs[2]))

    if lora is not None:
        pm = add_lora(base, gen, lora, score_std)
        save_adapter(pm, folder / "adapter")
        fresh = load(cls, folder)
        adapted = peft.PeftModel.from_pretrained(fresh, folder / "adapter").eval()
        ares = run(adapted, inputs, pad_id, is_cls)
        expected["adapter"] = as_json(ares, is_cls)
        deltas.add("lora_vs_base", max_delta(ares["hidden"], res["hidden"]))
        deltas.add("lora_vs_base_logits", max_delta(ares["logits"], res["logits"]))
        if lora.get("use_rslora"):
            plain = peft.PeftModel.from_pretrained(load(cls, folder), folder / "adapter").eval()
            for module in plain.modules():
                if isinstance(module, peft.tuners.lora.LoraLayer):
                    module.scaling["default"] = lora["lora_alpha"] / lora["r"]
            pres = run(plain, inputs, pad_id, is_cls)
            deltas.add("rslora_scale_vs_alpha_over_r", max_delta(ares["hidden"], pres["hidden"]))
        expected["feature_deltas"] = deltas.values

    write_json(folder / "expected.json", expected)
    return folder


# ---------------------------------------------------------------------------- sanity checks

def check_conditioning(case, cls, folder, inputs, res, pad_id, is_cls):
    """The same checkpoint in float64 must agree with float32 far below the tests' 1e-3."""
    r64 = run(load(cls, folder, dtype=torch.float64), inputs, pad_id, is_cls)
    keys = ["hidden", "logits"] if is_cls else ["hidden", "lm_last_logits"]
    worst = max(max_delta([t.double() for t in res[k]], r64[k]) for k in keys)
    print(f"  {case:28s} {'f32 vs f64 (conditioning)':40s} {worst:.3g}")
    assert worst < 1e-4, f"{case}: fixture is ill-conditioned for a 1e-3 comparison ({worst:.3g})"


def legacy_config(cfg):
    """config.json as transformers 4.x wrote it (the form most Hub checkpoints still have)."""
    c = dict(cfg)
    c["torch_dtype"] = c.pop("dtype")
    rope = dict(c.pop("rope_parameters"))
    if "full_attention" in rope:  # Gemma 3: one entry per layer type
        c["rope_theta"] = rope["full_attention"]["rope_theta"]
        c["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
        c["rope_scaling"] = None
        c["sliding_window_pattern"] = c.pop("_sliding_window_pattern")
    else:
        c["rope_theta"] = rope.pop("rope_theta")
        c["rope_scaling"] = rope if rope["rope_type"] != "default" else None
    c.pop("layer_types", None)  # older Gemma configs derive it from the pattern
    return c


def check_legacy_config(case, cls, folder, inputs, res, pad_id, is_cls):
    """Write config.legacy.json and check transformers reads it to the very same model."""
    cfg = json.loads((folder / "config.json").read_text())
    legacy = legacy_config(cfg)
    (folder / "config.legacy.json").write_text(json.dumps(legacy, indent=2, sort_keys=True) + "\n")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for f in folder.glob("*.safetensors*"):
            shutil.copy(f, tmp / f.name)
        (tmp / "config.json").write_text(json.dumps(legacy))
        other = run(load(cls, tmp), inputs, pad_id, is_cls)
    worst = max_delta(other["hidden"], res["hidden"])
    print(f"  {case:28s} {'legacy config vs config.json':40s} {worst:.3g}")
    assert worst == 0.0, f"{case}: legacy config reads differently"


# ---------------------------------------------------------------------------- feature checks

def hidden_delta(cls, folder, inputs, res, pad_id, is_cls, edit):
    other = run(variant(cls, folder, edit), inputs, pad_id, is_cls)
    return max_delta(other["hidden"], res["hidden"])


def set_attr(**kv):
    def edit(cfg):
        for k, v in kv.items():
            setattr(cfg, k, v)
    return edit


def gemma2_deltas(cls, is_cls):
    def fn(d, folder, inputs, res):
        pad = 0
        d.add("attn_logit_softcapping", hidden_delta(cls, folder, inputs, res, pad, is_cls,
                                                     set_attr(attn_logit_softcapping=None)))
        d.add("sliding_window", hidden_delta(cls, folder, inputs, res, pad, is_cls, set_attr(sliding_window=4096)))
        d.add("query_pre_attn_scalar_vs_head_dim",
              hidden_delta(cls, folder, inputs, res, pad, is_cls, set_attr(query_pre_attn_scalar=32)))
        if is_cls:
            capped = [30.0 * torch.tanh(l / 30.0) for l in res["logits"]]
            d.add("score_not_final_softcapped_logits", max_delta(capped, res["logits"]))
        else:
            other = run(variant(cls, folder, set_attr(final_logit_softcapping=None)), inputs, pad, False)
            d.add("final_logit_softcapping_lm_logits", max_delta(other["lm_last_logits"], res["lm_last_logits"]))
    return fn


def gemma3_deltas(cls, is_cls):
    def fn(d, folder, inputs, res):
        pad = 0

        def rope(layer_type, theta):
            def edit(cfg):
                cfg.rope_parameters[layer_type]["rope_theta"] = theta
            return edit

        def all_sliding(cfg):
            cfg.layer_types = ["sliding_attention"] * cfg.num_hidden_layers

        d.add("rope_local_base_1e4_vs_1e6", hidden_delta(cls, folder, inputs, res, pad, is_cls,
                                                         rope("sliding_attention", 1e6)))
        d.add("rope_global_base_1e6_vs_1e4", hidden_delta(cls, folder, inputs, res, pad, is_cls,
                                                          rope("full_attention", 1e4)))
        d.add("global_layer_vs_all_sliding", hidden_delta(cls, folder, inputs, res, pad, is_cls, all_sliding))
        d.add("sliding_window", hidden_delta(cls, folder, inputs, res, pad, is_cls, set_attr(sliding_window=4096)))
        d.add("query_pre_attn_scalar_vs_head_dim",
              hidden_delta(cls, folder, inputs, res, pad, is_cls, set_attr(query_pre_attn_scalar=16)))

        m = load(cls, folder)
        for layer in m.model.layers:
            layer.self_attn.q_norm.weight.data.zero_()
            layer.self_attn.k_norm.weight.data.zero_()
        d.add("qk_norm_weights", max_delta(run(m, inputs, pad, is_cls)["hidden"], res["hidden"]))
        m = load(cls, folder)
        for layer in m.model.layers:
            layer.self_attn.q_norm = torch.nn.Identity()
            layer.self_attn.k_norm = torch.nn.Identity()
        d.add("qk_norm_present", max_delta(run(m, inputs, pad, is_cls)["hidden"], res["hidden"]))
    return fn


def llama_deltas(cls, is_cls, pad):
    def fn(d, folder, inputs, res):
        if is_cls:
            def no_scaling(cfg):
                cfg.rope_parameters = {"rope_type": "default", "rope_theta": cfg.rope_parameters["rope_theta"]}
            d.add("rope_scaling_llama3", hidden_delta(cls, folder, inputs, res, pad, is_cls, no_scaling))
            m = load(cls, folder)
            with torch.no_grad():
                last = m(input_ids=torch.tensor([inputs[-1]]), output_hidden_states=True).hidden_states[-1][0, -1]
            d.add("pool_by_id_vs_last_position", (last - res["hidden"][-1]).abs().max().item())
        else:
            m = load(cls, folder)
            m.lm_head.weight = m.model.embed_tokens.weight
            other = run(m, inputs, pad, False)
            d.add("untied_lm_head_lm_logits", max_delta(other["lm_last_logits"], res["lm_last_logits"]))
    return fn


def llama3_bands(cfg):
    """Which llama3 band each RoPE frequency falls in; the fixture must hit all three."""
    rp = cfg.rope_parameters
    dim = cfg.head_dim
    inv = 1.0 / (rp["rope_theta"] ** (np.arange(0, dim, 2) / dim))
    wl = 2 * math.pi / inv
    low = rp["original_max_position_embeddings"] / rp["low_freq_factor"]
    high = rp["original_max_position_embeddings"] / rp["high_freq_factor"]
    return ["kept" if w < high else "divided" if w > low else "smoothed" for w in wl]


# ---------------------------------------------------------------------------- cases

def gemma2_config(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=24,
                sliding_window=6, attn_logit_softcapping=3.0, final_logit_softcapping=30.0,
                max_position_embeddings=256, rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=2,
                eos_token_id=1, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    base.update(kw)
    return Gemma2Config(**base)


def gemma3_config(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=7,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=20,
                sliding_window=6, max_position_embeddings=256, rms_norm_eps=1e-6, pad_token_id=0,
                bos_token_id=2, eos_token_id=1, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0)
    base.update(kw)
    return Gemma3TextConfig(**base)


def llama_config(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    base.update(kw)
    return LlamaConfig(**base)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="tests/fixtures/models", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)  # same reduction order on every machine
    out = args.out

    build_case(out, "gemma2_seqcls", Gemma2ForSequenceClassification, gemma2_config(num_labels=3),
               seed=1, family="gemma", is_cls=True, qk_std=0.25, embed_std=0.15, score_std=0.5,
               deltas_fn=gemma2_deltas(Gemma2ForSequenceClassification, True),
               lora=dict(r=4, lora_alpha=8, target_modules=GEMMA_PROJ), legacy=True)

    folder = build_case(out, "gemma2_causal_bf16_sharded", Gemma2ForCausalLM,
                        gemma2_config(num_hidden_layers=2, final_logit_softcapping=5.0, tie_word_embeddings=True),
                        seed=2, family="gemma", is_cls=False, qk_std=0.25, embed_std=0.5,
                        save_dtype=torch.bfloat16, max_shard_size="100KB",
                        deltas_fn=gemma2_deltas(Gemma2ForCausalLM, False))
    assert (folder / "model.safetensors.index.json").exists(), "bf16 case is not sharded"

    build_case(out, "gemma3_causal", Gemma3ForCausalLM, gemma3_config(tie_word_embeddings=True),
               seed=3, family="gemma", is_cls=False, qk_std=0.25, embed_std=0.5,
               deltas_fn=gemma3_deltas(Gemma3ForCausalLM, False), legacy=True)

    build_case(out, "gemma3_seqcls", Gemma3TextForSequenceClassification,
               gemma3_config(num_hidden_layers=6, num_labels=3),
               seed=4, family="gemma", is_cls=True, qk_std=0.25, embed_std=0.15, score_std=0.5,
               deltas_fn=gemma3_deltas(Gemma3TextForSequenceClassification, True))

    llama3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    cfg = llama_config(num_labels=3, pad_token_id=2, tie_word_embeddings=True, rope_parameters=llama3)
    bands = llama3_bands(cfg)
    print("  llama3 bands per frequency:", bands)
    assert {"kept", "smoothed", "divided"} <= set(bands)
    build_case(out, "llama_seqcls", LlamaForSequenceClassification, cfg,
               seed=5, family="llama", is_cls=True, qk_std=0.25, embed_std=1.0, score_std=0.5,
               deltas_fn=llama_deltas(LlamaForSequenceClassification, True, 2),
               lora=dict(r=4, lora_alpha=8, use_rslora=True,
                         target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"]), legacy=True)

    build_case(out, "llama_causal", LlamaForCausalLM, llama_config(tie_word_embeddings=False),
               seed=6, family="llama", is_cls=False, qk_std=0.25, embed_std=1.0,
               deltas_fn=llama_deltas(LlamaForCausalLM, False, None))


if __name__ == "__main__":
    main()
