//! The length-bucket baseline: no model, just "the longer answer tends to win".
//!
//! A feature of the two responses (difference of characters, words or tokens, A minus B)
//! is cut at training quantiles into buckets; each bucket predicts its class frequencies,
//! smoothed toward the overall prior. The task is symmetric (swapping A and B negates the
//! feature and swaps the label), so buckets are cut on |value| and count "longer wins,
//! shorter wins, tie": each bucket sees twice the rows, and predictions mirror exactly.
//! Measured on arena-dev.csv (5-fold grouped CV): 1.0602 with symmetry vs 1.0614 without.
//!
//! The bucket count matters more than anything else here: too few cannot follow the curve,
//! too many overfit small data (250 buckets on 1,000 rows is worse than the prior). By
//! default the count is chosen by prompt-grouped cross-validation on the training data.

use crate::cli::range;
use crate::data::folds::{grouped_folds, Folds};
use crate::data::{report_skipped, Battle, BattleReader, ReadArgs, Side, Winner};
use crate::metrics::{class_prior, log_loss, Probs};
use crate::submission::{write_predictions, Prediction};
use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// What is measured on each response (summed over turns; a null turn counts as empty).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Feature {
    /// Unicode characters.
    Chars,
    /// Whitespace-separated words.
    Words,
    /// Tokens of a tokenizer.json (needs `--tokenizer`).
    Tokens,
}

impl std::fmt::Display for Feature {
    /// The name `--feature` takes.
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(match self {
            Feature::Chars => "chars",
            Feature::Words => "words",
            Feature::Tokens => "tokens",
        })
    }
}

/// Bucket counts tried when the count is chosen by cross-validation.
pub const BUCKET_CANDIDATES: [usize; 8] = [3, 5, 10, 20, 40, 80, 160, 250];

/// Folds used to choose the bucket count.
const SELECTION_FOLDS: usize = 5;

/// How to fit the baseline.
#[derive(Debug, Clone)]
pub struct BaselineConfig {
    pub feature: Feature,
    /// Fixed bucket count, or `None` to choose from [`BUCKET_CANDIDATES`] by cross-validation.
    pub buckets: Option<usize>,
    /// Pseudo-counts of the overall prior added to every bucket.
    pub smoothing: f64,
    pub tokenizer: Option<PathBuf>,
    pub seed: u64,
}

impl Default for BaselineConfig {
    /// Characters, bucket count chosen by cross-validation, 10 pseudo-counts, seed 0: what
    /// `verdict baseline fit` does without options.
    fn default() -> BaselineConfig {
        BaselineConfig {
            feature: Feature::Chars,
            buckets: None,
            smoothing: 10.0,
            tokenizer: None,
            seed: 0,
        }
    }
}

/// Cross-validated loss of one bucket count, recorded when the count is chosen automatically.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BucketTrial {
    pub buckets: usize,
    pub cv_log_loss: f64,
}

/// A fitted baseline, saved as JSON by `verdict baseline fit`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BaselineModel {
    pub feature: Feature,
    pub tokenizer: Option<PathBuf>,
    /// Upper boundaries of |value| buckets: |v| falls in the first bucket whose edge is >= |v|.
    pub edges: Vec<f64>,
    /// Smoothed (longer wins, shorter wins, tie) frequencies per bucket; one more than edges.
    pub bucket_probs: Vec<Probs>,
    /// Overall (A, B, tie) frequencies of the training rows and their swaps.
    pub prior: Probs,
    pub smoothing: f64,
    pub train_rows: usize,
    /// Buckets along the signed feature axis (mirror pairs of |value| buckets).
    pub buckets: usize,
    /// With an odd bucket count the smallest-|value| bucket straddles zero: it predicts the
    /// same for A and B whichever side is longer.
    pub centre_is_symmetric: bool,
    /// The cross-validation that chose the bucket count (empty if it was given).
    pub bucket_trials: Vec<BucketTrial>,
}

/// What the baseline keeps of a labelled battle: a few bytes, so fitting streams any size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observation {
    /// The feature, A minus B.
    pub value: f64,
    pub winner: Winner,
    /// Groups rows that share a prompt, for cross-validation folds.
    pub prompt_key: u64,
}

/// Measures one text with a feature.
struct Measure(Box<dyn Fn(&str) -> Result<usize> + Sync>);

