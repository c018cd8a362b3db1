//! Calibration: the last step before submission.csv. Takes one prediction set (a model's
//! or an ensemble's) and the labelled validation CSV, and fits, in this order:
//!
//! 1. temperature scaling, p ∝ p^(1/T), with T minimising log loss (1-D, convex in 1/T,
//!    solved by safeguarded Newton);
//! 2. the threshold-and-multiplier rule (a strong public solution's post-processing,
//!    there fixed at threshold 0.75, ×1.125 for A/B and ×1.325 for tie): a class whose
//!    probability exceeds the threshold is multiplied, then the row renormalised. Here the
//!    threshold is searched on a grid with local refinement and, for each threshold, both
//!    multipliers are fitted exactly (each is a 1-D convex problem: for a threshold ≥ 0.5
//!    only the top class can exceed it, so A/B rows and tie rows are disjoint);
//! 3. rules for degenerate rows, which the CSV shows: identical responses (A == B after
//!    trimming, turn by turn) and an empty response (some turn of exactly one side is
//!    null or blank). Each rule replaces the prediction by class frequencies of such rows,
//!    smoothed toward the prior; identical-response frequencies are symmetrised in A/B,
//!    empty-response frequencies are counted as (empty side wins, other side wins, tie).
//!    A rule needs `min_rule_rows` rows of its kind: on 1,000 real rows there were 8
//!    identical and 2 empty, too few to say what such rows do.
//!
//! Every step is judged out of fold: prompt-grouped k-fold, the pipeline (the steps kept
//! so far, then this step) fitted on k−1 folds and scored on the held-out one. A step is
//! kept only if its out-of-fold gain is positive and at least `keep_z` standard errors of
//! the paired per-row difference; otherwise it is switched off in the saved calibration
//! and the report says so. The steps after it are then fitted without it.

use crate::cli::required;
use crate::data::folds::{prompt_folds, FoldArgs};
use crate::data::{read_battles, Battle, ReadArgs, ReadOptions, Side, Winner};
use crate::metrics::{
    class_prior, clip_and_normalise, log_loss, row_log_loss, softmax_in_place, Probs,
};
use crate::submission::{
    read_aligned, read_labelled, read_predictions, write_predictions, Prediction,
};
use anyhow::{bail, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Whether a battle's responses make the prediction a special case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Degeneracy {
    Normal,
    /// Both sides answered the same text in every turn (including both empty).
    Identical,
    /// This side has a null or blank response in some turn, the other side has none.
    Empty(Side),
}

/// Classifies a battle for the degenerate-row rules.
pub fn degeneracy(b: &Battle) -> Degeneracy {
    let texts = |side| -> Vec<&str> { b.responses(side).map(|r| r.unwrap_or("").trim()).collect() };
    let (a, bb) = (texts(Side::A), texts(Side::B));
    if a == bb {
        return Degeneracy::Identical;
    }
    match (a.contains(&""), bb.contains(&"")) {
        (true, false) => Degeneracy::Empty(Side::A),
        (false, true) => Degeneracy::Empty(Side::B),
        _ => Degeneracy::Normal,
    }
}

/// One fitted calibration step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum Step {
    /// p ∝ p^(1/T): T > 1 softens, T < 1 sharpens.
    Temperature { temperature: f64 },
    /// If a class probability exceeds `threshold`, multiply it (`multiplier_ab` for A or B,
    /// `multiplier_tie` for tie) and renormalise.
    Threshold {
        threshold: f64,
        multiplier_ab: f64,
        multiplier_tie: f64,
    },
    /// Rows with identical responses predict `probs` (A, B, tie).
    IdenticalResponses { probs: Probs },
    /// Rows with one empty side predict `probs` as (empty side wins, other side wins, tie).
    EmptyResponse { probs: Probs },
}

impl Step {
    /// The calibrated prediction of one row.
    pub fn apply(&self, p: &Probs, d: Degeneracy) -> Probs {
        match *self {
            Step::Temperature { temperature } => temper(p, 1.0 / temperature),
            Step::Threshold {
                threshold,
                multiplier_ab,
                multiplier_tie,
            } => {
                let mut q = clip_and_normalise(p);
                for (k, v) in q.iter_mut().enumerate() {
                    if *v > threshold {
                        *v *= if k == 2 {
                            multiplier_tie
                        } else {
                            multiplier_ab
                        };
                    }
                }
                let sum: f64 = q.iter().sum();
                q.map(|v| v / sum)
            }
            Step::IdenticalResponses { probs } => match d {
                Degeneracy::Identical => probs,
                _ => *p,
            },
            Step::EmptyResponse { probs: [e, o, t] } => match d {
                Degeneracy::Empty(Side::A) => [e, o, t],
                Degeneracy::Empty(Side::B) => [o, e, t],
                _ => *p,
            },
        }
    }

