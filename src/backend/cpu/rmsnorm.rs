//! RMSNorm: `y = x / sqrt(mean(x²) + eps) · w` (LLaMA) or `· (1 + w)` (Gemma), per row, in f32.

use crate::backend::{NormStyle, Store};
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

/// Backward of [`rmsnorm_forward`] w.r.t. `x` (the weight is frozen: no `dw`). With
/// `g = w` or `1 + w`, `r = 1 / sqrt(mean(x²) + eps)` and `y = x · r · g`:
/// `dx_i = r · g_i · dy_i - x_i · r³ / dim · Σ_j dy_j · g_j · x_j`, written or added to `dx`
/// as `store` says (added where `x` is the residual stream).
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward(
    dx: &mut [f32],
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    dim: usize,
    eps: f32,
    style: NormStyle,
    store: Store,
) {
    assert!(
        dx.len() == x.len() && dy.len() == x.len(),
        "rmsnorm backward: dx, dy and x differ in size"
    );
    assert_eq!(w.len(), dim, "rmsnorm backward: weight is not [dim]");
    let gain = |w: f32| match style {
        NormStyle::Weight => w,
        NormStyle::OnePlusWeight => 1.0 + w,
    };
    dx.par_chunks_mut(dim)
        .zip(dy.par_chunks(dim))
        .zip(x.par_chunks(dim))
        .for_each(|((dx, dy), x)| {
            let mean_square = x.iter().map(|v| v * v).sum::<f32>() / dim as f32;
            let r = 1.0 / (mean_square + eps).sqrt();
            let dy_g_x: f32 = dy
                .iter()
                .zip(x)
                .zip(w)
                .map(|((&dy, &x), &w)| dy * gain(w) * x)
                .sum();
            let c = r * r * r / dim as f32 * dy_g_x;
            for (((dx, &dy), &x), &w) in dx.iter_mut().zip(dy).zip(x).zip(w) {
                let v = r * gain(w) * dy - x * c;
                match store {
                    Store::Overwrite => *dx = v,
                    Store::Accumulate(s) => *dx += s * v,
                }
            }
        });
}
