//! The fused LoRA ops on the GPU (DESIGN §6): the adapted projection's forward
//! `out = X·Wᵀ + s·(dropout(X)·Aᵀ)·Bᵀ` and its backward, as launches of the tensor-core
//! kernels of kernels/gemm.cu (the rank-r factors, the weight gradients dA and dB, PEFT's
//! dropout applied as operands are staged) and kernels/nf4.cu (the NF4 product with the LoRA
//! term in its own accumulators). No full-size temporary: the only buffers made are the
//! rank-r factors `[rows, r]`, where the composition of the reference
//! ([`Backend::lora_linear`]'s default, what the CPU runs) holds a dropped copy of X and, in
//! the backward, a full-size `d(dropout(X))`. Cases: `selftest/lora.rs`.

use super::driver::Gpu;
use super::gemm::{
    dense_weight_operand, gemm, linear_product, row_major, weight_grad, GemmKernel, Masked,
    Operand, ProductDropout,
};
use super::launch::{expect_f32, expect_len};
use super::nf4::{nf4_product, Nf4Kernel, Nf4LowRank, Nf4Product};
use super::{f32_bytes, Cuda, CudaBuf};
use crate::backend::{LoraAdapter, Store, Weight, WeightData};
use crate::model::weights::Dtype;
use anyhow::{bail, Result};

/// The dense values of one of the adapter's matrices.
fn dense<'a>(what: &str, w: &'a Weight<Cuda>) -> Result<&'a CudaBuf> {
    match &w.data {
        WeightData::Dense(values) => {
            expect_len("lora", what, values, w.out_features * w.in_features)?;
            expect_f32("lora", what, values)?;
            Ok(values)
        }
        _ => bail!("lora: {what} is not a dense f32 matrix"),
    }
}

/// A new `[rows, r]` buffer (the rank-r factors; every element is then written).
fn factor(gpu: &Gpu, op: &str, rows: usize, r: usize) -> Result<CudaBuf> {
    Ok(CudaBuf {
        block: gpu.alloc(op, f32_bytes(rows * r))?,
        len: rows * r,
        dtype: Dtype::F32,
    })
}

/// `down = dropout(X)·Aᵀ` [rows, r], the mask applied to X as the product stages it.
fn down(
    gpu: &Gpu,
    op: &str,
    kernel: GemmKernel,
    x: &CudaBuf,
    lora: &LoraAdapter<Cuda>,
    rows: usize,
) -> Result<CudaBuf> {
    let (r, in_f) = (lora.a.out_features, lora.a.in_features);
    expect_len(op, "the input", x, rows * in_f)?;
    let a = dense("A", lora.a)?;
    let out = factor(gpu, op, rows, r)?;
    let dropout = lora.dropout.map(|(p, seed)| ProductDropout {
        on: Masked::A,
        p,
        seed,
    });
    let b = dense_weight_operand(a.ptr(), in_f, Nf4Product::Forward);
    gemm(
        gpu,
        op,
        kernel,
        &out,
        row_major(x, in_f),
        b,
        (rows, r, in_f),
        Store::Overwrite,
        dropout,
    )?;
    Ok(out)
}

/// The LoRA term a product adds: `s · factor · M` with `factor` [rows, r] row-major and
/// `M(n, j)` read through `w`; `dropout` masks it as it is stored (the input gradient's).
struct Term<'a> {
    factor: &'a CudaBuf,
    w: Operand,
    rank: usize,
    scale: f32,
    dropout: Option<(f32, u64)>,
}

