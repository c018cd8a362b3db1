//! Whole-model cases: the tiny checkpoints of tests/fixtures/models, GPU against CPU: their
//! forward, and one training step of each f32 one (loss and every trainable gradient).

use super::{
    flash_model_tolerance, flash_train_tolerance, nf4_model_tolerance, Harness, DEFAULT_MODELS_DIR,
    F32_MODEL_TOLERANCE,
};
use crate::backend::cpu::Cpu;
use crate::backend::cuda::nf4::MmaOperands;
use crate::backend::Backend;
use crate::data::Winner;
use crate::model::peft::Projection;
use crate::model::trainable::{LoraConfig, LossOptions, Target};
use crate::model::{HeadKind, Model, PackedBatch};
use crate::quant::nf4::Nf4Options;
use crate::quant::Quant;
use crate::rng::Rng;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// Hidden states of every token and the head's logits (score logits, or LM logits of every
/// token for a causal checkpoint) for `batch`.
fn model_outputs<B: Backend>(
    b: &B,
    dir: &Path,
    adapter: Option<&Path>,
    quant: Quant,
    batch: &PackedBatch,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let model = Model::load(b, dir, adapter, quant)?;
    let hidden = model.hidden_states(b, batch);
    let logits = match model.classify(b, batch).logits {
        Some(logits) => logits.concat(),
        None => model.lm_logits(b, &hidden, batch.tokens())?,
    };
    Ok((b.download(&hidden), logits))
}

/// The fixture at `dir` made trainable as `verdict train` makes it (a 3-class score head if
/// it has none, LoRA rank 4 with dropout on all seven projections, the auxiliary heads),
/// with `values` written into its trainable parameters (fresh random values: a new adapter's
/// B is zero, which would hide every gradient of A).
fn trainable_fixture<B: Backend>(
    b: &B,
    dir: &Path,
    values: Option<&[Vec<f32>]>,
) -> Result<Model<B>> {
    let mut model = Model::load(b, dir, None, Quant::None)?;
    if model.spec.head != (HeadKind::SequenceClassification { num_labels: 3 }) {
        model.add_score_head(b, 3, 0.02, 1);
    }
    let lora = LoraConfig {
        r: 4,
        alpha: 8.0,
        targets: Projection::ALL.to_vec(),
        rslora: false,
        dropout: 0.1,
        layers: None,
    };
    model.add_lora(b, &lora, 2)?;
    model.add_aux_heads(b, TRAINING_MODEL_NAMES, 3);
    if let Some(values) = values {
        model.write_params(b, values);
    }
    Ok(model)
}

/// Model identities of the auxiliary heads in the training cases.
const TRAINING_MODEL_NAMES: usize = 5;

/// The training cases' loss: smoothed labels, the auxiliary heads on, LoRA dropout, layers
/// recomputed in backward (what `verdict train` does).
const TRAINING_OPTIONS: LossOptions = LossOptions {
    label_smoothing: 0.1,
    aux_weight: 0.2,
    recompute_layers: true,
    dropout_seed: 17,
};

/// Every preference class, random model identities (model B unknown for odd sequences).
fn training_targets(rng: &mut Rng, sequences: usize) -> Vec<Target> {
    (0..sequences)
        .map(|i| Target {
            winner: Winner::ALL[i % 3],
            offset: [0.0; 3],
            model_a: Some(rng.below(TRAINING_MODEL_NAMES) as u32),
            model_b: (i % 2 == 0).then(|| rng.below(TRAINING_MODEL_NAMES) as u32),
        })
        .collect()
}

/// One training step of the f32 fixture at `folder` on both devices — the loss, and the
/// gradient of every trainable parameter through every backward op, as `verdict train
/// --device cuda` computes them — checked against each other.
fn training_case(h: &mut Harness, folder: &Path, name: &str, batch: &PackedBatch) {
    let case = format!("{name} lora r=4 all projections, three heads");
    let operands = MmaOperands::for_arch(h.cuda.info().compute_capability);
    let (dtype, tolerance) = (operands.name(), flash_train_tolerance(operands));
    let shapes = match trainable_fixture(&Cpu, folder, None) {
        Ok(model) => model.read_params(&Cpu),
        Err(e) => return h.broken("train step", dtype, case, tolerance, [e]),
    };
    let values: Vec<Vec<f32>> = shapes.iter().map(|p| h.random(p.len(), 0.05)).collect();
    let targets = training_targets(&mut h.rng, batch.sequences());
    let (cpu, gpu) = on_both!(h, |b| trainable_fixture(b, folder, Some(&values))
        .and_then(|model| model.loss_and_grads(b, batch, &targets, &TRAINING_OPTIONS)));
    match (cpu, gpu) {
        (Ok((cpu_report, cpu_grads)), Ok((gpu_report, gpu_grads))) => {
            h.record(
                "train loss",
                dtype,
                case.clone(),
                &[cpu_report.loss as f32],
                &[gpu_report.loss as f32],
                tolerance,
            );
            h.record(
                "train grads",
                dtype,
                case,
                &cpu_grads.concat(),
                &gpu_grads.concat(),
                tolerance,
            );
        }
        (cpu, gpu) => h.broken(
            "train step",
            dtype,
            case,
            tolerance,
            [cpu.err(), gpu.err()].into_iter().flatten(),
        ),
    }
}

