//! The linear layer's products, with `X` `[rows, in]` and `W` `[out, in]` row-major: the
//! forward `out = X · Wᵀ` (or `out += s · X · Wᵀ`), and for backward the input gradient
//! `dX = dY · W` and the (trained weights') gradient `dW += s · dYᵀ · X`. This is where the
//! CPU forward and backward spend their time.
//!
//! The `gemm` crate (candle's CPU matmul: packed, AVX-512/AVX2/NEON kernels chosen at run
//! time, its own rayon split) computes each product; no transpose is materialised, it reads
//! its operands through strides. On SmolLM2-135M and Gemma 3 270M prefill shapes it ran
//! 1.2-2.3x faster than the previous `matrixmultiply` tiling (256 x 256 output tiles, one
//! single-threaded sgemm each, on rayon), `cargo bench --bench cpu_gemm`, which times both.

use crate::backend::Store;

/// The output pointer, shared by the tasks that write disjoint tiles of it.
#[derive(Clone, Copy)]
pub(super) struct OutPtr(pub(super) *mut f32);
// SAFETY: each task writes only its own tile; tiles never overlap (each user says why).
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

/// `out [m, n] = A [m, k] · B [k, n]` (or `+= s · A · B`), threaded over rayon's pool.
/// Callers have checked the sizes.
fn gemm(out: &mut [f32], a: Operand, b: Operand, m: usize, k: usize, n: usize, store: Store) {
    // gemm computes dst = alpha · dst + beta · A · B, reading dst only if asked.
    let (alpha, beta, read_dst) = match store {
        Store::Overwrite => (0.0, 1.0, false),
        Store::Accumulate(s) => (1.0, s, true),
    };
    let parallelism = match rayon::current_num_threads() {
        1 => gemm::Parallelism::None,
        threads => gemm::Parallelism::Rayon(threads),
    };
    // SAFETY: A is m × k and B k × n through their strides inside their slices, and out is
    // m × n row-major (sizes checked by the callers); the three do not overlap (out is the
    // only &mut).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            read_dst,
            a.values.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.values.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            alpha,
            beta,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// `C [m, n] = alpha · A [m, k] · B [k, n] + beta · C`, single-threaded, every operand read
/// through (row, column) strides (`beta == 0`: `C` is not read): the small products inside
/// tasks that are already parallel (attention's per-block scores and outputs, NF4 tiles).
/// `matrixmultiply::sgemm`'s signature, through the `gemm` crate.
///
/// # Safety
/// The strides must keep every access inside the three matrices, and `C` must not overlap
/// `A` or `B`.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn sgemm_serial(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: *const f32,
    (a_rows, a_cols): (isize, isize),
    b: *const f32,
    (b_rows, b_cols): (isize, isize),
    beta: f32,
    c: *mut f32,
    (c_rows, c_cols): (isize, isize),
) {
    gemm::gemm(
        m,
        n,
        k,
        c,
        c_cols,
        c_rows,
        beta != 0.0,
        a,
        a_cols,
        a_rows,
        b,
        b_cols,
        b_rows,
        beta,
        alpha,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}
