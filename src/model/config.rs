//! `config.json` -> one decoder specification.
//!
//! Place in the data flow: the first thing a checkpoint load reads. [`HfConfig`] mirrors HF's
//! config.json field for field (classic keys such as `rope_theta`, `rope_scaling`,
//! `torch_dtype` and transformers-5 keys such as `rope_parameters`, `layer_types`, `dtype`),
//! so a checkpoint can be checked against it by eye. [`ModelSpec::from_hf`] applies
//! transformers' per-family defaults and turns every family difference into a field of
//! [`DecoderSpec`], so the decoder is written once. Any setting the decoder would not honour
//! exactly is an error naming the setting, never a silent approximation.

use crate::backend::{Activation, NormStyle};
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Deserializer};
use std::collections::BTreeMap;
use std::path::Path;

/// A config value that may be absent (transformers' class default applies), explicitly
/// `null`, or set. Gemma 2's `final_logit_softcapping` needs all three: absent means 30.0,
/// null means no cap.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub enum Setting<T> {
    /// Not in config.json.
    #[default]
    Absent,
    /// `null` in config.json.
    Null,
    /// A value.
    Value(T),
}

impl<T> Setting<T> {
    /// The effective value: `default` when absent, `None` when null.
    pub fn or_default(self, default: Option<T>) -> Option<T> {
        match self {
            Setting::Absent => default,
            Setting::Null => None,
            Setting::Value(v) => Some(v),
        }
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Setting<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        Ok(Option::<T>::deserialize(d)?.map_or(Setting::Null, Setting::Value))
    }
}

/// RoPE parameters as HF writes them (`rope_scaling`, `rope_parameters` or one entry of a
/// per-layer-type `rope_parameters`).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct RopeParameters {
    /// "default", "linear" or "llama3" (others are refused). Old configs say `type`.
    #[serde(alias = "type")]
    pub rope_type: Option<String>,
    /// The base wavelength.
    pub rope_theta: Option<f64>,
    /// Scaling factor (linear, llama3).
    pub factor: Option<f64>,
    /// llama3: wavelengths above `original_max_position_embeddings / low_freq_factor` are scaled fully.
    pub low_freq_factor: Option<f64>,
    /// llama3: wavelengths below `original_max_position_embeddings / high_freq_factor` are kept.
    pub high_freq_factor: Option<f64>,
    /// llama3: the pre-training context length.
    pub original_max_position_embeddings: Option<usize>,
    /// Fraction of head_dim that rotates; only 1.0 is supported.
    pub partial_rotary_factor: Option<f64>,
}

impl RopeParameters {
    /// These parameters with every field `over` sets replacing ours (Python's `dict.update`).
    fn overlaid_with(&self, over: &RopeParameters) -> RopeParameters {
        RopeParameters {
            rope_type: over.rope_type.clone().or_else(|| self.rope_type.clone()),
            rope_theta: over.rope_theta.or(self.rope_theta),
            factor: over.factor.or(self.factor),
            low_freq_factor: over.low_freq_factor.or(self.low_freq_factor),
            high_freq_factor: over.high_freq_factor.or(self.high_freq_factor),
            original_max_position_embeddings: over
                .original_max_position_embeddings
                .or(self.original_max_position_embeddings),
            partial_rotary_factor: over.partial_rotary_factor.or(self.partial_rotary_factor),
        }
    }
}

/// `rope_parameters`: one set for all layers, or one per layer type (Gemma 3 in transformers 5).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum RopeParametersField {
    /// `{"full_attention": {...}, "sliding_attention": {...}}`; a null entry means defaults.
    PerLayerType(BTreeMap<String, Option<RopeParameters>>),
    /// `{"rope_type": ..., "rope_theta": ...}`.
    Shared(RopeParameters),
}

