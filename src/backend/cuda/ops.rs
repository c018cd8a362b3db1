//! One launcher per op: check the shapes (an op the kernel cannot take is an error naming the
//! op, never an out-of-bounds access), upload the small host-side arrays the kernel reads,
//! then launch. Kernel argument types mirror each kernel's `extern "C"` signature:
//! pointers as u64, `unsigned int` as u32, `unsigned long long` as u64, `float` as f32.

use super::driver::{DeviceBlock, Gpu};
use super::launch::{
    self, to_u32, LaunchConfig, ATTENTION_MAX_HEAD_DIM, ELEMENTWISE_THREADS, NF4_ELEMS_PER_THREAD,
};
use super::{f32_bytes, Cuda, CudaAbsmax, CudaBuf, CudaNf4};
use crate::backend::{Activation, AttentionParams, NormStyle, Store, Weight, WeightData};
use anyhow::{bail, ensure, Result};

/// Fails unless `buf` holds `expected` values.
fn expect_len(op: &str, what: &str, buf: &CudaBuf, expected: usize) -> Result<()> {
    ensure!(
        buf.len == expected,
        "{op}: {what} holds {} values, expected {expected}",
        buf.len
    );
    Ok(())
}

/// `(alpha, accumulate)` kernel arguments of a store.
fn store_args(store: Store) -> (f32, u32) {
    match store {
        Store::Overwrite => (1.0, 0),
        Store::Accumulate(s) => (s, 1),
    }
}

/// `out[r] = scale · src[index[r]]` (kernels/embedding.cu).
fn gather(
    gpu: &Gpu,
    op: &str,
    out: &CudaBuf,
    src: &CudaBuf,
    index: &[u32],
    dim: usize,
    scale: f32,
) -> Result<()> {
    if index.is_empty() || dim == 0 {
        return Ok(());
    }
    let index_block = gpu.upload(op, index)?;
    let config = LaunchConfig::per_row(op, index.len(), dim)?;
    gpu.launch(
        op,
        "embedding",
        "gather_rows_scaled_f32",
        config,
        &mut [
            &mut out.ptr(),
            &mut src.ptr(),
            &mut index_block.ptr(),
            &mut to_u32("dim", dim)?,
            &mut { scale },
        ],
    )
}

/// Row indices as the kernels' u32, each checked against the `available` rows.
fn row_indices(op: &str, rows: &[usize], available: usize) -> Result<Vec<u32>> {
    rows.iter()
        .map(|&r| {
            ensure!(
                r < available,
                "{op}: row {r} of a buffer with {available} rows"
            );
            to_u32("row index", r)
        })
        .collect()
}

/// Rows of width `dim` in `buf`, or an error if it is not whole rows.
fn rows_of(op: &str, what: &str, buf: &CudaBuf, dim: usize) -> Result<usize> {
    ensure!(
        dim > 0 && buf.len % dim == 0,
        "{op}: {what} of {} values is not rows of {dim}",
        buf.len
    );
    Ok(buf.len / dim)
}

pub(super) fn embedding(
    gpu: &Gpu,
    out: &CudaBuf,
    table: &CudaBuf,
    ids: &[u32],
    dim: usize,
    scale: f32,
) -> Result<()> {
    let op = "embedding";
    let vocab = rows_of(op, "the table", table, dim)?;
    expect_len(op, "the output", out, ids.len() * dim)?;
    if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
        bail!("{op}: token id {bad} is outside the table of {vocab} rows");
    }
    gather(gpu, op, out, table, ids, dim, scale)
}

pub(super) fn gather_rows(
    gpu: &Gpu,
    out: &CudaBuf,
    x: &CudaBuf,
    rows: &[usize],
    dim: usize,
) -> Result<()> {
    let op = "gather_rows";
    let available = rows_of(op, "the input", x, dim)?;
    expect_len(op, "the output", out, rows.len() * dim)?;
    gather(
        gpu,
        op,
        out,
        x,
        &row_indices(op, rows, available)?,
        dim,
        1.0,
    )
}

pub(super) fn scatter_add_rows(
    gpu: &Gpu,
    acc: &CudaBuf,
    x: &CudaBuf,
    rows: &[usize],
    dim: usize,
) -> Result<()> {
    let op = "scatter_add_rows";
    let available = rows_of(op, "the accumulator", acc, dim)?;
    expect_len(op, "the input", x, rows.len() * dim)?;
    if rows.is_empty() {
        return Ok(());
    }
    let index = gpu.upload(op, &row_indices(op, rows, available)?)?;
    gpu.launch(
        op,
        "embedding",
        "scatter_add_rows_f32",
        LaunchConfig::per_row(op, rows.len(), dim)?,
        &mut [
            &mut acc.ptr(),
            &mut x.ptr(),
            &mut index.ptr(),
            &mut to_u32("dim", dim)?,
        ],
    )
}

