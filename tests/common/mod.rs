//! Helpers shared by the integration tests (each test binary includes what it uses).
#![allow(dead_code)]

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use verdict::backend::AttentionParams;
use verdict::data::Winner;
use verdict::metrics::Probs;
use verdict::rng::Rng;

/// Says that `what` did not run here and why, where a user sees it: on the terminal past
/// the test harness's capture (which shows a passing test's output to no one), and as a line
/// of `$VERDICT_SKIP_LOG` when set, which `.ci/run` counts and prints with its summary.
pub fn skip(what: &str, why: &str) {
    use std::io::Write;
    let line = format!("SKIPPED {what}: {why}\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
    if let Some(log) = std::env::var_os("VERDICT_SKIP_LOG") {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log);
        let _ = file.and_then(|mut f| f.write_all(line.as_bytes()));
    }
}

/// The emulated GPU, or `false` after saying that `what` is skipped (a build without GCC
/// on x86-64 has none).
pub fn emulator_or_skip(what: &str) -> bool {
    let available = verdict::backend::cuda::emu::available();
    if !available {
        skip(
            what,
            "this build has no emulated device (build.rs needs GCC on x86-64)",
        );
    }
    available
}

/// `../shared/data/arena-dev.csv` (1,000 real rows) when this checkout has it; otherwise
/// says why the calling test is skipped and returns `None`.
pub fn arena_dev() -> Option<PathBuf> {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/arena-dev.csv");
    if path.exists() {
        Some(path)
    } else {
        skip(
            "a check on real competition rows",
            &format!(
                "{} not present (only on development machines)",
                path.display()
            ),
        );
        None
    }
}

/// A command line of strings and paths alike, as `OsStr`s for [`verdict`]:
/// `argv!["eval", "--preds", &preds]` (a path needs no `to_str().unwrap()`).
#[allow(unused_macros)]
macro_rules! argv {
    ($($arg:expr),* $(,)?) => {
        vec![$(::std::ffi::OsStr::new($arg)),*]
    };
}
#[allow(unused_imports)]
pub(crate) use argv;

/// Runs the built `verdict` binary with `args`.
pub fn verdict<S: AsRef<OsStr>>(args: impl IntoIterator<Item = S>) -> Output {
    Command::new(env!("CARGO_BIN_EXE_verdict"))
        .args(args)
        .output()
        .expect("run verdict")
}

/// Runs `verdict args`, asserting that it succeeded (its stderr in the failure message), and
/// returns its standard output.
pub fn verdict_ok<S: AsRef<OsStr>>(args: impl IntoIterator<Item = S>) -> String {
    let args: Vec<S> = args.into_iter().collect();
    let output = verdict(&args);
    let words: Vec<_> = args.iter().map(|a| a.as_ref().to_string_lossy()).collect();
    assert!(
        output.status.success(),
        "verdict {} failed:\n{}",
        words.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("verdict prints UTF-8")
}

/// `contents` written to `dir/name` in a fresh temporary folder, which lives as long as the
/// returned `TempDir`.
pub fn temp_file(name: &str, contents: impl AsRef<[u8]>) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), name, contents);
    (dir, path)
}

/// `contents` written to `dir/name`; returns that path.
pub fn write_file(dir: &Path, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

/// A label drawn from the class probabilities `p`.
pub fn draw(rng: &mut Rng, p: &Probs) -> Winner {
    let u = rng.uniform();
    if u < p[0] {
        Winner::A
    } else if u < p[0] + p[1] {
        Winner::B
    } else {
        Winner::Tie
    }
}

/// `verdict ARGS --device cuda --json F` on a machine without a CUDA device: asserts exit
/// code 3 and that stderr says `says`, and returns the JSON report it still writes. On a
/// machine with a GPU, prints that the no-GPU path is skipped and returns `None`.
pub fn no_device_report(args: &[&str], says: &str) -> Option<serde_json::Value> {
    use verdict::backend::cuda::{self, Probe};
    if let Probe::Devices(n) = cuda::probe() {
        skip(
            &format!("the no-GPU exit path of {args:?}"),
            &format!("this machine has {n} CUDA device(s)"),
        );
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let mut args: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
    args.extend(["--device", "cuda", "--json"].map(OsStr::new));
    args.push(json.as_os_str());
    let output = verdict(args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(3), "stderr: {stderr}");
    assert!(stderr.contains(says), "{stderr}");
    Some(serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap())
}

/// A random tiny Gemma 2 classifier (f32, `verdict init`) with the byte-level tokenizer in
/// `dir/gemma2-tiny`, and the first `rows` rows of the bundled sample in `dir/rows.csv`.
pub fn tiny_classifier_and_rows(dir: &Path, rows: usize) -> (PathBuf, PathBuf) {
    let model = dir.join("gemma2-tiny");
    let init = [
        "init", "--arch", "gemma2", "--preset", "tiny", "--dtype", "f32", "--out",
    ];
    verdict_ok(init.iter().map(OsStr::new).chain([model.as_os_str()]));
    let sample = concat!(env!("CARGO_MANIFEST_DIR"), "/data/sample/arena-sample.csv");
    let path = dir.join("rows.csv");
    let mut reader = csv::Reader::from_path(sample).unwrap();
    let mut writer = csv::Writer::from_path(&path).unwrap();
    writer.write_record(reader.headers().unwrap()).unwrap();
    for record in reader.records().take(rows) {
        writer.write_record(&record.unwrap()).unwrap();
    }
    writer.flush().unwrap();
    (model, path)
}

/// Attention by its definition in f64, one query at a time: the reference for the blocked
/// kernels and for their gradients.
pub fn attention_by_definition(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    cu: &[usize],
    p: &AttentionParams,
) -> Vec<f64> {
    let d = p.head_dim;
    let (qw, kw) = (p.heads * d, p.kv_heads * d);
    let mut out = vec![0.0; q.len()];
    for s in 0..cu.len() - 1 {
        for t in cu[s]..cu[s + 1] {
            for h in 0..p.heads {
                let g = h / (p.heads / p.kv_heads);
                let keys: Vec<usize> = (cu[s]..=t)
                    .filter(|&key| p.window.map_or(true, |w| t - key < w))
                    .collect();
                let scores: Vec<f64> = keys
                    .iter()
                    .map(|&key| {
                        let z = p.scale as f64
                            * (0..d)
                                .map(|i| q[t * qw + h * d + i] * k[key * kw + g * d + i])
                                .sum::<f64>();
                        p.softcap
                            .map_or(z, |cap| cap as f64 * (z / cap as f64).tanh())
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = e.iter().sum();
                for (&key, e) in keys.iter().zip(&e) {
                    for i in 0..d {
                        out[t * qw + h * d + i] += e / total * v[key * kw + g * d + i];
                    }
                }
            }
        }
    }
    out
}

/// The largest `|a - b|`; asserts first that the lengths (`what`) agree.
pub fn max_abs_diff(a: &[f32], b: &[f32], what: &str) -> f32 {
    assert_eq!(a.len(), b.len(), "{what} differs");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
