//! `verdict train`'s settings: the command-line flags and the run configuration they
//! resolve to.
//!
//! Place in the data flow: flags -> [`TrainConfig`] (saved as `RUN/train_config.json` before
//! anything else) -> the loop. `--resume RUN` takes the saved configuration; flags given with
//! it must agree with it, so a resumed run is the run that was started. That is why every
//! flag is optional here and the defaults live in one place, [`TrainConfig::default`].

use crate::backend::placement::Placement;
use crate::cli::range;
use crate::data::format::FormatOptions;
use crate::model::decoder::PrefixCache;
use crate::model::peft::Projection;
use crate::quant::{Quant, QuantArgs, QuantKind};
use crate::train::schedule::DecayKind;
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Which heads train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Heads {
    /// The 3-way preference score head only.
    Pref,
    /// Plus two auxiliary heads predicting the identity of model_a and model_b.
    Three,
}

/// `--targets` values: `q`, ..., `down` or PEFT's `q_proj`, ..., `down_proj`.
fn parse_projection(s: &str) -> Result<Projection, String> {
    s.parse().map_err(|e: anyhow::Error| e.to_string())
}

/// Projections as PEFT module names in `train_config.json`.
mod projection_names {
    use crate::model::peft::Projection;
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(targets: &[Projection], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(targets.iter().map(|p| p.peft_name()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Projection>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|n| n.parse().map_err(D::Error::custom))
            .collect()
    }
}

/// Everything that determines a training run's result (paths are made absolute).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub model: PathBuf,
    pub train: PathBuf,
    pub valid: Option<PathBuf>,
    pub quant: Quant,
    pub lora_r: usize,
    pub lora_alpha: f32,
    pub lora_dropout: f32,
    pub rslora: bool,
    #[serde(with = "projection_names")]
    pub targets: Vec<Projection>,
    /// The adapted layers, as `--lora-layers` gives them; `None`: every layer.
    #[serde(default)]
    pub lora_layers: Option<String>,
    pub heads: Heads,
    pub aux_weight: f32,
    pub label_smoothing: f32,
    pub lr: f64,
    pub head_lr: f64,
    pub weight_decay: f64,
    /// Overrides `warmup_ratio` when set.
    pub warmup_steps: Option<usize>,
    pub warmup_ratio: f64,
    pub schedule: DecayKind,
    pub batch_tokens: usize,
    pub grad_accum: usize,
    pub epochs: usize,
    pub max_steps: Option<usize>,
    pub clip: f64,
    pub swap_pairs: bool,
    /// Learn the residual of the length baseline fitted on the training rows.
    #[serde(default)]
    pub on_baseline: bool,
    pub format: FormatOptions,
    /// Validate every N steps (and at the end); `None`: at the end only.
    pub eval_every: Option<usize>,
    /// Checkpoint every N steps (and at the end); 0: at the end only.
    pub save_every: usize,
    pub seed: u64,
    pub recompute_layers: bool,
    pub skip_bad_rows: bool,
    /// Dynamic loss scaling where gradients pass through f16 (sm_75; `train::scaler`): the
    /// first scale, and the clean steps after which it doubles. Unused in f32 and bf16.
    #[serde(default = "default_loss_scale_init")]
    pub loss_scale_init: f64,
    #[serde(default = "default_loss_scale_growth_interval")]
    pub loss_scale_growth_interval: usize,
}

fn default_loss_scale_init() -> f64 {
    crate::train::scaler::DEFAULT_INIT_SCALE
}

fn default_loss_scale_growth_interval() -> usize {
    crate::train::scaler::DEFAULT_GROWTH_INTERVAL
}

