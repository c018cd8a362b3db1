//! `verdict train`: QLoRA fine-tuning of a decoder as a 3-way preference classifier.
//!
//! Place in the data flow:
//! ```text
//! train.csv -> Battle (+ its A/B swap) -> token ids -> batches (length-bucketed, seeded)
//!   -> Model::loss_and_grads (decoder + LoRA + heads, explicit backward) -> accumulate
//!   -> clip -> AdamW -> Model::write_params -> checkpoint (PEFT adapter + optimizer state)
//! valid.csv -> predict::predict_battles (swap TTA) -> log loss, accuracy   every --eval-every
//! ```
//! A run folder (see `checkpoint`) is itself a PEFT adapter folder; `metrics.jsonl` gets one
//! line per step and per validation, `loss.png` and `summary.json` come at the end.
//!
//! Determinism: the data order is a function of (seed, epoch), initialisations and dropout
//! draw from streams derived from the seed, and a checkpoint holds the parameters and AdamW
//! moments exactly; so a run killed at any moment and resumed ends with the same adapter
//! bytes as one that never stopped (tests/train_loop.rs kills a real process to check).

pub mod batches;
pub mod checkpoint;
pub mod config;
pub mod cv;
pub mod optimizer;
pub mod scaler;
pub mod schedule;

pub use config::{Args, Heads, TrainConfig};

use crate::backend::placement::{Job, Placement};
use crate::backend::{Backend, BackendInfo, MemoryReport};
use crate::baseline::{BaselineConfig, BaselineModel};
use crate::data::format::{Formatter, View};
use crate::data::{read_battles, report_skipped, Battle, ReadOptions, Winner};
use crate::metrics;
use crate::model::decoder::PrefixCache;
use crate::model::peft::{self, AdapterSettings};
use crate::model::trainable::{LoraConfig, LossOptions, ParamSpec, Target};
use crate::model::{HeadKind, Model, PackedBatch};
use crate::plot::{self, Series, Style};
use crate::predict::{self, PredictOptions};
use crate::progress::Progress;
use crate::submission::write_predictions;
use anyhow::{bail, ensure, Context, Result};
use batches::{derive_seed, Plan};
use checkpoint::{Restored, TrainerState};
use optimizer::{AdamW, AdamWConfig, DeviceAdamW};
use scaler::{LossScaler, ScaleChange};
use schedule::Schedule;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// The final model's swap-TTA predictions of the validation rows, in the run folder.
pub const VALID_PREDICTIONS: &str = "valid_predictions.csv";
/// Their raw logits (as `verdict predict --logits-out` writes them).
pub const VALID_LOGITS: &str = "valid_logits.csv";

/// Steps averaged by the running mean of the progress line and of `loss.png`.
const RUNNING_MEAN_STEPS: usize = 20;

/// Run-time settings that do not change a run's result (a resumed run may differ in them),
/// and hooks for tests; a plain run uses the default.
#[derive(Clone, Default)]
pub struct Control {
    /// Stop right after this step, without the final save: what a kill leaves behind.
    pub halt_after_step: Option<usize>,
    /// Serve the frozen prefix's output from this cache (`--prefix-cache`; shared by the
    /// folds of `verdict cv`).
    pub prefix_cache: Option<Arc<PrefixCache>>,
    /// Steps whose gradients get an infinity added (a forced f16 overflow, for the loss
    /// scaler's tests: [`OVERFLOW_ENV`]).
    pub overflow_at: Vec<usize>,
}

/// `VERDICT_INJECT_OVERFLOW=STEP[,STEP...]`: a test hook that adds +inf to the first
/// gradient of those steps, as an f16 overflow in the backward would. Under loss scaling the
/// step is skipped and the scale halved; without it the run stops with the non-finite norm.
pub const OVERFLOW_ENV: &str = "VERDICT_INJECT_OVERFLOW";

/// The steps [`OVERFLOW_ENV`] names (none when unset).
fn overflow_steps() -> Result<Vec<usize>> {
    match std::env::var(OVERFLOW_ENV) {
        Err(_) => Ok(Vec::new()),
        Ok(list) => list
            .split(',')
            .map(|s| {
                s.trim()
                    .parse::<usize>()
                    .with_context(|| format!("{OVERFLOW_ENV}={list}: {s:?} is not a step"))
            })
            .collect(),
    }
}

/// Validation scores at one step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValidScores {
    pub rows: usize,
    /// Kaggle log loss of the swap-TTA probabilities (what `verdict predict` submits).
    pub log_loss: f64,
    pub accuracy: f64,
    /// Log loss of the battles as given, without the swapped view.
    pub log_loss_no_tta: f64,
}

/// What `summary.json` holds (written by [`train`], read by `verdict cv`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub steps: usize,
    pub epochs: f64,
    pub train_battles: usize,
    pub sequences_per_epoch: usize,
    pub trainable_params: usize,
    pub tokens_seen: u64,
    pub seconds: f64,
    pub tokens_per_s: f64,
    /// Mean training loss over the first and the last k steps, k = steps / 2 capped to 10.
    pub loss_first_10: f64,
    pub loss_last_10: f64,
    pub valid: Option<ValidScores>,
    /// The adapter folder (the run folder itself).
    pub adapter: PathBuf,
    /// Where it trained, and the most device memory the backend held.
    #[serde(with = "BackendInfoFields")]
    pub device: BackendInfo,
    /// Device memory by use at the pool's high-water mark (CUDA and emulated devices).
    #[serde(default)]
    pub memory: Option<MemoryReport>,
    /// What the run did not do, and why: on an allocation-only device (`--emu-alloc-only`)
    /// every step allocated as a real one but computed nothing, so no loss, gradient norm,
    /// optimizer update, checkpoint or adapter came out (the loss fields are NaN, null in
    /// JSON). Empty for a normal run.
    #[serde(default)]
    pub skipped: Vec<String>,
}

