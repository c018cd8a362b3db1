//! The model as the training loop sees it: LoRA adapters and heads to add, a flat list of
//! trainable parameters (named by their PEFT keys), and one call that returns the batch loss
//! with its gradient w.r.t. every trainable parameter.
//!
//! Place in the data flow: `train` (batches, AdamW, checkpoints) -> here -> the decoder's
//! forward and explicit backward (`model::decoder`) and the heads' loss (`model::head`).
//! The base (embedding, norms, projection weights) is frozen: it gets no gradient.
//!
//! Trainable parameters, in this fixed order (what [`Model::trainable_params`],
//! [`Model::read_params`], [`Model::write_params`] and the gradients of
//! [`Model::loss_and_grads`] all use):
//! 1. for each layer `i` in order, for each adapted projection in [`Projection::ALL`] order
//!    (q, k, v, o, gate, up, down): `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`
//!    [r, in], then `...lora_B.weight` [out, r] (PEFT's own key names and order);
//! 2. the score head `base_model.model.score.weight` [num_labels, hidden] (PEFT's
//!    `modules_to_save`);
//! 3. with auxiliary heads: `aux_model_a.weight`, `aux_model_b.weight` [num_models, hidden].
//!
//! A causal checkpoint has no score head: [`Model::add_score_head`] gives it one, as
//! transformers does when a `*ForSequenceClassification` is made from a causal checkpoint
//! (a new bias-free `score` Linear, weights normal(0, 0.02)).

use crate::backend::{Backend, MemoryUse, Weight, WeightData};
use crate::data::Winner;
use crate::model::head::{head_loss_backward, AuxHeads, Head};
use crate::model::lora::{dense_weight, Lora};
use crate::model::peft::{lora_key, projection_module, Projection, SCORE_KEY};
use crate::model::{HeadKind, Model, PackedBatch};
use crate::rng::Rng;
use anyhow::{bail, ensure, Result};

/// New LoRA adapters, as PEFT's `LoraConfig`.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// Rank.
    pub r: usize,
    /// `lora_alpha`: the scale is `alpha / r` (or `alpha / sqrt(r)` with rsLoRA).
    pub alpha: f32,
    /// The adapted projections of every layer.
    pub targets: Vec<Projection>,
    /// rsLoRA scaling.
    pub rslora: bool,
    /// Dropout probability on the adapter input while training.
    pub dropout: f32,
    /// The adapted layers (PEFT's `layers_to_transform`); `None`: every layer.
    pub layers: Option<Vec<usize>>,
}

/// What one sequence of a batch should predict.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Target {
    /// The preference label (score head).
    pub winner: Winner,
    /// Added to the score logits before the loss: the log-probabilities of the model whose
    /// residual this one learns (`--on-baseline`); zeros: none.
    pub offset: [f32; 3],
    /// Index of model A in the model-name vocabulary (auxiliary head); `None`: unknown, no loss.
    pub model_a: Option<u32>,
    /// Index of model B, as `model_a`.
    pub model_b: Option<u32>,
}

/// Settings of one loss evaluation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossOptions {
    /// Label smoothing of the preference cross-entropy (as torch's `label_smoothing`).
    pub label_smoothing: f32,
    /// Weight of the auxiliary identity losses (0 = off).
    pub aux_weight: f32,
    /// Keep only each layer's input and recompute the layer in backward (less memory).
    pub recompute_layers: bool,
    /// Seeds the LoRA dropout masks of this call.
    pub dropout_seed: u64,
}

/// The loss of one batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossReport {
    /// `pref_loss + aux_weight · aux_loss`, what the gradients are of.
    pub loss: f64,
    /// Mean preference cross-entropy over the sequences.
    pub pref_loss: f64,
    /// Auxiliary cross-entropy (model A + model B) summed over known labels, over sequences.
    pub aux_loss: f64,
    /// Sequences in the batch.
    pub sequences: usize,
    /// Tokens in the batch.
    pub tokens: usize,
}

