//! The linear layer's products on the GPU: the strided f32 GEMM (kernels/gemm.cu) for dense
//! weights, and the dispatch of `linear` / `linear_backward` to it or, for an NF4 weight, to
//! `cuda/nf4.rs`; the weight gradient `dW += s · dYᵀ · X`. CPU reference:
//! `backend/cpu/gemm.rs`; cases: `selftest/gemm.rs`.

use super::driver::Gpu;
use super::launch::{expect_len, store_args, to_u32, LaunchConfig};
use super::nf4::{nf4_product, Nf4Kernel, Nf4Product};
use super::{Cuda, CudaBuf, CudaNf4};
use crate::backend::{Store, Weight, WeightData};
use anyhow::{bail, ensure, Result};

/// `GEMM_THREADS` (gemm.cu).
pub const GEMM_THREADS: u32 = 256;
/// `GEMM_TILE` (gemm.cu): rows and columns of out per block.
pub const GEMM_TILE: usize = 64;

impl LaunchConfig {
    /// The tiled GEMM for an `[m, n]` output: one block per 64 x 64 tile.
    pub fn gemm(what: &str, m: usize, n: usize) -> Result<LaunchConfig> {
        LaunchConfig::grid_2d(
            what,
            n.div_ceil(GEMM_TILE),
            m.div_ceil(GEMM_TILE),
            GEMM_THREADS,
        )
    }
}

/// An operand of the strided GEMM: element (row, k) at `ptr[row * row_stride + k * k_stride]`.
pub(super) struct Operand {
    pub(super) ptr: u64,
    pub(super) row_stride: usize,
    pub(super) k_stride: usize,
}

/// `out[m, n] (=|+= s·) Σ_k A(m, k) · B(n, k)` (kernels/gemm.cu).
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm(
    gpu: &Gpu,
    op: &str,
    out: &CudaBuf,
    a: Operand,
    b: Operand,
    m: usize,
    n: usize,
    k: usize,
    store: Store,
) -> Result<()> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    let (mut alpha, mut accumulate) = store_args(store);
    gpu.launch(
        op,
        "gemm",
        "gemm_f32",
        LaunchConfig::gemm(op, m, n)?,
        &mut [
            &mut out.ptr(),
            &mut { a.ptr },
            &mut { b.ptr },
            &mut to_u32("rows", m)?,
            &mut to_u32("output features", n)?,
            &mut to_u32("reduction length", k)?,
            &mut (a.row_stride as u64),
            &mut (a.k_stride as u64),
            &mut (b.row_stride as u64),
            &mut (b.k_stride as u64),
            &mut alpha,
            &mut accumulate,
        ],
    )
}

/// The dense f32 weight of `w`, or the NF4 weight to multiply with directly.
enum LinearWeight<'a> {
    Dense(&'a CudaBuf),
    Nf4(&'a CudaNf4),
}

fn linear_weight<'a>(op: &str, w: &'a Weight<Cuda>) -> Result<LinearWeight<'a>> {
    let (rows, cols) = (w.out_features, w.in_features);
    match &w.data {
        WeightData::Dense(values) => {
            expect_len(op, "the weight", values, rows * cols)?;
            Ok(LinearWeight::Dense(values))
        }
        WeightData::Nf4(q) => {
            ensure!(
                q.rows == rows && q.cols == cols,
                "{op}: NF4 weight is [{}, {}], expected [{rows}, {cols}]",
                q.rows,
                q.cols
            );
            Ok(LinearWeight::Nf4(q))
        }
        WeightData::Half(_) => {
            bail!("{op}: a half-precision weight; only the embedding op reads half tables so far")
        }
        WeightData::Bf16(never) => match *never {},
    }
}

/// A row-major `[rows, k]` activation as the strided GEMM's A operand.
pub(super) fn row_major(a: &CudaBuf, k: usize) -> Operand {
    Operand {
        ptr: a.ptr(),
        row_stride: k,
        k_stride: 1,
    }
}

/// The strided-GEMM operand of a dense row-major `[out, in]` weight for `product`.
pub(super) fn dense_weight_operand(ptr: u64, in_f: usize, product: Nf4Product) -> Operand {
    match product {
        // out[r, o] = Σ_i X[r, i] · W[o, i]: B(o, i) = W[o, i].
        Nf4Product::Forward => Operand {
            ptr,
            row_stride: in_f,
            k_stride: 1,
        },
        // dX[r, i] = Σ_o dY[r, o] · W[o, i]: B(i, o) = W[o, i].
        Nf4Product::Backward => Operand {
            ptr,
            row_stride: 1,
            k_stride: in_f,
        },
    }
}

/// `out (=|+= s·) A · Wᵀ` (forward) or `A · W` (backward) for `rows` rows of `a`.
#[allow(clippy::too_many_arguments)]
fn linear_product(
    gpu: &Gpu,
    op: &str,
    product: Nf4Product,
    out: &CudaBuf,
    a: &CudaBuf,
    w: &Weight<Cuda>,
    rows: usize,
    store: Store,
) -> Result<()> {
    match linear_weight(op, w)? {
        LinearWeight::Dense(values) => {
            let (n, k) = product.output_and_reduction(w.out_features, w.in_features);
            expect_len(op, "the input", a, rows * k)?;
            expect_len(op, "the output", out, rows * n)?;
            let b = dense_weight_operand(values.ptr(), w.in_features, product);
            gemm(gpu, op, out, row_major(a, k), b, rows, n, k, store)
        }
        LinearWeight::Nf4(q) => {
            let kernel = Nf4Kernel::choose(product, rows, q.cols, gpu.info().compute_capability);
            nf4_product(gpu, op, product, out, a, q, rows, store, kernel)
        }
    }
}

pub(super) fn linear(
    gpu: &Gpu,
    out: &CudaBuf,
    x: &CudaBuf,
    w: &Weight<Cuda>,
    rows: usize,
    store: Store,
) -> Result<()> {
    linear_product(gpu, "linear", Nf4Product::Forward, out, x, w, rows, store)
}

pub(super) fn linear_backward(
    gpu: &Gpu,
    dx: &CudaBuf,
    dy: &CudaBuf,
    w: &Weight<Cuda>,
    rows: usize,
    store: Store,
) -> Result<()> {
    linear_product(
        gpu,
        "linear_backward",
        Nf4Product::Backward,
        dx,
        dy,
        w,
        rows,
        store,
    )
}

#[allow(clippy::too_many_arguments)]
pub(super) fn linear_weight_grad(
    gpu: &Gpu,
    dw: &CudaBuf,
    dy: &CudaBuf,
    x: &CudaBuf,
    rows: usize,
    in_f: usize,
    out_f: usize,
    scale: f32,
) -> Result<()> {
    let op = "linear_weight_grad";
    expect_len(op, "dy", dy, rows * out_f)?;
    expect_len(op, "x", x, rows * in_f)?;
    expect_len(op, "dw", dw, out_f * in_f)?;
    // dW[o, i] += s · Σ_r dY[r, o] · X[r, i]: A(o, r) = dY[r, o], B(i, r) = X[r, i].
    let a = Operand {
        ptr: dy.ptr(),
        row_stride: 1,
        k_stride: out_f,
    };
    let b = Operand {
        ptr: x.ptr(),
        row_stride: 1,
        k_stride: in_f,
    };
    gemm(
        gpu,
        op,
        dw,
        a,
        b,
        out_f,
        in_f,
        rows,
        Store::Accumulate(scale),
    )
}
