//! `verdict demo`: the whole pipeline on a built-in sample of real arena rows, so a fresh
//! clone shows what verdict does with one command and no downloads.
//!
//! The sample is split by prompt into train (60%), valid (20%) and test (20%). The length
//! baseline and two fine-tuned classifiers (a Gemma-2-architecture and a LLaMA-architecture
//! model) are trained on train and predict valid and test with swap TTA, and a
//! response-embedding probe is fitted on each base model; the ensemble and the calibration
//! are fitted on valid and applied to test; every stage is scored on test.
//! By default the two models are tiny random ones made on the spot (so the demo runs in a
//! minute or two on a CPU and shows the mechanics, not the accuracy); with `--real` it uses
//! SmolLM2-135M and Gemma 3 270M built by `tools/fetch-models.sh`. Training runs on the CPU;
//! the prediction stages run on the GPU when there is one (`--device auto`, the default).

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
use crate::quant::Quant;
use crate::submission::{read_predictions, write_predictions, Prediction};
use crate::train::{self, Heads, TrainConfig};
use anyhow::{bail, Context, Result};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// 300 real rows (see data/sample/NOTICE), embedded so the demo runs from anywhere.
pub const SAMPLE_CSV: &str = include_str!("../data/sample/arena-sample.csv");

/// Which classifiers the demo fine-tunes.
#[derive(Debug, Clone)]
pub enum DemoModels {
    /// Tiny random Gemma 2 and LLaMA checkpoints written into the output folder.
    Tiny,
    /// Real small checkpoints (HF folders) from `tools/fetch-models.sh`.
    Real { gemma: PathBuf, llama: PathBuf },
}

/// One fine-tuned member of the demo.
struct Member {
    name: &'static str,
    model_dir: PathBuf,
    train: TrainConfig,
}

/// Test-set scores of one stage, for the report table.
struct StageScore {
    stage: String,
    test_log_loss: f64,
    test_accuracy: f64,
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
    /// Fine-tune the real SmolLM2-135M and Gemma 3 270M built by tools/fetch-models.sh
    /// (in $VERDICT_MODELS or ~/.cache/verdict/models) instead of tiny random models.
    #[arg(long)]
    real: bool,
    /// Where the prediction stages run: auto (cuda:0 when the driver sees a GPU, else
    /// the CPU), cpu, cuda or cuda:N. Training runs on the CPU.
    #[arg(long, default_value = "auto")]
    device: Placement,
}

/// `verdict demo`: checks `--real`'s models are there, then runs the pipeline.
pub fn run(args: &Args) -> Result<()> {
    crate::atomic::check_output("--out", &args.out, true)?;
    let models = if args.real {
        let dir = fetched_models_dir();
        let (gemma, llama) = (dir.join("gemma3-270m"), dir.join("smollm2-135m-instruct"));
        for m in [&gemma, &llama] {
            if !m.join("config.json").exists() {
                bail!("--real needs {} (run tools/fetch-models.sh)", m.display());
            }
        }
        DemoModels::Real { gemma, llama }
    } else {
        DemoModels::Tiny
    };
    pipeline(&args.out, models, &args.device)
}

