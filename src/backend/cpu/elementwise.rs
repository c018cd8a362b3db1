//! Elementwise ops (kernels/elementwise.cu): residual add, soft-cap, dropout.

use rayon::prelude::*;

/// `acc += x`.
pub fn add(acc: &mut [f32], x: &[f32]) {
    assert_eq!(acc.len(), x.len(), "add: sizes differ");
    acc.par_iter_mut().zip(x).for_each(|(a, &x)| *a += x);
}

/// `x = cap · tanh(x / cap)`: bounds values smoothly to (-cap, cap).
pub fn softcap(x: &mut [f32], cap: f32) {
    x.par_iter_mut().for_each(|v| *v = cap * (*v / cap).tanh());
}

/// Inverted dropout in place: element `i` becomes 0 with probability `p`, else is divided by
/// `1 - p`. The mask is a hash of `(seed, i)`, not a stream, so the same seed gives the same
/// mask in the forward, in its recomputation and on the gradient (and on any device).
pub fn dropout(x: &mut [f32], p: f32, seed: u64) {
    assert!((0.0..1.0).contains(&p), "dropout: p = {p} is not in [0, 1)");
    let keep_scale = 1.0 / (1.0 - p);
    x.par_iter_mut().enumerate().for_each(|(i, v)| {
        *v = if dropout_uniform(seed, i as u64) < p {
            0.0
        } else {
            *v * keep_scale
        };
    });
}

/// A uniform value in [0, 1) with 24 random bits (exact in f32) from `(seed, index)`: one
/// SplitMix64 finalisation of the pair.
fn dropout_uniform(seed: u64, index: u64) -> f32 {
    let mut z = seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 40) as f32 / (1u64 << 24) as f32
}
