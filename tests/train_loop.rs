//! `verdict train` end to end on tiny models and the built-in arena sample: the loss goes
//! down, the saved adapter is what was trained, a run killed at any moment resumes to the same
//! adapter bytes, non-finite numbers stop the run before anything is saved, and a causal
//! checkpoint gets a seeded score head saved in the adapter, and a run on the length baseline
//! starts as that baseline.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use verdict::backend::cpu::Cpu;
use verdict::backend::placement::Placement;
use verdict::baseline::{BaselineConfig, BaselineModel};
use verdict::data::format::{byte_level_tokenizer_json, Formatter};
use verdict::data::{read_battles, ReadOptions};
use verdict::model::config::Family;
use verdict::model::weights::{Checkpoint, Dtype};
use verdict::model::{init_checkpoint, HeadKind, Model};
use verdict::predict::{predict_battles, PredictJob, PredictOptions, BASE_FILE};
use verdict::quant::nf4::Nf4Options;
use verdict::quant::Quant;
use verdict::submission::read_predictions;
use verdict::train::config::read_config;
use verdict::train::{train, Control, Heads, Outcome, Summary, TrainConfig, VALID_PREDICTIONS};

const SAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/data/sample/arena-sample.csv");

/// Rows `range` of the built-in sample as a CSV file.
fn sample_rows(dir: &Path, name: &str, range: std::ops::Range<usize>) -> PathBuf {
    let mut reader = csv::Reader::from_path(SAMPLE).unwrap();
    let path = dir.join(name);
    let mut writer = csv::Writer::from_path(&path).unwrap();
    writer.write_record(reader.headers().unwrap()).unwrap();
    for record in reader.records().skip(range.start).take(range.len()) {
        writer.write_record(&record.unwrap()).unwrap();
    }
    writer.flush().unwrap();
    path
}

fn write_tokenizer(dir: &Path) {
    std::fs::write(
        dir.join("tokenizer.json"),
        serde_json::to_vec(&byte_level_tokenizer_json()).unwrap(),
    )
    .unwrap();
}

/// A random tiny Gemma 2 classifier (f32) with the byte-level tokenizer.
fn tiny_gemma2(dir: &Path) -> PathBuf {
    let path = dir.join("gemma2-tiny");
    init_checkpoint(Family::Gemma2, "tiny", 11, &path, Dtype::F32).unwrap();
    path
}

/// The committed tiny causal Gemma 3 fixture (no score head) with the byte-level tokenizer.
fn causal_gemma3(dir: &Path) -> PathBuf {
    let model = dir.join("gemma3-causal");
    std::fs::create_dir_all(&model).unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/gemma3_causal");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture.join(f), model.join(f)).unwrap();
    }
    write_tokenizer(&model);
    model
}

/// A temporary folder holding the tiny Gemma 2 and rows `rows` of the sample as train.csv,
/// and `small_config` on them.
fn small_gemma2_run(
    rows: std::ops::Range<usize>,
) -> (tempfile::TempDir, PathBuf, PathBuf, TrainConfig) {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_gemma2(dir.path());
    let data = sample_rows(dir.path(), "train.csv", rows);
    let c = small_config(&model, &data);
    (dir, model, data, c)
}

/// Small and fast: ~5 battles (10 sequences with their swaps) per 1024-token batch.
fn small_config(model: &Path, train: &Path) -> TrainConfig {
    let mut c = TrainConfig::new(model.to_path_buf(), train.to_path_buf());
    c.format.max_len = 96;
    c.format.min_part = 16;
    c.batch_tokens = 1024;
    c.lora_r = 4;
    c.lora_alpha = 8.0;
    c.lr = 2e-3;
    c.head_lr = 1e-2;
    c.warmup_steps = Some(2);
    c.save_every = 0;
    c
}

fn finished(outcome: Outcome) -> Summary {
    match outcome {
        Outcome::Finished(s) => s,
        Outcome::Halted(step) => panic!("halted at {step}"),
    }
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Train-step records of a run's metrics.jsonl without the clock fields.
fn train_records(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["kind"] == "train")
        .map(|mut r| {
            for clock in ["elapsed", "tokens_per_s"] {
                r.as_object_mut().unwrap().remove(clock);
            }
            r
        })
        .collect()
}

