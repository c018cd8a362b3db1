//! The response-embedding probe: the frozen decoder as a feature extractor and a linear head
//! fitted on top of the length baseline.
//!
//! Place in the data flow:
//! ```text
//! battle -> response A alone, response B alone -> token ids (cut to --max-len)
//!   -> decoder, bottom --layer layers -> mean over tokens: eA, eB
//!   -> standardised (training rows' mean and spread): zA, zB
//!   -> d = zA - zB, s = (zA + zB) / 2
//!   -> logits = ln p_baseline + (d·w, -d·w, s·v) -> softmax
//! ```
//! Why: on a thousand rows, LoRA fine-tunes that read one pooled token learn little beyond
//! what lengths say; a response's mean hidden state says directly what it is (a refusal, a
//! list, code), and a strongly regularised linear model on it needs little data. Starting
//! from the baseline's log-probabilities (as `train --on-baseline` does) leaves the head only
//! what lengths miss.
//!
//! The head is symmetric by construction: swapping A and B negates `d` and keeps `s`, so it
//! exchanges the A and B probabilities exactly (swap TTA would change nothing); `s` moves the
//! tie against both wins (a term added to all three logits would change nothing). It is fitted
//! by minimising mean cross-entropy + λ·|θ|² (convex) with accelerated gradient descent in
//! f64; λ is chosen by prompt-grouped cross-validation on the training rows.

use crate::backend::placement::{Job, Placement};
use crate::backend::Backend;
use crate::baseline::{self, BaselineConfig, BaselineModel};
use crate::cli::range;
use crate::cli::DeviceArgs;
use crate::data::folds::{grouped_folds, prompt_folds};
use crate::data::format::{FormatOptions, Formatter, View};
use crate::data::{read_battles, report_skipped, Battle, ReadArgs, Side, Winner};
use crate::metrics::{self, softmax, Probs};
use crate::model::{Model, PackedBatch};
use crate::predict::length_sorted_batches;
use crate::progress::Progress;
use crate::quant::{Quant, QuantArgs};
use crate::submission::{write_predictions, Prediction};
use anyhow::{ensure, Context, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Regularisation strengths tried, strongest first (each fit starts from the previous one).
pub const LAMBDAS: [f64; 6] = [30.0, 10.0, 3.0, 1.0, 0.3, 0.1];

/// Folds of the training rows that choose λ.
const SELECTION_FOLDS: usize = 5;

/// Mean hidden states of each battle's two responses.
#[derive(Debug, Clone)]
pub struct Embeddings {
    /// Decoder layers below the states (HF's `hidden_states[layer]`).
    pub layer: usize,
    pub dim: usize,
    /// Per battle, `[A, B]`, each `dim` long.
    pub rows: Vec<[Vec<f32>; 2]>,
}

/// How responses become embeddings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmbedOptions {
    /// Layers to run; `None`: two thirds of the model's (rounded down).
    pub layer: Option<usize>,
    /// Most tokens of a response (special prefix included).
    pub max_len: usize,
    pub batch_tokens: usize,
}

impl Default for EmbedOptions {
    fn default() -> EmbedOptions {
        EmbedOptions {
            layer: None,
            max_len: 128,
            batch_tokens: 8192,
        }
    }
}

/// The layer [`EmbedOptions::layer`] means for a model of `num_layers` layers.
fn resolve_layer(layer: Option<usize>, num_layers: usize) -> Result<usize> {
    let layer = layer.unwrap_or(2 * num_layers / 3);
    ensure!(
        (1..=num_layers).contains(&layer),
        "--layer {layer}: the model has {num_layers} layers (1..={num_layers})"
    );
    Ok(layer)
}

