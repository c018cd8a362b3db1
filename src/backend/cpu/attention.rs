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
//! The forward also writes each row's log-sum-exp `lse = log Σ_k exp(s_k)` (over the visible
//! keys); the backward recomputes the probabilities from it, `P = exp(s - lse)`, as flash
//! attention's backward does (kernels/attention.cu is checked against these). The softmax's
//! row term `D` is summed as `Σ P·dP` here, where the kernels take `rowsum(dout ∘ out)`: equal
//! in exact arithmetic, and in f32 the first keeps `dP - D` accurate for peaked rows (measured:
//! tests/gradcheck.rs's Gemma 3 model check moved from 1.4e-3 to 2.1e-3 with the second).
//!
//! Work is split into blocks of `QUERY_BLOCK` query rows; per block, sequence and head the
//! scores of the visible key range are one sgemm (`Q·Kᵀ`) and the output another (`P·V`),
//! reading q, k, v in place through strides. A scalar loop over keys spent half of the
//! SmolLM2-135M forward in attention.

use super::elementwise::exp;
use super::gemm::{sgemm_serial, OutPtr};
use crate::backend::AttentionParams;
use rayon::prelude::*;
use std::ops::Range;

/// Query rows per parallel task; bounds the score buffer to `QUERY_BLOCK x keys`.
const QUERY_BLOCK: usize = 64;

/// Writes `out` (`[tokens, heads · head_dim]`) and `lse` (`[tokens, heads]`) from `q`, `k`,
/// `v`; see the module comment.
pub fn attention_forward(
    out: &mut [f32],
    lse: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    cu_seqlens: &[usize],
    p: &AttentionParams,
) {
    let AttentionParams {
        heads,
        head_dim,
        scale,
        softcap,
        window,
        ..
    } = *p;
    let (q_width, kv_width, group) = check_layout(
        "attention",
        p,
        cu_seqlens,
        &[q.len(), out.len()],
        &[k.len(), v.len()],
    );
    assert_eq!(
        lse.len(),
        out.len() / head_dim.max(1),
        "attention: lse is not [tokens, heads]"
    );

    out.par_chunks_mut(QUERY_BLOCK * q_width)
        .zip(lse.par_chunks_mut(QUERY_BLOCK * heads))
        .enumerate()
        .for_each(|(block, (out_block, lse_block))| {
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
                let keys = visible_keys(&rows, seq_start, window);
                let (m, n) = (rows.len(), keys.len());
                scores.resize(m * n, 0.0);
                for h in 0..heads {
                    let g = h / group;
                    // SAFETY (both sgemm calls): every pointer is an in-bounds element of q,
                    // k, v, `scores` or `out_block`, and the strides walk only rows `rows` /
                    // `keys` and the head_dim columns of head h / g within them.
                    unsafe {
                        // scores[i, j] = scale · q[rows.start + i, h] · k[keys.start + j, g]
                        sgemm_serial(
                            m,
                            head_dim,
                            n,
                            scale,
                            q.as_ptr().add(rows.start * q_width + h * head_dim),
                            (q_width as isize, 1),
                            k.as_ptr().add(keys.start * kv_width + g * head_dim),
                            (1, kv_width as isize),
                            0.0,
                            scores.as_mut_ptr(),
                            (n as isize, 1),
                        );
                    }
                    for (i, row) in scores.chunks_mut(n).enumerate() {
                        let t = rows.start + i;
                        let scores = Scores {
                            t,
                            first_key: keys.start,
                            window,
                            softcap,
                        };
                        lse_block[(t - block_start) * heads + h] = scores.softmax(row);
                    }
                    unsafe {
                        // out[rows.start + i, h] = Σ_j scores[i, j] · v[keys.start + j, g]
                        sgemm_serial(
                            m,
                            n,
                            head_dim,
                            1.0,
                            scores.as_ptr(),
                            (n as isize, 1),
                            v.as_ptr().add(keys.start * kv_width + g * head_dim),
                            (kv_width as isize, 1),
                            0.0,
                            out_block
                                .as_mut_ptr()
                                .add((rows.start - block_start) * q_width + h * head_dim),
                            (q_width as isize, 1),
                        );
                    }
                }
            }
        });
}

