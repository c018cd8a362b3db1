//! The `verdict` command line: parses arguments, calls the library, prints results.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use verdict::backend::placement::Placement;
use verdict::baseline::{self, BaselineConfig, BaselineModel, Feature, Observation};
use verdict::data::format::{FormatOptions, Formatter};
use verdict::data::{read_battles, report_skipped, Battle, BattleReader, ReadOptions};
use verdict::model::logits::LogitsOptions;
use verdict::predict::{self, PredictOptions};
use verdict::quant::QuantArgs;
use verdict::submission::{write_predictions, Prediction};
use verdict::{calibrate, demo, ensemble, metrics};

#[derive(Parser)]
#[command(
    name = "verdict",
    version,
    about = "Fine-tune small LLMs as pairwise preference classifiers (LMSYS Chatbot Arena)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole pipeline on the built-in sample of real arena rows.
    ///
    /// Example: verdict demo --out demo-out
    Demo {
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
    },
    /// Raw classifier logits (and pooled hidden states) for token ids: the parity interface.
    ///
    /// Each line of IDS.jsonl is an object with an "ids" array; each output line is
    /// {"logits": [..] or null for a causal LM} plus "hidden" with --hidden.
    ///
    /// Example: verdict logits --model gemma2-tiny --ids ids.jsonl --hidden
    Logits {
        /// Hugging Face model folder (config.json, safetensors).
        #[arg(long)]
        model: PathBuf,
        /// PEFT LoRA adapter folder (adapter_config.json, adapter_model.safetensors).
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// JSON lines with an "ids" array each.
        #[arg(long)]
        ids: PathBuf,
        /// Also print the final-norm hidden state at the pooled token.
        #[arg(long)]
        hidden: bool,
        /// Most tokens in one packed batch (consecutive inputs).
        #[arg(long, default_value_t = LogitsOptions::default().batch_tokens)]
        batch_tokens: usize,
        #[command(flatten)]
        device: DeviceArgs,
        #[command(flatten)]
        quant: QuantArgs,
    },
    /// Parameters and memory of a model as loaded: per component (embedding, each projection
    /// over all layers, norms, head), dtype, total, bits per parameter of the quantized
    /// projections, and the peak resident memory of the load.
    ///
    /// Example: verdict inspect --model gemma2-2b --quant nf4 --json
    Inspect {
        /// Hugging Face model folder (config.json, safetensors).
        #[arg(long)]
        model: PathBuf,
        #[command(flatten)]
        quant: QuantArgs,
        /// Print the report as JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Write a random checkpoint with a real configuration (for tests and benchmarks).
    ///
    /// Example: verdict init --arch gemma2 --preset 2b --out gemma2-2b-random
    Init {
        /// gemma2, gemma3 or llama.
        #[arg(long)]
        arch: String,
        /// Size preset, e.g. tiny, 2b, 9b (gemma2); tiny, 270m (gemma3); tiny, 135m (llama).
        #[arg(long)]
        preset: String,
        /// Output folder (must not exist).
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Weight dtype: f32, f16 or bf16.
        #[arg(long, default_value = "bf16")]
        dtype: String,
    },
    /// Predict battles with a classifier (optionally with a LoRA adapter); writes a submission.
    ///
    /// Example: verdict predict --model gemma2-2b --adapter run1 --test test.csv --out preds.csv --tta swap
    Predict {
        /// Hugging Face model folder with tokenizer.json.
        #[arg(long)]
        model: PathBuf,
        /// PEFT adapter folder (e.g. a `verdict train` run).
        #[arg(long)]
        adapter: Option<PathBuf>,
        #[arg(long)]
        test: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Test-time augmentation: "swap" also classifies each battle with A and B exchanged.
        #[arg(long, default_value = "swap", value_parser = ["swap", "none"])]
        tta: String,
        #[command(flatten)]
        format: FormatArgs,
        /// Most tokens in one packed batch.
        #[arg(long, default_value_t = 8192)]
        batch_tokens: usize,
        /// Also write raw logits (for ensembling) here.
        #[arg(long)]
        logits_out: Option<PathBuf>,
        /// Also write timing, sizes and each device's share and memory peak as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        #[command(flatten)]
        device: DeviceArgs,
        /// Several CUDA devices by ordinal, e.g. 0,1 (Kaggle's two T4s): one model copy per
        /// GPU, the batches shared among them, rows written in input order.
        #[arg(long, value_delimiter = ',', conflicts_with = "device")]
        devices: Vec<usize>,
        #[command(flatten)]
        read: ReadArgs,
        #[command(flatten)]
        quant: QuantArgs,
    },
    /// Fit convex ensemble weights over prediction files (or apply fitted ones).
    ///
    /// Example: verdict ensemble --preds gemma.csv llama.csv baseline.csv --labels valid.csv --out ens.json --oof-out ens-oof.csv
    ///
    /// Example: verdict ensemble apply --model ens.json --preds gemma-test.csv llama-test.csv baseline-test.csv --out submission.csv
    Ensemble(EnsembleArgs),
    /// Fit calibration (temperature, threshold-multiplier rule, degenerate-row rules), or apply it.
    ///
    /// Example: verdict calibrate --preds ens-oof.csv --labels valid.csv --out calib.json --diagram reliability.png
    ///
    /// Example: verdict calibrate apply --calibration calib.json --preds preds.csv --test test.csv --out submission.csv
    Calibrate(CalibrateArgs),
    /// Fine-tune a model as a 3-way preference classifier with LoRA (PEFT adapter out).
    ///
    /// Writes RUN/adapter_config.json + adapter_model.safetensors (a PEFT adapter for
    /// `verdict predict --adapter RUN`), RUN/checkpoints/, RUN/metrics.jsonl, RUN/loss.png and
    /// RUN/summary.json. `--resume RUN` continues a killed run exactly.
    ///
    /// Example: verdict train --model gemma2-2b --train train.csv --valid valid.csv --out run1 --heads three --eval-every 200
    Train(verdict::train::TrainArgs),
    /// Cross-validate a fine-tuning recipe: one `train` run per prompt-grouped fold, each
    /// validated on its held-out rows; pools the out-of-fold predictions.
    ///
    /// Takes every `train` flag (`--out` is the cross-validation folder). Writes
    /// OUT/fold-k/{train,valid}.csv and OUT/fold-k/run (a run folder), OUT/oof.csv (one
    /// prediction per row, for `ensemble` and `calibrate`) and OUT/cv.json. Run the same
    /// command again to continue after a kill. `--prefix-cache` shares the frozen prefix's
    /// output across folds.
    ///
    /// Example: verdict cv --model smollm2-135m --train arena-dev.csv --out cv-smol --folds 5 --lora-layers last:4 --prefix-cache --length-hints
    Cv(verdict::train::cv::CvArgs),
    /// Length-difference bucket baseline (no model needed).
    #[command(subcommand)]
    Baseline(BaselineCommand),
    /// Response-embedding probe: the frozen decoder's mean hidden state of each response,
    /// a regularised linear head on top of the length baseline.
    ///
    /// Example: verdict probe cv --model smollm2-135m --train arena-dev.csv --out probe-smol --folds 3
    #[command(subcommand)]
    Probe(verdict::probe::ProbeCommand),
    /// Score a prediction file against labelled rows.
    ///
    /// Example: verdict eval --preds preds.csv --labels valid.csv --json
    Eval {
        /// Predictions (id,winner_model_a,winner_model_b,winner_tie).
        #[arg(long)]
        preds: PathBuf,
        /// Labelled competition CSV (train.csv format).
        #[arg(long)]
        labels: PathBuf,
        /// Print the scores as JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        read: ReadArgs,
    },
    /// Check every CUDA op, then whole tiny models, against the CPU reference.
    ///
    /// Exit code 0: all passed; 1: a check failed; 3: no CUDA device here.
    /// VERDICT_KERNELS=nvrtc compiles the kernels at run time instead of loading the
    /// prebuilt ones.
    ///
    /// Example: verdict selftest --device cuda --json selftest.json
    Selftest(verdict::selftest::Args),
    /// Benchmarks on a GPU against ceilings measured in the same run.
    #[command(subcommand)]
    Bench(verdict::bench::BenchCommand),
}