/// What an allocation-only run skips (see [`Summary::skipped`]).
pub const ALLOC_ONLY_SKIPPED: &[&str] = &[
    "loss, preference and auxiliary losses: the device is allocation-only (--emu-alloc-only), its kernels did not run",
    "gradient norm, NaN checks, clipping and the AdamW update: no gradient was computed",
    "checkpoints, adapter_config.json, adapter_model.safetensors and loss.png: there are no trained values to write",
    "validation and predictions: refused up front (--valid) under --emu-alloc-only",
];

/// [`BackendInfo`]'s fields, so that `summary.json` reads back (serde's remote derive).
#[derive(Serialize, Deserialize)]
#[serde(remote = "BackendInfo")]
struct BackendInfoFields {
    device: String,
    name: String,
    peak_reserved_bytes: Option<usize>,
}

/// `RUN/summary.json`.
pub const SUMMARY_FILE: &str = "summary.json";

/// One line of `RUN/metrics.jsonl`, told apart by its `kind`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum MetricsRecord {
    Train(TrainRecord),
    Valid(ValidRecord),
}

/// One optimizer step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainRecord {
    pub step: usize,
    pub epoch: f64,
    /// The step's loss, and its preference and auxiliary parts.
    pub loss: f64,
    pub pref_loss: f64,
    pub aux_loss: f64,
    /// Learning rates of the LoRA matrices and of the heads at this step.
    pub lr: f64,
    pub head_lr: f64,
    /// Global gradient norm before clipping (of the unscaled gradients; not finite on an
    /// overflow).
    pub grad_norm: f64,
    /// The loss scale the step's gradients were computed with (`train::scaler`; only where
    /// gradients pass through f16).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<f64>,
    /// The gradients overflowed under loss scaling: no update this step, the scale halved.
    #[serde(default)]
    pub skipped: bool,
    pub tokens: usize,
    pub sequences: usize,
    pub tokens_per_s: f64,
    /// Seconds of training so far, resumed runs included.
    pub elapsed: f64,
}

/// One validation pass.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValidRecord {
    pub step: usize,
    pub epoch: f64,
    /// Log loss of the swap-TTA probabilities, and of the battles as given.
    pub valid_log_loss: f64,
    pub valid_log_loss_no_tta: f64,
    pub valid_accuracy: f64,
    pub rows: usize,
    /// Seconds the pass took.
    pub seconds: f64,
}

impl MetricsRecord {
    fn step(&self) -> usize {
        match self {
            MetricsRecord::Train(r) => r.step,
            MetricsRecord::Valid(r) => r.step,
        }
    }

    /// The JSON line (keys in alphabetical order).
    fn line(&self) -> Result<String> {
        Ok(serde_json::to_value(self)?.to_string())
    }
}

/// How a call to [`train`] ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    Finished(Summary),
    /// Stopped by [`Control::halt_after_step`] after this step.
    Halted(usize),
}

/// `verdict train` on the device `--device` names (the CPU by default).
pub fn run(args: &Args) -> Result<()> {
    if let Some(out) = &args.out {
        crate::atomic::check_output("--out", out, true)?;
    }
    let request = args.resolve()?;
    let control = Control {
        prefix_cache: args.prefix_cache(),
        overflow_at: overflow_steps()?,
        ..Control::default()
    };
    let job = TrainJob {
        request: &request,
        control,
    };
    match args.device.clone().unwrap_or(Placement::Cpu).run(job)? {
        Outcome::Finished(s) if !s.skipped.is_empty() => {
            println!(
                "ran {} allocation-only step(s) of {} tokens on {}: memory measured, nothing \
                 computed; skipped:",
                s.steps, s.tokens_seen, s.device
            );
            for line in &s.skipped {
                println!("  - {line}");
            }
            if let Some(memory) = &s.memory {
                println!("device memory at the pool's high-water mark, by use:");
                print!("{}", memory.table());
            }
            println!("summary -> {}", s.adapter.join(SUMMARY_FILE).display());
            Ok(())
        }
        Outcome::Finished(s) => {
            let valid = s.valid.as_ref().map_or(String::new(), |v| {
                format!(
                    ", valid log loss {:.4} (accuracy {:.3})",
                    v.log_loss, v.accuracy
                )
            });
            println!(
                "trained {} steps in {:.0} s ({:.0} tokens/s) on {}: loss {:.4} -> {:.4}{valid}; adapter -> {}",
                s.steps,
                s.seconds,
                s.tokens_per_s,
                s.device,
                s.loss_first_10,
                s.loss_last_10,
                s.adapter.display()
            );
            if let Some(memory) = &s.memory {
                eprintln!("[train] device memory at the pool's high-water mark, by use:");
                eprint!("{}", memory.table());
            }
            Ok(())
        }
        Outcome::Halted(step) => bail!("halted after step {step}"),
    }
}

/// `verdict train` as a [`Job`]: one run on the one backend the placement opens.
struct TrainJob<'a> {
    request: &'a config::RunRequest,
    control: Control,
}

impl Job for TrainJob<'_> {
    type Output = Outcome;

    fn run<B: Backend>(self, backends: &[B]) -> Result<Outcome> {
        let r = self.request;
        train(
            one_device(backends)?,
            &r.run,
            &r.config,
            r.resume,
            self.control,
        )
    }
}

/// The single backend of a training placement (`--devices` shares inference work only).
pub(crate) fn one_device<B: Backend>(backends: &[B]) -> Result<&B> {
    match backends {
        [one] => Ok(one),
        _ => bail!("training runs on one device; give --device, not several"),
    }
}

