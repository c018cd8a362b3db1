//! `verdict cv`: k-fold cross-validation of a fine-tuning recipe, giving every labelled row
//! an out-of-fold prediction: the honest score of the recipe, and what `verdict ensemble`
//! and `verdict calibrate` are fitted on (next to the baseline's `baseline cv --oof-out`,
//! which uses the same prompt-grouped folds for the same `--folds` and `--fold-seed`).
//!
//! Place in the data flow:
//! ```text
//! train.csv -> grouped_folds -> OUT/fold-k/{train,valid}.csv (the rows as given)
//!   -> verdict train (OUT/fold-k/run, validating on fold k) -> run/valid_predictions.csv
//!   -> OUT/oof.csv (rows in train.csv order) + OUT/cv.json
//! ```
//! Each fold is an ordinary run folder, so a killed cross-validation continues where it
//! stopped when the same command is run again: finished folds are kept, a started one
//! resumes. With `--prefix-cache` the folds share one cache of the frozen prefix's output:
//! every row is a training row of k − 1 folds, so all folds after the first run the adapted
//! layers only.

use super::config::Args as TrainArgs;
use super::{
    one_device, train, Control, Outcome, Summary, TrainConfig, SUMMARY_FILE, VALID_PREDICTIONS,
};
use crate::backend::placement::{Job, Placement};
use crate::backend::Backend;
use crate::cli::range;
use crate::data::folds::prompt_folds;
use crate::data::{read_battles, report_skipped, ReadOptions, Winner};
use crate::metrics::{self, Probs};
use crate::submission::{read_aligned, write_predictions, Prediction};
use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// `verdict cv`'s flags: the fold layout, plus every `verdict train` flag (`--out` is the
/// cross-validation folder; `--valid` and `--resume` have no place here).
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Prompt-grouped folds.
    #[arg(long, allow_negative_numbers = true, value_parser = range::count, default_value_t = 5)]
    pub folds: usize,
    /// Seed of the fold assignment (the baseline's `--seed` gives the same folds).
    #[arg(long, default_value_t = 0)]
    pub fold_seed: u64,
    #[command(flatten)]
    pub train: TrainArgs,
}

/// One fold's result.
#[derive(Debug, Clone, Serialize)]
pub struct FoldScore {
    pub fold: usize,
    pub train_rows: usize,
    pub valid_rows: usize,
    pub log_loss: f64,
    /// The class prior of the fold's training rows, scored on its validation rows.
    pub prior_log_loss: f64,
    /// Training time of the fold (all sessions, if it was resumed).
    pub seconds: f64,
}

/// What `OUT/cv.json` holds.
#[derive(Debug, Clone, Serialize)]
pub struct CvSummary {
    pub folds: usize,
    pub fold_seed: u64,
    pub rows: usize,
    /// Log loss of the out-of-fold predictions of every row.
    pub oof_log_loss: f64,
    pub oof_accuracy: f64,
    /// Each fold's training-row prior on its validation rows, pooled: the bar to beat.
    pub oof_prior_log_loss: f64,
    pub per_fold: Vec<FoldScore>,
    pub seconds: f64,
    /// The out-of-fold predictions.
    pub oof: PathBuf,
    pub config: TrainConfig,
}

/// The out-of-fold predictions of the recipe.
pub const OOF_FILE: &str = "oof.csv";

/// `verdict cv` as a [`Job`]: every fold on the one backend the placement opens.
struct CvJob<'a>(&'a Args);

impl Job for CvJob<'_> {
    type Output = CvSummary;

    fn run<B: Backend>(self, backends: &[B]) -> Result<CvSummary> {
        cross_validate(one_device(backends)?, self.0)
    }
}

/// `verdict cv` on the device `--device` names (the CPU by default).
pub fn run(args: &Args) -> Result<()> {
    if let Some(out) = &args.train.out {
        crate::atomic::check_output("--out", out, true)?;
    }
    let placement = args.train.device.clone().unwrap_or(Placement::Cpu);
    let summary = placement.run(CvJob(args))?;
    println!(
        "{}-fold out-of-fold log loss {:.4} (accuracy {:.3}; class prior {:.4}) over {} rows \
         in {:.0} s -> {}",
        summary.folds,
        summary.oof_log_loss,
        summary.oof_accuracy,
        summary.oof_prior_log_loss,
        summary.rows,
        summary.seconds,
        summary.oof.display()
    );
    Ok(())
}

