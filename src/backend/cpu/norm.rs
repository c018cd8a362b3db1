//! RMSNorm: `y = x / sqrt(mean(x²) + eps) · w` (LLaMA) or `· (1 + w)` (Gemma), per row, in f32.

use crate::backend::NormStyle;
use rayon::prelude::*;

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
            let mean_square = x.iter().map(|v| v * v).sum::<f32>() / dim as f32;
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
