//! The PEFT LoRA adapter format, read and written in one place: the folder's two files, the
//! key names, the projections they name, and which trainable parameters belong to it.
//!
//! PEFT 0.21 folders: `adapter_config.json` and `adapter_model.safetensors` with keys
//! `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` (adapter name removed),
//! and modules saved whole (`modules_to_save`, e.g. the score head) as
//! `base_model.model.score.weight`.
//!
//! Place in the data flow: reading, [`Adapter`] hands the decoder its LoRA pairs as it loads
//! each projection (`verdict predict --adapter`, `verdict logits --adapter`, resuming);
//! writing, the training loop's parameters (PEFT key names, see `Model::trainable_params`)
//! -> [`write_adapter`]. Only parameters under `base_model.model.` belong to the adapter:
//! LoRA pairs and the score head (`modules_to_save`); the auxiliary identity heads of
//! `--heads three` are a training device only and live in the trainer state.
//!
//! The written config carries the fields PEFT 0.21.2 itself writes for a `LoraConfig(task_type=
//! "SEQ_CLS", modules_to_save=["score"])` whose values change the computation or the
//! loading; PEFT fills every other field with its default.

use crate::backend::Backend;
use crate::model::lora::{dense_weight, Lora};
use crate::model::weights::{write_f32_tensors, Checkpoint};
use anyhow::{bail, ensure, Result};
use serde::Deserialize;
use serde_json::{json, Value};
use std::path::Path;
use std::str::FromStr;

/// The adapter folder's config file.
pub const CONFIG_FILE: &str = "adapter_config.json";

/// The adapter folder's tensors.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// The prefix PEFT puts before the wrapped model's own parameter names.
pub const PEFT_PREFIX: &str = "base_model.model.";

/// The score head's adapter key (a whole module saved by `modules_to_save`).
pub const SCORE_KEY: &str = "base_model.model.score.weight";

/// PEFT's key of matrix `A` or `B` of the adapter on `module` (the model's own name, e.g.
/// `model.layers.0.self_attn.q_proj`).
pub fn lora_key(module: &str, matrix: char) -> String {
    format!("{PEFT_PREFIX}{module}.lora_{matrix}.weight")
}

/// The model's own name of layer `layer`'s projection `p`, e.g. `model.layers.0.self_attn.q_proj`.
pub fn projection_module(layer: usize, p: Projection) -> String {
    format!("model.layers.{layer}.{}", p.module_path())
}

/// PEFT's key of the weight of `module` saved whole (`modules_to_save`).
fn saved_module_key(module: &str) -> String {
    format!("{PEFT_PREFIX}{module}.weight")
}

/// One of the seven projections of a decoder layer that LoRA can adapt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Projection {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Projection {
    /// Every projection, in layer order (the order of the trainable parameters).
    pub const ALL: [Projection; 7] = [
        Projection::Q,
        Projection::K,
        Projection::V,
        Projection::O,
        Projection::Gate,
        Projection::Up,
        Projection::Down,
    ];

    /// PEFT's module name: `q_proj`, ..., `down_proj`.
    pub fn peft_name(self) -> &'static str {
        match self {
            Projection::Q => "q_proj",
            Projection::K => "k_proj",
            Projection::V => "v_proj",
            Projection::O => "o_proj",
            Projection::Gate => "gate_proj",
            Projection::Up => "up_proj",
            Projection::Down => "down_proj",
        }
    }

    /// The module path within a layer, e.g. `self_attn.q_proj`, `mlp.down_proj`.
    pub fn module_path(self) -> String {
        let block = match self {
            Projection::Q | Projection::K | Projection::V | Projection::O => "self_attn",
            Projection::Gate | Projection::Up | Projection::Down => "mlp",
        };
        format!("{block}.{}", self.peft_name())
    }
}

impl FromStr for Projection {
    type Err = anyhow::Error;