/// Training examples: each battle as given and, with swap pairs, its A/B swap.
struct Examples {
    /// Sequence `e * views + v` is example `e`, view `v` (0: as given, 1: swapped).
    sequences: Vec<Vec<u32>>,
    /// (label, model_a index, model_b index) of each sequence.
    labels: Vec<(Winner, Option<u32>, Option<u32>)>,
    /// Each sequence's logit offset (`--on-baseline`; zeros without).
    offsets: Vec<[f32; 3]>,
    views: usize,
}

impl Examples {
    fn build(
        battles: &[Battle],
        formatter: &Formatter,
        swap: bool,
        model_names: &[String],
        vocab: usize,
        base: Option<&BaselineModel>,
    ) -> Result<Examples> {
        let index = |name: &Option<String>| {
            name.as_ref()
                .and_then(|n| model_names.binary_search(n).ok())
                .map(|i| i as u32)
        };
        let read_as = View::whole(swap);
        let views = read_as.len();
        let sequences = formatter.encode_views(battles, read_as, vocab)?;
        let mut labels = Vec::with_capacity(sequences.len());
        for b in battles {
            let w = b
                .winner
                .with_context(|| format!("training battle {} has no label", b.id))?;
            labels.push((w, index(&b.model_a), index(&b.model_b)));
            if swap {
                labels.push((w.swapped(), index(&b.model_b), index(&b.model_a)));
            }
        }
        let offsets = match base {
            Some(base) => base
                .log_prob_views(battles)?
                .into_iter()
                .flat_map(|v| v.into_iter().take(views))
                .collect(),
            None => vec![[0.0; 3]; sequences.len()],
        };
        Ok(Examples {
            sequences,
            labels,
            offsets,
            views,
        })
    }

    fn example_lengths(&self) -> Vec<usize> {
        self.sequences
            .chunks(self.views)
            .map(|c| c.iter().map(Vec::len).sum())
            .collect()
    }

    /// The sequences and targets of a batch of examples.
    fn batch(&self, examples: &[usize], aux: bool) -> (PackedBatch, Vec<Target>) {
        let rows: Vec<usize> = examples
            .iter()
            .flat_map(|&e| e * self.views..(e + 1) * self.views)
            .collect();
        let seqs: Vec<&[u32]> = rows.iter().map(|&j| self.sequences[j].as_slice()).collect();
        let targets = rows
            .iter()
            .map(|&j| {
                let (winner, a, b) = self.labels[j];
                Target {
                    winner,
                    offset: self.offsets[j],
                    model_a: if aux { a } else { None },
                    model_b: if aux { b } else { None },
                }
            })
            .collect();
        (PackedBatch::new(&seqs), targets)
    }

    /// FNV-1a over every id and sequence boundary: resuming on changed data is an error.
    fn fingerprint(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for s in &self.sequences {
            for &v in s.iter().chain(std::iter::once(&u32::MAX)) {
                h = (h ^ v as u64).wrapping_mul(0x0100_0000_01b3);
            }
        }
        h
    }
}

/// Sorted distinct model names of the training battles: the aux heads' classes.
fn model_vocabulary(battles: &[Battle]) -> Vec<String> {
    let mut names: Vec<String> = battles
        .iter()
        .flat_map(|b| [&b.model_a, &b.model_b])
        .flatten()
        .cloned()
        .collect();
    names.sort();
    names.dedup();
    names
}

/// What a prefix cache file's hidden states come from: the model's weight files (name,
/// size, modification time), the quantization and the device kind (CPU and CUDA round
/// differently).
fn prefix_origin(config: &TrainConfig, device: &BackendInfo) -> Result<String> {
    let dir = &config.model;
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".safetensors") {
            let meta = entry.metadata()?;
            let modified = meta
                .modified()?
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            files.push(format!("{name}:{}:{modified}", meta.len()));
        }
    }
    files.sort();
    let kind = device.device.split(':').next().unwrap_or_default();
    Ok(format!(
        "{} [{}] quant {:?} on {kind}",
        dir.display(),
        files.join(", "),
        config.quant
    ))
}

/// `--on-baseline`'s baseline: `verdict baseline fit`'s default model on the training rows.
fn fit_base(battles: &[Battle]) -> Result<BaselineModel> {
    let base = BaselineModel::fit_battles(battles, &BaselineConfig::default())?;
    eprintln!(
        "[train] --on-baseline: length baseline with {} buckets fitted on {} rows",
        base.buckets, base.train_rows
    );
    Ok(base)
}

/// The base model as a 3-label classifier with fresh LoRA adapters (and aux heads).
fn build_model<B: Backend>(
    backend: &B,
    config: &TrainConfig,
    model_names: usize,
) -> Result<Model<B>> {
    let mut model = Model::load(backend, &config.model, None, config.quant)?;
    match model.spec.head {
        HeadKind::SequenceClassification { num_labels: 3 } => {}
        HeadKind::SequenceClassification { num_labels } => bail!(
            "{}: {} has {num_labels} labels; the preference classifier needs 3",
            config.model.display(),
            model.spec.architecture
        ),
        // A new score head, as transformers' *ForSequenceClassification made from a causal
        // checkpoint, but zero-initialised: real hidden states have norms of 20-60, so
        // normal(0, 0.02) starts far from uniform (SmolLM2-135M: step-1 loss 1.55 vs ln 3).
        HeadKind::CausalLm { .. } => {
            model.add_score_head(backend, 3, 0.0, derive_seed(config.seed, "score-init", 0))
        }
    }
    let lora = LoraConfig {
        r: config.lora_r,
        alpha: config.lora_alpha,
        targets: config.targets.clone(),
        rslora: config.rslora,
        dropout: config.lora_dropout,
        layers: config.lora_layers(model.decoder.num_layers())?,
    };
    model.add_lora(backend, &lora, derive_seed(config.seed, "lora-init", 0))?;
    if config.heads == Heads::Three {
        ensure!(
            model_names > 0,
            "--heads three: the training data names no models (model_a / model_b are empty)"
        );
        model.add_aux_heads(
            backend,
            model_names,
            derive_seed(config.seed, "aux-init", 0),
        );
    }
    Ok(model)
}

