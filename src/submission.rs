//! Prediction files: `id,winner_model_a,winner_model_b,winner_tie`, the competition's
//! submission format, which is also how every stage (baseline, models, ensemble,
//! calibration) hands probabilities to the next.

use crate::metrics::Probs;
use anyhow::{bail, Context, Result};
use std::io::Write;
use std::path::Path;

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
