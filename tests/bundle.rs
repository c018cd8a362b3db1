//! `verdict bundle`: the Kaggle dataset folder (issue #18). tools/check-bundle.sh (in
//! .ci/run) opens a bundle and runs its notebooks; these tests pin the command itself.

mod common;

#[test]
fn bundle_holds_the_binary_a_readme_and_two_notebooks() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bundle");
    common::verdict_ok(["bundle", "--out", out.to_str().unwrap()]);
    let binary = std::fs::read(out.join("verdict")).unwrap();
    assert_eq!(
        binary.len() as u64,
        std::fs::metadata(env!("CARGO_BIN_EXE_verdict"))
            .unwrap()
            .len()
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(out.join("verdict"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o111, 0o111, "the bundled binary is not executable");
    }
    let readme = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(readme.contains("submission.csv"), "{readme}");
    for (name, runs) in [
        ("verdict-predict.ipynb", "\"predict\""),
        ("verdict-train-t4.ipynb", "\"train\""),
    ] {
        let text = std::fs::read_to_string(out.join(name)).unwrap();
        let notebook: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(notebook["nbformat"], 4, "{name}");
        let code: String = notebook["cells"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["cell_type"] == "code")
            .flat_map(|c| c["source"].as_array().unwrap().iter())
            .map(|line| line.as_str().unwrap())
            .collect();
        assert!(code.contains(runs), "{name} does not run verdict {runs}");
        assert!(
            code.contains("\"--device\", \"cpu\""),
            "{name}: no CPU fallback"
        );
    }
}

#[test]
fn bundle_refuses_a_folder_with_files_and_a_missing_binary() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("old.txt"), "x").unwrap();
    let output = common::verdict(["bundle", "--out", dir.path().to_str().unwrap()]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("not empty"), "{stderr}");

    let out = dir.path().join("new");
    let output = common::verdict([
        "bundle",
        "--out",
        out.to_str().unwrap(),
        "--binary",
        "/nonexistent/verdict",
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--binary /nonexistent/verdict: no such file"),
        "{stderr}"
    );
    assert!(!out.exists(), "a failed bundle left {}", out.display());
}