fn valid_log_loss(model: &Model<Cpu>, model_dir: &Path, csv: &Path, config: &TrainConfig) -> f64 {
    let (battles, _) = read_battles(csv, ReadOptions::default()).unwrap();
    let formatter = Formatter::from_model_dir(model_dir, config.format).unwrap();
    let options = PredictOptions {
        tta_swap: true,
        batch_tokens: 4096,
        base: None,
    };
    let (rows, _) = predict_battles(&Cpu, model, &formatter, &battles, options).unwrap();
    let probs: Vec<_> = rows.iter().map(|r| r.probs).collect();
    let truth: Vec<_> = battles.iter().map(|b| b.winner.unwrap()).collect();
    verdict::metrics::log_loss(&probs, &truth)
}

#[test]
fn qlora_training_lowers_the_loss_and_the_saved_adapter_is_the_trained_model() {
    let (dir, model, data, mut c) = small_gemma2_run(0..32);
    c.valid = Some(data.clone());
    c.epochs = 4;
    c.heads = Heads::Three;
    c.eval_every = Some(10);
    c.quant = Quant::Nf4(Nf4Options::default()); // QLoRA: NF4 base, f32 adapters
    let run = dir.path().join("run");
    let before = valid_log_loss(
        &Model::load(&Cpu, &model, None, c.quant).unwrap(),
        &model,
        &data,
        &c,
    );
    let s = finished(train(&Cpu, &run, &c, false, Control::default()).unwrap());

    // The adapter as `verdict predict --adapter` loads it scores what the loop measured.
    let adapted = Model::load(&Cpu, &model, Some(&run), c.quant).unwrap();
    let after = valid_log_loss(&adapted, &model, &data, &c);
    let valid = s.valid.clone().unwrap();
    assert!(
        (valid.log_loss - after).abs() < 1e-9,
        "loop {} vs reloaded adapter {after}",
        valid.log_loss
    );
    assert!(
        after < before - 0.05,
        "log loss on the training battles: {before:.4} -> {after:.4}"
    );
    assert!(s.loss_last_10 < s.loss_first_10, "{s:?}");
    eprintln!("loss on the 32 training battles {before:.4} -> {after:.4}; train loss {:.4} -> {:.4}; {} steps in {:.2} s", s.loss_first_10, s.loss_last_10, s.steps, s.seconds);

    let records = train_records(&run);
    assert_eq!(records.len(), s.steps);
    for field in [
        "step",
        "epoch",
        "loss",
        "pref_loss",
        "aux_loss",
        "lr",
        "grad_norm",
        "tokens",
    ] {
        assert!(records.iter().all(|r| r[field].is_number()), "{field}");
    }
    assert!(
        records
            .iter()
            .all(|r| r["aux_loss"].as_f64().unwrap() > 0.0),
        "--heads three trains the identity heads"
    );
    let log = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let valid_steps: Vec<u64> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["kind"] == "valid")
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    let mut want: Vec<u64> = (10..s.steps as u64).step_by(10).collect();
    want.push(s.steps as u64);
    assert_eq!(valid_steps, want);
    assert!(read(&run.join("loss.png")).starts_with(b"\x89PNG"));
    let adapter: serde_json::Value =
        serde_json::from_slice(&read(&run.join("adapter_config.json"))).unwrap();
    assert_eq!(adapter["task_type"], "SEQ_CLS");
    assert_eq!(adapter["modules_to_save"], serde_json::json!(["score"]));
    let tensors = Checkpoint::open_file(&run.join("adapter_model.safetensors")).unwrap();
    assert!(
        tensors.names().all(|n| n.starts_with("base_model.model.")),
        "aux heads stay out of the adapter"
    );
}

