//! The memory plan of issue #17, checked without a GPU on every commit: one
//! allocation-only training step (`--device emu --emu-alloc-only`) of shapes-only Gemma2-2B
//! and Gemma2-9B checkpoints (`verdict init --no-values`: real safetensors headers, sparse
//! data regions), NF4 projections, LoRA r = 16 on all seven projections, 2048 tokens per
//! step, per-layer recomputation. The pool's high-water mark must stay within the budgets
//! below (BENCHMARKS.md has the table and how it was measured); the split by use must add up
//! to it; and nothing computed from unwritten values may come out (no adapter, no loss).
//! Also: a shapes-only checkpoint is refused everywhere else, and reads back from an
//! allocation-only device are refused.
//!
//! Cost: about a second per step and a few hundred KB of disk (the 9B file is 18.5 GB long
//! but a hole).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Gemma2-9B, 2048 tokens: issue #17's target, 10 GB (10^10 bytes; measured 9,300,481,024
/// with AdamW's moments on the device, the layer inputs kept in 16 bits and the fused LoRA).
const BUDGET_9B: u64 = 10_000_000_000;
/// Gemma2-2B, 2048 tokens: issue #17's target, 4 GB (4·10^9 bytes; measured 3,918,729,216:
/// 2% under it). Until the layer inputs were kept in 16 bits this was 4 GiB, for margin.
const BUDGET_2B: u64 = 4_000_000_000;

fn verdict(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_verdict"))
        .args(args)
        .output()
        .expect("verdict runs")
}

fn ok(args: &[&str]) -> String {
    let out = verdict(args);
    assert!(
        out.status.success(),
        "verdict {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fails(args: &[&str]) -> String {
    let out = verdict(args);
    assert!(!out.status.success(), "verdict {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// One battle longer than any --max-len used here (byte-level tokenizer: a token a byte).
fn long_battle(dir: &Path) -> PathBuf {
    let path = dir.join("long.csv");
    let text = |c: &str, n: usize| format!("\"[\"\"{}\"\"]\"", c.repeat(n));
    std::fs::write(
        &path,
        format!(
            "id,model_a,model_b,prompt,response_a,response_b,winner_model_a,winner_model_b,winner_tie\n\
             1,a,b,{},{},{},1,0,0\n",
            text("p", 3000),
            text("a", 3000),
            text("b", 3000)
        ),
    )
    .unwrap();
    path
}

fn shapes_only(dir: &Path, preset: &str) -> PathBuf {
    let model = dir.join(format!("gemma2-{preset}"));
    ok(&[
        "init",
        "--arch",
        "gemma2",
        "--preset",
        preset,
        "--no-values",
        "--out",
        model.to_str().unwrap(),
    ]);
    model
}

/// One allocation-only step; returns summary.json.
fn step(dir: &Path, model: &Path, train: &Path, tokens: usize) -> serde_json::Value {
    let run = dir.join(format!(
        "run-{}-{tokens}",
        model.file_name().unwrap().to_string_lossy()
    ));
    let tokens = tokens.to_string();
    let stdout = ok(&[
        "train",
        "--device",
        "emu",
        "--emu-alloc-only",
        "--model",
        model.to_str().unwrap(),
        "--quant",
        "nf4",
        "--lora-r",
        "16",
        "--targets",
        "q,k,v,o,gate,up,down",
        "--train",
        train.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
        "--max-steps",
        "1",
        "--max-len",
        &tokens,
        "--batch-tokens",
        &tokens,
        "--no-swap-pairs",
    ]);
    assert!(stdout.contains("allocation-only"), "{stdout}");
    assert!(stdout.contains("saved_activations"), "{stdout}");
    for absent in [
        "adapter_model.safetensors",
        "adapter_config.json",
        "loss.png",
        "checkpoints",
    ] {
        assert!(
            !run.join(absent).exists(),
            "{absent} written from no values"
        );
    }
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["tokens_seen"], 2048, "{summary}");
    assert!(summary["loss_last_10"].is_null(), "{summary}");
    assert!(!summary["skipped"].as_array().unwrap().is_empty());
    let memory = &summary["memory"];
    assert_eq!(memory["values_computed"], false);
    let split: u64 = memory["at_peak"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(split, memory["peak_in_use_bytes"].as_u64().unwrap());
    summary
}

#[test]
fn gemma2_steps_at_2048_tokens_fit_their_budgets() {
    if !common::emulator_or_skip("the memory plan") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let train = long_battle(dir.path());
    for (preset, budget) in [("2b", BUDGET_2B), ("9b", BUDGET_9B)] {
        let model = shapes_only(dir.path(), preset);
        let file = model.join("model.safetensors");
        let meta = std::fs::metadata(&file).unwrap();
        {
            use std::os::unix::fs::MetadataExt;
            assert!(meta.len() > 5_000_000_000, "{preset}: {} bytes", meta.len());
            assert!(
                meta.blocks() * 512 < 100 << 20,
                "{preset}: the shapes-only file takes {} bytes of disk",
                meta.blocks() * 512
            );
        }
        let summary = step(dir.path(), &model, &train, 2048);
        let memory = &summary["memory"];
        let peak = memory["peak_in_use_bytes"].as_u64().unwrap();
        let at = |k: &str| memory["at_peak"][k].as_u64().unwrap();
        eprintln!("{preset}: peak {peak} bytes, {}", memory["at_peak"]);
        assert!(
            peak <= budget,
            "Gemma2-{preset} at 2048 tokens: peak {peak} bytes > budget {budget}: {}",
            memory["at_peak"]
        );
        // Each use holds something, and the weights are the most of it (NF4 + 16-bit table).
        for k in ["weights", "adapters", "saved_activations", "recomputation"] {
            assert!(at(k) > 0, "{preset}: nothing under {k}");
        }
        assert!(at("weights") > peak / 2);
    }
}

#[test]
fn shapes_only_checkpoints_and_device_reads_are_refused_outside_alloc_only() {
    if !common::emulator_or_skip("the memory plan") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let model = shapes_only(dir.path(), "2b");
    let m = model.to_str().unwrap();
    let ids = dir.path().join("ids.jsonl");
    std::fs::write(&ids, "{\"ids\": [1, 5, 9]}\n").unwrap();
    let ids = ids.to_str().unwrap();
    // `verdict logits` of the shapes-only model on `device`, with `extra` flags: its error.
    let logits = |device: &str, extra: &[&str]| {
        let base = ["logits", "--model", m, "--ids", ids, "--device", device];
        fails(&[&base[..], extra].concat())
    };
    for device in ["cpu", "emu"] {
        let err = logits(device, &[]);
        assert!(
            err.contains("holds shapes but no values"),
            "{device}: {err}"
        );
    }
    let err = logits("cpu", &["--emu-alloc-only"]);
    assert!(err.contains("applies to emulated devices only"), "{err}");
    // Allocation-only loads it, but the logits are a read back: refused, naming the mode.
    let err = logits("emu", &["--emu-alloc-only", "--quant", "nf4"]);
    assert!(err.contains("allocation-only (--emu-alloc-only)"), "{err}");
}
