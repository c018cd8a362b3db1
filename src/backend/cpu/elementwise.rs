//! Elementwise ops (kernels/elementwise.cu): residual add, soft-cap, dropout; and the `exp`
//! that the activations and attention's softmax share.

use rayon::prelude::*;

/// `acc += x`.
pub fn add(acc: &mut [f32], x: &[f32]) {
    assert_eq!(acc.len(), x.len(), "add: sizes differ");
    acc.par_iter_mut().zip(x).for_each(|(a, &x)| *a += x);
}

/// `x = cap · tanh(x / cap)`: bounds values smoothly to (-cap, cap).
pub fn softcap(x: &mut [f32], cap: f32) {
    x.par_iter_mut().for_each(|v| *v = cap * (*v / cap).tanh());
}

/// Inverted dropout in place: element `i` becomes 0 with probability `p`, else is divided by
/// `1 - p`. The mask is a hash of `(seed, i)`, not a stream, so the same seed gives the same
/// mask in the forward, in its recomputation and on the gradient (and on any device).
pub fn dropout(x: &mut [f32], p: f32, seed: u64) {
    assert!((0.0..1.0).contains(&p), "dropout: p = {p} is not in [0, 1)");
    let keep_scale = 1.0 / (1.0 - p);
    x.par_iter_mut().enumerate().for_each(|(i, v)| {
        *v = if dropout_uniform(seed, i as u64) < p {
            0.0
        } else {
            *v * keep_scale
        };
    });
}

/// A uniform value in [0, 1) with 24 random bits (exact in f32) from `(seed, index)`: one
/// SplitMix64 finalisation of the pair.
fn dropout_uniform(seed: u64, index: u64) -> f32 {
    let mut z = seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 40) as f32 / (1u64 << 24) as f32
}

/// `e^x` within 2 ulp (f32) in plain arithmetic, so that loops over it vectorise (libm's
/// `expf` is a call per element): `x = n·ln 2 + r` with `|r| ≤ ln 2 / 2`, Cephes' degree-6
/// polynomial for `e^r`, and `2^n` put in the exponent bits. Inputs are clamped to where
/// `e^x` is a normal f32 (`e^-87.3 ≈ 1.2e-38`, `e^88 ≈ 1.7e38`), which the sigmoids
/// here cannot tell from 0 and infinity.
pub(super) fn exp(x: f32) -> f32 {
    // 1.5 · 2²³: adding it rounds to an integer (the sum's ulp is 1).
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.0);
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    // ln 2 in two parts, the first exact in few bits, so n·LN2_HI has no rounding error.
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let mut p = 1.987_569_1e-4;
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        0.166_666_65,
        0.5,
    ] {
        p = p * r + c;
    }
    let e_r = p * r * r + r + 1.0;
    e_r * f32::from_bits(((n as i32 + 127) << 23) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Catches a wrong polynomial coefficient, split of ln 2 or exponent bias: compared with
    /// f64's `exp` over the whole clamped range and at the range reduction's boundaries.
    #[test]
    fn exp_is_within_two_ulp_of_f64_exp() {
        let mut worst = 0f64;
        let mut x = -87.3f32;
        while x < 87.6 {
            for v in [x, x + 0.5 * std::f32::consts::LN_2] {
                let exact = (v as f64).exp();
                let ulp = (exact as f32).abs() * f32::EPSILON;
                worst = worst.max((exp(v) as f64 - exact).abs() / ulp as f64);
            }
            x += 0.013;
        }
        assert!(worst <= 2.0, "exp off by {worst} ulp");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1000.0) < 1.3e-38 && exp(1000.0) > 1.6e38 && exp(f32::NAN).is_nan());
    }
}