/// Runs the demo, writing its outputs into `out` (which must be new or empty); the
/// prediction stages run where `placement` says, training on the CPU. The stages, in order:
/// the split, the class prior, the length baseline, each member fine-tuned and its probe,
/// the ensemble, the calibration, the report.
pub fn pipeline(out: &Path, models: DemoModels, placement: &Placement) -> Result<()> {
    if out.exists() && std::fs::read_dir(out)?.next().is_some() {
        bail!("{} is not empty; pass a new --out folder", out.display());
    }
    let split = split_sample(out)?;
    let members = demo_members(out, &split.train_csv, &models)?;
    // Prior, baseline, one stage per member, ensemble, calibration.
    let mut stage = StageCounter::new(4 + members.len());
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
        println!(
            "\n{} fine-tune {} from {}",
            stage.next(),
            m.name,
            m.model_dir.display()
        );
        stages.fine_tune(m)?;
        stages.fit_probe(m)?;
    }
    let (ens_valid_oof, ens_test) = stages.fit_ensemble(stage.next())?;
    let submission = stages.fit_calibration(&ens_valid_oof, &ens_test, stage.next())?;

    let models_note = match &models {
        DemoModels::Tiny => "tiny random Gemma 2 and LLaMA checkpoints made by `verdict init` (mechanics, not accuracy; run tools/fetch-models.sh and `verdict demo --real` for real models)".to_string(),
        DemoModels::Real { gemma, llama } => format!("real checkpoints {} and {}", gemma.display(), llama.display()),
    };
    let report_md = render_report(
        &stages.board.scores,
        &members,
        &models_note,
        stages.split.train.len(),
        stages.split.valid.len(),
        stages.split.test.len(),
    );
    crate::atomic::write_bytes(&out.join("report.md"), report_md.as_bytes())?;
    println!("\nmodels: {models_note}");
    println!(
        "wrote {} and {}",
        submission.display(),
        out.join("report.md").display()
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
    scores: Vec<StageScore>,
}

