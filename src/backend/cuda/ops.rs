//! One launcher per op: check the shapes (an op the kernel cannot take is an error naming the
//! op, never an out-of-bounds access), upload the small host-side arrays the kernel reads,
//! then launch. Kernel argument types mirror each kernel's `extern "C"` signature:
//! pointers as u64, `unsigned int` as u32, `unsigned long long` as u64, `float` as f32.

use super::driver::{DeviceBlock, Gpu, KernelArg};
use super::launch::{
    self, to_u32, LaunchConfig, Nf4Kernel, Nf4Product, ATTENTION_MAX_HEAD_DIM, ATTENTION_STATS,
    ELEMENTWISE_THREADS, NF4_GROUP,
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
    }
}

/// A row-major `[rows, k]` activation as the strided GEMM's A operand.
fn row_major(a: &CudaBuf, k: usize) -> Operand {
    Operand {
        ptr: a.ptr(),
        row_stride: k,
        k_stride: 1,
    }
}

/// The strided-GEMM operand of a dense row-major `[out, in]` weight for `product`.
fn dense_weight_operand(ptr: u64, in_f: usize, product: Nf4Product) -> Operand {
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

/// An NF4 product with `kernel` (kernels/nf4.cu): `out [rows, w.rows] (=|+= s·) A · Wᵀ`
/// (forward) or `out [rows, w.cols] (=|+= s·) A · W` (backward).
#[allow(clippy::too_many_arguments)]
pub(super) fn nf4_product(
    gpu: &Gpu,
    op: &str,
    product: Nf4Product,
    out: &CudaBuf,
    a: &CudaBuf,
    w: &CudaNf4,
    rows: usize,
    store: Store,
    kernel: Nf4Kernel,
) -> Result<()> {
    let (n, k) = product.output_and_reduction(w.rows, w.cols);
    expect_len(op, "the input", a, rows * k)?;
    expect_len(op, "the output", out, rows * n)?;
    kernel
        .check(product, rows, w.cols, gpu.info().compute_capability)
        .map_err(|e| e.context(op.to_string()))?;
    if rows == 0 || n == 0 {
        return Ok(());
    }
    let nested = matches!(w.absmax, CudaAbsmax::Double { .. });
    let (Some(function), Some(config)) = (
        kernel.entry_point(product, nested),
        kernel.launch_config(op, rows, n)?,
    ) else {
        let dense = nf4_dequantize(gpu, w)?;
        let b = dense_weight_operand(dense.ptr(), w.cols, product);
        return gemm(gpu, op, out, row_major(a, k), b, rows, n, k, store);
    };
    let (alpha, accumulate) = store_args(store);
    let mut args: Vec<Box<dyn KernelArg>> = vec![
        Box::new(out.ptr()),
        Box::new(a.ptr()),
        Box::new(w.packed.ptr()),
        Box::new(to_u32("rows", rows)?),
        Box::new(to_u32("output features", n)?),
        Box::new(to_u32("reduction length", k)?),
        Box::new(to_u32("NF4 blocksize", w.blocksize)?),
        Box::new(alpha),
        Box::new(accumulate),
    ];
    // The absmax tables of the weight's mode follow the common arguments.
    match &w.absmax {
        CudaAbsmax::F32(absmax) => args.push(Box::new(absmax.ptr())),
        CudaAbsmax::Double {
            codes,
            nested_code,
            nested_absmax,
            offset,
        } => args.extend([
            Box::new(codes.ptr()) as Box<dyn KernelArg>,
            Box::new(nested_code.ptr()),
            Box::new(nested_absmax.ptr()),
            Box::new(*offset),
        ]),
    }
    let mut params: Vec<&mut dyn KernelArg> = args
        .iter_mut()
        .map(|arg| arg.as_mut() as &mut dyn KernelArg)
        .collect();
    gpu.launch(op, "nf4", function, config, &mut params)
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
    let config = LaunchConfig::per_item(op, n.div_ceil(NF4_GROUP), ELEMENTWISE_THREADS)?;
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

/// Checks an attention call's settings and the q, k, v shapes against `cu_seqlens`; returns
/// the tokens and the kernels' soft-cap argument (0 for none).
fn check_attention(
    op: &str,
    q: &CudaBuf,
    k: &CudaBuf,
    v: &CudaBuf,
    cu_seqlens: &[usize],
    params: &AttentionParams,
) -> Result<(usize, f32)> {
    let AttentionParams {
        heads,
        kv_heads,
        head_dim,
        softcap,
        ..
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
    expect_len(op, "k", k, tokens * kv_heads * head_dim)?;
    expect_len(op, "v", v, k.len)?;
    Ok((tokens, cap))
}

/// The settings every attention kernel takes after its buffers: heads, kv_heads, head_dim,
/// scale, soft-cap.
fn attention_settings(params: &AttentionParams, cap: f32) -> Result<(u32, u32, u32, f32, f32)> {
    Ok((
        to_u32("heads", params.heads)?,
        to_u32("kv_heads", params.kv_heads)?,
        to_u32("head_dim", params.head_dim)?,
        params.scale,
        cap,
    ))
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
    let (tokens, cap) = check_attention(op, q, k, v, cu_seqlens, params)?;
    expect_len(op, "the output", out, q.len)?;
    let first_keys = launch::first_keys(cu_seqlens, tokens, params.window)?;
    if tokens == 0 || params.heads == 0 {
        return Ok(());
    }
    let first_keys = gpu.upload(op, &first_keys)?;
    let (mut heads, mut kv_heads, mut head_dim, mut scale, mut cap) =
        attention_settings(params, cap)?;
    gpu.launch(
        op,
        "attention",
        "attention_f32",
        LaunchConfig::attention(op, tokens, params.heads)?,
        &mut [
            &mut out.ptr(),
            &mut q.ptr(),
            &mut k.ptr(),
            &mut v.ptr(),
            &mut first_keys.ptr(),
            &mut heads,
            &mut kv_heads,
            &mut head_dim,
            &mut scale,
            &mut cap,
        ],
    )
}

/// Two launches on the stream (kernels/attention.cu): the query kernel writes `dq` and each
/// (query, head)'s softmax statistics into a scratch buffer, then the key kernel reads them
/// and writes `dk`, `dv` — deterministic, no atomics.
#[allow(clippy::too_many_arguments)]
pub(super) fn attention_backward(
    gpu: &Gpu,
    dq: &CudaBuf,
    dk: &CudaBuf,
    dv: &CudaBuf,
    dout: &CudaBuf,
    q: &CudaBuf,
    k: &CudaBuf,
    v: &CudaBuf,
    cu_seqlens: &[usize],
    params: &AttentionParams,
) -> Result<()> {
    let op = "attention_backward";
    let (tokens, cap) = check_attention(op, q, k, v, cu_seqlens, params)?;
    expect_len(op, "dout", dout, q.len)?;
    expect_len(op, "dq", dq, q.len)?;
    expect_len(op, "dk", dk, k.len)?;
    expect_len(op, "dv", dv, k.len)?;
    let first_keys = launch::first_keys(cu_seqlens, tokens, params.window)?;
    let last_queries = launch::last_queries(cu_seqlens, tokens, params.window)?;
    if tokens == 0 || params.heads == 0 {
        return Ok(());
    }
    let first_keys = gpu.upload(op, &first_keys)?;
    let last_queries = gpu.upload(op, &last_queries)?;
    let stats = gpu.alloc(op, f32_bytes(tokens * params.heads * ATTENTION_STATS))?;
    let (mut heads, mut kv_heads, mut head_dim, mut scale, mut cap) =
        attention_settings(params, cap)?;
    gpu.launch(
        op,
        "attention",
        "attention_backward_query_f32",
        LaunchConfig::attention(op, tokens, params.heads)?,
        &mut [
            &mut dq.ptr(),
            &mut stats.ptr(),
            &mut dout.ptr(),
            &mut q.ptr(),
            &mut k.ptr(),
            &mut v.ptr(),
            &mut first_keys.ptr(),
            &mut heads,
            &mut kv_heads,
            &mut head_dim,
            &mut scale,
            &mut cap,
        ],
    )?;
    gpu.launch(
        op,
        "attention",
        "attention_backward_key_f32",
        LaunchConfig::attention(op, tokens, params.kv_heads)?,
        &mut [
            &mut dk.ptr(),
            &mut dv.ptr(),
            &mut stats.ptr(),
            &mut dout.ptr(),
            &mut q.ptr(),
            &mut k.ptr(),
            &mut v.ptr(),
            &mut last_queries.ptr(),
            &mut heads,
            &mut kv_heads,
            &mut head_dim,
            &mut scale,
            &mut cap,
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