/// config.json of a Gemma 2, Gemma 3 (text) or LLaMA checkpoint, with HF's field names.
/// Unknown fields are ignored; every field that changes the computation is read.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct HfConfig {
    /// The model class, e.g. `Gemma2ForSequenceClassification`; exactly one.
    pub architectures: Vec<String>,
    /// `gemma2`, `gemma3_text` or `llama`; checked against the architecture.
    pub model_type: Option<String>,
    /// Rows of `embed_tokens`.
    pub vocab_size: Option<usize>,
    /// Width of the residual stream.
    pub hidden_size: Option<usize>,
    /// Width of the gated MLP.
    pub intermediate_size: Option<usize>,
    /// Decoder layers.
    pub num_hidden_layers: Option<usize>,
    /// Query heads.
    pub num_attention_heads: Option<usize>,
    /// Key/value heads (GQA).
    pub num_key_value_heads: Option<usize>,
    /// Features per head; not hidden / heads in Gemma.
    pub head_dim: Option<usize>,
    /// LLaMA's activation.
    pub hidden_act: Option<String>,
    /// Gemma's activation (Gemma ignores `hidden_act`).
    pub hidden_activation: Option<String>,
    /// Default `original_max_position_embeddings` of llama3 RoPE.
    pub max_position_embeddings: Option<usize>,
    /// RMSNorm epsilon.
    pub rms_norm_eps: Option<f64>,
    /// The id sequence classification skips when pooling.
    pub pad_token_id: Setting<i64>,
    /// LM head = `embed_tokens`.
    pub tie_word_embeddings: Option<bool>,
    /// Classic key: the RoPE base (Gemma 3: of global layers).
    pub rope_theta: Option<f64>,
    /// Gemma 3 classic key: the RoPE base of sliding layers.
    pub rope_local_base_freq: Option<f64>,
    /// Classic key: RoPE scaling (Gemma 3: of global layers).
    pub rope_scaling: Option<RopeParameters>,
    /// transformers-5 key: RoPE, shared or per layer type.
    pub rope_parameters: Option<RopeParametersField>,
    /// Partial rotation; refused unless 1.
    pub partial_rotary_factor: Option<f64>,
    /// Biases on q/k/v/o; refused if true.
    pub attention_bias: Option<bool>,
    /// Biases on the MLP; refused if true.
    pub mlp_bias: Option<bool>,
    /// Gemma: attention scale is its inverse square root.
    pub query_pre_attn_scalar: Option<f64>,
    /// Window of `sliding_attention` layers.
    pub sliding_window: Setting<usize>,
    /// Gemma 3 classic key: every n-th layer is global.
    pub sliding_window_pattern: Option<usize>,
    /// The same, as transformers 5 writes it.
    #[serde(rename = "_sliding_window_pattern")]
    pub sliding_window_pattern_private: Option<usize>,
    /// transformers-5 key: `full_attention` / `sliding_attention` per layer.
    pub layer_types: Option<Vec<String>>,
    /// Gemma 2: attention score soft-cap.
    pub attn_logit_softcapping: Setting<f64>,
    /// Gemma 2: LM logit soft-cap.
    pub final_logit_softcapping: Setting<f64>,
    /// Gemma 3 embedding models; refused if true.
    pub use_bidirectional_attention: Option<bool>,
    /// Classic key of `dtype`.
    pub torch_dtype: Option<String>,
    /// The type transformers runs the checkpoint in by default.
    pub dtype: Option<String>,
    /// Classes of a classifier when `id2label` is absent.
    pub num_labels: Option<usize>,
    /// Class names; their count is the number of classes.
    pub id2label: Option<BTreeMap<String, String>>,
    /// How the checkpoint's weights are quantized; only bitsandbytes 4-bit NF4 is read.
    pub quantization_config: Option<QuantizationConfig>,
}

/// transformers' `quantization_config` (a `BitsAndBytesConfig` when `quant_method` is
/// "bitsandbytes"), the fields that decide whether verdict can read the checkpoint.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct QuantizationConfig {
    /// "bitsandbytes"; other methods (gptq, awq, ...) are refused.
    pub quant_method: Option<String>,
    /// 4-bit weights (`Linear4bit`).
    pub load_in_4bit: bool,
    /// LLM.int8 weights; refused.
    pub load_in_8bit: bool,
    /// "nf4" or "fp4"; only nf4 is supported.
    pub bnb_4bit_quant_type: Option<String>,
    /// Whether the absmax of each block is itself quantized (QLoRA's double quantization).
    pub bnb_4bit_use_double_quant: bool,
    /// The dtype transformers dequantizes to and multiplies in; verdict's CPU computes in f32.
    pub bnb_4bit_compute_dtype: Option<String>,
    /// Modules transformers left unquantized.
    pub llm_int8_skip_modules: Option<Vec<String>>,
}

/// A bitsandbytes 4-bit NF4 checkpoint's settings, as its config.json states them.
#[derive(Debug, Clone, PartialEq)]
pub struct Bnb4bit {
    /// The absmax of each block is double-quantized.
    pub double_quant: bool,
    /// `bnb_4bit_compute_dtype` (informational: the CPU always computes in f32).
    pub compute_dtype: Option<String>,
    /// `llm_int8_skip_modules`: modules stored unquantized.
    pub skip_modules: Vec<String>,
}