/// Trains one run per fold (or continues the folder's unfinished ones) and pools the
/// out-of-fold predictions.
pub fn cross_validate<B: Backend>(backend: &B, args: &Args) -> Result<CvSummary> {
    let t = &args.train;
    ensure!(args.folds >= 2, "--folds must be at least 2");
    ensure!(
        t.valid.is_none() && t.resume.is_none(),
        "verdict cv validates each fold on its held-out rows and continues an unfinished \
         --out by itself: --valid and --resume do not apply"
    );
    let (Some(model), Some(data), Some(out)) = (&t.model, &t.train, &t.out) else {
        bail!("verdict cv needs --model, --train and --out");
    };
    let mut config = TrainConfig::new(model.clone(), data.clone());
    t.apply(&mut config)?;
    config.validate()?;
    let read = ReadOptions {
        skip_bad_rows: config.skip_bad_rows,
    };
    let (battles, stats) = read_battles(&config.train, read)?;
    report_skipped(&config.train, &stats);
    let truth = battles
        .iter()
        .map(|b| {
            b.winner.with_context(|| {
                format!("{}: battle {} has no label", config.train.display(), b.id)
            })
        })
        .collect::<Result<Vec<Winner>>>()?;
    // Before any training: more folds than prompts is refused here, not after the folds
    // that do have rows are trained.
    let fold_of = prompt_folds(&battles, args.folds, args.fold_seed)
        .with_context(|| config.train.display().to_string())?
        .fold_of;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;

    let start = Instant::now();
    let control = Control {
        prefix_cache: t.prefix_cache(),
        ..Control::default()
    };
    // Ids are unique (the reader refuses a repeat): predictions join by id.
    let known: HashSet<&str> = battles.iter().map(|b| b.id.as_str()).collect();
    // The class prior of each fold's training rows: the bar its held-out rows must beat.
    let priors: Vec<Probs> = (0..args.folds)
        .map(|fold| {
            let rest: Vec<Winner> = (0..battles.len())
                .filter(|&i| fold_of[i] != fold)
                .map(|i| truth[i])
                .collect();
            metrics::class_prior(&rest)
        })
        .collect();
    let mut oof: Vec<Option<Probs>> = vec![None; battles.len()];
    let mut per_fold = Vec::new();
    for fold in 0..args.folds {
        let dir = out.join(format!("fold-{fold}"));
        let rows: Vec<usize> = (0..battles.len()).filter(|&i| fold_of[i] == fold).collect();
        let ids: Vec<&str> = rows.iter().map(|&i| battles[i].id.as_str()).collect();
        let held_out: HashSet<&str> = ids.iter().copied().collect();
        let (train_csv, valid_csv) = (dir.join("train.csv"), dir.join("valid.csv"));
        let written = split_csv(&config.train, &known, &held_out, &train_csv, &valid_csv)?;
        let mut fold_config = config.clone();
        fold_config.train = std::path::absolute(&train_csv)?;
        fold_config.valid = Some(std::path::absolute(&valid_csv)?);
        let run = dir.join("run");
        let summary_path = run.join(SUMMARY_FILE);
        if !summary_path.exists() {
            let resume = run.join(super::config::CONFIG_FILE).exists();
            eprintln!(
                "[cv] fold {fold}/{}: {} training rows, {} held out{}",
                args.folds,
                written.0,
                written.1,
                if resume { " (resuming)" } else { "" }
            );
            if let Outcome::Halted(step) =
                train(backend, &run, &fold_config, resume, control.clone())?
            {
                bail!("fold {fold} halted after step {step}");
            }
        }
        let preds = read_aligned(
            &run.join(VALID_PREDICTIONS),
            &ids,
            "the fold's held-out rows",
        )?;
        let fold_truth: Vec<Winner> = rows.iter().map(|&i| truth[i]).collect();
        let summary: Summary = crate::atomic::read_json(&summary_path, "a training summary")?;
        let score = FoldScore {
            fold,
            train_rows: written.0,
            valid_rows: rows.len(),
            log_loss: metrics::log_loss(&preds, &fold_truth),
            prior_log_loss: metrics::log_loss(&vec![priors[fold]; rows.len()], &fold_truth),
            seconds: summary.seconds,
        };
        eprintln!(
            "[cv] fold {fold}: log loss {:.4} (class prior {:.4}), {} rows, {:.0} s",
            score.log_loss, score.prior_log_loss, score.valid_rows, score.seconds
        );
        for (&i, p) in rows.iter().zip(preds) {
            oof[i] = Some(p);
        }
        per_fold.push(score);
    }
    if let Some(cache) = &control.prefix_cache {
        eprintln!(
            "[cv] prefix cache: {:.0} MiB",
            cache.bytes() as f64 / (1 << 20) as f64
        );
    }

    // Pooled in the order of the training file.
    let pooled: Vec<Prediction> = battles
        .iter()
        .zip(oof)
        .map(|(b, p)| Prediction {
            id: b.id.clone(),
            probs: p.expect("every row is held out once"),
        })
        .collect();
    let probs: Vec<Probs> = pooled.iter().map(|p| p.probs).collect();
    let scores = metrics::score(&probs, &truth);
    let prior_preds: Vec<Probs> = fold_of.iter().map(|&f| priors[f]).collect();
    let oof_path = out.join(OOF_FILE);
    write_predictions(&oof_path, &pooled)?;
    let summary = CvSummary {
        folds: args.folds,
        fold_seed: args.fold_seed,
        rows: battles.len(),
        oof_log_loss: scores.log_loss,
        oof_accuracy: scores.accuracy,
        oof_prior_log_loss: metrics::log_loss(&prior_preds, &truth),
        per_fold,
        seconds: start.elapsed().as_secs_f64(),
        oof: oof_path,
        config,
    };
    crate::atomic::write_json(&out.join("cv.json"), &summary)?;
    Ok(summary)
}

