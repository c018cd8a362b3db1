//! The dense products on the GPU (kernels/gemm.cu): the strided product on CUDA cores (f32)
//! or tensor cores (f16/bf16 operands), the dispatch of `linear` / `linear_backward` to it or,
//! for an NF4 weight, to `cuda/nf4.rs`; the weight gradient `dW += s · dYᵀ · X`. CPU
//! reference: `backend/cpu/gemm.rs`; cases: `selftest/gemm.rs`. Activation operands and
//! outputs are f32 or 16-bit (each buffer's dtype code goes to the kernel); weights are f32.

use super::driver::{Gpu, KernelArg};
use super::launch::{expect_f32, expect_len, store_args, to_u32, LaunchConfig};
use super::nf4::{nf4_product, MmaOperands, Nf4Kernel, Nf4Product, NF4_MMA_THREADS, NF4_MMA_TILE};
use super::{dtype_code, Cuda, CudaBuf, CudaNf4};
use crate::backend::{Store, Weight, WeightData};
use crate::model::weights::Dtype;
use anyhow::{bail, ensure, Result};

/// `GEMM_THREADS` (gemm.cu).
pub const GEMM_THREADS: u32 = 256;
/// `GEMM_TILE` (gemm.cu): rows and columns of out per block.
pub const GEMM_TILE: usize = 64;

impl LaunchConfig {
    /// The dense product on `kernel` for an `[m, n]` output: one block per 64 x 64 tile.
    pub fn gemm(what: &str, kernel: GemmKernel, m: usize, n: usize) -> Result<LaunchConfig> {
        let (tile, threads) = match kernel {
            GemmKernel::F32 => (GEMM_TILE, GEMM_THREADS),
            GemmKernel::Mma(_) => (NF4_MMA_TILE, NF4_MMA_THREADS),
        };
        LaunchConfig::grid_2d(what, n.div_ceil(tile), m.div_ceil(tile), threads)
    }
}

/// The kernel that computes a dense product (kernels/gemm.cu).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmKernel {
    /// f32 FMAs on CUDA cores (`gemm_f32`): the device's f32 reference, and the product of
    /// NF4 weights dequantized for widths off the 16-element group.
    F32,
    /// Tensor cores, operands rounded to 16 bits, f32 accumulation (`gemm_mma_f16|bf16`):
    /// what the backend's dense products use, with the card's operand type.
    Mma(MmaOperands),
}

impl GemmKernel {
    /// The tensor-core kernel with the card's operand type (DESIGN §5: f16 on sm_75, bf16 on
    /// sm_80+): the backend's dense products.
    pub fn for_arch(compute_capability: (i32, i32)) -> GemmKernel {
        GemmKernel::Mma(MmaOperands::for_arch(compute_capability))
    }

    /// Every dense-product kernel this card runs (the selftest checks each).
    pub fn applicable(compute_capability: (i32, i32)) -> Vec<GemmKernel> {
        let mut kernels = vec![GemmKernel::F32, GemmKernel::Mma(MmaOperands::F16)];
        if compute_capability.0 >= 8 {
            kernels.push(GemmKernel::Mma(MmaOperands::Bf16));
        }
        kernels
    }

    /// The kernels/gemm.cu entry point.
    pub fn entry_point(self) -> &'static str {
        match self {
            GemmKernel::F32 => "gemm_f32",
            GemmKernel::Mma(MmaOperands::F16) => "gemm_mma_f16",
            GemmKernel::Mma(MmaOperands::Bf16) => "gemm_mma_bf16",
        }
    }

    /// "f32", "mma-f16" or "mma-bf16".
    pub fn name(self) -> String {
        match self {
            GemmKernel::F32 => "f32".into(),
            GemmKernel::Mma(op) => format!("mma-{}", op.name()),
        }
    }
}