/// Backward of [`attention_forward`]: overwrites `dq` (`[tokens, heads · head_dim]`), `dk` and
/// `dv` (`[tokens, kv_heads · head_dim]`) from `dout`, given the forward's `lse` (`out` is
/// only checked for its shape: see the module comment). With `P = exp(c - lse)` the
/// probabilities, `c` the capped scores and `dP = dO · Vᵀ`:
/// `dc = P ∘ (dP - rowsum(P ∘ dP))`,
/// `dz = dc ∘ (1 - tanh²(z / cap))` (1 without cap),
/// `dQ = scale · dz · K`, `dK = scale · dzᵀ · Q`, `dV = Pᵀ · dO`; the query heads of a GQA
/// group all add into their shared key/value head.
///
/// Probabilities are recomputed per block of `QUERY_BLOCK` queries rather than kept from
/// the forward, so memory stays `QUERY_BLOCK x keys`, never `S x S` per head. Each rayon task
/// owns one (sequence, key/value head): it alone writes that head's `dk`/`dv` rows and the
/// `dq` of its query heads, so no two tasks touch the same output.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    dout: &[f32],
    out: &[f32],
    lse: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    cu_seqlens: &[usize],
    p: &AttentionParams,
) {
    let AttentionParams {
        heads,
        kv_heads,
        head_dim: d,
        scale,
        softcap,
        window,
        ..
    } = *p;
    let (q_width, kv_width, group) = check_layout(
        "attention backward",
        p,
        cu_seqlens,
        &[q.len(), dq.len(), dout.len(), out.len()],
        &[k.len(), v.len(), dk.len(), dv.len()],
    );
    assert_eq!(
        lse.len(),
        q.len() / d.max(1),
        "attention backward: lse is not [tokens, heads]"
    );
    dq.fill(0.0);
    dk.fill(0.0);
    dv.fill(0.0);
    let (dq_ptr, dk_ptr, dv_ptr) = (
        OutPtr(dq.as_mut_ptr()),
        OutPtr(dk.as_mut_ptr()),
        OutPtr(dv.as_mut_ptr()),
    );
    let tasks: Vec<(usize, usize)> = (0..cu_seqlens.len() - 1)
        .flat_map(|s| (0..kv_heads).map(move |g| (s, g)))
        .collect();
    tasks.into_par_iter().for_each(|(seq, g)| {
        let (seq_start, seq_end) = (cu_seqlens[seq], cu_seqlens[seq + 1]);
        let (mut probs, mut dprobs, mut slope) = (Vec::new(), Vec::new(), Vec::new());
        for h in g * group..(g + 1) * group {
            for block_start in (seq_start..seq_end).step_by(QUERY_BLOCK) {
                let rows = block_start..(block_start + QUERY_BLOCK).min(seq_end);
                let keys = visible_keys(&rows, seq_start, window);
                let (m, n) = (rows.len(), keys.len());
                probs.resize(m * n, 0.0);
                dprobs.resize(m * n, 0.0);
                slope.resize(m * n, 1.0);
                let q_rows = q[rows.start * q_width + h * d..].as_ptr();
                let do_rows = dout[rows.start * q_width + h * d..].as_ptr();
                let k_keys = k[keys.start * kv_width + g * d..].as_ptr();
                let v_keys = v[keys.start * kv_width + g * d..].as_ptr();
                // SAFETY (every sgemm below): the pointers address rows `rows` / `keys` and
                // the head_dim columns of head h / g of q, dout, k, v, dq, dk, dv, or the
                // m x n block buffers; the strides stay inside those rows. The dq, dk, dv
                // regions written belong to this task's (sequence, key/value head) alone.
                unsafe {
                    // probs = scale · Q_rows · K_keysᵀ, then probabilities in place.
                    matrixmultiply::sgemm(
                        m,
                        d,
                        n,
                        scale,
                        q_rows,
                        q_width as isize,
                        1,
                        k_keys,
                        1,
                        kv_width as isize,
                        0.0,
                        probs.as_mut_ptr(),
                        n as isize,
                        1,
                    );
                    // dprobs = dO_rows · V_keysᵀ.
                    matrixmultiply::sgemm(
                        m,
                        d,
                        n,
                        1.0,
                        do_rows,
                        q_width as isize,
                        1,
                        v_keys,
                        1,
                        kv_width as isize,
                        0.0,
                        dprobs.as_mut_ptr(),
                        n as isize,
                        1,
                    );
                }
                for (i, ((p_row, dp_row), slope_row)) in probs
                    .chunks_mut(n)
                    .zip(dprobs.chunks_mut(n))
                    .zip(slope.chunks_mut(n))
                    .enumerate()
                {
                    let t = rows.start + i;
                    let scores = Scores {
                        t,
                        first_key: keys.start,
                        window,
                        softcap,
                    };
                    scores.probabilities(p_row, lse[t * heads + h], slope_row);
                    // D = Σ P·dP, which is rowsum(dout ∘ out) in exact arithmetic; summed
                    // with the same P as dz, it keeps dz = P ∘ (dP - D) accurate in f32 where a
                    // peaked row makes dP - D a cancellation.
                    let row_dot: f32 = p_row.iter().zip(&*dp_row).map(|(p, dp)| p * dp).sum();
                    for ((dp, &p), &sl) in dp_row.iter_mut().zip(&*p_row).zip(&*slope_row) {
                        *dp = p * (*dp - row_dot) * sl;
                    }
                }
                // dprobs now holds dz, the gradient of the unscaled-by-cap scores z.
                unsafe {
                    // dQ_rows += scale · dz · K_keys.
                    matrixmultiply::sgemm(
                        m,
                        n,
                        d,
                        scale,
                        dprobs.as_ptr(),
                        n as isize,
                        1,
                        k_keys,
                        kv_width as isize,
                        1,
                        1.0,
                        dq_ptr.get().add(rows.start * q_width + h * d),
                        q_width as isize,
                        1,
                    );
                    // dK_keys += scale · dzᵀ · Q_rows.
                    matrixmultiply::sgemm(
                        n,
                        m,
                        d,
                        scale,
                        dprobs.as_ptr(),
                        1,
                        n as isize,
                        q_rows,
                        q_width as isize,
                        1,
                        1.0,
                        dk_ptr.get().add(keys.start * kv_width + g * d),
                        kv_width as isize,
                        1,
                    );
                    // dV_keys += Pᵀ · dO_rows.
                    matrixmultiply::sgemm(
                        n,
                        m,
                        d,
                        1.0,
                        probs.as_ptr(),
                        1,
                        n as isize,
                        do_rows,
                        q_width as isize,
                        1,
                        1.0,
                        dv_ptr.get().add(keys.start * kv_width + g * d),
                        kv_width as isize,
                        1,
                    );
                }
            }
        }
    });
}

