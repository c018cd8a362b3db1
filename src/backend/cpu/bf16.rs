//! bf16 projection weights on the CPU (`--quant bf16`): the linear forward `out = X · Wᵀ`
//! with `W` held in bf16 (half the memory of f32) and `X` rounded to bf16, every product
//! summed in f32. bf16 × bf16 products are exact in f32, so the only errors are the two
//! roundings to bf16 (relative 2⁻⁹ each) and f32 summation.
//!
//! On CPUs with AVX-512 BF16, `vdpbf16ps` does 32 bf16 multiply-adds into 16 f32 lanes per
//! instruction, twice the rate of f32 FMAs; elsewhere a portable kernel computes the same
//! sums with f32 arithmetic (equal up to summation order and denormals, which `vdpbf16ps`
//! flushes). Both read one layout, so the choice is made per call at run time.
//!
//! The weight is packed once, at load, into the kernel's operand: panels of `PANEL` output
//! features and, within a panel, for each pair of input features (2j, 2j + 1), the panel's
//! values side by side (feature c's pair at 2c, 2c + 1): one 64-byte `vdpbf16ps` operand
//! per 16 features. `X` needs no packing once rounded: a bf16 row is a sequence of such
//! pairs, each broadcast to all lanes as one 32-bit value.

use super::gemm;
use crate::backend::Store;
use rayon::prelude::*;

/// Output features per packed panel: two 16-lane vectors.
const PANEL: usize = 32;
/// Rows of `X` per kernel call: 8 rows × 2 vectors = 16 accumulator registers of 32.
const MICRO_ROWS: usize = 8;
/// Rows of `X` per rayon task (their bf16 copy stays in L2 while the task's panels pass).
const TASK_ROWS: usize = 128;
/// Panels per rayon task.
const TASK_PANELS: usize = 4;

/// A `[out_features, in_features]` weight in bf16, packed for [`matmul_xwt`].
#[derive(Clone)]
pub struct Bf16Weight {
    out_features: usize,
    in_features: usize,
    /// `in_features` rounded up to even, halved: the pairs of one row.
    pairs: usize,
    /// bf16 bits: panel `p`, pair `j` holds `2 · PANEL` values from `(p · pairs + j) · 2 ·
    /// PANEL`. Features past `out_features` and the odd input feature's partner are zero.
    packed: Vec<u16>,
}

/// `x` rounded to the nearest bf16 (ties to even), as bits.
fn bf16_bits(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

/// The f32 of bf16 `bits`: a shift, exact. Not half's `to_f32`, whose NaN branch keeps the
/// portable kernel's inner loop from vectorising (2-3x slower, `cargo bench --bench cpu_gemm`).
fn bf16_value(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

impl Bf16Weight {
    /// Rounds a row-major f32 `[out_features, in_features]` weight to bf16 and packs it.
    pub fn pack(values: &[f32], out_features: usize, in_features: usize) -> Bf16Weight {
        assert_eq!(
            values.len(),
            out_features * in_features,
            "bf16 weight: not [{out_features}, {in_features}]"
        );
        let pairs = in_features.div_ceil(2);
        let panel_len = pairs * 2 * PANEL;
        let mut packed = vec![0u16; out_features.div_ceil(PANEL) * panel_len];
        packed
            .par_chunks_mut(panel_len)
            .enumerate()
            .for_each(|(p, panel)| {
                for c in 0..PANEL.min(out_features - p * PANEL) {
                    let row = &values[(p * PANEL + c) * in_features..][..in_features];
                    for (k, &v) in row.iter().enumerate() {
                        panel[(k / 2) * 2 * PANEL + 2 * c + k % 2] = bf16_bits(v);
                    }
                }
            });
        Bf16Weight {
            out_features,
            in_features,
            pairs,
            packed,
        }
    }

    /// The weight back as row-major f32 `[out_features, in_features]` (exact: every bf16 is
    /// an f32).
    pub fn to_f32(&self) -> Vec<f32> {
        let mut values = vec![0.0; self.out_features * self.in_features];
        let panel_len = self.pairs * 2 * PANEL;
        for (n, row) in values.chunks_exact_mut(self.in_features).enumerate() {
            let panel = &self.packed[(n / PANEL) * panel_len..][..panel_len];
            for (k, v) in row.iter_mut().enumerate() {
                *v = bf16_value(panel[(k / 2) * 2 * PANEL + 2 * (n % PANEL) + k % 2]);
            }
        }
        values
    }

    /// Rows: features the product produces.
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// Columns: features the product consumes.
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.packed.len() * 2
    }
}

/// Which kernel computes the bf16 products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// `vdpbf16ps` (x86-64 with AVX-512 F and BF16).
    Avx512Bf16,
    /// Plain Rust, any CPU.
    Portable,
}