fn one_plus_weight(style: NormStyle) -> u32 {
    match style {
        NormStyle::Weight => 0,
        NormStyle::OnePlusWeight => 1,
    }
}

pub(super) fn rmsnorm(
    gpu: &Gpu,
    out: &CudaBuf,
    x: &CudaBuf,
    w: &CudaBuf,
    dim: usize,
    eps: f32,
    style: NormStyle,
) -> Result<()> {
    let op = "rmsnorm";
    let rows = rows_of(op, "the input", x, dim)?;
    expect_len(op, "the output", out, x.len)?;
    expect_len(op, "the weight", w, dim)?;
    if rows == 0 {
        return Ok(());
    }
    gpu.launch(
        op,
        "rmsnorm",
        "rmsnorm_f32",
        LaunchConfig::per_row(op, rows, dim)?,
        &mut [
            &mut out.ptr(),
            &mut x.ptr(),
            &mut w.ptr(),
            &mut to_u32("dim", dim)?,
            &mut { eps },
            &mut one_plus_weight(style),
        ],
    )
}

#[allow(clippy::too_many_arguments)]
pub(super) fn rmsnorm_backward(
    gpu: &Gpu,
    dx: &CudaBuf,
    dy: &CudaBuf,
    x: &CudaBuf,
    w: &CudaBuf,
    dim: usize,
    eps: f32,
    style: NormStyle,
    store: Store,
) -> Result<()> {
    let op = "rmsnorm_backward";
    let rows = rows_of(op, "x", x, dim)?;
    expect_len(op, "dy", dy, x.len)?;
    expect_len(op, "dx", dx, x.len)?;
    expect_len(op, "the weight", w, dim)?;
    if rows == 0 {
        return Ok(());
    }
    let (mut alpha, mut accumulate) = store_args(store);
    gpu.launch(
        op,
        "rmsnorm",
        "rmsnorm_backward_f32",
        LaunchConfig::per_row(op, rows, dim)?,
        &mut [
            &mut dx.ptr(),
            &mut dy.ptr(),
            &mut x.ptr(),
            &mut w.ptr(),
            &mut to_u32("dim", dim)?,
            &mut { eps },
            &mut one_plus_weight(style),
            &mut alpha,
            &mut accumulate,
        ],
    )
}

/// An operand of the strided GEMM: element (row, k) at `ptr[row * row_stride + k * k_stride]`.
struct Operand {
    ptr: u64,
    row_stride: usize,
    k_stride: usize,
}

/// `out[m, n] (=|+= s·) Σ_k A(m, k) · B(n, k)` (kernels/gemm.cu).
#[allow(clippy::too_many_arguments)]
fn gemm(
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

/// The weight as a dense f32 `[out, in]` device array: the buffer itself, or (NF4) a
/// dequantized scratch copy that lives until the returned guard drops.
enum DenseWeight<'a> {
    Borrowed(&'a CudaBuf),
    Dequantized(DeviceBlock),
}

impl DenseWeight<'_> {
    fn ptr(&self) -> u64 {
        match self {
            DenseWeight::Borrowed(buf) => buf.ptr(),
            DenseWeight::Dequantized(block) => block.ptr(),
        }
    }
}

