//! `verdict selftest` on the emulated device: every CUDA op and every tiny model against the
//! CPU reference, on the sm_75 path (f16 tensor cores, a T4) and the sm_80 path (bf16), as a
//! GPU run would check them, plus the coverage check: every kernel entry point built into the
//! binary is launched by one of the two runs.

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use verdict::backend::cuda::emu::EmuArch;

fn selftest(arch: EmuArch, json: &std::path::Path) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_verdict"))
        .args(["selftest", "--device", &format!("emu:{arch}"), "--json"])
        .arg(json)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("verdict runs")
}

#[test]
fn every_case_passes_on_sm75_and_sm80_and_every_entry_point_is_launched() {
    if !common::emulator_or_skip("the emulated selftest") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let archs = [EmuArch::Sm75, EmuArch::Sm80];
    // Both at once: each run is one process on one core.
    let runs: Vec<_> = archs
        .iter()
        .map(|&arch| {
            let json = dir.path().join(format!("{arch}.json"));
            (arch, selftest(arch, &json), json)
        })
        .collect();
    let mut launched = BTreeSet::new();
    let mut built = BTreeSet::new();
    for (arch, child, json) in runs {
        let output = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "selftest on emu:{arch} failed ({}):\n{}\n{}",
            output.status,
            stdout
                .lines()
                .filter(|l| !l.starts_with("PASS"))
                .collect::<Vec<_>>()
                .join("\n"),
            String::from_utf8_lossy(&output.stderr)
        );
        let report: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        assert_eq!(report["status"], "passed", "emu:{arch}");
        assert!(
            report["models_skipped"].is_null(),
            "emu:{arch} skipped the models: {}",
            report["models_skipped"]
        );
        let checks = report["checks"].as_array().unwrap();
        assert!(
            checks.len() > 200,
            "emu:{arch} ran only {} cases",
            checks.len()
        );
        for entry in report["emulated_launches"]
            .as_array()
            .expect("an emulated run counts launches")
        {
            let name = format!(
                "{}.cu:{}",
                entry["module"].as_str().unwrap(),
                entry["function"].as_str().unwrap()
            );
            if entry["launches"].as_u64().unwrap() > 0 {
                launched.insert(name.clone());
            }
            built.insert(name);
        }
    }
    let unlaunched: Vec<_> = built.difference(&launched).collect();
    assert!(
        unlaunched.is_empty(),
        "entry points no selftest case launches: {unlaunched:?}"
    );
    assert!(built.len() >= 20, "only {} entry points found", built.len());
}