/// Name and shape of a trainable parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamSpec {
    /// The PEFT key (or `aux_model_a.weight` / `aux_model_b.weight`).
    pub name: String,
    /// Row-major shape.
    pub shape: Vec<usize>,
}

impl<B: Backend> Model<B> {
    /// Adds fresh LoRA adapters to the `config.targets` projections of every layer, as PEFT
    /// initialises them: `A` kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)),
    /// `B` = 0 (so the model's outputs do not change). An error if any adapter is present.
    pub fn add_lora(&mut self, backend: &B, config: &LoraConfig, seed: u64) -> Result<()> {
        ensure!(config.r > 0, "LoRA rank is 0");
        ensure!(
            (0.0..1.0).contains(&config.dropout),
            "LoRA dropout {} is not in [0, 1)",
            config.dropout
        );
        let layers = self.decoder.num_layers();
        if let Some(picked) = &config.layers {
            ensure!(!picked.is_empty(), "LoRA on no layer");
            if let Some(&bad) = picked.iter().find(|&&i| i >= layers) {
                bail!("LoRA on layer {bad}, but the model has {layers} layers (0..{layers})");
            }
        }
        for i in 0..layers {
            for p in Projection::ALL {
                ensure!(
                    self.decoder.projection(i, p).lora.is_none(),
                    "layer {i} {} already has a LoRA adapter",
                    p.peft_name()
                );
            }
        }
        let _adapters = backend.memory_scope(MemoryUse::Adapters);
        let r = config.r;
        let scale = if config.rslora {
            config.alpha / (r as f32).sqrt()
        } else {
            config.alpha / r as f32
        };
        let mut rng = Rng::new(seed);
        for i in 0..layers {
            if config
                .layers
                .as_ref()
                .is_some_and(|picked| !picked.contains(&i))
            {
                continue;
            }
            for p in Projection::ALL {
                if !config.targets.contains(&p) {
                    continue;
                }
                let linear = self.decoder.projection_mut(i, p);
                let (out_f, in_f) = (linear.weight.out_features, linear.weight.in_features);
                let bound = 1.0 / (in_f as f64).sqrt();
                let a: Vec<f32> = (0..r * in_f)
                    .map(|_| ((2.0 * rng.uniform() - 1.0) * bound) as f32)
                    .collect();
                linear.lora = Some(Lora {
                    a: dense_weight(backend, &a, r, in_f),
                    b: dense_weight(backend, &vec![0.0; out_f * r], out_f, r),
                    scale,
                    dropout: config.dropout,
                });
            }
        }
        Ok(())
    }

    /// Replaces the head by a new score head [num_labels, hidden], weights normal(0, std)
    /// from `seed`: a causal checkpoint becomes a sequence classifier, as transformers'
    /// `*ForSequenceClassification.from_pretrained` on a causal checkpoint does (std 0.02).
    /// `std` 0 gives a zero head, whose first prediction is uniform.
    pub fn add_score_head(&mut self, backend: &B, num_labels: usize, std: f64, seed: u64) {
        let _adapters = backend.memory_scope(MemoryUse::Adapters);
        let hidden = self.spec.decoder.hidden_size;
        self.head = Head::Score(normal_weight(backend, num_labels, hidden, std, seed));
        self.spec.head = HeadKind::SequenceClassification { num_labels };
    }

    /// Adds the two auxiliary identity heads [num_models, hidden] (weights normal(0, 0.02)
    /// from `seed`), replacing any present.
    pub fn add_aux_heads(&mut self, backend: &B, num_models: usize, seed: u64) {
        let _adapters = backend.memory_scope(MemoryUse::Adapters);
        let hidden = self.spec.decoder.hidden_size;
        let mut seeds = Rng::new(seed);
        self.aux_heads = Some(AuxHeads {
            model_a: normal_weight(backend, num_models, hidden, 0.02, seeds.next_u64()),
            model_b: normal_weight(backend, num_models, hidden, 0.02, seeds.next_u64()),
        });
    }

