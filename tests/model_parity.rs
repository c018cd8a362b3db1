//! Parity with transformers 5.23: each fixture in `tests/fixtures/models/<case>/` is an HF
//! checkpoint saved with `save_pretrained` plus `expected.json` (outputs of transformers in
//! f32). Every case is checked with inputs run one by one and all packed in one batch, with
//! and without its PEFT adapter, at 1e-3 absolute on the pooled final-norm hidden state,
//! the score logits, the causal next-token NLL and the last-token LM logits.
//!
//! Which deliberate mistake each test catches. `feature_deltas` in expected.json records how
//! far transformers' own output moves when a feature is switched off (all ≫ 1e-3). Those
//! marked (tried) were put into the code and made the named tests fail:
//! - `gemma2_*`: attention soft-cap missing (tried), or applied to the unscaled `q·k`
//!   (tried); sliding window off by one, `q - w <= k` (tried); `head_dim^-0.5` instead of
//!   `query_pre_attn_scalar^-0.5` (tried); `w` instead of `1 + w` in RMSNorm (tried);
//!   post-attention/post-feedforward norms missing (tried); `final_logit_softcapping` on the
//!   score head (tried) or missing from the LM head; shards/index not followed; bf16 not
//!   widened exactly; LoRA scale, keys or the adapter's saved `score` ignored.
//! - `gemma3_*`: RoPE bases of local and global layers swapped (tried); QK-norm missing;
//!   every 6th layer not global; `Gemma3TextForSequenceClassification` not recognised.
//! - `llama_*`: llama3 rope scaling ignored (tried); pooling at the last position instead of
//!   the rightmost non-pad id (tried); rsLoRA scale `alpha / r` (tried); interleaved instead
//!   of rotate_half RoPE (tried: fails every case); `hidden / heads` as head_dim (tried:
//!   every case fails on tensor shapes); untied `lm_head.weight` ignored.
//! - packed runs (inside every case): attention crossing sequence boundaries (tried).
//!   Positions that do not restart per sequence change nothing measurable: RoPE scores
//!   depend only on position differences, so only cross-sequence attention matters.
//! - Soft-cap *after* masking cannot happen in the CPU reference (masked keys are skipped);
//!   a kernel with an additive -inf mask would give masked keys weight e^-cap, which these
//!   same fixtures catch through the CUDA backend.
//! - `legacy_configs_*`: classic keys (`rope_theta`, `rope_scaling`, `torch_dtype`) read
//!   differently from transformers-5 keys (`rope_parameters`, `dtype`).

mod common;

use serde::Deserialize;
use std::path::{Path, PathBuf};
use verdict::backend::cpu::Cpu;
use verdict::backend::placement::Placement;
use verdict::model::config::HfConfig;
use verdict::model::head::next_token_nll;
use verdict::model::logits::LogitsOptions;
use verdict::model::{Model, ModelSpec, PackedBatch};
use verdict::quant::Quant;

const TOLERANCE: f32 = 1e-3;

#[derive(Deserialize)]
struct Input {
    ids: Vec<u32>,
}

#[derive(Deserialize)]
struct Outputs {
    hidden: Vec<Vec<f32>>,
    logits: Option<Vec<Vec<f32>>>,
    lm_nll: Option<Vec<Option<f32>>>,
    lm_last_logits: Option<Vec<Vec<f32>>>,
}

#[derive(Deserialize)]
struct Expected {
    architecture: String,
    inputs: Vec<Input>,
    pooled_index: Vec<usize>,
    #[serde(flatten)]
    base: Outputs,
    adapter: Option<Outputs>,
}

fn case_dir(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models")
        .join(case)
}

