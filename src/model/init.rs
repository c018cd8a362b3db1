//! `verdict init`: random checkpoints with real shapes, for tests and benchmarks that need
//! full-size models but no trained weights.
//!
//! Writes an HF folder (config.json + model.safetensors) that transformers loads as
//! `*ForSequenceClassification` with 3 labels, the classifier this project trains. Values
//! are uniform with standard deviation 0.02 (transformers' `initializer_range`), norm
//! weights near their neutral value, drawn from a seeded generator per 64k-element chunk so
//! they are identical whatever the thread count. The folder appears atomically: everything
//! is written to a temporary sibling folder that is then renamed.

use crate::model::config::{Family, HeadKind, ModelSpec};
use crate::model::weights::{write_safetensors, write_safetensors_shapes, Dtype, TensorSpec};
use crate::rng::Rng;
use anyhow::{bail, ensure, Context, Result};
use rayon::prelude::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// Shape of a preset.
struct Shape {
    vocab: usize,
    hidden: usize,
    intermediate: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    sliding_window: usize,
}

/// The presets each family offers, for help texts: (family, preset, what it is).
pub const PRESETS: &[(&str, &str, &str)] = &[
    (
        "gemma2",
        "tiny",
        "2 layers, hidden 64, head_dim 32 != hidden/heads, window 8",
    ),
    (
        "gemma2",
        "2b",
        "Gemma2-2B: 26 layers, hidden 2304, 8 heads / 4 KV, head_dim 256, vocab 256000",
    ),
    (
        "gemma2",
        "9b",
        "Gemma2-9B: 42 layers, hidden 3584, 16 heads / 8 KV, head_dim 256, vocab 256000",
    ),
    (
        "gemma3",
        "tiny",
        "6 layers (layer 5 global), hidden 64, head_dim 32, window 8",
    ),
    (
        "gemma3",
        "270m",
        "Gemma 3 270M: 18 layers, hidden 640, 4 heads / 1 KV, head_dim 256, vocab 262144",
    ),
    ("llama", "tiny", "2 layers, hidden 64, 4 heads / 2 KV"),
    (
        "llama",
        "135m",
        "SmolLM2-135M: 30 layers, hidden 576, 9 heads / 3 KV, head_dim 64, vocab 49152",
    ),
];

/// The config.json of `family`'s `preset`.
pub fn preset_config(family: Family, preset: &str, dtype: Dtype) -> Result<Value> {
    let shape =
        |vocab, hidden, intermediate, layers, heads, kv_heads, head_dim, sliding_window| Shape {
            vocab,
            hidden,
            intermediate,
            layers,
            heads,
            kv_heads,
            head_dim,
            sliding_window,
        };
    let (s, mut config) = match (family, preset) {
        (Family::Gemma2, "tiny") => gemma2(shape(256, 64, 128, 2, 4, 2, 32, 8)),
        (Family::Gemma2, "2b") => gemma2(shape(256_000, 2304, 9216, 26, 8, 4, 256, 4096)),
        (Family::Gemma2, "9b") => gemma2(shape(256_000, 3584, 14336, 42, 16, 8, 256, 4096)),
        (Family::Gemma3, "tiny") => gemma3(shape(256, 64, 128, 6, 4, 1, 32, 8)),
        (Family::Gemma3, "270m") => gemma3(shape(262_144, 640, 2048, 18, 4, 1, 256, 512)),
        (Family::Llama, "tiny") => llama(shape(256, 64, 128, 2, 4, 2, 16, 0), 10_000.0),
        (Family::Llama, "135m") => llama(shape(49_152, 576, 1536, 30, 9, 3, 64, 0), 100_000.0),
        _ => {
            let known: Vec<&str> = PRESETS
                .iter()
                .filter(|p| p.0.parse::<Family>().ok() == Some(family))
                .map(|p| p.1)
                .collect();
            bail!(
                "no preset {preset:?} for {family:?}; available: {}",
                known.join(", ")
            )
        }
    };
    let shared = json!({
        "vocab_size": s.vocab,
        "hidden_size": s.hidden,
        "intermediate_size": s.intermediate,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "head_dim": s.head_dim,
        "attention_bias": false,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "id2label": {"0": "winner_model_a", "1": "winner_model_b", "2": "winner_tie"},
        "label2id": {"winner_model_a": 0, "winner_model_b": 1, "winner_tie": 2},
        "dtype": dtype.torch_name(),
        "use_cache": true,
    });
    config
        .as_object_mut()
        .expect("object")
        .extend(shared.as_object().expect("object").clone());
    Ok(config)
}