/// `RUN/metrics.jsonl`: one [`MetricsRecord`] per line, appended as the run goes.
struct MetricsLog {
    path: PathBuf,
    records: Vec<MetricsRecord>,
}

impl MetricsLog {
    /// Opens the log, keeping only records up to `step` (a resumed run redoes the rest; a
    /// line cut by a kill is dropped).
    fn open(run: &Path, step: usize) -> Result<MetricsLog> {
        let path = run.join("metrics.jsonl");
        let mut records = Vec::new();
        if let Ok(text) = std::fs::read_to_string(&path) {
            records = text
                .lines()
                .filter_map(|l| serde_json::from_str::<MetricsRecord>(l).ok())
                .filter(|r| r.step() <= step)
                .collect();
        }
        let log = MetricsLog { path, records };
        crate::atomic::write_with(&log.path, |w| {
            for r in &log.records {
                writeln!(w, "{}", r.line()?)?;
            }
            Ok(())
        })?;
        Ok(log)
    }

    fn push(&mut self, record: MetricsRecord) -> Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.path)
            .with_context(|| format!("cannot open {}", self.path.display()))?;
        // One write per line, so a kill leaves at most one cut line (dropped on resume).
        file.write_all(format!("{}\n", record.line()?).as_bytes())
            .with_context(|| format!("cannot write {}", self.path.display()))?;
        self.records.push(record);
        Ok(())
    }

    fn train(&self) -> impl Iterator<Item = &TrainRecord> {
        self.records.iter().filter_map(|r| match r {
            MetricsRecord::Train(t) => Some(t),
            MetricsRecord::Valid(_) => None,
        })
    }

    fn valid(&self) -> impl Iterator<Item = &ValidRecord> {
        self.records.iter().filter_map(|r| match r {
            MetricsRecord::Valid(v) => Some(v),
            MetricsRecord::Train(_) => None,
        })
    }

    fn has_valid_at(&self, step: usize) -> bool {
        self.valid().any(|r| r.step == step)
    }
}

/// The validation set and when to score it: every `--eval-every` steps and at the last step.
struct Validator {
    battles: Vec<Battle>,
    /// `--on-baseline`'s fitted baseline.
    base: Option<BaselineModel>,
    truth: Vec<Winner>,
    every: Option<usize>,
    total_steps: usize,
    batch_tokens: usize,
}

