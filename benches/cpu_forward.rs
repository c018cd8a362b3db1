//! CPU forward speed, ours vs transformers, on a SmolLM2-135M-shaped model at 512 tokens.
//!
//! `VERDICT_PYTHON=/path/to/venv/bin/python cargo bench --bench cpu_forward`
//!
//! Writes (once) a random SmolLM2-135M checkpoint with `init_checkpoint` under
//! `target/bench-models/`, then alternates rounds of our decoder forward (final-norm hidden
//! states, no head) and of `tools/bench_torch_cpu.py` (transformers, float32, same folder,
//! same ids, same thread count), so that load from other processes hits both alike, and
//! prints the best time of each, the ratio and the largest difference of the last token's
//! hidden state (a same-work check). Without a Python that has torch and transformers, only
//! our number is printed. `VERDICT_BENCH_TOKENS` and `RAYON_NUM_THREADS` change the length
//! and the thread count.

use anyhow::{bail, Result};
use std::path::Path;
use std::process::Command;
use std::time::Instant;
use verdict::backend::cpu::Cpu;
use verdict::backend::Backend;
use verdict::model::{init_checkpoint, Dtype, Family, Model, PackedBatch};
use verdict::quant::Quant;
use verdict::rng::Rng;

/// Timed forwards per round (after one warm-up), for each side.
const REPS: usize = 3;
/// Alternating rounds.
const ROUNDS: usize = 2;

/// transformers' best time and last-token hidden state, from one run of the script.
fn torch_forward(
    python: &str,
    dir: &Path,
    ids: &[u32],
    threads: usize,
) -> Result<(f64, String, Vec<f32>)> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/bench_torch_cpu.py");
    let ids_arg = ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let out = Command::new(python)
        .arg(&script)
        .args(["--model", &dir.to_string_lossy(), "--ids", &ids_arg])
        .args([
            "--threads",
            &threads.to_string(),
            "--reps",
            &REPS.to_string(),
        ])
        .output()?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        bail!("{}", stderr.lines().last().unwrap_or("failed"));
    }
    let stdout = String::from_utf8(out.stdout)?;
    let result: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or("{}"))?;
    let seconds = result["seconds"].as_f64().unwrap_or(f64::NAN);
    let attention = result["attn_implementation"]
        .as_str()
        .unwrap_or("?")
        .to_string();
    Ok((
        seconds,
        attention,
        serde_json::from_value(result["last_hidden"].clone())?,
    ))
}

fn main() -> Result<()> {
    let tokens: usize = std::env::var("VERDICT_BENCH_TOKENS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512);
    let threads = rayon::current_num_threads();
    let python = std::env::var("VERDICT_PYTHON").unwrap_or_else(|_| "python3".into());
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-models/smollm2-135m-random");
    if !dir.exists() {
        init_checkpoint(Family::Llama, "135m", 0, &dir, Dtype::BF16)?;
    }
    let model = Model::load(&Cpu, &dir, None, Quant::None)?;
    let mut rng = Rng::new(1);
    let ids: Vec<u32> = (0..tokens)
        .map(|_| rng.below(model.spec.decoder.vocab_size) as u32)
        .collect();
    let batch = PackedBatch::new(std::slice::from_ref(&ids));
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "SmolLM2-135M shape, {tokens} tokens, {threads} threads (load average at start: {})",
        load.trim()
    );

    let (mut ours, mut theirs) = (f64::INFINITY, f64::INFINITY);
    let (mut hidden, mut torch) = (Vec::new(), None);
    model.hidden_states(&Cpu, &batch);
    for _ in 0..ROUNDS {
        for _ in 0..REPS {
            let start = Instant::now();
            let h = model.hidden_states(&Cpu, &batch);
            ours = ours.min(start.elapsed().as_secs_f64());
            hidden = Cpu.download(&h);
        }
        match torch_forward(&python, &dir, &ids, threads) {
            Ok((seconds, attention, last)) => {
                theirs = theirs.min(seconds);
                torch = Some((attention, last));
            }
            Err(e) => {
                println!("torch    skipped: {python}: {e} (set VERDICT_PYTHON to a Python with torch + transformers)");
                break;
            }
        }
    }
    println!(
        "verdict  CPU forward: {ours:.3} s, {:.0} tokens/s",
        tokens as f64 / ours
    );
    if let Some((attention, last)) = torch {
        let tail = &hidden[hidden.len() - last.len()..];
        let diff = tail
            .iter()
            .zip(&last)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        println!(
            "torch    CPU forward ({attention} attention): {theirs:.3} s, {:.0} tokens/s",
            tokens as f64 / theirs
        );
        println!("ratio    verdict speed / torch speed = {:.2}x   (last-token hidden max |Δ| = {diff:.2e})", theirs / ours);
    }
    Ok(())
}