/// Mean hidden state after `options.layer` layers of each response of each battle.
pub fn embed<B: Backend>(
    backend: &B,
    model: &Model<B>,
    formatter: &Formatter,
    battles: &[Battle],
    options: EmbedOptions,
) -> Result<Embeddings> {
    let layer = resolve_layer(options.layer, model.decoder.num_layers())?;
    let dim = model.spec.decoder.hidden_size;
    // Sequence 2i + side is battle i's response A (0) or B (1).
    let sequences = formatter.encode_views(
        battles,
        &[
            View::Response(Side::A, options.max_len),
            View::Response(Side::B, options.max_len),
        ],
        model.spec.decoder.vocab_size,
    )?;
    let lengths: Vec<usize> = sequences.iter().map(Vec::len).collect();
    let mut means = vec![Vec::new(); sequences.len()];
    let mut progress = Progress::new("embed", sequences.len());
    for batch in length_sorted_batches(&lengths, options.batch_tokens) {
        let seqs: Vec<&[u32]> = batch.iter().map(|&j| sequences[j].as_slice()).collect();
        let packed = PackedBatch::new(&seqs);
        let hidden = backend.download(&model.decoder.hidden_after(backend, &packed, layer));
        backend
            .check()
            .with_context(|| format!("a batch of {} tokens", packed.tokens()))?;
        for (s, &j) in batch.iter().enumerate() {
            let rows = &hidden[packed.cu_seqlens[s] * dim..packed.cu_seqlens[s + 1] * dim];
            let mut sum = vec![0f64; dim];
            for row in rows.chunks(dim) {
                sum.iter_mut().zip(row).for_each(|(a, &x)| *a += x as f64);
            }
            let n = lengths[j] as f64;
            means[j] = sum.iter().map(|&x| (x / n) as f32).collect();
        }
        progress.advance(batch.len(), packed.tokens(), "");
    }
    let mut means = means.into_iter();
    let rows = battles
        .iter()
        .map(|_| [means.next().expect("A"), means.next().expect("B")])
        .collect();
    Ok(Embeddings { layer, dim, rows })
}

/// [`embed`] as a [`Job`]: loads the base model on the placement's (first) device.
struct EmbedJob<'a> {
    model_dir: &'a Path,
    quant: Quant,
    formatter: &'a Formatter,
    battles: &'a [Battle],
    options: EmbedOptions,
}

impl Job for EmbedJob<'_> {
    type Output = Embeddings;

    fn run<B: Backend>(self, backends: &[B]) -> Result<Embeddings> {
        let backend = &backends[0];
        let model = Model::load(backend, self.model_dir, None, self.quant)
            .with_context(|| format!("loading {}", self.model_dir.display()))?;
        embed(backend, &model, self.formatter, self.battles, self.options)
    }
}

/// [`embed`] on the first device of `placement`, loading the base model in `model_dir`.
pub fn embed_on(
    placement: &Placement,
    model_dir: &Path,
    quant: Quant,
    battles: &[Battle],
    options: EmbedOptions,
) -> Result<Embeddings> {
    let formatter = Formatter::from_model_dir(model_dir, FormatOptions::default())?;
    placement.run(EmbedJob {
        model_dir,
        quant,
        formatter: &formatter,
        battles,
        options,
    })
}

impl Embeddings {
    /// The embeddings of rows `range`.
    pub fn slice(&self, range: std::ops::Range<usize>) -> Embeddings {
        Embeddings {
            layer: self.layer,
            dim: self.dim,
            rows: self.rows[range].to_vec(),
        }
    }
}

/// Per-coordinate mean and spread of the training embeddings (both sides).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Standardiser {
    pub mean: Vec<f64>,
    pub scale: Vec<f64>,
}

impl Standardiser {
    fn fit(emb: &Embeddings, rows: &[usize]) -> Standardiser {
        let n = (2 * rows.len()) as f64;
        let mut mean = vec![0f64; emb.dim];
        let mut square = vec![0f64; emb.dim];
        for &i in rows {
            for e in &emb.rows[i] {
                for k in 0..emb.dim {
                    mean[k] += e[k] as f64;
                    square[k] += e[k] as f64 * e[k] as f64;
                }
            }
        }
        let mean: Vec<f64> = mean.iter().map(|m| m / n).collect();
        // A constant coordinate gets scale 1 instead of a division by zero.
        let scale = (0..emb.dim)
            .map(|k| (square[k] / n - mean[k] * mean[k]).max(0.0).sqrt())
            .map(|s| if s > 1e-12 { s } else { 1.0 })
            .collect();
        Standardiser { mean, scale }
    }

    /// `(d, s)` of one battle's embeddings.
    fn features(&self, pair: &[Vec<f32>; 2]) -> (Vec<f64>, Vec<f64>) {
        let z = |e: &[f32], k: usize| (e[k] as f64 - self.mean[k]) / self.scale[k];
        let dim = self.mean.len();
        let d = (0..dim).map(|k| z(&pair[0], k) - z(&pair[1], k)).collect();
        let s = (0..dim)
            .map(|k| (z(&pair[0], k) + z(&pair[1], k)) / 2.0)
            .collect();
        (d, s)
    }
}

/// The rows a head is fitted on or predicts: features, baseline offsets, labels.
struct Design {
    dim: usize,
    d: Vec<Vec<f64>>,
    s: Vec<Vec<f64>>,
    offsets: Vec<[f64; 3]>,
    labels: Vec<usize>,
}

