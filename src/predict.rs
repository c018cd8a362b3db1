//! Prediction with a fine-tuned classifier: battles -> token ids -> length-sorted packed
//! batches -> score logits -> probabilities, optionally averaged with the swapped battle
//! (swap test-time augmentation).

use crate::backend::Backend;
use crate::data::format::Formatter;
use crate::data::Battle;
use crate::metrics::Probs;
use crate::model::{HeadKind, Model, PackedBatch};
use crate::progress::Progress;
use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use serde::Serialize;
use std::io::Write;
use std::path::Path;

/// How to run prediction.
#[derive(Debug, Clone, Copy)]
pub struct PredictOptions {
    /// Also classify each battle with A and B exchanged and average the two.
    pub tta_swap: bool,
    /// Most tokens in one packed batch.
    pub batch_tokens: usize,
}

/// One battle's outputs.
#[derive(Debug, Clone, PartialEq)]
pub struct RowOutput {
    pub id: String,
    /// Final probabilities (A, B, tie), TTA-averaged if asked.
    pub probs: Probs,
    /// Score logits of the battle as given.
    pub logits: [f32; 3],
    /// Score logits of the swapped battle, mapped back to (A, B, tie) of the original.
    pub swapped_logits: Option<[f32; 3]>,
}

/// Timing and size of a prediction run.
#[derive(Debug, Clone, Serialize)]
pub struct PredictStats {
    pub rows: usize,
    pub sequences: usize,
    pub tokens: usize,
    pub seconds: f64,
    pub rows_per_second: f64,
    pub tokens_per_second: f64,
}

/// Softmax of three logits, in f64.
pub fn softmax3(l: [f32; 3]) -> Probs {
    let m = l.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let e = l.map(|x| (x as f64 - m).exp());
    let s: f64 = e.iter().sum();
    e.map(|x| x / s)
}

/// Maps a swapped battle's (A, B, tie) output back to the original battle's order.
pub fn unswap<T: Copy>(x: [T; 3]) -> [T; 3] {
    [x[1], x[0], x[2]]
}

/// Greedy packing of sequence indices, longest first, into batches of at most
/// `batch_tokens` tokens (a longer sequence gets a batch of its own).
pub fn length_sorted_batches(lengths: &[usize], batch_tokens: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
    let mut batches: Vec<Vec<usize>> = Vec::new();
    let mut used = 0;
    for i in order {
        if batches.is_empty() || used + lengths[i] > batch_tokens {
            batches.push(Vec::new());
            used = 0;
        }
        batches.last_mut().expect("pushed").push(i);
        used += lengths[i];
    }
    batches
}