/// Where the model runs.
#[derive(Args, Clone)]
struct DeviceArgs {
    /// cpu, cuda, cuda:N, or auto (cuda:0 when the driver sees a GPU, else the CPU).
    #[arg(long, default_value = "cpu")]
    device: Placement,
}

#[derive(Args, Clone, Copy)]
struct ReadArgs {
    /// Warn about and skip malformed CSV rows (counted) instead of failing.
    #[arg(long)]
    skip_bad_rows: bool,
}

impl ReadArgs {
    fn options(self) -> ReadOptions {
        ReadOptions {
            skip_bad_rows: self.skip_bad_rows,
        }
    }
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
struct EnsembleArgs {
    #[command(subcommand)]
    apply: Option<EnsembleApply>,
    /// Prediction files, one per member (joined with the labels by id).
    #[arg(long, num_args = 1..)]
    preds: Vec<PathBuf>,
    /// Labelled competition CSV.
    #[arg(long)]
    labels: Option<PathBuf>,
    /// The fitted ensemble (JSON).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Also write the chosen mode's out-of-fold predictions (honest input for calibrate).
    #[arg(long)]
    oof_out: Option<PathBuf>,
    /// Also write the report as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    #[command(flatten)]
    cv: CvArgs,
    #[command(flatten)]
    read: ReadArgs,
}

#[derive(Subcommand)]
enum EnsembleApply {
    /// Combine prediction files with a fitted ensemble into a submission.
    Apply {
        #[arg(long)]
        model: PathBuf,
        /// Prediction files, in the same member order as when fitting.
        #[arg(long, num_args = 1.., required = true)]
        preds: Vec<PathBuf>,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
struct CalibrateArgs {
    #[command(subcommand)]
    apply: Option<CalibrateApply>,
    /// Predictions to calibrate (ideally out-of-fold ones).
    #[arg(long)]
    preds: Option<PathBuf>,
    /// Labelled competition CSV (its texts also drive the degenerate-row rules).
    #[arg(long)]
    labels: Option<PathBuf>,
    /// The fitted calibration (JSON).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Reliability diagram PNG (before/after, per class).
    #[arg(long)]
    diagram: Option<PathBuf>,
    /// Also write the report as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    #[command(flatten)]
    cv: CvArgs,
    #[command(flatten)]
    read: ReadArgs,
}

/// The prompt-grouped cross-validation that judges a fit out of fold.
#[derive(Args, Clone, Copy)]
struct CvArgs {
    /// Prompt-grouped folds.
    #[arg(long, default_value_t = 5)]
    folds: usize,
    /// Seed of the fold assignment.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Subcommand)]
enum CalibrateApply {
    /// Apply a fitted calibration to a prediction file.
    Apply {
        #[arg(long)]
        calibration: PathBuf,
        #[arg(long)]
        preds: PathBuf,
        /// The test CSV (needed when a degenerate-row rule is on).
        #[arg(long)]
        test: Option<PathBuf>,
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        read: ReadArgs,
    },
}

/// Input length budgets (tokens).
#[derive(Args, Clone, Copy)]
struct FormatArgs {
    /// Longest input, special tokens included.
    #[arg(long, default_value_t = FormatOptions::default().max_len)]
    max_len: usize,
    /// Most tokens a prompt keeps.
    #[arg(long, default_value_t = FormatOptions::default().prompt_cap)]
    prompt_cap: usize,
    /// Fewest tokens each part keeps (if it has them) before others give up more.
    #[arg(long, default_value_t = FormatOptions::default().min_part)]
    min_part: usize,
    /// State each response's full length in words in its marker (as the model was trained).
    #[arg(long)]
    length_hints: bool,
}

impl FormatArgs {
    fn options(self) -> FormatOptions {
        FormatOptions {
            max_len: self.max_len,
            prompt_cap: self.prompt_cap,
            min_part: self.min_part,
            length_hints: self.length_hints,
        }
    }
}

#[derive(Args, Clone)]
struct FitArgs {
    /// Number of buckets; "auto" chooses by prompt-grouped 5-fold CV on the training data.
    #[arg(long, default_value = "auto", value_parser = parse_buckets)]
    buckets: BucketCount,
    /// What to measure on each response.
    #[arg(long, value_enum, default_value = "chars")]
    feature: Feature,
    /// tokenizer.json for --feature tokens.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Pseudo-counts of the overall prior added to each bucket.
    #[arg(long, default_value_t = BaselineConfig::default().smoothing)]
    smoothing: f64,
    /// Seed for fold assignment.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Clone, Copy)]
struct BucketCount(Option<usize>);

fn parse_buckets(s: &str) -> Result<BucketCount, String> {
    if s == "auto" {
        return Ok(BucketCount(None));
    }
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(BucketCount(Some(n))),
        _ => Err(format!("expected a positive number or 'auto', got {s:?}")),
    }
}

impl FitArgs {
    fn config(&self) -> BaselineConfig {
        BaselineConfig {
            feature: self.feature,
            buckets: self.buckets.0,
            smoothing: self.smoothing,
            tokenizer: self.tokenizer.clone(),
            seed: self.seed,
        }
    }
}

#[derive(Subcommand)]
enum BaselineCommand {
    /// Fit buckets on a labelled CSV and save them as JSON.
    ///
    /// Example: verdict baseline fit --train train.csv --out baseline.json --buckets auto
    Fit {
        #[arg(long)]
        train: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        fit: FitArgs,
        #[command(flatten)]
        read: ReadArgs,
    },
    /// Predict a CSV with a fitted baseline; writes a submission-format CSV.
    ///
    /// Example: verdict baseline predict --model baseline.json --test test.csv --out submission.csv
    Predict {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        test: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        read: ReadArgs,
    },
    /// Prompt-grouped k-fold cross-validation of the baseline.
    ///
    /// Example: verdict baseline cv --train train.csv --folds 5 --json cv.json
    Cv {
        #[arg(long)]
        train: PathBuf,
        #[arg(long, default_value_t = 5)]
        folds: usize,
        /// Also write the report as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Also write the out-of-fold predictions here (an ensemble member).
        #[arg(long)]
        oof_out: Option<PathBuf>,
        #[command(flatten)]
        fit: FitArgs,
        #[command(flatten)]
        read: ReadArgs,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::from(1)
        }
    }
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Demo { out, real, device } => {
            let models = if real {
                let dir = demo::fetched_models_dir();
                let (gemma, llama) = (dir.join("gemma3-270m"), dir.join("smollm2-135m-instruct"));
                for m in [&gemma, &llama] {
                    if !m.join("config.json").exists() {
                        anyhow::bail!("--real needs {} (run tools/fetch-models.sh)", m.display());
                    }
                }
                demo::DemoModels::Real { gemma, llama }
            } else {
                demo::DemoModels::Tiny
            };
            demo::run(&out, models, &device)
        }
        Command::Baseline(cmd) => run_baseline(cmd),
        Command::Probe(cmd) => verdict::probe::run_cli(&cmd),
        Command::Train(args) => verdict::train::run_cli(&args),
        Command::Cv(args) => verdict::train::cv::run_cli(&args),
        Command::Predict {
            model,
            adapter,
            test,
            out,
            tta,
            format,
            batch_tokens,
            logits_out,
            json,
            device,
            devices,
            read,
            quant,
        } => {
            let placement = if devices.is_empty() {
                device.device
            } else {
                Placement::cuda_devices(&devices)?
            };
            let (battles, _) = read_battles(&test, read.options())?;
            let formatter = Formatter::from_model_dir(&model, format.options())?;
            let (rows, stats) = placement.run(predict::PredictJob {
                model_dir: &model,
                adapter_dir: adapter.as_deref(),
                quant: quant.quant()?,
                formatter: &formatter,
                battles: &battles,
                options: PredictOptions {
                    tta_swap: tta == "swap",
                    batch_tokens,
                    base: None,
                },
            })?;
            let preds: Vec<Prediction> = rows
                .iter()
                .map(|r| Prediction {
                    id: r.id.clone(),
                    probs: r.probs,
                })
                .collect();
            write_predictions(&out, &preds)?;
            if let Some(path) = logits_out {
                predict::write_logits(&path, &rows)?;
            }
            if let Some(path) = json {
                verdict::atomic::write_json(&path, &stats)?;
            }
            println!(
                "wrote {} predictions -> {} ({:.1} rows/s, {:.0} tokens/s) on {}",
                stats.rows,
                out.display(),
                stats.rows_per_second,
                stats.tokens_per_second,
                predict::describe_devices(&stats.devices)
            );
            Ok(())
        }
        Command::Ensemble(args) => run_ensemble(args),
        Command::Calibrate(args) => run_calibrate(args),
        Command::Logits {
            model,
            adapter,
            ids,
            hidden,
            batch_tokens,
            device,
            quant,
        } => {
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            let ran_on = verdict::model::run_logits(
                &device.device,
                &model,
                adapter.as_deref(),
                quant.quant()?,
                &ids,
                LogitsOptions {
                    hidden,
                    batch_tokens,
                },
                &mut out,
            )?;
            std::io::Write::flush(&mut out)?;
            eprintln!("logits on {ran_on}");
            Ok(())
        }
        Command::Inspect { model, quant, json } => {
            let report = verdict::model::inspect::run_inspect(&model, quant.quant()?)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", verdict::model::inspect::format_memory_report(&report));
            }
            Ok(())
        }
        Command::Init {
            arch,
            preset,
            out,
            seed,
            dtype,
        } => {
            verdict::model::init_checkpoint(arch.parse()?, &preset, seed, &out, dtype.parse()?)?;
            println!(
                "wrote random {arch} {preset} checkpoint -> {}",
                out.display()
            );
            Ok(())
        }
        Command::Eval {
            preds,
            labels,
            json,
            read,
        } => {
            let scores = metrics::score_files(&preds, &labels, read.options())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&scores)?);
            } else {
                print!("{}", metrics::format_scores(&scores));
            }
            Ok(())
        }
        // Its own exit codes (no device is not a failure of the code under test).
        Command::Selftest(args) => std::process::exit(verdict::selftest::run(args)?.into()),
        // Its own exit codes, as selftest.
        Command::Bench(command) => std::process::exit(verdict::bench::run_cli(&command).into()),
    }
}