impl TrainConfig {
    /// The defaults, for a model, training file and nothing else.
    pub fn new(model: PathBuf, train: PathBuf) -> TrainConfig {
        TrainConfig {
            model,
            train,
            valid: None,
            quant: Quant::None,
            lora_r: 16,
            lora_alpha: 32.0,
            lora_dropout: 0.05,
            rslora: false,
            targets: Projection::ALL.to_vec(),
            lora_layers: None,
            heads: Heads::Pref,
            aux_weight: 0.2,
            label_smoothing: 0.0,
            lr: 2e-4,
            head_lr: 1e-3,
            weight_decay: 0.01,
            warmup_steps: None,
            warmup_ratio: 0.03,
            schedule: DecayKind::Cosine,
            batch_tokens: 4096,
            grad_accum: 1,
            epochs: 1,
            max_steps: None,
            clip: 1.0,
            swap_pairs: true,
            on_baseline: false,
            format: FormatOptions::default(),
            eval_every: None,
            save_every: 100,
            seed: 0,
            recompute_layers: true,
            skip_bad_rows: false,
            loss_scale_init: default_loss_scale_init(),
            loss_scale_growth_interval: default_loss_scale_growth_interval(),
        }
    }

    /// The adapted layers of a model with `num_layers` layers; `None`: every layer.
    pub fn lora_layers(&self, num_layers: usize) -> Result<Option<Vec<usize>>> {
        self.lora_layers
            .as_deref()
            .map(|spec| {
                parse_layers(spec, num_layers).with_context(|| format!("--lora-layers {spec}"))
            })
            .transpose()
    }

    /// Refuses settings that cannot train.
    pub fn validate(&self) -> Result<()> {
        ensure!(self.lora_r > 0, "--lora-r must be positive");
        self.lora_layers(usize::MAX)?;
        ensure!(!self.targets.is_empty(), "--targets lists no projection");
        ensure!(
            (0.0..1.0).contains(&self.lora_dropout),
            "--lora-dropout must be in [0, 1)"
        );
        ensure!(
            (0.0..1.0).contains(&self.label_smoothing),
            "--label-smoothing must be in [0, 1)"
        );
        ensure!(self.aux_weight >= 0.0, "--aux-weight must be non-negative");
        ensure!(
            self.lr > 0.0 && self.head_lr > 0.0 && self.lr.is_finite() && self.head_lr.is_finite(),
            "learning rates must be positive and finite (--lr {}, --head-lr {})",
            self.lr,
            self.head_lr
        );
        ensure!(
            self.weight_decay >= 0.0,
            "--weight-decay must be non-negative"
        );
        ensure!(
            (0.0..=1.0).contains(&self.warmup_ratio),
            "--warmup-ratio must be in [0, 1]"
        );
        ensure!(
            self.batch_tokens > 0 && self.grad_accum > 0 && self.epochs > 0,
            "--batch-tokens, --grad-accum and --epochs must be positive"
        );
        ensure!(self.max_steps != Some(0), "--max-steps must be positive");
        ensure!(self.eval_every != Some(0), "--eval-every must be positive");
        ensure!(
            [
                self.weight_decay,
                self.clip,
                self.aux_weight as f64,
                self.lora_alpha as f64
            ]
            .iter()
            .all(|v| v.is_finite()),
            "--weight-decay, --clip, --aux-weight and --lora-alpha must be finite"
        );
        ensure!(
            self.clip >= 0.0,
            "--clip must be non-negative (0 disables clipping)"
        );
        ensure!(
            self.loss_scale_init >= 1.0 && self.loss_scale_init <= 2f64.powi(120),
            "--loss-scale-init must be in [1, 2^120] (got {})",
            self.loss_scale_init
        );
        ensure!(
            self.loss_scale_growth_interval > 0,
            "--loss-scale-growth-interval must be positive"
        );
        Ok(())
    }
}