impl Design {
    fn new(
        emb: &Embeddings,
        standardiser: &Standardiser,
        offsets: Vec<[f64; 3]>,
        rows: &[usize],
        labels: Vec<usize>,
    ) -> Design {
        let (d, s) = rows
            .iter()
            .map(|&i| standardiser.features(&emb.rows[i]))
            .unzip();
        Design {
            dim: emb.dim,
            d,
            s,
            offsets,
            labels,
        }
    }

    fn subset(&self, rows: &[usize]) -> Design {
        Design {
            dim: self.dim,
            d: rows.iter().map(|&i| self.d[i].clone()).collect(),
            s: rows.iter().map(|&i| self.s[i].clone()).collect(),
            offsets: rows.iter().map(|&i| self.offsets[i]).collect(),
            labels: rows.iter().map(|&i| self.labels[i]).collect(),
        }
    }
}

/// Σ aᵢbᵢ, in index order.
fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The head's parameters `θ = [w; v]`, each `dim` long.
fn logits(theta: &[f64], dim: usize, d: &[f64], s: &[f64], offset: &[f64; 3]) -> [f64; 3] {
    let (w, v) = theta.split_at(dim);
    let (dw, sv) = (dot(w, d), dot(v, s));
    [offset[0] + dw, offset[1] - dw, offset[2] + sv]
}

/// Rows per chunk of [`objective`]'s sums: chunks run in parallel, each summed in row
/// order, and the chunk sums are added in chunk order, so the result is the same bits however
/// rayon shares out the work (a parallel fold/reduce adds in an order that varies from run
/// to run, and the fitted head, λ and every probability with it would change in the last
/// digits).
const OBJECTIVE_CHUNK_ROWS: usize = 64;

/// Mean cross-entropy + λ·|θ|² and its gradient.
fn objective(theta: &[f64], design: &Design, lambda: f64) -> (f64, Vec<f64>) {
    let dim = design.dim;
    let rows = design.labels.len();
    let n = rows as f64;
    let chunk_sums: Vec<(f64, Vec<f64>)> = (0..rows.div_ceil(OBJECTIVE_CHUNK_ROWS))
        .into_par_iter()
        .map(|c| {
            let (mut loss, mut grad) = (0.0, vec![0.0; 2 * dim]);
            for i in c * OBJECTIVE_CHUNK_ROWS..((c + 1) * OBJECTIVE_CHUNK_ROWS).min(rows) {
                let p = softmax(logits(
                    theta,
                    dim,
                    &design.d[i],
                    &design.s[i],
                    &design.offsets[i],
                ));
                let y = design.labels[i];
                loss -= p[y].max(1e-300).ln();
                let mut g = p;
                g[y] -= 1.0;
                let (gw, gv) = (g[0] - g[1], g[2]);
                for k in 0..dim {
                    grad[k] += gw * design.d[i][k];
                    grad[dim + k] += gv * design.s[i][k];
                }
            }
            (loss, grad)
        })
        .collect();
    let (mut loss, mut grad) = (0.0, vec![0.0; 2 * dim]);
    for (chunk_loss, chunk_grad) in chunk_sums {
        loss += chunk_loss;
        grad.iter_mut().zip(&chunk_grad).for_each(|(a, b)| *a += b);
    }
    grad.iter_mut()
        .zip(theta)
        .for_each(|(g, t)| *g = *g / n + 2.0 * lambda * t);
    let penalty: f64 = theta.iter().map(|t| t * t).sum::<f64>() * lambda;
    (loss / n + penalty, grad)
}

/// L-BFGS's memory: the last this many steps and gradient changes.
const LBFGS_MEMORY: usize = 10;