/// Which operand of a tensor-core product a dropout mask applies to (gemm.cu's
/// `GEMM_DROPOUT_*`), by the element's offset in that operand's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Masked {
    /// A, as staged (`dropout(X) · Aᵀ`: LoRA's down product).
    A = 1,
    /// B, as staged (`dYᵀ · dropout(X)` read transposed: LoRA's dA).
    B = 2,
    /// The product, as stored (`dX += dropout(...)`: LoRA's input gradient).
    Out = 3,
}

/// PEFT's dropout inside a product: `p`, its seed, and where (see [`Masked`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct ProductDropout {
    pub(super) on: Masked,
    pub(super) p: f32,
    pub(super) seed: u64,
}

/// An operand of the strided GEMM: element (row, k) at `ptr[row * row_stride + k * k_stride]`,
/// of the type `dtype` codes (storage.cuh's DTYPE_*: f32 or 16-bit).
pub(super) struct Operand {
    pub(super) ptr: u64,
    pub(super) dtype: u32,
    pub(super) row_stride: usize,
    pub(super) k_stride: usize,
}

/// `out[m, n] (=|+= s·) Σ_k A(m, k) · B(n, k)` on `kernel` (kernels/gemm.cu), with PEFT's
/// dropout on one operand where `dropout` says (tensor cores only).
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm(
    gpu: &Gpu,
    op: &str,
    kernel: GemmKernel,
    out: &CudaBuf,
    a: Operand,
    b: Operand,
    (m, n, k): (usize, usize, usize),
    store: Store,
    dropout: Option<ProductDropout>,
) -> Result<()> {
    if let GemmKernel::Mma(MmaOperands::Bf16) = kernel {
        let (major, minor) = gpu.info().compute_capability;
        ensure!(
            major >= 8,
            "{op}: bf16 tensor cores need sm_80 or newer; this card is sm_{major}{minor}"
        );
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    ensure!(
        kernel != GemmKernel::F32 || dropout.is_none(),
        "{op}: dropout inside a product needs the tensor-core kernel"
    );
    let (mut alpha, mut accumulate) = store_args(store);
    let (mut out_ptr, mut a_ptr, mut b_ptr) = (out.ptr(), a.ptr, b.ptr);
    let (mut out_dtype, mut a_dtype, mut b_dtype) = (out.dtype_code(), a.dtype, b.dtype);
    let (mut m32, mut n32, mut k32) = (
        to_u32("rows", m)?,
        to_u32("output features", n)?,
        to_u32("reduction length", k)?,
    );
    let (mut a_row, mut a_k) = (a.row_stride as u64, a.k_stride as u64);
    let (mut b_row, mut b_k) = (b.row_stride as u64, b.k_stride as u64);
    // gemm_mma's dropout arguments (none: GEMM_DROPOUT_NONE, p = 0 keeps everything).
    let (mut on, mut p, mut seed) = match dropout {
        Some(d) => {
            ensure!(
                (0.0..1.0).contains(&d.p),
                "{op}: p = {} is not in [0, 1)",
                d.p
            );
            (d.on as u32, d.p, d.seed)
        }
        None => (0u32, 0.0f32, 0u64),
    };
    let mut keep_scale = 1.0 / (1.0 - p);
    let mut args: Vec<&mut dyn KernelArg> = vec![
        &mut out_ptr,
        &mut out_dtype,
        &mut a_ptr,
        &mut a_dtype,
        &mut b_ptr,
        &mut b_dtype,
        &mut m32,
        &mut n32,
        &mut k32,
        &mut a_row,
        &mut a_k,
        &mut b_row,
        &mut b_k,
        &mut alpha,
        &mut accumulate,
    ];
    if let GemmKernel::Mma(_) = kernel {
        args.extend([
            &mut on as &mut dyn KernelArg,
            &mut p,
            &mut keep_scale,
            &mut seed,
        ]);
    }
    let config = LaunchConfig::gemm(op, kernel, m, n)?;
    gpu.launch(op, "gemm", kernel.entry_point(), config, &mut args)
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
            expect_f32(op, "the weight", values)?;
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

/// A row-major `[rows, k]` activation (of its own dtype) as the strided GEMM's A operand.
pub(super) fn row_major(a: &CudaBuf, k: usize) -> Operand {
    Operand {
        ptr: a.ptr(),
        dtype: a.dtype_code(),
        row_stride: k,
        k_stride: 1,
    }
}

/// The strided-GEMM operand of a dense row-major f32 `[out, in]` weight for `product`.
pub(super) fn dense_weight_operand(ptr: u64, in_f: usize, product: Nf4Product) -> Operand {
    let dtype = dtype_code(Dtype::F32);
    match product {
        // out[r, o] = Σ_i X[r, i] · W[o, i]: B(o, i) = W[o, i].
        Nf4Product::Forward => Operand {
            ptr,
            dtype,
            row_stride: in_f,
            k_stride: 1,
        },
        // dX[r, i] = Σ_o dY[r, o] · W[o, i]: B(i, o) = W[o, i].
        Nf4Product::Backward => Operand {
            ptr,
            dtype,
            row_stride: 1,
            k_stride: in_f,
        },
    }
}

/// `out (=|+= s·) A · Wᵀ` (forward) or `A · W` (backward) for `rows` rows of `a`; a dense
/// weight's product on `dense`, an NF4 weight's on the kernel [`Nf4Kernel::choose`] picks.
#[allow(clippy::too_many_arguments)]
pub(super) fn linear_product(
    gpu: &Gpu,
    op: &str,
    product: Nf4Product,
    out: &CudaBuf,
    a: &CudaBuf,
    w: &Weight<Cuda>,
    rows: usize,
    store: Store,
    dense: GemmKernel,
) -> Result<()> {
    match linear_weight(op, w)? {
        LinearWeight::Dense(values) => {
            let (n, k) = product.output_and_reduction(w.out_features, w.in_features);
            expect_len(op, "the input", a, rows * k)?;
            expect_len(op, "the output", out, rows * n)?;
            let b = dense_weight_operand(values.ptr(), w.in_features, product);
            gemm(
                gpu,
                op,
                dense,
                out,
                row_major(a, k),
                b,
                (rows, n, k),
                store,
                None,
            )
        }
        LinearWeight::Nf4(q) => {
            let kernel = Nf4Kernel::choose(product, rows, q.cols, gpu.info().compute_capability);
            nf4_product(gpu, op, product, out, a, q, rows, store, kernel, None)
        }
    }
}

/// `dW += s · dYᵀ · drop(X)` (`dY` [rows, out], `X` [rows, in], `dW` [out, in]) on `kernel`,
/// `drop` PEFT's dropout `(p, seed)` of X where LoRA's dA needs it.
#[allow(clippy::too_many_arguments)]
pub(super) fn weight_grad(
    gpu: &Gpu,
    op: &str,
    kernel: GemmKernel,
    dw: &CudaBuf,
    dy: &CudaBuf,
    x: &CudaBuf,
    (rows, in_f, out_f): (usize, usize, usize),
    scale: f32,
    drop: Option<(f32, u64)>,
) -> Result<()> {
    expect_len(op, "dy", dy, rows * out_f)?;
    expect_len(op, "x", x, rows * in_f)?;
    expect_len(op, "dw", dw, out_f * in_f)?;
    // dW[o, i] += s · Σ_r dY[r, o] · X[r, i]: A(o, r) = dY[r, o], B(i, r) = X[r, i] (whose
    // offset r · in + i is X's own index: the dropout mask applies as is).
    let a = Operand {
        ptr: dy.ptr(),
        dtype: dy.dtype_code(),
        row_stride: 1,
        k_stride: out_f,
    };
    let b = Operand {
        ptr: x.ptr(),
        dtype: x.dtype_code(),
        row_stride: 1,
        k_stride: in_f,
    };
    let dropout = drop.map(|(p, seed)| ProductDropout {
        on: Masked::B,
        p,
        seed,
    });
    gemm(
        gpu,
        op,
        kernel,
        dw,
        a,
        b,
        (out_f, in_f, rows),
        Store::Accumulate(scale),
        dropout,
    )
}