impl QuantizationConfig {
    /// The NF4 settings, or an error naming what verdict cannot read.
    fn bnb_4bit(&self) -> Result<Bnb4bit> {
        match self.quant_method.as_deref() {
            Some("bitsandbytes") => {}
            Some(other) => bail!(
                "quantization_config.quant_method {other:?} is not supported (only bitsandbytes 4-bit nf4)"
            ),
            None => bail!("quantization_config has no quant_method"),
        }
        ensure!(
            !self.load_in_8bit,
            "quantization_config.load_in_8bit: bitsandbytes 8-bit (LLM.int8) checkpoints are not supported (only 4-bit nf4)"
        );
        ensure!(
            self.load_in_4bit,
            "quantization_config: bitsandbytes without load_in_4bit is not supported (only 4-bit nf4)"
        );
        match self.bnb_4bit_quant_type.as_deref() {
            Some("nf4") => {}
            other => bail!(
                "quantization_config.bnb_4bit_quant_type {other:?} is not supported (only nf4; fp4 is not)"
            ),
        }
        Ok(Bnb4bit {
            double_quant: self.bnb_4bit_use_double_quant,
            compute_dtype: self.bnb_4bit_compute_dtype.clone(),
            skip_modules: self.llm_int8_skip_modules.clone().unwrap_or_default(),
        })
    }
}

impl HfConfig {
    /// Reads and parses `path` (a config.json).
    pub fn read(path: &Path) -> Result<HfConfig> {
        crate::atomic::read_json(path, "a valid config.json")
    }
}

/// The model families. The decoder never sees this: they differ only by [`DecoderSpec`] fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Gemma2,
    Gemma3,
    Llama,
}

impl std::fmt::Display for Family {
    /// The name `--arch` takes.
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(match self {
            Family::Gemma2 => "gemma2",
            Family::Gemma3 => "gemma3",
            Family::Llama => "llama",
        })
    }
}

impl std::str::FromStr for Family {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Family> {
        [Family::Gemma2, Family::Gemma3, Family::Llama]
            .into_iter()
            .find(|f| f.to_string() == s)
            .with_context(|| {
                format!("unknown architecture family {s:?} (expected gemma2, gemma3 or llama)")
            })
    }
}

/// The `architectures` entries we load: (name, family, sequence classification or causal LM).
const ARCHITECTURES: [(&str, Family, bool); 6] = [
    ("Gemma2ForSequenceClassification", Family::Gemma2, true),
    ("Gemma2ForCausalLM", Family::Gemma2, false),
    ("Gemma3TextForSequenceClassification", Family::Gemma3, true),
    ("Gemma3ForCausalLM", Family::Gemma3, false),
    ("LlamaForSequenceClassification", Family::Llama, true),
    ("LlamaForCausalLM", Family::Llama, false),
];

/// What a family's transformers config class fixes, or supplies for a key config.json leaves
/// out. [`ModelSpec::from_hf`] takes every such difference from here; only the layer pattern
/// and RoPE, whose rules differ in shape, keep their own per-family code.
struct FamilyDefaults {
    /// The `model_type` a config of this family must have, if it has one.
    model_type: &'static str,
    /// `num_key_value_heads` when absent (`None`: as many as attention heads).
    num_kv_heads: Option<usize>,
    /// `head_dim` when absent (`None`: hidden_size / heads).
    head_dim: Option<usize>,
    /// The key naming the MLP activation, the one value supported, and what it is.
    activation: (&'static str, &'static str, Activation),
    /// Reads that key (Gemma ignores `hidden_act`, LLaMA `hidden_activation`).
    activation_setting: fn(&HfConfig) -> Option<&str>,
    sliding_window: Option<usize>,
    /// Default attention and final-logit soft-caps; `None`: the class has no such keys, so
    /// transformers ignores them and so do we.
    softcaps: Option<(Option<f64>, Option<f64>)>,
    /// Gemma: scores scaled by `query_pre_attn_scalar`^-1/2 (this default); `None`: by
    /// head_dim^-1/2.
    query_pre_attn_scalar: Option<f64>,
    pad_token_id: Option<i64>,
    tie_word_embeddings: bool,
    norm_style: NormStyle,
    scale_embeddings: bool,
    sandwich_norms: bool,
    qk_norm: bool,
}

