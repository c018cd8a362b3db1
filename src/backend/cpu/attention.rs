//! Causal multi-head attention over a packed batch, with everything Gemma and LLaMA need:
//! grouped-query heads, any head_dim, logit soft-capping and a sliding window.
//!
//! For query token `q` of a sequence (positions restart at 0 per sequence), head `h`:
//! `s_k = scale · q_h · k_{g,k}` (`g = h / (heads / kv_heads)`), then
//! `s_k = cap · tanh(s_k / cap)` if soft-capped, then keys outside `q - window < k <= q` or
//! outside the sequence get `-inf`, then `out = Σ_k softmax(s)_k · v_{g,k}`. The cap comes
//! before the mask, as in transformers: capping the mask would turn `-inf` into `-cap` and
//! give masked keys weight.
//!
//! Work is split into blocks of `QUERY_BLOCK` query rows; per block, sequence and head the
//! scores of the visible key range are one sgemm (`Q·Kᵀ`) and the output another (`P·V`),
//! reading q, k, v in place through strides. A scalar loop over keys spent half of the
//! SmolLM2-135M forward in attention.

use crate::backend::AttentionParams;
use rayon::prelude::*;

/// Query rows per parallel task; bounds the score buffer to `QUERY_BLOCK x keys`.
const QUERY_BLOCK: usize = 64;

/// Writes `out` (`[tokens, heads · head_dim]`) from `q`, `k`, `v`; see the module comment.
pub fn attention_forward(
    out: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    cu_seqlens: &[usize],
    p: &AttentionParams,
) {
    let AttentionParams {
        heads,
        kv_heads,
        head_dim,
        scale,
        softcap,
        window,
    } = *p;
    assert!(
        kv_heads > 0 && heads % kv_heads == 0,
        "attention: {heads} heads not a multiple of {kv_heads} kv heads"
    );
    let (q_width, kv_width) = (heads * head_dim, kv_heads * head_dim);
    let tokens = *cu_seqlens.last().expect("attention: empty cu_seqlens");
    assert!(
        out.len() == tokens * q_width && q.len() == out.len(),
        "attention: q/out are not [tokens, heads * head_dim]"
    );
    assert!(
        k.len() == tokens * kv_width && v.len() == k.len(),
        "attention: k/v are not [tokens, kv_heads * head_dim]"
    );
    let group = heads / kv_heads;
    // Key k is visible from query t (same sequence, k <= t) unless the window excludes it.
    let in_window = |t: usize, key: usize| window.map_or(true, |w| key + w > t);

    out.par_chunks_mut(QUERY_BLOCK * q_width)
        .enumerate()
        .for_each(|(block, out_block)| {
            let block_start = block * QUERY_BLOCK;
            let block_end = block_start + out_block.len() / q_width;
            // The sequences this block overlaps, from the one holding its first row.
            let mut seq = cu_seqlens.partition_point(|&start| start <= block_start) - 1;
            let mut scores = Vec::new();
            while seq + 1 < cu_seqlens.len() && cu_seqlens[seq] < block_end {
                let (seq_start, seq_end) = (cu_seqlens[seq], cu_seqlens[seq + 1]);
                seq += 1;
                let rows = block_start.max(seq_start)..block_end.min(seq_end);
                if rows.is_empty() {
                    continue;
                }
                let first_key = match window {
                    Some(w) => seq_start.max((rows.start + 1).saturating_sub(w)),
                    None => seq_start,
                };
                let keys = first_key..rows.end;
                let (m, n) = (rows.len(), keys.len());
                scores.resize(m * n, 0.0);
                for h in 0..heads {
                    let g = h / group;
                    // SAFETY (both sgemm calls): every pointer is an in-bounds element of q,
                    // k, v, `scores` or `out_block`, and the strides walk only rows `rows` /
                    // `keys` and the head_dim columns of head h / g within them.
                    unsafe {
                        // scores[i, j] = scale · q[rows.start + i, h] · k[keys.start + j, g]
                        matrixmultiply::sgemm(
                            m,
                            head_dim,
                            n,
                            scale,
                            q.as_ptr().add(rows.start * q_width + h * head_dim),
                            q_width as isize,
                            1,
                            k.as_ptr().add(keys.start * kv_width + g * head_dim),
                            1,
                            kv_width as isize,
                            0.0,
                            scores.as_mut_ptr(),
                            n as isize,
                            1,
                        );
                    }
                    for (i, row) in scores.chunks_mut(n).enumerate() {
                        let t = rows.start + i;
                        for (j, s) in row.iter_mut().enumerate() {
                            let key = keys.start + j;
                            *s = if key <= t && in_window(t, key) {
                                softcap.map_or(*s, |cap| cap * (*s / cap).tanh())
                            } else {
                                f32::NEG_INFINITY
                            };
                        }
                        // Key t itself is always visible, so the max is finite.
                        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                        let mut total = 0.0;
                        for s in row.iter_mut() {
                            *s = (*s - max).exp();
                            total += *s;
                        }
                        row.iter_mut().for_each(|s| *s /= total);
                    }
                    unsafe {
                        // out[rows.start + i, h] = Σ_j scores[i, j] · v[keys.start + j, g]
                        matrixmultiply::sgemm(
                            m,
                            n,
                            head_dim,
                            1.0,
                            scores.as_ptr(),
                            n as isize,
                            1,
                            v.as_ptr().add(keys.start * kv_width + g * head_dim),
                            kv_width as isize,
                            1,
                            0.0,
                            out_block
                                .as_mut_ptr()
                                .add((rows.start - block_start) * q_width + h * head_dim),
                            q_width as isize,
                            1,
                        );
                    }
                }
            }
        });
}