/// Layer indices from `last:K` (the top K of `num_layers`) or a comma list of indices and
/// ranges (`0,4-7`); sorted, without repeats.
pub fn parse_layers(spec: &str, num_layers: usize) -> Result<Vec<usize>> {
    let number = |s: &str| -> Result<usize> {
        s.trim()
            .parse()
            .with_context(|| format!("{s:?} is not a layer number"))
    };
    let mut layers = Vec::new();
    if let Some(k) = spec.strip_prefix("last:") {
        let k = number(k)?;
        ensure!(k > 0, "last:0 selects no layer");
        ensure!(
            k <= num_layers,
            "last:{k}, but the model has {num_layers} layers"
        );
        layers.extend(num_layers - k..num_layers);
    } else {
        for part in spec.split(',') {
            match part.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = (number(a)?, number(b)?);
                    ensure!(a <= b, "range {a}-{b} is empty");
                    layers.extend(a..=b);
                }
                None => layers.push(number(part)?),
            }
        }
    }
    layers.sort_unstable();
    layers.dedup();
    if let Some(&bad) = layers.iter().find(|&&i| i >= num_layers) {
        bail!("layer {bad}, but the model has {num_layers} layers (0..{num_layers})");
    }
    Ok(layers)
}

/// `verdict train`'s flags. Every training flag is optional so that `--resume` can tell a
/// flag that was given from a default; defaults are [`TrainConfig::new`]'s.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct Args {
    /// Hugging Face model folder with tokenizer.json: a *ForSequenceClassification checkpoint
    /// (its 3-label score head trains), or a *ForCausalLM one (a new zero-initialised score head).
    #[arg(long, required_unless_present = "resume")]
    pub model: Option<PathBuf>,
    /// Labelled competition CSV to train on.
    #[arg(long, required_unless_present = "resume")]
    pub train: Option<PathBuf>,
    /// Labelled CSV to validate on (log loss and accuracy with swap TTA).
    #[arg(long)]
    pub valid: Option<PathBuf>,
    /// Run folder (new or empty): adapter, checkpoints, metrics.jsonl, loss.png, summary.json.
    #[arg(long, required_unless_present = "resume")]
    pub out: Option<PathBuf>,
    /// Continue the killed run in this folder with its saved configuration.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Base projection weights: none (as stored, f32 on the CPU) or nf4 (bitsandbytes NF4,
    /// quantized while loading: QLoRA) [default: none].
    #[arg(long, value_enum)]
    pub quant: Option<QuantKind>,
    /// NF4 elements per absmax block, a power of two in 32..=4096 [default: 64].
    #[arg(long, allow_negative_numbers = true, value_parser = range::count)]
    pub nf4_blocksize: Option<usize>,
    /// Keep one f32 absmax per NF4 block instead of double-quantizing them.
    #[arg(long)]
    pub no_double_quant: bool,
    /// LoRA rank [default: 16].
    #[arg(long, allow_negative_numbers = true, value_parser = range::count)]
    pub lora_r: Option<usize>,
    /// LoRA alpha; the update is scaled by alpha / r (alpha / sqrt(r) with --rslora) [default: 32].
    #[arg(long, allow_negative_numbers = true, value_parser = range::positive::<f32>)]
    pub lora_alpha: Option<f32>,
    /// Dropout on the LoRA input [default: 0.05].
    #[arg(long, allow_negative_numbers = true, value_parser = range::fraction::<f32>)]
    pub lora_dropout: Option<f32>,
    /// Rank-stabilised LoRA scaling alpha / sqrt(r) [default: off].
    #[arg(long)]
    pub rslora: bool,
    /// Projections with adapters, comma-separated [default: q,k,v,o,gate,up,down].
    #[arg(long, value_delimiter = ',', value_parser = parse_projection)]
    pub targets: Option<Vec<Projection>>,
    /// Layers with adapters (PEFT's layers_to_transform): `last:K` or a list such as
    /// `0,4-7`. Layers below the lowest one are frozen whole, so training skips their
    /// backward [default: every layer].
    #[arg(long)]
    pub lora_layers: Option<String>,
    /// pref: the 3-way head; three: plus model_a / model_b identity heads [default: pref].
    #[arg(long, value_enum)]
    pub heads: Option<Heads>,
    /// Weight of the identity heads' loss with --heads three [default: 0.2].
    #[arg(long, allow_negative_numbers = true, value_parser = range::non_negative::<f32>)]
    pub aux_weight: Option<f32>,
    /// Label smoothing of the preference loss [default: 0].
    #[arg(long, allow_negative_numbers = true, value_parser = range::fraction::<f32>)]
    pub label_smoothing: Option<f32>,
    /// Peak learning rate of the LoRA matrices [default: 2e-4].
    #[arg(long, allow_negative_numbers = true, value_parser = range::positive::<f64>)]
    pub lr: Option<f64>,
    /// Peak learning rate of the heads [default: 1e-3].
    #[arg(long, allow_negative_numbers = true, value_parser = range::positive::<f64>)]
    pub head_lr: Option<f64>,
    /// AdamW decoupled weight decay [default: 0.01].
    #[arg(long, allow_negative_numbers = true, value_parser = range::non_negative::<f64>)]
    pub weight_decay: Option<f64>,
    /// Linear warmup steps (overrides --warmup-ratio).
    #[arg(long, allow_negative_numbers = true, value_parser = range::whole, conflicts_with = "warmup_ratio")]
    pub warmup_steps: Option<usize>,
    /// Warmup as a share of all steps, rounded up [default: 0.03].
    #[arg(long, allow_negative_numbers = true, value_parser = range::unit::<f64>)]
    pub warmup_ratio: Option<f64>,
    /// Decay after warmup [default: cosine].
    #[arg(long, value_enum)]
    pub schedule: Option<DecayKind>,
    /// Most tokens per packed micro-batch [default: 4096].
    #[arg(long, allow_negative_numbers = true, value_parser = range::count)]
    pub batch_tokens: Option<usize>,
    /// Micro-batches per optimizer step [default: 1].
    #[arg(long, allow_negative_numbers = true, value_parser = range::count)]
    pub grad_accum: Option<usize>,
    /// Passes over the training data [default: 1].
    #[arg(long, allow_negative_numbers = true, value_parser = range::count)]
    pub epochs: Option<usize>,
    /// Stop after this many optimizer steps (the schedule spans them).
    #[arg(long, allow_negative_numbers = true, value_parser = range::count)]
    pub max_steps: Option<usize>,
    /// Global gradient-norm limit; 0 disables clipping [default: 1.0].
    #[arg(long, allow_negative_numbers = true, value_parser = range::non_negative::<f64>)]
    pub clip: Option<f64>,
    /// First loss scale of dynamic loss scaling, used where gradients pass through f16
    /// (sm_75 GPUs; not the CPU or bf16 cards): rounded down to a power of two; an overflow
    /// skips the step and halves it [default: 65536].
    #[arg(long, allow_negative_numbers = true, value_parser = range::positive::<f64>)]
    pub loss_scale_init: Option<f64>,
    /// Clean steps in a row after which the loss scale doubles [default: 2000].
    #[arg(long, allow_negative_numbers = true, value_parser = range::count)]
    pub loss_scale_growth_interval: Option<usize>,
    /// Train each battle alone, not together with its A/B swap (labels swapped) in the
    /// same batch.
    #[arg(long)]
    pub no_swap_pairs: bool,
    /// Learn the residual of the length baseline: fit `verdict baseline`'s default model on
    /// the training rows, keep it as RUN/baseline.json, and add its log-probabilities to the
    /// score logits in training and prediction. The score head starts at zero, so the run
    /// starts as the baseline and the decoder only has to learn what lengths miss.
    #[arg(long)]
    pub on_baseline: bool,
    /// Longest input, special tokens included [default: 1024].
    #[arg(long, allow_negative_numbers = true, value_parser = range::count)]
    pub max_len: Option<usize>,
    /// Most tokens a prompt keeps [default: 256].
    #[arg(long, allow_negative_numbers = true, value_parser = range::whole)]
    pub prompt_cap: Option<usize>,
    /// Fewest tokens each part keeps before others give up more [default: 32].
    #[arg(long, allow_negative_numbers = true, value_parser = range::whole)]
    pub min_part: Option<usize>,
    /// State each response's full length in words in its marker.
    #[arg(long)]
    pub length_hints: bool,
    /// Validate every N steps (and at the end) [default: at the end only].
    #[arg(long, allow_negative_numbers = true, value_parser = range::count)]
    pub eval_every: Option<usize>,
    /// Checkpoint every N steps (and at the end); 0: at the end only [default: 100].
    #[arg(long, allow_negative_numbers = true, value_parser = range::whole)]
    pub save_every: Option<usize>,
    /// Seed of the data order, initialisations and dropout [default: 0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Keep each layer's activations for backward instead of recomputing the layer (more
    /// memory, less time).
    #[arg(long)]
    pub no_recompute_layers: bool,
    /// Warn about and skip malformed CSV rows (counted) instead of failing.
    #[arg(long)]
    pub skip_bad_rows: bool,
    /// Keep the frozen prefix's output (the layers below --lora-layers) per sequence in
    /// memory, so later epochs and validations run the adapted layers only. Exact; costs
    /// 4 bytes x hidden size per token of the training and validation sequences.
    #[arg(long)]
    pub prefix_cache: bool,
    /// Also keep the prefix cache in this file (implies --prefix-cache): loaded when it
    /// exists, written back when it grows, so later runs on the same model and frozen layers
    /// (other learning rates, epochs, folds) skip the prefix entirely. Refused if it was
    /// computed from other model files, quantization, device or prefix depth.
    #[arg(long)]
    pub prefix_cache_file: Option<PathBuf>,
    /// cpu, cuda, cuda:N, auto (cuda:0 when the driver sees a GPU, else the CPU), or the
    /// emulated GPU (emu, emu:sm80, emu:sm90); does not change what the run computes beyond
    /// the device's rounding [default: cpu].
    #[arg(long)]
    pub device: Option<Placement>,
}

