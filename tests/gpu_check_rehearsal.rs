//! tools/gpu-check.sh rehearsed on the emulated device (issue #18): a GPU call is at most ten
//! minutes and brings back at most eight files, so the script must end within its deadline,
//! leave at most eight plain files in $OUT, and keep what it measured when it is stopped.
//!
//! CI cost: about 10 s. The rehearsal runs four cheap selftest families and one logits
//! fixture under a 60 s deadline; the steps whose minimum does not fit (training and the demo
//! on the emulator, minutes on 2 cores) are recorded as skipped for the deadline, which is
//! itself part of what is checked.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const MAX_FILES: usize = 8;

/// The script with the built binary on the emulated device, writing to `out`.
fn gpu_check(out: &Path, deadline_s: u64, families: &str) -> Command {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut command = Command::new("bash");
    command
        .arg(root.join("tools/gpu-check.sh"))
        .env("VERDICT_BIN", env!("CARGO_BIN_EXE_verdict"))
        .env("VERDICT_GPU_CHECK_DEVICE", "emu")
        .env("VERDICT_GPU_CHECK_DEADLINE", deadline_s.to_string())
        .env("VERDICT_GPU_CHECK_FAMILIES", families)
        .env("VERDICT_GPU_CHECK_FIXTURES", "llama_seqcls")
        .env("OUT", out)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// The script needs bash and python3 (as on the GPU image) and the emulator.
fn runnable(what: &str) -> bool {
    if !common::emulator_or_skip(what) {
        return false;
    }
    let python = Command::new("python3").arg("--version").output();
    if !python.is_ok_and(|o| o.status.success()) {
        common::skip(what, "no python3 on this machine (gpu-check.sh uses it)");
        return false;
    }
    true
}

/// The names in `out`, asserting there are at most eight and that each is a plain file.
fn returned_files(out: &Path) -> Vec<String> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(out).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        assert!(
            entry.file_type().unwrap().is_file(),
            "{name} in $OUT is not a plain file"
        );
        names.push(name);
    }
    names.sort();
    assert!(
        names.len() <= MAX_FILES,
        "{} files in $OUT (at most {MAX_FILES}): {names:?}",
        names.len()
    );
    names
}

fn jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn rehearsal_stays_within_eight_files_and_its_deadline() {
    if !runnable("the gpu-check rehearsal") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let deadline = 60;
    let started = Instant::now();
    let output = gpu_check(dir.path(), deadline, "buffer,embedding,rope,elementwise")
        .output()
        .unwrap();
    let elapsed = started.elapsed();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "gpu-check.sh failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        elapsed <= Duration::from_secs(deadline),
        "ran {elapsed:?}, past its {deadline} s deadline"
    );
    let names = returned_files(dir.path());
    for want in [
        "gpu-check.log",
        "summary.txt",
        "selftest.jsonl",
        "rest.tar.gz",
    ] {
        assert!(names.iter().any(|n| n == want), "no {want} in {names:?}");
    }
    let summary = std::fs::read_to_string(dir.path().join("summary.txt")).unwrap();
    assert!(
        summary.lines().count() <= 40,
        "summary.txt is more than a screen:\n{summary}"
    );
    assert!(
        summary.starts_with("gpu-check all on emu: passed"),
        "{summary}"
    );
    // What cannot run on the emulator, and what the deadline left out, says so.
    for skipped in [
        "bench refuses the emulated device",
        "no nvidia-smi",
        "compute-sanitizer",
        "deadline: needs >= 720 s",
    ] {
        assert!(
            summary.contains(skipped),
            "summary lacks {skipped:?}:\n{summary}"
        );
    }
    assert!(summary.contains("llama_seqcls-nf4:PASS"), "{summary}");
    // One process per family: four start and four end lines around the cases.
    let lines = jsonl(&dir.path().join("selftest.jsonl"));
    let count = |event: &str| lines.iter().filter(|l| l["event"] == event).count();
    assert_eq!((count("start"), count("end")), (4, 4));
    assert!(count("case") > 30, "{} cases", count("case"));
    assert!(lines
        .iter()
        .filter(|l| l["event"] == "case")
        .all(|l| l["passed"] == true));
}

#[test]
fn a_stopped_rehearsal_keeps_the_cases_it_measured() {
    if !runnable("the stopped gpu-check rehearsal") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // gemm takes about 12 s on the emulator; copied to $OUT every second, so it is stopped
    // as soon as its first cases are there, midway through them.
    let child = gpu_check(dir.path(), 120, "buffer,gemm")
        .env("VERDICT_GPU_CHECK_SYNC_S", "1")
        .spawn()
        .unwrap();
    let selftest = dir.path().join("selftest.jsonl");
    let started = Instant::now();
    while !std::fs::read_to_string(&selftest).is_ok_and(|s| s.contains("\"family\":\"gemm\"")) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no gemm case after 60 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let output = child.wait_with_output().unwrap();
    assert!(!output.status.success(), "a stopped run does not pass");
    returned_files(dir.path());
    let summary = std::fs::read_to_string(dir.path().join("summary.txt")).unwrap();
    assert!(summary.contains("STOPPED by a signal"), "{summary}");
    assert!(summary.contains("gemm:KILLED"), "{summary}");
    let lines = jsonl(&selftest);
    assert!(
        lines
            .iter()
            .any(|l| l["event"] == "case" && l["family"] == "gemm"),
        "the gemm cases measured before the stop are lost"
    );
    assert!(dir.path().join("rest.tar.gz").is_file());
}
