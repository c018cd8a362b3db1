//! The CPU linear forward `out = X · Wᵀ` on the decoder's shapes, per kernel: f32 through
//! the previous path (`matrixmultiply`: one single-threaded sgemm per 256 × 256 output tile,
//! tiles on rayon) and through today's (`backend::cpu::gemm`: the `gemm` crate), and bf16
//! weights (`backend::cpu::bf16`: AVX-512 BF16 where the CPU has it, and the portable kernel).
//!
//! `cargo bench --bench cpu_gemm` prints one row per shape: the best of `REPEATS` runs in
//! milliseconds and GFLOP/s for each kernel, and each one's speed relative to
//! `matrixmultiply` (same run, same thread count; `RAYON_NUM_THREADS` pins it).

use rayon::prelude::*;
use std::time::Instant;
use verdict::backend::cpu::bf16::{matmul_xwt_with, Bf16Weight, Kernel};
use verdict::backend::cpu::gemm::matmul_xwt;
use verdict::backend::Store;
use verdict::rng::Rng;

const REPEATS: usize = 5;

/// (what, rows, in, out): prefill of 512 tokens through SmolLM2-135M's and Gemma 3 270M's
/// projections, and the tied embedding table as LM head on a few rows.
const SHAPES: [(&str, usize, usize, usize); 10] = [
    ("SmolLM2 q/o", 512, 576, 576),
    ("SmolLM2 k/v", 512, 576, 192),
    ("SmolLM2 gate/up", 512, 576, 1536),
    ("SmolLM2 down", 512, 1536, 576),
    ("Gemma3 q", 512, 640, 1024),
    ("Gemma3 o", 512, 1024, 640),
    ("Gemma3 gate/up", 512, 640, 2048),
    ("Gemma3 down", 512, 2048, 640),
    ("SmolLM2 LM head", 16, 576, 49152),
    ("Gemma3 LM head", 16, 640, 262144),
];

/// Output tile of the `matrixmultiply` baseline.
const TILE: usize = 256;

/// `out = x · wᵀ` the previous way: one single-threaded `matrixmultiply::sgemm` per
/// `TILE` × `TILE` output tile, tiles on rayon.
fn matrixmultiply_xwt(out: &mut [f32], x: &[f32], w: &[f32], k: usize, n: usize) {
    let col_tiles = n.div_ceil(TILE);
    out.par_chunks_mut(TILE * n)
        .enumerate()
        .for_each(|(row_tile, out)| {
            let r0 = row_tile * TILE;
            let rows = out.len() / n;
            for c0 in (0..col_tiles).map(|c| c * TILE) {
                // SAFETY: x rows r0.. and w rows c0.. (read as wᵀ's columns) lie inside x and
                // w; the tile's rows × cols values of `out` lie inside this task's rows.
                unsafe {
                    matrixmultiply::sgemm(
                        rows,
                        k,
                        TILE.min(n - c0),
                        1.0,
                        x.as_ptr().add(r0 * k),
                        k as isize,
                        1,
                        w.as_ptr().add(c0 * k),
                        1,
                        k as isize,
                        0.0,
                        out.as_mut_ptr().add(c0),
                        n as isize,
                        1,
                    );
                }
            }
        });
}

/// Best seconds of `REPEATS` runs of `f`, after one warm-up.
fn best(mut f: impl FnMut()) -> f64 {
    f();
    (0..REPEATS)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    verdict::backend::cpu::keep_freed_memory();
    let mut rng = Rng::new(5);
    let mut kernels = vec![Kernel::Portable];
    if Kernel::best() == Kernel::Avx512Bf16 {
        kernels.insert(0, Kernel::Avx512Bf16);
    }
    println!(
        "{} threads; kernels: f32 matrixmultiply, f32 gemm crate, bf16 {kernels:?}",
        rayon::current_num_threads()
    );
    println!("| shape | rows × in → out | f32 matrixmultiply: ms (GFLOP/s) | f32 gemm crate: ms (GFLOP/s, speed vs matrixmultiply) | bf16 kernels: ms (GFLOP/s, speed vs matrixmultiply) |");
    println!("|---|---|---|---|---|");
    for (what, rows, in_f, out_f) in SHAPES {
        let x: Vec<f32> = (0..rows * in_f).map(|_| rng.normal() as f32).collect();
        let w: Vec<f32> = (0..out_f * in_f).map(|_| rng.normal() as f32).collect();
        let packed = Bf16Weight::pack(&w, out_f, in_f);
        let mut out = vec![0.0; rows * out_f];
        let gflop = 2.0 * (rows * in_f * out_f) as f64 / 1e9;
        let f32_s = best(|| matrixmultiply_xwt(&mut out, &x, &w, in_f, out_f));
        let gemm_s = best(|| matmul_xwt(&mut out, &x, &w, rows, in_f, out_f, Store::Overwrite));
        let mut row = format!(
            "| {what} | {rows} × {in_f} → {out_f} | {:.2} ({:.0}) | {:.2} ({:.0}, {:.2}×) |",
            f32_s * 1e3,
            gflop / f32_s,
            gemm_s * 1e3,
            gflop / gemm_s,
            f32_s / gemm_s
        );
        for &kernel in &kernels {
            let s = best(|| matmul_xwt_with(kernel, &mut out, &x, &packed, rows, Store::Overwrite));
            row += &format!(
                " {kernel:?}: {:.2} ({:.0}, {:.2}×)",
                s * 1e3,
                gflop / s,
                f32_s / s
            );
        }
        println!("{row} |");
    }
}
