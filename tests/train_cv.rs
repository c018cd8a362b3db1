//! `verdict cv` end to end on a tiny model and rows of the built-in sample: every row gets
//! exactly one out-of-fold prediction, in the training file's order; the prefix cache shared
//! by the folds changes no bit, and so does one loaded from a file; running the command again
//! keeps the finished folds.

use std::path::{Path, PathBuf};
use verdict::backend::cpu::Cpu;
use verdict::data::{read_battles, ReadOptions};
use verdict::model::config::Family;
use verdict::model::init_checkpoint;
use verdict::model::weights::Dtype;
use verdict::submission::read_predictions;
use verdict::train;
use verdict::train::cv::{self, cross_validate};

const SAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/data/sample/arena-sample.csv");

/// The first `rows` rows of the built-in sample.
fn sample_rows(dir: &Path, rows: usize) -> PathBuf {
    let mut reader = csv::Reader::from_path(SAMPLE).unwrap();
    let path = dir.join("labelled.csv");
    let mut writer = csv::Writer::from_path(&path).unwrap();
    writer.write_record(reader.headers().unwrap()).unwrap();
    for record in reader.records().take(rows) {
        writer.write_record(&record.unwrap()).unwrap();
    }
    writer.flush().unwrap();
    path
}

fn args(model: &Path, data: &Path, out: &Path, prefix_cache: bool) -> cv::Args {
    cv::Args {
        folds: 3,
        fold_seed: 0,
        train: train::Args {
            model: Some(model.to_path_buf()),
            train: Some(data.to_path_buf()),
            out: Some(out.to_path_buf()),
            max_len: Some(96),
            min_part: Some(16),
            batch_tokens: Some(1024),
            max_steps: Some(2),
            lora_r: Some(2),
            lora_layers: Some("last:1".into()),
            length_hints: true,
            save_every: Some(0),
            prefix_cache,
            ..train::Args::default()
        },
    }
}

#[test]
fn every_row_gets_one_out_of_fold_prediction_and_the_prefix_cache_changes_no_bit() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("gemma2-tiny");
    init_checkpoint(Family::Gemma2, "tiny", 11, &model, Dtype::F32).unwrap();
    let data = sample_rows(dir.path(), 45);
    let (battles, _) = read_battles(&data, ReadOptions::default()).unwrap();

    let cached = dir.path().join("cv-cached");
    let summary = cross_validate(&Cpu, &args(&model, &data, &cached, true)).unwrap();
    assert_eq!((summary.folds, summary.rows), (3, 45));
    assert_eq!(summary.per_fold.len(), 3);
    assert_eq!(
        summary.per_fold.iter().map(|f| f.valid_rows).sum::<usize>(),
        45
    );
    for f in &summary.per_fold {
        assert_eq!(f.train_rows + f.valid_rows, 45, "fold {}", f.fold);
        let (held_out, _) = read_battles(
            &cached.join(format!("fold-{}/valid.csv", f.fold)),
            ReadOptions::default(),
        )
        .unwrap();
        assert_eq!(held_out.len(), f.valid_rows);
    }
    let oof = read_predictions(&cached.join("oof.csv")).unwrap();
    let ids: Vec<&str> = oof.iter().map(|p| p.id.as_str()).collect();
    let want: Vec<&str> = battles.iter().map(|b| b.id.as_str()).collect();
    assert_eq!(
        ids, want,
        "one prediction per row, in the training file's order"
    );
    assert!(summary.oof_log_loss.is_finite() && summary.oof_prior_log_loss.is_finite());

    let plain = dir.path().join("cv-plain");
    cross_validate(&Cpu, &args(&model, &data, &plain, false)).unwrap();
    assert_eq!(
        std::fs::read(cached.join("oof.csv")).unwrap(),
        std::fs::read(plain.join("oof.csv")).unwrap(),
        "the shared prefix cache must give the same predictions as computing the prefix"
    );

    // Again: finished folds are kept, not retrained.
    let adapter = cached.join("fold-1/run/adapter_model.safetensors");
    let before = std::fs::metadata(&adapter).unwrap().modified().unwrap();
    let again = cross_validate(&Cpu, &args(&model, &data, &cached, true)).unwrap();
    assert_eq!(
        std::fs::metadata(&adapter).unwrap().modified().unwrap(),
        before
    );
    assert_eq!(again.oof_log_loss, summary.oof_log_loss);

    let mut bad = args(&model, &data, &dir.path().join("cv-bad"), false);
    bad.train.valid = Some(data.clone());
    let err = cross_validate(&Cpu, &bad).unwrap_err().to_string();
    assert!(err.contains("--valid and --resume do not apply"), "{err}");
}

#[test]
fn a_prefix_cache_file_serves_a_later_run_exactly_and_refuses_another_model_or_a_cut_file() {
    let dir = tempfile::tempdir().unwrap();
    let models: Vec<PathBuf> = [11, 12]
        .iter()
        .map(|&seed| {
            let model = dir.path().join(format!("gemma2-tiny-{seed}"));
            init_checkpoint(Family::Gemma2, "tiny", seed, &model, Dtype::F32).unwrap();
            model
        })
        .collect();
    let data = sample_rows(dir.path(), 30);
    let file = dir.path().join("prefix.cache");
    let with_file = |model: &Path, out: &str| {
        let mut a = args(model, &data, &dir.path().join(out), false);
        a.train.prefix_cache_file = Some(file.clone());
        cross_validate(&Cpu, &a)
    };

    with_file(&models[0], "first").unwrap();
    let written = std::fs::read(&file).unwrap();
    let modified = std::fs::metadata(&file).unwrap().modified().unwrap();
    // A new process-level cache loaded from the file: same predictions, and nothing was
    // missing from it (the file is rewritten only when the cache grows).
    with_file(&models[0], "second").unwrap();
    assert_eq!(
        std::fs::read(dir.path().join("first/oof.csv")).unwrap(),
        std::fs::read(dir.path().join("second/oof.csv")).unwrap()
    );
    assert_eq!(
        std::fs::metadata(&file).unwrap().modified().unwrap(),
        modified,
        "every sequence came from the file"
    );
    let plain = dir.path().join("plain");
    cross_validate(&Cpu, &args(&models[0], &data, &plain, false)).unwrap();
    assert_eq!(
        std::fs::read(plain.join("oof.csv")).unwrap(),
        std::fs::read(dir.path().join("second/oof.csv")).unwrap(),
        "the file's hidden states are the computed ones"
    );

    let other = with_file(&models[1], "other").unwrap_err();
    assert!(
        format!("{other:#}").contains("was computed from"),
        "{other:#}"
    );
    std::fs::write(&file, &written[..written.len() - 7]).unwrap();
    let cut = with_file(&models[0], "cut").unwrap_err();
    assert!(
        format!("{cut:#}").contains("truncated in sequence"),
        "{cut:#}"
    );
}