    fn kind(&self) -> StepKind {
        match self {
            Step::Temperature { .. } => StepKind::Temperature,
            Step::Threshold { .. } => StepKind::Threshold,
            Step::IdenticalResponses { .. } => StepKind::IdenticalResponses,
            Step::EmptyResponse { .. } => StepKind::EmptyResponse,
        }
    }

    /// A one-line description of the fitted values.
    pub fn describe(&self) -> String {
        let v = |p: &Probs| format!("({:.3}, {:.3}, {:.3})", p[0], p[1], p[2]);
        match self {
            Step::Temperature { temperature } => format!("T = {temperature:.4}"),
            Step::Threshold {
                threshold,
                multiplier_ab,
                multiplier_tie,
            } => format!(
                "threshold {threshold:.3}, x{multiplier_ab:.4} A/B, x{multiplier_tie:.4} tie"
            ),
            Step::IdenticalResponses { probs } => format!("predict {} (A, B, tie)", v(probs)),
            Step::EmptyResponse { probs } => {
                format!("predict {} (empty side, other side, tie)", v(probs))
            }
        }
    }
}

/// p^β renormalised, computed on clipped log-probabilities.
fn temper(p: &Probs, beta: f64) -> Probs {
    temper_logs(&clip_and_normalise(p).map(f64::ln), beta)
}

/// The calibration steps, in fitting order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StepKind {
    Temperature,
    Threshold,
    IdenticalResponses,
    EmptyResponse,
}

impl StepKind {
    pub const ORDER: [StepKind; 4] = [
        StepKind::Temperature,
        StepKind::Threshold,
        StepKind::IdenticalResponses,
        StepKind::EmptyResponse,
    ];

    pub fn name(self) -> &'static str {
        match self {
            StepKind::Temperature => "temperature",
            StepKind::Threshold => "threshold x multiplier",
            StepKind::IdenticalResponses => "identical responses",
            StepKind::EmptyResponse => "empty response",
        }
    }
}

/// A saved calibration: the steps that helped out of fold, applied in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    pub steps: Vec<Step>,
}

impl Calibration {
    /// Calibrates `preds`; `degeneracy[i]` describes row i (only the rules look at it).
    pub fn apply(&self, preds: &[Probs], degeneracy: &[Degeneracy]) -> Vec<Probs> {
        assert_eq!(preds.len(), degeneracy.len(), "one degeneracy per row");
        preds
            .iter()
            .zip(degeneracy)
            .map(|(p, &d)| self.steps.iter().fold(*p, |q, s| s.apply(&q, d)))
            .collect()
    }

    /// Whether applying needs the battles' texts (a degenerate-row rule is on).
    pub fn needs_texts(&self) -> bool {
        self.steps.iter().any(|s| {
            matches!(
                s,
                Step::IdenticalResponses { .. } | Step::EmptyResponse { .. }
            )
        })
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        crate::atomic::write_json(path, self)
    }

    /// Loads a calibration written by [`Calibration::save`], checking its values.
    pub fn load(path: &Path) -> Result<Calibration> {
        let c: Calibration = crate::atomic::read_json(path, "a calibration")?;
        for s in &c.steps {
            let ok = match s {
                Step::Temperature { temperature } => temperature.is_finite() && *temperature > 0.0,
                Step::Threshold {
                    threshold,
                    multiplier_ab,
                    multiplier_tie,
                } => {
                    (0.0..1.0).contains(threshold)
                        && [multiplier_ab, multiplier_tie]
                            .iter()
                            .all(|m| m.is_finite() && **m > 0.0)
                }
                Step::IdenticalResponses { probs } | Step::EmptyResponse { probs } => {
                    probs.iter().all(|p| p.is_finite() && *p >= 0.0)
                        && probs.iter().sum::<f64>() > 0.0
                }
            };
            if !ok {
                bail!(
                    "{}: invalid {} step: {s:?}",
                    path.display(),
                    s.kind().name()
                );
            }
        }
        Ok(c)
    }
}