#[test]
fn a_run_stopped_or_killed_at_any_step_resumes_to_the_same_adapter_bytes() {
    let (dir, model, data, mut c) = small_gemma2_run(40..90);
    c.epochs = 2;
    c.save_every = 4;
    c.grad_accum = 2;
    c.heads = Heads::Three;
    let whole = dir.path().join("whole");
    let s = finished(train(&Cpu, &whole, &c, false, Control::default()).unwrap());
    assert!(
        s.steps >= 8,
        "{} steps: too few to stop between checkpoints",
        s.steps
    );
    let adapter = |run: &Path| read(&run.join("adapter_model.safetensors"));
    let state = |run: &Path| {
        read(&run.join(format!(
            "checkpoints/step-{:08}/trainer_state.safetensors",
            s.steps
        )))
    };

    // Stopped between checkpoints (steps after the last save are redone) and right after one.
    for halt in [s.steps / 2 + 1, 4] {
        let run = dir.path().join(format!("halted-{halt}"));
        let control = Control {
            halt_after_step: Some(halt),
            ..Control::default()
        };
        assert!(
            matches!(train(&Cpu, &run, &c, false, control).unwrap(), Outcome::Halted(h) if h == halt)
        );
        assert!(!run.join("summary.json").exists());
        finished(train(&Cpu, &run, &c, true, Control::default()).unwrap());
        assert!(
            adapter(&run) == adapter(&whole),
            "halted after step {halt}: adapter bytes differ"
        );
        assert!(
            state(&run) == state(&whole),
            "halted after step {halt}: optimizer state differs"
        );
        assert_eq!(
            train_records(&run),
            train_records(&whole),
            "halted after step {halt}: metrics"
        );
    }

    // A real process, SIGKILLed mid-run, then resumed from the command line.
    let killed = dir.path().join("killed");
    let verdict = env!("CARGO_BIN_EXE_verdict");
    let flags = common::argv![
        "--model",
        &model,
        "--train",
        &data,
        "--out",
        &killed,
        "--max-len",
        "96",
        "--min-part",
        "16",
        "--batch-tokens",
        "1024",
        "--lora-r",
        "4",
        "--lora-alpha",
        "8",
        "--lr",
        "2e-3",
        "--head-lr",
        "1e-2",
        "--warmup-steps",
        "2",
        "--epochs",
        "2",
        "--save-every",
        "4",
        "--grad-accum",
        "2",
        "--heads",
        "three",
    ];
    let mut child = Command::new(verdict)
        .arg("train")
        .args(flags)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let kill_after = s.steps * 2 / 3;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let lines =
            std::fs::read_to_string(killed.join("metrics.jsonl")).map_or(0, |t| t.lines().count());
        if lines >= kill_after || std::time::Instant::now() > deadline {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !killed.join("summary.json").exists(),
        "the child finished before it was killed"
    );
    assert_eq!(
        read_config(&killed).unwrap(),
        c,
        "the flags above mean the library config"
    );
    common::verdict_ok(common::argv!["train", "--resume", &killed]);
    assert!(
        adapter(&killed) == adapter(&whole),
        "killed after ~{kill_after} steps: adapter bytes differ"
    );
    assert_eq!(train_records(&killed), train_records(&whole));
}