fn expected(case: &str) -> Expected {
    let path = case_dir(case).join("expected.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// Our outputs for `sequences` run as one packed batch, in the shape of `Outputs`.
fn run(model: &Model<Cpu>, sequences: &[&[u32]]) -> (Vec<usize>, Outputs) {
    let batch = PackedBatch::new(sequences);
    let classified = model.classify(&Cpu, &batch);
    let is_causal = classified.logits.is_none();
    let (lm_nll, lm_last_logits) = if is_causal {
        let hidden = model.hidden_states(&Cpu, &batch);
        let logits = model.lm_logits(&Cpu, &hidden, batch.tokens()).unwrap();
        let vocab = model.spec.decoder.vocab_size;
        let mut nll = Vec::new();
        let mut last = Vec::new();
        for s in 0..batch.sequences() {
            let rows = &logits[batch.cu_seqlens[s] * vocab..batch.cu_seqlens[s + 1] * vocab];
            nll.push(next_token_nll(rows, vocab, batch.sequence(s)));
            last.push(rows[rows.len() - vocab..].to_vec());
        }
        (Some(nll), Some(last))
    } else {
        (None, None)
    };
    (
        classified.pooled_index,
        Outputs {
            hidden: classified.hidden,
            logits: classified.logits,
            lm_nll,
            lm_last_logits,
        },
    )
}

/// Largest difference per output kind; panics on a structural mismatch.
fn compare(ours: &Outputs, theirs: &Outputs) -> Vec<(&'static str, f32)> {
    let worst = |a: &[Vec<f32>], b: &[Vec<f32>]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| common::max_abs_diff(x, y, "length"))
            .fold(0.0, f32::max)
    };
    let mut diffs = vec![("hidden", worst(&ours.hidden, &theirs.hidden))];
    match (&ours.logits, &theirs.logits) {
        (Some(a), Some(b)) => diffs.push(("logits", worst(a, b))),
        (None, None) => {}
        _ => panic!("score logits present on one side only"),
    }
    match (&ours.lm_nll, &theirs.lm_nll) {
        (Some(a), Some(b)) => {
            let d = a.iter().zip(b).map(|(x, y)| match (x, y) {
                (Some(x), Some(y)) => (x - y).abs(),
                (None, None) => 0.0,
                _ => panic!("NLL defined on one side only"),
            });
            diffs.push(("lm_nll", d.fold(0.0, f32::max)));
        }
        (None, None) => {}
        _ => panic!("lm_nll present on one side only"),
    }
    match (&ours.lm_last_logits, &theirs.lm_last_logits) {
        (Some(a), Some(b)) => diffs.push(("lm_last_logits", worst(a, b))),
        (None, None) => {}
        _ => panic!("lm_last_logits present on one side only"),
    }
    diffs
}