// ---------------------------------------------------------------------------------------
// Fitting single steps

/// The root of an increasing function on [lo, hi] from its value and slope: Newton steps,
/// bisection whenever Newton would leave the bracket. Clamps to an end without a root.
fn solve_increasing(f: impl Fn(f64) -> (f64, f64), start: f64, lo: f64, hi: f64) -> f64 {
    let (mut lo, mut hi) = (lo, hi);
    if f(lo).0 >= 0.0 {
        return lo;
    }
    if f(hi).0 <= 0.0 {
        return hi;
    }
    let mut x = start.clamp(lo, hi);
    for _ in 0..200 {
        let (v, slope) = f(x);
        if v == 0.0 {
            return x;
        }
        if v < 0.0 {
            lo = x;
        } else {
            hi = x;
        }
        let newton = x - v / slope;
        let next = if slope > 0.0 && newton > lo && newton < hi {
            newton
        } else {
            0.5 * (lo + hi)
        };
        if (next - x).abs() <= 1e-15 * (1.0 + x.abs()) || hi - lo <= 1e-15 * (1.0 + x.abs()) {
            return next;
        }
        x = next;
    }
    x
}

/// Temperatures searched: T in [1/20, 20].
const MAX_TEMPERATURE: f64 = 20.0;

/// The temperature minimising the log loss of p^(1/T) (exact 1-D minimisation).
pub fn fit_temperature(preds: &[Probs], truth: &[Winner]) -> f64 {
    let logs: Vec<Probs> = preds
        .iter()
        .map(|p| clip_and_normalise(p).map(f64::ln))
        .collect();
    // d/dβ of mean(lse(βl) − βl_y) is E_q[l] − l_y; the second derivative is Var_q(l) ≥ 0.
    let slope = |beta: f64| {
        let (mut d1, mut d2) = (0.0, 0.0);
        for (l, t) in logs.iter().zip(truth) {
            let q = temper_logs(l, beta);
            let mean: f64 = (0..3).map(|k| q[k] * l[k]).sum();
            let sq: f64 = (0..3).map(|k| q[k] * l[k] * l[k]).sum();
            d1 += mean - l[t.index()];
            d2 += sq - mean * mean;
        }
        (d1, d2)
    };
    1.0 / solve_increasing(slope, 1.0, 1.0 / MAX_TEMPERATURE, MAX_TEMPERATURE)
}

/// softmax(β·l) for log-probabilities l.
fn temper_logs(l: &Probs, beta: f64) -> Probs {
    let mut z = l.map(|v| beta * v);
    softmax_in_place(&mut z);
    z
}

/// Multipliers searched: [1/4, 4].
const MAX_MULTIPLIER: f64 = 4.0;
/// A multiplier is fitted only on at least this many rows above the threshold; fewer keep 1.
pub const MIN_THRESHOLD_ROWS: usize = 30;

/// Rows above a threshold whose top class is boosted: (p of that class, is it the truth).
fn best_multiplier(rows: &[(f64, bool)]) -> (f64, f64) {
    if rows.len() < MIN_THRESHOLD_ROWS {
        return (1.0, 0.0);
    }
    // Boosting p by e^u: loss change per row = ln(1 − p + e^u p) − [hit]·u, convex in u;
    // its slope is r(u) − [hit] with r = e^u p / (1 − p + e^u p), the boosted probability.
    let hits = rows.iter().filter(|r| r.1).count() as f64;
    let slope = |u: f64| {
        let m = u.exp();
        let (mut s, mut c) = (-hits, 0.0);
        for &(p, _) in rows {
            let r = m * p / (1.0 - p + m * p);
            s += r;
            c += r * (1.0 - r);
        }
        (s, c)
    };
    let bound = MAX_MULTIPLIER.ln();
    let u = solve_increasing(slope, 0.0, -bound, bound);
    let change: f64 = rows
        .iter()
        .map(|&(p, hit)| (1.0 - p + u.exp() * p).ln() - if hit { u } else { 0.0 })
        .sum();
    (u.exp(), change)
}

