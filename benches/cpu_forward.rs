//! CPU forward speed, ours vs transformers, on a SmolLM2-135M-shaped model at 512 tokens.
//!
//! `VERDICT_PYTHON=/path/to/venv/bin/python cargo bench --bench cpu_forward`
//!
//! Writes (once) a random SmolLM2-135M checkpoint with `init_checkpoint` under
//! `target/bench-models/`, times our decoder forward (final-norm hidden states, no head;
//! best of a few runs after a warm-up), then runs `tools/bench_torch_cpu.py` on the same
//! folder, the same ids and the same thread count, and prints both speeds, the ratio and the
//! largest difference of the last token's hidden state (a same-work check). Without a Python
//! that has torch and transformers, only our number is printed.
//! `VERDICT_BENCH_TOKENS` and `RAYON_NUM_THREADS` change the length and the thread count.

use std::path::Path;
use std::process::Command;
use std::time::Instant;
use verdict::backend::cpu::Cpu;
use verdict::backend::Backend;
use verdict::model::{init_checkpoint, Dtype, Family, Model, PackedBatch};
use verdict::rng::Rng;

const REPS: usize = 3;

fn main() -> anyhow::Result<()> {
    let tokens: usize = std::env::var("VERDICT_BENCH_TOKENS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512);
    let threads = rayon::current_num_threads();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-models/smollm2-135m-random");
    if !dir.exists() {
        init_checkpoint(Family::Llama, "135m", 0, &dir, Dtype::BF16)?;
    }
    let model = Model::load(&Cpu, &dir, None)?;
    let vocab = model.spec.decoder.vocab_size;
    let mut rng = Rng::new(1);
    let ids: Vec<u32> = (0..tokens).map(|_| rng.below(vocab) as u32).collect();
    let batch = PackedBatch::new(&[ids.clone()]);

    model.hidden_states(&Cpu, &batch);
    let mut best = f64::INFINITY;
    let mut hidden = Vec::new();
    for _ in 0..REPS {
        let start = Instant::now();
        let h = model.hidden_states(&Cpu, &batch);
        best = best.min(start.elapsed().as_secs_f64());
        hidden = Cpu.download(&h);
    }
    let ours = tokens as f64 / best;
    println!("verdict  CPU forward, SmolLM2-135M shape, {tokens} tokens, {threads} threads: {best:.3} s, {ours:.0} tokens/s");

    let python = std::env::var("VERDICT_PYTHON").unwrap_or_else(|_| "python3".into());
    let ids_arg = ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/bench_torch_cpu.py");
    let run = Command::new(&python)
        .arg(&script)
        .args([
            "--model",
            dir.to_str().unwrap(),
            "--threads",
            &threads.to_string(),
            "--reps",
            &REPS.to_string(),
            "--ids",
            &ids_arg,
        ])
        .output();
    let torch = match run {
        Ok(out) if out.status.success() => out,
        Ok(out) => {
            println!(
                "torch    skipped: {python} failed: {}",
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            );
            return Ok(());
        }
        Err(e) => {
            println!("torch    skipped: cannot run {python}: {e} (set VERDICT_PYTHON)");
            return Ok(());
        }
    };
    let line = String::from_utf8(torch.stdout)?;
    let result: serde_json::Value = serde_json::from_str(line.lines().last().unwrap_or("{}"))?;
    let theirs = result["tokens_per_s"].as_f64().unwrap_or(f64::NAN);
    let last: Vec<f32> = serde_json::from_value(result["last_hidden"].clone())?;
    let hidden_size = last.len();
    let diff = hidden[hidden.len() - hidden_size..]
        .iter()
        .zip(&last)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    println!(
        "torch    CPU forward ({} attention), same ids, {threads} threads: {:.3} s, {theirs:.0} tokens/s",
        result["attn_implementation"].as_str().unwrap_or("?"),
        result["seconds"].as_f64().unwrap_or(f64::NAN)
    );
    println!(
        "ratio    verdict / torch = {:.2}x   (last-token hidden max |Δ| = {diff:.2e})",
        ours / theirs
    );
    Ok(())
}