impl Validator {
    /// Reads a labelled CSV.
    fn read(
        path: &Path,
        read: ReadOptions,
        config: &TrainConfig,
        total_steps: usize,
        base: Option<BaselineModel>,
    ) -> Result<Validator> {
        let (battles, stats) = read_battles(path, read)?;
        report_skipped(path, &stats);
        ensure!(
            !battles.is_empty(),
            "{}: no validation rows",
            path.display()
        );
        let truth = battles
            .iter()
            .map(|b| {
                b.winner
                    .with_context(|| format!("{}: battle {} has no label", path.display(), b.id))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Validator {
            battles,
            base,
            truth,
            every: config.eval_every,
            total_steps,
            batch_tokens: config.batch_tokens,
        })
    }

    fn due(&self, step: usize) -> bool {
        step == self.total_steps || self.every.is_some_and(|e| step % e == 0)
    }

    /// Scores the model through the prediction path `verdict predict` uses, and logs it.
    fn run<B: Backend>(
        &self,
        run: &Path,
        backend: &B,
        model: &Model<B>,
        formatter: &Formatter,
        plan: &Plan,
        step: usize,
        log: &mut MetricsLog,
    ) -> Result<()> {
        let start = Instant::now();
        let options = PredictOptions {
            tta_swap: true,
            batch_tokens: self.batch_tokens,
            base: self.base.as_ref(),
        };
        let (rows, _) = predict::predict_battles(backend, model, formatter, &self.battles, options)
            .with_context(|| format!("validation at step {step}"))?;
        if step == self.total_steps {
            // The final model's validation predictions: out-of-fold rows for `verdict cv`
            // and members for `verdict ensemble`.
            write_predictions(&run.join(VALID_PREDICTIONS), &predict::predictions(&rows))?;
            predict::write_logits(&run.join(VALID_LOGITS), &rows)?;
        }
        let probs: Vec<metrics::Probs> = rows.iter().map(|r| r.probs).collect();
        let plain: Vec<metrics::Probs> = rows
            .iter()
            .map(|r| metrics::softmax(r.logits.map(f64::from)))
            .collect();
        let scores = metrics::score(&probs, &self.truth);
        let no_tta = metrics::log_loss(&plain, &self.truth);
        eprintln!(
            "[valid] step {step}: log loss {:.4} (no TTA {no_tta:.4}), accuracy {:.3}",
            scores.log_loss, scores.accuracy
        );
        log.push(MetricsRecord::Valid(ValidRecord {
            step,
            epoch: plan.epoch_progress(step),
            valid_log_loss: scores.log_loss,
            valid_log_loss_no_tta: no_tta,
            valid_accuracy: scores.accuracy,
            rows: self.battles.len(),
            seconds: start.elapsed().as_secs_f64(),
        }))
    }
}

/// The first non-finite value of each vector, as an error naming its parameter and step.
fn check_finite(what: &str, names: &[String], values: &[Vec<f32>], step: usize) -> Result<()> {
    for (name, v) in names.iter().zip(values) {
        if let Some((i, x)) = v.iter().enumerate().find(|(_, x)| !x.is_finite()) {
            bail!("step {step}: {what} of {name} is {x} at element {i}; stopping before anything is saved");
        }
    }
    Ok(())
}

/// Trains (or continues) the run in `run` with `config` on `backend`: [`Session::open`],
/// then [`Session::step`] for each remaining step (each logged, saved and validated as the
/// flags say), then [`finish`].
pub fn train<B: Backend>(
    backend: &B,
    run: &Path,
    config: &TrainConfig,
    resume: bool,
    control: Control,
) -> Result<Outcome> {
    let (mut s, mut state) = Session::open(backend, run, config, resume, &control)?;
    let run_start = Instant::now();
    let base_elapsed = state.elapsed_s;
    let mut progress = Progress::new("train", s.plan.total_steps - state.step);
    let mut recent: Vec<f64> = Vec::new();

    for step in state.step + 1..=s.plan.total_steps {
        let step_start = Instant::now();
        let done = s.step(step)?;
        state.step = step;
        state.position = Some(s.plan.position(step));
        state.tokens_seen += done.tokens as u64;
        state.elapsed_s = base_elapsed + run_start.elapsed().as_secs_f64();
        state.loss_scaler = s.scaler;
        state.optimizer_steps = Some(s.adam.step);
        let step_seconds = step_start.elapsed().as_secs_f64();
        let lr = done.factor * config.lr;
        s.log.push(MetricsRecord::Train(TrainRecord {
            step,
            epoch: s.plan.epoch_progress(step),
            loss: done.loss,
            pref_loss: done.pref_loss,
            aux_loss: done.aux_loss,
            lr,
            head_lr: done.factor * config.head_lr,
            grad_norm: done.grad_norm,
            loss_scale: done.loss_scale,
            skipped: done.skipped,
            tokens: done.tokens,
            sequences: done.sequences,
            tokens_per_s: if backend.computes_values() {
                done.tokens as f64 / step_seconds.max(1e-9)
            } else {
                f64::NAN
            },
            elapsed: state.elapsed_s,
        }))?;
        recent.push(done.loss);
        if recent.len() > RUNNING_MEAN_STEPS {
            recent.remove(0);
        }
        let mean = recent.iter().sum::<f64>() / recent.len() as f64;
        let scale = match (done.loss_scale, done.skipped) {
            (Some(scale), true) => format!(" loss scale {scale} overflowed: step skipped"),
            (Some(scale), false) => format!(" loss scale {scale}"),
            (None, _) => String::new(),
        };
        progress.advance(
            1,
            done.tokens,
            &format!(
                "step {step}/{} loss {:.4} (mean {mean:.4}) lr {lr:.2e}{scale}",
                s.plan.total_steps, done.loss
            ),
        );

        // Save before validating: a kill during a long validation then loses no training.
        let save_due =
            step == s.plan.total_steps || (config.save_every > 0 && step % config.save_every == 0);
        if save_due && backend.computes_values() {
            let params = s.model.read_params(backend);
            check_finite("updated value", &s.names, &params, step)?;
            let adam = s.adam.download(backend);
            checkpoint::save(run, &s.settings, &params, &adam, &state)?;
            if let Some(cache) = &control.prefix_cache {
                cache.save()?;
            }
        }
        s.validate_if_due(step)?;
        if control.halt_after_step == Some(step) {
            return Ok(Outcome::Halted(step));
        }
    }

    if let Some(cache) = &control.prefix_cache {
        // The validation sequences joined it after the last save.
        cache.save()?;
    }
    let summary = finish(&s, &state)?;
    Ok(Outcome::Finished(summary))
}

/// An opened run: its data, model, batching plan and optimizer, between steps.
struct Session<'a, B: Backend> {
    backend: &'a B,
    run: &'a Path,
    config: &'a TrainConfig,
    battles: Vec<Battle>,
    formatter: Formatter,
    model: Model<B>,
    examples: Examples,
    plan: Plan,
    valid: Option<Validator>,
    schedule: Schedule,
    specs: Vec<ParamSpec>,
    names: Vec<String>,
    settings: AdapterSettings,
    /// AdamW with its moments on the device; the parameters are the model's own buffers.
    adam: DeviceAdamW<B>,
    /// Dynamic loss scaling, where gradients pass through f16 ([`Backend::gradients_in_f16`]).
    scaler: Option<LossScaler>,
    /// [`Control::overflow_at`].
    overflow_at: Vec<usize>,
    log: MetricsLog,
}

/// What one optimizer step did.
struct StepDone {
    /// The schedule's learning-rate factor at this step.
    factor: f64,
    loss: f64,
    pref_loss: f64,
    aux_loss: f64,
    grad_norm: f64,
    /// The loss scale of this step's gradients (under loss scaling).
    loss_scale: Option<f64>,
    /// Overflowed under loss scaling: no update.
    skipped: bool,
    tokens: usize,
    sequences: usize,
}

