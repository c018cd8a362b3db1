//! RMSNorm: `y = x / sqrt(mean(x²) + eps) · w` (LLaMA) or `· (1 + w)` (Gemma), per row, in f32.

use crate::backend::NormStyle;
use rayon::prelude::*;

/// `Σ x²`, in `LANES` independent partial sums: a single running f32 sum must be added in
/// order, which keeps the compiler from vectorising it.
fn sum_of_squares(x: &[f32]) -> f32 {
    const LANES: usize = 16;
    let mut partial = [0.0f32; LANES];
    let blocks = x.chunks_exact(LANES);
    let tail: f32 = blocks.remainder().iter().map(|v| v * v).sum();
    for block in blocks {
        for (p, v) in partial.iter_mut().zip(block) {
            *p += v * v;
        }
    }
    partial.iter().sum::<f32>() + tail
}

/// Normalises each row of width `dim` of `x` into `out`.
pub fn rmsnorm_forward(
    out: &mut [f32],
    x: &[f32],
    w: &[f32],
    dim: usize,
    eps: f32,
    style: NormStyle,
) {
    assert_eq!(
        out.len(),
        x.len(),
        "rmsnorm: output and input differ in size"
    );
    assert_eq!(w.len(), dim, "rmsnorm: weight is not [dim]");
    out.par_chunks_mut(dim)
        .zip(x.par_chunks(dim))
        .for_each(|(y, x)| {
            let mean_square = sum_of_squares(x) / dim as f32;
            let inv_rms = 1.0 / (mean_square + eps).sqrt();
            for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
                let gain = match style {
                    NormStyle::Weight => w,
                    NormStyle::OnePlusWeight => 1.0 + w,
                };
                *y = x * inv_rms * gain;
            }
        });
}