/// Checks the head layout and that the buffers with `q_lens` are `[tokens, heads ·
/// head_dim]` and those with `kv_lens` `[tokens, kv_heads · head_dim]` for the tokens of
/// `cu_seqlens`; returns the q and k/v row widths and the query heads per key/value head.
fn check_layout(
    op: &str,
    p: &AttentionParams,
    cu_seqlens: &[usize],
    q_lens: &[usize],
    kv_lens: &[usize],
) -> (usize, usize, usize) {
    let (heads, kv_heads) = (p.heads, p.kv_heads);
    assert!(
        kv_heads > 0 && heads % kv_heads == 0,
        "{op}: {heads} heads not a multiple of {kv_heads} kv heads"
    );
    let (q_width, kv_width) = (heads * p.head_dim, kv_heads * p.head_dim);
    let tokens = *cu_seqlens
        .last()
        .unwrap_or_else(|| panic!("{op}: empty cu_seqlens"));
    assert!(
        q_lens.iter().all(|&n| n == tokens * q_width),
        "{op}: q-shaped buffers are not [tokens, heads * head_dim]"
    );
    assert!(
        kv_lens.iter().all(|&n| n == tokens * kv_width),
        "{op}: k/v-shaped buffers are not [tokens, kv_heads * head_dim]"
    );
    (q_width, kv_width, heads / kv_heads)
}