impl Family {
    /// transformers 5.23's class defaults (`Gemma2Config`, `Gemma3TextConfig`, `LlamaConfig`).
    fn defaults(self) -> FamilyDefaults {
        let gemma = |model_type, softcaps, qk_norm| FamilyDefaults {
            model_type,
            num_kv_heads: Some(4),
            head_dim: Some(256),
            activation: (
                "hidden_activation",
                "gelu_pytorch_tanh",
                Activation::GeluTanh,
            ),
            activation_setting: |c| c.hidden_activation.as_deref(),
            sliding_window: Some(4096),
            softcaps: Some(softcaps),
            query_pre_attn_scalar: Some(256.0),
            pad_token_id: Some(0),
            tie_word_embeddings: true,
            norm_style: NormStyle::OnePlusWeight,
            scale_embeddings: true,
            sandwich_norms: true,
            qk_norm,
        };
        match self {
            Family::Gemma2 => gemma("gemma2", (Some(50.0), Some(30.0)), false),
            Family::Gemma3 => gemma("gemma3_text", (None, None), true),
            Family::Llama => FamilyDefaults {
                model_type: "llama",
                num_kv_heads: None,
                head_dim: None,
                activation: ("hidden_act", "silu", Activation::Silu),
                activation_setting: |c| c.hidden_act.as_deref(),
                sliding_window: None,
                softcaps: None,
                query_pre_attn_scalar: None,
                pad_token_id: None,
                tie_word_embeddings: false,
                norm_style: NormStyle::Weight,
                scale_embeddings: false,
                sandwich_norms: false,
                qk_norm: false,
            },
        }
    }
}

/// What sits on top of the decoder.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum HeadKind {
    /// `*ForSequenceClassification`: `score.weight` [num_labels, hidden] at the pooled token.
    SequenceClassification { num_labels: usize },
    /// `*ForCausalLM`: LM head (tied or `lm_head.weight`), Gemma 2 soft-caps its logits.
    CausalLm { final_logit_softcap: Option<f32> },
}

/// RoPE frequency scaling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// `inv_freq / factor` (HF "linear").
    Linear { factor: f32 },
    /// Llama 3.x: low frequencies divided by `factor`, high kept, a smooth ramp between.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: usize,
    },
}

/// Rotary embedding of one layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeSpec {
    /// The base wavelength (`rope_theta`).
    pub theta: f32,
    /// Frequency scaling.
    pub scaling: RopeScaling,
}