impl<'a, B: Backend> Session<'a, B> {
    /// Checks the run folder, reads the data, loads the model with fresh adapters and heads,
    /// and plans the batches; then writes a new run's config, or takes a resumed run's
    /// parameters and optimizer state from its latest checkpoint and finishes what a kill
    /// interrupted (the last saved step's validation, the published adapter). Returns the
    /// session and the state training starts from.
    fn open(
        backend: &'a B,
        run: &'a Path,
        config: &'a TrainConfig,
        resume: bool,
        control: &Control,
    ) -> Result<(Session<'a, B>, TrainerState)> {
        config.validate()?;
        if !backend.computes_values() {
            let device = backend.describe().device;
            ensure!(
                !resume,
                "--resume on {device}: an allocation-only device (--emu-alloc-only) has no \
                 values to continue from"
            );
            ensure!(
                config.valid.is_none(),
                "--valid on {device}: an allocation-only device (--emu-alloc-only) computes \
                 no predictions to validate; drop --valid"
            );
            ensure!(
                control.prefix_cache.is_none(),
                "--prefix-cache on {device}: an allocation-only device (--emu-alloc-only) \
                 computes no hidden states to cache"
            );
        }
        if resume {
            ensure!(
                run.join(config::CONFIG_FILE).exists(),
                "--resume {}: no {} there",
                run.display(),
                config::CONFIG_FILE
            );
        } else if run.exists() && std::fs::read_dir(run)?.next().is_some() {
            bail!(
                "{} already exists and is not empty; use --resume {0} to continue a run",
                run.display()
            );
        }
        let read = ReadOptions {
            skip_bad_rows: config.skip_bad_rows,
        };
        let (battles, stats) = read_battles(&config.train, read)?;
        report_skipped(&config.train, &stats);
        ensure!(
            !battles.is_empty(),
            "{}: no training rows",
            config.train.display()
        );
        // A resumed run keeps its saved baseline (refitting would give the same one, unless
        // the kill came before it was saved).
        let base_path = run.join(predict::BASE_FILE);
        let base = if !config.on_baseline {
            None
        } else if resume && base_path.exists() {
            Some(BaselineModel::load(&base_path)?)
        } else {
            Some(fit_base(&battles)?)
        };
        let formatter = Formatter::from_model_dir(&config.model, config.format)?;
        let model_names = model_vocabulary(&battles);
        let mut model = build_model(backend, config, model_names.len())?;
        backend
            .check()
            .with_context(|| format!("loading {}", config.model.display()))?;
        if let Some(cache) = &control.prefix_cache {
            cache.open(&prefix_origin(config, &backend.describe())?)?;
            model.decoder.attach_prefix_cache(cache.clone())?;
        }
        let examples = Examples::build(
            &battles,
            &formatter,
            config.swap_pairs,
            &model_names,
            model.spec.decoder.vocab_size,
            base.as_ref(),
        )?;
        let plan = Plan::new(
            &examples.example_lengths(),
            config.batch_tokens,
            config.grad_accum,
            config.epochs,
            config.max_steps,
            config.seed,
        );
        let valid = match &config.valid {
            Some(path) => Some(Validator::read(
                path,
                read,
                config,
                plan.total_steps,
                base.clone(),
            )?),
            None => None,
        };
        let warmup = config
            .warmup_steps
            .unwrap_or_else(|| Schedule::warmup_from_ratio(config.warmup_ratio, plan.total_steps));
        let schedule = Schedule {
            kind: config.schedule,
            warmup,
            total: plan.total_steps,
        };
        let specs = model.trainable_params();
        let names: Vec<String> = specs.iter().map(|p| p.name.clone()).collect();
        let settings = AdapterSettings {
            r: config.lora_r,
            lora_alpha: config.lora_alpha,
            lora_dropout: config.lora_dropout,
            use_rslora: config.rslora,
            target_modules: config
                .targets
                .iter()
                .map(|t| t.peft_name().to_string())
                .collect(),
            base_model: config.model.display().to_string(),
            layers_to_transform: config.lora_layers(model.decoder.num_layers())?,
        };
        let adam_config = AdamWConfig {
            weight_decay: config.weight_decay,
            ..AdamWConfig::default()
        };
        let shapes: Vec<(String, Vec<usize>)> = specs
            .iter()
            .map(|p| (p.name.clone(), p.shape.clone()))
            .collect();
        let fingerprint = examples.fingerprint();

        if !resume {
            std::fs::create_dir_all(run)
                .with_context(|| format!("cannot create {}", run.display()))?;
            crate::atomic::write_json(&run.join(config::CONFIG_FILE), config)?;
            crate::atomic::write_json(&run.join("model_names.json"), &model_names)?;
        }
        if let Some(base) = base.as_ref().filter(|_| !base_path.exists()) {
            crate::atomic::write_json(&base_path, base)?;
        }
        let restored = match checkpoint::latest(run)? {
            Some(dir) if resume => {
                let r = checkpoint::load(&dir, &shapes, adam_config)?;
                ensure!(
                    r.state.total_steps == plan.total_steps && r.state.data_fingerprint == fingerprint,
                    "{}: the training data or batching differ from the run's (steps {} vs {}); cannot resume",
                    dir.display(),
                    r.state.total_steps,
                    plan.total_steps
                );
                model.write_params(backend, &r.params);
                eprintln!(
                    "[train] resuming {} at step {}/{}",
                    run.display(),
                    r.state.step,
                    plan.total_steps
                );
                r
            }
            _ => Restored {
                state: TrainerState {
                    step: 0,
                    total_steps: plan.total_steps,
                    position: None,
                    elapsed_s: 0.0,
                    tokens_seen: 0,
                    data_fingerprint: fingerprint,
                    params: shapes,
                    loss_scaler: None,
                    optimizer_steps: None,
                },
                // The model holds the fresh parameters on the device.
                params: Vec::new(),
                adam: AdamW::new(
                    adam_config,
                    &specs
                        .iter()
                        .map(|p| p.shape.iter().product())
                        .collect::<Vec<_>>(),
                ),
            },
        };
        let Restored { state, adam, .. } = restored;
        let adam = DeviceAdamW::upload(backend, &adam);
        let scaler = backend.gradients_in_f16().then(|| {
            state.loss_scaler.unwrap_or_else(|| {
                LossScaler::new(config.loss_scale_init, config.loss_scale_growth_interval)
            })
        });
        let log = MetricsLog::open(run, state.step)?;
        let mut session = Session {
            backend,
            run,
            config,
            battles,
            formatter,
            model,
            examples,
            plan,
            valid,
            schedule,
            specs,
            names,
            settings,
            adam,
            scaler,
            overflow_at: control.overflow_at.clone(),
            log,
        };
        if state.step > 0 {
            // A run killed after a save but before that step's validation or publishing
            // finishes them first: the parameters are the same as then.
            if !session.log.has_valid_at(state.step) {
                session.validate_if_due(state.step)?;
            }
            if let Some(dir) = checkpoint::latest(run)? {
                checkpoint::publish(run, &dir)?;
            }
        }
        Ok((session, state))
    }