/// Minimises [`objective`] from `start` by L-BFGS with a backtracking (Armijo) line search;
/// stops when the gradient norm falls below 1e-7. The objective is strictly convex (λ > 0),
/// so any solver that gets there finds the same head; L-BFGS gets there in about a hundred
/// evaluations where plain accelerated gradient descent took thousands at small λ.
fn fit_head(design: &Design, lambda: f64, start: Vec<f64>) -> Vec<f64> {
    let mut x = start;
    let (mut fx, mut gx) = objective(&x, design, lambda);
    // (s, y, 1 / s·y) of the recent steps, oldest first.
    let mut memory: std::collections::VecDeque<(Vec<f64>, Vec<f64>, f64)> = Default::default();
    for _ in 0..5000 {
        let g_norm = dot(&gx, &gx).sqrt();
        if g_norm < 1e-7 {
            break;
        }
        // Two-loop recursion: direction = -H·g with H the memory's inverse-Hessian estimate.
        let mut q = gx.clone();
        let mut alphas = Vec::with_capacity(memory.len());
        for (s, y, rho) in memory.iter().rev() {
            let alpha = rho * dot(s, &q);
            q.iter_mut().zip(y).for_each(|(q, y)| *q -= alpha * y);
            alphas.push(alpha);
        }
        let gamma = match memory.back() {
            Some((s, y, _)) => dot(s, y) / dot(y, y),
            None => 1.0 / g_norm.max(1.0),
        };
        q.iter_mut().for_each(|q| *q *= gamma);
        for ((s, y, rho), alpha) in memory.iter().zip(alphas.iter().rev()) {
            let beta = rho * dot(y, &q);
            q.iter_mut()
                .zip(s)
                .for_each(|(q, s)| *q += (alpha - beta) * s);
        }
        let mut direction: Vec<f64> = q.iter().map(|q| -q).collect();
        let mut slope = dot(&gx, &direction);
        if slope >= 0.0 {
            // Not a descent direction (round-off in the memory): start over from -g.
            memory.clear();
            direction = gx.iter().map(|g| -g / g_norm.max(1.0)).collect();
            slope = dot(&gx, &direction);
        }
        let mut step = 1.0;
        let (x_new, f_new, g_new) = loop {
            let cand: Vec<f64> = x
                .iter()
                .zip(&direction)
                .map(|(x, d)| x + step * d)
                .collect();
            let (f, g) = objective(&cand, design, lambda);
            if f <= fx + 1e-4 * step * slope {
                break (cand, f, g);
            }
            step *= 0.5;
            if step < 1e-20 {
                // No decrease is representable: x is the minimum to round-off.
                return x;
            }
        };
        let s: Vec<f64> = x_new.iter().zip(&x).map(|(a, b)| a - b).collect();
        let y: Vec<f64> = g_new.iter().zip(&gx).map(|(a, b)| a - b).collect();
        let sy = dot(&s, &y);
        if sy > 1e-16 {
            if memory.len() == LBFGS_MEMORY {
                memory.pop_front();
            }
            memory.push_back((s, y, 1.0 / sy));
        }
        (x, fx, gx) = (x_new, f_new, g_new);
    }
    x
}

fn predict_design(theta: &[f64], design: &Design) -> Vec<Probs> {
    (0..design.d.len())
        .map(|i| {
            softmax(logits(
                theta,
                design.dim,
                &design.d[i],
                &design.s[i],
                &design.offsets[i],
            ))
        })
        .collect()
}

fn design_log_loss(theta: &[f64], design: &Design) -> f64 {
    let probs = predict_design(theta, design);
    let truth: Vec<Winner> = design.labels.iter().map(|&y| Winner::ALL[y]).collect();
    metrics::log_loss(&probs, &truth)
}

/// Cross-validated loss of one λ, recorded when λ is chosen.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LambdaTrial {
    pub lambda: f64,
    pub cv_log_loss: f64,
}

/// Chooses λ from [`LAMBDAS`] by prompt-grouped CV on the design's rows, then fits on all.
fn fit_selected(design: &Design, keys: &[u64], seed: u64) -> (Vec<f64>, f64, Vec<LambdaTrial>) {
    let fold_of = grouped_folds(keys, SELECTION_FOLDS, seed);
    let losses: Vec<Vec<f64>> = (0..SELECTION_FOLDS)
        .map(|k| {
            let train: Vec<usize> = (0..keys.len()).filter(|&i| fold_of[i] != k).collect();
            let valid: Vec<usize> = (0..keys.len()).filter(|&i| fold_of[i] == k).collect();
            let (fit_on, score_on) = (design.subset(&train), design.subset(&valid));
            let mut theta = vec![0.0; 2 * design.dim];
            LAMBDAS
                .iter()
                .map(|&lambda| {
                    theta = fit_head(&fit_on, lambda, std::mem::take(&mut theta));
                    design_log_loss(&theta, &score_on) * valid.len() as f64
                })
                .collect()
        })
        .collect();
    let trials: Vec<LambdaTrial> = LAMBDAS
        .iter()
        .enumerate()
        .map(|(j, &lambda)| LambdaTrial {
            lambda,
            cv_log_loss: losses.iter().map(|l| l[j]).sum::<f64>() / keys.len() as f64,
        })
        .collect();
    let best = trials
        .iter()
        .min_by(|a, b| a.cv_log_loss.total_cmp(&b.cv_log_loss))
        .expect("λ candidates")
        .lambda;
    // Warm start down the path, as in selection.
    let mut theta = vec![0.0; 2 * design.dim];
    for &lambda in LAMBDAS.iter().take_while(|&&l| l >= best) {
        theta = fit_head(design, lambda, theta);
    }
    (theta, best, trials)
}

