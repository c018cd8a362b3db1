//! The response-embedding probe on a tiny model and rows of the built-in sample: an
//! embedding is the mean of the decoder's hidden states over the response's own tokens
//! whatever batch it was packed in; `probe cv`, `probe fit` and `probe predict` run end to
//! end; and exchanging the responses of every battle exchanges the predicted A and B
//! probabilities.

mod common;

use std::path::{Path, PathBuf};
use verdict::backend::cpu::Cpu;
use verdict::backend::Backend;
use verdict::data::format::{FormatOptions, Formatter};
use verdict::data::{read_battles, ReadOptions, Side};
use verdict::model::config::Family;
use verdict::model::weights::Dtype;
use verdict::model::{init_checkpoint, Model, PackedBatch};
use verdict::probe::{embed, EmbedOptions};
use verdict::quant::Quant;
use verdict::submission::read_predictions;

const SAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/data/sample/arena-sample.csv");

fn tiny_model(dir: &Path) -> PathBuf {
    let model = dir.join("gemma2-tiny");
    init_checkpoint(Family::Gemma2, "tiny", 7, &model, Dtype::F32).unwrap();
    model
}

/// The first `rows` rows of the sample, with A and B exchanged if `swap`.
fn sample_rows(dir: &Path, name: &str, rows: usize, swap: bool) -> PathBuf {
    let mut reader = csv::Reader::from_path(SAMPLE).unwrap();
    let headers = reader.headers().unwrap().clone();
    let column = |name: &str| headers.iter().position(|h| h == name).unwrap();
    let pairs = [
        (column("model_a"), column("model_b")),
        (column("response_a"), column("response_b")),
        (column("winner_model_a"), column("winner_model_b")),
    ];
    let path = dir.join(name);
    let mut writer = csv::Writer::from_path(&path).unwrap();
    writer.write_record(&headers).unwrap();
    for record in reader.records().take(rows) {
        let mut fields: Vec<String> = record.unwrap().iter().map(str::to_string).collect();
        if swap {
            for (a, b) in pairs {
                fields.swap(a, b);
            }
        }
        writer.write_record(&fields).unwrap();
    }
    writer.flush().unwrap();
    path
}

fn verdict(args: &[&str]) {
    common::verdict_ok(args);
}

#[test]
fn an_embedding_is_the_mean_over_its_own_tokens_in_any_batch() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = tiny_model(dir.path());
    let (mut battles, _) = read_battles(Path::new(SAMPLE), ReadOptions::default()).unwrap();
    battles.truncate(6);
    // An empty response reads as a null one (a tokenizer without a special prefix, as
    // SmolLM2's, would otherwise give an empty sequence).
    battles[1].turns[0].response_a = Some(String::new());
    battles[2].turns[0].response_b = None;
    let battles = &battles[..];
    let model = Model::load(&Cpu, &model_dir, None, Quant::None).unwrap();
    let formatter = Formatter::from_model_dir(&model_dir, FormatOptions::default()).unwrap();
    let options = EmbedOptions {
        layer: Some(2),
        max_len: 40,
        batch_tokens: 100,
    };
    let mut null = battles[1].clone();
    null.turns[0].response_a = None;
    assert_eq!(
        formatter.encode_response(&battles[1], Side::A, 40).unwrap(),
        formatter.encode_response(&null, Side::A, 40).unwrap()
    );
    let emb = embed(&Cpu, &model, &formatter, battles, options).unwrap();
    assert_eq!((emb.layer, emb.rows.len()), (2, 6));
    let dim = emb.dim;
    for (b, pair) in battles.iter().zip(&emb.rows) {
        for (side, got) in [Side::A, Side::B].into_iter().zip(pair) {
            let ids = formatter.encode_response(b, side, 40).unwrap();
            assert!(ids.len() <= 40);
            let alone = PackedBatch::new(&[ids.as_slice()]);
            let hidden = Cpu.download(&model.decoder.hidden_after(&Cpu, &alone, 2));
            for k in 0..dim {
                let mean = hidden.iter().skip(k).step_by(dim).sum::<f32>() / ids.len() as f32;
                assert!(
                    (mean - got[k]).abs() <= 1e-5 * (1.0 + mean.abs()),
                    "battle {} {side:?}[{k}]: {} vs {mean}",
                    b.id,
                    got[k]
                );
            }
        }
    }
}

#[test]
fn probe_cv_fit_and_predict_run_and_swapping_the_responses_swaps_the_prediction() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let data = sample_rows(dir.path(), "labelled.csv", 60, false);
    let swapped = sample_rows(dir.path(), "swapped.csv", 60, true);
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let cv = dir.path().join("cv");
    verdict(&[
        "probe",
        "cv",
        "--model",
        &s(&model),
        "--train",
        &s(&data),
        "--out",
        &s(&cv),
        "--folds",
        "3",
        "--max-len",
        "48",
    ]);
    let oof = read_predictions(&cv.join("oof.csv")).unwrap();
    assert_eq!(oof.len(), 60);
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(cv.join("probe_cv.json")).unwrap()).unwrap();
    assert_eq!(report["per_fold"].as_array().unwrap().len(), 3);
    assert!(report["oof_log_loss"].as_f64().unwrap().is_finite());

    let probe = dir.path().join("probe.json");
    verdict(&[
        "probe",
        "fit",
        "--model",
        &s(&model),
        "--train",
        &s(&data),
        "--out",
        &s(&probe),
        "--max-len",
        "48",
    ]);
    let (given, exchanged) = (
        dir.path().join("given.csv"),
        dir.path().join("exchanged.csv"),
    );
    for (test, out) in [(&data, &given), (&swapped, &exchanged)] {
        verdict(&[
            "probe",
            "predict",
            "--probe",
            &s(&probe),
            "--test",
            &s(test),
            "--out",
            &s(out),
        ]);
    }
    let (given, exchanged) = (
        read_predictions(&given).unwrap(),
        read_predictions(&exchanged).unwrap(),
    );
    assert_eq!(given.len(), 60);
    let mut moved = 0.0f64;
    for (p, q) in given.iter().zip(&exchanged) {
        assert_eq!(p.id, q.id);
        for (a, b) in [
            (p.probs[0], q.probs[1]),
            (p.probs[1], q.probs[0]),
            (p.probs[2], q.probs[2]),
        ] {
            // Files keep 6 decimals.
            assert!(
                (a - b).abs() < 2e-6,
                "{}: {:?} vs swapped {:?}",
                p.id,
                p.probs,
                q.probs
            );
        }
        moved = moved.max((p.probs[0] - p.probs[1]).abs());
    }
    assert!(moved > 1e-3, "the predictions are not all even: {moved}");
}

#[test]
fn more_folds_than_prompts_is_an_error_naming_the_count() {
    // Issue #19: `probe cv --folds 1000` scored empty folds (log loss of no rows).
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let rows = sample_rows(dir.path(), "rows.csv", 6, false);
    let out = common::verdict(common::argv![
        "probe",
        "cv",
        "--model",
        &model,
        "--train",
        &rows,
        "--out",
        &dir.path().join("probe"),
        "--folds",
        "7",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("number of distinct prompts (6), got 7"),
        "{stderr}"
    );
}