impl RopeSpec {
    /// The `head_dim / 2` inverse frequencies, computed in f32 the way transformers does:
    /// `1 / theta^(2i / head_dim)`, then scaled.
    pub fn inv_freq(&self, head_dim: usize) -> Vec<f32> {
        let plain =
            (0..head_dim / 2).map(|i| 1.0 / self.theta.powf((2 * i) as f32 / head_dim as f32));
        match self.scaling {
            RopeScaling::None => plain.collect(),
            RopeScaling::Linear { factor } => plain.map(|f| f / factor).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old_context = original_max_position_embeddings as f32;
                let low_freq_wavelen = old_context / low_freq_factor;
                let high_freq_wavelen = old_context / high_freq_factor;
                plain
                    .map(|f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        if wavelen < high_freq_wavelen {
                            f
                        } else if wavelen > low_freq_wavelen {
                            f / factor
                        } else {
                            let smooth = (old_context / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }
}

/// Per-layer attention settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerSpec {
    /// Sliding window (keys `q - window < k <= q`), or global attention.
    pub window: Option<usize>,
    /// This layer's rotary embedding.
    pub rope: RopeSpec,
}

/// Everything the decoder needs, with every family difference as a field.
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderSpec {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    /// From config (Gemma2-2B: 256, while hidden / heads = 288).
    pub head_dim: usize,
    pub norm_style: NormStyle,
    pub rms_norm_eps: f32,
    pub activation: Activation,
    /// Gemma: embeddings × sqrt(hidden), the factor rounded to the compute dtype.
    pub scale_embeddings: bool,
    /// Multiplies q·k: `query_pre_attn_scalar^-0.5` (Gemma) or `head_dim^-0.5` (LLaMA).
    pub attn_scale: f32,
    /// Gemma 2: attention scores `cap · tanh(s / cap)` before masking.
    pub attn_softcap: Option<f32>,
    /// Gemma 3: RMSNorm over head_dim of q and k, before RoPE.
    pub qk_norm: bool,
    /// Gemma: norms after attention and after the MLP too, before each residual add.
    pub sandwich_norms: bool,
    /// One entry per layer.
    pub layers: Vec<LayerSpec>,
}

/// A whole checkpoint: decoder, head, and the token the head reads.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    /// The `architectures[0]` string, for messages.
    pub architecture: String,
    pub decoder: DecoderSpec,
    pub head: HeadKind,
    /// The LM head reuses `embed_tokens` (no `lm_head.weight`).
    pub tie_word_embeddings: bool,
    /// Sequence classification pools the rightmost token whose id is not this.
    pub pad_token_id: Option<u32>,
    /// Set for a bitsandbytes 4-bit checkpoint (`quantization_config`).
    pub bnb_4bit: Option<Bnb4bit>,
}

impl ModelSpec {
    /// Reads `dir/config.json` and normalises it.
    pub fn read(dir: &Path) -> Result<ModelSpec> {
        let path = dir.join("config.json");
        ModelSpec::from_file(&path, &HfConfig::read(&path)?)
    }

    /// [`ModelSpec::from_hf`] of the config read from `path`; an error is one line naming the
    /// file and the setting, the first line a user reads.
    pub fn from_file(path: &Path, config: &HfConfig) -> Result<ModelSpec> {
        ModelSpec::from_hf(config)
            .map_err(|e| anyhow::anyhow!("{}: unsupported configuration: {e:#}", path.display()))
    }

    /// Normalises a config into a spec, with transformers 5.23's class defaults for absent
    /// fields. Errors name the setting that cannot be honoured exactly.
    pub fn from_hf(c: &HfConfig) -> Result<ModelSpec> {
        let architecture = match c.architectures.as_slice() {
            [one] => one.clone(),
            [] => bail!("no `architectures` entry"),
            many => bail!("several architectures {many:?}; expected one"),
        };
        let (family, seq_cls) = ARCHITECTURES
            .iter()
            .find(|(name, ..)| *name == architecture)
            .map(|&(_, family, seq_cls)| (family, seq_cls))
            .with_context(|| {
                let names: Vec<&str> = ARCHITECTURES.iter().map(|(name, ..)| *name).collect();
                format!(
                    "unknown architecture {architecture:?}; supported: {}",
                    names.join(", ")
                )
            })?;
        let defaults = family.defaults();
        let model_type = defaults.model_type;
        if let Some(found) = &c.model_type {
            ensure!(
                found == model_type,
                "model_type {found:?} does not match {architecture} (expected {model_type:?})"
            );
        }
        // Sizes must be present and positive: a 0 would divide by zero or build an empty model.
        let required = |v: Option<usize>, name: &str| -> Result<usize> {
            let v = v.with_context(|| format!("missing `{name}`"))?;
            ensure!(v > 0, "{name} is 0: it must be at least 1");
            Ok(v)
        };
        let hidden_size = required(c.hidden_size, "hidden_size")?;
        let num_heads = required(c.num_attention_heads, "num_attention_heads")?;
        let num_layers = required(c.num_hidden_layers, "num_hidden_layers")?;
        let num_kv_heads = c
            .num_key_value_heads
            .unwrap_or(defaults.num_kv_heads.unwrap_or(num_heads));
        let head_dim = c
            .head_dim
            .unwrap_or(defaults.head_dim.unwrap_or(hidden_size / num_heads));
        ensure!(num_kv_heads > 0 && num_heads % num_kv_heads == 0, "num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}");
        ensure!(
            head_dim > 0 && head_dim % 2 == 0,
            "head_dim {head_dim} is not a positive even number; RoPE needs pairs"
        );
        // Settings that would turn every logit into NaN are refused by name.
        let positive = |v: Option<f64>, name: &str| -> Result<()> {
            if let Some(v) = v {
                ensure!(
                    v.is_finite() && v > 0.0,
                    "{name} {v} must be a positive finite number"
                );
            }
            Ok(())
        };
        if let Some(eps) = c.rms_norm_eps {
            ensure!(
                eps.is_finite() && eps >= 0.0,
                "rms_norm_eps {eps} must be a finite number >= 0 (a negative epsilon makes the norm of a small row NaN)"
            );
        }
        positive(c.query_pre_attn_scalar, "query_pre_attn_scalar")?;

        for (flag, name) in [
            (c.attention_bias, "attention_bias"),
            (c.mlp_bias, "mlp_bias"),
            (c.use_bidirectional_attention, "use_bidirectional_attention"),
        ] {
            ensure!(flag != Some(true), "`{name}: true` is not supported");
        }
        let (key, name, activation) = defaults.activation;
        if let Some(other) = (defaults.activation_setting)(c).filter(|v| *v != name) {
            bail!("{key} {other:?} is not supported (only {name})");
        }

        let layer_types = resolve_layer_types(c, family, num_layers)?;
        let sliding_window = c.sliding_window.or_default(defaults.sliding_window);
        ensure!(
            sliding_window != Some(0),
            "sliding_window is 0: a sliding layer must see at least its own token (use null for none)"
        );
        let ropes = resolve_ropes(c, family)?;
        let layers = layer_types
            .iter()
            .map(|kind| {
                let window = match kind {
                    LayerType::Full => None,
                    LayerType::Sliding => Some(
                        sliding_window
                            .context("sliding_attention layers but `sliding_window` is null")?,
                    ),
                };
                Ok(LayerSpec {
                    window,
                    rope: ropes.for_layer(*kind),
                })
            })
            .collect::<Result<Vec<_>>>()?;

        let (attn_softcap, final_softcap) = match defaults.softcaps {
            Some((attn, last)) => (
                c.attn_logit_softcapping.or_default(attn),
                c.final_logit_softcapping.or_default(last),
            ),
            None => (None, None),
        };
        positive(attn_softcap, "attn_logit_softcapping")?;
        positive(final_softcap, "final_logit_softcapping")?;
        let attn_scale = match defaults.query_pre_attn_scalar {
            Some(scalar) => c.query_pre_attn_scalar.unwrap_or(scalar).powf(-0.5) as f32,
            None => (head_dim as f32).powf(-0.5),
        };
        let head = if seq_cls {
            let num_labels = match (&c.id2label, c.num_labels) {
                (Some(labels), _) => labels.len(),
                (None, Some(n)) => n,
                (None, None) => 2,
            };
            HeadKind::SequenceClassification { num_labels }
        } else {
            HeadKind::CausalLm {
                final_logit_softcap: final_softcap.map(|v| v as f32),
            }
        };
        let pad_token_id = match c.pad_token_id.or_default(defaults.pad_token_id) {
            None => None,
            Some(id) if id >= 0 => Some(id as u32),
            Some(id) => bail!("pad_token_id {id} is negative"),
        };

        Ok(ModelSpec {
            architecture,
            decoder: DecoderSpec {
                vocab_size: required(c.vocab_size, "vocab_size")?,
                hidden_size,
                intermediate_size: required(c.intermediate_size, "intermediate_size")?,
                num_heads,
                num_kv_heads,
                head_dim,
                norm_style: defaults.norm_style,
                rms_norm_eps: c.rms_norm_eps.unwrap_or(1e-6) as f32,
                activation,
                scale_embeddings: defaults.scale_embeddings,
                attn_scale,
                attn_softcap: attn_softcap.map(|v| v as f32),
                qk_norm: defaults.qk_norm,
                sandwich_norms: defaults.sandwich_norms,
                layers,
            },
            head,
            tie_word_embeddings: c
                .tie_word_embeddings
                .unwrap_or(defaults.tie_word_embeddings),
            pad_token_id,
            bnb_4bit: c
                .quantization_config
                .as_ref()
                .map(QuantizationConfig::bnb_4bit)
                .transpose()?,
        })
    }
}

/// The two attention layer types transformers knows for these families.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LayerType {
    Full,
    Sliding,
}

/// `layer_types` if given, else the family's pattern: Gemma 2 alternates sliding/global
/// starting with sliding; Gemma 3 makes every `sliding_window_pattern`-th (6th) layer global.
fn resolve_layer_types(c: &HfConfig, family: Family, num_layers: usize) -> Result<Vec<LayerType>> {
    let types = match &c.layer_types {
        Some(names) => {
            ensure!(
                names.len() == num_layers,
                "layer_types has {} entries for {num_layers} layers",
                names.len()
            );
            names
                .iter()
                .map(|name| match name.as_str() {
                    "full_attention" => Ok(LayerType::Full),
                    "sliding_attention" => Ok(LayerType::Sliding),
                    other => bail!("layer type {other:?} is not supported"),
                })
                .collect::<Result<Vec<_>>>()?
        }
        None => {
            let pattern = match family {
                Family::Gemma2 => 2,
                Family::Gemma3 => {
                    let pattern = c
                        .sliding_window_pattern
                        .or(c.sliding_window_pattern_private)
                        .unwrap_or(6);
                    ensure!(
                        pattern > 0,
                        "sliding_window_pattern is 0: every pattern-th layer is global, so it must be at least 1"
                    );
                    pattern
                }
                Family::Llama => usize::MAX,
            };
            (0..num_layers)
                .map(|i| {
                    if (i + 1) % pattern == 0 || family == Family::Llama {
                        LayerType::Full
                    } else {
                        LayerType::Sliding
                    }
                })
                .collect()
        }
    };
    ensure!(
        family != Family::Llama || types.iter().all(|t| *t == LayerType::Full),
        "layer_types asks for sliding_attention, which transformers' LLaMA does not implement"
    );
    Ok(types)
}

/// RoPE of full and of sliding layers.
struct Ropes {
    full: RopeSpec,
    sliding: RopeSpec,
}

impl Ropes {
    fn for_layer(&self, kind: LayerType) -> RopeSpec {
        match kind {
            LayerType::Full => self.full,
            LayerType::Sliding => self.sliding,
        }
    }
}

/// Follows transformers' `convert_rope_params_to_dict`: a non-null `rope_scaling` wins over
/// `rope_parameters`; a missing `rope_theta` comes from the top-level key or the family
/// default. Gemma 3's classic keys: `rope_theta` (global, default 1e6) and
/// `rope_local_base_freq` (sliding, default 1e4), `rope_scaling` on global layers only.
fn resolve_ropes(c: &HfConfig, family: Family) -> Result<Ropes> {
    if let Some(f) = c.partial_rotary_factor {
        ensure!(f == 1.0, "partial_rotary_factor {f} is not supported");
    }
    let per_type = match &c.rope_parameters {
        Some(RopeParametersField::PerLayerType(map)) => Some(map),
        _ => None,
    };
    if let Some(map) = per_type {
        for key in map.keys() {
            ensure!(
                key == "full_attention" || key == "sliding_attention",
                "rope_parameters has an unknown layer type {key:?}"
            );
        }
    }
    let max_pos = c.max_position_embeddings;
    let entry = |key: &str| {
        per_type
            .and_then(|m| m.get(key).cloned().flatten())
            .unwrap_or_default()
    };
    if family == Family::Gemma3 {
        ensure!(
            !matches!(c.rope_parameters, Some(RopeParametersField::Shared(_))),
            "Gemma 3 needs rope_parameters per layer type (full_attention, sliding_attention)"
        );
        let full = match &c.rope_scaling {
            Some(scaling) => entry("full_attention").overlaid_with(scaling),
            None => entry("full_attention"),
        };
        return Ok(Ropes {
            full: rope_spec(&full, c.rope_theta.unwrap_or(1e6), max_pos)
                .context("rope_parameters.full_attention")?,
            sliding: rope_spec(
                &entry("sliding_attention"),
                c.rope_local_base_freq.unwrap_or(1e4),
                max_pos,
            )
            .context("rope_parameters.sliding_attention")?,
        });
    }
    // Gemma 2 and LLaMA: a `rope_scaling` replaces `rope_parameters` outright.
    let theta = c.rope_theta.unwrap_or(1e4);
    let spec = |p: &RopeParameters, key: &str| {
        rope_spec(p, theta, max_pos).with_context(|| format!("rope parameters {key}"))
    };
    let same_for_all = |p: &RopeParameters| -> Result<Ropes> {
        let one = spec(p, "")?;
        Ok(Ropes {
            full: one,
            sliding: one,
        })
    };
    match (&c.rope_scaling, &c.rope_parameters) {
        (Some(scaling), _) => same_for_all(scaling),
        (None, Some(RopeParametersField::Shared(shared))) => same_for_all(shared),
        (None, Some(RopeParametersField::PerLayerType(_))) => Ok(Ropes {
            full: spec(&entry("full_attention"), "full_attention")?,
            sliding: spec(&entry("sliding_attention"), "sliding_attention")?,
        }),
        (None, None) => same_for_all(&RopeParameters::default()),
    }
}

/// One RoPE parameter set -> spec; unknown types and partial rotation are errors.
fn rope_spec(
    p: &RopeParameters,
    default_theta: f64,
    max_position_embeddings: Option<usize>,
) -> Result<RopeSpec> {
    if let Some(f) = p.partial_rotary_factor {
        ensure!(f == 1.0, "partial_rotary_factor {f} is not supported");
    }
    let theta = p.rope_theta.unwrap_or(default_theta);
    ensure!(
        theta.is_finite() && theta > 0.0,
        "rope_theta {theta} must be a positive finite number"
    );
    let theta = theta as f32;
    let need = |v: Option<f64>, name: &str| {
        v.map(|v| v as f32)
            .with_context(|| format!("rope type needs `{name}`"))
    };
    let scaling = match p.rope_type.as_deref().unwrap_or("default") {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: need(p.factor, "factor")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: need(p.factor, "factor")?,
            low_freq_factor: need(p.low_freq_factor, "low_freq_factor")?,
            high_freq_factor: need(p.high_freq_factor, "high_freq_factor")?,
            original_max_position_embeddings: p
                .original_max_position_embeddings
                .or(max_position_embeddings)
                .context("llama3 rope needs `original_max_position_embeddings`")?,
        },
        other => bail!("rope type {other:?} is not supported (only default, linear, llama3)"),
    };
    Ok(RopeSpec { theta, scaling })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<ModelSpec> {
        ModelSpec::from_hf(&serde_json::from_str(json).unwrap())
    }