/// Checks `case` (with its adapter if `with_adapter`), inputs alone and packed.
fn check(case: &str, with_adapter: bool) {
    let exp = expected(case);
    let dir = case_dir(case);
    let adapter_dir = dir.join("adapter");
    let adapter = with_adapter.then_some(adapter_dir.as_path());
    let model = Model::load(&Cpu, &dir, adapter, Quant::None).unwrap();
    assert_eq!(model.spec.architecture, exp.architecture);
    let theirs = if with_adapter {
        exp.adapter.as_ref().expect("case has no adapter outputs")
    } else {
        &exp.base
    };
    let sequences: Vec<&[u32]> = exp.inputs.iter().map(|i| i.ids.as_slice()).collect();

    let mut report = Vec::new();
    for (i, seq) in sequences.iter().enumerate() {
        let (pooled, ours) = run(&model, &[seq]);
        assert_eq!(
            pooled[0], exp.pooled_index[i],
            "{case}: pooled index of input {i}"
        );
        let one = Outputs {
            hidden: vec![theirs.hidden[i].clone()],
            logits: theirs.logits.as_ref().map(|l| vec![l[i].clone()]),
            lm_nll: theirs.lm_nll.as_ref().map(|l| vec![l[i]]),
            lm_last_logits: theirs.lm_last_logits.as_ref().map(|l| vec![l[i].clone()]),
        };
        report.push(("alone", compare(&ours, &one)));
    }
    let (pooled, ours) = run(&model, &sequences);
    assert_eq!(pooled, exp.pooled_index, "{case}: pooled indices, packed");
    report.push(("packed", compare(&ours, theirs)));

    let label = if with_adapter {
        format!("{case}+adapter")
    } else {
        case.to_string()
    };
    for (how, diffs) in &report {
        for (what, d) in diffs {
            assert!(
                *d <= TOLERANCE,
                "{label} ({how}): max |Δ {what}| = {d} > {TOLERANCE}"
            );
        }
    }
    let packed = &report.last().unwrap().1;
    eprintln!(
        "{label}: max |Δ| {}",
        packed
            .iter()
            .map(|(w, d)| format!("{w} {d:.2e}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
}

#[test]
fn gemma2_seqcls_matches_transformers() {
    check("gemma2_seqcls", false);
}

#[test]
fn gemma2_seqcls_with_adapter_matches_transformers() {
    check("gemma2_seqcls", true);
}

#[test]
fn gemma2_causal_bf16_sharded_matches_transformers() {
    check("gemma2_causal_bf16_sharded", false);
}

#[test]
fn gemma3_causal_matches_transformers() {
    check("gemma3_causal", false);
}

#[test]
fn gemma3_seqcls_matches_transformers() {
    check("gemma3_seqcls", false);
}

#[test]
fn llama_seqcls_matches_transformers() {
    check("llama_seqcls", false);
}

#[test]
fn llama_seqcls_with_rslora_adapter_matches_transformers() {
    check("llama_seqcls", true);
}

#[test]
fn llama_causal_matches_transformers() {
    check("llama_causal", false);
}

#[test]
fn merged_adapter_gives_the_unmerged_outputs() {
    for case in ["gemma2_seqcls", "llama_seqcls"] {
        let dir = case_dir(case);
        let exp = expected(case);
        let sequences: Vec<&[u32]> = exp.inputs.iter().map(|i| i.ids.as_slice()).collect();
        let mut model = Model::load(&Cpu, &dir, Some(&dir.join("adapter")), Quant::None).unwrap();
        let (_, unmerged) = run(&model, &sequences);
        model.merge_adapters(&Cpu);
        let (_, merged) = run(&model, &sequences);
        for (what, d) in compare(&merged, &unmerged) {
            assert!(d <= 1e-5, "{case}: merged vs unmerged {what}: {d}");
        }
    }
}

#[test]
fn legacy_configs_give_the_same_spec_as_transformers5_configs() {
    for case in ["gemma2_seqcls", "gemma3_causal", "llama_seqcls"] {
        let dir = case_dir(case);
        let legacy =
            ModelSpec::from_hf(&HfConfig::read(&dir.join("config.legacy.json")).unwrap()).unwrap();
        assert_eq!(legacy, ModelSpec::read(&dir).unwrap(), "{case}");
    }
}

#[test]
fn logits_entry_point_writes_one_line_per_input() {
    let dir = case_dir("gemma2_seqcls");
    let exp = expected("gemma2_seqcls");
    let tmp = tempfile::tempdir().unwrap();
    let ids = tmp.path().join("ids.jsonl");
    let lines: Vec<String> = exp
        .inputs
        .iter()
        .map(|i| format!("{{\"ids\": {:?}, \"id\": \"x\"}}", i.ids))
        .collect();
    std::fs::write(&ids, lines.join("\n")).unwrap();
    let rows: Vec<serde_json::Value> = cpu_logits(&dir, &ids, true)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), exp.inputs.len());
    for (row, (logits, hidden)) in rows
        .iter()
        .zip(exp.base.logits.unwrap().iter().zip(&exp.base.hidden))
    {
        let got = |k: &str| -> Vec<f32> { serde_json::from_value(row[k].clone()).unwrap() };
        assert!(common::max_abs_diff(&got("logits"), logits, "length") <= TOLERANCE);
        assert!(common::max_abs_diff(&got("hidden"), hidden, "length") <= TOLERANCE);
    }

    std::fs::write(&ids, "{\"ids\": [1, 2]}\n{\"ids\": [1, 99999]}\n").unwrap();
    let err = cpu_logits(&dir, &ids, false).unwrap_err();
    assert!(err.to_string().contains("ids.jsonl:2"), "{err}");
}

#[test]
fn causal_checkpoint_gives_null_logits_line() {
    let dir = case_dir("llama_causal");
    let tmp = tempfile::tempdir().unwrap();
    let ids = tmp.path().join("ids.jsonl");
    std::fs::write(&ids, "{\"ids\": [3, 4, 5]}\n").unwrap();
    assert_eq!(
        cpu_logits(&dir, &ids, false).unwrap(),
        "{\"logits\":null}\n"
    );
}

/// What `verdict logits --model DIR --ids IDS [--hidden]` prints, on the CPU.
fn cpu_logits(dir: &Path, ids: &Path, hidden: bool) -> anyhow::Result<String> {
    let mut out = Vec::new();
    let options = LogitsOptions {
        hidden,
        ..Default::default()
    };
    let placement = Placement::Cpu;
    verdict::model::run_logits(&placement, dir, None, Quant::None, ids, options, &mut out)?;
    Ok(String::from_utf8(out)?)
}
