//! Small elementwise and indexing ops: residual add, soft-cap, row gather.

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
