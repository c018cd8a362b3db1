//! The `verdict` command line: parses arguments and hands each command to its module
//! (`Args` and `run` live with the code they drive).

use clap::{Parser, Subcommand};
use std::process::ExitCode;
use verdict::{
    baseline, bundle, calibrate, demo, ensemble, model, predict, probe, submission, train,
};

#[derive(Parser)]
#[command(
    name = "verdict",
    version,
    about = "Fine-tune small LLMs as pairwise preference classifiers (LMSYS Chatbot Arena)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Device memory of each emulated device (--device emu), e.g. 16GiB (a T4: the
    /// default) or 80G; the same as VERDICT_EMU_MEMORY.
    #[arg(long, global = true, value_name = "SIZE", value_parser = parse_memory)]
    emu_memory: Option<usize>,
    /// Allocation-only emulated devices: allocations and frees are real operations of the
    /// device's pool (so the high-water mark is that of a real run), kernels do not run and
    /// no value is ever read back (train skips the loss, optimizer and adapter, and says so).
    /// For memory plans of full-size models: `verdict train --device emu --emu-alloc-only`.
    /// The same as VERDICT_EMU_ALLOC_ONLY=1; only with --device emu.
    #[arg(long, global = true)]
    emu_alloc_only: bool,
    /// Where CUDA kernels come from: auto (the prebuilt image for the card, NVRTC when none
    /// fits or loads), prebuilt (a prebuilt image or an error) or nvrtc
    /// (compiled at run time for the card, always); the same as VERDICT_KERNELS
    #[arg(long, global = true, value_name = "SOURCE", value_parser = ["auto", "prebuilt", "nvrtc"])]
    kernels: Option<String>,
}

fn parse_memory(text: &str) -> anyhow::Result<usize> {
    verdict::backend::cuda::emu::parse_size(text)
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole pipeline on the built-in sample of real arena rows.
    ///
    /// Example: verdict demo --out demo-out
    Demo(demo::Args),
    /// Raw classifier logits (and pooled hidden states) for token ids: the parity interface.
    ///
    /// Each line of IDS.jsonl is an object with an "ids" array; each output line is
    /// {"logits": [..] or null for a causal LM} plus "hidden" with --hidden.
    ///
    /// Example: verdict logits --model gemma2-tiny --ids ids.jsonl --hidden
    Logits(model::logits::Args),
    /// Parameters and memory of a model as loaded: per component (embedding, each projection
    /// over all layers, norms, head), dtype, total, bits per parameter of the quantized
    /// projections, and the peak resident memory of the load.
    ///
    /// Example: verdict inspect --model gemma2-2b --quant nf4 --json
    Inspect(model::inspect::Args),
    /// Write a random checkpoint with a real configuration (for tests and benchmarks).
    ///
    /// Example: verdict init --arch gemma2 --preset 2b --out gemma2-2b-random
    Init(model::init::Args),
    /// Predict battles with a classifier (optionally with a LoRA adapter); writes a submission.
    ///
    /// Example: verdict predict --model gemma2-2b --adapter run1 --test test.csv --out preds.csv --tta swap
    Predict(predict::Args),
    /// Fit convex ensemble weights over prediction files (or apply fitted ones).
    ///
    /// Example: verdict ensemble --preds gemma.csv llama.csv baseline.csv --labels valid.csv --out ens.json --oof-out ens-oof.csv
    ///
    /// Example: verdict ensemble apply --model ens.json --preds gemma-test.csv llama-test.csv baseline-test.csv --out submission.csv
    Ensemble(ensemble::Args),
    /// Fit calibration (temperature, threshold-multiplier rule, degenerate-row rules), or apply it.
    ///
    /// Example: verdict calibrate --preds ens-oof.csv --labels valid.csv --out calib.json --diagram reliability.png
    ///
    /// Example: verdict calibrate apply --calibration calib.json --preds preds.csv --test test.csv --out submission.csv
    Calibrate(calibrate::Args),
    /// Fine-tune a model as a 3-way preference classifier with LoRA (PEFT adapter out).
    ///
    /// Writes RUN/adapter_config.json + adapter_model.safetensors (a PEFT adapter for
    /// `verdict predict --adapter RUN`), RUN/checkpoints/, RUN/metrics.jsonl, RUN/loss.png and
    /// RUN/summary.json. `--resume RUN` continues a killed run exactly.
    ///
    /// Example: verdict train --model gemma2-2b --train train.csv --valid valid.csv --out run1 --heads three --eval-every 200
    Train(train::Args),
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
    Cv(train::cv::Args),
    /// Length-difference bucket baseline (no model needed).
    #[command(subcommand)]
    Baseline(baseline::Command),
    /// Response-embedding probe: the frozen decoder's mean hidden state of each response,
    /// a regularised linear head on top of the length baseline.
    ///
    /// Example: verdict probe cv --model smollm2-135m --train arena-dev.csv --out probe-smol --folds 3
    #[command(subcommand)]
    Probe(probe::Command),
    /// Score a prediction file against labelled rows.
    ///
    /// Example: verdict eval --preds preds.csv --labels valid.csv --json
    Eval(submission::EvalArgs),
    /// Check every CUDA op, then whole tiny models, against the CPU reference.
    ///
    /// Exit code 0: all passed; 1: a check failed; 3: no CUDA device here.
    /// VERDICT_KERNELS=nvrtc compiles the kernels at run time instead of loading the
    /// prebuilt ones.
    ///
    /// Example: verdict selftest --device cuda --json selftest.json
    Selftest(verdict::selftest::Args),
    /// The folder to upload as a Kaggle dataset: this binary, a README, an offline inference
    /// notebook (GPUs, else the CPU) and a T4 training notebook.
    ///
    /// Example: verdict bundle --out kaggle-bundle
    Bundle(bundle::Args),
    /// Benchmarks on a GPU against ceilings measured in the same run.
    #[command(subcommand)]
    Bench(verdict::bench::Command),
}