    /// `q`, `k`, `v`, `o`, `gate`, `up`, `down` or the PEFT names `q_proj` ... `down_proj`.
    fn from_str(s: &str) -> Result<Projection> {
        let short = s.strip_suffix("_proj").unwrap_or(s);
        Ok(match short {
            "q" => Projection::Q,
            "k" => Projection::K,
            "v" => Projection::V,
            "o" => Projection::O,
            "gate" => Projection::Gate,
            "up" => Projection::Up,
            "down" => Projection::Down,
            _ => bail!("unknown projection {s:?} (expected q, k, v, o, gate, up, down or q_proj ... down_proj)"),
        })
    }
}

/// Whether trainable parameter `name` is saved in the PEFT adapter.
pub fn in_adapter(name: &str) -> bool {
    name.starts_with(PEFT_PREFIX)
}

/// Whether `name` is a head (score or auxiliary) rather than a LoRA matrix: heads train with
/// `--head-lr`.
pub fn is_head(name: &str) -> bool {
    name == SCORE_KEY || !in_adapter(name)
}

/// What `adapter_config.json` records.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterSettings {
    pub r: usize,
    pub lora_alpha: f32,
    pub lora_dropout: f32,
    pub use_rslora: bool,
    /// PEFT module names, e.g. `q_proj`.
    pub target_modules: Vec<String>,
    /// The base model folder, as given.
    pub base_model: String,
    /// The adapted layers; `None`: every layer.
    pub layers_to_transform: Option<Vec<usize>>,
}

/// The `adapter_config.json` document.
pub fn adapter_config(s: &AdapterSettings) -> Value {
    json!({
        "peft_type": "LORA",
        "task_type": "SEQ_CLS",
        "base_model_name_or_path": s.base_model,
        "r": s.r,
        "lora_alpha": decimal(s.lora_alpha),
        "lora_dropout": decimal(s.lora_dropout),
        "use_rslora": s.use_rslora,
        "target_modules": s.target_modules,
        "modules_to_save": ["score"],
        "bias": "none",
        "fan_in_fan_out": false,
        "use_dora": false,
        "init_lora_weights": true,
        "inference_mode": true,
        "layers_to_transform": s.layers_to_transform,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": null,
    })
}

/// An f32 as the f64 with the same shortest decimal form (0.05, not 0.05000000074505806),
/// so the JSON says what the user typed.
fn decimal(x: f32) -> f64 {
    x.to_string().parse().expect("an f32 prints as a decimal")
}

/// Writes `dir/adapter_config.json` and `dir/adapter_model.safetensors` (f32, the adapter's
/// parameters in the given order). The safetensors file is not written atomically: `dir` is
/// expected to be a checkpoint's temporary folder.
pub fn write_adapter(
    dir: &Path,
    settings: &AdapterSettings,
    names: &[String],
    shapes: &[Vec<usize>],
    values: &[Vec<f32>],
) -> Result<()> {
    crate::atomic::write_json(&dir.join(CONFIG_FILE), &adapter_config(settings))?;
    let picked: Vec<usize> = (0..names.len())
        .filter(|&i| in_adapter(&names[i]))
        .collect();
    write_f32_tensors(
        &dir.join(WEIGHTS_FILE),
        &picked
            .iter()
            .map(|&i| (names[i].clone(), shapes[i].clone()))
            .collect::<Vec<_>>(),
        |k| values[picked[k]].clone(),
    )
}

/// `target_modules`: a list of module names, or one regular expression / "all-linear".
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// Module names such as `q_proj`, matched against the last part of a module path.
    Names(Vec<String>),
    /// A pattern; the tensors in the file then say which modules are adapted.
    Pattern(String),
}