/// The keys that query rows `rows` of a sequence starting at `seq_start` may see, together:
/// from the first key in the first row's window (or the sequence start) to the last row.
fn visible_keys(rows: &Range<usize>, seq_start: usize, window: Option<usize>) -> Range<usize> {
    let first_key = match window {
        Some(w) => seq_start.max((rows.start + 1).saturating_sub(w)),
        None => seq_start,
    };
    first_key..rows.end
}

/// One query row of scores `scale · q_t · k` (keys from `first_key`): how they become
/// probabilities. The soft-cap comes before the mask (as transformers does: capping a `-inf`
/// mask would give masked keys weight); keys after `t` or outside the window are masked.
struct Scores {
    t: usize,
    first_key: usize,
    window: Option<usize>,
    softcap: Option<f32>,
}

impl Scores {
    /// The row positions `j` (key `first_key + j`) of a row of `len` scores that are visible:
    /// one range, as the window ends at `t` and reaches back at most `window - 1` keys.
    fn visible(&self, len: usize) -> Range<usize> {
        let first = self
            .window
            .map_or(0, |w| (self.t + 1).saturating_sub(w))
            .saturating_sub(self.first_key);
        let end = (self.t + 1 - self.first_key).min(len);
        first.min(end)..end
    }

    /// The row's softmax in place (masked keys 0); returns its log-sum-exp. Written as
    /// passes over the visible range that the compiler vectorises: 36 % of the attention
    /// forward's time went to a per-key masking and libm `expf` loop before.
    fn softmax(&self, row: &mut [f32]) -> f32 {
        let visible = self.visible(row.len());
        let (before, rest) = row.split_at_mut(visible.start);
        let (scores, after) = rest.split_at_mut(visible.len());
        before.fill(0.0);
        after.fill(0.0);
        if let Some(cap) = self.softcap {
            scores.iter_mut().for_each(|s| *s = cap * (*s / cap).tanh());
        }
        // Key t itself is always visible, so the max is finite.
        let max = lanes(scores, f32::NEG_INFINITY, f32::max);
        scores.iter_mut().for_each(|s| *s = exp(*s - max));
        let total = lanes(scores, 0.0, |a, b| a + b);
        let inverse = 1.0 / total;
        scores.iter_mut().for_each(|s| *s *= inverse);
        max + total.ln()
    }

    /// The row's probabilities `exp(c - lse)` in place (0 for masked keys), with each key's
    /// cap derivative `1 - tanh²(s / cap)` (1 without cap) in `slope` (0 for masked keys).
    fn probabilities(&self, row: &mut [f32], lse: f32, slope: &mut [f32]) {
        let visible = self.visible(row.len());
        for (j, (s, sl)) in row.iter_mut().zip(slope).enumerate() {
            (*s, *sl) = match self.softcap {
                _ if !visible.contains(&j) => (0.0, 0.0),
                Some(cap) => {
                    let tanh = (*s / cap).tanh();
                    (exp(cap * tanh - lse), 1.0 - tanh * tanh)
                }
                None => (exp(*s - lse), 1.0),
            };
        }
    }
}

/// `values` folded with `f` in 16 interleaved partial results, then those folded: one running
/// result must be updated in order, which keeps the compiler from vectorising.
fn lanes(values: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    const LANES: usize = 16;
    let mut partial = [init; LANES];
    let blocks = values.chunks_exact(LANES);
    let tail = blocks.remainder().iter().fold(init, |a, &v| f(a, v));
    for block in blocks {
        for (p, &v) in partial.iter_mut().zip(block) {
            *p = f(*p, v);
        }
    }
    partial.iter().fold(tail, |a, &p| f(a, p))
}