/// A fitted probe, saved as JSON by `verdict probe fit`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Probe {
    /// The base model folder the embeddings come from.
    pub model: PathBuf,
    pub quant: Quant,
    pub embed: EmbedOptions,
    pub standardiser: Standardiser,
    /// `[w; v]`.
    pub theta: Vec<f64>,
    pub lambda: f64,
    pub lambda_trials: Vec<LambdaTrial>,
    /// The length baseline fitted on the same rows, whose log-probabilities are the offsets.
    pub baseline: BaselineModel,
    pub train_rows: usize,
}

fn labels_of(battles: &[Battle]) -> Result<Vec<usize>> {
    Ok(baseline::labels_of(battles)?
        .iter()
        .map(|w| w.index())
        .collect())
}

/// Offsets of battles: the baseline's log-probabilities.
fn offsets(baseline: &BaselineModel, battles: &[Battle]) -> Result<Vec<[f64; 3]>> {
    Ok(baseline
        .predict(battles)?
        .iter()
        .map(|p| p.map(f64::ln))
        .collect())
}

/// Fits the baseline, the standardiser and the head on the rows `rows` of `battles`.
fn fit_rows(
    battles: &[Battle],
    emb: &Embeddings,
    rows: &[usize],
    seed: u64,
) -> Result<(BaselineModel, Standardiser, Vec<f64>, f64, Vec<LambdaTrial>)> {
    let train: Vec<Battle> = rows.iter().map(|&i| battles[i].clone()).collect();
    let config = BaselineConfig {
        seed,
        ..BaselineConfig::default()
    };
    let base = BaselineModel::fit_battles(&train, &config)?;
    let standardiser = Standardiser::fit(emb, rows);
    let design = Design::new(
        emb,
        &standardiser,
        offsets(&base, &train)?,
        rows,
        labels_of(&train)?,
    );
    let keys: Vec<u64> = train.iter().map(Battle::prompt_key).collect();
    let (theta, lambda, trials) = fit_selected(&design, &keys, seed);
    Ok((base, standardiser, theta, lambda, trials))
}

impl Probe {
    /// Fits the baseline, the standardiser and the head (λ by grouped CV, seeded) on
    /// labelled `battles` whose embeddings (from `model`, `quant`, `options`) are `emb`.
    pub fn fit(
        model: &Path,
        quant: Quant,
        options: EmbedOptions,
        battles: &[Battle],
        emb: &Embeddings,
        seed: u64,
    ) -> Result<Probe> {
        ensure!(
            emb.rows.len() == battles.len(),
            "{} embeddings for {} battles",
            emb.rows.len(),
            battles.len()
        );
        let rows: Vec<usize> = (0..battles.len()).collect();
        let (baseline, standardiser, theta, lambda, lambda_trials) =
            fit_rows(battles, emb, &rows, seed)?;
        Ok(Probe {
            model: std::path::absolute(model)?,
            quant,
            embed: EmbedOptions {
                layer: Some(emb.layer),
                ..options
            },
            standardiser,
            theta,
            lambda,
            lambda_trials,
            baseline,
            train_rows: battles.len(),
        })
    }

    /// Probabilities of battles whose embeddings are `emb`.
    pub fn predict(&self, battles: &[Battle], emb: &Embeddings) -> Result<Vec<Probs>> {
        ensure!(
            emb.dim == self.standardiser.mean.len() && emb.rows.len() == battles.len(),
            "{} embeddings of width {} for {} battles; the probe was fitted on width {}",
            emb.rows.len(),
            emb.dim,
            battles.len(),
            self.standardiser.mean.len()
        );
        let rows: Vec<usize> = (0..battles.len()).collect();
        let design = Design::new(
            emb,
            &self.standardiser,
            offsets(&self.baseline, battles)?,
            &rows,
            Vec::new(),
        );
        Ok(predict_design(&self.theta, &design))
    }

    pub fn load(path: &Path) -> Result<Probe> {
        let probe: Probe = crate::atomic::read_json(path, "a probe")?;
        let dim = probe.standardiser.mean.len();
        ensure!(
            probe.standardiser.scale.len() == dim && probe.theta.len() == 2 * dim,
            "{}: a probe of width {dim} needs {dim} scales and {} weights, found {} and {}",
            path.display(),
            2 * dim,
            probe.standardiser.scale.len(),
            probe.theta.len()
        );
        Ok(probe)
    }
}