    /// One optimizer step: the step's micro-batches forward and backward, gradients
    /// accumulated and clipped, AdamW, the new parameters on the model.
    fn step(&mut self, step: usize) -> Result<StepDone> {
        let (config, backend) = (self.config, self.backend);
        let aux = config.heads == Heads::Three;
        let factor = self.schedule.factor(step);
        let lrs: Vec<f64> = self
            .names
            .iter()
            .map(|n| {
                factor
                    * if peft::is_head(n) {
                        config.head_lr
                    } else {
                        config.lr
                    }
            })
            .collect();
        let micro = self.plan.step_batches(step);
        let step_sequences: usize = micro.iter().map(|b| b.len() * self.examples.views).sum();
        let loss_scale = self.scaler.map(|s| s.scale);
        // Gradients stay on the device, each micro-batch's multiplied by its share of the
        // step's sequences (and the loss scale) as the backward makes them, then summed.
        let mut grads: Option<Vec<B::Buf>> = None;
        let (mut loss, mut pref_loss, mut aux_loss, mut tokens) = (0.0, 0.0, 0.0, 0usize);
        for (k, batch_examples) in micro.iter().enumerate() {
            let (batch, targets) = self.examples.batch(batch_examples, aux);
            let options = LossOptions {
                label_smoothing: config.label_smoothing,
                aux_weight: if aux { config.aux_weight } else { 0.0 },
                recompute_layers: config.recompute_layers,
                dropout_seed: derive_seed(
                    config.seed,
                    "dropout",
                    ((step - 1) * config.grad_accum + k) as u64,
                ),
            };
            let weight = batch.sequences() as f64 / step_sequences as f64;
            let grad_scale = (weight * loss_scale.unwrap_or(1.0)) as f32;
            let result = self
                .model
                .loss_and_device_grads(backend, &batch, &targets, &options, grad_scale);
            // A device error (out of memory, a fault) comes first: it explains whatever else
            // went wrong, e.g. the NaN values a failed device hands back.
            backend.check().with_context(|| {
                format!(
                    "step {step}: a batch of {} tokens (--batch-tokens {}, --max-len {})",
                    batch.tokens(),
                    config.batch_tokens,
                    config.format.max_len
                )
            })?;
            let (report, g) = result.with_context(|| format!("step {step}"))?;
            tokens += report.tokens;
            grads = Some(match grads {
                None => g,
                Some(mut acc) => {
                    for (a, g) in acc.iter_mut().zip(&g) {
                        backend.add(a, g);
                    }
                    acc
                }
            });
            if !backend.computes_values() {
                // Allocation-only: the step allocated as a real one; nothing was computed,
                // so there is no loss or gradient to check.
                continue;
            }
            if !report.loss.is_finite() {
                let ids: Vec<&str> = batch_examples
                    .iter()
                    .map(|&e| self.battles[e].id.as_str())
                    .collect();
                bail!(
                    "step {step}: loss is {} on battles {}; stopping before anything is saved",
                    report.loss,
                    ids.join(", ")
                );
            }
            loss += weight * report.loss;
            pref_loss += weight * report.pref_loss;
            aux_loss += weight * report.aux_loss;
        }
        let mut grads = grads.expect("a step has at least one micro-batch");
        let done = |grad_norm: f64, skipped: bool| StepDone {
            factor,
            loss,
            pref_loss,
            aux_loss,
            grad_norm,
            loss_scale,
            skipped,
            tokens,
            sequences: step_sequences,
        };
        if !backend.computes_values() {
            // No norm, clipping or AdamW: no gradients (the moments are allocated).
            return Ok(StepDone {
                loss: f64::NAN,
                pref_loss: f64::NAN,
                aux_loss: f64::NAN,
                ..done(f64::NAN, false)
            });
        }
        if self.overflow_at.contains(&step) {
            let mut inf = vec![0.0f32; self.specs[0].shape.iter().product()];
            inf[0] = f32::INFINITY;
            backend.add(&mut grads[0], &backend.upload(&inf));
        }
        // The global norm from one squared norm per tensor: the only read-back of the step.
        let squares = backend.squared_norms(&grads.iter().collect::<Vec<_>>());
        backend
            .check()
            .with_context(|| format!("step {step}: gradient norm"))?;
        let scale = loss_scale.unwrap_or(1.0);
        let grad_norm = squares.iter().sum::<f64>().sqrt() / scale;
        if !grad_norm.is_finite() {
            if let Some(scaler) = &mut self.scaler {
                // An f16 overflow: skip the update (AdamW's step count stays), halve the scale.
                scaler.update(true);
                eprintln!(
                    "[train] step {step}: gradients overflowed at loss scale {scale}: step \
                     skipped, scale lowered to {}",
                    scaler.scale
                );
                return Ok(done(grad_norm, true));
            }
            let name = self
                .names
                .iter()
                .zip(&squares)
                .find(|(_, s)| !s.is_finite())
                .map_or("?", |(n, _)| n.as_str());
            bail!(
                "step {step}: gradient norm is {grad_norm} (gradient of {name} is not finite); \
                 stopping before anything is saved"
            );
        }
        // Unscaling and clipping in one factor, applied as AdamW reads each gradient (the
        // scale is a power of two, so the unscaling itself is exact).
        let grad_scale = (optimizer::clip_factor(grad_norm, config.clip) / scale) as f32;
        self.adam.update(
            backend,
            self.model.trainable_buffers_mut(),
            &grads,
            &lrs,
            grad_scale,
        );
        if let Some(scaler) = &mut self.scaler {
            if scaler.update(false) == ScaleChange::Doubled {
                eprintln!(
                    "[train] step {step}: {} clean steps, loss scale raised to {}",
                    scaler.growth_interval, scaler.scale
                );
            }
        }
        Ok(done(grad_norm, false))
    }

