//! NF4 dequant-matmul (`backend::cpu::nf4::matmul_xwt` / `matmul_dyw`) against the f32 matmul of the
//! already-dequantized weight, on Gemma2-2B linear shapes.
//!
//! `cargo bench --bench nf4_matmul` prints one row per (op, shape, m): median milliseconds of
//! `REPEATS` runs, GFLOP/s and the NF4/f32 time ratio. The f32 baseline runs the same rayon
//! split (one task per 64 output features, one `matrixmultiply::sgemm` each) on the
//! materialised f32 weight, so the ratio is the price of dequantizing on the fly. Set
//! `RAYON_NUM_THREADS` to pin the thread count. Also prints the full `dequantize()` time.

use std::time::Instant;

use rayon::prelude::*;
use verdict::backend::cpu::nf4::{matmul_dyw, matmul_xwt};
use verdict::quant::nf4::{Nf4Options, Nf4Weight};

const REPEATS: usize = 5;
/// Output features per rayon task in the f32 baseline.
const BASELINE_TILE: usize = 64;

/// Gemma2-2B projections `[in -> out]`: attention-sized, MLP up/gate, MLP down.
const SHAPES: [(usize, usize); 3] = [(2304, 2304), (2304, 9216), (9216, 2304)];
const TOKENS: [usize; 3] = [1, 16, 128];

/// `out [m, n] = a [m, k] · B` in f32, rayon over `BASELINE_TILE` output columns, where `B`
/// is `w` read with (row, column) strides `(rsb, csb)`: `(1, k)` for `wᵀ`, `(n, 1)` for `w`.
fn f32_matmul(
    a: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    (rsb, csb): (usize, usize),
    out: &mut [f32],
    n: usize,
) {
    let blocks: Vec<(usize, Vec<f32>)> = (0..n.div_ceil(BASELINE_TILE))
        .into_par_iter()
        .map(|t| {
            let j0 = t * BASELINE_TILE;
            let width = BASELINE_TILE.min(n - j0);
            let mut block = vec![0f32; m * width];
            // SAFETY: A = a [m, k]; B's k × width values from w[j0 * csb] with strides
            // (rsb, csb) lie inside w, which holds k · n values; C = block [m, width].
            unsafe {
                matrixmultiply::sgemm(
                    m,
                    k,
                    width,
                    1.0,
                    a.as_ptr(),
                    k as isize,
                    1,
                    w.as_ptr().add(j0 * csb),
                    rsb as isize,
                    csb as isize,
                    0.0,
                    block.as_mut_ptr(),
                    width as isize,
                    1,
                );
            }
            (j0, block)
        })
        .collect();
    for (j0, block) in blocks {
        let width = block.len() / m;
        for (out_row, block_row) in out.chunks_exact_mut(n).zip(block.chunks_exact(width)) {
            out_row[j0..j0 + width].copy_from_slice(block_row);
        }
    }
}

/// Median wall time of `REPEATS` runs after one warm-up, in seconds.
fn median_seconds(mut run: impl FnMut()) -> f64 {
    run();
    let mut times: Vec<f64> = (0..REPEATS)
        .map(|_| {
            let start = Instant::now();
            run();
            start.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[REPEATS / 2]
}

/// Deterministic values in [-1, 1).
fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 23) as f32) - 1.0
        })
        .collect()
}

fn main() {
    let start = Instant::now();
    println!(
        "NF4 dequant-matmul vs f32 matmul of the dequantized weight ({} threads)",
        rayon::current_num_threads()
    );
    println!("op    [in -> out]      m   nf4 ms   f32 ms  nf4 GFLOP/s  f32 GFLOP/s  nf4/f32");
    for (cols, rows) in SHAPES {
        let weight = values(rows * cols, (rows + cols) as u64);
        let nf4 =
            Nf4Weight::quantize(&weight, rows, cols, Nf4Options::default()).expect("quantize");
        let dense = nf4.dequantize();
        let t_dequant = median_seconds(|| drop(nf4.dequantize()));
        println!(
            "dequantize [{rows:>4} x {cols:>4}]: {:.2} ms, {:.2} G weights/s",
            t_dequant * 1e3,
            (rows * cols) as f64 / t_dequant * 1e-9
        );
        for m in TOKENS {
            let flops = 2.0 * (m * rows * cols) as f64;
            let x = values(m * cols, 1);
            let mut y = vec![0f32; m * rows];
            let dy = values(m * rows, 2);
            let mut dx = vec![0f32; m * cols];
            let rows_of_table = [
                (
                    "xwt",
                    median_seconds(|| matmul_xwt(&x, m, &nf4, &mut y)),
                    median_seconds(|| f32_matmul(&x, m, cols, &dense, (1, cols), &mut y, rows)),
                ),
                (
                    "dyw",
                    median_seconds(|| matmul_dyw(&dy, m, &nf4, &mut dx)),
                    median_seconds(|| f32_matmul(&dy, m, rows, &dense, (cols, 1), &mut dx, cols)),
                ),
            ];
            for (op, t_nf4, t_f32) in rows_of_table {
                println!(
                    "{op}  [{cols:>4} -> {rows:>4}]  {m:>4}  {:>7.2}  {:>7.2}  {:>11.1}  {:>11.1}  {:>7.2}",
                    t_nf4 * 1e3,
                    t_f32 * 1e3,
                    flops / t_nf4 * 1e-9,
                    flops / t_f32 * 1e-9,
                    t_nf4 / t_f32
                );
            }
        }
    }
    println!("total {:.1} s", start.elapsed().as_secs_f64());
}