impl Measure {
    fn new(feature: Feature, tokenizer: Option<&Path>) -> Result<Measure> {
        Ok(Measure(match feature {
            Feature::Chars => Box::new(|s: &str| Ok(s.chars().count())),
            Feature::Words => Box::new(|s: &str| Ok(s.split_whitespace().count())),
            Feature::Tokens => {
                let path =
                    tokenizer.context("--feature tokens needs --tokenizer tokenizer.json")?;
                let tok = tokenizers::Tokenizer::from_file(path).map_err(|e| {
                    anyhow::anyhow!("cannot load tokenizer {}: {e}", path.display())
                })?;
                Box::new(move |s: &str| {
                    let enc = tok
                        .encode(s, false)
                        .map_err(|e| anyhow::anyhow!("tokenizer failed: {e}"))?;
                    Ok(enc.len())
                })
            }
        }))
    }

    /// The feature of a battle: size of A's responses minus size of B's (nulls count as empty).
    fn battle(&self, b: &Battle) -> Result<f64> {
        let total = |side| -> Result<f64> {
            let mut n = 0;
            for text in b.responses(side) {
                n += (self.0)(text.unwrap_or(""))?;
            }
            Ok(n as f64)
        };
        Ok(total(Side::A)? - total(Side::B)?)
    }

    fn values(&self, battles: &[Battle]) -> Result<Vec<f64>> {
        battles.par_iter().map(|b| self.battle(b)).collect()
    }
}

/// Per-battle feature values (A minus B).
pub fn feature_values(
    battles: &[Battle],
    feature: Feature,
    tokenizer: Option<&Path>,
) -> Result<Vec<f64>> {
    Measure::new(feature, tokenizer)?.values(battles)
}

/// Battles are measured in chunks of this many, in parallel, while the file streams.
const CHUNK: usize = 4096;

/// Reads labelled battles from a stream into observations, measuring chunks in parallel.
pub fn observe(
    battles: impl Iterator<Item = Result<Battle>>,
    feature: Feature,
    tokenizer: Option<&Path>,
) -> Result<Vec<Observation>> {
    let measure = Measure::new(feature, tokenizer)?;
    let mut observations = Vec::new();
    let mut chunk = Vec::with_capacity(CHUNK);
    let mut battles = battles.peekable();
    while battles.peek().is_some() {
        chunk.clear();
        for b in battles.by_ref().take(CHUNK) {
            chunk.push(b?);
        }
        let winners = labels_of(&chunk)?;
        let values = measure.values(&chunk)?;
        for ((b, value), winner) in chunk.iter().zip(values).zip(winners) {
            observations.push(Observation {
                value,
                winner,
                prompt_key: b.prompt_key(),
            });
        }
    }
    if observations.is_empty() {
        bail!("no labelled rows to fit on");
    }
    Ok(observations)
}

/// Upper edges of |value| buckets for `signed_buckets` buckets along the signed axis.
///
/// Buckets on the signed axis are mirror pairs, each holding 2/N of the rows; with an odd
/// N the middle bucket straddles zero and holds 1/N, so the first |value| edge sits at the
/// 1/N quantile of |value|, the next ones 2/N apart.
fn magnitude_edges(magnitudes: &[f64], signed_buckets: usize) -> Vec<f64> {
    let mut sorted = magnitudes.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = signed_buckets.max(1);
    let first = if n % 2 == 1 { 1 } else { 2 };
    let mut edges: Vec<f64> = (first..n)
        .step_by(2)
        .map(|k| sorted[(k * sorted.len() / n).min(sorted.len() - 1)])
        .collect();
    edges.dedup();
    edges
}