/// `layer_types` of `layers` layers: "full_attention" where `full` says so, else
/// "sliding_attention".
fn layer_types(layers: usize, full: impl Fn(usize) -> bool) -> Vec<&'static str> {
    (0..layers)
        .map(|i| {
            if full(i) {
                "full_attention"
            } else {
                "sliding_attention"
            }
        })
        .collect()
}

/// Gemma 2 as google/gemma-2-* config.json has it, as a classifier.
fn gemma2(s: Shape) -> (Shape, Value) {
    let layer_types = layer_types(s.layers, |i| i % 2 == 1);
    let config = json!({
        "architectures": ["Gemma2ForSequenceClassification"],
        "model_type": "gemma2",
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "query_pre_attn_scalar": 256,
        "sliding_window": s.sliding_window,
        "layer_types": layer_types,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
        "tie_word_embeddings": true,
        "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
    });
    (s, config)
}

/// Gemma 3 text as google/gemma-3-270m config.json has it, as a classifier.
fn gemma3(s: Shape) -> (Shape, Value) {
    let layer_types = layer_types(s.layers, |i| (i + 1) % 6 == 0);
    let config = json!({
        "architectures": ["Gemma3TextForSequenceClassification"],
        "model_type": "gemma3_text",
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10000.0,
        "rope_scaling": null,
        "query_pre_attn_scalar": 256,
        "sliding_window": s.sliding_window,
        "layer_types": layer_types,
        "attn_logit_softcapping": null,
        "final_logit_softcapping": null,
        "use_bidirectional_attention": false,
        "tie_word_embeddings": true,
        "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
    });
    (s, config)
}

/// LLaMA as HuggingFaceTB/SmolLM2-135M-Instruct config.json has it, as a classifier.
fn llama(s: Shape, rope_theta: f64) -> (Shape, Value) {
    let config = json!({
        "architectures": ["LlamaForSequenceClassification"],
        "model_type": "llama",
        "hidden_act": "silu",
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": rope_theta,
        "rope_scaling": null,
        "mlp_bias": false,
        "tie_word_embeddings": true,
        "pad_token_id": 2, "eos_token_id": 2, "bos_token_id": 1,
    });
    (s, config)
}

/// Every tensor a checkpoint of `spec` holds, with its shape, in the names `Model::load`
/// takes (the round-trip test keeps the two in step).
pub fn checkpoint_tensors(spec: &ModelSpec) -> Vec<(String, Vec<usize>)> {
    let d = &spec.decoder;
    let (h, q, kv, ff) = (
        d.hidden_size,
        d.num_heads * d.head_dim,
        d.num_kv_heads * d.head_dim,
        d.intermediate_size,
    );
    let mut t = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![d.vocab_size, h],
    )];
    for i in 0..d.layers.len() {
        let p = format!("model.layers.{i}");
        let mut norms = vec!["input_layernorm", "post_attention_layernorm"];
        if d.sandwich_norms {
            norms.extend(["pre_feedforward_layernorm", "post_feedforward_layernorm"]);
        }
        t.extend(norms.iter().map(|n| (format!("{p}.{n}.weight"), vec![h])));
        if d.qk_norm {
            t.extend(
                ["q_norm", "k_norm"]
                    .iter()
                    .map(|n| (format!("{p}.self_attn.{n}.weight"), vec![d.head_dim])),
            );
        }
        for (name, out, inp) in [
            ("self_attn.q_proj", q, h),
            ("self_attn.k_proj", kv, h),
            ("self_attn.v_proj", kv, h),
            ("self_attn.o_proj", h, q),
            ("mlp.gate_proj", ff, h),
            ("mlp.up_proj", ff, h),
            ("mlp.down_proj", h, ff),
        ] {
            t.push((format!("{p}.{name}.weight"), vec![out, inp]));
        }
    }
    t.push(("model.norm.weight".to_string(), vec![h]));
    match spec.head {
        HeadKind::SequenceClassification { num_labels } => {
            t.push(("score.weight".to_string(), vec![num_labels, h]))
        }
        HeadKind::CausalLm { .. } if !spec.tie_word_embeddings => {
            t.push(("lm_head.weight".to_string(), vec![d.vocab_size, h]))
        }
        HeadKind::CausalLm { .. } => {}
    }
    t
}

