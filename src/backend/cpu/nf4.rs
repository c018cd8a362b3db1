//! NF4 dequant-matmuls on the CPU: the `linear` and `linear_backward` products with an NF4
//! weight (`WeightData::Nf4`), the reference `kernels/nf4.cu` is checked against. The format
//! itself (quantize, dequantize, bnb-4bit tensors) lives in `quant::nf4`; these products only
//! read it through `Nf4Weight::dequantize_tile`, a tile at a time, never the whole matrix.

use crate::backend::Store;
use crate::quant::nf4::Nf4Weight;
use rayon::prelude::*;
use std::ops::Range;

// Tile sizes: on the 2-core AVX512 dev box (single-threaded CPU time, Gemma2-2B shapes,
// m = 1..128) every tile from 32 to 512 rows/columns gave the same time within noise: sgemm
// dominates from m = 16 up, dequantization (about 0.2 ns per weight) below. Dot-product /
// axpy paths for m <= 4 instead of sgemm measured no faster either, so there is one path.
// matrixmultiply is built without its `threading` feature, so each sgemm is single-threaded
// and rayon alone decides the parallelism.
/// Output features per rayon task in the dequant-matmuls.
const OUT_TILE: usize = 64;
/// Length of the reduction dimension dequantized at a time in the dequant-matmuls.
const K_TILE: usize = 256;

/// `out = X · Wᵀ` with `X [m, cols]`, `W` NF4 `[rows, cols]`, `out [m, rows]` (overwritten).
/// Never materialises `W`; equal to dequantize-then-matmul up to f32 summation order.
pub fn matmul_xwt(x: &[f32], m: usize, w: &Nf4Weight, out: &mut [f32]) {
    // The tile is W[n, k] row-major, so Wᵀ's element (kk, j) sits at j * k.len() + kk.
    dequant_matmul("matmul_xwt", x, m, w.cols(), out, w.rows(), |n, k, tile| {
        w.dequantize_tile(n, k.clone(), tile);
        (1, k.len())
    });
}

/// `dx = dY · W` with `dY [m, rows]`, `W` NF4 `[rows, cols]`, `dx [m, cols]` (overwritten):
/// the input gradient of `Y = X · Wᵀ`. Never materialises `W`.
pub fn matmul_dyw(dy: &[f32], m: usize, w: &Nf4Weight, dx: &mut [f32]) {
    // The tile is W[k, n] row-major: element (kk, j) at kk * n.len() + j.
    dequant_matmul("matmul_dyw", dy, m, w.rows(), dx, w.cols(), |n, k, tile| {
        w.dequantize_tile(k, n.clone(), tile);
        (n.len(), 1)
    });
}

/// `out [m, n] = A [m, k] · B [k, n]` where `B` is only ever seen as dequantized tiles:
/// `tile(n_range, k_range, buffer)` fills `buffer` with `B[k_range, n_range]` and returns its
/// (row, column) strides. Each rayon task owns `OUT_TILE` columns of `out` and accumulates
/// one `sgemm` per `K_TILE` slice of the reduction.
fn dequant_matmul(
    op: &str,
    a: &[f32],
    m: usize,
    k: usize,
    out: &mut [f32],
    n: usize,
    tile: impl Fn(Range<usize>, Range<usize>, &mut [f32]) -> (usize, usize) + Sync,
) {
    assert_eq!(a.len(), m * k, "NF4 {op}: input is not [{m}, {k}]");
    assert_eq!(out.len(), m * n, "NF4 {op}: output is not [{m}, {n}]");
    if m == 0 {
        return;
    }
    let blocks: Vec<(Range<usize>, Vec<f32>)> = (0..n.div_ceil(OUT_TILE))
        .into_par_iter()
        .map(|t| {
            let cols = t * OUT_TILE..((t + 1) * OUT_TILE).min(n);
            let mut block = vec![0f32; m * cols.len()];
            let mut buffer = vec![0f32; K_TILE * cols.len()];
            for k0 in (0..k).step_by(K_TILE) {
                let ks = k0..(k0 + K_TILE).min(k);
                let buffer = &mut buffer[..ks.len() * cols.len()];
                let (row_stride, col_stride) = tile(cols.clone(), ks.clone(), buffer);
                // SAFETY: A[:, ks] (m × ks.len(), row stride k) lies inside `a` (m · k values);
                // the strides from `tile` address ks.len() × cols.len() values of `buffer`;
                // C = block (m × cols.len(), row-major) was allocated to that size.
                unsafe {
                    matrixmultiply::sgemm(
                        m,
                        ks.len(),
                        cols.len(),
                        1.0,
                        a.as_ptr().add(k0),
                        k as isize,
                        1,
                        buffer.as_ptr(),
                        row_stride as isize,
                        col_stride as isize,
                        if k0 == 0 { 0.0 } else { 1.0 },
                        block.as_mut_ptr(),
                        cols.len() as isize,
                        1,
                    );
                }
            }
            (cols, block)
        })
        .collect();
    scatter_columns(blocks, out, n);
}

/// Copies each `[m, range.len()]` block into columns `range` of `out [m, width]`.
fn scatter_columns(blocks: Vec<(Range<usize>, Vec<f32>)>, out: &mut [f32], width: usize) {
    for (range, block) in blocks {
        for (out_row, block_row) in out
            .chunks_exact_mut(width)
            .zip(block.chunks_exact(range.len()))
        {
            out_row[range.clone()].copy_from_slice(block_row);
        }
    }
}

/// Stores an NF4 dequant-matmul into `out` as `store` says: the products above overwrite
/// their output, so an accumulating store goes through a scratch buffer.
pub(super) fn store(out: &mut [f32], store: Store, product: impl FnOnce(&mut [f32])) {
    match store {
        Store::Overwrite => product(out),
        Store::Accumulate(s) => {
            let mut scratch = vec![0.0; out.len()];
            product(&mut scratch);
            out.iter_mut().zip(&scratch).for_each(|(o, p)| *o += s * p);
        }
    }
}
