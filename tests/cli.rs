//! The command line as a user meets it: exit codes, one-line errors, files written.

mod common;

use common::{argv, verdict};
use std::path::Path;
use std::process::Output;

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts that a command failed with exit code 1 and an error containing `needle`.
fn assert_fails_with(o: &Output, needle: &str) {
    assert_eq!(o.status.code(), Some(1), "{}", stderr(o));
    assert!(
        stderr(o).contains(needle),
        "the error should contain {needle:?}: {}",
        stderr(o)
    );
}

const HEADER: &str =
    "id,model_a,model_b,prompt,response_a,response_b,winner_model_a,winner_model_b,winner_tie\n";

/// A temporary folder with `rows` labelled rows in train.csv.
fn train_rows(rows: usize) -> (tempfile::TempDir, std::path::PathBuf) {
    let mut text = HEADER.to_string();
    for i in 0..rows {
        let (a, b) = ("x".repeat(1 + i % 37), "y".repeat(1 + (i * 7) % 41));
        let label = if a.len() > b.len() {
            "1,0,0"
        } else if i % 3 == 0 {
            "0,0,1"
        } else {
            "0,1,0"
        };
        text += &format!(
            "{i},m1,m2,\"[\"\"prompt {}\"\"]\",\"[\"\"{a}\"\"]\",\"[\"\"{b}\"\"]\",{label}\n",
            i % 50
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("train.csv");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

#[test]
fn malformed_row_exits_1_with_one_line_naming_the_row() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.csv");
    std::fs::write(&path, format!("{HEADER}1,m,m,\"[\"\"p\"\"]\",\"[\"\"a\"\"]\",\"[\"\"b\"\"]\",1,0,0\n99,m,m,\"[\"\"p\"\"]\",\"[\"\"a\"\"]\",\"[\"\"b\"\"]\",0,0,0\n")).unwrap();
    let out = verdict(argv![
        "baseline",
        "fit",
        "--train",
        &path,
        "--out",
        &dir.path().join("m.json"),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.starts_with("error: ") && err.contains("row 2") && err.contains("id 99"),
        "{err}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{err}"
    );
    assert!(
        !dir.path().join("m.json").exists(),
        "no output after a failed fit"
    );
}

#[test]
fn missing_file_is_a_clear_error() {
    let out = verdict(&["baseline", "cv", "--train", "/nonexistent/train.csv"]);
    assert_fails_with(&out, "cannot open /nonexistent/train.csv");
}

#[test]
fn fit_predict_eval_round_trip() {
    let (dir, train) = train_rows(300);
    let model = dir.path().join("m.json");
    let preds = dir.path().join("p.csv");
    let fit = verdict(argv![
        "baseline",
        "fit",
        "--train",
        &train,
        "--out",
        &model,
        "--buckets",
        "4",
    ]);
    assert!(fit.status.success(), "{}", stderr(&fit));
    let pred = verdict(argv![
        "baseline", "predict", "--model", &model, "--test", &train, "--out", &preds,
    ]);
    assert!(pred.status.success(), "{}", stderr(&pred));
    let text = std::fs::read_to_string(&preds).unwrap();
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some("id,winner_model_a,winner_model_b,winner_tie")
    );
    let ids: Vec<&str> = lines.map(|l| l.split(',').next().unwrap()).collect();
    assert_eq!(
        ids,
        (0..300).map(|i| i.to_string()).collect::<Vec<_>>(),
        "rows in input order"
    );
    let eval = verdict(argv![
        "eval", "--preds", &preds, "--labels", &train, "--json",
    ]);
    assert!(eval.status.success(), "{}", stderr(&eval));
    let scores: serde_json::Value = serde_json::from_slice(&eval.stdout).unwrap();
    assert_eq!(scores["rows"], 300);
    assert!(scores["log_loss"].as_f64().unwrap() < 3f64.ln());
}

#[test]
fn eval_rejects_predictions_for_unknown_ids() {
    let (dir, train) = train_rows(10);
    let preds = common::write_file(
        dir.path(),
        "p.csv",
        "id,winner_model_a,winner_model_b,winner_tie\n12345,0.3,0.3,0.4\n",
    );
    let out = verdict(argv!["eval", "--preds", &preds, "--labels", &train]);
    assert_fails_with(&out, "id 12345 is not in");
}

#[test]
fn cv_writes_json_report() {
    let (dir, train) = train_rows(200);
    let json = dir.path().join("cv.json");
    let out = verdict(argv![
        "baseline", "cv", "--train", &train, "--folds", "4", "--json", &json,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    assert_eq!(report["folds"].as_array().unwrap().len(), 4);
}

#[test]
fn demo_runs_and_writes_a_submission() {
    let dir = tempfile::tempdir().unwrap();
    let out = verdict(argv!["demo", "--tiny", "--out", dir.path()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let console = String::from_utf8_lossy(&out.stdout);
    assert!(
        console.contains("== held-out scores ==") && console.contains("--tiny"),
        "the console ends with the scores and says why the models are tiny:\n{console}"
    );
    let sub = std::fs::read_to_string(dir.path().join("submission.csv")).unwrap();
    assert!(sub.starts_with("id,winner_model_a,winner_model_b,winner_tie\n"));
    assert!(sub.lines().count() > 10);
    let report = std::fs::read_to_string(dir.path().join("report.md")).unwrap();
    for stage in [
        "| uniform guess | 1.0986 |",
        "| class prior |",
        "| length baseline |",
        "| gemma2-tiny |",
        "| llama-tiny |",
        "| probe gemma2-tiny |",
        "| probe llama-tiny |",
        "| ensemble |",
        "| calibrated ensemble",
    ] {
        assert!(report.contains(stage), "report.md lacks {stage}:\n{report}");
    }
    assert!(
        report.contains("vs length baseline (se)") && report.contains("scores mean nothing"),
        "report.md compares with the baseline and labels tiny models:\n{report}"
    );
    for plot in [
        "run-gemma2-tiny/loss.png",
        "run-llama-tiny/loss.png",
        "reliability.png",
    ] {
        assert!(dir.path().join(plot).exists(), "{plot} missing");
    }
}

#[test]
fn kernels_flag_chooses_the_kernel_source_and_refuses_others() {
    let bad = verdict(&["selftest", "--device", "emu", "--kernels", "fatbin"]);
    assert_eq!(
        bad.status.code(),
        Some(2),
        "a usage error: {}",
        stderr(&bad)
    );
    assert!(stderr(&bad).contains("invalid value 'fatbin' for '--kernels <SOURCE>'"));
    if !common::emulator_or_skip("selftest --kernels nvrtc on the emulated device") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("selftest.json");
    let out = verdict(&[
        "selftest",
        "--device",
        "emu",
        "--only",
        "buffer",
        "--kernels",
        "nvrtc",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report = std::fs::read_to_string(&json).unwrap();
    assert!(report.contains("\"kernel_source\": \"nvrtc\""), "{report}");
}

#[test]
fn version_and_help_work() {
    let v = verdict(&["--version"]);
    assert!(String::from_utf8_lossy(&v.stdout).starts_with("verdict "));
    let h = verdict(&["baseline", "fit", "--help"]);
    assert!(String::from_utf8_lossy(&h.stdout).contains("Example: verdict baseline fit"));
}

#[test]
fn logits_prints_one_json_line_per_input_and_names_bad_lines() {
    let dir = tempfile::tempdir().unwrap();
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/gemma2_seqcls");
    let ids = common::write_file(
        dir.path(),
        "ids.jsonl",
        "{\"ids\": [5, 6, 7], \"note\": \"ignored\"}\n{\"ids\": [9]}\n",
    );
    let out = verdict(argv!["logits", "--model", &model, "--ids", &ids]);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["logits"].as_array().unwrap().len(), 3);
    std::fs::write(&ids, "{\"ids\": [5]}\n{\"idz\": [1]}\n").unwrap();
    let bad = verdict(argv!["logits", "--model", &model, "--ids", &ids]);
    // The error names line 2.
    assert_fails_with(&bad, ":2");
}

#[test]
fn inspect_reports_nf4_bits_and_refuses_nf4_options_without_quant() {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/gemma2_seqcls");
    let model = model.to_str().unwrap();
    let out = verdict(&[
        "inspect",
        "--model",
        model,
        "--quant",
        "nf4",
        "--no-double-quant",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["quantized_projections"]["bits_per_param"], 4.5);
    let table = verdict(&["inspect", "--model", model]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("embed_tokens"));
    let bad = verdict(&["inspect", "--model", model, "--nf4-blocksize", "128"]);
    assert_fails_with(&bad, "--quant nf4");
    let bad = verdict(&[
        "logits",
        "--model",
        model,
        "--ids",
        "x",
        "--quant",
        "nf4",
        "--nf4-blocksize",
        "48",
    ]);
    assert_fails_with(&bad, "blocksize");
}

/// Whether this machine has a CUDA device (tests that need one skip, saying so, if not).
fn has_gpu() -> bool {
    matches!(
        verdict::backend::cuda::probe(),
        verdict::backend::cuda::Probe::Devices(_)
    )
}

/// A random tiny Gemma 2 classifier with the byte-level tokenizer, 20 sample rows to
/// predict, and where the predictions go.
struct TinyPredict {
    dir: tempfile::TempDir,
    model: std::path::PathBuf,
    test: std::path::PathBuf,
    preds: std::path::PathBuf,
}

impl TinyPredict {
    fn new() -> TinyPredict {
        let dir = tempfile::tempdir().unwrap();
        let (model, test) = common::tiny_classifier_and_rows(dir.path(), 20);
        let preds = dir.path().join("p.csv");
        TinyPredict {
            dir,
            model,
            test,
            preds,
        }
    }

    /// `verdict train` or `verdict cv` (`command`) on the rows with the model, on `device`.
    fn train(&self, command: &str, device: &str) -> Output {
        let out = self.dir.path().join(format!("run-{command}"));
        verdict(argv![
            command,
            "--model",
            &self.model,
            "--train",
            &self.test,
            "--out",
            &out,
            "--max-len",
            "96",
            "--device",
            device,
        ])
    }

    /// `verdict predict` on the rows with the model, plus `extra` flags.
    fn predict(&self, extra: &[&str]) -> Output {
        let mut args = argv![
            "predict",
            "--model",
            &self.model,
            "--test",
            &self.test,
            "--out",
            &self.preds,
        ];
        args.extend(extra.iter().map(std::ffi::OsStr::new));
        verdict(&args)
    }
}

#[test]
fn predict_reports_its_device_in_the_summary_and_the_json() {
    let tiny = TinyPredict::new();
    let json = tiny.dir.path().join("p.json");
    let out = tiny.predict(&["--max-len", "96", "--json", json.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let line = String::from_utf8_lossy(&out.stdout);
    assert!(
        line.contains("wrote 20 predictions") && line.contains("on cpu ("),
        "{line}"
    );
    let stats: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let devices = stats["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0]["device"], "cpu");
    assert_eq!(devices[0]["sequences"], 40, "20 battles and their swaps");
    assert!(devices[0]["peak_reserved_bytes"].is_null());
}

#[test]
fn cuda_without_a_gpu_is_a_clear_error_not_a_panic() {
    if has_gpu() {
        common::skip(
            "the no-GPU error path of predict",
            "this machine has a CUDA device",
        );
        return;
    }
    let tiny = TinyPredict::new();
    let ids = tiny.dir.path().join("ids.jsonl");
    std::fs::write(&ids, "{\"ids\": [5, 6, 7]}\n").unwrap();
    let logits = verdict(argv![
        "logits",
        "--model",
        &tiny.model,
        "--ids",
        &ids,
        "--device",
        "cuda",
    ]);
    for (out, asked) in [
        (logits, "cuda:0 was asked for"),
        (
            tiny.predict(&["--device", "cuda:1"]),
            "cuda:1 was asked for",
        ),
        (
            tiny.predict(&["--devices", "0,1"]),
            "cuda:0,cuda:1 was asked for",
        ),
        (tiny.train("train", "cuda"), "cuda:0 was asked for"),
        (tiny.train("cv", "cuda:0"), "cuda:0 was asked for"),
    ] {
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.starts_with("error: ") && err.contains(asked), "{err}");
        assert!(err.contains("--device cpu"), "names the way out: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    assert!(!tiny.preds.exists(), "no predictions without a device");
    assert!(
        !tiny.dir.path().join("run-train").exists(),
        "no run folder without a device"
    );
}

#[test]
fn malformed_device_is_a_usage_error() {
    let predict = ["predict", "--model", "m", "--test", "t", "--out", "o"];
    for args in [
        vec!["logits", "--model", "m", "--ids", "x", "--device", "cuda:x"],
        [&predict[..], &["--device", "gpu"]].concat(),
        [&predict[..], &["--devices", "0,a"]].concat(),
        [&predict[..], &["--device", "cpu", "--devices", "0"]].concat(),
    ] {
        let out = verdict(&args);
        let err = stderr(&out);
        assert_eq!(
            out.status.code(),
            Some(2),
            "usage error for {args:?}: {err}"
        );
        assert!(err.contains("--device"), "{err}");
    }
}

#[test]
fn logits_on_cuda_match_the_cpu() {
    if !has_gpu() {
        common::skip(
            "logits on CUDA against the CPU",
            "needs a CUDA GPU (tools/gpu-check.sh runs it on one)",
        );
        return;
    }
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/gemma2_seqcls");
    let dir = tempfile::tempdir().unwrap();
    let ids = common::write_file(
        dir.path(),
        "ids.jsonl",
        "{\"ids\": [5, 6, 7]}\n{\"ids\": [9]}\n{\"ids\": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]}\n",
    );
    let run = |device: &str| -> Vec<f64> {
        let out = verdict(argv![
            "logits", "--model", &model, "--ids", &ids, "--hidden", "--device", device,
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .flat_map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                let numbers = |k: &str| -> Vec<f64> {
                    v[k].as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.as_f64().unwrap())
                        .collect()
                };
                [numbers("logits"), numbers("hidden")].concat()
            })
            .collect()
    };
    let (cpu, gpu) = (run("cpu"), run("cuda"));
    assert_eq!(cpu.len(), gpu.len());
    let scale = cpu.iter().fold(0f64, |m, x| m.max(x.abs()));
    let worst = cpu
        .iter()
        .zip(&gpu)
        .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        worst <= 1e-4 * scale,
        "max |gpu - cpu| {worst} of max |cpu| {scale}"
    );
}

/// The subcommands `verdict ARGS --help` lists (empty for a leaf command).
fn subcommands(args: &[&str]) -> Vec<String> {
    let mut full = args.to_vec();
    full.push("--help");
    let help = String::from_utf8(verdict(&full).stdout).unwrap();
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_string)
        .collect()
}

#[test]
fn every_flag_of_every_command_has_help_and_every_command_an_example() {
    let mut commands: Vec<Vec<String>> = Vec::new();
    for top in subcommands(&[]) {
        let nested = subcommands(&[&top]);
        if nested.is_empty() || top == "ensemble" || top == "calibrate" {
            commands.push(vec![top.clone()]);
        }
        commands.extend(nested.into_iter().map(|sub| vec![top.clone(), sub]));
    }
    assert!(commands.len() >= 20, "{commands:?}");
    let mut gaps = Vec::new();
    for command in &commands {
        let mut args: Vec<&str> = command.iter().map(String::as_str).collect();
        args.push("--help");
        let help = String::from_utf8(verdict(&args).stdout).unwrap();
        if !help.contains("Example: verdict") {
            gaps.push(format!("{}: no example", command.join(" ")));
        }
        let lines: Vec<&str> = help.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let t = line.trim_start();
            if !t.starts_with("--") || line.len() - t.len() > 6 {
                continue;
            }
            // `--flag <V>  text` on one line, or the text on the next, indented further.
            let same_line = t.split("  ").skip(1).any(|s| !s.trim().is_empty());
            let next_line = lines
                .get(i + 1)
                .is_some_and(|n| n.starts_with("          ") && !n.trim().is_empty());
            if !same_line && !next_line {
                gaps.push(format!(
                    "{}: {} has no help",
                    command.join(" "),
                    t.split_whitespace().next().unwrap()
                ));
            }
        }
    }
    assert!(gaps.is_empty(), "{}", gaps.join("\n"));
}
