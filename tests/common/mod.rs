//! Helpers shared by the integration tests (each test binary includes what it uses).
#![allow(dead_code)]

use std::path::PathBuf;
use verdict::data::Winner;
use verdict::ensemble::softmax_in_place;
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

/// Softmax of three logits.
pub fn softmax(mut z: [f64; 3]) -> Probs {
    softmax_in_place(&mut z);
    z
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
