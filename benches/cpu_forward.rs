//! CPU forward speed, ours vs transformers, on random SmolLM2-135M- and Gemma 3 270M-shaped
//! models: the full forward at 512 tokens and the probe's embedding pass (16 sequences of 128
//! tokens through two thirds of the layers, as `probe::embed` runs them).
//!
//! `VERDICT_PYTHON=/path/to/venv/bin/python cargo bench --bench cpu_forward`
//!
//! Writes (once) each random checkpoint with `init_checkpoint` under `target/bench-models/`,
//! then alternates rounds of our forward with f32 and with bf16 projections (`--quant bf16`)
//! and of `tools/bench_torch_cpu.py` (transformers in float32 and in bfloat16, same folder,
//! same ids, same thread count), so that load from other processes hits all alike, and
//! prints the best time of each and the speeds relative to torch's float32. Same-work checks:
//! the largest difference of the last token's hidden state from torch float32, and of our
//! bf16 hidden states from our f32 ones relative to their RMS. Without a Python that has
//! torch and transformers, only our numbers are printed. `VERDICT_BENCH_TOKENS` and
//! `RAYON_NUM_THREADS` change the length and the thread count, `VERDICT_BENCH_MODEL=smollm2`
//! (or `gemma`) runs one model.

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
/// The probe's embedding pass: sequences × tokens (its `max_len`) per batch.
const EMBED_BATCH: (usize, usize) = (16, 128);

/// One workload: `sequences` × `len` token ids through `layers` layers (all of them: the
/// final-norm hidden states; fewer: the residual stream after them, no final norm).
struct Pass {
    what: String,
    sequences: usize,
    len: usize,
    layers: usize,
}

/// A side's best time and last-token hidden state.
#[derive(Default)]
struct Timed {
    seconds: f64,
    last: Vec<f32>,
}

impl Timed {
    fn new() -> Timed {
        Timed {
            seconds: f64::INFINITY,
            last: Vec::new(),
        }
    }
}

/// transformers' best time and last-token hidden state, from one run of the script.
fn torch_forward(
    python: &str,
    dir: &Path,
    ids: &[u32],
    pass: &Pass,
    all_layers: bool,
    dtype: &str,
    threads: usize,
) -> Result<(f64, String, Vec<f32>)> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/bench_torch_cpu.py");
    let ids_arg = ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let mut command = Command::new(python);
    command
        .arg(&script)
        .args(["--model", &dir.to_string_lossy(), "--ids", &ids_arg])
        .args(["--batch", &pass.sequences.to_string(), "--dtype", dtype])
        .args([
            "--threads",
            &threads.to_string(),
            "--reps",
            &REPS.to_string(),
        ]);
    if !all_layers {
        command.args(["--layers", &pass.layers.to_string()]);
    }
    let out = command.output()?;
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

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