/// One outer fold of `verdict probe cv`.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeFold {
    pub fold: usize,
    pub train_rows: usize,
    pub valid_rows: usize,
    pub log_loss: f64,
    /// The length baseline fitted on the same training rows, on the same held-out rows.
    pub baseline_log_loss: f64,
    pub lambda: f64,
    pub lambda_trials: Vec<LambdaTrial>,
}

/// What `OUT/probe_cv.json` holds.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeCv {
    pub model: PathBuf,
    pub embed: EmbedOptions,
    pub layer: usize,
    pub folds: usize,
    pub fold_seed: u64,
    pub rows: usize,
    pub oof_log_loss: f64,
    pub oof_baseline_log_loss: f64,
    pub per_fold: Vec<ProbeFold>,
    pub embed_seconds: f64,
    pub oof: PathBuf,
}

/// Out-of-fold probabilities of every row (and each fold's report), from embeddings computed
/// once: per fold, the baseline, standardiser and head are fitted on the other folds' rows.
pub fn cross_validate(
    battles: &[Battle],
    emb: &Embeddings,
    folds: usize,
    seed: u64,
) -> Result<(Vec<Probs>, Vec<ProbeFold>)> {
    // Refuses more folds than prompts (an empty fold has no log loss).
    let split = prompt_folds(battles, folds, seed)?;
    let truth = baseline::labels_of(battles)?;
    let mut oof = vec![[0.0; 3]; battles.len()];
    let mut reports = Vec::new();
    for fold in 0..folds {
        let (train, valid) = split.split(fold);
        let (base, standardiser, theta, lambda, lambda_trials) =
            fit_rows(battles, emb, &train, seed)?;
        let held: Vec<Battle> = valid.iter().map(|&i| battles[i].clone()).collect();
        let design = Design::new(
            emb,
            &standardiser,
            offsets(&base, &held)?,
            &valid,
            Vec::new(),
        );
        let probs = predict_design(&theta, &design);
        let fold_truth: Vec<Winner> = valid.iter().map(|&i| truth[i]).collect();
        let report = ProbeFold {
            fold,
            train_rows: train.len(),
            valid_rows: valid.len(),
            log_loss: metrics::log_loss(&probs, &fold_truth),
            baseline_log_loss: metrics::log_loss(&base.predict(&held)?, &fold_truth),
            lambda,
            lambda_trials,
        };
        eprintln!(
            "[probe] fold {fold}: log loss {:.4} (length baseline {:.4}), λ = {lambda}, {} rows",
            report.log_loss, report.baseline_log_loss, report.valid_rows
        );
        for (&i, p) in valid.iter().zip(probs) {
            oof[i] = p;
        }
        reports.push(report);
    }
    Ok((oof, reports))
}

/// `verdict probe`'s subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Out-of-fold predictions of every labelled row (OUT/oof.csv, OUT/probe_cv.json).
    ///
    /// Example: verdict probe cv --model smollm2 --train train.csv --out probe-cv
    Cv {
        #[command(flatten)]
        common: ProbeArgs,
        /// Labelled competition CSV.
        #[arg(long)]
        train: PathBuf,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// Prompt-grouped folds (the same as `verdict cv` and `baseline cv` for the same seed).
        #[arg(long, allow_negative_numbers = true, value_parser = range::count, default_value_t = 5)]
        folds: usize,
        /// Seed of the fold assignment.
        #[arg(long, default_value_t = 0)]
        fold_seed: u64,
    },
    /// Fits a probe on labelled rows and saves it as JSON.
    ///
    /// Example: verdict probe fit --model smollm2 --train train.csv --out probe.json
    Fit {
        #[command(flatten)]
        common: ProbeArgs,
        /// Labelled competition CSV.
        #[arg(long)]
        train: PathBuf,
        /// The fitted probe (JSON; names its base model, which `probe predict` reads again).
        #[arg(long)]
        out: PathBuf,
        /// Seed of the folds that choose λ.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Predicts a CSV with a fitted probe (its base model is read again).
    ///
    /// Example: verdict probe predict --probe probe.json --test test.csv --out probe-test.csv
    Predict {
        /// A probe written by `probe fit`.
        #[arg(long)]
        probe: PathBuf,
        /// Competition CSV to predict.
        #[arg(long)]
        test: PathBuf,
        /// Submission-format CSV of the probe's probabilities.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        device: DeviceArgs,
        #[command(flatten)]
        read: ReadArgs,
    },
}