/// Fits the threshold-and-multiplier rule: thresholds on a 0.01 grid over [0.50, 0.98],
/// then a 0.001 grid around the best; for each threshold both multipliers exactly.
pub fn fit_threshold(preds: &[Probs], truth: &[Winner]) -> Step {
    // Top class of each row, its probability, and whether it is the true class.
    let tops: Vec<(usize, f64, bool)> = preds
        .iter()
        .zip(truth)
        .map(|(p, t)| {
            let q = clip_and_normalise(p);
            let k = (0..3).max_by(|&a, &b| q[a].total_cmp(&q[b])).expect("3");
            (k, q[k], k == t.index())
        })
        .collect();
    let evaluate = |threshold: f64| {
        let group = |tie: bool| -> Vec<(f64, bool)> {
            tops.iter()
                .filter(|&&(k, p, _)| (k == 2) == tie && p > threshold)
                .map(|&(_, p, hit)| (p, hit))
                .collect()
        };
        let (m_ab, d_ab) = best_multiplier(&group(false));
        let (m_tie, d_tie) = best_multiplier(&group(true));
        (d_ab + d_tie, threshold, m_ab, m_tie)
    };
    let best = |grid: Vec<f64>| {
        grid.into_par_iter()
            .map(evaluate)
            .collect::<Vec<_>>()
            .into_iter()
            .min_by(|a, b| a.0.total_cmp(&b.0))
            .expect("non-empty grid")
    };
    let coarse = best((50..=98).map(|i| i as f64 / 100.0).collect());
    let centre = (coarse.1 * 1000.0).round() as i64;
    let fine = best(
        (centre - 10..=centre + 10)
            .filter(|&i| (500..=985).contains(&i))
            .map(|i| i as f64 / 1000.0)
            .collect(),
    );
    let (_, threshold, multiplier_ab, multiplier_tie) =
        if fine.0 <= coarse.0 { fine } else { coarse };
    Step::Threshold {
        threshold,
        multiplier_ab,
        multiplier_tie,
    }
}

/// Smoothed class frequencies of degenerate rows; `None` with fewer than
/// `config.min_rule_rows` rows of that kind.
fn fit_rule(
    kind: StepKind,
    truth: &[Winner],
    deg: &[Degeneracy],
    config: &CalibrationConfig,
) -> Option<Step> {
    let prior = class_prior(truth);
    let side_prior = 0.5 * (prior[0] + prior[1]);
    let mut counts = [0.0; 3];
    let mut n = 0.0;
    for (t, d) in truth.iter().zip(deg) {
        let class = match (kind, d) {
            (StepKind::IdenticalResponses, Degeneracy::Identical) => t.index(),
            // Orient as (empty side wins, other side wins, tie).
            (StepKind::EmptyResponse, Degeneracy::Empty(side)) => match (side, t) {
                (_, Winner::Tie) => 2,
                (Side::A, Winner::A) | (Side::B, Winner::B) => 0,
                _ => 1,
            },
            _ => continue,
        };
        counts[class] += 1.0;
        n += 1.0;
    }
    if n == 0.0 || n < config.min_rule_rows as f64 {
        return None;
    }
    let smoothing = config.smoothing;
    let smooth = |c: f64, p: f64| (c + smoothing * p) / (n + smoothing);
    Some(match kind {
        StepKind::IdenticalResponses => {
            // A and B are exchangeable when the texts are the same.
            let ab = smooth(0.5 * (counts[0] + counts[1]), side_prior);
            Step::IdenticalResponses {
                probs: [ab, ab, smooth(counts[2], prior[2])],
            }
        }
        _ => Step::EmptyResponse {
            probs: [
                smooth(counts[0], side_prior),
                smooth(counts[1], side_prior),
                smooth(counts[2], prior[2]),
            ],
        },
    })
}

