//! Row gathers (kernels/embedding.cu): the token embedding (one row of the table per token,
//! times a scale: Gemma multiplies by sqrt(hidden), LLaMA by one), and the gather of chosen
//! rows (the pooled positions) with its backward, the scatter-add.

use rayon::prelude::*;

/// `out[t] = scale · table[ids[t]]`, rows of width `dim`.
pub fn embedding_forward(out: &mut [f32], table: &[f32], ids: &[u32], dim: usize, scale: f32) {
    assert_eq!(
        out.len(),
        ids.len() * dim,
        "embedding: output is not [tokens, dim]"
    );
    out.par_chunks_mut(dim).zip(ids).for_each(|(row, &id)| {
        let start = id as usize * dim;
        let src = table
            .get(start..start + dim)
            .expect("embedding: token id outside the table");
        for (o, &e) in row.iter_mut().zip(src) {
            *o = e * scale;
        }
    });
}

/// `out[i] = x[rows[i]]`, rows of width `dim`.
pub fn gather_rows(out: &mut [f32], x: &[f32], rows: &[usize], dim: usize) {
    check_rows("gather_rows", "output", out, rows, dim);
    for (o, &r) in out.chunks_mut(dim).zip(rows) {
        o.copy_from_slice(&x[r * dim..(r + 1) * dim]);
    }
}

/// `acc[rows[i]] += x[i]`, rows of width `dim` (the backward of [`gather_rows`]).
pub fn scatter_add_rows(acc: &mut [f32], x: &[f32], rows: &[usize], dim: usize) {
    check_rows("scatter_add_rows", "input", x, rows, dim);
    for (x, &r) in x.chunks(dim).zip(rows) {
        acc[r * dim..(r + 1) * dim]
            .iter_mut()
            .zip(x)
            .for_each(|(a, &x)| *a += x);
    }
}

/// Panics unless `values` (`op`'s `what`) holds one row of width `dim` per entry of `rows`.
fn check_rows(op: &str, what: &str, values: &[f32], rows: &[usize], dim: usize) {
    assert_eq!(
        values.len(),
        rows.len() * dim,
        "{op}: {what} is not [rows, dim]"
    );
}
