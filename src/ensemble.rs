//! Ensembles: member prediction files (fine-tuned models, the length baseline, ...) are
//! joined by id with the labelled CSV and combined with convex weights (w ≥ 0, Σw = 1)
//! that minimise validation log loss. Next in the data flow: `calibrate`.
//!
//! Two ways to combine, both convex in the weights:
//! - probability averaging, p = Σ w_m p_m;
//! - logit averaging, p = softmax(Σ w_m ln p_m) (a weighted geometric mean).
//!
//! The mode is chosen honestly: for each mode, weights are fitted on k−1 prompt-grouped
//! folds and scored on the held-out fold; the mode with the lower out-of-fold loss wins and
//! its weights are refitted on all rows.
//!
//! The optimiser works on softmax logits θ (w = softmax θ), so every iterate is a valid
//! weight vector, with exact gradient and Hessian and a damped Newton step
//! (Levenberg–Marquardt with an Armijo test). Near a zero weight the Newton step moves θ
//! by a constant, so the weight shrinks geometrically instead of stalling. Because the
//! loss is convex in w, the Frank–Wolfe gap (w·g − min g) bounds the distance to the
//! optimal loss and is the stopping rule.
//!
//! Member probabilities are clipped and renormalised exactly as the metric does before
//! anything else, so a member that writes a 0 cannot produce an infinite logit.

use crate::cli::required;
use crate::data::folds::{prompt_folds, FoldArgs};
use crate::data::{Battle, ReadArgs, ReadOptions, Winner};
use crate::metrics::{clip_and_normalise, log_loss, softmax_in_place, Probs};
use crate::submission::{
    read_aligned, read_labelled, read_predictions, write_predictions, Prediction,
};
use anyhow::{bail, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// How member predictions are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Weighted arithmetic mean of probabilities.
    Probability,
    /// Weighted mean of log-probabilities, then softmax.
    Logit,
}

impl Mode {
    pub const ALL: [Mode; 2] = [Mode::Probability, Mode::Logit];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Probability => "probability",
            Mode::Logit => "logit",
        }
    }
}

/// Member predictions for a set of rows, clipped like the metric, row-major
/// (row 0 member 0, row 0 member 1, ...).
#[derive(Debug, Clone)]
pub struct MemberTable {
    members: usize,
    probs: Vec<Probs>,
    logs: Vec<[f64; 3]>,
}

impl MemberTable {
    /// From one prediction vector per member, all of the same length.
    pub fn new(members: &[Vec<Probs>]) -> MemberTable {
        assert!(!members.is_empty(), "an ensemble needs at least one member");
        let rows = members[0].len();
        assert!(
            members.iter().all(|m| m.len() == rows),
            "members differ in row count"
        );
        let probs: Vec<Probs> = (0..rows)
            .flat_map(|i| members.iter().map(move |m| clip_and_normalise(&m[i])))
            .collect();
        let logs = probs.iter().map(|p| p.map(f64::ln)).collect();
        MemberTable {
            members: members.len(),
            probs,
            logs,
        }
    }

    pub fn members(&self) -> usize {
        self.members
    }

    pub fn rows(&self) -> usize {
        self.probs.len() / self.members
    }

    /// The table restricted to `rows`, in that order.
    fn subset(&self, rows: &[usize]) -> MemberTable {
        let m = self.members;
        let pick = |v: &[[f64; 3]]| -> Vec<[f64; 3]> {
            rows.iter()
                .flat_map(|&i| v[i * m..(i + 1) * m].iter().copied())
                .collect()
        };
        MemberTable {
            members: m,
            probs: pick(&self.probs),
            logs: pick(&self.logs),
        }
    }

    /// The combined prediction of row `i`.
    pub fn combine(&self, mode: Mode, weights: &[f64], i: usize) -> Probs {
        let m = self.members;
        match mode {
            Mode::Probability => {
                let mut p = [0.0; 3];
                for (q, w) in self.probs[i * m..(i + 1) * m].iter().zip(weights) {
                    for k in 0..3 {
                        p[k] += w * q[k];
                    }
                }
                p
            }
            Mode::Logit => {
                let mut z = self.mixed_logits(weights, i);
                softmax_in_place(&mut z);
                z
            }
        }
    }

    fn mixed_logits(&self, weights: &[f64], i: usize) -> [f64; 3] {
        let m = self.members;
        let mut z = [0.0; 3];
        for (l, w) in self.logs[i * m..(i + 1) * m].iter().zip(weights) {
            for k in 0..3 {
                z[k] += w * l[k];
            }
        }
        z
    }
}