/// `verdict init`'s flags.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// gemma2, gemma3 or llama.
    #[arg(long)]
    arch: Family,
    /// Size preset, e.g. tiny, 2b, 9b (gemma2); tiny, 270m (gemma3); tiny, 135m (llama).
    #[arg(long)]
    preset: String,
    /// Output folder (must not exist): config.json, model.safetensors and a byte-level
    /// tokenizer.json.
    #[arg(long)]
    out: PathBuf,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Weight dtype: f32, f16 or bf16.
    #[arg(long, default_value = "bf16")]
    dtype: Dtype,
    /// Shapes without values: the safetensors header is real, the data region a hole of the
    /// right length (a sparse file: a 9B checkpoint takes no disk and no time), marked in
    /// `__metadata__` so that only an allocation-only emulated device loads it (memory plans:
    /// `verdict train --device emu --emu-alloc-only`); anything else refuses it.
    #[arg(long)]
    no_values: bool,
}

/// `verdict init`.
pub fn run(args: &Args) -> Result<()> {
    crate::atomic::check_output("--out", &args.out, true)?;
    let values = if args.no_values {
        Values::None
    } else {
        Values::Random(args.seed)
    };
    write_checkpoint(args.arch, &args.preset, values, &args.out, args.dtype)?;
    println!(
        "wrote {} {} {} checkpoint -> {}",
        if args.no_values {
            "a shapes-only (--no-values)"
        } else {
            "a random"
        },
        args.arch,
        args.preset,
        args.out.display()
    );
    Ok(())
}

/// What a written checkpoint's tensors hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Values {
    /// Random values from this seed (see [`init_checkpoint`]).
    Random(u64),
    /// None: a shapes-only file (see `weights::NO_VALUES_KEY`).
    None,
}

/// Writes a random checkpoint of `family`'s `preset` to `out_dir` (which must not exist),
/// stored as `dtype`, reproducible from `seed`.
pub fn init_checkpoint(
    family: Family,
    preset: &str,
    seed: u64,
    out_dir: &Path,
    dtype: Dtype,
) -> Result<()> {
    write_checkpoint(family, preset, Values::Random(seed), out_dir, dtype)
}