impl Scoreboard {
    fn new(test: &[Battle]) -> Result<Scoreboard> {
        Ok(Scoreboard {
            test_truth: baseline::labels_of(test)?,
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
        println!(
            "  test log loss {:.4}  accuracy {:.3}  ({stage})",
            s.log_loss, s.accuracy
        );
        self.scores.push(StageScore {
            stage: stage.to_string(),
            test_log_loss: s.log_loss,
            test_accuracy: s.accuracy,
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

/// 60 / 20 / 20 split of the sample by prompt groups, written as competition CSVs.
fn split_sample(out: &Path) -> Result<Split> {
    let data = out.join("data");
    std::fs::create_dir_all(&data).with_context(|| format!("cannot create {}", data.display()))?;
    let battles: Vec<Battle> = BattleReader::new(
        SAMPLE_CSV.as_bytes(),
        "built-in sample",
        ReadOptions::default(),
    )?
    .collect::<Result<_>>()?;
    println!(
        "verdict demo: {} real arena rows (built-in sample; see data/sample/NOTICE)",
        battles.len()
    );
    let keys: Vec<u64> = battles.iter().map(Battle::prompt_key).collect();
    let fold = grouped_folds(&keys, 5, 0);
    let ids = |folds: &[usize]| {
        battles
            .iter()
            .zip(&fold)
            .filter(|(_, f)| folds.contains(f))
            .map(|(b, _)| b.id.clone())
            .collect::<Vec<_>>()
    };
    let (train_csv, valid_csv, test_csv) = (
        data.join("train.csv"),
        data.join("valid.csv"),
        data.join("test.csv"),
    );
    write_sample_rows(&train_csv, &ids(&[0, 1, 2]))?;
    write_sample_rows(&valid_csv, &ids(&[3]))?;
    write_sample_rows(&test_csv, &ids(&[4]))?;
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
    fn class_prior(&mut self, tag: String) -> Result<()> {
        let prior = metrics::class_prior(&baseline::labels_of(&self.split.train)?);
        println!(
            "{tag} class prior of train: {:?}",
            prior.map(|p| (p * 1000.0).round() / 1000.0)
        );
        let path = self.out.join("prior-test.csv");
        write_probs(&path, &self.split.test, vec![prior; self.split.test.len()])?;
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
            "length baseline",
            &self.preds.test[0],
            format!("{} buckets chosen by CV", model.buckets),
        )
    }

    /// Fine-tunes member `m` on train (on the CPU), then predicts valid and test with swap TTA
    /// where `placement` says.
    fn fine_tune(&mut self, m: &Member) -> Result<()> {
        let run = self.out.join(format!("run-{}", m.name));
        let summary = match train::train(&Cpu, &run, &m.train, false, train::Control::default())? {
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
                tta_swap: true,
                batch_tokens: m.train.batch_tokens,
                base: None,
            },
        })?;
        println!(
            "  predicted valid and test with swap TTA on {}",
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
            "{} steps, swap TTA; loss curve {}",
            summary.steps,
            run.join("loss.png").display()
        );
        self.board
            .score(m.name, self.preds.test.last().expect("pushed"), steps)
    }

    /// The probe on member `m`'s base model: every row embedded once, fitted on train,
    /// predicting valid and test.
    fn fit_probe(&mut self, m: &Member) -> Result<()> {
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
    let configure = |name: &'static str, model_dir: PathBuf, real: bool| {
        let mut c = TrainConfig::new(model_dir.clone(), train_csv.to_path_buf());
        c.heads = Heads::Three;
        c.lora_r = 8;
        c.lora_alpha = 16.0;
        c.format = FormatOptions {
            max_len: if real { 192 } else { 256 },
            prompt_cap: 64,
            min_part: 16,
            length_hints: false,
        };
        c.batch_tokens = 4096;
        c.epochs = if real { 1 } else { 3 };
        c.max_steps = Some(if real { 12 } else { 40 });
        c.lr = if real { 2e-4 } else { 2e-3 };
        c.head_lr = if real { 1e-3 } else { 5e-3 };
        c.quant = if real {
            Quant::Nf4(Default::default())
        } else {
            Quant::None
        };
        Member {
            name,
            model_dir,
            train: c,
        }
    };
    Ok(match models {
        DemoModels::Tiny => {
            let dir = out.join("models");
            let mut members = Vec::new();
            for (name, family) in [
                ("gemma2-tiny", Family::Gemma2),
                ("llama-tiny", Family::Llama),
            ] {
                let model_dir = dir.join(name);
                init_checkpoint(family, "tiny", 0, &model_dir, Dtype::F32)?;
                members.push(configure(name, model_dir, false));
            }
            members
        }
        DemoModels::Real { gemma, llama } => {
            vec![
                configure("gemma3-270m", gemma.clone(), true),
                configure("smollm2-135m", llama.clone(), true),
            ]
        }
    })
}

/// Copies the sample rows with the given ids (in sample order) into a competition CSV.
fn write_sample_rows(path: &Path, ids: &[String]) -> Result<()> {
    let wanted: std::collections::HashSet<&str> = ids.iter().map(String::as_str).collect();
    let mut reader = csv::Reader::from_reader(SAMPLE_CSV.as_bytes());
    let header = reader.byte_headers()?.clone();
    let id_col = header
        .iter()
        .position(|h| h == b"id")
        .context("sample has no id column")?;
    crate::atomic::write_with(path, |w| {
        let mut writer = csv::Writer::from_writer(w);
        writer.write_byte_record(&header)?;
        for record in reader.byte_records() {
            let record = record?;
            if wanted.contains(std::str::from_utf8(&record[id_col])?) {
                writer.write_byte_record(&record)?;
            }
        }
        writer.flush()?;
        Ok(())
    })
}

fn render_report(
    scores: &[StageScore],
    members: &[Member],
    models_note: &str,
    train: usize,
    valid: usize,
    test: usize,
) -> String {
    let mut md = String::from("# verdict demo report\n\n");
    let _ = writeln!(md, "Built-in sample of real arena rows, split by prompt: {train} train, {valid} valid, {test} test.");
    let _ = writeln!(md, "Models: {models_note}.\n");
    let _ = writeln!(
        md,
        "Uniform guess: {:.4}. With this few rows, differences of a few hundredths are noise.\n",
        3f64.ln()
    );
    md += "| stage | test log loss | test accuracy | notes |\n|---|---|---|---|\n";
    for s in scores {
        let _ = writeln!(
            md,
            "| {} | {:.4} | {:.3} | {} |",
            s.stage, s.test_log_loss, s.test_accuracy, s.note
        );
    }
    md += "\n## Plots\n\n";
    for m in members {
        let _ = writeln!(md, "![{} training loss](run-{}/loss.png)\n", m.name, m.name);
    }
    md += "![reliability diagram](reliability.png)\n";
    md
}