/// The saved configuration of a run.
pub const CONFIG_FILE: &str = "train_config.json";

/// A run to start or continue.
#[derive(Debug, Clone)]
pub struct RunRequest {
    pub run: PathBuf,
    pub config: TrainConfig,
    pub resume: bool,
}

/// An absolute form of `path` (so a resumed run finds its files from any folder).
fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("cannot resolve {}", path.display()))
}

impl Args {
    /// The prefix cache these flags ask for (a run-time setting: no part of the result).
    pub fn prefix_cache(&self) -> Option<Arc<PrefixCache>> {
        match &self.prefix_cache_file {
            Some(file) => Some(Arc::new(PrefixCache::with_file(file.clone()))),
            None => self.prefix_cache.then(Default::default),
        }
    }

    /// Overwrites `c`'s fields with the flags given.
    pub(crate) fn apply(&self, c: &mut TrainConfig) -> Result<()> {
        macro_rules! set {
            ($($field:ident),*) => { $( if let Some(v) = self.$field { c.$field = v; } )* };
        }
        if let Some(t) = &self.targets {
            c.targets = t.clone();
        }
        if let Some(l) = &self.lora_layers {
            c.lora_layers = Some(l.clone());
        }
        set!(
            lora_r,
            lora_alpha,
            lora_dropout,
            heads,
            aux_weight,
            label_smoothing,
            lr,
            head_lr,
            weight_decay,
            warmup_ratio,
            schedule,
            batch_tokens,
            grad_accum,
            epochs,
            clip,
            save_every,
            seed,
            loss_scale_init,
            loss_scale_growth_interval
        );
        // A plain flag can only switch its setting away from the default; when it is absent
        // the setting is left as it is (the default, or a resumed run's saved value).
        let switched = [
            (self.rslora, &mut c.rslora, true),
            (self.no_swap_pairs, &mut c.swap_pairs, false),
            (self.on_baseline, &mut c.on_baseline, true),
            (self.no_recompute_layers, &mut c.recompute_layers, false),
            (self.skip_bad_rows, &mut c.skip_bad_rows, true),
            (self.length_hints, &mut c.format.length_hints, true),
        ];
        for (given, setting, value) in switched {
            if given {
                *setting = value;
            }
        }
        if self.quant.is_some() || self.nf4_blocksize.is_some() || self.no_double_quant {
            let saved = match c.quant {
                Quant::None => QuantKind::None,
                Quant::Bf16 => QuantKind::Bf16,
                Quant::Nf4(_) => QuantKind::Nf4,
            };
            c.quant = QuantArgs {
                quant: self.quant.unwrap_or(saved),
                nf4_blocksize: self.nf4_blocksize,
                no_double_quant: self.no_double_quant,
            }
            .quant()?;
        }
        if let Some(m) = &self.model {
            c.model = absolute(m)?;
        }
        if let Some(t) = &self.train {
            c.train = absolute(t)?;
        }
        if let Some(v) = &self.valid {
            c.valid = Some(absolute(v)?);
        }
        if let Some(w) = self.warmup_steps {
            c.warmup_steps = Some(w);
        }
        if let Some(m) = self.max_steps {
            c.max_steps = Some(m);
        }
        if let Some(e) = self.eval_every {
            c.eval_every = Some(e);
        }
        if let Some(v) = self.max_len {
            c.format.max_len = v;
        }
        if let Some(v) = self.prompt_cap {
            c.format.prompt_cap = v;
        }
        if let Some(v) = self.min_part {
            c.format.min_part = v;
        }
        Ok(())
    }