/// `out (=|+= α·) base + term` with base the plain product of `product` (`A · Wᵀ` or
/// `A · W`): the term inside the NF4 tensor-core product when `w` is NF4, that is the kernel
/// the plain product takes and no mask applies to the term alone; otherwise (GEMV rows, NF4
/// widths off the group, dense bases, a masked term) the base product, then the term added
/// by a tensor-core product straight into `out` (no temporary either way). A 16-bit `out` is
/// rounded once on the fused path, twice on the other (the base's store, then the term's
/// accumulating store): up to one more half-ulp, inside the selftest's 16-bit store bound.
#[allow(clippy::too_many_arguments)]
fn product_with_term(
    gpu: &Gpu,
    op: &str,
    product: Nf4Product,
    out: &CudaBuf,
    a: &CudaBuf,
    w: &Weight<Cuda>,
    rows: usize,
    store: Store,
    term: Term,
) -> Result<()> {
    let cc = gpu.info().compute_capability;
    if let (WeightData::Nf4(q), None) = (&w.data, term.dropout) {
        if let nf4 @ Nf4Kernel::Mma(_) = Nf4Kernel::choose(product, rows, q.cols, cc) {
            let term = Nf4LowRank {
                x: term.factor,
                w: term.w,
                rank: term.rank,
                scale: term.scale,
            };
            return nf4_product(gpu, op, product, out, a, q, rows, store, nf4, Some(&term));
        }
    }
    let kernel = GemmKernel::for_arch(cc);
    linear_product(gpu, op, product, out, a, w, rows, store, kernel)?;
    let (n, _) = product.output_and_reduction(w.out_features, w.in_features);
    let dropout = term.dropout.map(|(p, seed)| ProductDropout {
        on: Masked::Out,
        p,
        seed,
    });
    gemm(
        gpu,
        op,
        kernel,
        out,
        row_major(term.factor, term.rank),
        term.w,
        (rows, n, term.rank),
        Store::Accumulate(term.scale * store.factor()),
        dropout,
    )
}

/// [`crate::backend::Backend::lora_linear`] on the GPU.
pub(super) fn forward(
    gpu: &Gpu,
    out: &CudaBuf,
    x: &CudaBuf,
    w: &Weight<Cuda>,
    lora: &LoraAdapter<Cuda>,
    rows: usize,
) -> Result<()> {
    let op = "lora_linear";
    let kernel = GemmKernel::for_arch(gpu.info().compute_capability);
    let r = lora.a.out_features;
    let down = down(gpu, op, kernel, x, lora, rows)?;
    let b = dense("B", lora.b)?;
    // out[t, o] gets s · Σ_j down[t, j] · B[o, j]: M(o, j) = B[o · r + j].
    let term = Term {
        factor: &down,
        w: dense_weight_operand(b.ptr(), r, Nf4Product::Forward),
        rank: r,
        scale: lora.scale,
        dropout: None,
    };
    product_with_term(
        gpu,
        op,
        Nf4Product::Forward,
        out,
        x,
        w,
        rows,
        Store::Overwrite,
        term,
    )
}

/// [`crate::backend::Backend::lora_linear_backward`] on the GPU.
#[allow(clippy::too_many_arguments)]
pub(super) fn backward(
    gpu: &Gpu,
    dx: &CudaBuf,
    dy: &CudaBuf,
    x: &CudaBuf,
    w: &Weight<Cuda>,
    lora: &LoraAdapter<Cuda>,
    rows: usize,
    store: Store,
    [da, db]: [&CudaBuf; 2],
) -> Result<()> {
    let op = "lora_linear_backward";
    let kernel = GemmKernel::for_arch(gpu.info().compute_capability);
    let (r, in_f, out_f) = (lora.a.out_features, lora.a.in_features, lora.b.out_features);
    expect_len(op, "dy", dy, rows * out_f)?;
    let (a, b) = (dense("A", lora.a)?, dense("B", lora.b)?);
    let down = down(gpu, op, kernel, x, lora, rows)?;
    let shape = (rows, r, out_f);
    weight_grad(gpu, op, kernel, db, dy, &down, shape, lora.scale, None)?;
    drop(down);
    // d_down = dY·B [rows, r].
    let d_down = factor(gpu, op, rows, r)?;
    let b_operand = dense_weight_operand(b.ptr(), r, Nf4Product::Backward);
    let dy_operand = row_major(dy, out_f);
    gemm(
        gpu,
        op,
        kernel,
        &d_down,
        dy_operand,
        b_operand,
        shape,
        Store::Overwrite,
        None,
    )?;
    let shape = (rows, in_f, r);
    weight_grad(
        gpu,
        op,
        kernel,
        da,
        &d_down,
        x,
        shape,
        lora.scale,
        lora.dropout,
    )?;
    // dX[t, i] gets s · dropout(Σ_j d_down[t, j] · A[j, i]): M(i, j) = A[j · in + i]; the
    // mask, where dropout is on, applies to the term as it is stored (not to dY·W).
    let term = Term {
        factor: &d_down,
        w: dense_weight_operand(a.ptr(), in_f, Nf4Product::Backward),
        rank: r,
        scale: lora.scale,
        dropout: lora.dropout,
    };
    product_with_term(gpu, op, Nf4Product::Backward, dx, dy, w, rows, store, term)
}
