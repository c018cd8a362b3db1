//! Prediction files: `id,winner_model_a,winner_model_b,winner_tie`, the competition's
//! submission format, which is also how every stage (baseline, models, ensemble,
//! calibration) hands probabilities to the next.

use crate::data::{read_battles, Battle, ReadArgs, ReadOptions, Winner};
use crate::metrics::{format_scores, score, Probs, Scores};
use anyhow::{bail, Context, Result};
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

/// One row of a prediction file.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    pub id: String,
    pub probs: Probs,
}

/// The submission header, in the competition's column order.
pub const HEADER: [&str; 4] = ["id", "winner_model_a", "winner_model_b", "winner_tie"];

/// Writes predictions atomically, rows in the given order, each row normalised to sum to 1.
pub fn write_predictions(path: &Path, rows: &[Prediction]) -> Result<()> {
    crate::atomic::write_with(path, |w| {
        writeln!(w, "{}", HEADER.join(","))?;
        for (i, row) in rows.iter().enumerate() {
            let sum: f64 = row.probs.iter().sum();
            if !(sum > 0.0 && row.probs.iter().all(|p| p.is_finite() && *p >= 0.0)) {
                bail!(
                    "{}: prediction for id {} (row {}) is not a probability vector: {:?}",
                    path.display(),
                    row.id,
                    i + 1,
                    row.probs
                );
            }
            let p = row.probs.map(|v| v / sum);
            writeln!(w, "{},{},{},{}", row.id, p[0], p[1], p[2])?;
        }
        Ok(())
    })
}

/// Reads a prediction file written by [`write_predictions`] (or any submission.csv).
pub fn read_predictions(path: &Path) -> Result<Vec<Prediction>> {
    let mut csv =
        csv::Reader::from_path(path).with_context(|| format!("cannot open {}", path.display()))?;
    let header = csv
        .headers()
        .with_context(|| format!("{}: cannot read the header", path.display()))?
        .clone();
    let cols: Vec<usize> = HEADER
        .iter()
        .map(|name| {
            header
                .iter()
                .position(|h| h == *name)
                .with_context(|| format!("{}: missing column '{name}'", path.display()))
        })
        .collect::<Result<_>>()?;
    let mut rows = Vec::new();
    for (i, record) in csv.records().enumerate() {
        let record =
            record.with_context(|| format!("{}: row {}: unreadable CSV", path.display(), i + 1))?;
        let get = |k: usize| record.get(cols[k]).unwrap_or("");
        let mut probs = [0.0; 3];
        for k in 0..3 {
            let text = get(k + 1);
            probs[k] = match text.trim().parse::<f64>() {
                Ok(v) if v.is_finite() && v >= 0.0 => v,
                _ => bail!(
                    "{}: row {} (id {}): '{}' is not a probability: {text:?}",
                    path.display(),
                    i + 1,
                    get(0),
                    HEADER[k + 1]
                ),
            };
        }
        rows.push(Prediction {
            id: get(0).to_string(),
            probs,
        });
    }
    if rows.is_empty() {
        bail!("{}: no prediction rows", path.display());
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_order_and_normalises() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.csv");
        let rows = vec![
            Prediction {
                id: "9".into(),
                probs: [2.0, 1.0, 1.0],
            },
            Prediction {
                id: "3".into(),
                probs: [0.1, 0.2, 0.7],
            },
        ];
        write_predictions(&path, &rows).unwrap();
        let back = read_predictions(&path).unwrap();
        assert_eq!(back[0].id, "9");
        assert_eq!(back[0].probs, [0.5, 0.25, 0.25]);
        assert_eq!(back[1].id, "3");
        assert!((back[1].probs.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn refuses_nan_and_names_the_row() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.csv");
        let err = write_predictions(
            &path,
            &[Prediction {
                id: "7".into(),
                probs: [f64::NAN, 0.5, 0.5],
            }],
        )
        .unwrap_err();
        assert!(err.to_string().contains("id 7"), "{err}");
        assert!(!path.exists());
    }
}

/// Reads labelled battles and checks that ids are unique and every row has a label.
pub fn read_labelled(labels: &Path, options: ReadOptions) -> Result<Vec<Battle>> {
    let (battles, _) = read_battles(labels, options)?;
    let mut seen = HashSet::new();
    for b in &battles {
        if b.winner.is_none() {
            bail!("{}: row with id {} has no label", labels.display(), b.id);
        }
        if !seen.insert(b.id.as_str()) {
            bail!("{}: id {} appears twice", labels.display(), b.id);
        }
    }
    if battles.is_empty() {
        bail!("{}: no labelled rows", labels.display());
    }
    Ok(battles)
}

/// Reads a prediction file and puts its rows in the order of `ids`: the one join by id of
/// a prediction file with the rows it predicts (eval, ensemble, calibrate, cv). Every id of
/// `ids` must have exactly one prediction and the file must have no other ids; errors name
/// `path`, the id and `reference` (where `ids` came from).
pub fn read_aligned(path: &Path, ids: &[&str], reference: &str) -> Result<Vec<Probs>> {
    let rows = read_predictions(path)?;
    let mut by_id: HashMap<&str, Probs> = HashMap::with_capacity(rows.len());
    for r in &rows {
        if by_id.insert(&r.id, r.probs).is_some() {
            bail!("{}: id {} appears twice", path.display(), r.id);
        }
    }
    let wanted: HashSet<&str> = ids.iter().copied().collect();
    if let Some(extra) = rows.iter().find(|r| !wanted.contains(r.id.as_str())) {
        bail!("{}: id {} is not in {reference}", path.display(), extra.id);
    }
    ids.iter()
        .map(|id| {
            by_id.get(id).copied().with_context(|| {
                format!(
                    "{}: no prediction for id {id}, which is in {reference}",
                    path.display()
                )
            })
        })
        .collect()
}

/// Scores a prediction file against a labelled CSV, joined by id (rows in the CSV's order).
pub fn score_files(preds: &Path, labels: &Path, options: ReadOptions) -> Result<Scores> {
    let battles = read_labelled(labels, options)?;
    let ids: Vec<&str> = battles.iter().map(|b| b.id.as_str()).collect();
    let probs = read_aligned(preds, &ids, &labels.display().to_string())?;
    let truth: Vec<Winner> = battles.iter().filter_map(|b| b.winner).collect();
    Ok(score(&probs, &truth))
}

/// `verdict eval`'s flags.
#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// Predictions (id,winner_model_a,winner_model_b,winner_tie).
    #[arg(long)]
    pub preds: PathBuf,
    /// Labelled competition CSV (train.csv format).
    #[arg(long)]
    pub labels: PathBuf,
    /// Print the scores as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub read: ReadArgs,
}

/// `verdict eval`: scores a prediction file and prints a table or JSON.
pub fn eval(args: &EvalArgs) -> Result<()> {
    let scores = score_files(&args.preds, &args.labels, args.read.options())?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&scores)?);
    } else {
        print!("{}", format_scores(&scores));
    }
    Ok(())
}