    const GEMMA2: &str = r#"{"architectures": ["Gemma2ForCausalLM"], "vocab_size": 10, "hidden_size": 8,
        "intermediate_size": 16, "num_hidden_layers": 3, "num_attention_heads": 8"#;

    #[test]
    fn gemma2_defaults_follow_transformers() {
        let s = parse(&format!("{GEMMA2}}}")).unwrap();
        let d = &s.decoder;
        assert_eq!((d.head_dim, d.num_kv_heads), (256, 4));
        assert_eq!(d.attn_softcap, Some(50.0));
        assert_eq!(
            s.head,
            HeadKind::CausalLm {
                final_logit_softcap: Some(30.0)
            }
        );
        assert_eq!(
            d.layers.iter().map(|l| l.window).collect::<Vec<_>>(),
            [Some(4096), None, Some(4096)]
        );
        assert_eq!(d.attn_scale, 1.0 / 16.0);
        assert_eq!(s.pad_token_id, Some(0));
    }

    #[test]
    fn explicit_null_softcap_means_no_cap() {
        let s = parse(&format!(
            r#"{GEMMA2}, "final_logit_softcapping": null, "attn_logit_softcapping": null}}"#
        ))
        .unwrap();
        assert_eq!(s.decoder.attn_softcap, None);
        assert_eq!(
            s.head,
            HeadKind::CausalLm {
                final_logit_softcap: None
            }
        );
    }

