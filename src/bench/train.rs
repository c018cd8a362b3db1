//! `verdict bench train`: QLoRA training steps of a random Gemma 2 (`verdict init`'s 2b or 9b
//! preset) on a GPU: tokens/s and the pool's peak memory with its split by use. The other half
//! is `tools/bench_torch.py --mode train` (transformers + PEFT + bitsandbytes QLoRA of the same
//! random model and batch shape, on the same card), for issue #17's goals: at least 2.5x HF's
//! tokens/s, at most 35% of its peak memory.
//!
//! What a step is: the `verdict train` path itself ([`crate::train::train`]), NF4 projections
//! (double quantization), LoRA r = 16 (alpha 32, dropout 0.05) on all seven projections, the
//! score head, per-layer recomputation, one sequence of `--max-len` tokens per step (one
//! synthetic battle each, truncated to exactly that length), AdamW. Tokens/s is the median of
//! the steps after the first (which loads the kernel modules). The emulated device is refused:
//! its times say nothing about a GPU (`--emu-alloc-only` measures memory without one).

use super::{EXIT_FAILED, EXIT_NO_DEVICE};
use crate::backend::cuda::{self, Cuda, Device};
use crate::backend::{Backend, MemoryReport};
use crate::model::{write_checkpoint, Dtype, Family, Values};
use crate::quant::nf4::Nf4Options;
use crate::quant::Quant;
use crate::train::{self, Control, MetricsRecord, Outcome, TrainConfig};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// Flags of `verdict bench train`.
#[derive(Debug, Clone, clap::Args)]
pub struct TrainArgs {
    /// cuda or cuda:N.
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// Gemma 2 shapes: 2b or 9b (tiny: a check of the code path).
    #[arg(long, default_value = "2b", value_parser = ["tiny", "2b", "9b"])]
    pub preset: String,
    /// Tokens per step (one sequence).
    #[arg(long, default_value_t = 2048)]
    pub max_len: usize,
    /// Steps (the first is not timed).
    #[arg(long, default_value_t = 6)]
    pub steps: usize,
    /// A random checkpoint of the preset written earlier (`verdict init --arch gemma2 --preset
    /// P`); default: one is written into the scratch folder first (9B: 18.5 GB).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Scratch folder (checkpoint, data, run); default: a folder under the system's temp dir.
    #[arg(long)]
    pub scratch: Option<PathBuf>,
    /// Also write the result as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// What `verdict bench train` reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TrainBench {
    pub preset: String,
    pub device: String,
    pub tokens_per_step: usize,
    pub steps: usize,
    /// Median over the steps after the first.
    pub tokens_per_s: f64,
    /// Every step's tokens/s, the first included.
    pub step_tokens_per_s: Vec<f64>,
    pub trainable_params: usize,
    pub memory: Option<MemoryReport>,
}

/// `verdict bench train`; the exit code as `bench kernels` gives it.
pub fn run(args: &TrainArgs) -> Result<u8> {
    let ordinal = match args.device.parse::<Device>()? {
        Device::Cuda(ordinal) => ordinal,
        Device::Cpu => bail!("bench train times the CUDA backend: use --device cuda or cuda:N"),
        Device::Emu(_) => bail!(
            "bench train refuses the emulated device: its times say nothing about a GPU (for \
             memory without one: verdict train --device emu --emu-alloc-only, see \
             BENCHMARKS.md)"
        ),
    };
    if args.steps < 2 {
        bail!(
            "--steps {}: at least 2 (the first is not timed)",
            args.steps
        );
    }
    if let cuda::Probe::Unavailable(why) = cuda::probe() {
        eprintln!("no CUDA device: bench train needs a GPU ({why})");
        return Ok(EXIT_NO_DEVICE);
    }
    let backend = Cuda::new(ordinal).with_context(|| format!("cannot open cuda:{ordinal}"))?;
    let scratch = args.scratch.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("verdict-bench-train-{}", std::process::id()))
    });
    let result = bench(&backend, args, &scratch);
    if args.scratch.is_none() {
        let _ = std::fs::remove_dir_all(&scratch);
    }
    let report = match result {
        Ok(report) => report,
        Err(e) => {
            eprintln!("error: {e:#}");
            return Ok(EXIT_FAILED);
        }
    };
    println!(
        "bench train on {}: Gemma2-{} QLoRA (NF4, LoRA r16 on 7 projections), {} tokens per \
         step: {:.0} tokens/s (median of steps 2..{})",
        report.device, report.preset, report.tokens_per_step, report.tokens_per_s, report.steps
    );
    if let Some(memory) = &report.memory {
        print!("{}", memory.table());
    }
    if let Some(path) = &args.json {
        crate::atomic::write_json(path, &report)?;
    }
    Ok(0)
}

