//! Heads: what turns final-norm hidden states into outputs.
//!
//! Place in the data flow: decoder -> hidden states -> here. The classifier's head is HF's
//! score head read at one pooled token per sequence; the LM head serves parity checks of
//! causal checkpoints (next-token loss, last-token logits).

use crate::backend::{Backend, Store, Weight};
use crate::model::decoder::Decoder;

/// The token a sequence classifier reads, as transformers 5.23's
/// `GenericForSequenceClassification` picks it: `argmax(arange(n) · (ids != pad))`, i.e. the
/// rightmost token whose id is not `pad_token_id` (decided by ids, not by an attention mask),
/// or 0 when every token is pad (argmax of all zeros is the first index). Without a
/// `pad_token_id` it is the last token (transformers then refuses batches of more than one
/// sequence; packing classifies each sequence on its own, so the rule stays well defined).
pub fn pooled_index(ids: &[u32], pad_token_id: Option<u32>) -> usize {
    match pad_token_id {
        None => ids.len() - 1,
        Some(pad) => ids.iter().rposition(|&id| id != pad).unwrap_or(0),
    }
}

/// The head of a checkpoint.
pub enum Head<B: Backend> {
    /// HF `score`: `Linear(hidden, num_labels, bias=False)`.
    Score(Weight<B>),
    /// The LM head.
    Lm(LmHead<B>),
}

/// The auxiliary identity heads of `--heads three`: from the same pooled hidden state as the
/// score head, bias-free linear heads predicting which model wrote response A and response B.
/// A training device only: never saved in the adapter, never used at inference.
pub struct AuxHeads<B: Backend> {
    /// `aux_model_a.weight` [num_models, hidden].
    pub model_a: Weight<B>,
    /// `aux_model_b.weight` [num_models, hidden].
    pub model_b: Weight<B>,
}

/// Vocabulary logits: `hidden · Eᵀ` with the tied embedding or `lm_head.weight`, then
/// Gemma 2's `final_logit_softcapping` (LM head only; a score head is never soft-capped).
pub struct LmHead<B: Backend> {
    /// `lm_head.weight` [vocab, hidden]; `None` when tied to `embed_tokens`.
    pub weight: Option<Weight<B>>,
    /// `cap · tanh(logit / cap)` when set.
    pub softcap: Option<f32>,
}

impl<B: Backend> LmHead<B> {
    /// Logits [rows, vocab] of `rows` rows of final-norm hidden states.
    pub fn logits(
        &self,
        backend: &B,
        decoder: &Decoder<B>,
        hidden: &B::Buf,
        rows: usize,
    ) -> B::Buf {
        let weight = self.weight.as_ref().unwrap_or(&decoder.embed_tokens);
        let mut out = backend.zeros(rows * weight.out_features);
        backend.linear(&mut out, hidden, weight, rows, Store::Overwrite);
        if let Some(cap) = self.softcap {
            backend.softcap(&mut out, cap);
        }
        out
    }
}

/// Score logits [rows, num_labels] of `rows` pooled hidden states.
pub fn score_logits<B: Backend>(
    backend: &B,
    score: &Weight<B>,
    pooled: &B::Buf,
    rows: usize,
) -> B::Buf {
    let mut out = backend.zeros(rows * score.out_features);
    backend.linear(&mut out, pooled, score, rows, Store::Overwrite);
    out
}

/// Cross-entropy of a bias-free linear head on `rows` pooled hidden states, with its
/// backward: `logits = pooled · Wᵀ (+ offsets [rows, classes])`, loss against `labels` (`None`: no loss) with label
/// smoothing, scaled by `weight` for the gradients: `dw += weight · ∂loss/∂W`,
/// `dpooled += weight · ∂loss/∂pooled` (the score and auxiliary heads share the pooled
/// state, so their gradients add up). Returns each row's unscaled loss.
#[allow(clippy::too_many_arguments)]
pub fn head_loss_backward<B: Backend>(
    backend: &B,
    w: &Weight<B>,
    pooled: &B::Buf,
    offsets: Option<&B::Buf>,
    labels: &[Option<u32>],
    smoothing: f32,
    weight: f32,
    dw: &mut B::Buf,
    dpooled: &mut B::Buf,
) -> Vec<f32> {
    let rows = labels.len();
    let mut logits = score_logits(backend, w, pooled, rows);
    if let Some(offsets) = offsets {
        // Constant in the parameters: the gradients below need no change.
        backend.add(&mut logits, offsets);
    }
    let mut dlogits = backend.zeros(rows * w.out_features);
    let losses = backend.softmax_cross_entropy(
        &mut dlogits,
        &logits,
        labels,
        w.out_features,
        smoothing,
        weight,
    );
    backend.linear_weight_grad(
        dw,
        &dlogits,
        pooled,
        rows,
        w.in_features,
        w.out_features,
        1.0,
    );
    backend.linear_backward(dpooled, &dlogits, w, rows, Store::Accumulate(1.0));
    losses
}

/// Mean next-token negative log-likelihood of one sequence, from its logits [n, vocab]:
/// what transformers' causal LM loss gives with `labels = ids` (predictions 0..n-1 of tokens
/// 1..n). Log-sum-exp in f64. `None` for a one-token sequence (nothing to predict).
pub fn next_token_nll(logits: &[f32], vocab: usize, ids: &[u32]) -> Option<f32> {
    if ids.len() < 2 {
        return None;
    }
    let total: f64 = logits
        .chunks(vocab)
        .zip(&ids[1..])
        .map(|(row, &next)| {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let log_sum = row
                .iter()
                .map(|&l| (l as f64 - max).exp())
                .sum::<f64>()
                .ln()
                + max;
            log_sum - row[next as usize] as f64
        })
        .sum();
    Some((total / (ids.len() - 1) as f64) as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooling_takes_rightmost_non_pad() {
        assert_eq!(pooled_index(&[5, 6, 0, 0], Some(0)), 1);
        assert_eq!(
            pooled_index(&[0, 0, 7, 0], Some(0)),
            2,
            "left and right padding"
        );
        assert_eq!(
            pooled_index(&[0, 0, 0], Some(0)),
            0,
            "all pad: argmax of zeros"
        );
        assert_eq!(pooled_index(&[5, 6, 0], None), 2, "no pad id: last token");
    }

    #[test]
    fn nll_of_uniform_logits_is_log_vocab() {
        let nll = next_token_nll(&[0.0; 8], 4, &[1, 2, 3]).unwrap();
        assert!((nll - 4f32.ln()).abs() < 1e-6);
        assert_eq!(next_token_nll(&[0.0; 4], 4, &[1]), None);
    }
}