#[test]
fn non_finite_numbers_stop_the_run_naming_step_and_parameter_and_save_nothing() {
    let (dir, model, data, mut c) = small_gemma2_run(100..120);
    let run = dir.path().join("run");
    c.lr = 1e38;
    c.head_lr = 1e38;
    c.save_every = 1;
    let err = format!(
        "{:#}",
        train(&Cpu, &run, &c, false, Control::default()).unwrap_err()
    );
    // The first update overflows (lr / (1 - beta1) is inf in f32).
    assert!(
        err.contains("step 1: updated value of base_model.model."),
        "names the step and the PEFT key: {err}"
    );
    assert!(!run.join("adapter_model.safetensors").exists() && !run.join("checkpoints").exists());

    // A finite base weight the forward overflows (a NaN weight is refused at load, see
    // tests/bad_input.rs): the loss itself is not finite.
    let nan_model = dir.path().join("nan-model");
    std::fs::create_dir_all(&nan_model).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(model.join(f), nan_model.join(f)).unwrap();
    }
    let bytes = read(&model.join("model.safetensors"));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<u8>, Vec<usize>)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.data().to_vec(), t.shape().to_vec()))
        .collect();
    let norm = tensors
        .iter_mut()
        .find(|t| t.0 == "model.norm.weight")
        .unwrap();
    norm.1[..4].copy_from_slice(&f32::MAX.to_le_bytes());
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, d, s)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d)
                    .unwrap(),
            )
        })
        .collect();
    std::fs::write(
        nan_model.join("model.safetensors"),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
    let c = small_config(&nan_model, &data);
    let run = dir.path().join("nan-run");
    let err = format!(
        "{:#}",
        train(&Cpu, &run, &c, false, Control::default()).unwrap_err()
    );
    assert!(err.contains("step 1: loss is NaN"), "{err}");
    assert!(!run.join("adapter_model.safetensors").exists());
}

#[test]
fn a_causal_checkpoint_trains_a_seeded_new_score_head_saved_in_the_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let model = causal_gemma3(dir.path());
    let data = sample_rows(dir.path(), "train.csv", 120..135);
    let mut c = small_config(&model, &data);
    c.max_steps = Some(2);
    let runs: Vec<PathBuf> = (0..2).map(|i| dir.path().join(format!("run{i}"))).collect();
    for run in &runs {
        finished(train(&Cpu, run, &c, false, Control::default()).unwrap());
    }
    let adapter = read(&runs[0].join("adapter_model.safetensors"));
    assert!(
        adapter == read(&runs[1].join("adapter_model.safetensors")),
        "same seed, same bytes"
    );
    let mut tensors = Checkpoint::open_file(&runs[0].join("adapter_model.safetensors")).unwrap();
    let score = tensors
        .take("base_model.model.score.weight", &[3, 48])
        .unwrap();
    let std = (score.iter().map(|v| v * v).sum::<f32>() / score.len() as f32).sqrt();
    // Zero-initialised, then two AdamW steps of at most head_lr (1e-2) each per element.
    assert!(
        std > 0.0 && std <= 0.021,
        "score starts at zero and moves by two small steps: std {std}"
    );
    // The causal base with the adapter loads as the trained classifier (as PEFT does).
    let classifier = Model::load(&Cpu, &model, Some(&runs[0]), Quant::None).unwrap();
    assert_eq!(
        classifier.spec.head,
        HeadKind::SequenceClassification { num_labels: 3 }
    );
    let loss = valid_log_loss(&classifier, &model, &data, &c);
    assert!(loss.is_finite() && loss < 2.0, "{loss}");
}

