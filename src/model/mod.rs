//! Checkpoints and the model: HF config and safetensors in, a decoder with LoRA adapters and
//! a head out.
//!
//! Data flow: `config` (config.json -> `ModelSpec`) -> `weights` (safetensors -> f32 tensors)
//! -> `decoder` (ids -> final-norm hidden states, on a `Backend`) with `lora` on every
//! projection -> `head` (pooled score logits, or LM logits). `logits` is the `verdict logits`
//! entry point; `init` writes random checkpoints with real shapes.

pub mod config;
pub mod decoder;
pub mod head;
pub mod init;
pub mod inspect;
pub mod logits;
pub mod lora;
pub mod peft;
pub mod trainable;
pub mod weights;

pub use config::{Family, HeadKind, ModelSpec};
pub use decoder::{Decoder, PackedBatch};
pub use head::{pooled_index, AuxHeads, Head, LmHead};
pub use init::{init_checkpoint, write_checkpoint, Values};
pub use logits::run_logits;
pub use weights::Dtype;

use crate::backend::Backend;
use crate::quant::Quant;
use anyhow::{bail, ensure, Context, Result};
use config::HfConfig;
use lora::{dense_weight, dense_weight_from_vec};
use peft::Adapter;
use std::path::Path;
use weights::Checkpoint;

/// A loaded checkpoint: decoder plus head, optionally adapted.
pub struct Model<B: Backend> {
    /// The normalised configuration.
    pub spec: ModelSpec,
    /// Embedding, layers, final norm.
    pub decoder: Decoder<B>,
    /// Score head or LM head.
    pub head: Head<B>,
    /// The auxiliary identity heads, while training with `--heads three`.
    pub aux_heads: Option<AuxHeads<B>>,
}

/// Per-sequence classifier outputs of a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Classified {
    /// The pooled token of each sequence (index within the sequence).
    pub pooled_index: Vec<usize>,
    /// Final-norm hidden state at the pooled token, one [hidden] per sequence.
    pub hidden: Vec<Vec<f32>>,
    /// Score logits, one [num_labels] per sequence; `None` for a model without score head.
    pub logits: Option<Vec<Vec<f32>>>,
}