impl Kernel {
    /// The fastest kernel this CPU runs.
    pub fn best() -> Kernel {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16") {
            return Kernel::Avx512Bf16;
        }
        Kernel::Portable
    }
}

/// `out = X · Wᵀ` or `out += s · X · Wᵀ` as `store` says, with `X` `[rows, in]` rounded to
/// bf16 and `W` bf16; sums in f32.
pub fn matmul_xwt(out: &mut [f32], x: &[f32], w: &Bf16Weight, rows: usize, store: Store) {
    matmul_xwt_with(Kernel::best(), out, x, w, rows, store);
}

/// [`matmul_xwt`] with a given kernel (the tests run each one this CPU has).
pub fn matmul_xwt_with(
    kernel: Kernel,
    out: &mut [f32],
    x: &[f32],
    w: &Bf16Weight,
    rows: usize,
    store: Store,
) {
    let (in_f, out_f, pairs) = (w.in_features, w.out_features, w.pairs);
    assert_eq!(
        x.len(),
        rows * in_f,
        "bf16 linear: input is not [{rows}, {in_f}]"
    );
    assert_eq!(
        out.len(),
        rows * out_f,
        "bf16 linear: output is not [{rows}, {out_f}]"
    );
    if kernel == Kernel::Avx512Bf16 {
        assert_eq!(Kernel::best(), kernel, "this CPU lacks AVX-512 BF16");
    }
    // X in bf16, a row as `pairs` u32 values: feature 2j in the low half (vdpbf16ps pairs
    // the low halves of both operands).
    let mut x_pairs = vec![0u32; rows * pairs];
    x_pairs
        .par_chunks_mut(pairs.max(1) * TASK_ROWS)
        .zip(x.par_chunks(in_f.max(1) * TASK_ROWS))
        .for_each(|(dst, src)| {
            for (dst, src) in dst.chunks_exact_mut(pairs).zip(src.chunks_exact(in_f)) {
                for (d, s) in dst.iter_mut().zip(src.chunks(2)) {
                    let hi = s.get(1).map_or(0, |&v| bf16_bits(v));
                    *d = bf16_bits(s[0]) as u32 | (hi as u32) << 16;
                }
            }
        });

    let panels = out_f.div_ceil(PANEL);
    let panel_groups = panels.div_ceil(TASK_PANELS);
    let row_groups = rows.div_ceil(TASK_ROWS);
    let out_ptr = gemm::OutPtr(out.as_mut_ptr());
    (0..row_groups * panel_groups)
        .into_par_iter()
        .for_each(|task| {
            let (rg, pg) = (task / panel_groups, task % panel_groups);
            let task_rows = rg * TASK_ROWS..(rows.min((rg + 1) * TASK_ROWS));
            for p in pg * TASK_PANELS..panels.min((pg + 1) * TASK_PANELS) {
                let panel = &w.packed[p * pairs * 2 * PANEL..][..pairs * 2 * PANEL];
                let cols = PANEL.min(out_f - p * PANEL);
                for r0 in task_rows.clone().step_by(MICRO_ROWS) {
                    let micro_rows = MICRO_ROWS.min(task_rows.end - r0);
                    let x = &x_pairs[r0 * pairs..][..micro_rows * pairs];
                    // SAFETY: this task alone writes out[r0..r0 + micro_rows, p · PANEL..
                    // + cols] (tasks own disjoint row and panel ranges), inside `out`'s
                    // rows × out_f values.
                    let tile = Tile {
                        out: unsafe { out_ptr.get().add(r0 * out_f + p * PANEL) },
                        stride: out_f,
                        cols,
                        store,
                    };
                    unsafe { micro_tile(kernel, micro_rows, x, pairs, panel, tile) };
                }
            }
        });
}

/// `dX = dY · W` or `dX += s · dY · W` with a bf16 `W` (the input gradient, for training
/// through a bf16 base): unpacks `W` to f32 and runs the f32 product, so only the weight's
/// rounding differs from an f32 model. Allocates the unpacked weight per call: the bf16
/// weights are an inference option and this is not their fast path.
pub fn matmul_dyw(dx: &mut [f32], dy: &[f32], w: &Bf16Weight, rows: usize, store: Store) {
    let values = w.to_f32();
    gemm::matmul_dyw(dx, dy, &values, rows, w.in_features, w.out_features, store);
}