impl BaselineModel {
    /// Fits on feature values and labels. Counts are kept as (longer wins, shorter wins,
    /// tie) per bucket of |value|, which is the same as training on every row and its A/B
    /// swap, and makes predictions exactly mirror-symmetric.
    fn fit_values(
        obs: &[Observation],
        buckets: usize,
        smoothing: f64,
        feature: Feature,
    ) -> BaselineModel {
        let magnitudes: Vec<f64> = obs.iter().map(|o| o.value.abs()).collect();
        let edges = magnitude_edges(&magnitudes, buckets);
        let mut counts = vec![[0.0f64; 3]; edges.len() + 1];
        for &Observation {
            value: v,
            winner: w,
            ..
        } in obs
        {
            let c = &mut counts[bucket_of(&edges, v.abs())];
            // In (longer, shorter, tie) order a row with A longer keeps its label; equal
            // lengths have no longer side, so they count half in each orientation.
            match v.partial_cmp(&0.0) {
                Some(std::cmp::Ordering::Greater) => c[w.index()] += 1.0,
                Some(std::cmp::Ordering::Less) => c[w.swapped().index()] += 1.0,
                _ => {
                    c[w.index()] += 0.5;
                    c[w.swapped().index()] += 0.5;
                }
            }
        }
        let total = counts.iter().fold([0.0; 3], |acc, c| {
            [acc[0] + c[0], acc[1] + c[1], acc[2] + c[2]]
        });
        let n: f64 = total.iter().sum();
        // The prior over (longer, shorter, tie) is not symmetric, but over (A, B, tie) it is.
        let ab = (total[0] + total[1]) / 2.0 / n;
        let prior = [ab, ab, total[2] / n];
        let bucket_probs = counts
            .iter()
            .map(|c| {
                let n: f64 = c.iter().sum();
                [0, 1, 2].map(|k| (c[k] + smoothing * prior[k]) / (n + smoothing))
            })
            .collect();
        BaselineModel {
            feature,
            tokenizer: None,
            edges,
            bucket_probs,
            prior,
            smoothing,
            train_rows: obs.len(),
            buckets,
            centre_is_symmetric: buckets % 2 == 1,
            bucket_trials: Vec::new(),
        }
    }

    /// Prediction (A, B, tie) for one feature value (A minus B).
    pub fn predict_value(&self, v: f64) -> Probs {
        let bucket = bucket_of(&self.edges, v.abs());
        let [longer, shorter, tie] = self.bucket_probs[bucket];
        if v == 0.0 || (bucket == 0 && self.centre_is_symmetric) {
            let even = (longer + shorter) / 2.0;
            [even, even, tie]
        } else if v > 0.0 {
            [longer, shorter, tie]
        } else {
            [shorter, longer, tie]
        }
    }

    /// Predictions for battles (computes their feature with this model's settings).
    pub fn predict(&self, battles: &[Battle]) -> Result<Vec<Probs>> {
        let values = feature_values(battles, self.feature, self.tokenizer.as_deref())?;
        Ok(values.iter().map(|&v| self.predict_value(v)).collect())
    }

    /// Log-probabilities (A, B, tie) of each battle as given and with A and B swapped (whose
    /// feature is the negated one): the logit offsets of a classifier trained on top of this
    /// model (`verdict train --on-baseline`).
    pub fn log_prob_views(&self, battles: &[Battle]) -> Result<Vec<[[f32; 3]; 2]>> {
        let values = feature_values(battles, self.feature, self.tokenizer.as_deref())?;
        let ln = |p: Probs| p.map(|x| x.ln() as f32);
        Ok(values
            .iter()
            .map(|&v| [ln(self.predict_value(v)), ln(self.predict_value(-v))])
            .collect())
    }

    /// Fits on labelled battles held in memory (see [`BaselineModel::fit`]).
    pub fn fit_battles(battles: &[Battle], config: &BaselineConfig) -> Result<BaselineModel> {
        let observations = observe(
            battles.iter().cloned().map(Ok),
            config.feature,
            config.tokenizer.as_deref(),
        )?;
        Ok(BaselineModel::fit(&observations, config))
    }

    /// Fits on observations, choosing the bucket count by grouped CV unless it is given.
    pub fn fit(observations: &[Observation], config: &BaselineConfig) -> BaselineModel {
        let mut model = fit_selected(observations, config);
        model.tokenizer = config.tokenizer.clone();
        model
    }

    /// Loads a model written by `verdict baseline fit`.
    pub fn load(path: &Path) -> Result<BaselineModel> {
        let model: BaselineModel = crate::atomic::read_json(path, "a baseline model")?;
        if model.bucket_probs.len() != model.edges.len() + 1 {
            bail!(
                "{}: {} edges need {} buckets, found {}",
                path.display(),
                model.edges.len(),
                model.edges.len() + 1,
                model.bucket_probs.len()
            );
        }
        Ok(model)
    }
}

fn bucket_of(edges: &[f64], v: f64) -> usize {
    edges.partition_point(|&e| e < v)
}