fn run_baseline(cmd: BaselineCommand) -> Result<()> {
    match cmd {
        BaselineCommand::Fit {
            train,
            out,
            fit,
            read,
        } => {
            let model = BaselineModel::fit(&observe_file(&train, &fit, read)?.0, &fit.config());
            verdict::atomic::write_json(&out, &model)?;
            for t in &model.bucket_trials {
                eprintln!(
                    "  buckets {:>4}: cv log loss {:.5}",
                    t.buckets, t.cv_log_loss
                );
            }
            println!(
                "fitted {} buckets on {} rows ({:?} feature) -> {}",
                model.buckets,
                model.train_rows,
                model.feature,
                out.display()
            );
            Ok(())
        }
        BaselineCommand::Predict {
            model,
            test,
            out,
            read,
        } => {
            let model = BaselineModel::load(&model)?;
            let mut reader = BattleReader::open(&test, read.options())?;
            let mut rows = Vec::new();
            loop {
                let chunk: Vec<Battle> = reader.by_ref().take(4096).collect::<Result<_>>()?;
                if chunk.is_empty() {
                    break;
                }
                let probs = model.predict(&chunk)?;
                rows.extend(
                    chunk
                        .into_iter()
                        .zip(probs)
                        .map(|(b, probs)| Prediction { id: b.id, probs }),
                );
            }
            report_skipped(&test, reader.stats());
            write_predictions(&out, &rows)?;
            println!("wrote {} predictions -> {}", rows.len(), out.display());
            Ok(())
        }
        BaselineCommand::Cv {
            train,
            folds,
            json,
            oof_out,
            fit,
            read,
        } => {
            let (observations, ids) = observe_file(&train, &fit, read)?;
            let report = baseline::cross_validate(&observations, folds, &fit.config())?;
            print!("{}", baseline::format_cv(&report));
            if let Some(path) = oof_out {
                let rows: Vec<Prediction> = ids
                    .into_iter()
                    .zip(&report.out_of_fold)
                    .map(|(id, p)| Prediction { id, probs: *p })
                    .collect();
                write_predictions(&path, &rows)?;
            }
            if let Some(path) = json {
                verdict::atomic::write_json(&path, &report)
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
            Ok(())
        }
    }
}

/// Streams a labelled CSV into baseline observations (flat memory for any file size), and
/// the ids of the rows they came from.
fn observe_file(
    path: &Path,
    fit: &FitArgs,
    read: ReadArgs,
) -> Result<(Vec<Observation>, Vec<String>)> {
    let mut reader = BattleReader::open(path, read.options())?;
    let mut ids = Vec::new();
    let rows = reader.by_ref().inspect(|b| {
        if let Ok(b) = b {
            ids.push(b.id.clone())
        }
    });
    let observations = baseline::observe(rows, fit.feature, fit.tokenizer.as_deref())
        .with_context(|| format!("reading {}", path.display()))?;
    report_skipped(path, reader.stats());
    Ok((observations, ids))
}

fn required<T>(value: Option<T>, flag: &str) -> Result<T> {
    value.with_context(|| format!("missing {flag}"))
}

fn run_ensemble(args: EnsembleArgs) -> Result<()> {
    if let Some(EnsembleApply::Apply { model, preds, out }) = args.apply {
        let model = ensemble::EnsembleModel::load(&model)?;
        let rows = ensemble::apply_ensemble(&model, &preds, &out)?;
        println!("wrote {rows} ensembled predictions -> {}", out.display());
        return Ok(());
    }
    if args.preds.is_empty() {
        anyhow::bail!("missing --preds (one prediction file per member)");
    }
    let labels = required(args.labels, "--labels")?;
    let out = required(args.out, "--out")?;
    let config = ensemble::EnsembleConfig {
        folds: args.cv.folds,
        seed: args.cv.seed,
    };
    let report = ensemble::fit_ensemble_files(&args.preds, &labels, args.read.options(), &config)?;
    print!("{}", ensemble::format_ensemble_report(&report));
    report.model.save(&out)?;
    if let Some(path) = args.oof_out {
        write_predictions(&path, &report.out_of_fold)?;
    }
    if let Some(path) = args.json {
        verdict::atomic::write_json(&path, &report)?;
    }
    Ok(())
}

fn run_calibrate(args: CalibrateArgs) -> Result<()> {
    if let Some(CalibrateApply::Apply {
        calibration,
        preds,
        test,
        out,
        read,
    }) = args.apply
    {
        let calibration = calibrate::Calibration::load(&calibration)?;
        let summary = calibrate::apply_calibration_files(
            &calibration,
            &preds,
            test.as_deref(),
            read.options(),
            &out,
        )?;
        println!(
            "wrote {} calibrated predictions -> {} ({} replaced by degenerate-row rules)",
            summary.rows,
            out.display(),
            summary.rule_rows
        );
        return Ok(());
    }
    let preds = required(args.preds, "--preds")?;
    let labels = required(args.labels, "--labels")?;
    let out = required(args.out, "--out")?;
    let config = calibrate::CalibrationConfig {
        folds: args.cv.folds,
        seed: args.cv.seed,
        ..Default::default()
    };
    let report = calibrate::fit_calibration_files(
        &preds,
        &labels,
        args.read.options(),
        &config,
        args.diagram.as_deref(),
    )?;
    print!("{}", calibrate::format_calibration_report(&report));
    report.calibration.save(&out)?;
    if let Some(path) = args.json {
        verdict::atomic::write_json(&path, &report)?;
    }
    Ok(())
}
