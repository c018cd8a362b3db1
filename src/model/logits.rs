//! `verdict logits`: raw classifier outputs for token ids, the parity check against
//! transformers.
//!
//! Input: JSONL, one object per line with an `ids` array (other fields ignored). Output: one
//! JSON line per input, same order: `{"logits": [..] | null}` (null for a checkpoint without
//! score head), plus `"hidden": [..]` (final-norm hidden state at the pooled token) when asked.

use crate::backend::cpu::Cpu;
use crate::model::{Model, PackedBatch};
use crate::quant::Quant;
use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use std::io::{BufRead, Write};
use std::path::Path;

/// Tokens per packed batch: bounds the activation memory of one forward.
const BATCH_TOKENS: usize = 8192;

/// Reads `ids_path`, runs the model in `model_dir` (with the adapter in `adapter_dir`, the
/// projections held as `quant` says) on the CPU, writes one JSON line per input to `out`.
pub fn run_logits(
    model_dir: &Path,
    adapter_dir: Option<&Path>,
    quant: Quant,
    ids_path: &Path,
    with_hidden: bool,
    out: &mut impl Write,
) -> Result<()> {
    let inputs = read_ids(ids_path)?;
    let cpu = Cpu;
    let model = Model::load(&cpu, model_dir, adapter_dir, quant)?;
    let vocab = model.spec.decoder.vocab_size;
    for (line, ids) in &inputs {
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            anyhow::bail!(
                "{}:{line}: token id {bad} is outside the vocabulary of {vocab}",
                ids_path.display()
            );
        }
    }
    let mut start = 0;
    while start < inputs.len() {
        let mut end = start + 1;
        let mut tokens = inputs[start].1.len();
        while end < inputs.len() && tokens + inputs[end].1.len() <= BATCH_TOKENS {
            tokens += inputs[end].1.len();
            end += 1;
        }
        let sequences: Vec<&[u32]> = inputs[start..end]
            .iter()
            .map(|(_, ids)| ids.as_slice())
            .collect();
        let result = model.classify(&cpu, &PackedBatch::new(&sequences));
        for s in 0..sequences.len() {
            let mut line = json!({"logits": result.logits.as_ref().map(|l| &l[s])});
            if with_hidden {
                line["hidden"] = json!(result.hidden[s]);
            }
            writeln!(out, "{line}")?;
        }
        start = end;
    }
    out.flush()?;
    Ok(())
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