/// The labels of battles, or an error naming the first unlabelled one.
pub fn labels_of(battles: &[Battle]) -> Result<Vec<Winner>> {
    if battles.is_empty() {
        bail!("no labelled rows to fit on");
    }
    battles
        .iter()
        .map(|b| {
            b.winner
                .with_context(|| format!("battle {} has no label (winner_* columns)", b.id))
        })
        .collect()
}

/// Fits with the configured bucket count, or the one with the best grouped-CV loss.
/// How many different prompts the rows have (folds are drawn by prompt).
fn distinct_prompts(obs: &[Observation]) -> usize {
    prompt_keys(obs)
        .into_iter()
        .collect::<std::collections::HashSet<_>>()
        .len()
}

fn fit_selected(obs: &[Observation], config: &BaselineConfig) -> BaselineModel {
    let fit = |train: &[Observation], buckets| {
        BaselineModel::fit_values(train, buckets, config.smoothing, config.feature)
    };
    let Some(n) = config.buckets else {
        // Every selection fold needs a prompt of its own, and training rows besides.
        let selection_folds = SELECTION_FOLDS.min(distinct_prompts(obs));
        if selection_folds < 2 {
            // One prompt: nothing to choose by cross-validation; the fewest buckets.
            return fit(obs, BUCKET_CANDIDATES[0]);
        }
        let folds = grouped_folds(&prompt_keys(obs), selection_folds, config.seed);
        let truth: Vec<Winner> = obs.iter().map(|o| o.winner).collect();
        let trials: Vec<BucketTrial> = BUCKET_CANDIDATES
            .iter()
            .map(|&n| {
                let oof = out_of_fold(obs, &folds, selection_folds, |train| fit(train, n));
                BucketTrial {
                    buckets: n,
                    cv_log_loss: log_loss(&oof, &truth),
                }
            })
            .collect();
        let best = trials
            .iter()
            .min_by(|a, b| a.cv_log_loss.total_cmp(&b.cv_log_loss))
            .expect("candidates");
        let mut model = fit(obs, best.buckets);
        model.bucket_trials = trials;
        return model;
    };
    fit(obs, n)
}

fn prompt_keys(obs: &[Observation]) -> Vec<u64> {
    obs.iter().map(|o| o.prompt_key).collect()
}

/// Out-of-fold predictions: for each fold, fit on the others and predict it.
fn out_of_fold(
    obs: &[Observation],
    folds: &[usize],
    k: usize,
    fit: impl Fn(&[Observation]) -> BaselineModel,
) -> Vec<Probs> {
    let mut oof = vec![[0.0; 3]; obs.len()];
    for f in 0..k {
        let train: Vec<Observation> = obs
            .iter()
            .zip(folds)
            .filter(|(_, &x)| x != f)
            .map(|(o, _)| *o)
            .collect();
        let model = fit(&train);
        for (i, o) in obs.iter().enumerate().filter(|(i, _)| folds[*i] == f) {
            oof[i] = model.predict_value(o.value);
        }
    }
    oof
}

/// One fold of `verdict baseline cv`.
#[derive(Debug, Clone, Serialize)]
pub struct FoldResult {
    pub fold: usize,
    pub train_rows: usize,
    pub valid_rows: usize,
    pub buckets: usize,
    pub log_loss: f64,
    pub prior_log_loss: f64,
}

/// The result of `verdict baseline cv`.
#[derive(Debug, Clone, Serialize)]
pub struct CvReport {
    pub feature: Feature,
    pub folds: Vec<FoldResult>,
    /// Log loss of all out-of-fold predictions together.
    pub log_loss: f64,
    /// The same for the class prior of each training fold.
    pub prior_log_loss: f64,
    pub uniform_log_loss: f64,
    #[serde(skip)]
    pub out_of_fold: Vec<Probs>,
}