    /// Name and shape of every trainable parameter, in the order of the module comment.
    pub fn trainable_params(&self) -> Vec<ParamSpec> {
        let mut specs = Vec::new();
        for i in 0..self.decoder.num_layers() {
            for p in Projection::ALL {
                if let Some(lora) = &self.decoder.projection(i, p).lora {
                    for (matrix, w) in [('A', &lora.a), ('B', &lora.b)] {
                        specs.push(ParamSpec {
                            name: lora_key(&projection_module(i, p), matrix),
                            shape: vec![w.out_features, w.in_features],
                        });
                    }
                }
            }
        }
        if let Head::Score(w) = &self.head {
            specs.push(ParamSpec {
                name: SCORE_KEY.to_string(),
                shape: vec![w.out_features, w.in_features],
            });
        }
        if let Some(aux) = &self.aux_heads {
            for (name, w) in [
                ("aux_model_a.weight", &aux.model_a),
                ("aux_model_b.weight", &aux.model_b),
            ] {
                specs.push(ParamSpec {
                    name: name.to_string(),
                    shape: vec![w.out_features, w.in_features],
                });
            }
        }
        specs
    }

    /// Values of every trainable parameter, in [`Model::trainable_params`] order.
    pub fn read_params(&self, backend: &B) -> Vec<Vec<f32>> {
        self.trainable_weights()
            .into_iter()
            .map(|w| backend.download(dense_values(w)))
            .collect()
    }

    /// Sets every trainable parameter, in [`Model::trainable_params`] order; panics on a
    /// count or size that differs from it.
    pub fn write_params(&mut self, backend: &B, values: &[Vec<f32>]) {
        let _adapters = backend.memory_scope(MemoryUse::Adapters);
        let mut weights = self.trainable_weights_mut();
        assert_eq!(
            weights.len(),
            values.len(),
            "write_params: {} values for {} trainable parameters",
            values.len(),
            weights.len()
        );
        for (w, v) in weights.iter_mut().zip(values) {
            assert_eq!(
                v.len(),
                w.out_features * w.in_features,
                "write_params: wrong size"
            );
            **w = dense_weight(backend, v, w.out_features, w.in_features);
        }
    }

    /// Mean loss over the sequences of the batch and its gradient w.r.t. every trainable
    /// parameter (same order as [`Model::trainable_params`]), downloaded; an error names the
    /// first parameter whose gradient is not finite.
    ///
    /// On a backend that computes no values (`--emu-alloc-only`,
    /// [`Backend::computes_values`]) the whole forward and backward is still run, allocating
    /// as it would, but nothing is read back: the report's losses are NaN and no gradient is
    /// returned (an empty list).
    pub fn loss_and_grads(
        &self,
        backend: &B,
        batch: &PackedBatch,
        targets: &[Target],
        options: &LossOptions,
    ) -> Result<(LossReport, Vec<Vec<f32>>)> {
        let (report, grads) = self.loss_and_device_grads(backend, batch, targets, options, 1.0)?;
        if !backend.computes_values() {
            return Ok((report, Vec::new()));
        }
        let grads: Vec<Vec<f32>> = grads.iter().map(|g| backend.download(g)).collect();
        for (spec, g) in self.trainable_params().iter().zip(&grads) {
            if let Some(bad) = g.iter().find(|v| !v.is_finite()) {
                bail!("gradient of {} has a non-finite value ({bad})", spec.name);
            }
        }
        Ok((report, grads))
    }