    /// The run these flags ask for: a new one in `--out`, or `--resume`'s saved one (flags
    /// given with `--resume` must match it).
    pub fn resolve(&self) -> Result<RunRequest> {
        if let Some(run) = &self.resume {
            if let Some(out) = &self.out {
                ensure!(
                    absolute(out)? == absolute(run)?,
                    "--out {} differs from --resume {}",
                    out.display(),
                    run.display()
                );
            }
            let saved = read_config(run)?;
            let mut asked = saved.clone();
            self.apply(&mut asked)?;
            let differences = differences(&saved, &asked)?;
            if !differences.is_empty() {
                bail!(
                    "--resume {}: flags differ from the run's saved configuration ({}): {}",
                    run.display(),
                    CONFIG_FILE,
                    differences.join("; ")
                );
            }
            return Ok(RunRequest {
                run: run.clone(),
                config: saved,
                resume: true,
            });
        }
        let (Some(model), Some(train), Some(out)) = (&self.model, &self.train, &self.out) else {
            bail!("--model, --train and --out are required unless --resume is given");
        };
        let mut config = TrainConfig::new(absolute(model)?, absolute(train)?);
        self.apply(&mut config)?;
        config.validate()?;
        Ok(RunRequest {
            run: out.clone(),
            config,
            resume: false,
        })
    }
}