    #[test]
    fn zero_heads_and_zero_window_pattern_are_errors_naming_the_setting() {
        // Divisions by these values panicked before (issue #19).
        let llama = r#""architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 1"#;
        let err = parse(&format!(r#"{{{llama}, "num_attention_heads": 0}}"#)).unwrap_err();
        assert!(
            format!("{err:#}").contains("num_attention_heads is 0"),
            "{err:#}"
        );
        let gemma3 = r#""architectures": ["Gemma3ForCausalLM"], "vocab_size": 10, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 6, "num_attention_heads": 8, "sliding_window": 4"#;
        let err = parse(&format!(r#"{{{gemma3}, "sliding_window_pattern": 0}}"#)).unwrap_err();
        assert!(
            format!("{err:#}").contains("sliding_window_pattern is 0"),
            "{err:#}"
        );
    }

    #[test]
    fn gemma3_classic_and_v5_rope_keys_agree() {
        let base = r#""architectures": ["Gemma3ForCausalLM"], "vocab_size": 10, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 6, "num_attention_heads": 8, "sliding_window": 4"#;
        let classic = parse(&format!(r#"{{{base}, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "rope_scaling": null}}"#)).unwrap();
        let v5 = parse(&format!(
            r#"{{{base}, "rope_parameters": {{"full_attention": {{"rope_type": "default", "rope_theta": 1000000.0}},
                "sliding_attention": {{"rope_type": "default", "rope_theta": 10000.0}}}}}}"#
        ))
        .unwrap();
        assert_eq!(classic, v5);
        let thetas: Vec<f32> = v5.decoder.layers.iter().map(|l| l.rope.theta).collect();
        assert_eq!(thetas, [1e4, 1e4, 1e4, 1e4, 1e4, 1e6]);
        assert_eq!(v5.decoder.layers[5].window, None);
        assert!(v5.decoder.qk_norm);
    }

    #[test]
    fn unknown_rope_type_is_an_error() {
        let err = parse(r#"{"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}"#)
        .unwrap_err();
        assert!(format!("{err:#}").contains("\"yarn\""), "{err:#}");
    }

    #[test]
    fn settings_we_would_not_honour_are_refused() {
        for extra in [
            r#""attention_bias": true"#,
            r#""use_bidirectional_attention": true"#,
            r#""hidden_activation": "gelu""#,
            r#""sliding_window": null"#,
            r#""partial_rotary_factor": 0.5"#,
            r#""layer_types": ["sliding_attention", "chunked_attention", "full_attention"]"#,
        ] {
            let err = parse(&format!("{GEMMA2}, {extra}}}")).unwrap_err();
            let key = extra.split('"').nth(1).unwrap();
            let message = format!("{err:#}");
            assert!(
                message.contains(key) || message.contains("chunked"),
                "{extra}: {message}"
            );
        }
    }

    #[test]
    fn classic_llama3_rope_scaling_defaults_its_context_to_max_positions() {
        let s = parse(
            r#"{"architectures": ["LlamaForSequenceClassification"], "vocab_size": 10, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 64,
            "rope_theta": 500000.0, "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0}}"#,
        )
        .unwrap();
        let rope = s.decoder.layers[0].rope;
        assert_eq!(rope.theta, 500000.0);
        assert_eq!(
            rope.scaling,
            RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 64
            }
        );
        assert_eq!(
            s.decoder.head_dim, 4,
            "LLaMA without head_dim: hidden / heads"
        );
        assert_eq!(s.pad_token_id, None);
    }

    #[test]
    fn unknown_architecture_is_an_error() {
        let err = parse(r#"{"architectures": ["MistralForCausalLM"]}"#).unwrap_err();
        assert!(err.to_string().contains("MistralForCausalLM"));
    }
}