/// `adapter_config.json`, the fields that change the computation.
#[derive(Debug, Clone, Deserialize)]
pub struct AdapterConfig {
    /// "LORA"; other PEFT methods are refused.
    pub peft_type: Option<String>,
    /// Rank: rows of `A`, columns of `B`.
    pub r: usize,
    /// Numerator of the scale `s`.
    pub lora_alpha: f64,
    /// Dropout on the adapter input while training; kept so that training can resume.
    #[serde(default)]
    pub lora_dropout: f32,
    /// rsLoRA: `s = alpha / sqrt(r)` instead of `alpha / r`.
    #[serde(default)]
    pub use_rslora: bool,
    /// Which projections may carry adapters.
    pub target_modules: Option<TargetModules>,
    /// Modules saved whole (e.g. `score`), replacing the base's.
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// DoRA's magnitude vectors; refused.
    #[serde(default)]
    pub use_dora: bool,
    /// Transposed (Conv1D) base layers; refused.
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// A bias on `B`; refused.
    #[serde(default)]
    pub lora_bias: bool,
    /// Trained base biases ("none", "all", "lora_only"); only "none" is accepted.
    pub bias: Option<String>,
    /// Per-module ranks; refused unless empty.
    #[serde(default)]
    pub rank_pattern: serde_json::Map<String, serde_json::Value>,
    /// Per-module alphas; refused unless empty.
    #[serde(default)]
    pub alpha_pattern: serde_json::Map<String, serde_json::Value>,
}

impl AdapterConfig {
    /// Reads `dir/adapter_config.json` and refuses settings we would not honour.
    pub fn read(dir: &Path) -> Result<AdapterConfig> {
        let path = dir.join(CONFIG_FILE);
        let c: AdapterConfig = crate::atomic::read_json(&path, "a PEFT adapter config")?;
        let refuse =
            |what: &str| -> Result<()> { bail!("{}: {what} is not supported", path.display()) };
        match c.peft_type.as_deref() {
            None | Some("LORA") => {}
            Some(other) => refuse(&format!("peft_type {other:?}"))?,
        }
        if c.use_dora {
            refuse("use_dora")?;
        }
        if c.fan_in_fan_out {
            refuse("fan_in_fan_out")?;
        }
        if c.lora_bias || c.bias.as_deref().is_some_and(|b| b != "none") {
            refuse("a LoRA bias")?;
        }
        if !c.rank_pattern.is_empty() || !c.alpha_pattern.is_empty() {
            refuse("rank_pattern / alpha_pattern")?;
        }
        ensure!(c.r > 0, "{}: r is 0", path.display());
        ensure!(
            (0.0..1.0).contains(&c.lora_dropout),
            "{}: lora_dropout {} is not in [0, 1)",
            path.display(),
            c.lora_dropout
        );
        Ok(c)
    }

    /// `s` in `W + s·B·A`.
    pub fn scale(&self) -> f32 {
        let r = self.r as f64;
        (if self.use_rslora {
            self.lora_alpha / r.sqrt()
        } else {
            self.lora_alpha / r
        }) as f32
    }

    /// Whether `module` (e.g. `q_proj`) may carry an adapter under `target_modules`.
    pub fn targets(&self, module: &str) -> bool {
        match &self.target_modules {
            Some(TargetModules::Names(names)) => names.iter().any(|n| n == module),
            Some(TargetModules::Pattern(_)) | None => true,
        }
    }
}

/// A PEFT LoRA adapter folder, read lazily as the decoder asks for its modules.
pub struct Adapter {
    /// The folder's adapter_config.json.
    pub config: AdapterConfig,
    tensors: Checkpoint,
}

impl Adapter {
    /// Opens `dir` (adapter_config.json + adapter_model.safetensors).
    pub fn open(dir: &Path) -> Result<Adapter> {
        let config = AdapterConfig::read(dir)?;
        let tensors = Checkpoint::open_file(&dir.join(WEIGHTS_FILE))?;
        Ok(Adapter { config, tensors })
    }

