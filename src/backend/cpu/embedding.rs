//! Token embedding: gather one row of the table per token, times a scale (Gemma multiplies by
//! sqrt(hidden), LLaMA by one).

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
