//! Projections with optional PEFT LoRA adapters.
//!
//! Place in the data flow: every linear layer of the decoder is a [`Linear`]: the frozen base
//! weight `W` plus, when an adapter is loaded, a low-rank update applied *unmerged*:
//! `y = W·x + s·B·(A·x)` with `A` [r, in], `B` [out, r], `s = lora_alpha / r`
//! (`lora_alpha / sqrt(r)` with rsLoRA). Unmerged is what training needs (the base stays
//! frozen, possibly NF4) and what keeps an adapter swappable; [`Linear::merge`] folds the
//! update into a dense `W` for inference. While training, PEFT's `lora_dropout` applies to
//! the adapter's input, `s·B·(A·dropout(x))`, with a mask drawn from a seed, so the backward
//! (which recomputes the rank-r activation rather than keeping it) sees the same mask.
//! The adapter files (PEFT's format) are read and written by `model::peft`.

use crate::backend::{Backend, LoraAdapter, MemoryUse, Store, Weight, WeightData};

/// A linear layer `y = x·Wᵀ (+ s·(x·Aᵀ)·Bᵀ)`.
pub struct Linear<B: Backend> {
    /// The frozen base weight `W` [out, in].
    pub weight: Weight<B>,
    /// The adapter, if any.
    pub lora: Option<Lora<B>>,
}

/// One LoRA update `s·B·A`.
pub struct Lora<B: Backend> {
    /// Down-projection `A` [r, in].
    pub a: Weight<B>,
    /// Up-projection `B` [out, r].
    pub b: Weight<B>,
    /// `s`: alpha / r, or alpha / sqrt(r) with rsLoRA.
    pub scale: f32,
    /// Probability of PEFT's dropout on the adapter's input `x` (training only).
    pub dropout: f32,
}

impl<B: Backend> Linear<B> {
    /// A projection without adapter from a dense f32 weight [out, in].
    pub fn dense(
        backend: &B,
        values: &[f32],
        out_features: usize,
        in_features: usize,
    ) -> Linear<B> {
        Linear {
            weight: dense_weight(backend, values, out_features, in_features),
            lora: None,
        }
    }

    /// `out = x·Wᵀ (+ s·(dropout(x)·Aᵀ)·Bᵀ)` for `rows` rows of `x`, into `out` (whose
    /// storage the caller chooses: [`Backend::zeros_half`] or f32). `dropout_seed` is `Some`
    /// only while training: it turns on the adapter's input dropout (PEFT's `lora_dropout`)
    /// and chooses its mask.
    pub fn forward(
        &self,
        backend: &B,
        out: &mut B::Buf,
        x: &B::Buf,
        rows: usize,
        dropout_seed: Option<u64>,
    ) {
        match &self.lora {
            None => backend.linear(out, x, &self.weight, rows, Store::Overwrite),
            Some(lora) => {
                let adapter = lora.adapter(dropout_seed);
                backend.lora_linear(out, x, &self.weight, &adapter, rows)
            }
        }
    }

    /// Backward of [`Linear::forward`] (same `x`, `rows`, `dropout_seed`): the input gradient
    /// `dY·W (+ s·dropout(dY·B·A))` into `dx` as `store` says and, for an adapted projection,
    /// `grads.a += s·(dY·B)ᵀ·dropout(x)`, `grads.b += s·dYᵀ·(dropout(x)·Aᵀ)`. The frozen base
    /// weight gets no gradient.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        backend: &B,
        dy: &B::Buf,
        x: &B::Buf,
        rows: usize,
        dropout_seed: Option<u64>,
        dx: &mut B::Buf,
        store: Store,
        grads: Option<&mut LoraGrads<B>>,
    ) {
        let Some(lora) = &self.lora else {
            backend.linear_backward(dx, dy, &self.weight, rows, store);
            return;
        };
        let grads = grads.expect("an adapted projection needs its gradient buffers");
        let adapter = lora.adapter(dropout_seed);
        let grads = [&mut grads.a, &mut grads.b];
        backend.lora_linear_backward(dx, dy, x, &self.weight, &adapter, rows, store, grads);
    }

    /// Folds the adapter into the base weight, `W += s·B·A`, and drops it. An NF4 base keeps
    /// its adapter unmerged: folding would mean requantizing, which changes the outputs.
    pub fn merge(&mut self, backend: &B) {
        let WeightData::Dense(w) = &mut self.weight.data else {
            return;
        };
        let Some(lora) = self.lora.take() else { return };
        let WeightData::Dense(a) = &lora.a.data else {
            unreachable!("LoRA matrices are dense")
        };
        let (r, in_features) = (lora.a.out_features, lora.a.in_features);
        // B·A is the linear op with X = B [out, r] and weight Aᵀ [in, r].
        let a = backend.download(a);
        let mut a_t = vec![0.0; a.len()];
        for (i, row) in a.chunks(in_features).enumerate() {
            for (j, &v) in row.iter().enumerate() {
                a_t[j * r + i] = v;
            }
        }
        let a_t = dense_weight(backend, &a_t, in_features, r);
        let WeightData::Dense(b) = &lora.b.data else {
            unreachable!("LoRA matrices are dense")
        };
        backend.linear(
            w,
            b,
            &a_t,
            lora.b.out_features,
            Store::Accumulate(lora.scale),
        );
    }
}

