//! Activations kept for backward (kernels/saved.cu). The CPU reference keeps them exactly
//! (f32 is its storage); [`round_rows`] is what a device's 16-bit copy holds, for the
//! selftest.

use rayon::prelude::*;

/// Each row of width `dim` as kernels/saved.cu keeps and restores it: scaled by the power of
/// two 2^-e that puts the row's largest magnitude in [2^14, 2^15) (e clamped to [-126, 126];
/// 1 for a zero or non-finite row), rounded to f16 (or bf16), widened and scaled back.
pub fn round_rows(x: &[f32], dim: usize, bf16: bool) -> Vec<f32> {
    assert!(
        dim > 0 && x.len() % dim == 0,
        "round_rows: {} values in rows of {dim}",
        x.len()
    );
    let mut out = vec![0.0f32; x.len()];
    out.par_chunks_mut(dim)
        .zip(x.par_chunks(dim))
        .for_each(|(out, row)| {
            let largest = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let e = if largest.is_finite() && largest > 0.0 {
                (((largest.to_bits() >> 23) & 0xff) as i32 - 127 - 14).clamp(-126, 126)
            } else {
                0
            };
            let (down, up) = (2f32.powi(-e), 2f32.powi(e));
            for (o, &v) in out.iter_mut().zip(row) {
                let r = if bf16 {
                    half::bf16::from_f32(v * down).to_f32()
                } else {
                    half::f16::from_f32(v * down).to_f32()
                };
                *o = r * up;
            }
        });
    out
}