/// Prompt-grouped k-fold cross-validation; bucket selection (if automatic) is nested
/// inside each training fold, so the reported loss is honest.
pub fn cross_validate(
    obs: &[Observation],
    folds: usize,
    config: &BaselineConfig,
) -> Result<CvReport> {
    let groups = distinct_prompts(obs);
    if folds < 2 || folds > groups {
        bail!(
            "--folds must be between 2 and the number of distinct prompts ({groups}), got {folds}"
        );
    }
    let split = Folds {
        fold_of: grouped_folds(&prompt_keys(obs), folds, config.seed),
    };
    let mut oof = vec![[0.0; 3]; obs.len()];
    let mut prior_oof = vec![[0.0; 3]; obs.len()];
    let mut results = Vec::new();
    for f in 0..folds {
        let (train, valid) = split.split(f);
        let train_obs: Vec<Observation> = train.iter().map(|&i| obs[i]).collect();
        let model = fit_selected(&train_obs, config);
        let prior = class_prior(&train_obs.iter().map(|o| o.winner).collect::<Vec<_>>());
        for &i in &valid {
            oof[i] = model.predict_value(obs[i].value);
            prior_oof[i] = prior;
        }
        let truth: Vec<Winner> = valid.iter().map(|&i| obs[i].winner).collect();
        let preds: Vec<Probs> = valid.iter().map(|&i| oof[i]).collect();
        results.push(FoldResult {
            fold: f,
            train_rows: train.len(),
            valid_rows: valid.len(),
            buckets: model.buckets,
            log_loss: log_loss(&preds, &truth),
            prior_log_loss: log_loss(&vec![prior; truth.len()], &truth),
        });
    }
    let truth: Vec<Winner> = obs.iter().map(|o| o.winner).collect();
    Ok(CvReport {
        feature: config.feature,
        folds: results,
        log_loss: log_loss(&oof, &truth),
        prior_log_loss: log_loss(&prior_oof, &truth),
        uniform_log_loss: 3f64.ln(),
        out_of_fold: oof,
    })
}

/// The table `verdict baseline cv` prints.
pub fn format_cv(r: &CvReport) -> String {
    let mut out = format!(
        "{:>4} {:>6} {:>6} {:>7} {:>9} {:>9}\n",
        "fold", "train", "valid", "buckets", "log loss", "prior"
    );
    for f in &r.folds {
        out += &format!(
            "{:>4} {:>6} {:>6} {:>7} {:>9.5} {:>9.5}\n",
            f.fold, f.train_rows, f.valid_rows, f.buckets, f.log_loss, f.prior_log_loss
        );
    }
    out += &format!(
        "out-of-fold log loss {:.5} (buckets of the length in {})  class prior {:.5}  uniform {:.5}\n",
        r.log_loss, r.feature, r.prior_log_loss, r.uniform_log_loss
    );
    out
}

/// `verdict baseline`'s fitting flags.
#[derive(clap::Args, Debug, Clone)]
pub struct FitArgs {
    /// Number of buckets; "auto" chooses by prompt-grouped 5-fold CV on the training data.
    #[arg(long, default_value = "auto", value_parser = parse_buckets)]
    buckets: BucketCount,
    /// What to measure on each response.
    #[arg(long, value_enum, default_value = "chars")]
    feature: Feature,
    /// tokenizer.json for --feature tokens.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Pseudo-counts of the overall prior added to each bucket.
    #[arg(long, allow_negative_numbers = true, value_parser = range::positive::<f64>, default_value_t = BaselineConfig::default().smoothing)]
    smoothing: f64,
    /// Seed for fold assignment.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// `--buckets`: a count, or `None` for "auto".
#[derive(Debug, Clone, Copy)]
struct BucketCount(Option<usize>);

fn parse_buckets(s: &str) -> Result<BucketCount, String> {
    if s == "auto" {
        return Ok(BucketCount(None));
    }
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(BucketCount(Some(n))),
        _ => Err(format!("expected a positive number or 'auto', got {s:?}")),
    }
}

impl FitArgs {
    fn config(&self) -> BaselineConfig {
        BaselineConfig {
            feature: self.feature,
            buckets: self.buckets.0,
            smoothing: self.smoothing,
            tokenizer: self.tokenizer.clone(),
            seed: self.seed,
        }
    }
}