/// [`init_checkpoint`] with the values `values` says, plus a byte-level tokenizer.json (so
/// `verdict train` runs on the folder as it is; tests that need another tokenizer overwrite
/// it).
pub fn write_checkpoint(
    family: Family,
    preset: &str,
    values: Values,
    out_dir: &Path,
    dtype: Dtype,
) -> Result<()> {
    ensure!(
        !out_dir.exists(),
        "{} already exists; refusing to overwrite it",
        out_dir.display()
    );
    let config = preset_config(family, preset, dtype)?;
    let spec =
        ModelSpec::from_hf(&serde_json::from_value(config.clone())?).context("preset config")?;
    let name = out_dir
        .file_name()
        .context("output folder has no name")?
        .to_string_lossy();
    let tmp = out_dir.with_file_name(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| {
        std::fs::create_dir_all(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        crate::atomic::write_json(&tmp.join("config.json"), &config)?;
        let tensors = checkpoint_tensors(&spec);
        let specs: Vec<TensorSpec> = tensors
            .iter()
            .map(|(n, s)| TensorSpec {
                name: n.clone(),
                dtype,
                shape: s.clone(),
            })
            .collect();
        // The byte-level tokenizer: ids < 259, within every preset's vocabulary.
        crate::atomic::write_json(
            &tmp.join("tokenizer.json"),
            &crate::data::format::byte_level_tokenizer_json(),
        )?;
        let one_plus = spec.decoder.norm_style == crate::backend::NormStyle::OnePlusWeight;
        let file = tmp.join("model.safetensors");
        match values {
            Values::None => write_safetensors_shapes(&file, &specs)?,
            Values::Random(seed) => write_safetensors(&file, &specs, |i| {
                let shape = &tensors[i].1;
                // Norm weights act as w (LLaMA) or 1 + w (Gemma): keep the gain near one.
                let offset = if shape.len() == 1 && !one_plus {
                    1.0
                } else {
                    0.0
                };
                random_values(seed, i as u64, shape.iter().product(), offset)
            })?,
        }
        std::fs::rename(&tmp, out_dir)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), out_dir.display()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// `n` values `offset + U(-a, a)` with standard deviation 0.02, from stream (`seed`, `tensor`).
fn random_values(seed: u64, tensor: u64, n: usize, offset: f32) -> Vec<f32> {
    const CHUNK: usize = 1 << 16;
    let half_width = 0.02 * 3f64.sqrt();
    let mut values = vec![0.0f32; n];
    values
        .par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(chunk, out)| {
            let mut rng = Rng::new(seed ^ (tensor << 40) ^ chunk as u64);
            for v in out {
                *v = offset + ((rng.uniform() * 2.0 - 1.0) * half_width) as f32;
            }
        });
    values
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::Cpu;
    use crate::model::{Model, PackedBatch};
    use crate::quant::Quant;

    #[test]
    fn every_tiny_preset_loads_and_classifies() {
        let dir = tempfile::tempdir().unwrap();
        for family in [Family::Gemma2, Family::Gemma3, Family::Llama] {
            let out = dir.path().join(format!("{family:?}"));
            init_checkpoint(family, "tiny", 7, &out, Dtype::BF16).unwrap();
            let model = Model::load(&Cpu, &out, None, Quant::None).unwrap();
            let result = model.classify(&Cpu, &PackedBatch::new(&[vec![1u32, 5, 9, 3]]));
            let logits = &result.logits.unwrap()[0];
            assert_eq!(logits.len(), 3);
            assert!(
                logits.iter().all(|v| v.is_finite() && *v != 0.0),
                "{family:?}: {logits:?}"
            );
            assert!(
                init_checkpoint(family, "tiny", 7, &out, Dtype::BF16).is_err(),
                "must not overwrite"
            );
        }
    }

    #[test]
    fn real_presets_have_the_published_shapes() {
        let spec = |f, p| {
            ModelSpec::from_hf(
                &serde_json::from_value(preset_config(f, p, Dtype::BF16).unwrap()).unwrap(),
            )
            .unwrap()
        };
        for (family, preset, published) in [
            (Family::Gemma2, "2b", (26, 2304, 9216, 8, 4, 256)),
            (Family::Gemma2, "9b", (42, 3584, 14336, 16, 8, 256)),
            (Family::Llama, "135m", (30, 576, 1536, 9, 3, 64)),
        ] {
            let d = spec(family, preset).decoder;
            let shape = (
                d.layers.len(),
                d.hidden_size,
                d.intermediate_size,
                d.num_heads,
                d.num_kv_heads,
                d.head_dim,
            );
            assert_eq!(shape, published, "{family:?} {preset}");
        }
        let g3 = spec(Family::Gemma3, "270m").decoder;
        assert_eq!(g3.layers.iter().filter(|l| l.window.is_none()).count(), 3);
    }
}