/// Copies the records of `source` whose id is in `known` into `train` (ids not in
/// `held_out`) or `valid` (ids in it) unchanged, header first; records the battle reader
/// skipped are in neither. Returns the record counts. An existing split is rewritten only if
/// it differs.
fn split_csv(
    source: &Path,
    known: &HashSet<&str>,
    held_out: &HashSet<&str>,
    train: &Path,
    valid: &Path,
) -> Result<(usize, usize)> {
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .from_path(source)
        .with_context(|| format!("cannot open {}", source.display()))?;
    let header = reader
        .byte_headers()
        .with_context(|| format!("{}: cannot read the header", source.display()))?
        .clone();
    let id_col = header
        .iter()
        .position(|h| h == b"id")
        .with_context(|| format!("{}: no 'id' column", source.display()))?;
    let (mut train_rows, mut valid_rows) = (Vec::new(), Vec::new());
    for (i, record) in reader.byte_records().enumerate() {
        let record = record
            .with_context(|| format!("{}: row {}: unreadable CSV", source.display(), i + 1))?;
        let id = std::str::from_utf8(record.get(id_col).unwrap_or_default()).unwrap_or_default();
        if !known.contains(id) {
            continue;
        }
        if held_out.contains(id) {
            valid_rows.push(record);
        } else {
            train_rows.push(record);
        }
    }
    ensure!(
        valid_rows.len() == held_out.len(),
        "{}: {} of the fold's {} held-out ids found (repeated or missing ids?)",
        source.display(),
        valid_rows.len(),
        held_out.len()
    );
    for (path, rows) in [(train, &train_rows), (valid, &valid_rows)] {
        let mut bytes = Vec::new();
        {
            let mut w = csv::Writer::from_writer(&mut bytes);
            w.write_byte_record(&header)?;
            for r in rows.iter() {
                w.write_byte_record(r)?;
            }
            w.flush()?;
        }
        if std::fs::read(path).ok().as_deref() != Some(&bytes[..]) {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("cannot create {}", parent.display()))?;
            }
            crate::atomic::write_with(path, |w| Ok(std::io::Write::write_all(w, &bytes)?))?;
        }
    }
    Ok((train_rows.len(), valid_rows.len()))
}