/// Mean log loss of the combination at `weights`, its gradient and Hessian in the weights.
#[derive(Debug, Clone)]
pub struct Objective {
    pub loss: f64,
    pub grad: Vec<f64>,
    /// Row-major `members × members`; empty unless requested.
    pub hessian: Vec<f64>,
}

/// Evaluates the ensemble objective exactly (sequential sums, so results are reproducible
/// bit for bit).
pub fn objective(
    mode: Mode,
    table: &MemberTable,
    truth: &[Winner],
    weights: &[f64],
    with_hessian: bool,
) -> Objective {
    let m = table.members;
    assert_eq!(weights.len(), m, "one weight per member");
    assert_eq!(truth.len(), table.rows(), "one label per row");
    let mut loss = 0.0;
    let mut grad = vec![0.0; m];
    let mut hessian = vec![0.0; if with_hessian { m * m } else { 0 }];
    let mut d = vec![0.0; m];
    for (i, t) in truth.iter().enumerate() {
        let y = t.index();
        match mode {
            Mode::Probability => {
                // loss = −ln s, s = Σ w_m p_m[y]; ∂/∂w_m = −p_m[y]/s.
                let probs = &table.probs[i * m..(i + 1) * m];
                let s: f64 = probs.iter().zip(weights).map(|(p, w)| w * p[y]).sum();
                loss -= s.ln();
                for (dm, p) in d.iter_mut().zip(probs) {
                    *dm = p[y] / s;
                }
                for a in 0..m {
                    grad[a] -= d[a];
                }
                if with_hessian {
                    for a in 0..m {
                        for b in 0..m {
                            hessian[a * m + b] += d[a] * d[b];
                        }
                    }
                }
            }
            Mode::Logit => {
                // loss = lse(z) − z_y, z = Σ w_m l_m; ∂/∂w_m = q·l_m − l_m[y] with
                // q = softmax z; the Hessian is the covariance of the l_m under q.
                let logs = &table.logs[i * m..(i + 1) * m];
                let z = table.mixed_logits(weights, i);
                let max = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let lse = max + z.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
                loss += lse - z[y];
                let q = z.map(|v| (v - lse).exp());
                for (dm, l) in d.iter_mut().zip(logs) {
                    *dm = q[0] * l[0] + q[1] * l[1] + q[2] * l[2];
                }
                for a in 0..m {
                    grad[a] += d[a] - logs[a][y];
                }
                if with_hessian {
                    for a in 0..m {
                        for b in 0..m {
                            let e: f64 = (0..3).map(|k| q[k] * logs[a][k] * logs[b][k]).sum();
                            hessian[a * m + b] += e - d[a] * d[b];
                        }
                    }
                }
            }
        }
    }
    let n = truth.len() as f64;
    Objective {
        loss: loss / n,
        grad: grad.into_iter().map(|g| g / n).collect(),
        hessian: hessian.into_iter().map(|h| h / n).collect(),
    }
}

/// Fitted weights and how the optimiser ended.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WeightFit {
    pub weights: Vec<f64>,
    /// Mean log loss at `weights` (members clipped as the metric does).
    pub log_loss: f64,
    pub iterations: usize,
    /// Frank–Wolfe gap w·g − min g at the end: an upper bound on how far `log_loss` is from
    /// the best convex combination (the loss is convex in w).
    pub gap: f64,
}

/// Stop when the loss is provably within this of the optimum.
const GAP_TOLERANCE: f64 = 1e-11;
const MAX_ITERATIONS: usize = 500;

