//! Helpers shared by the integration tests (each test binary includes what it uses).
#![allow(dead_code)]

use std::path::PathBuf;

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