/// Where a micro-tile's results go: `cols` ≤ `PANEL` columns of rows `stride` apart.
#[derive(Clone, Copy)]
struct Tile {
    out: *mut f32,
    stride: usize,
    cols: usize,
    store: Store,
}

/// One `rows` × `PANEL` block: `x` holds `rows` rows of `pairs` bf16 pairs, `panel` one
/// packed panel.
///
/// # Safety
/// `tile.out` must address `rows` rows of `tile.cols` writable values, `tile.stride` apart,
/// that no other thread touches; `kernel` must run on this CPU.
unsafe fn micro_tile(
    kernel: Kernel,
    rows: usize,
    x: &[u32],
    pairs: usize,
    panel: &[u16],
    tile: Tile,
) {
    debug_assert!(x.len() == rows * pairs && panel.len() == pairs * 2 * PANEL);
    macro_rules! by_rows {
        ($f:ident) => {
            match rows {
                1 => $f::<1>(x, pairs, panel, tile),
                2 => $f::<2>(x, pairs, panel, tile),
                3 => $f::<3>(x, pairs, panel, tile),
                4 => $f::<4>(x, pairs, panel, tile),
                5 => $f::<5>(x, pairs, panel, tile),
                6 => $f::<6>(x, pairs, panel, tile),
                7 => $f::<7>(x, pairs, panel, tile),
                _ => $f::<MICRO_ROWS>(x, pairs, panel, tile),
            }
        };
    }
    match kernel {
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512Bf16 => by_rows!(micro_tile_avx512),
        #[cfg(not(target_arch = "x86_64"))]
        Kernel::Avx512Bf16 => unreachable!("Kernel::best never picks AVX-512 off x86-64"),
        Kernel::Portable => by_rows!(micro_tile_portable),
    }
}

