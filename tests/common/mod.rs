//! Helpers shared by the integration tests (each test binary includes what it uses).
#![allow(dead_code)]

use std::path::PathBuf;
use verdict::data::Winner;
use verdict::metrics::Probs;
use verdict::rng::Rng;

/// `../shared/data/arena-dev.csv` (1,000 real rows) when this checkout has it; otherwise
/// prints why the calling test is skipped and returns `None`.
pub fn arena_dev() -> Option<PathBuf> {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/arena-dev.csv");
    if path.exists() {
        Some(path)
    } else {
        eprintln!(
            "SKIPPED: {} not present (only on development machines)",
            path.display()
        );
        None
    }
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
        eprintln!("SKIPPED the no-GPU exit path of {args:?}: this machine has {n} CUDA device(s)");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_verdict"))
        .args(args)
        .args(["--device", "cuda", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(3), "stderr: {stderr}");
    assert!(stderr.contains(says), "{stderr}");
    Some(serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap())
}
