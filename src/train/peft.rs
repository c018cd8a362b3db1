//! Trained parameters out as a PEFT LoRA adapter folder, the format `verdict predict
//! --adapter`, `model::lora::Adapter` and `PeftModel.from_pretrained` all read.
//!
//! Place in the data flow: the loop's parameters (PEFT key names, see
//! `Model::trainable_params`) -> `adapter_config.json` + `adapter_model.safetensors`.
//! Only parameters under `base_model.model.` belong to the adapter: LoRA pairs and the score
//! head (`modules_to_save`); the auxiliary identity heads of `--heads three` are a training
//! device only and live in the trainer state.
//!
//! The config carries the fields PEFT 0.21.2 itself writes for a `LoraConfig(task_type=
//! "SEQ_CLS", modules_to_save=["score"])` whose values change the computation or the
//! loading; PEFT fills every other field with its default.

use crate::model::weights::{write_safetensors, Dtype, TensorSpec};
use anyhow::Result;
use serde_json::{json, Value};
use std::path::Path;

/// The prefix PEFT puts before the wrapped model's parameter names.
pub const PEFT_PREFIX: &str = "base_model.model.";

/// The score head's adapter key (a whole module saved by `modules_to_save`).
pub const SCORE_KEY: &str = "base_model.model.score.weight";

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
    crate::atomic::write_json(&dir.join("adapter_config.json"), &adapter_config(settings))?;
    let picked: Vec<usize> = (0..names.len())
        .filter(|&i| in_adapter(&names[i]))
        .collect();
    write_f32_tensors(
        &dir.join("adapter_model.safetensors"),
        &picked
            .iter()
            .map(|&i| (names[i].clone(), shapes[i].clone()))
            .collect::<Vec<_>>(),
        |k| values[picked[k]].clone(),
    )
}

/// Writes named f32 tensors to a safetensors file.
pub fn write_f32_tensors(
    path: &Path,
    tensors: &[(String, Vec<usize>)],
    fill: impl Fn(usize) -> Vec<f32>,
) -> Result<()> {
    let specs: Vec<TensorSpec> = tensors
        .iter()
        .map(|(name, shape)| TensorSpec {
            name: name.clone(),
            dtype: Dtype::F32,
            shape: shape.clone(),
        })
        .collect();
    write_safetensors(path, &specs, fill)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::lora::AdapterConfig;

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
}