/// `verdict baseline`'s subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Fit buckets on a labelled CSV and save them as JSON.
    ///
    /// Example: verdict baseline fit --train train.csv --out baseline.json --buckets auto
    Fit {
        /// Labelled competition CSV (train.csv's columns).
        #[arg(long)]
        train: PathBuf,
        /// The fitted baseline (JSON).
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        fit: FitArgs,
        #[command(flatten)]
        read: ReadArgs,
    },
    /// Predict a CSV with a fitted baseline; writes a submission-format CSV.
    ///
    /// Example: verdict baseline predict --model baseline.json --test test.csv --out submission.csv
    Predict {
        /// A baseline written by `baseline fit`.
        #[arg(long)]
        model: PathBuf,
        /// Competition CSV to predict (test.csv's columns; labels ignored).
        #[arg(long)]
        test: PathBuf,
        /// Submission CSV: id, winner_model_a, winner_model_b, winner_tie.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        read: ReadArgs,
    },
    /// Prompt-grouped k-fold cross-validation of the baseline.
    ///
    /// Example: verdict baseline cv --train train.csv --folds 5 --json cv.json
    Cv {
        /// Labelled competition CSV (train.csv's columns).
        #[arg(long)]
        train: PathBuf,
        /// Prompt-grouped folds, at most the number of distinct prompts.
        #[arg(long, allow_negative_numbers = true, value_parser = range::count, default_value_t = 5)]
        folds: usize,
        /// Also write the report as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Also write the out-of-fold predictions here (an ensemble member).
        #[arg(long)]
        oof_out: Option<PathBuf>,
        #[command(flatten)]
        fit: FitArgs,
        #[command(flatten)]
        read: ReadArgs,
    },
}

/// `verdict baseline fit|predict|cv`.
pub fn run(command: &Command) -> Result<()> {
    match command {
        Command::Fit {
            train,
            out,
            fit,
            read,
        } => {
            crate::atomic::check_output("--out", out, false)?;
            let model = BaselineModel::fit(&observe_file(train, fit, *read)?.0, &fit.config());
            crate::atomic::write_json(out, &model)?;
            for t in &model.bucket_trials {
                eprintln!(
                    "  buckets {:>4}: cv log loss {:.5}",
                    t.buckets, t.cv_log_loss
                );
            }
            println!(
                "fitted {} buckets of the length in {} on {} rows -> {}",
                model.buckets,
                model.feature,
                model.train_rows,
                out.display()
            );
            Ok(())
        }
        Command::Predict {
            model,
            test,
            out,
            read,
        } => {
            crate::atomic::check_output("--out", out, false)?;
            let model = BaselineModel::load(model)?;
            let mut reader = BattleReader::open(test, read.options())?;
            let mut rows = Vec::new();
            loop {
                let chunk: Vec<Battle> = reader.by_ref().take(4096).collect::<Result<_>>()?;
                if chunk.is_empty() {
                    break;
                }
                let probs = model.predict(&chunk)?;
                rows.extend(
                    chunk
                        .into_iter()
                        .zip(probs)
                        .map(|(b, probs)| Prediction { id: b.id, probs }),
                );
            }
            report_skipped(test, reader.stats());
            write_predictions(out, &rows)?;
            println!("wrote {} predictions -> {}", rows.len(), out.display());
            Ok(())
        }
        Command::Cv {
            train,
            folds,
            json,
            oof_out,
            fit,
            read,
        } => {
            crate::atomic::check_output_files(&[
                ("--json", json.as_deref()),
                ("--oof-out", oof_out.as_deref()),
            ])?;
            let (observations, ids) = observe_file(train, fit, *read)?;
            let report = cross_validate(&observations, *folds, &fit.config())?;
            print!("{}", format_cv(&report));
            if let Some(path) = oof_out {
                let rows: Vec<Prediction> = ids
                    .into_iter()
                    .zip(&report.out_of_fold)
                    .map(|(id, p)| Prediction { id, probs: *p })
                    .collect();
                write_predictions(path, &rows)?;
            }
            if let Some(path) = json {
                crate::atomic::write_json(path, &report)
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
            Ok(())
        }
    }
}

/// Streams a labelled CSV into baseline observations (flat memory for any file size), and
/// the ids of the rows they came from.
fn observe_file(
    path: &Path,
    fit: &FitArgs,
    read: ReadArgs,
) -> Result<(Vec<Observation>, Vec<String>)> {
    let mut reader = BattleReader::open(path, read.options())?;
    let mut ids = Vec::new();
    let rows = reader.by_ref().inspect(|b| {
        if let Ok(b) = b {
            ids.push(b.id.clone())
        }
    });
    let observations = observe(rows, fit.feature, fit.tokenizer.as_deref())
        .with_context(|| format!("reading {}", path.display()))?;
    report_skipped(path, reader.stats());
    Ok((observations, ids))
}