fn main() -> ExitCode {
    verdict::backend::cpu::keep_freed_memory();
    let cli = Cli::parse();
    if let Some(bytes) = cli.emu_memory {
        // Read where an emulated device opens, whichever command opens it; set before any
        // thread starts.
        std::env::set_var(verdict::backend::cuda::emu::MEMORY_ENV, bytes.to_string());
    }
    if cli.emu_alloc_only {
        std::env::set_var(verdict::backend::cuda::emu::ALLOC_ONLY_ENV, "1");
    }
    if let Some(source) = &cli.kernels {
        std::env::set_var(verdict::backend::cuda::KERNELS_ENV, source);
    }
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprint!("{}", top_down(&e));
            ExitCode::from(1)
        }
    }
}

/// An error as the user reads it: the problem first, then what was being done, innermost
/// first. anyhow's chain runs the other way (the outermost context first), which put
/// "on cpu" or "loading MODEL" above the cause. A foreign root (an I/O or parse error, which
/// names no file) is joined to the context just above it, which does.
fn top_down(e: &anyhow::Error) -> String {
    let mut chain: Vec<String> = e.chain().map(ToString::to_string).collect();
    let root = e.root_cause();
    let foreign = root.is::<std::io::Error>()
        || root.is::<serde_json::Error>()
        || root.is::<csv::Error>()
        || root.is::<std::num::ParseIntError>()
        || root.is::<std::num::ParseFloatError>();
    if foreign && chain.len() > 1 {
        let cause = chain.pop().unwrap_or_default();
        let context = chain.pop().unwrap_or_default();
        chain.push(format!("{context}: {cause}"));
    }
    let mut lines = chain.into_iter().rev();
    let mut out = format!("error: {}\n", lines.next().unwrap_or_default());
    for context in lines {
        out.push_str(&format!("  while: {context}\n"));
    }
    out
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Demo(args) => demo::run(&args),
        Command::Baseline(command) => baseline::run(&command),
        Command::Probe(command) => probe::run(&command),
        Command::Train(args) => train::run(&args),
        Command::Cv(args) => train::cv::run(&args),
        Command::Predict(args) => predict::run(&args),
        Command::Ensemble(args) => ensemble::run(&args),
        Command::Calibrate(args) => calibrate::run(&args),
        Command::Logits(args) => model::logits::run(&args),
        Command::Inspect(args) => model::inspect::run(&args),
        Command::Init(args) => model::init::run(&args),
        Command::Eval(args) => submission::eval(&args),
        Command::Bundle(args) => bundle::run(&args),
        // Its own exit codes (no device is not a failure of the code under test).
        Command::Selftest(args) => std::process::exit(verdict::selftest::run(args)?.into()),
        // Its own exit codes, as selftest.
        Command::Bench(command) => std::process::exit(verdict::bench::run(&command)?.into()),
    }
}