/// Fits convex weights minimising the log loss of the `mode` combination.
pub fn fit_weights(mode: Mode, table: &MemberTable, truth: &[Winner]) -> WeightFit {
    let m = table.members;
    let mut theta = vec![0.0; m];
    let mut weights = softmax_vec(&theta);
    let mut lambda = 1e-6;
    let mut iterations = 0;
    loop {
        let obj = objective(mode, table, truth, &weights, true);
        let gap = frank_wolfe_gap(&weights, &obj.grad);
        if m == 1 || gap <= GAP_TOLERANCE || iterations == MAX_ITERATIONS {
            return WeightFit {
                weights,
                log_loss: obj.loss,
                iterations,
                gap,
            };
        }
        iterations += 1;
        let (g_theta, h_theta) = theta_derivatives(&weights, &obj.grad, &obj.hessian);
        // Damped Newton: raise the damping until the step is a descent the Armijo test
        // accepts; a large damping is a short gradient step, so this always ends unless
        // no representable step lowers the loss, which means we are at the optimum.
        let accepted = loop {
            if lambda > 1e12 {
                break None;
            }
            let mut a = h_theta.clone();
            for i in 0..m {
                a[i * m + i] += lambda;
            }
            let Some(step) = cholesky_solve(&a, &g_theta, m) else {
                lambda *= 10.0;
                continue;
            };
            let trial: Vec<f64> = theta.iter().zip(&step).map(|(t, s)| t - s).collect();
            let w_trial = softmax_vec(&trial);
            let loss = objective(mode, table, truth, &w_trial, false).loss;
            let decrease: f64 = g_theta.iter().zip(&step).map(|(g, s)| g * s).sum();
            if loss <= obj.loss - 1e-4 * decrease && loss < obj.loss {
                lambda = (lambda / 10.0).max(1e-12);
                break Some((trial, w_trial));
            }
            lambda *= 10.0;
        };
        match accepted {
            Some((t, w)) => {
                theta = t;
                weights = w;
            }
            None => {
                return WeightFit {
                    weights,
                    log_loss: obj.loss,
                    iterations,
                    gap,
                }
            }
        }
    }
}

fn softmax_vec(theta: &[f64]) -> Vec<f64> {
    let mut w = theta.to_vec();
    softmax_in_place(&mut w);
    w
}

/// w·g − min_j g_j: the loss decrease a move to the best vertex promises to first order.
fn frank_wolfe_gap(w: &[f64], g: &[f64]) -> f64 {
    let wg: f64 = w.iter().zip(g).map(|(a, b)| a * b).sum();
    wg - g.iter().copied().fold(f64::INFINITY, f64::min)
}

/// Gradient and Hessian in θ from those in w, for w = softmax θ.
/// With J = ∂w/∂θ = diag(w) − wwᵀ and ḡ = w·g:
/// ∇θ = J g,  ∇²θ = J H J + D,  D_ab = δ_ab w_a (g_a − ḡ) − w_a w_b (g_a + g_b − 2ḡ).
fn theta_derivatives(w: &[f64], g: &[f64], h: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let m = w.len();
    let gbar: f64 = w.iter().zip(g).map(|(a, b)| a * b).sum();
    let grad: Vec<f64> = (0..m).map(|a| w[a] * (g[a] - gbar)).collect();
    let jac = |a: usize, b: usize| f64::from(u8::from(a == b)) * w[a] - w[a] * w[b];
    // HJ first, then J(HJ).
    let mut hj = vec![0.0; m * m];
    for a in 0..m {
        for b in 0..m {
            hj[a * m + b] = (0..m).map(|c| h[a * m + c] * jac(c, b)).sum();
        }
    }
    let mut hess = vec![0.0; m * m];
    for a in 0..m {
        for b in 0..m {
            let jhj: f64 = (0..m).map(|c| jac(a, c) * hj[c * m + b]).sum();
            let diag = if a == b { w[a] * (g[a] - gbar) } else { 0.0 };
            hess[a * m + b] = jhj + diag - w[a] * w[b] * (g[a] + g[b] - 2.0 * gbar);
        }
    }
    (grad, hess)
}

/// Solves A x = b for symmetric positive-definite A (row-major n×n); `None` if A is not.
fn cholesky_solve(a: &[f64], b: &[f64], n: usize) -> Option<Vec<f64>> {
    let mut l = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..=i {
            let s: f64 = a[i * n + j] - (0..j).map(|k| l[i * n + k] * l[j * n + k]).sum::<f64>();
            if i == j {
                if s.is_nan() || s <= 0.0 {
                    return None;
                }
                l[i * n + i] = s.sqrt();
            } else {
                l[i * n + j] = s / l[j * n + j];
            }
        }
    }
    let mut y = vec![0.0; n];
    for i in 0..n {
        y[i] = (b[i] - (0..i).map(|k| l[i * n + k] * y[k]).sum::<f64>()) / l[i * n + i];
    }
    let mut x = vec![0.0; n];
    for i in (0..n).rev() {
        x[i] = (y[i] - (i + 1..n).map(|k| l[k * n + i] * x[k]).sum::<f64>()) / l[i * n + i];
    }
    x.iter().all(|v| v.is_finite()).then_some(x)
}