fn dense_weight<'a>(gpu: &Gpu, op: &str, w: &'a Weight<Cuda>) -> Result<DenseWeight<'a>> {
    let (rows, cols) = (w.out_features, w.in_features);
    match &w.data {
        WeightData::Dense(values) => {
            expect_len(op, "the weight", values, rows * cols)?;
            Ok(DenseWeight::Borrowed(values))
        }
        WeightData::Nf4(q) => {
            ensure!(
                q.rows == rows && q.cols == cols,
                "{op}: NF4 weight is [{}, {}], expected [{rows}, {cols}]",
                q.rows,
                q.cols
            );
            Ok(DenseWeight::Dequantized(nf4_dequantize(gpu, q)?))
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
    let op = "linear";
    let (in_f, out_f) = (w.in_features, w.out_features);
    expect_len(op, "the input", x, rows * in_f)?;
    expect_len(op, "the output", out, rows * out_f)?;
    let dense = dense_weight(gpu, op, w)?;
    let a = Operand {
        ptr: x.ptr(),
        row_stride: in_f,
        k_stride: 1,
    };
    let b = Operand {
        ptr: dense.ptr(),
        row_stride: in_f,
        k_stride: 1,
    };
    gemm(gpu, op, out, a, b, rows, out_f, in_f, store)
}

pub(super) fn linear_backward(
    gpu: &Gpu,
    dx: &CudaBuf,
    dy: &CudaBuf,
    w: &Weight<Cuda>,
    rows: usize,
    store: Store,
) -> Result<()> {
    let op = "linear_backward";
    let (in_f, out_f) = (w.in_features, w.out_features);
    expect_len(op, "dy", dy, rows * out_f)?;
    expect_len(op, "dx", dx, rows * in_f)?;
    let dense = dense_weight(gpu, op, w)?;
    // dX[r, i] = Σ_o dY[r, o] · W[o, i]: B(i, o) = W[o, i].
    let a = Operand {
        ptr: dy.ptr(),
        row_stride: out_f,
        k_stride: 1,
    };
    let b = Operand {
        ptr: dense.ptr(),
        row_stride: 1,
        k_stride: in_f,
    };
    gemm(gpu, op, dx, a, b, rows, in_f, out_f, store)
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

/// A dense f32 copy of an NF4 weight (kernels/nf4.cu).
pub(super) fn nf4_dequantize(gpu: &Gpu, w: &CudaNf4) -> Result<DeviceBlock> {
    let op = "nf4_dequantize";
    let n = w.rows * w.cols;
    let out = gpu.alloc(op, f32_bytes(n))?;
    if n == 0 {
        return Ok(out);
    }
    let config = LaunchConfig::per_item(op, n.div_ceil(NF4_ELEMS_PER_THREAD), ELEMENTWISE_THREADS)?;
    let mut blocksize = to_u32("NF4 blocksize", w.blocksize)?;
    let mut n = n as u64;
    match &w.absmax {
        CudaAbsmax::F32(absmax) => gpu.launch(
            op,
            "nf4",
            "nf4_dequant_f32",
            config,
            &mut [
                &mut w.packed.ptr(),
                &mut absmax.ptr(),
                &mut out.ptr(),
                &mut n,
                &mut blocksize,
            ],
        )?,
        CudaAbsmax::Double {
            codes,
            nested_code,
            nested_absmax,
            offset,
        } => gpu.launch(
            op,
            "nf4",
            "nf4_dequant_nested_f32",
            config,
            &mut [
                &mut w.packed.ptr(),
                &mut codes.ptr(),
                &mut nested_code.ptr(),
                &mut nested_absmax.ptr(),
                &mut { *offset },
                &mut out.ptr(),
                &mut n,
                &mut blocksize,
            ],
        )?,
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn rope(
    gpu: &Gpu,
    op: &str,
    x: &CudaBuf,
    positions: &[u32],
    inv_freq: &[f32],
    heads: usize,
    head_dim: usize,
    direction: f32,
) -> Result<()> {
    ensure!(head_dim % 2 == 0, "{op}: head_dim {head_dim} is odd");
    let half = head_dim / 2;
    ensure!(
        inv_freq.len() == half,
        "{op}: {} inverse frequencies for head_dim {head_dim}, expected {half}",
        inv_freq.len()
    );
    expect_len(op, "x", x, positions.len() * heads * head_dim)?;
    let pairs = positions.len() * heads * half;
    if pairs == 0 {
        return Ok(());
    }
    let positions = gpu.upload(op, positions)?;
    let inv_freq = gpu.upload(op, inv_freq)?;
    gpu.launch(
        op,
        "rope",
        "rope_f32",
        LaunchConfig::per_item(op, pairs, ELEMENTWISE_THREADS)?,
        &mut [
            &mut x.ptr(),
            &mut positions.ptr(),
            &mut inv_freq.ptr(),
            &mut (pairs as u64),
            &mut to_u32("heads", heads)?,
            &mut to_u32("head_dim / 2", half)?,
            &mut { direction },
        ],
    )
}

pub(super) fn attention(
    gpu: &Gpu,
    out: &CudaBuf,
    q: &CudaBuf,
    k: &CudaBuf,
    v: &CudaBuf,
    cu_seqlens: &[usize],
    params: &AttentionParams,
) -> Result<()> {
    let op = "attention";
    let AttentionParams {
        heads,
        kv_heads,
        head_dim,
        scale,
        softcap,
        window,
    } = *params;
    ensure!(
        head_dim > 0 && head_dim <= ATTENTION_MAX_HEAD_DIM,
        "{op}: head_dim {head_dim} is not supported (1 to {ATTENTION_MAX_HEAD_DIM})"
    );
    ensure!(
        kv_heads > 0 && heads % kv_heads == 0,
        "{op}: {heads} query heads cannot share {kv_heads} key/value heads evenly"
    );
    let cap = match softcap {
        None => 0.0,
        Some(cap) if cap > 0.0 => cap,
        Some(cap) => bail!("{op}: soft-cap {cap} must be positive"),
    };
    let tokens = cu_seqlens.last().copied().unwrap_or(0);
    expect_len(op, "q", q, tokens * heads * head_dim)?;
    expect_len(op, "the output", out, q.len)?;
    expect_len(op, "k", k, tokens * kv_heads * head_dim)?;
    expect_len(op, "v", v, k.len)?;
    let first_keys = launch::first_keys(cu_seqlens, tokens, window)?;
    if tokens == 0 || heads == 0 {
        return Ok(());
    }
    let first_keys = gpu.upload(op, &first_keys)?;
    gpu.launch(
        op,
        "attention",
        "attention_f32",
        LaunchConfig::attention(op, tokens, heads)?,
        &mut [
            &mut out.ptr(),
            &mut q.ptr(),
            &mut k.ptr(),
            &mut v.ptr(),
            &mut first_keys.ptr(),
            &mut to_u32("heads", heads)?,
            &mut to_u32("kv_heads", kv_heads)?,
            &mut to_u32("head_dim", head_dim)?,
            &mut { scale },
            &mut { cap },
        ],
    )
}

pub(super) fn gated_activation(
    gpu: &Gpu,
    out: &CudaBuf,
    gate: &CudaBuf,
    up: &CudaBuf,
    act: Activation,
) -> Result<()> {
    let op = "gated_activation";
    expect_len(op, "up", up, gate.len)?;
    expect_len(op, "the output", out, gate.len)?;
    if gate.len == 0 {
        return Ok(());
    }
    let function = match act {
        Activation::GeluTanh => "geglu_tanh_f32",
        Activation::Silu => "swiglu_f32",
    };
    gpu.launch(
        op,
        "activation",
        function,
        LaunchConfig::per_item(op, gate.len, ELEMENTWISE_THREADS)?,
        &mut [
            &mut out.ptr(),
            &mut gate.ptr(),
            &mut up.ptr(),
            &mut (gate.len as u64),
        ],
    )
}

pub(super) fn gated_activation_backward(
    gpu: &Gpu,
    dgate: &CudaBuf,
    dup: &CudaBuf,
    dout: &CudaBuf,
    gate: &CudaBuf,
    up: &CudaBuf,
    act: Activation,
) -> Result<()> {
    let op = "gated_activation_backward";
    for (what, buf) in [("dgate", dgate), ("dup", dup), ("gate", gate), ("up", up)] {
        expect_len(op, what, buf, dout.len)?;
    }
    if dout.len == 0 {
        return Ok(());
    }
    let function = match act {
        Activation::GeluTanh => "geglu_tanh_backward_f32",
        Activation::Silu => "swiglu_backward_f32",
    };
    gpu.launch(
        op,
        "activation",
        function,
        LaunchConfig::per_item(op, dout.len, ELEMENTWISE_THREADS)?,
        &mut [
            &mut dgate.ptr(),
            &mut dup.ptr(),
            &mut dout.ptr(),
            &mut gate.ptr(),
            &mut up.ptr(),
            &mut (dout.len as u64),
        ],
    )
}

pub(super) fn add(gpu: &Gpu, acc: &CudaBuf, x: &CudaBuf) -> Result<()> {
    let op = "add";
    expect_len(op, "x", x, acc.len)?;
    if acc.len == 0 {
        return Ok(());
    }
    gpu.launch(
        op,
        "elementwise",
        "add_f32",
        LaunchConfig::per_item(op, acc.len, ELEMENTWISE_THREADS)?,
        &mut [&mut acc.ptr(), &mut x.ptr(), &mut (acc.len as u64)],
    )
}

pub(super) fn softcap(gpu: &Gpu, x: &CudaBuf, cap: f32) -> Result<()> {
    let op = "softcap";
    if x.len == 0 {
        return Ok(());
    }
    gpu.launch(
        op,
        "elementwise",
        "softcap_f32",
        LaunchConfig::per_item(op, x.len, ELEMENTWISE_THREADS)?,
        &mut [&mut x.ptr(), &mut (x.len as u64), &mut { cap }],
    )
}

pub(super) fn dropout(gpu: &Gpu, x: &CudaBuf, p: f32, seed: u64) -> Result<()> {
    let op = "dropout";
    ensure!((0.0..1.0).contains(&p), "{op}: p = {p} is not in [0, 1)");
    if x.len == 0 {
        return Ok(());
    }
    gpu.launch(
        op,
        "elementwise",
        "dropout_f32",
        LaunchConfig::per_item(op, x.len, ELEMENTWISE_THREADS)?,
        &mut [
            &mut x.ptr(),
            &mut (x.len as u64),
            &mut { p },
            &mut (1.0 / (1.0 - p)),
            &mut { seed },
        ],
    )
}
