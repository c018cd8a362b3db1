//! Learning-rate schedule: linear warmup, then cosine or linear decay to zero.
//!
//! Place in the data flow: the training loop asks for the multiplier of optimizer step `s`
//! (1-based: the `s`-th update) and scales every parameter group's peak LR by it.
//!
//! Warmup is `s / W` for `s <= W`, so the first update already moves (transformers' lambda
//! is 0 at its first step, a wasted update). After warmup it is transformers'
//! `get_{cosine,linear}_schedule_with_warmup` evaluated at `t = s - 1`: progress
//! `(t - W) / (T - W)`, so the last of `T` steps still has a small positive rate.

use serde::{Deserialize, Serialize};

/// The decay after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DecayKind {
    /// `0.5 · (1 + cos(π · progress))`.
    Cosine,
    /// `1 - progress`.
    Linear,
}

/// A schedule over `total` optimizer steps with `warmup` warmup steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub kind: DecayKind,
    pub warmup: usize,
    pub total: usize,
}

impl Schedule {
    /// Warmup steps for `ratio` of `total` steps, rounded up as transformers does.
    pub fn warmup_from_ratio(ratio: f64, total: usize) -> usize {
        (ratio * total as f64).ceil() as usize
    }

    /// The LR multiplier of update `step` (1-based).
    pub fn factor(&self, step: usize) -> f64 {
        assert!(step >= 1, "optimizer steps are 1-based");
        if step <= self.warmup {
            return step as f64 / self.warmup as f64;
        }
        let t = (step - 1) as f64;
        let span = self.total.saturating_sub(self.warmup).max(1) as f64;
        let progress = ((t - self.warmup as f64) / span).clamp(0.0, 1.0);
        match self.kind {
            DecayKind::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
            DecayKind::Linear => 1.0 - progress,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_rises_linearly_from_the_first_step_to_the_peak() {
        let s = Schedule {
            kind: DecayKind::Cosine,
            warmup: 4,
            total: 20,
        };
        let f: Vec<f64> = (1..=4).map(|i| s.factor(i)).collect();
        assert_eq!(f, [0.25, 0.5, 0.75, 1.0]);
        assert_eq!(s.factor(5), 1.0, "decay starts at the peak");
    }

    #[test]
    fn cosine_matches_transformers_after_warmup() {
        // transformers: lambda(t) = 0.5 * (1 + cos(pi * (t - W) / (T - W))), t = step - 1.
        let s = Schedule {
            kind: DecayKind::Cosine,
            warmup: 2,
            total: 10,
        };
        for step in 3..=10 {
            let t = (step - 1) as f64;
            let want = 0.5 * (1.0 + (std::f64::consts::PI * (t - 2.0) / 8.0).cos());
            assert!((s.factor(step) - want).abs() < 1e-15, "step {step}");
        }
        assert!(s.factor(10) > 0.0, "the last step still learns");
        assert!(
            (s.factor(7) - 0.5).abs() < 1e-12,
            "half way down at t = W + (T - W) / 2"
        );
    }

    #[test]
    fn linear_decays_to_one_step_above_zero_and_never_below() {
        let s = Schedule {
            kind: DecayKind::Linear,
            warmup: 0,
            total: 4,
        };
        let f: Vec<f64> = (1..=6).map(|i| s.factor(i)).collect();
        assert_eq!(f, [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]);
    }

    #[test]
    fn warmup_ratio_rounds_up() {
        assert_eq!(Schedule::warmup_from_ratio(0.03, 100), 3);
        assert_eq!(Schedule::warmup_from_ratio(0.03, 101), 4);
        assert_eq!(Schedule::warmup_from_ratio(0.0, 101), 0);
    }
}