impl<B: Backend> Lora<B> {
    /// The adapter as the backend's LoRA ops take it; dropout is on while training (`seed`
    /// given) with `p > 0`.
    fn adapter(&self, seed: Option<u64>) -> LoraAdapter<'_, B> {
        LoraAdapter {
            a: &self.a,
            b: &self.b,
            scale: self.scale,
            dropout: seed
                .filter(|_| self.dropout > 0.0)
                .map(|seed| (self.dropout, seed)),
        }
    }
}

/// Gradients of one adapter's matrices, shaped as them.
pub struct LoraGrads<B: Backend> {
    /// `dA` [r, in].
    pub a: B::Buf,
    /// `dB` [out, r].
    pub b: B::Buf,
}

impl<B: Backend> LoraGrads<B> {
    /// Zero gradients for `lora`.
    pub fn zeros(backend: &B, lora: &Lora<B>) -> LoraGrads<B> {
        let _adapters = backend.memory_scope(MemoryUse::Adapters);
        let size = |w: &Weight<B>| w.out_features * w.in_features;
        LoraGrads {
            a: backend.zeros(size(&lora.a)),
            b: backend.zeros(size(&lora.b)),
        }
    }
}

/// A dense weight [out, in] uploaded to `backend`.
pub fn dense_weight<B: Backend>(
    backend: &B,
    values: &[f32],
    out_features: usize,
    in_features: usize,
) -> Weight<B> {
    check_dense_shape(values.len(), out_features, in_features);
    dense(backend.upload(values), out_features, in_features)
}

/// [`dense_weight`] of a vector the caller gives up: the CPU keeps it rather than copying, so
/// a loaded tensor (a 2.4 GB embedding) never exists twice.
pub fn dense_weight_from_vec<B: Backend>(
    backend: &B,
    values: Vec<f32>,
    out_features: usize,
    in_features: usize,
) -> Weight<B> {
    check_dense_shape(values.len(), out_features, in_features);
    dense(backend.upload_vec(values), out_features, in_features)
}

fn check_dense_shape(len: usize, out_features: usize, in_features: usize) {
    assert_eq!(
        len,
        out_features * in_features,
        "dense weight is not [{out_features}, {in_features}]"
    );
}

fn dense<B: Backend>(values: B::Buf, out_features: usize, in_features: usize) -> Weight<B> {
    Weight {
        out_features,
        in_features,
        data: WeightData::Dense(values),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::Cpu;

    #[test]
    fn merged_equals_unmerged() {
        let cpu = Cpu;
        let (out_f, in_f, r, rows) = (5, 7, 2, 3);
        let val = |n: usize, k: f32| (0..n).map(|i| (i as f32 * k).sin()).collect::<Vec<f32>>();
        let mut linear = Linear::dense(&cpu, &val(out_f * in_f, 0.37), out_f, in_f);
        linear.lora = Some(Lora {
            a: dense_weight(&cpu, &val(r * in_f, 1.3), r, in_f),
            b: dense_weight(&cpu, &val(out_f * r, 0.71), out_f, r),
            scale: 1.7,
            dropout: 0.0,
        });
        let x = cpu.upload(&val(rows * in_f, 0.53));
        let (mut unmerged, mut merged) = (cpu.zeros(rows * out_f), cpu.zeros(rows * out_f));
        linear.forward(&cpu, &mut unmerged, &x, rows, None);
        linear.merge(&cpu);
        assert!(linear.lora.is_none());
        linear.forward(&cpu, &mut merged, &x, rows, None);
        let diff = unmerged
            .iter()
            .zip(&merged)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(diff < 1e-5, "max diff {diff}");
    }
}