#[test]
fn a_run_on_the_baseline_starts_as_the_baseline_and_predict_adds_it_back() {
    let dir = tempfile::tempdir().unwrap();
    let model = causal_gemma3(dir.path());
    let data = sample_rows(dir.path(), "train.csv", 0..60);
    let valid = sample_rows(dir.path(), "valid.csv", 60..80);
    let (train_battles, _) = read_battles(&data, ReadOptions::default()).unwrap();
    let (valid_battles, _) = read_battles(&valid, ReadOptions::default()).unwrap();
    let fitted = BaselineModel::fit_battles(&train_battles, &BaselineConfig::default()).unwrap();
    let expected = fitted.predict(&valid_battles).unwrap();
    let in_sample = {
        let probs = fitted.predict(&train_battles).unwrap();
        let truth: Vec<_> = train_battles.iter().map(|b| b.winner.unwrap()).collect();
        verdict::metrics::log_loss(&probs, &truth)
    };

    let mut c = small_config(&model, &data);
    c.valid = Some(valid.clone());
    c.on_baseline = true;
    // Frozen in effect (learning rates must be positive): the zero-initialised score head adds
    // nothing to the baseline's log-probabilities.
    c.lr = 1e-12;
    c.head_lr = 1e-12;
    let frozen = dir.path().join("frozen");
    finished(train(&Cpu, &frozen, &c, false, Control::default()).unwrap());
    // One epoch: every training battle and its swap once, so the training loss is the
    // baseline's own log loss on the training rows (the swap of a battle scores the same).
    let (mut loss, mut sequences) = (0.0, 0.0);
    for r in train_records(&frozen) {
        let n = r["sequences"].as_f64().unwrap();
        loss += r["loss"].as_f64().unwrap() * n;
        sequences += n;
    }
    assert_eq!(sequences, 120.0);
    assert!(
        (loss / sequences - in_sample).abs() < 1e-5,
        "training loss {} vs the baseline's {in_sample}",
        loss / sequences
    );
    let saved = BaselineModel::load(&frozen.join(BASE_FILE)).unwrap();
    assert_eq!(saved.train_rows, 60);
    let preds = read_predictions(&frozen.join(VALID_PREDICTIONS)).unwrap();
    assert_eq!(preds.len(), expected.len());
    for (p, e) in preds.iter().zip(&expected) {
        for k in 0..3 {
            assert!(
                (p.probs[k] - e[k]).abs() < 1e-6,
                "{}: {:?} vs the baseline's {e:?}",
                p.id,
                p.probs
            );
        }
    }

    // A run that learns: `verdict predict`'s path reads RUN/baseline.json itself and gives the
    // run's own validation predictions, which the baseline alone no longer matches.
    c.lr = 2e-3;
    c.head_lr = 1e-2;
    c.max_steps = Some(2);
    let moving = dir.path().join("moving");
    finished(train(&Cpu, &moving, &c, false, Control::default()).unwrap());
    let formatter = Formatter::from_model_dir(&model, c.format).unwrap();
    let job = |adapter: &Path| {
        Placement::Cpu
            .run(PredictJob {
                model_dir: &model,
                adapter_dir: Some(adapter),
                quant: Quant::None,
                formatter: &formatter,
                battles: &valid_battles,
                options: PredictOptions {
                    tta_swap: true,
                    batch_tokens: 4096,
                    base: None,
                },
            })
            .unwrap()
            .0
    };
    // Killed after step 1, even before baseline.json was saved: the resumed run refits the
    // same baseline and ends with the same adapter bytes.
    let halted = dir.path().join("halted");
    let halt = Control {
        halt_after_step: Some(1),
        ..Control::default()
    };
    assert!(matches!(
        train(&Cpu, &halted, &c, false, halt).unwrap(),
        Outcome::Halted(1)
    ));
    std::fs::remove_file(halted.join(BASE_FILE)).unwrap();
    finished(train(&Cpu, &halted, &c, true, Control::default()).unwrap());
    assert!(
        read(&halted.join("adapter_model.safetensors"))
            == read(&moving.join("adapter_model.safetensors"))
    );
    assert!(halted.join(BASE_FILE).exists());
    let own = read_predictions(&moving.join(VALID_PREDICTIONS)).unwrap();
    let predicted = job(&moving);
    let gap = |a: &[f64; 3], b: &[f64; 3]| (0..3).map(|k| (a[k] - b[k]).abs()).fold(0.0, f64::max);
    for (p, o) in predicted.iter().zip(&own) {
        assert_eq!(p.id, o.id);
        // valid_predictions.csv keeps 6 decimals.
        assert!(
            gap(&p.probs, &o.probs) < 2e-6,
            "{}: {:?} vs {:?}",
            p.id,
            p.probs,
            o.probs
        );
    }
    let moved = predicted
        .iter()
        .zip(&expected)
        .map(|(p, e)| gap(&p.probs, e))
        .fold(0.0, f64::max);
    assert!(
        moved > 1e-3,
        "two steps at lr 1e-2 move the predictions: {moved}"
    );
    std::fs::remove_file(moving.join(BASE_FILE)).unwrap();
    let without = job(&moving);
    assert!(
        predicted
            .iter()
            .zip(&without)
            .any(|(a, b)| gap(&a.probs, &b.probs) > 1e-3),
        "the baseline file is what adds the baseline"
    );
}