fn main() -> Result<()> {
    verdict::backend::cpu::keep_freed_memory();
    let tokens: usize = std::env::var("VERDICT_BENCH_TOKENS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512);
    let threads = rayon::current_num_threads();
    let python = std::env::var("VERDICT_PYTHON").unwrap_or_else(|_| "python3".into());
    let load = || std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "{threads} threads, load average at start: {}",
        load().trim()
    );
    println!("| model | pass | verdict f32 | verdict bf16 | torch f32 | torch bf16 | verdict f32 / torch f32 | verdict bf16 / torch f32 | last-token max abs diff, f32 vs torch f32 | bf16 vs f32, max abs diff / RMS |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut torch_ok = true;
    let only = std::env::var("VERDICT_BENCH_MODEL").unwrap_or_default();
    for (name, family, preset) in [
        ("SmolLM2-135M", Family::Llama, "135m"),
        ("Gemma 3 270M", Family::Gemma3, "270m"),
    ] {
        if !name.to_lowercase().contains(&only.to_lowercase()) {
            continue;
        }
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("target/bench-models")
            .join(format!("{family}-{preset}-random").to_lowercase());
        if !dir.exists() {
            init_checkpoint(family, preset, 0, &dir, Dtype::BF16)?;
        }
        let f32_model = Model::load(&Cpu, &dir, None, Quant::None)?;
        let bf16_model = Model::load(&Cpu, &dir, None, Quant::Bf16)?;
        let spec = &f32_model.spec.decoder;
        let layers = spec.layers.len();
        let passes = [
            Pass {
                what: format!("forward, {tokens} tokens"),
                sequences: 1,
                len: tokens,
                layers,
            },
            Pass {
                what: format!(
                    "probe embedding, {} × {} tokens, {} of {layers} layers",
                    EMBED_BATCH.0,
                    EMBED_BATCH.1,
                    2 * layers / 3
                ),
                sequences: EMBED_BATCH.0,
                len: EMBED_BATCH.1,
                layers: 2 * layers / 3,
            },
        ];
        for pass in passes {
            let mut rng = Rng::new(1);
            let ids: Vec<u32> = (0..pass.sequences * pass.len)
                .map(|_| rng.below(spec.vocab_size) as u32)
                .collect();
            let sequences: Vec<&[u32]> = ids.chunks(pass.len).collect();
            let batch = PackedBatch::new(&sequences);
            let all_layers = pass.layers == layers;
            let run = |model: &Model<Cpu>| -> Vec<f32> {
                let h = if all_layers {
                    model.hidden_states(&Cpu, &batch)
                } else {
                    model.decoder.hidden_after(&Cpu, &batch, pass.layers)
                };
                Cpu.download(&h)
            };
            let (mut ours, mut ours_bf16) = (Timed::new(), Timed::new());
            let (mut theirs, mut theirs_bf16) = (Timed::new(), Timed::new());
            let mut attention = String::new();
            for model in [&f32_model, &bf16_model] {
                run(model);
            }
            for _ in 0..ROUNDS {
                for (model, timed) in [(&f32_model, &mut ours), (&bf16_model, &mut ours_bf16)] {
                    for _ in 0..REPS {
                        let start = Instant::now();
                        let h = run(model);
                        timed.seconds = timed.seconds.min(start.elapsed().as_secs_f64());
                        timed.last = h;
                    }
                }
                for (dtype, timed) in [("float32", &mut theirs), ("bfloat16", &mut theirs_bf16)] {
                    if !torch_ok {
                        break;
                    }
                    match torch_forward(&python, &dir, &ids, &pass, all_layers, dtype, threads) {
                        Ok((seconds, attn, last)) => {
                            timed.seconds = timed.seconds.min(seconds);
                            timed.last = last;
                            attention = attn;
                        }
                        Err(e) => {
                            println!("torch skipped: {python}: {e} (set VERDICT_PYTHON to a Python with torch + transformers)");
                            torch_ok = false;
                        }
                    }
                }
            }
            let n = ids.len() as f64;
            let cell = |t: &Timed| {
                if t.seconds.is_finite() {
                    format!("{:.3} s, {:.0} tok/s", t.seconds, n / t.seconds)
                } else {
                    "-".into()
                }
            };
            let ratio = |t: &Timed| {
                if theirs.seconds.is_finite() {
                    format!("{:.2}×", theirs.seconds / t.seconds)
                } else {
                    "-".into()
                }
            };
            let torch_diff = if theirs.last.is_empty() {
                "-".into()
            } else {
                let tail = &ours.last[ours.last.len() - theirs.last.len()..];
                format!("{:.1e} ({attention})", max_abs_diff(tail, &theirs.last))
            };
            let rms =
                (ours.last.iter().map(|v| v * v).sum::<f32>() / ours.last.len() as f32).sqrt();
            println!(
                "| {name} | {} | {} | {} | {} | {} | {} | {} | {torch_diff} | {:.1e} |",
                pass.what,
                cell(&ours),
                cell(&ours_bf16),
                cell(&theirs),
                cell(&theirs_bf16),
                ratio(&ours),
                ratio(&ours_bf16),
                max_abs_diff(&ours_bf16.last, &ours.last) / rms,
            );
        }
    }
    println!("load average at end: {}", load().trim());
    Ok(())
}
