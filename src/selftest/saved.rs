//! Cases of the saved family (cuda/saved.rs vs cpu/saved.rs): activations kept for backward
//! in the card's 16-bit type with a power-of-two scale per row, and restored.

use super::Harness;
use crate::backend::cpu::saved::round_rows;
use crate::backend::cuda::nf4::MmaOperands;
use crate::backend::Backend;

pub(super) fn cases(h: &mut Harness) {
    let operands = MmaOperands::for_arch(h.cuda.info().compute_capability);
    let bf16 = operands == MmaOperands::Bf16;
    // Unit roundoff of the type: every element within it of its value, relative to the row's
    // largest (so to the largest value overall).
    let (dtype, roundoff) = if bf16 {
        ("bf16", 2f64.powi(-8))
    } else {
        ("f16", 2f64.powi(-11))
    };
    // Odd shapes; rows past f16's range (a residual stream of 1e5, Gemma 3's), tiny rows
    // (1e-6), a zero row.
    for (rows, dim) in [(1usize, 7usize), (333, 257), (17, 2304)] {
        let mut x = h.random(rows * dim, 1.0);
        for r in 0..rows {
            let scale = [1.0, 1e5, 1e-6, 30.0][r % 4];
            x[r * dim..(r + 1) * dim]
                .iter_mut()
                .for_each(|v| *v *= scale);
        }
        if rows > 5 {
            x[5 * dim..6 * dim].fill(0.0);
        }
        let gpu = {
            let b = &h.cuda;
            b.download(&b.restore(&b.keep(&b.upload(&x), dim)))
        };
        let case = format!("rows={rows} dim={dim}");
        h.record(
            "keep/restore (rounded reference)",
            dtype,
            case.clone(),
            &round_rows(&x, dim, bf16),
            &gpu,
            0.0,
        );
        // Against the exact values, row by row: each row's error within the roundoff of its
        // largest value (the 1e-6 rows would vanish against the 1e5 rows in one global max).
        let worst = x
            .chunks(dim)
            .zip(gpu.chunks(dim))
            .map(|(want, got)| {
                let largest = want.iter().fold(0.0f32, |m, v| m.max(v.abs())) as f64;
                let err = want
                    .iter()
                    .zip(got)
                    .fold(0.0f64, |m, (a, b)| m.max((*a as f64 - *b as f64).abs()));
                if largest > 0.0 {
                    err / largest
                } else {
                    err
                }
            })
            .fold(0.0f64, f64::max);
        // Recorded as 1 + worst against 1: the harness's relative error is then `worst`.
        h.record(
            "keep/restore (exact, per row)",
            dtype,
            case,
            &[1.0],
            &[(1.0 + worst) as f32],
            roundoff,
        );
    }
}