    /// [`Model::loss_and_grads`] with the gradients left on the device and multiplied by
    /// `grad_scale` (the reported losses are not): the training loop's loss scale and the
    /// batch's share of an accumulated step. Gradients are not checked: an f16 overflow under
    /// loss scaling is the caller's to detect (a non-finite global norm) and to skip.
    pub fn loss_and_device_grads(
        &self,
        backend: &B,
        batch: &PackedBatch,
        targets: &[Target],
        options: &LossOptions,
        grad_scale: f32,
    ) -> Result<(LossReport, Vec<B::Buf>)> {
        let sequences = batch.sequences();
        ensure!(
            targets.len() == sequences,
            "{} targets for {sequences} sequences",
            targets.len()
        );
        let Head::Score(score) = &self.head else {
            bail!(
                "{} has no score head to train (add_score_head makes one)",
                self.spec.architecture
            )
        };
        ensure!(
            options.aux_weight == 0.0 || self.aux_heads.is_some(),
            "aux_weight is {} but the model has no auxiliary heads",
            options.aux_weight
        );
        let check_labels = |labels: &[Option<u32>], classes: usize, what: &str| -> Result<()> {
            if let Some(bad) = labels.iter().flatten().find(|&&l| l as usize >= classes) {
                bail!("{what} label {bad} is outside the head's {classes} classes");
            }
            Ok(())
        };
        let winners: Vec<Option<u32>> = targets
            .iter()
            .map(|t| Some(t.winner.index() as u32))
            .collect();
        check_labels(&winners, score.out_features, "preference")?;

        let hidden = self.spec.decoder.hidden_size;
        let (states, trace) = self.decoder.forward_train(
            backend,
            batch,
            options.dropout_seed,
            options.recompute_layers,
        );
        let (_, rows) = self.pooled_rows(batch);
        let head_scope = backend.memory_scope(MemoryUse::LogitsLoss);
        let mut pooled = backend.zeros(sequences * hidden);
        backend.gather_rows(&mut pooled, &states, &rows, hidden);
        drop(states);

        // The loss is a mean over sequences: each row's gradient is scaled by 1 / sequences.
        let per_sequence = grad_scale / sequences as f32;
        let mut d_pooled = backend.zeros(sequences * hidden);
        let mut d_score = {
            let _adapters = backend.memory_scope(MemoryUse::Adapters);
            backend.zeros(score.out_features * hidden)
        };
        let offsets = targets.iter().any(|t| t.offset != [0.0; 3]).then(|| {
            backend.upload_vec(targets.iter().flat_map(|t| t.offset).collect::<Vec<f32>>())
        });
        let pref: Vec<f32> = head_loss_backward(
            backend,
            score,
            &pooled,
            offsets.as_ref(),
            &winners,
            options.label_smoothing,
            per_sequence,
            &mut d_score,
            &mut d_pooled,
        );
        let mut aux_total = 0.0f64;
        let mut aux_grads = Vec::new();
        if let Some(aux) = &self.aux_heads {
            let ids: [Vec<Option<u32>>; 2] = [
                targets.iter().map(|t| t.model_a).collect(),
                targets.iter().map(|t| t.model_b).collect(),
            ];
            for (head, labels) in [&aux.model_a, &aux.model_b].into_iter().zip(&ids) {
                check_labels(labels, head.out_features, "model identity")?;
                let mut d_head = {
                    let _adapters = backend.memory_scope(MemoryUse::Adapters);
                    backend.zeros(head.out_features * hidden)
                };
                let losses = head_loss_backward(
                    backend,
                    head,
                    &pooled,
                    None,
                    labels,
                    0.0,
                    options.aux_weight * per_sequence,
                    &mut d_head,
                    &mut d_pooled,
                );
                aux_total += losses.iter().map(|&l| l as f64).sum::<f64>();
                aux_grads.push(d_head);
            }
        }

        let mut d_states = backend.zeros(batch.tokens() * hidden);
        backend.scatter_add_rows(&mut d_states, &d_pooled, &rows, hidden);
        drop(head_scope);
        let lora_grads = self.decoder.backward(backend, batch, trace, &d_states);
        let report = if backend.computes_values() {
            let pref_loss = pref.iter().map(|&l| l as f64).sum::<f64>() / sequences as f64;
            let aux_loss = aux_total / sequences as f64;
            LossReport {
                loss: pref_loss + options.aux_weight as f64 * aux_loss,
                pref_loss,
                aux_loss,
                sequences,
                tokens: batch.tokens(),
            }
        } else {
            LossReport {
                loss: f64::NAN,
                pref_loss: f64::NAN,
                aux_loss: f64::NAN,
                sequences,
                tokens: batch.tokens(),
            }
        };
        if backend.computes_values() && !report.loss.is_finite() {
            // Name the culprit when it is a parameter; otherwise the activations overflowed.
            let specs = self.trainable_params();
            let values = self.read_params(backend);
            if let Some((spec, _)) = specs
                .iter()
                .zip(&values)
                .find(|(_, v)| v.iter().any(|x| !x.is_finite()))
            {
                bail!(
                    "loss is {}: parameter {} has non-finite values",
                    report.loss,
                    spec.name
                );
            }
            bail!(
                "loss is {} (preference {}, auxiliary {}) with finite parameters",
                report.loss,
                report.pref_loss,
                report.aux_loss
            );
        }
        let grads: Vec<B::Buf> = lora_grads
            .into_iter()
            .chain([d_score])
            .chain(aux_grads)
            .collect();
        Ok((report, grads))
    }