/// Reads `run/train_config.json`.
pub fn read_config(run: &Path) -> Result<TrainConfig> {
    let path = run.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "cannot read {} (is {} a training run?)",
            path.display(),
            run.display()
        )
    })?;
    serde_json::from_str(&text)
        .with_context(|| format!("{}: not a training configuration", path.display()))
}

/// `field: saved -> asked` for each field that differs.
fn differences(saved: &TrainConfig, asked: &TrainConfig) -> Result<Vec<String>> {
    let (serde_json::Value::Object(a), serde_json::Value::Object(b)) =
        (serde_json::to_value(saved)?, serde_json::to_value(asked)?)
    else {
        unreachable!("a struct serialises to an object")
    };
    Ok(a.iter()
        .filter(|(k, v)| b.get(*k) != Some(v))
        .map(|(k, v)| format!("{k}: {v} -> {}", b[k]))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn lora_layers_take_last_k_lists_and_ranges() {
        assert_eq!(parse_layers("last:3", 30).unwrap(), vec![27, 28, 29]);
        assert_eq!(parse_layers("5,0-2,1", 30).unwrap(), vec![0, 1, 2, 5]);
        for (bad, says) in [
            ("last:31", "the model has 30 layers"),
            ("last:0", "selects no layer"),
            ("30", "layer 30, but the model has 30 layers"),
            ("4-2", "range 4-2 is empty"),
            ("x", "\"x\" is not a layer number"),
        ] {
            let err = parse_layers(bad, 30).unwrap_err().to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn parse(flags: &[&str]) -> Args {
        Cli::try_parse_from(std::iter::once("train").chain(flags.iter().copied()))
            .unwrap()
            .args
    }

    #[test]
    fn flags_override_defaults_and_boolean_flags_switch_defaults_off() {
        let r = parse(&[
            "--model",
            "m",
            "--train",
            "t.csv",
            "--out",
            "run",
            "--rslora",
            "--no-swap-pairs",
            "--targets",
            "q,v,down",
            "--lr",
            "1e-4",
            "--max-len",
            "512",
        ])
        .resolve()
        .unwrap();
        let c = r.config;
        assert!(c.rslora && !c.swap_pairs);
        assert_eq!(c.targets, [Projection::Q, Projection::V, Projection::Down]);
        assert_eq!(
            (c.lr, c.head_lr, c.format.max_len, c.format.prompt_cap),
            (1e-4, 1e-3, 512, 256)
        );
        assert!(c.model.is_absolute() && !r.resume);
    }

    #[test]
    fn quant_flags_build_the_loader_setting() {
        let base = ["--model", "m", "--train", "t.csv", "--out", "run"];
        let quant = |extra: &[&str]| {
            let flags: Vec<&str> = base.iter().chain(extra).copied().collect();
            parse(&flags).resolve().map(|r| r.config.quant)
        };
        assert_eq!(quant(&[]).unwrap(), Quant::None);
        let nf4 = crate::quant::nf4::Nf4Options::default();
        assert_eq!(quant(&["--quant", "nf4"]).unwrap(), Quant::Nf4(nf4));
        assert_eq!(quant(&["--quant", "bf16"]).unwrap(), Quant::Bf16);
        assert!(quant(&["--quant", "bf16", "--no-double-quant"]).is_err());
        let small = quant(&[
            "--quant",
            "nf4",
            "--nf4-blocksize",
            "128",
            "--no-double-quant",
        ])
        .unwrap();
        assert_eq!(
            small,
            Quant::Nf4(crate::quant::nf4::Nf4Options {
                blocksize: 128,
                double_quant: false
            })
        );
        assert!(
            quant(&["--nf4-blocksize", "128"]).is_err(),
            "NF4 options need --quant nf4"
        );
    }

    #[test]
    fn resume_takes_the_saved_config_and_refuses_a_different_one() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        let mut saved = TrainConfig::new("/m".into(), "/t.csv".into());
        saved.lr = 5e-5;
        crate::atomic::write_json(&run.join(CONFIG_FILE), &saved).unwrap();
        let run_s = run.to_str().unwrap();
        let r = parse(&["--resume", run_s]).resolve().unwrap();
        assert!(
            r.resume && r.config == saved,
            "no flags: the saved config, not the defaults"
        );
        assert!(parse(&["--resume", run_s, "--lr", "5e-5"])
            .resolve()
            .is_ok());
        let err = parse(&["--resume", run_s, "--lr", "1e-4", "--seed", "3"])
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("lr: 0.00005 -> 0.0001") && err.contains("seed: 0 -> 3"),
            "{err}"
        );
    }
}