// ---------------------------------------------------------------------------------------
// The saved model

/// A fitted ensemble, saved as JSON: which members, how combined, with which weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnsembleModel {
    /// Member names (the prediction files fitted on), in weight order.
    pub members: Vec<String>,
    pub mode: Mode,
    pub weights: Vec<f64>,
}

impl EnsembleModel {
    /// Combines one prediction vector per member (same order as `members`).
    pub fn predict(&self, members: &[Vec<Probs>]) -> Result<Vec<Probs>> {
        if members.len() != self.members.len() {
            bail!(
                "the ensemble has {} members ({}) but {} prediction sets were given",
                self.members.len(),
                self.members.join(", "),
                members.len()
            );
        }
        let table = MemberTable::new(members);
        Ok((0..table.rows())
            .map(|i| table.combine(self.mode, &self.weights, i))
            .collect())
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        crate::atomic::write_json(path, self)
    }

    /// Loads a model written by [`EnsembleModel::save`], checking the weights are convex.
    pub fn load(path: &Path) -> Result<EnsembleModel> {
        let model: EnsembleModel = crate::atomic::read_json(path, "an ensemble model")?;
        if model.weights.len() != model.members.len() || model.members.is_empty() {
            bail!(
                "{}: {} members but {} weights",
                path.display(),
                model.members.len(),
                model.weights.len()
            );
        }
        let sum: f64 = model.weights.iter().sum();
        if model.weights.iter().any(|w| !(w.is_finite() && *w >= 0.0)) || (sum - 1.0).abs() > 1e-9 {
            bail!(
                "{}: weights must be non-negative and sum to 1, found {:?}",
                path.display(),
                model.weights
            );
        }
        Ok(model)
    }
}

// ---------------------------------------------------------------------------------------
// Fitting with cross-validated mode choice

/// How to fit an ensemble.
#[derive(Debug, Clone)]
pub struct EnsembleConfig {
    /// Prompt-grouped folds used to compare the two modes.
    pub folds: usize,
    pub seed: u64,
}

impl Default for EnsembleConfig {
    fn default() -> Self {
        EnsembleConfig { folds: 5, seed: 0 }
    }
}

/// One member's own log loss on all labelled rows.
#[derive(Debug, Clone, Serialize)]
pub struct MemberScore {
    pub name: String,
    pub log_loss: f64,
}

/// How one combination mode did.
#[derive(Debug, Clone, Serialize)]
pub struct ModeScore {
    pub mode: Mode,
    /// Log loss of all out-of-fold predictions (weights fitted without the scored fold).
    pub out_of_fold_log_loss: f64,
    pub fold_log_loss: Vec<f64>,
    /// Weights fitted on all rows, and their (optimistic) in-sample loss.
    pub fit: WeightFit,
}

/// Everything `verdict ensemble` reports.
#[derive(Debug, Clone, Serialize)]
pub struct EnsembleReport {
    pub rows: usize,
    pub folds: usize,
    pub seed: u64,
    pub members: Vec<MemberScore>,
    pub modes: Vec<ModeScore>,
    /// The mode with the lower out-of-fold loss, and its weights fitted on all rows.
    pub model: EnsembleModel,
    /// Out-of-fold predictions of the chosen mode, in label order: honest inputs for
    /// fitting a calibration on the same validation rows.
    #[serde(skip)]
    pub out_of_fold: Vec<Prediction>,
}

