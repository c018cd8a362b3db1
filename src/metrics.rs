//! Scoring: the competition's multi-class log loss, accuracy and per-class loss.

use crate::data::Winner;
use serde::Serialize;

/// Kaggle clips probabilities to [EPS, 1 - EPS] before renormalising each row.
pub const EPS: f64 = 1e-15;

/// Probabilities for (A wins, B wins, tie), in submission column order.
pub type Probs = [f64; 3];

/// Replaces logits by their softmax (max-shifted, so large logits cannot overflow).
pub fn softmax_in_place(z: &mut [f64]) {
    let max = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut sum = 0.0;
    for v in z.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    z.iter_mut().for_each(|v| *v /= sum);
}

/// The class probabilities of three logits.
pub fn softmax(mut logits: [f64; 3]) -> Probs {
    softmax_in_place(&mut logits);
    logits
}

/// Clips each probability to [EPS, 1 - EPS] and rescales the row to sum to 1.
pub fn clip_and_normalise(p: &Probs) -> Probs {
    let c = p.map(|v| v.clamp(EPS, 1.0 - EPS));
    let sum: f64 = c.iter().sum();
    c.map(|v| v / sum)
}

/// Negative log-likelihood of one row's true class, as Kaggle computes it.
pub fn row_log_loss(p: &Probs, truth: Winner) -> f64 {
    -clip_and_normalise(p)[truth.index()].ln()
}

/// The competition metric: mean [`row_log_loss`].
pub fn log_loss(preds: &[Probs], truth: &[Winner]) -> f64 {
    assert_eq!(
        preds.len(),
        truth.len(),
        "predictions and labels differ in length"
    );
    assert!(!preds.is_empty(), "log loss of no rows");
    preds
        .iter()
        .zip(truth)
        .map(|(p, &t)| row_log_loss(p, t))
        .sum::<f64>()
        / preds.len() as f64
}

/// Mean of `values` and its standard error (sample standard deviation over √n); for
/// per-row loss differences, whether two predictors differ by more than noise.
pub fn mean_and_se(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (mean, (var / n).sqrt())
}

/// Everything `verdict eval` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Scores {
    pub rows: usize,
    pub log_loss: f64,
    /// Share of rows whose most probable class is the true one.
    pub accuracy: f64,
    /// Mean log loss over the rows of each true class (A, B, tie); `None` if a class is absent.
    pub class_log_loss: [Option<f64>; 3],
    /// How many rows have each true class.
    pub class_rows: [usize; 3],
}

/// Computes [`Scores`] for aligned predictions and labels.
pub fn score(preds: &[Probs], truth: &[Winner]) -> Scores {
    let mut class_sum = [0.0; 3];
    let mut class_rows = [0usize; 3];
    let mut correct = 0usize;
    for (p, &t) in preds.iter().zip(truth) {
        class_sum[t.index()] += row_log_loss(p, t);
        class_rows[t.index()] += 1;
        let best = (0..3)
            .max_by(|&i, &j| p[i].total_cmp(&p[j]))
            .expect("three classes");
        correct += usize::from(best == t.index());
    }
    Scores {
        rows: preds.len(),
        log_loss: log_loss(preds, truth),
        accuracy: correct as f64 / preds.len() as f64,
        class_log_loss: [0, 1, 2]
            .map(|k| (class_rows[k] > 0).then(|| class_sum[k] / class_rows[k] as f64)),
        class_rows,
    }
}

/// Class frequencies of a label set (the "class prior" prediction).
pub fn class_prior(truth: &[Winner]) -> Probs {
    let mut counts = [0.0; 3];
    for &t in truth {
        counts[t.index()] += 1.0;
    }
    let n = truth.len().max(1) as f64;
    counts.map(|c| c / n)
}

/// A short human-readable table of [`Scores`].
pub fn format_scores(s: &Scores) -> String {
    let mut out = format!(
        "rows      {}\nlog loss  {:.5}\naccuracy  {:.4}\n",
        s.rows, s.log_loss, s.accuracy
    );
    for (k, name) in ["A", "B", "tie"].iter().enumerate() {
        match s.class_log_loss[k] {
            Some(l) => {
                out += &format!(
                    "  class {name:<3} {:>6} rows  log loss {l:.5}\n",
                    s.class_rows[k]
                )
            }
            None => out += &format!("  class {name:<3} {:>6} rows\n", 0),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_is_stable_for_large_logits() {
        let p = softmax([1000.0, 1000.0, -1000.0]);
        assert!((p[0] - 0.5).abs() < 1e-12 && p[2] < 1e-300);
    }

    #[test]
    fn log_loss_matches_hand_computed_values() {
        let preds = [[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.25, 0.25, 0.5]];
        let truth = [Winner::A, Winner::Tie, Winner::Tie];
        let expected = -(0.7f64.ln() + 0.3f64.ln() + 0.5f64.ln()) / 3.0;
        assert!((log_loss(&preds, &truth) - expected).abs() < 1e-12);
    }

    #[test]
    fn rows_are_renormalised_before_scoring() {
        // Unnormalised (sums to 2): Kaggle divides by the row sum.
        let l = log_loss(&[[1.0, 0.6, 0.4]], &[Winner::B]);
        assert!((l - -(0.3f64.ln())).abs() < 1e-12);
    }

    #[test]
    fn zero_probability_is_clipped_not_infinite() {
        let l = log_loss(&[[1.0, 0.0, 0.0]], &[Winner::B]);
        assert!(
            (l - -(1e-15f64 / (1.0 - 1e-15 + 2e-15)).ln()).abs() < 1e-9,
            "{l}"
        );
        assert!(l.is_finite());
    }

    #[test]
    fn uniform_prediction_scores_ln3() {
        let l = log_loss(
            &[[1.0 / 3.0; 3]; 4],
            &[Winner::A, Winner::B, Winner::Tie, Winner::A],
        );
        assert!((l - 3f64.ln()).abs() < 1e-12);
    }

    #[test]
    fn per_class_loss_and_accuracy() {
        let s = score(&[[0.6, 0.3, 0.1], [0.6, 0.3, 0.1]], &[Winner::A, Winner::B]);
        assert_eq!(s.accuracy, 0.5);
        assert!((s.class_log_loss[0].unwrap() - -(0.6f64.ln())).abs() < 1e-12);
        assert!((s.class_log_loss[1].unwrap() - -(0.3f64.ln())).abs() < 1e-12);
        assert_eq!(s.class_log_loss[2], None);
        assert_eq!(s.class_rows, [1, 1, 0]);
    }
}