/// Refuses a config.json whose `num_hidden_layers` differs from the layers the checkpoint
/// holds (`model.layers.N.*`), before `num_hidden_layers` sizes anything.
fn check_layer_count(path: &Path, config: &HfConfig, checkpoint: &Checkpoint) -> Result<()> {
    let Some(declared) = config.num_hidden_layers else {
        return Ok(()); // ModelSpec::from_file names the missing key
    };
    let present = checkpoint
        .names()
        .filter_map(|n| {
            n.split_once("layers.")?
                .1
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .max()
        .map_or(0, |top| top + 1);
    ensure!(
        declared == present,
        "{}: num_hidden_layers is {declared}, but the checkpoint holds {present} layers \
         (model.layers.0 ..= {})",
        path.display(),
        present as i64 - 1
    );
    Ok(())
}

impl<B: Backend> Model<B> {
    /// Loads an HF folder, with the PEFT LoRA adapter in `adapter_dir` applied unmerged and
    /// the decoder's projections held as `quant` says (a bitsandbytes 4-bit checkpoint, told
    /// by its config.json, is NF4 whatever `quant` says).
    pub fn load(
        backend: &B,
        model_dir: &Path,
        adapter_dir: Option<&Path>,
        quant: Quant,
    ) -> Result<Model<B>> {
        let _weights = backend.memory_scope(crate::backend::MemoryUse::Weights);
        // The checkpoint's tensor index first: a config's sizes are checked against the
        // tensors present before anything is allocated from them.
        let mut checkpoint = Checkpoint::open_dir(model_dir)?;
        let config_path = model_dir.join("config.json");
        let config = HfConfig::read(&config_path)?;
        check_layer_count(&config_path, &config, &checkpoint)?;
        let mut spec = ModelSpec::from_file(&config_path, &config)?;
        if !checkpoint.holds_values() {
            ensure!(
                !backend.computes_values(),
                "{}: this checkpoint holds shapes but no values (written by `verdict init \
                 --no-values`; its data region is a hole, marked in the safetensors metadata); \
                 only an allocation-only emulated device (--device emu --emu-alloc-only) loads it",
                model_dir.display()
            );
            checkpoint.allow_placeholders();
        }
        if spec.bnb_4bit.is_none() {
            if let Some(name) = checkpoint
                .names()
                .find(|n| n.contains(".quant_state.bitsandbytes__"))
            {
                bail!(
                    "{}: tensor {name} is bitsandbytes-quantized, but config.json has no quantization_config",
                    model_dir.display()
                );
            }
        }
        let mut adapter = adapter_dir.map(Adapter::open).transpose()?;
        let decoder = Decoder::load(
            backend,
            spec.decoder.clone(),
            &mut checkpoint,
            adapter.as_mut(),
            quant,
            matches!(spec.head, HeadKind::CausalLm { .. }) && spec.tie_word_embeddings,
        )
        .with_context(|| format!("loading {} from {}", spec.architecture, model_dir.display()))?;
        let hidden = spec.decoder.hidden_size;
        let head = match spec.head {
            HeadKind::SequenceClassification { num_labels } => {
                let shape = [num_labels, hidden];
                let saved = match adapter.as_mut() {
                    Some(a) => a.take_saved_module("score", &shape)?,
                    None => None,
                };
                // The base score must be present even when the adapter replaces it.
                let base = checkpoint.take("score.weight", &shape)?;
                Head::Score(dense_weight(
                    backend,
                    &saved.unwrap_or(base),
                    num_labels,
                    hidden,
                ))
            }
            HeadKind::CausalLm {
                final_logit_softcap,
            } => {
                // A classifier trained from a causal base (`verdict train`, or PEFT's SEQ_CLS on
                // an AutoModelForSequenceClassification of it) saves its new score head in the
                // adapter: the model is then that classifier, as transformers + PEFT load it.
                let classes = crate::data::Winner::ALL.len();
                let saved = match adapter.as_mut() {
                    Some(a) => a.take_saved_module("score", &[classes, hidden])?,
                    None => None,
                };
                if let Some(score) = saved {
                    spec.head = HeadKind::SequenceClassification {
                        num_labels: classes,
                    };
                    Head::Score(dense_weight(backend, &score, classes, hidden))
                } else {
                    let weight = if spec.tie_word_embeddings {
                        None
                    } else {
                        let vocab = spec.decoder.vocab_size;
                        Some(dense_weight_from_vec(
                            backend,
                            checkpoint.take("lm_head.weight", &[vocab, hidden])?,
                            vocab,
                            hidden,
                        ))
                    };
                    Head::Lm(LmHead {
                        weight,
                        softcap: final_logit_softcap,
                    })
                }
            }
        };
        if let Some(a) = &adapter {
            a.finish()?;
        }
        // transformers ignores an `lm_head.weight` it does not use (tied, or a classifier
        // made from a causal checkpoint) and never reads old `rotary_emb.inv_freq` buffers.
        checkpoint
            .finish(|name| name == "lm_head.weight" || name.ends_with("rotary_emb.inv_freq"))?;
        Ok(Model {
            spec,
            decoder,
            head,
            aux_heads: None,
        })
    }

    /// Final-norm hidden states [tokens, hidden] of a packed batch.
    pub fn hidden_states(&self, backend: &B, batch: &PackedBatch) -> B::Buf {
        self.decoder.forward(backend, batch)
    }

    /// The pooled token of each sequence of `batch`: its index within the sequence and its
    /// row in the packed batch.
    fn pooled_rows(&self, batch: &PackedBatch) -> (Vec<usize>, Vec<usize>) {
        let pooled_index: Vec<usize> = (0..batch.sequences())
            .map(|s| pooled_index(batch.sequence(s), self.spec.pad_token_id))
            .collect();
        let rows = pooled_index
            .iter()
            .enumerate()
            .map(|(s, &i)| batch.cu_seqlens[s] + i)
            .collect();
        (pooled_index, rows)
    }

    /// Pooled token, its hidden state and score logits for each sequence of `batch`.
    pub fn classify(&self, backend: &B, batch: &PackedBatch) -> Classified {
        let hidden_size = self.spec.decoder.hidden_size;
        let all = self.hidden_states(backend, batch);
        let (pooled_index, rows) = self.pooled_rows(batch);
        let mut pooled = backend.zeros(rows.len() * hidden_size);
        backend.gather_rows(&mut pooled, &all, &rows, hidden_size);
        let logits = match &self.head {
            Head::Score(score) => {
                let logits = head::score_logits(backend, score, &pooled, rows.len());
                Some(
                    backend
                        .download(&logits)
                        .chunks(score.out_features)
                        .map(<[f32]>::to_vec)
                        .collect(),
                )
            }
            Head::Lm(_) => None,
        };
        let hidden = backend
            .download(&pooled)
            .chunks(hidden_size)
            .map(<[f32]>::to_vec)
            .collect();
        Classified {
            pooled_index,
            hidden,
            logits,
        }
    }

    /// LM logits [tokens, vocab] for every token of `hidden` (final-norm hidden states of
    /// `tokens` tokens); an error for a classifier.
    pub fn lm_logits(&self, backend: &B, hidden: &B::Buf, tokens: usize) -> Result<Vec<f32>> {
        match &self.head {
            Head::Lm(lm) => {
                Ok(backend.download(&lm.logits(backend, &self.decoder, hidden, tokens)))
            }
            Head::Score(_) => bail!("{} has no LM head", self.spec.architecture),
        }
    }

    /// Folds every LoRA adapter into the base weights (same outputs, no adapter cost).
    pub fn merge_adapters(&mut self, backend: &B) {
        self.decoder.merge_adapters(backend);
    }
}