/// Fits an ensemble of `members` (one prediction vector per member, aligned with
/// `battles`, which must be labelled); `names` label the members in the saved model.
pub fn fit_ensemble(
    names: &[String],
    members: &[Vec<Probs>],
    battles: &[Battle],
    config: &EnsembleConfig,
) -> Result<EnsembleReport> {
    if members.is_empty() || names.len() != members.len() {
        bail!(
            "need one name per member and at least one member ({} names, {} members)",
            names.len(),
            members.len()
        );
    }
    let truth = crate::baseline::labels_of(battles)?;
    for (name, m) in names.iter().zip(members) {
        if m.len() != truth.len() {
            bail!(
                "member {name} has {} rows but there are {} labelled rows",
                m.len(),
                truth.len()
            );
        }
    }
    let folds = prompt_folds(battles, config.folds, config.seed)?;
    let table = MemberTable::new(members);
    let member_scores = names
        .iter()
        .zip(members)
        .map(|(name, m)| MemberScore {
            name: name.clone(),
            log_loss: log_loss(m, &truth),
        })
        .collect();

    // Every (mode, fold) fit is independent: run them in parallel; results are collected
    // in order, so the report does not depend on scheduling.
    let jobs: Vec<(Mode, usize)> = Mode::ALL
        .iter()
        .flat_map(|&mode| (0..config.folds).map(move |f| (mode, f)))
        .collect();
    let held_out: Vec<Vec<Probs>> = jobs
        .par_iter()
        .map(|&(mode, f)| {
            let (train, valid) = folds.split(f);
            let sub_truth: Vec<Winner> = train.iter().map(|&i| truth[i]).collect();
            let fit = fit_weights(mode, &table.subset(&train), &sub_truth);
            valid
                .iter()
                .map(|&i| table.combine(mode, &fit.weights, i))
                .collect()
        })
        .collect();
    let full_fits: Vec<WeightFit> = Mode::ALL
        .par_iter()
        .map(|&mode| fit_weights(mode, &table, &truth))
        .collect();

    let mut modes = Vec::new();
    let mut oof_by_mode = Vec::new();
    for (k, (&mode, fit)) in Mode::ALL.iter().zip(full_fits).enumerate() {
        let mut oof = vec![[0.0; 3]; truth.len()];
        let mut fold_log_loss = Vec::new();
        for f in 0..config.folds {
            let (_, valid) = folds.split(f);
            let preds = &held_out[k * config.folds + f];
            for (&i, p) in valid.iter().zip(preds) {
                oof[i] = *p;
            }
            let t: Vec<Winner> = valid.iter().map(|&i| truth[i]).collect();
            fold_log_loss.push(log_loss(preds, &t));
        }
        modes.push(ModeScore {
            mode,
            out_of_fold_log_loss: log_loss(&oof, &truth),
            fold_log_loss,
            fit,
        });
        oof_by_mode.push(oof);
    }
    // Ties go to probability averaging, listed first: the simpler combination.
    let best = (0..modes.len())
        .min_by(|&a, &b| {
            modes[a]
                .out_of_fold_log_loss
                .total_cmp(&modes[b].out_of_fold_log_loss)
        })
        .expect("two modes");
    let model = EnsembleModel {
        members: names.to_vec(),
        mode: modes[best].mode,
        weights: modes[best].fit.weights.clone(),
    };
    let out_of_fold = battles
        .iter()
        .zip(&oof_by_mode[best])
        .map(|(b, p)| Prediction {
            id: b.id.clone(),
            probs: *p,
        })
        .collect();
    Ok(EnsembleReport {
        rows: truth.len(),
        folds: config.folds,
        seed: config.seed,
        members: member_scores,
        modes,
        model,
        out_of_fold,
    })
}

// ---------------------------------------------------------------------------------------
// Files

/// `verdict ensemble` fit: joins each prediction file with the labelled CSV by id, fits
/// both modes, compares them out of fold, and returns the report (with the chosen model).
pub fn fit_ensemble_files(
    preds: &[PathBuf],
    labels: &Path,
    options: ReadOptions,
    config: &EnsembleConfig,
) -> Result<EnsembleReport> {
    if preds.is_empty() {
        bail!("an ensemble needs at least one prediction file");
    }
    let battles = read_labelled(labels, options)?;
    let ids: Vec<&str> = battles.iter().map(|b| b.id.as_str()).collect();
    let reference = labels.display().to_string();
    let members = preds
        .iter()
        .map(|p| read_aligned(p, &ids, &reference))
        .collect::<Result<Vec<_>>>()?;
    let names: Vec<String> = preds.iter().map(|p| p.display().to_string()).collect();
    fit_ensemble(&names, &members, &battles, config)
}

/// `verdict ensemble` apply: combines new prediction files (one per member, in the model's
/// member order) and writes a submission-format CSV atomically, rows in the order of the
/// first file. Returns the number of rows written.
pub fn apply_ensemble(model: &EnsembleModel, preds: &[PathBuf], out: &Path) -> Result<usize> {
    if preds.len() != model.members.len() {
        bail!(
            "the ensemble was fitted on {} members ({}); got {} prediction files",
            model.members.len(),
            model.members.join(", "),
            preds.len()
        );
    }
    let first = read_predictions(&preds[0])?;
    let ids: Vec<&str> = first.iter().map(|r| r.id.as_str()).collect();
    let reference = preds[0].display().to_string();
    let members = preds
        .iter()
        .map(|p| read_aligned(p, &ids, &reference))
        .collect::<Result<Vec<_>>>()?;
    let combined = model.predict(&members)?;
    let rows: Vec<Prediction> = ids
        .iter()
        .zip(combined)
        .map(|(id, probs)| Prediction {
            id: id.to_string(),
            probs,
        })
        .collect();
    write_predictions(out, &rows)?;
    Ok(rows.len())
}