impl StepKind {
    /// Fits this step on predictions and labels; `None` when there is nothing to fit.
    fn fit(
        self,
        preds: &[Probs],
        truth: &[Winner],
        deg: &[Degeneracy],
        config: &CalibrationConfig,
    ) -> Option<Step> {
        match self {
            StepKind::Temperature => Some(Step::Temperature {
                temperature: fit_temperature(preds, truth),
            }),
            StepKind::Threshold => Some(fit_threshold(preds, truth)),
            StepKind::IdenticalResponses | StepKind::EmptyResponse => {
                fit_rule(self, truth, deg, config)
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The cross-validated pipeline

/// How to fit a calibration.
#[derive(Debug, Clone)]
pub struct CalibrationConfig {
    /// Prompt-grouped folds used to judge each step.
    pub folds: usize,
    pub seed: u64,
    /// Pseudo-rows of the class prior added to each degenerate-row rule's counts.
    pub smoothing: f64,
    /// A degenerate-row rule is fitted only on at least this many rows of its kind.
    pub min_rule_rows: usize,
    /// A step is kept if its out-of-fold gain exceeds this many standard errors.
    pub keep_z: f64,
    /// Bins of the reliability diagram.
    pub bins: usize,
}

impl Default for CalibrationConfig {
    fn default() -> Self {
        CalibrationConfig {
            folds: 5,
            seed: 0,
            smoothing: 10.0,
            min_rule_rows: 20,
            // Two standard errors: a step that only looks better by chance (one that would
            // leave the test score worse) passes about one time in forty, not one in six.
            keep_z: 2.0,
            bins: 10,
        }
    }
}

/// How one step did.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    pub step: StepKind,
    /// The step fitted on all rows (after the steps kept before it); `None` for a rule
    /// with fewer than `min_rule_rows` degenerate rows of its kind.
    pub fitted: Option<Step>,
    /// Rows whose prediction the all-rows fit changes.
    pub rows_hit: usize,
    pub in_sample_before: f64,
    pub in_sample_after: f64,
    pub out_of_fold_before: f64,
    pub out_of_fold_after: f64,
    /// Standard error of the out-of-fold gain, from the paired per-row differences.
    pub out_of_fold_gain_se: f64,
    /// Out-of-fold loss over the rows the step changed in their fold (before, after).
    pub hit_rows_out_of_fold: Option<(f64, f64)>,
    /// Kept in the saved calibration: gain > 0 and gain ≥ keep_z · se.
    pub kept: bool,
}

/// How many labelled rows each degenerate-row rule can apply to.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct DegenerateCounts {
    pub identical: usize,
    pub empty_a: usize,
    pub empty_b: usize,
}

impl DegenerateCounts {
    fn of(deg: &[Degeneracy]) -> DegenerateCounts {
        let count = |want: Degeneracy| deg.iter().filter(|&&d| d == want).count();
        DegenerateCounts {
            identical: count(Degeneracy::Identical),
            empty_a: count(Degeneracy::Empty(Side::A)),
            empty_b: count(Degeneracy::Empty(Side::B)),
        }
    }
}

/// Everything `verdict calibrate` reports.
#[derive(Debug, Clone, Serialize)]
pub struct CalibrationReport {
    pub rows: usize,
    pub folds: usize,
    pub seed: u64,
    pub keep_z: f64,
    pub min_rule_rows: usize,
    pub degenerate: DegenerateCounts,
    pub raw_log_loss: f64,
    pub steps: Vec<StepReport>,
    /// The saved calibration: only the kept steps.
    pub calibration: Calibration,
    pub in_sample_log_loss: f64,
    pub out_of_fold_log_loss: f64,
    /// Where the reliability diagram was written, if it was.
    pub diagram: Option<PathBuf>,
    /// Out-of-fold calibrated predictions, in label order.
    #[serde(skip)]
    pub out_of_fold: Vec<Probs>,
}

/// One fold's rows and the current pipeline's predictions on them.
struct FoldState {
    train: Vec<usize>,
    valid: Vec<usize>,
    train_preds: Vec<Probs>,
    valid_preds: Vec<Probs>,
}

fn apply_step(step: Option<&Step>, preds: &[Probs], deg: &[Degeneracy]) -> Vec<Probs> {
    match step {
        Some(s) => preds.iter().zip(deg).map(|(p, &d)| s.apply(p, d)).collect(),
        None => preds.to_vec(),
    }
}

fn changed(a: &Probs, b: &Probs) -> bool {
    let (a, b) = (clip_and_normalise(a), clip_and_normalise(b));
    (0..3).any(|k| (a[k] - b[k]).abs() > 1e-12)
}

/// Fits a calibration of `preds` (aligned with the labelled `battles`), judging each step
/// out of fold; writes the reliability diagram (raw vs out-of-fold calibrated) to `diagram`.
pub fn fit_calibration(
    preds: &[Probs],
    battles: &[Battle],
    config: &CalibrationConfig,
    diagram: Option<&Path>,
) -> Result<CalibrationReport> {
    let truth = crate::baseline::labels_of(battles)?;
    if preds.len() != truth.len() {
        bail!(
            "{} predictions for {} labelled rows",
            preds.len(),
            truth.len()
        );
    }
    let deg: Vec<Degeneracy> = battles.iter().map(degeneracy).collect();
    let folds = prompt_folds(battles, config.folds, config.seed)?;
    let pick = |v: &[Probs], rows: &[usize]| rows.iter().map(|&i| v[i]).collect::<Vec<_>>();
    let mut states: Vec<FoldState> = (0..config.folds)
        .map(|f| {
            let (train, valid) = folds.split(f);
            FoldState {
                train_preds: pick(preds, &train),
                valid_preds: pick(preds, &valid),
                train,
                valid,
            }
        })
        .collect();
    let mut current = preds.to_vec();
    let mut steps = Vec::new();
    let mut reports = Vec::new();
    let out_of_fold = |states: &[FoldState], which: &dyn Fn(&FoldState) -> &[Probs]| {
        let mut oof = vec![[0.0; 3]; truth.len()];
        for s in states {
            for (&i, p) in s.valid.iter().zip(which(s)) {
                oof[i] = *p;
            }
        }
        oof
    };

    for kind in StepKind::ORDER {
        let fitted = kind.fit(&current, &truth, &deg, config);
        let after = apply_step(fitted.as_ref(), &current, &deg);
        // The same step fitted inside each fold on that fold's training rows.
        let candidates: Vec<(Vec<Probs>, Vec<Probs>)> = states
            .par_iter()
            .map(|s| {
                let t: Vec<Winner> = s.train.iter().map(|&i| truth[i]).collect();
                let td: Vec<Degeneracy> = s.train.iter().map(|&i| deg[i]).collect();
                let vd: Vec<Degeneracy> = s.valid.iter().map(|&i| deg[i]).collect();
                let step = kind.fit(&s.train_preds, &t, &td, config);
                (
                    apply_step(step.as_ref(), &s.train_preds, &td),
                    apply_step(step.as_ref(), &s.valid_preds, &vd),
                )
            })
            .collect();
        let before_oof = out_of_fold(&states, &|s| &s.valid_preds);
        let mut after_oof = vec![[0.0; 3]; truth.len()];
        for (s, (_, v)) in states.iter().zip(&candidates) {
            for (&i, p) in s.valid.iter().zip(v) {
                after_oof[i] = *p;
            }
        }
        let diffs: Vec<f64> = (0..truth.len())
            .map(|i| row_log_loss(&before_oof[i], truth[i]) - row_log_loss(&after_oof[i], truth[i]))
            .collect();
        let (gain, se) = crate::metrics::mean_and_se(&diffs);
        let hit: Vec<usize> = (0..truth.len())
            .filter(|&i| changed(&before_oof[i], &after_oof[i]))
            .collect();
        let hit_rows_out_of_fold = (!hit.is_empty()).then(|| {
            let t: Vec<Winner> = hit.iter().map(|&i| truth[i]).collect();
            (
                log_loss(&pick(&before_oof, &hit), &t),
                log_loss(&pick(&after_oof, &hit), &t),
            )
        });
        let kept = fitted.is_some() && gain > 0.0 && gain >= config.keep_z * se;
        reports.push(StepReport {
            step: kind,
            rows_hit: current
                .iter()
                .zip(&after)
                .filter(|(a, b)| changed(a, b))
                .count(),
            in_sample_before: log_loss(&current, &truth),
            in_sample_after: log_loss(&after, &truth),
            out_of_fold_before: log_loss(&before_oof, &truth),
            out_of_fold_after: log_loss(&after_oof, &truth),
            out_of_fold_gain_se: se,
            hit_rows_out_of_fold,
            kept,
            fitted: fitted.clone(),
        });
        if kept {
            current = after;
            steps.push(fitted.expect("kept steps are fitted"));
            for (s, (t, v)) in states.iter_mut().zip(candidates) {
                s.train_preds = t;
                s.valid_preds = v;
            }
        }
    }

    let oof = out_of_fold(&states, &|s| &s.valid_preds);
    if let Some(path) = diagram {
        crate::plot::reliability_diagram(
            path,
            "Reliability: raw vs calibrated (out of fold)",
            &[("raw", preds), ("calibrated", &oof)],
            &truth,
            config.bins,
        )?;
    }
    Ok(CalibrationReport {
        rows: truth.len(),
        folds: config.folds,
        seed: config.seed,
        keep_z: config.keep_z,
        min_rule_rows: config.min_rule_rows,
        degenerate: DegenerateCounts::of(&deg),
        raw_log_loss: log_loss(preds, &truth),
        steps: reports,
        calibration: Calibration { steps },
        in_sample_log_loss: log_loss(&current, &truth),
        out_of_fold_log_loss: log_loss(&oof, &truth),
        diagram: diagram.map(Path::to_path_buf),
        out_of_fold: oof,
    })
}

// ---------------------------------------------------------------------------------------
// Files

/// `verdict calibrate` fit: joins the prediction file with the labelled CSV by id (every
/// id must match), fits and judges each step, and writes the reliability diagram PNG.
pub fn fit_calibration_files(
    preds: &Path,
    labels: &Path,
    options: ReadOptions,
    config: &CalibrationConfig,
    diagram: Option<&Path>,
) -> Result<CalibrationReport> {
    let battles = read_labelled(labels, options)?;
    let ids: Vec<&str> = battles.iter().map(|b| b.id.as_str()).collect();
    let aligned = read_aligned(preds, &ids, &labels.display().to_string())?;
    fit_calibration(&aligned, &battles, config, diagram)
}

/// What applying a calibration did.
#[derive(Debug, Clone, Serialize)]
pub struct ApplySummary {
    pub rows: usize,
    /// Degenerate rows found in the CSV (zero when no CSV was read).
    pub degenerate: DegenerateCounts,
    /// Rows whose prediction a degenerate-row rule replaced.
    pub rule_rows: usize,
}

/// `verdict calibrate` apply: calibrates a prediction file and writes a submission-format
/// CSV atomically. `battles_csv` (the test CSV) is required when the calibration has a
/// degenerate-row rule; when given, its ids must match the predictions' and rows follow its
/// order, otherwise the predictions' order.
pub fn apply_calibration_files(
    calibration: &Calibration,
    preds: &Path,
    battles_csv: Option<&Path>,
    options: ReadOptions,
    out: &Path,
) -> Result<ApplySummary> {
    let (ids, probs, deg) = match battles_csv {
        Some(csv) => {
            let (battles, _) = read_battles(csv, options)?;
            let ids: Vec<String> = battles.iter().map(|b| b.id.clone()).collect();
            let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
            let probs = read_aligned(preds, &id_refs, &csv.display().to_string())?;
            (ids, probs, battles.iter().map(degeneracy).collect())
        }
        None if calibration.needs_texts() => bail!(
            "the calibration has a degenerate-row rule (identical or empty responses): \
             pass the CSV of the predicted rows so the rule can see the responses"
        ),
        None => {
            let rows = read_predictions(preds)?;
            let n = rows.len();
            let (ids, probs) = rows.into_iter().map(|r| (r.id, r.probs)).unzip();
            (ids, probs, vec![Degeneracy::Normal; n])
        }
    };
    let calibrated = calibration.apply(&probs, &deg);
    let rule_rows = deg
        .iter()
        .filter(|d| {
            calibration.steps.iter().any(|s| {
                matches!(
                    (s, d),
                    (Step::IdenticalResponses { .. }, Degeneracy::Identical)
                        | (Step::EmptyResponse { .. }, Degeneracy::Empty(_))
                )
            })
        })
        .count();
    let rows: Vec<Prediction> = ids
        .into_iter()
        .zip(calibrated)
        .map(|(id, probs)| Prediction { id, probs })
        .collect();
    write_predictions(out, &rows)?;
    Ok(ApplySummary {
        rows: rows.len(),
        degenerate: DegenerateCounts::of(&deg),
        rule_rows,
    })
}

/// The table `verdict calibrate` prints.
pub fn format_calibration_report(r: &CalibrationReport) -> String {
    let d = r.degenerate;
    let mut out = format!(
        "{} rows ({} identical responses, {} empty A, {} empty B); {} prompt-grouped folds, seed {}\n",
        r.rows, d.identical, d.empty_a, d.empty_b, r.folds, r.seed
    );
    out += &format!(
        "{:<24} {:>8}  {:>19}  {:>19}  {:>18}  {}\n",
        "step", "rows hit", "in-sample", "out-of-fold", "gain (se)", "kept"
    );
    for s in &r.steps {
        let verdict = if s.kept {
            "yes".to_string()
        } else if s.fitted.is_none() {
            format!("no: fewer than {} rows of its kind to fit", r.min_rule_rows)
        } else {
            format!("no: gain not above {} se out of fold", r.keep_z)
        };
        out += &format!(
            "{:<24} {:>8}  {:.5} -> {:.5}  {:.5} -> {:.5}  {:>+9.5} ({:.5})  {}\n",
            s.step.name(),
            s.rows_hit,
            s.in_sample_before,
            s.in_sample_after,
            s.out_of_fold_before,
            s.out_of_fold_after,
            s.out_of_fold_before - s.out_of_fold_after,
            s.out_of_fold_gain_se,
            verdict
        );
        if let Some(f) = &s.fitted {
            out += &format!("{:<24} fitted on all rows: {}\n", "", f.describe());
        }
        if let Some((b, a)) = s.hit_rows_out_of_fold {
            out += &format!(
                "{:<24} on the rows it changes, out of fold: {b:.5} -> {a:.5}\n",
                ""
            );
        }
    }
    out += &format!(
        "raw {:.5} -> calibrated {:.5} in sample, {:.5} out of fold ({} of {} steps kept)\n",
        r.raw_log_loss,
        r.in_sample_log_loss,
        r.out_of_fold_log_loss,
        r.calibration.steps.len(),
        r.steps.len()
    );
    if let Some(p) = &r.diagram {
        out += &format!("reliability diagram: {}\n", p.display());
    }
    out
}

// ---------------------------------------------------------------------------------------
// Command line

/// `verdict calibrate`'s flags: fit, or `apply` a fitted calibration.
#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Args {
    #[command(subcommand)]
    apply: Option<Apply>,
    /// Predictions to calibrate (ideally out-of-fold ones).
    #[arg(long)]
    preds: Option<PathBuf>,
    /// Labelled competition CSV (its texts also drive the degenerate-row rules).
    #[arg(long)]
    labels: Option<PathBuf>,
    /// The fitted calibration (JSON).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Reliability diagram PNG (before/after, per class).
    #[arg(long)]
    diagram: Option<PathBuf>,
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
    /// Apply a fitted calibration to a prediction file.
    ///
    /// Example: verdict calibrate apply --calibration calibration.json --preds test.csv --out submission.csv
    Apply {
        /// A calibration written by `verdict calibrate`.
        #[arg(long)]
        calibration: PathBuf,
        /// The prediction file to calibrate.
        #[arg(long)]
        preds: PathBuf,
        /// The test CSV (needed when a degenerate-row rule is on).
        #[arg(long)]
        test: Option<PathBuf>,
        /// The calibrated submission CSV.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        read: ReadArgs,
    },
}

/// `verdict calibrate [apply]`.
pub fn run(args: &Args) -> Result<()> {
    if let Some(Apply::Apply {
        calibration,
        preds,
        test,
        out,
        read,
    }) = &args.apply
    {
        crate::atomic::check_output("--out", out, false)?;
        let calibration = Calibration::load(calibration)?;
        let summary =
            apply_calibration_files(&calibration, preds, test.as_deref(), read.options(), out)?;
        println!(
            "wrote {} calibrated predictions -> {} ({} replaced by degenerate-row rules)",
            summary.rows,
            out.display(),
            summary.rule_rows
        );
        return Ok(());
    }
    let preds = required(args.preds.as_ref(), "--preds")?;
    let labels = required(args.labels.as_ref(), "--labels")?;
    let out = required(args.out.as_ref(), "--out")?;
    crate::atomic::check_output_files(&[
        ("--out", Some(out)),
        ("--diagram", args.diagram.as_deref()),
        ("--json", args.json.as_deref()),
    ])?;
    let config = CalibrationConfig {
        folds: args.cv.folds,
        seed: args.cv.seed,
        ..Default::default()
    };
    let report = fit_calibration_files(
        preds,
        labels,
        args.read.options(),
        &config,
        args.diagram.as_deref(),
    )?;
    print!("{}", format_calibration_report(&report));
    report.calibration.save(out)?;
    if let Some(path) = &args.json {
        crate::atomic::write_json(path, &report)?;
    }
    Ok(())
}