/// Flags shared by `probe cv` and `probe fit`.
#[derive(clap::Args, Debug, Clone)]
pub struct ProbeArgs {
    /// Hugging Face model folder with tokenizer.json (any head: only the decoder is read).
    #[arg(long)]
    pub model: PathBuf,
    /// Decoder layers to run [default: two thirds of the model's].
    #[arg(long, allow_negative_numbers = true, value_parser = range::count)]
    pub layer: Option<usize>,
    /// Most tokens of a response.
    #[arg(long, allow_negative_numbers = true, value_parser = range::count, default_value_t = EmbedOptions::default().max_len)]
    pub max_len: usize,
    #[arg(long, allow_negative_numbers = true, value_parser = range::count, default_value_t = EmbedOptions::default().batch_tokens)]
    pub batch_tokens: usize,
    #[command(flatten)]
    pub quant: QuantArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    #[command(flatten)]
    pub read: ReadArgs,
}

impl ProbeArgs {
    fn options(&self) -> EmbedOptions {
        EmbedOptions {
            layer: self.layer,
            max_len: self.max_len,
            batch_tokens: self.batch_tokens,
        }
    }
}

/// Reads battles and computes their embeddings on `device`.
fn read_and_embed(
    model: &Path,
    quant: Quant,
    csv: &Path,
    options: EmbedOptions,
    device: &Placement,
    read: ReadArgs,
) -> Result<(Vec<Battle>, Embeddings)> {
    let (battles, stats) = read_battles(csv, read.options())?;
    report_skipped(csv, &stats);
    ensure!(!battles.is_empty(), "{}: no rows", csv.display());
    let emb = embed_on(device, model, quant, &battles, options)?;
    Ok((battles, emb))
}

