//! bf16 projection weights on the CPU (`--quant bf16`, `backend::cpu::bf16`): the error
//! they add to the decoder's f32 hidden states, stated and bounded. The kernels themselves
//! (AVX-512 BF16 and the portable fallback, each against an f64 product) are tested in
//! `backend::cpu::bf16`; here whole models load with bf16 projections and run.
//!
//! The bound: the largest absolute difference of any hidden-state value from the f32
//! model's, relative to the hidden states' RMS, at most `BF16_RELATIVE` (5e-2). Measured:
//! 1.9e-2 (SmolLM2-135M shape) to 3.7e-2 (Gemma 3 270M shape) on random checkpoints
//! (benches/cpu_forward.rs prints it each run); the tiny random models here, and the real
//! checkpoints' mean next-token NLL within `NLL_RELATIVE` (1 %) of transformers' f32.

mod common;

use std::path::Path;
use verdict::backend::cpu::Cpu;
use verdict::backend::WeightData;
use verdict::model::head::next_token_nll;
use verdict::model::peft::Projection;
use verdict::model::{init_checkpoint, Dtype, Family, Model, PackedBatch};
use verdict::quant::Quant;

const BF16_RELATIVE: f32 = 5e-2;
const NLL_RELATIVE: f32 = 1e-2;

/// Largest |a - b| over the RMS of `b`.
fn relative_error(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let rms = (b.iter().map(|v| v * v).sum::<f32>() / b.len() as f32).sqrt();
    let worst = a
        .iter()
        .zip(b)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    worst / rms
}

fn load(dir: &Path, quant: Quant) -> Model<Cpu> {
    Model::load(&Cpu, dir, None, quant).unwrap_or_else(|e| panic!("{}: {e:#}", dir.display()))
}

/// Catches a bf16 load that silently keeps f32 (the error would be ~1e-7, and the storage
/// check fails), a wrong packing or kernel (errors of order 1), and a family whose
/// projections skip the bf16 path.
#[test]
fn bf16_weights_stay_within_the_stated_bound_of_f32_on_every_family() {
    let dir = tempfile::tempdir().unwrap();
    for family in [Family::Llama, Family::Gemma2, Family::Gemma3] {
        let dir = dir.path().join(family.to_string());
        init_checkpoint(family, "tiny", 3, &dir, Dtype::F32).unwrap();
        let (f32_model, bf16_model) = (load(&dir, Quant::None), load(&dir, Quant::Bf16));
        for p in Projection::ALL {
            assert!(
                matches!(
                    bf16_model.decoder.projection(0, p).weight.data,
                    WeightData::Bf16(_)
                ),
                "{family}: {p:?} is not held in bf16"
            );
        }
        let batch = PackedBatch::new(&[vec![5u32, 17, 3, 250, 9, 1], vec![7, 7, 100]]);
        let exact = f32_model.hidden_states(&Cpu, &batch);
        let rounded = bf16_model.hidden_states(&Cpu, &batch);
        let error = relative_error(&rounded, &exact);
        eprintln!("{family}: bf16 vs f32 hidden states, max |diff| / RMS = {error:.2e}");
        assert!(
            error <= BF16_RELATIVE,
            "{family}: bf16 hidden states {error} of the RMS from f32 (> {BF16_RELATIVE})"
        );
        assert!(error > 1e-4, "{family}: no bf16 rounding visible ({error})");
    }
}

/// The real checkpoints (when `tools/fetch-models.sh` has fetched them) with bf16
/// projections: mean next-token NLL of the real_models.rs text within 1 % of transformers'
/// f32 value, so the bound above also holds where weights are trained, not random.
#[test]
fn real_checkpoints_with_bf16_weights_keep_the_next_token_loss() {
    for folder in ["smollm2-135m-instruct", "gemma3-270m"] {
        let dir = verdict::demo::fetched_models_dir().join(folder);
        if !dir.join("model.safetensors").is_file() {
            common::skip(
                &format!("bf16 weights on {folder}"),
                &format!("{} not present; run tools/fetch-models.sh", dir.display()),
            );
            continue;
        }
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/real")
            .join(format!("{folder}.json"));
        let reference: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&fixture).unwrap()).unwrap();
        let ids: Vec<u32> = serde_json::from_value(reference["ids"].clone()).unwrap();
        let expected = reference["mean_nll"].as_f64().unwrap() as f32;
        let model = load(&dir, Quant::Bf16);
        let batch = PackedBatch::new(&[ids.as_slice()]);
        let hidden = model.hidden_states(&Cpu, &batch);
        let logits = model.lm_logits(&Cpu, &hidden, ids.len()).unwrap();
        let nll = next_token_nll(&logits, model.spec.decoder.vocab_size, &ids).unwrap();
        let relative = (nll - expected).abs() / expected;
        eprintln!("{folder}: bf16 weights, mean NLL {nll:.5} vs transformers f32 {expected:.5} ({relative:.2e} relative)");
        assert!(
            relative <= NLL_RELATIVE,
            "{folder}: mean NLL {nll} with bf16 weights vs {expected} in f32"
        );
    }
}
