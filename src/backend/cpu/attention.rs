//! Causal multi-head attention over a packed batch, with everything Gemma and LLaMA need:
//! grouped-query heads, any head_dim, logit soft-capping and a sliding window.
//!
//! For query token `q` of a sequence (positions restart at 0 per sequence), head `h`:
//! `s_k = scale · q_h · k_{g,k}` for keys `k` of the same sequence with `q - window < k <= q`
//! (`g = h / (heads / kv_heads)`), then `s_k = cap · tanh(s_k / cap)` if soft-capped —
//! before masking, as transformers does, so the cap never sees the mask's -inf —, then
//! `out = Σ_k softmax(s)_k · v_{g,k}`. Masked keys are skipped rather than set to -inf.

use crate::backend::AttentionParams;
use rayon::prelude::*;

/// `a · b`, summed in `LANES` independent partial sums: one running f32 sum must be added
/// in order, which keeps the compiler from vectorising it (attention was half the forward).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 16;
    let mut partial = [0.0f32; LANES];
    let (a_blocks, b_blocks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = a_blocks
        .remainder()
        .iter()
        .zip(b_blocks.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a_blocks.zip(b_blocks) {
        for i in 0..LANES {
            partial[i] += x[i] * y[i];
        }
    }
    partial.iter().sum::<f32>() + tail
}

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

    out.par_chunks_mut(q_width)
        .enumerate()
        .for_each(|(t, out_row)| {
            // The sequence holding token t: the last start <= t.
            let seq = cu_seqlens.partition_point(|&start| start <= t) - 1;
            let first_key = match window {
                Some(w) => cu_seqlens[seq].max((t + 1).saturating_sub(w)),
                None => cu_seqlens[seq],
            };
            let keys = first_key..=t;
            let mut scores = vec![0.0f32; keys.clone().count()];
            for h in 0..heads {
                let g = h / group;
                let q_h = &q[t * q_width + h * head_dim..][..head_dim];
                for (s, key) in scores.iter_mut().zip(keys.clone()) {
                    let k_g = &k[key * kv_width + g * head_dim..][..head_dim];
                    *s = dot(q_h, k_g) * scale;
                    if let Some(cap) = softcap {
                        *s = cap * (*s / cap).tanh();
                    }
                }
                let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut total = 0.0;
                for s in scores.iter_mut() {
                    *s = (*s - max).exp();
                    total += *s;
                }
                let out_h = &mut out_row[h * head_dim..][..head_dim];
                out_h.fill(0.0);
                for (&s, key) in scores.iter().zip(keys.clone()) {
                    let weight = s / total;
                    let v_g = &v[key * kv_width + g * head_dim..][..head_dim];
                    for (o, &x) in out_h.iter_mut().zip(v_g) {
                        *o += weight * x;
                    }
                }
            }
        });
}
