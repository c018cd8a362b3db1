//! The linear layer's products, with `X` `[rows, in]` and `W` `[out, in]` row-major: the
//! forward `out = X · Wᵀ` (or `out += s · X · Wᵀ`), and for backward the input gradient
//! `dX = dY · W` and the (trained weights') gradient `dW += s · dYᵀ · X`. This is where the
//! CPU forward and backward spend their time.
//!
//! `matrixmultiply::sgemm` (packed, SIMD, single-threaded) computes each output tile; rayon
//! runs the tiles in parallel. Tiles split both rows (tokens) and columns (output features),
//! so a product with few rows — the pooled score head, an LM head on one token — still uses
//! every core. No transpose is materialised: sgemm reads its operands through strides.

use crate::backend::Store;
use rayon::prelude::*;

/// Rows of `X` per tile. Every tile repacks its blocks of `X` and `W`, so larger tiles
/// pack less; 256 x 256 took the least CPU time on SmolLM2-135M shapes at 512 tokens
/// (1.33 s vs 1.41 s for 128 x 256 and 1.65 s for 64 x 576, 30 layers, AMD EPYC, 2 threads).
const TILE_ROWS: usize = 256;
/// Output features per tile (see `TILE_ROWS`).
const TILE_COLS: usize = 256;

/// The output pointer, shared by the tasks that write disjoint tiles of it.
#[derive(Clone, Copy)]
pub(super) struct OutPtr(pub(super) *mut f32);
// SAFETY: each task writes only its own tile; tiles never overlap (see `gemm`).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The pointer. A method, so closures capture the whole `Send` wrapper rather than (as
    /// edition 2021 does for field accesses) the bare raw-pointer field.
    pub(super) fn get(self) -> *mut f32 {
        self.0
    }
}

/// `out = X · Wᵀ` or `out += s · X · Wᵀ` as `store` says (the forward of a linear layer).
pub fn matmul_xwt(
    out: &mut [f32],
    x: &[f32],
    w: &[f32],
    rows: usize,
    in_f: usize,
    out_f: usize,
    store: Store,
) {
    check_shape("linear", "input", x, rows, in_f);
    check_shape("linear", "weight", w, out_f, in_f);
    check_shape("linear", "output", out, rows, out_f);
    let (a, b) = (Operand::rows(x, in_f), Operand::transposed(w, in_f));
    gemm(out, a, b, rows, in_f, out_f, store);
}

/// `dX = dY · W` or `dX += s · dY · W` (the input gradient of a linear layer, `dY`
/// `[rows, out]`, `dX` `[rows, in]`).
pub fn matmul_dyw(
    dx: &mut [f32],
    dy: &[f32],
    w: &[f32],
    rows: usize,
    in_f: usize,
    out_f: usize,
    store: Store,
) {
    check_shape("linear backward", "dY", dy, rows, out_f);
    check_shape("linear backward", "weight", w, out_f, in_f);
    check_shape("linear backward", "dX", dx, rows, in_f);
    let (a, b) = (Operand::rows(dy, out_f), Operand::rows(w, in_f));
    gemm(dx, a, b, rows, out_f, in_f, store);
}

/// `dW += s · dYᵀ · X` (the weight gradient of a linear layer, `dY` `[rows, out]`, `X`
/// `[rows, in]`, `dW` `[out, in]`); parameter gradients always accumulate.
pub fn matmul_dytx(
    dw: &mut [f32],
    dy: &[f32],
    x: &[f32],
    rows: usize,
    in_f: usize,
    out_f: usize,
    scale: f32,
) {
    check_shape("weight gradient", "dY", dy, rows, out_f);
    check_shape("weight gradient", "X", x, rows, in_f);
    check_shape("weight gradient", "dW", dw, out_f, in_f);
    let (a, b) = (Operand::transposed(dy, out_f), Operand::rows(x, in_f));
    gemm(dw, a, b, out_f, rows, in_f, Store::Accumulate(scale));
}

/// Panics unless `values` holds a `[rows, cols]` matrix.
fn check_shape(op: &str, what: &str, values: &[f32], rows: usize, cols: usize) {
    assert_eq!(
        values.len(),
        rows * cols,
        "{op}: {what} is not [{rows}, {cols}]"
    );
}

/// A matrix read in place through strides (so transposes are never materialised).
#[derive(Clone, Copy)]
struct Operand<'a> {
    values: &'a [f32],
    row_stride: usize,
    col_stride: usize,
}

impl<'a> Operand<'a> {
    /// A row-major matrix with `cols` columns, as stored.
    fn rows(values: &'a [f32], cols: usize) -> Operand<'a> {
        Operand {
            values,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose of a row-major matrix with `cols` columns: element (i, j) is
    /// `values[j * cols + i]`.
    fn transposed(values: &'a [f32], cols: usize) -> Operand<'a> {
        Operand {
            values,
            row_stride: 1,
            col_stride: cols,
        }
    }
}

/// `out [m, n] = A [m, k] · B [k, n]` (or `+= s · A · B`), tiled over the output: rayon runs
/// the tiles, each one single-threaded `sgemm`. Callers have checked the sizes.
fn gemm(out: &mut [f32], a: Operand, b: Operand, m: usize, k: usize, n: usize, store: Store) {
    let (alpha, beta) = match store {
        Store::Overwrite => (1.0, 0.0),
        Store::Accumulate(s) => (s, 1.0),
    };
    let row_tiles = m.div_ceil(TILE_ROWS);
    let col_tiles = n.div_ceil(TILE_COLS);
    let out_ptr = OutPtr(out.as_mut_ptr());
    (0..row_tiles * col_tiles).into_par_iter().for_each(|tile| {
        let r0 = (tile / col_tiles) * TILE_ROWS;
        let c0 = (tile % col_tiles) * TILE_COLS;
        let (tm, tn) = (TILE_ROWS.min(m - r0), TILE_COLS.min(n - c0));
        // SAFETY: A's rows r0.., B's columns c0.. and out's tile stay inside their slices
        // (sizes checked by the callers, tile bounds clipped to m / n), and tile (r0, c0)
        // writes only out[r0..r0+tm, c0..c0+tn], which no other tile touches.
        unsafe {
            matrixmultiply::sgemm(
                tm,
                k,
                tn,
                alpha,
                a.values.as_ptr().add(r0 * a.row_stride),
                a.row_stride as isize,
                a.col_stride as isize,
                b.values.as_ptr().add(c0 * b.col_stride),
                b.row_stride as isize,
                b.col_stride as isize,
                beta,
                out_ptr.get().add(r0 * n + c0),
                n as isize,
                1,
            );
        }
    });
}