/// Classifies battles; outputs are in input order.
pub fn predict_battles<B: Backend>(
    backend: &B,
    model: &Model<B>,
    formatter: &Formatter,
    battles: &[Battle],
    options: PredictOptions,
) -> Result<(Vec<RowOutput>, PredictStats)> {
    match model.spec.head {
        HeadKind::SequenceClassification { num_labels: 3 } => {}
        _ => bail!(
            "{} is not a 3-label sequence classifier; train one with `verdict train` first",
            model.spec.architecture
        ),
    }
    let views = if options.tta_swap { 2 } else { 1 };
    // Sequence v * n + i is battle i, as given (v = 0) or swapped (v = 1).
    let sequences: Vec<Vec<u32>> = (0..views * battles.len())
        .into_par_iter()
        .map(|j| {
            let b = &battles[j % battles.len()];
            if j < battles.len() {
                formatter.encode(b)
            } else {
                formatter.encode(&b.swapped())
            }
        })
        .collect::<Result<_>>()?;
    let vocab = model.spec.decoder.vocab_size;
    if let Some((j, &bad)) = sequences
        .iter()
        .enumerate()
        .find_map(|(j, s)| s.iter().find(|&&id| id as usize >= vocab).map(|id| (j, id)))
    {
        bail!(
            "battle {}: the tokenizer produced id {bad} but the model's vocabulary has {vocab} entries (wrong tokenizer.json for this model?)",
            battles[j % battles.len()].id
        );
    }
    let lengths: Vec<usize> = sequences.iter().map(Vec::len).collect();
    let mut logits = vec![[0f32; 3]; sequences.len()];
    let mut progress = Progress::new("predict", sequences.len());
    for batch_idx in length_sorted_batches(&lengths, options.batch_tokens) {
        let seqs: Vec<&[u32]> = batch_idx.iter().map(|&j| sequences[j].as_slice()).collect();
        let out = model.classify(backend, &PackedBatch::new(&seqs));
        let batch_logits = out.logits.context("classifier returned no logits")?;
        for (&j, l) in batch_idx.iter().zip(batch_logits) {
            if l.iter().any(|x| !x.is_finite()) {
                bail!(
                    "battle {}: non-finite logits {l:?}",
                    battles[j % battles.len()].id
                );
            }
            logits[j] = [l[0], l[1], l[2]];
        }
        progress.advance(batch_idx.len(), seqs.iter().map(|s| s.len()).sum(), "");
    }
    let rows = battles
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let direct = logits[i];
            let swapped = options.tta_swap.then(|| unswap(logits[battles.len() + i]));
            let p = softmax3(direct);
            let probs = match swapped {
                Some(s) => {
                    let q = softmax3(s);
                    [0, 1, 2].map(|k| (p[k] + q[k]) / 2.0)
                }
                None => p,
            };
            RowOutput {
                id: b.id.clone(),
                probs,
                logits: direct,
                swapped_logits: swapped,
            }
        })
        .collect();
    let seconds = progress.elapsed();
    let tokens = lengths.iter().sum();
    let stats = PredictStats {
        rows: battles.len(),
        sequences: sequences.len(),
        tokens,
        seconds,
        rows_per_second: battles.len() as f64 / seconds.max(1e-9),
        tokens_per_second: tokens as f64 / seconds.max(1e-9),
    };
    Ok((rows, stats))
}

/// Writes raw logits (`id,logit_a,logit_b,logit_tie` and, with swap TTA, the swapped
/// battle's logits mapped back to the original order) atomically, for ensembling.
pub fn write_logits(path: &Path, rows: &[RowOutput]) -> Result<()> {
    crate::atomic::write_with(path, |w| {
        let tta = rows.first().is_some_and(|r| r.swapped_logits.is_some());
        write!(w, "id,logit_a,logit_b,logit_tie")?;
        writeln!(
            w,
            "{}",
            if tta {
                ",swap_logit_a,swap_logit_b,swap_logit_tie"
            } else {
                ""
            }
        )?;
        for r in rows {
            write!(
                w,
                "{},{},{},{}",
                r.id, r.logits[0], r.logits[1], r.logits[2]
            )?;
            match r.swapped_logits {
                Some(s) => writeln!(w, ",{},{},{}", s[0], s[1], s[2])?,
                None => writeln!(w)?,
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_respect_the_token_budget_and_cover_every_sequence_once() {
        let lengths = [5, 100, 30, 30, 7, 250, 1];
        let batches = length_sorted_batches(&lengths, 64);
        let mut seen: Vec<usize> = batches.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, (0..lengths.len()).collect::<Vec<_>>());
        for b in &batches {
            let total: usize = b.iter().map(|&i| lengths[i]).sum();
            assert!(total <= 64 || b.len() == 1, "{b:?}");
        }
        assert_eq!(batches[0], vec![5], "longest first, alone when over budget");
    }

    #[test]
    fn unswap_exchanges_a_and_b_only() {
        assert_eq!(unswap([1, 2, 3]), [2, 1, 3]);
    }

    #[test]
    fn softmax3_is_stable_for_large_logits() {
        let p = softmax3([1000.0, 1000.0, -1000.0]);
        assert!((p[0] - 0.5).abs() < 1e-12 && p[2] < 1e-300);
    }
}
