//! `verdict logits`: raw classifier outputs for token ids, the parity check against
//! transformers.
//!
//! Input: JSONL, one object per line with an `ids` array (other fields ignored). Output: one
//! JSON line per input, same order: `{"logits": [..] | null}` (null for a checkpoint without
//! score head), plus `"hidden": [..]` (final-norm hidden state at the pooled token) when asked.
//! It runs on any backend (`--device`), so the same file compares CUDA with the CPU.

use crate::backend::placement::{on_each, Job, Placement};
use crate::backend::{Backend, BackendInfo};
use crate::cli::range;
use crate::cli::DeviceArgs;
use crate::model::{Model, PackedBatch};
use crate::quant::{Quant, QuantArgs};
use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

/// How `verdict logits` runs.
#[derive(Debug, Clone, Copy)]
pub struct LogitsOptions {
    /// Also print the final-norm hidden state at the pooled token.
    pub hidden: bool,
    /// Most tokens in one packed batch: bounds the activation memory of one forward.
    pub batch_tokens: usize,
}

impl Default for LogitsOptions {
    fn default() -> LogitsOptions {
        LogitsOptions {
            hidden: false,
            batch_tokens: 8192,
        }
    }
}

/// `verdict logits`'s flags.
#[derive(clap::Args, Debug)]
pub struct Args {
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
    #[arg(long, allow_negative_numbers = true, value_parser = range::count, default_value_t = LogitsOptions::default().batch_tokens)]
    batch_tokens: usize,
    #[command(flatten)]
    device: DeviceArgs,
    #[command(flatten)]
    quant: QuantArgs,
}

/// `verdict logits`: JSON lines on stdout, the device on stderr.
pub fn run(args: &Args) -> Result<()> {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let ran_on = run_logits(
        &args.device.device,
        &args.model,
        args.adapter.as_deref(),
        args.quant.quant()?,
        &args.ids,
        LogitsOptions {
            hidden: args.hidden,
            batch_tokens: args.batch_tokens,
        },
        &mut out,
    )?;
    out.flush()?;
    eprintln!("logits on {ran_on}");
    Ok(())
}

/// Reads `ids_path`, runs the model in `model_dir` (with the adapter in `adapter_dir`, the
/// projections held as `quant` says) on the device `placement` names, writes one JSON line
/// per input to `out`. Returns the device it ran on and its memory high-water mark.
pub fn run_logits(
    placement: &Placement,
    model_dir: &Path,
    adapter_dir: Option<&Path>,
    quant: Quant,
    ids_path: &Path,
    options: LogitsOptions,
    out: &mut impl Write,
) -> Result<BackendInfo> {
    let inputs = read_ids(ids_path)?;
    placement.run(LogitsJob {
        model_dir,
        adapter_dir,
        quant,
        ids_path,
        inputs: &inputs,
        options,
        out,
    })
}

/// The body of [`run_logits`], once for every backend type.
struct LogitsJob<'a, W> {
    model_dir: &'a Path,
    adapter_dir: Option<&'a Path>,
    quant: Quant,
    ids_path: &'a Path,
    inputs: &'a [(usize, Vec<u32>)],
    options: LogitsOptions,
    out: &'a mut W,
}

impl<W: Write> Job for LogitsJob<'_, W> {
    type Output = BackendInfo;

    fn run<B: Backend>(self, backends: &[B]) -> Result<BackendInfo> {
        let [backend] = backends else {
            anyhow::bail!("verdict logits runs on one device, not {}", backends.len());
        };
        let (inputs, out) = (self.inputs, self.out);
        let model = on_each(backends, |b| {
            Model::load(b, self.model_dir, self.adapter_dir, self.quant)
                .with_context(|| format!("loading {}", self.model_dir.display()))
        })?
        .remove(0);
        let vocab = model.spec.decoder.vocab_size;
        for (line, ids) in inputs {
            if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
                anyhow::bail!(
                    "{}:{line}: token id {bad} is outside the vocabulary of {vocab}",
                    self.ids_path.display()
                );
            }
        }
        let mut start = 0;
        while start < inputs.len() {
            let mut end = start + 1;
            let mut tokens = inputs[start].1.len();
            while end < inputs.len() && tokens + inputs[end].1.len() <= self.options.batch_tokens {
                tokens += inputs[end].1.len();
                end += 1;
            }
            let sequences: Vec<&[u32]> = inputs[start..end]
                .iter()
                .map(|(_, ids)| ids.as_slice())
                .collect();
            let result = model.classify(backend, &PackedBatch::new(&sequences));
            backend.check().with_context(|| {
                format!(
                    "{}:{}-{}: a batch of {tokens} tokens (--batch-tokens {})",
                    self.ids_path.display(),
                    inputs[start].0,
                    inputs[end - 1].0,
                    self.options.batch_tokens
                )
            })?;
            for s in 0..sequences.len() {
                let mut line = json!({"logits": result.logits.as_ref().map(|l| &l[s])});
                if self.options.hidden {
                    line["hidden"] = json!(result.hidden[s]);
                }
                writeln!(out, "{line}")?;
            }
            start = end;
        }
        out.flush()?;
        Ok(backend.describe())
    }
}

/// The `ids` of each non-blank line, with its 1-based line number.
fn read_ids(path: &Path) -> Result<Vec<(usize, Vec<u32>)>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut inputs = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let at = || format!("{}:{}", path.display(), i + 1);
        let line = line.with_context(at)?;
        if line.trim().is_empty() {
            continue;
        }
        let value: Value =
            serde_json::from_str(&line).with_context(|| format!("{}: not JSON", at()))?;
        let ids = value
            .get("ids")
            .and_then(Value::as_array)
            .with_context(|| format!("{}: no `ids` array", at()))?;
        let ids = ids
            .iter()
            .map(|v| {
                v.as_u64()
                    .and_then(|v| u32::try_from(v).ok())
                    .with_context(|| format!("{}: `ids` entry {v} is not a token id", at()))
            })
            .collect::<Result<Vec<u32>>>()?;
        ensure!(!ids.is_empty(), "{}: `ids` is empty", at());
        inputs.push((i + 1, ids));
    }
    Ok(inputs)
}
