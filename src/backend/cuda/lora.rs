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
    ProductDropout,
};
use super::launch::expect_len;
use super::nf4::{nf4_product, Nf4Kernel, Nf4LowRank, Nf4Product};
use super::{f32_bytes, Cuda, CudaBuf};
use crate::backend::{LoraAdapter, Store, Weight, WeightData};
use anyhow::{bail, Result};

/// The dense values of one of the adapter's matrices.
fn dense<'a>(what: &str, w: &'a Weight<Cuda>) -> Result<&'a CudaBuf> {
    match &w.data {
        WeightData::Dense(values) => {
            expect_len("lora", what, values, w.out_features * w.in_features)?;
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

/// The tensor-core NF4 kernel of `product` when `w` is NF4 and that is the kernel the plain
/// product would take: the one that can add the LoRA term.
fn fused_nf4_kernel(gpu: &Gpu, product: Nf4Product, w: &Weight<Cuda>, rows: usize) -> bool {
    match &w.data {
        WeightData::Nf4(q) => matches!(
            Nf4Kernel::choose(product, rows, q.cols, gpu.info().compute_capability),
            Nf4Kernel::Mma(_)
        ),
        _ => false,
    }
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
    let (r, out_f) = (lora.a.out_features, lora.b.out_features);
    let down = down(gpu, op, kernel, x, lora, rows)?;
    let b = dense("B", lora.b)?;
    // out(o) gets s · Σ_j down[t, j] · B[o, j]: B(o, j) = B[o · r + j].
    let b_operand = dense_weight_operand(b.ptr(), r, Nf4Product::Forward);
    match &w.data {
        WeightData::Nf4(q) if fused_nf4_kernel(gpu, Nf4Product::Forward, w, rows) => {
            let nf4 = Nf4Kernel::choose(
                Nf4Product::Forward,
                rows,
                q.cols,
                gpu.info().compute_capability,
            );
            let term = Nf4LowRank {
                x: &down,
                w: b_operand,
                rank: r,
                scale: lora.scale,
            };
            nf4_product(
                gpu,
                op,
                Nf4Product::Forward,
                out,
                x,
                q,
                rows,
                Store::Overwrite,
                nf4,
                Some(&term),
            )
        }
        // GEMV rows, NF4 widths off the group, dense bases: the base product, then the term.
        _ => {
            linear_product(
                gpu,
                op,
                Nf4Product::Forward,
                out,
                x,
                w,
                rows,
                Store::Overwrite,
                kernel,
            )?;
            gemm(
                gpu,
                op,
                kernel,
                out,
                row_major(&down, r),
                b_operand,
                (rows, out_f, r),
                Store::Accumulate(lora.scale),
                None,
            )
        }
    }
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
    weight_grad(
        gpu,
        op,
        kernel,
        db,
        dy,
        &down,
        (rows, r, out_f),
        lora.scale,
        None,
    )?;
    drop(down);
    // d_down = dY·B [rows, r].
    let d_down = factor(gpu, op, rows, r)?;
    let b_operand = dense_weight_operand(b.ptr(), r, Nf4Product::Backward);
    gemm(
        gpu,
        op,
        kernel,
        &d_down,
        row_major(dy, out_f),
        b_operand,
        (rows, r, out_f),
        Store::Overwrite,
        None,
    )?;
    weight_grad(
        gpu,
        op,
        kernel,
        da,
        &d_down,
        x,
        (rows, in_f, r),
        lora.scale,
        lora.dropout,
    )?;
    // dX gets s · Σ_j d_down[t, j] · A[j, i]: A(i, j) = A[j · in + i].
    let a_operand = || dense_weight_operand(a.ptr(), in_f, Nf4Product::Backward);
    match &w.data {
        WeightData::Nf4(q)
            if lora.dropout.is_none() && fused_nf4_kernel(gpu, Nf4Product::Backward, w, rows) =>
        {
            let nf4 = Nf4Kernel::choose(
                Nf4Product::Backward,
                rows,
                q.cols,
                gpu.info().compute_capability,
            );
            let term = Nf4LowRank {
                x: &d_down,
                w: a_operand(),
                rank: r,
                scale: lora.scale,
            };
            nf4_product(
                gpu,
                op,
                Nf4Product::Backward,
                dx,
                dy,
                q,
                rows,
                store,
                nf4,
                Some(&term),
            )
        }
        // With dropout the term is masked (and the base product is not): the mask applies as
        // the term is stored into dx, still without a full-size temporary.
        _ => {
            linear_product(
                gpu,
                op,
                Nf4Product::Backward,
                dx,
                dy,
                w,
                rows,
                store,
                kernel,
            )?;
            let dropout = lora.dropout.map(|(p, seed)| ProductDropout {
                on: Masked::Out,
                p,
                seed,
            });
            gemm(
                gpu,
                op,
                kernel,
                dx,
                row_major(&d_down, r),
                a_operand(),
                (rows, in_f, r),
                Store::Accumulate(lora.scale * store.factor()),
                dropout,
            )
        }
    }
}