/// The table `verdict ensemble` prints.
pub fn format_ensemble_report(r: &EnsembleReport) -> String {
    let width = r
        .members
        .iter()
        .map(|m| m.name.len())
        .max()
        .unwrap_or(0)
        .max(6);
    let mut out = format!("{:<width$}  {:>9}\n", "member", "log loss");
    for m in &r.members {
        out += &format!("{:<width$}  {:>9.5}\n", m.name, m.log_loss);
    }
    out += &format!(
        "\n{:<12} {:>12} {:>10}  weights fitted on all {} rows\n",
        "mode", "out-of-fold", "in-sample", r.rows
    );
    for s in &r.modes {
        let weights: Vec<String> = s.fit.weights.iter().map(|w| format!("{w:.4}")).collect();
        out += &format!(
            "{:<12} {:>12.5} {:>10.5}  [{}]\n",
            s.mode.name(),
            s.out_of_fold_log_loss,
            s.fit.log_loss,
            weights.join(", ")
        );
    }
    out += &format!(
        "chosen: {} (lower out-of-fold log loss over {} prompt-grouped folds, seed {})\n",
        r.model.mode.name(),
        r.folds,
        r.seed
    );
    out
}

// ---------------------------------------------------------------------------------------
// Command line

/// `verdict ensemble`'s flags: fit, or `apply` a fitted ensemble.
#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Args {
    #[command(subcommand)]
    apply: Option<Apply>,
    /// Prediction files, one per member (joined with the labels by id).
    #[arg(long, num_args = 1..)]
    preds: Vec<PathBuf>,
    /// Labelled competition CSV.
    #[arg(long)]
    labels: Option<PathBuf>,
    /// The fitted ensemble (JSON).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Also write the chosen mode's out-of-fold predictions (honest input for calibrate).
    #[arg(long)]
    oof_out: Option<PathBuf>,
    /// Also write the report as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    #[command(flatten)]
    cv: FoldArgs,
    #[command(flatten)]
    read: ReadArgs,
}

#[derive(clap::Subcommand, Debug)]
enum Apply {
    /// Combine prediction files with a fitted ensemble into a submission.
    ///
    /// Example: verdict ensemble apply --model ensemble.json --preds a-test.csv b-test.csv --out submission.csv
    Apply {
        /// An ensemble written by `verdict ensemble`.
        #[arg(long)]
        model: PathBuf,
        /// Prediction files, in the same member order as when fitting.
        #[arg(long, num_args = 1.., required = true)]
        preds: Vec<PathBuf>,
        /// Submission CSV of the combined probabilities.
        #[arg(long)]
        out: PathBuf,
    },
}

/// `verdict ensemble [apply]`.
pub fn run(args: &Args) -> Result<()> {
    if let Some(Apply::Apply { model, preds, out }) = &args.apply {
        crate::atomic::check_output("--out", out, false)?;
        let model = EnsembleModel::load(model)?;
        let rows = apply_ensemble(&model, preds, out)?;
        println!("wrote {rows} ensembled predictions -> {}", out.display());
        return Ok(());
    }
    if args.preds.is_empty() {
        bail!("missing --preds (one prediction file per member)");
    }
    let labels = required(args.labels.as_ref(), "--labels")?;
    let out = required(args.out.as_ref(), "--out")?;
    crate::atomic::check_output_files(&[
        ("--out", Some(out)),
        ("--oof-out", args.oof_out.as_deref()),
        ("--json", args.json.as_deref()),
    ])?;
    let config = EnsembleConfig {
        folds: args.cv.folds,
        seed: args.cv.seed,
    };
    let report = fit_ensemble_files(&args.preds, labels, args.read.options(), &config)?;
    print!("{}", format_ensemble_report(&report));
    report.model.save(out)?;
    if let Some(path) = &args.oof_out {
        write_predictions(path, &report.out_of_fold)?;
    }
    if let Some(path) = &args.json {
        crate::atomic::write_json(path, &report)?;
    }
    Ok(())
}