/// Whole-model parity on every fixture folder; returns why it was skipped, if it was.
pub(super) fn model_cases(h: &mut Harness, models: Option<&Path>) -> Option<String> {
    let dir = models.unwrap_or(Path::new(DEFAULT_MODELS_DIR));
    let folders = match model_folders(dir) {
        Ok(folders) => folders,
        Err(e) if models.is_none() => {
            let why = format!("{e:#} (run from the repository root, or pass --models)");
            println!("SKIP model parity: {why}");
            return Some(why);
        }
        Err(e) => {
            h.record(
                "model",
                "f32",
                format!("{}", dir.display()),
                &[],
                &[f32::NAN],
                F32_MODEL_TOLERANCE,
            );
            eprintln!("error: {e:#}");
            return None;
        }
    };
    for folder in folders {
        let name = folder
            .file_name()
            .map_or(String::new(), |n| n.to_string_lossy().into_owned());
        let adapter = folder.join("adapter");
        let adapter = adapter.is_dir().then_some(adapter);
        let (vocab, stored_nf4) = match crate::model::ModelSpec::read(&folder) {
            Ok(spec) => (spec.decoder.vocab_size, spec.bnb_4bit.is_some()),
            Err(e) => {
                eprintln!("error: {}: {e:#}", folder.display());
                h.record("model", "f32", name, &[], &[f32::NAN], F32_MODEL_TOLERANCE);
                continue;
            }
        };
        let lengths = [1usize, 9, 37];
        let sequences: Vec<Vec<u32>> = lengths
            .iter()
            .map(|&n| (0..n).map(|_| h.rng.below(vocab) as u32).collect())
            .collect();
        let batch = PackedBatch::new(&sequences);
        let mut variants = vec![(None, Quant::None, "base")];
        if adapter.is_some() {
            variants.push((adapter.as_deref(), Quant::None, "adapter"));
        }
        variants.push((None, Quant::Nf4(Nf4Options::default()), "nf4"));
        for (adapter, quant, label) in variants {
            // NF4 projections (quantized on load, or a bnb-4bit checkpoint) of these 47 rows
            // run on tensor cores.
            // Attention runs on tensor cores in every model.
            let operands = MmaOperands::for_arch(h.cuda.info().compute_capability);
            let tolerance = if quant != Quant::None || stored_nf4 {
                nf4_model_tolerance(operands)
            } else {
                flash_model_tolerance(operands)
            };
            let dtype = operands.name();
            let case = format!("{name} {label} lengths={lengths:?}");
            let cpu = model_outputs(&Cpu, &folder, adapter, quant, &batch);
            let gpu = model_outputs(&h.cuda, &folder, adapter, quant, &batch);
            match (cpu, gpu) {
                (Ok((cpu_hidden, cpu_logits)), Ok((gpu_hidden, gpu_logits))) => {
                    h.record(
                        "model hidden",
                        dtype,
                        case.clone(),
                        &cpu_hidden,
                        &gpu_hidden,
                        tolerance,
                    );
                    h.record(
                        "model logits",
                        dtype,
                        case,
                        &cpu_logits,
                        &gpu_logits,
                        tolerance,
                    );
                }
                (cpu, gpu) => h.broken(
                    "model",
                    dtype,
                    case,
                    tolerance,
                    [cpu.err(), gpu.err()].into_iter().flatten(),
                ),
            }
        }
        if !stored_nf4 {
            training_case(h, &folder, &name, &batch);
        }
    }
    None
}

/// The sub-folders of `dir` holding a config.json, sorted.
fn model_folders(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut folders: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("no model fixtures at {}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.join("config.json").is_file())
        .collect();
    folders.sort();
    if folders.is_empty() {
        bail!("no model folder (with config.json) in {}", dir.display());
    }
    Ok(folders)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn training_cases_train_every_f32_fixture_on_the_cpu() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_MODELS_DIR);
        let mut rng = Rng::new(5);
        let mut trained = 0;
        for folder in model_folders(&dir).unwrap() {
            let spec = crate::model::ModelSpec::read(&folder).unwrap();
            if spec.bnb_4bit.is_some() {
                continue;
            }
            let shapes = trainable_fixture(&Cpu, &folder, None)
                .unwrap()
                .read_params(&Cpu);
            let values: Vec<Vec<f32>> = shapes
                .iter()
                .map(|p| (0..p.len()).map(|_| rng.normal() as f32 * 0.05).collect())
                .collect();
            let model = trainable_fixture(&Cpu, &folder, Some(&values)).unwrap();
            let sequences: Vec<Vec<u32>> = [1usize, 9, 37]
                .iter()
                .map(|&n| {
                    (0..n)
                        .map(|_| rng.below(spec.decoder.vocab_size) as u32)
                        .collect()
                })
                .collect();
            let batch = PackedBatch::new(&sequences);
            let targets = training_targets(&mut rng, batch.sequences());
            let (report, grads) = model
                .loss_and_grads(&Cpu, &batch, &targets, &TRAINING_OPTIONS)
                .unwrap();
            assert!(report.loss.is_finite(), "{}", folder.display());
            for (spec, grad) in model.trainable_params().iter().zip(&grads) {
                assert!(
                    grad.iter().all(|g| g.is_finite()) && grad.iter().any(|&g| g != 0.0),
                    "{}: gradient of {} is zero or not finite",
                    folder.display(),
                    spec.name
                );
            }
            trained += 1;
        }
        assert!(trained >= 5, "only {trained} f32 fixtures");
    }
}