    /// The device buffers of every trainable parameter, in [`Model::trainable_params`]
    /// order: what the device optimizer updates in place.
    pub fn trainable_buffers_mut(&mut self) -> Vec<&mut B::Buf> {
        self.trainable_weights_mut()
            .into_iter()
            .map(|w| match &mut w.data {
                WeightData::Dense(values) => values,
                _ => unreachable!("trainable weights are created dense"),
            })
            .collect()
    }

    /// The trainable weights, in [`Model::trainable_params`] order.
    fn trainable_weights(&self) -> Vec<&Weight<B>> {
        let mut out = Vec::new();
        for i in 0..self.decoder.num_layers() {
            for p in Projection::ALL {
                if let Some(lora) = &self.decoder.projection(i, p).lora {
                    out.extend([&lora.a, &lora.b]);
                }
            }
        }
        if let Head::Score(w) = &self.head {
            out.push(w);
        }
        if let Some(aux) = &self.aux_heads {
            out.extend([&aux.model_a, &aux.model_b]);
        }
        out
    }

    /// The trainable weights, mutable, in [`Model::trainable_params`] order.
    fn trainable_weights_mut(&mut self) -> Vec<&mut Weight<B>> {
        let mut out: Vec<&mut Weight<B>> = Vec::new();
        for lora in self.decoder.adapters_mut() {
            out.extend([&mut lora.a, &mut lora.b]);
        }
        if let Head::Score(w) = &mut self.head {
            out.push(w);
        }
        if let Some(aux) = &mut self.aux_heads {
            out.push(&mut aux.model_a);
            out.push(&mut aux.model_b);
        }
        out
    }
}

/// A trainable weight's buffer: LoRA matrices and heads are always dense f32.
fn dense_values<B: Backend>(w: &Weight<B>) -> &B::Buf {
    let WeightData::Dense(values) = &w.data else {
        unreachable!("trainable weights are created dense")
    };
    values
}

/// A [rows, cols] weight with normal(0, 0.02) entries from `seed`.
fn normal_weight<B: Backend>(
    backend: &B,
    rows: usize,
    cols: usize,
    std: f64,
    seed: u64,
) -> Weight<B> {
    let mut rng = Rng::new(seed);
    let values: Vec<f32> = (0..rows * cols)
        .map(|_| (rng.normal() * std) as f32)
        .collect();
    dense_weight(backend, &values, rows, cols)
}