    /// Scores the validation set if `--valid` is given and `step` is due.
    fn validate_if_due(&mut self, step: usize) -> Result<()> {
        if let Some(v) = self.valid.as_ref().filter(|v| v.due(step)) {
            v.run(
                self.run,
                self.backend,
                &self.model,
                &self.formatter,
                &self.plan,
                step,
                &mut self.log,
            )?;
        }
        Ok(())
    }
}

/// `loss.png` and `summary.json` from the metrics log.
fn finish<B: Backend>(s: &Session<'_, B>, state: &TrainerState) -> Result<Summary> {
    let (run, log, plan) = (s.run, &s.log, &s.plan);
    let computed = s.backend.computes_values();
    let train_loss: Vec<(f64, f64)> = log.train().map(|r| (r.step as f64, r.loss)).collect();
    if computed {
        loss_chart(&run.join("loss.png"), log)?;
    }
    let mean = |points: &[(f64, f64)]| {
        points.iter().map(|p| p.1).sum::<f64>() / points.len().max(1) as f64
    };
    let valid = log.valid().last().map(|r| ValidScores {
        rows: r.rows,
        log_loss: r.valid_log_loss,
        accuracy: r.valid_accuracy,
        log_loss_no_tta: r.valid_log_loss_no_tta,
    });
    let n = train_loss.len();
    let window = (n / 2).clamp(1, 10).min(n);
    let summary = Summary {
        steps: state.step,
        epochs: plan.epoch_progress(state.step),
        train_battles: s.battles.len(),
        sequences_per_epoch: s.examples.sequences.len(),
        trainable_params: s
            .specs
            .iter()
            .map(|p| p.shape.iter().product::<usize>())
            .sum(),
        tokens_seen: state.tokens_seen,
        seconds: state.elapsed_s,
        // Allocation-only: no speed (NaN, null in JSON): nothing ran.
        tokens_per_s: if computed {
            state.tokens_seen as f64 / state.elapsed_s.max(1e-9)
        } else {
            f64::NAN
        },
        loss_first_10: mean(&train_loss[..window]),
        loss_last_10: mean(&train_loss[n - window..]),
        valid,
        adapter: std::path::absolute(run)?,
        device: s.backend.describe(),
        memory: s.backend.memory_report(),
        skipped: if computed {
            Vec::new()
        } else {
            ALLOC_ONLY_SKIPPED.iter().map(|l| l.to_string()).collect()
        },
    };
    crate::atomic::write_json(&run.join(SUMMARY_FILE), &summary)?;
    Ok(summary)
}

/// `loss.png`: the competition's log loss on the training batches (per step, faint, and its
/// running mean), the auxiliary loss when there is one, and the validation log loss at each
/// evaluation, against the step.
fn loss_chart(path: &Path, log: &MetricsLog) -> Result<()> {
    // The raw per-step loss is noisy (a step is a few battles): show its running mean too.
    let running = |points: &[(f64, f64)]| -> Vec<(f64, f64)> {
        (0..points.len())
            .map(|i| {
                let window = &points[i.saturating_sub(RUNNING_MEAN_STEPS - 1)..=i];
                let mean = window.iter().map(|p| p.1).sum::<f64>() / window.len() as f64;
                (points[i].0, mean)
            })
            .collect()
    };
    let pref: Vec<(f64, f64)> = log.train().map(|r| (r.step as f64, r.pref_loss)).collect();
    let aux: Vec<(f64, f64)> = log.train().map(|r| (r.step as f64, r.aux_loss)).collect();
    let valid: Vec<(f64, f64)> = log
        .valid()
        .map(|r| (r.step as f64, r.valid_log_loss))
        .collect();
    let mut series = vec![
        Series::line("competition log loss, train batch", pref.clone())
            .with_style(Style::Faint)
            .with_color(plot::PALETTE[0]),
        Series::line(
            &format!("competition log loss, train, mean of {RUNNING_MEAN_STEPS} steps"),
            running(&pref),
        )
        .with_color(plot::PALETTE[0]),
    ];
    let has_aux = aux.iter().any(|p| p.1 != 0.0);
    if has_aux {
        series.push(
            Series::line(
                &format!("auxiliary loss, train, mean of {RUNNING_MEAN_STEPS} steps"),
                running(&aux),
            )
            .with_color(plot::PALETTE[1])
            .on_right_axis(),
        );
    }
    if !valid.is_empty() {
        series.push(
            Series::line("competition log loss, valid (swap TTA)", valid)
                .with_style(Style::LinePoints)
                .with_color(plot::PALETTE[2]),
        );
    }
    let axes = plot::Axes {
        x: "step",
        y: "competition log loss (nats per row)",
        y_right: has_aux.then_some("auxiliary loss (nats per row)"),
    };
    plot::line_chart(path, "verdict train", &axes, &series)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A typed record writes the line the log always had (keys sorted, `kind` among them)
    /// and reads back equal: resuming keeps the records an older run wrote.
    #[test]
    fn metrics_record_line_round_trips_with_sorted_keys() {
        let record = MetricsRecord::Valid(ValidRecord {
            step: 10,
            epoch: 0.5,
            valid_log_loss: 1.0,
            valid_log_loss_no_tta: 1.25,
            valid_accuracy: 0.5,
            rows: 7,
            seconds: 2.0,
        });
        let line = record.line().unwrap();
        assert_eq!(
            line,
            r#"{"epoch":0.5,"kind":"valid","rows":7,"seconds":2.0,"step":10,"valid_accuracy":0.5,"valid_log_loss":1.0,"valid_log_loss_no_tta":1.25}"#
        );
        assert_eq!(
            serde_json::from_str::<MetricsRecord>(&line).unwrap(),
            record
        );
    }
}