pub fn run(command: &Command) -> Result<()> {
    match command {
        Command::Cv {
            common,
            train,
            out,
            folds,
            fold_seed,
        } => {
            ensure!(*folds >= 2, "--folds {folds}: need at least 2");
            crate::atomic::check_output("--out", out, true)?;
            let start = Instant::now();
            let (battles, emb) = read_and_embed(
                &common.model,
                common.quant.quant()?,
                train,
                common.options(),
                &common.device.device,
                common.read,
            )?;
            let embed_seconds = start.elapsed().as_secs_f64();
            let (oof, per_fold) = cross_validate(&battles, &emb, *folds, *fold_seed)?;
            let truth = baseline::labels_of(&battles)?;
            std::fs::create_dir_all(out)
                .with_context(|| format!("cannot create {}", out.display()))?;
            let oof_path = out.join("oof.csv");
            let preds: Vec<Prediction> = battles
                .iter()
                .zip(&oof)
                .map(|(b, &probs)| Prediction {
                    id: b.id.clone(),
                    probs,
                })
                .collect();
            write_predictions(&oof_path, &preds)?;
            let weighted = |f: fn(&ProbeFold) -> f64| {
                per_fold
                    .iter()
                    .map(|r| f(r) * r.valid_rows as f64)
                    .sum::<f64>()
                    / battles.len() as f64
            };
            let summary = ProbeCv {
                model: common.model.clone(),
                embed: common.options(),
                layer: emb.layer,
                folds: *folds,
                fold_seed: *fold_seed,
                rows: battles.len(),
                oof_log_loss: metrics::log_loss(&oof, &truth),
                oof_baseline_log_loss: weighted(|r| r.baseline_log_loss),
                per_fold,
                embed_seconds,
                oof: oof_path.clone(),
            };
            crate::atomic::write_json(&out.join("probe_cv.json"), &summary)?;
            println!(
                "probe out-of-fold log loss {:.4} vs length baseline {:.4} on the same folds ({} rows, layer {}, embeddings {:.0} s) -> {}",
                summary.oof_log_loss,
                summary.oof_baseline_log_loss,
                summary.rows,
                summary.layer,
                embed_seconds,
                oof_path.display()
            );
            Ok(())
        }
        Command::Fit {
            common,
            train,
            out,
            seed,
        } => {
            crate::atomic::check_output("--out", out, false)?;
            let quant = common.quant.quant()?;
            let (battles, emb) = read_and_embed(
                &common.model,
                quant,
                train,
                common.options(),
                &common.device.device,
                common.read,
            )?;
            let probe = Probe::fit(
                &common.model,
                quant,
                common.options(),
                &battles,
                &emb,
                *seed,
            )?;
            crate::atomic::write_json(out, &probe)?;
            println!(
                "probe fitted on {} rows (layer {}, λ = {} by {SELECTION_FOLDS}-fold CV) -> {}",
                battles.len(),
                emb.layer,
                probe.lambda,
                out.display()
            );
            Ok(())
        }
        Command::Predict {
            probe,
            test,
            out,
            device,
            read,
        } => {
            crate::atomic::check_output("--out", out, false)?;
            let probe = Probe::load(probe)?;
            let (battles, emb) = read_and_embed(
                &probe.model,
                probe.quant,
                test,
                probe.embed,
                &device.device,
                *read,
            )?;
            let probs = probe.predict(&battles, &emb)?;
            let preds: Vec<Prediction> = battles
                .iter()
                .zip(probs)
                .map(|(b, probs)| Prediction {
                    id: b.id.clone(),
                    probs,
                })
                .collect();
            write_predictions(out, &preds)?;
            println!("wrote {} predictions -> {}", preds.len(), out.display());
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn random_design(rng: &mut Rng, n: usize, dim: usize, theta: Option<&[f64]>) -> Design {
        let normal = |rng: &mut Rng| rng.normal();
        let d: Vec<Vec<f64>> = (0..n)
            .map(|_| (0..dim).map(|_| normal(rng)).collect())
            .collect();
        let s: Vec<Vec<f64>> = (0..n)
            .map(|_| (0..dim).map(|_| normal(rng)).collect())
            .collect();
        let offsets: Vec<[f64; 3]> = (0..n)
            .map(|_| [0.3 * normal(rng), 0.3 * normal(rng), 0.3 * normal(rng)])
            .collect();
        let labels = (0..n)
            .map(|i| match theta {
                // Draw each label from the model's own probabilities.
                Some(t) => {
                    let p = softmax(logits(t, dim, &d[i], &s[i], &offsets[i]));
                    let x = rng.uniform();
                    if x < p[0] {
                        0
                    } else if x < p[0] + p[1] {
                        1
                    } else {
                        2
                    }
                }
                None => i % 3,
            })
            .collect();
        Design {
            dim,
            d,
            s,
            offsets,
            labels,
        }
    }

    #[test]
    fn objective_gradient_matches_finite_differences() {
        let mut rng = Rng::new(5);
        let design = random_design(&mut rng, 40, 4, None);
        let theta: Vec<f64> = (0..8).map(|_| 0.5 * rng.normal()).collect();
        let (_, grad) = objective(&theta, &design, 0.7);
        for k in 0..theta.len() {
            let h = 1e-6;
            let mut plus = theta.clone();
            plus[k] += h;
            let mut minus = theta.clone();
            minus[k] -= h;
            let numeric =
                (objective(&plus, &design, 0.7).0 - objective(&minus, &design, 0.7).0) / (2.0 * h);
            assert!(
                (numeric - grad[k]).abs() < 1e-7,
                "θ[{k}]: analytic {} vs numeric {numeric}",
                grad[k]
            );
        }
    }

    #[test]
    fn the_fit_recovers_the_parameters_that_drew_the_labels() {
        let mut rng = Rng::new(9);
        let truth = [0.8, -0.5, 0.0, -0.3, 0.7, 0.5];
        let design = random_design(&mut rng, 30_000, 3, Some(&truth));
        let theta = fit_head(&design, 1e-6, vec![0.0; 6]);
        for (k, (t, want)) in theta.iter().zip(truth).enumerate() {
            assert!((t - want).abs() < 0.05, "θ[{k}] = {t}, drawn with {want}");
        }
        // At the optimum the gradient vanishes.
        let (_, grad) = objective(&theta, &design, 1e-6);
        assert!(grad.iter().all(|g| g.abs() < 1e-6), "{grad:?}");
    }

    #[test]
    fn a_strong_penalty_leaves_the_baseline_and_the_head_is_swap_symmetric() {
        let mut rng = Rng::new(3);
        let design = random_design(&mut rng, 200, 5, None);
        let theta = fit_head(&design, 1e6, vec![0.1; 10]);
        assert!(theta.iter().all(|t| t.abs() < 1e-5), "{theta:?}");
        // Swapping A and B negates d, keeps s and swaps the offsets' A and B.
        let theta: Vec<f64> = (0..10).map(|_| rng.normal()).collect();
        for i in 0..design.d.len() {
            let o = design.offsets[i];
            let p = softmax(logits(&theta, 5, &design.d[i], &design.s[i], &o));
            let minus: Vec<f64> = design.d[i].iter().map(|x| -x).collect();
            let q = softmax(logits(&theta, 5, &minus, &design.s[i], &[o[1], o[0], o[2]]));
            for (a, b) in [(p[0], q[1]), (p[1], q[0]), (p[2], q[2])] {
                assert!((a - b).abs() < 1e-12);
            }
        }
    }
}