    /// The LoRA pair for module `name` (the model's own name, e.g.
    /// `model.layers.0.self_attn.q_proj`), checked against the base weight's shape; `None`
    /// when the adapter does not touch this module.
    pub fn take_lora<B: Backend>(
        &mut self,
        backend: &B,
        name: &str,
        out_features: usize,
        in_features: usize,
    ) -> Result<Option<Lora<B>>> {
        let (a_name, b_name) = (lora_key(name, 'A'), lora_key(name, 'B'));
        if !self.tensors.contains(&a_name) && !self.tensors.contains(&b_name) {
            return Ok(None);
        }
        let module = name.rsplit('.').next().unwrap_or(name);
        ensure!(
            self.config.targets(module),
            "adapter has {a_name} but target_modules does not list {module}"
        );
        let r = self.config.r;
        let a = self.tensors.take(&a_name, &[r, in_features])?;
        let b = self.tensors.take(&b_name, &[out_features, r])?;
        Ok(Some(Lora {
            a: dense_weight(backend, &a, r, in_features),
            b: dense_weight(backend, &b, out_features, r),
            scale: self.config.scale(),
            dropout: self.config.lora_dropout,
        }))
    }

    /// A whole module saved by `modules_to_save` (e.g. `score`), replacing the base's:
    /// its `weight` if the file has it. A module listed in `modules_to_save` but absent from
    /// the file is an error; PEFT's automatic `classifier` entry has no module in these
    /// models and is never saved.
    pub fn take_saved_module(&mut self, module: &str, shape: &[usize]) -> Result<Option<Vec<f32>>> {
        let name = saved_module_key(module);
        if self.tensors.contains(&name) {
            return self.tensors.take(&name, shape).map(Some);
        }
        let listed = self
            .config
            .modules_to_save
            .iter()
            .flatten()
            .any(|m| m == module);
        ensure!(
            !listed,
            "adapter lists {module} in modules_to_save but has no tensor {name}"
        );
        Ok(None)
    }

    /// Fails if the adapter holds tensors no module took (an adapted module we do not know).
    pub fn finish(&self) -> Result<()> {
        self.tensors.finish(|_| false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_back_through_our_adapter_loader() {
        let dir = tempfile::tempdir().unwrap();
        let settings = AdapterSettings {
            r: 16,
            lora_alpha: 32.0,
            lora_dropout: 0.05,
            use_rslora: true,
            target_modules: vec!["q_proj".into(), "down_proj".into()],
            base_model: "/models/gemma".into(),
            layers_to_transform: Some(vec![2, 3]),
        };
        crate::atomic::write_json(
            &dir.path().join("adapter_config.json"),
            &adapter_config(&settings),
        )
        .unwrap();
        let c = AdapterConfig::read(dir.path()).unwrap();
        let text = std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap();
        assert!(text.contains("\"lora_dropout\": 0.05,"), "{text}");
        assert!(
            text.contains("\"layers_to_transform\": [\n    2,\n    3\n  ]"),
            "{text}"
        );
        assert_eq!((c.r, c.use_rslora, c.scale()), (16, true, 8.0));
        assert!(c.targets("q_proj") && c.targets("down_proj") && !c.targets("k_proj"));
        assert_eq!(c.modules_to_save, Some(vec!["score".to_string()]));
    }

    #[test]
    fn heads_and_adapter_membership() {
        assert!(in_adapter(SCORE_KEY) && is_head(SCORE_KEY));
        let lora = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
        assert!(in_adapter(lora) && !is_head(lora));
        assert!(!in_adapter("aux_model_a.weight") && is_head("aux_model_a.weight"));
    }

    #[test]
    fn rslora_scales_by_sqrt_r() {
        let c: AdapterConfig =
            serde_json::from_str(r#"{"r": 16, "lora_alpha": 32, "use_rslora": true}"#).unwrap();
        assert_eq!(c.scale(), 8.0);
        let c: AdapterConfig = serde_json::from_str(r#"{"r": 16, "lora_alpha": 32}"#).unwrap();
        assert_eq!(c.scale(), 2.0);
    }
}