/// The portable micro-kernel: per pair, feature 2j then 2j + 1, each product exact in f32.
unsafe fn micro_tile_portable<const R: usize>(x: &[u32], pairs: usize, panel: &[u16], tile: Tile) {
    let mut acc = [[0f32; PANEL]; R];
    for (j, w) in panel.chunks_exact(2 * PANEL).enumerate() {
        for (r, acc) in acc.iter_mut().enumerate() {
            let a = x[r * pairs + j];
            let (a0, a1) = (bf16_value(a as u16), bf16_value((a >> 16) as u16));
            for (acc, w) in acc.iter_mut().zip(w.chunks_exact(2)) {
                *acc += a0 * bf16_value(w[0]);
                *acc += a1 * bf16_value(w[1]);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        let out = std::slice::from_raw_parts_mut(tile.out.add(r * tile.stride), tile.cols);
        match tile.store {
            Store::Overwrite => out.copy_from_slice(&acc[..tile.cols]),
            Store::Accumulate(s) => out.iter_mut().zip(acc).for_each(|(o, a)| *o += s * a),
        }
    }
}

/// The AVX-512 BF16 micro-kernel: 2 · R accumulators, per pair two weight loads, R
/// broadcasts and 2 · R `vdpbf16ps`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn micro_tile_avx512<const R: usize>(x: &[u32], pairs: usize, panel: &[u16], tile: Tile) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    let (x, w) = (x.as_ptr(), panel.as_ptr());
    for j in 0..pairs {
        let w0: __m512bh = std::mem::transmute(_mm512_loadu_si512(w.add(j * 2 * PANEL).cast()));
        let w1: __m512bh =
            std::mem::transmute(_mm512_loadu_si512(w.add(j * 2 * PANEL + PANEL).cast()));
        for (r, acc) in acc.iter_mut().enumerate() {
            let a: __m512bh = std::mem::transmute(_mm512_set1_epi32(*x.add(r * pairs + j) as i32));
            acc[0] = _mm512_dpbf16_ps(acc[0], a, w0);
            acc[1] = _mm512_dpbf16_ps(acc[1], a, w1);
        }
    }
    let mask = |half: usize| -> __mmask16 {
        let n = tile.cols.saturating_sub(16 * half).min(16);
        ((1u32 << n) - 1) as __mmask16
    };
    for (r, acc) in acc.iter().enumerate() {
        for (half, &acc) in acc.iter().enumerate() {
            let out = tile.out.add(r * tile.stride + 16 * half);
            let m = mask(half);
            let value = match tile.store {
                Store::Overwrite => acc,
                Store::Accumulate(s) => {
                    _mm512_fmadd_ps(_mm512_set1_ps(s), acc, _mm512_maskz_loadu_ps(m, out))
                }
            };
            _mm512_mask_storeu_ps(out, m, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn random(n: usize, rng: &mut Rng) -> Vec<f32> {
        (0..n).map(|_| rng.normal() as f32).collect()
    }

    /// The kernels this machine can run: the portable one always, AVX-512 BF16 where present.
    fn kernels() -> Vec<Kernel> {
        let mut kernels = vec![Kernel::Portable];
        if Kernel::best() == Kernel::Avx512Bf16 {
            kernels.push(Kernel::Avx512Bf16);
        } else {
            eprintln!("no AVX-512 BF16 here: only the portable bf16 kernel is tested");
        }
        kernels
    }

    #[test]
    fn packing_round_trips_the_bf16_values() {
        let mut rng = Rng::new(3);
        let (out_f, in_f) = (37, 11); // a partial panel and an odd pair
        let w = random(out_f * in_f, &mut rng);
        let rounded: Vec<f32> = w.iter().map(|&v| bf16_value(bf16_bits(v))).collect();
        assert_eq!(Bf16Weight::pack(&w, out_f, in_f).to_f32(), rounded);
    }

    /// Catches a wrong panel or pair index, a lost odd feature, a remainder row or column
    /// written wrong or not at all (the output starts poisoned), and a wrong accumulate.
    #[test]
    fn every_kernel_matches_the_f64_product_of_the_rounded_operands() {
        let mut rng = Rng::new(7);
        for &(rows, in_f, out_f) in &[
            (1, 1, 1),
            (3, 7, 33),
            (13, 64, 40),
            (9, 33, 70),
            (130, 576, 96),
        ] {
            let x = random(rows * in_f, &mut rng);
            let w = random(out_f * in_f, &mut rng);
            let packed = Bf16Weight::pack(&w, out_f, in_f);
            let round = |v: &[f32]| -> Vec<f64> {
                v.iter().map(|&v| bf16_value(bf16_bits(v)) as f64).collect()
            };
            let (xr, wr) = (round(&x), round(&w));
            let reference: Vec<f64> = (0..rows * out_f)
                .map(|i| {
                    (0..in_f)
                        .map(|k| xr[i / out_f * in_f + k] * wr[i % out_f * in_f + k])
                        .sum()
                })
                .collect();
            for kernel in kernels() {
                let mut out = vec![f32::NAN; rows * out_f];
                matmul_xwt_with(kernel, &mut out, &x, &packed, rows, Store::Overwrite);
                let mut acc: Vec<f32> = (0..rows * out_f).map(|i| i as f32).collect();
                matmul_xwt_with(kernel, &mut acc, &x, &packed, rows, Store::Accumulate(0.5));
                for i in 0..rows * out_f {
                    // f32 sums of `in_f` exact products: error ~ in_f · 2⁻²⁴ · Σ|terms|.
                    let bound = 1e-5 * (in_f as f64).sqrt().max(1.0) * (1.0 + reference[i].abs());
                    let what = format!("{kernel:?} {rows}x{in_f}->{out_f} at {i}");
                    assert!(
                        (out[i] as f64 - reference[i]).abs() <= bound,
                        "{what}: {} vs {}",
                        out[i],
                        reference[i]
                    );
                    let want = i as f64 + 0.5 * reference[i];
                    assert!(
                        (acc[i] as f64 - want).abs() <= bound + 1e-6 * want.abs(),
                        "{what} (accumulate)"
                    );
                }
            }
        }
    }

    /// The error bf16 adds to an f32 product, stated: with unit-normal operands and 576
    /// features, the largest relative error (to the output's RMS) stays below 1 % — two
    /// roundings of 2⁻⁹ relative each, averaged over the sum.
    #[test]
    fn bf16_products_stay_within_one_percent_of_f32() {
        let mut rng = Rng::new(11);
        let (rows, in_f, out_f) = (64, 576, 64);
        let x = random(rows * in_f, &mut rng);
        let w = random(out_f * in_f, &mut rng);
        let mut exact = vec![0.0; rows * out_f];
        gemm::matmul_xwt(&mut exact, &x, &w, rows, in_f, out_f, Store::Overwrite);
        let mut out = vec![0.0; rows * out_f];
        matmul_xwt(
            &mut out,
            &x,
            &Bf16Weight::pack(&w, out_f, in_f),
            rows,
            Store::Overwrite,
        );
        let rms = (exact.iter().map(|v| v * v).sum::<f32>() / exact.len() as f32).sqrt();
        let worst = out
            .iter()
            .zip(&exact)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max)
            / rms;
        assert!(worst < 1e-2, "bf16 error {worst} of the RMS");
        assert!(
            worst > 1e-5,
            "no bf16 rounding visible ({worst}): is this the f32 path?"
        );
    }
}
