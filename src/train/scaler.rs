//! Dynamic loss scaling for training through f16 (DESIGN §5), as torch's `GradScaler`.
//!
//! Place in the data flow: the loop multiplies every gradient by [`LossScaler::scale`] (the
//! head's loss gradient is scaled, so the whole backward carries it), then divides it out
//! before clipping and AdamW; a step whose gradients are not finite is an f16 overflow: it is
//! skipped (no update, AdamW's step count unchanged) and the scale halves; after
//! `growth_interval` clean steps in a row the scale doubles.
//!
//! Why: sm_75 (T4) has f16 tensor cores only, whose operands span 6e-8 .. 65504. The NF4
//! backward rounds each activation gradient dY to f16 as it enters its product; unscaled,
//! the small gradients of a classifier's loss (a mean over a handful of sequences, then
//! through every layer) lose their low bits or flush to zero. bf16 (sm_80+) has f32's
//! exponent range and needs no scaling: [`crate::backend::Backend::gradients_in_f16`] says
//! which, and the CPU (f32) scales nothing either. Scales are powers of two, so scaling and
//! unscaling are exact in f32.

use serde::{Deserialize, Serialize};

/// torch `GradScaler`'s defaults: initial scale 2^16, growth every 2000 clean steps.
pub const DEFAULT_INIT_SCALE: f64 = 65536.0;
/// Clean steps before the scale doubles (torch's `growth_interval`).
pub const DEFAULT_GROWTH_INTERVAL: usize = 2000;

/// The scaler's state, saved in every checkpoint so a resumed run scales as the unbroken one.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    /// What the gradients are multiplied by (a power of two).
    pub scale: f64,
    /// Clean steps since the last change of the scale.
    pub clean_steps: usize,
    /// Clean steps after which the scale doubles.
    pub growth_interval: usize,
}

/// What [`LossScaler::update`] did after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleChange {
    Kept,
    /// An overflow: the step is skipped and the scale halved.
    Halved,
    /// `growth_interval` clean steps: the scale doubled.
    Doubled,
}

impl LossScaler {
    /// A scaler starting at `init` (rounded down to a power of two, so it scales exactly).
    pub fn new(init: f64, growth_interval: usize) -> LossScaler {
        assert!(init >= 1.0 && init.is_finite() && growth_interval > 0);
        LossScaler {
            scale: 2f64.powi(init.log2().floor() as i32),
            clean_steps: 0,
            growth_interval,
        }
    }

    /// Records a step: `overflow` when its gradients were not finite.
    pub fn update(&mut self, overflow: bool) -> ScaleChange {
        if overflow {
            self.clean_steps = 0;
            // Never below 1: past that the scale would only shrink gradients further.
            if self.scale > 1.0 {
                self.scale *= 0.5;
            }
            return ScaleChange::Halved;
        }
        self.clean_steps += 1;
        if self.clean_steps >= self.growth_interval {
            self.clean_steps = 0;
            // Below f32's largest power of two, so the scale stays finite in f32.
            if self.scale < 2f64.powi(120) {
                self.scale *= 2.0;
                return ScaleChange::Doubled;
            }
        }
        ScaleChange::Kept
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflow_halves_and_clean_steps_double_after_the_interval() {
        let mut s = LossScaler::new(65536.0, 3);
        assert_eq!(s.update(true), ScaleChange::Halved);
        assert_eq!(s.scale, 32768.0);
        assert_eq!(s.update(false), ScaleChange::Kept);
        assert_eq!(s.update(false), ScaleChange::Kept);
        assert_eq!(
            s.update(true),
            ScaleChange::Halved,
            "an overflow resets the count"
        );
        assert_eq!(s.scale, 16384.0);
        for _ in 0..2 {
            assert_eq!(s.update(false), ScaleChange::Kept);
        }
        assert_eq!(s.update(false), ScaleChange::Doubled);
        assert_eq!((s.scale, s.clean_steps), (32768.0, 0));
    }

    #[test]
    fn the_initial_scale_is_a_power_of_two_and_never_drops_below_one() {
        assert_eq!(LossScaler::new(1000.0, 1).scale, 512.0);
        let mut s = LossScaler::new(2.0, 10);
        s.update(true);
        s.update(true);
        s.update(true);
        assert_eq!(s.scale, 1.0);
    }
}