/// The steps on `backend`, with the checkpoint, data and run in `scratch`.
pub fn bench<B: Backend>(backend: &B, args: &TrainArgs, scratch: &Path) -> Result<TrainBench> {
    std::fs::create_dir_all(scratch)
        .with_context(|| format!("cannot create {}", scratch.display()))?;
    let model = match &args.model {
        Some(dir) => dir.clone(),
        None => {
            let dir = scratch.join(format!("gemma2-{}", args.preset));
            if !dir.exists() {
                eprintln!("[bench] writing a random Gemma2-{} checkpoint", args.preset);
                write_checkpoint(
                    Family::Gemma2,
                    &args.preset,
                    Values::Random(0),
                    &dir,
                    Dtype::BF16,
                )?;
            }
            dir
        }
    };
    let data = scratch.join("battles.csv");
    write_battles(&data, args.steps, args.max_len)?;
    let mut config = TrainConfig::new(model, data);
    config.quant = Quant::Nf4(Nf4Options::default());
    config.format.max_len = args.max_len;
    config.batch_tokens = args.max_len;
    config.swap_pairs = false;
    config.max_steps = Some(args.steps);
    config.save_every = 0;
    let run = scratch.join("run");
    let _ = std::fs::remove_dir_all(&run);
    let summary = match train::train(backend, &run, &config, false, Control::default())? {
        Outcome::Finished(summary) => summary,
        Outcome::Halted(step) => bail!("halted after step {step}"),
    };
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl"))?;
    let step_tokens_per_s: Vec<f64> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<MetricsRecord>(l).ok())
        .filter_map(|r| match r {
            MetricsRecord::Train(t) => Some(t.tokens_per_s),
            MetricsRecord::Valid(_) => None,
        })
        .collect();
    let mut timed = step_tokens_per_s[1..].to_vec();
    timed.sort_by(f64::total_cmp);
    Ok(TrainBench {
        preset: args.preset.clone(),
        device: summary.device.to_string(),
        tokens_per_step: args.max_len,
        steps: summary.steps,
        tokens_per_s: timed.get(timed.len() / 2).copied().unwrap_or(f64::NAN),
        step_tokens_per_s,
        trainable_params: summary.trainable_params,
        memory: summary.memory,
    })
}

/// `n` battles, each longer than `tokens` (byte-level tokenizer: a token a byte), different
/// from one another.
fn write_battles(path: &Path, n: usize, tokens: usize) -> Result<()> {
    let mut text = String::from(
        "id,model_a,model_b,prompt,response_a,response_b,winner_model_a,winner_model_b,winner_tie\n",
    );
    for i in 0..n {
        let part = |c: char| format!("\"[\"\"{i} {}\"\"]\"", c.to_string().repeat(tokens));
        text.push_str(&format!(
            "{i},a,b,{},{},{},{},{},{}\n",
            part('p'),
            part('a'),
            part('b'),
            (i % 3 == 0) as u8,
            (i % 3 == 1) as u8,
            (i % 3 == 2) as u8
        ));
    }
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}
