//! Small elementwise and indexing ops: residual add, soft-cap, row gather and its backward
//! (scatter-add), dropout.

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

/// `out[i] = x[rows[i]]`, rows of width `dim`.
pub fn gather_rows(out: &mut [f32], x: &[f32], rows: &[usize], dim: usize) {
    assert_eq!(
        out.len(),
        rows.len() * dim,
        "gather_rows: output is not [rows, dim]"
    );
    for (o, &r) in out.chunks_mut(dim).zip(rows) {
        o.copy_from_slice(&x[r * dim..(r + 1) * dim]);
    }
}

/// `acc[rows[i]] += x[i]`, rows of width `dim` (the backward of [`gather_rows`]).
pub fn scatter_add_rows(acc: &mut [f32], x: &[f32], rows: &[usize], dim: usize) {
    assert_eq!(
        x.len(),
        rows.len() * dim,
        "scatter_add_rows: input is not [rows, dim]"
    );
    for (x, &r) in x.chunks(dim).zip(rows) {
        acc[r * dim..(r + 1) * dim]
            .iter_mut()
            .zip(x)
            .for_each(|(a, &x)| *a += x);
    }
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
