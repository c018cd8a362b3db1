//! RMSNorm on the GPU (kernels/rmsnorm.cu): forward and backward, one block per row. CPU
//! reference: `backend/cpu/rmsnorm.rs`; cases: `selftest/rmsnorm.rs`.

use super::driver::Gpu;
use super::launch::{expect_f32, expect_len, rows_of, store_args, to_u32, LaunchConfig};
use super::CudaBuf;
use crate::backend::{NormStyle, Store};
use anyhow::Result;

/// `RMSNORM_MAX_THREADS` (rmsnorm.cu): the most threads per row.
pub const RMSNORM_MAX_THREADS: u32 = 256;

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
    expect_f32(op, "the weight", w)?;
    if rows == 0 {
        return Ok(());
    }
    gpu.launch(
        op,
        "rmsnorm",
        "rmsnorm",
        LaunchConfig::per_row(op, rows, dim, RMSNORM_MAX_THREADS)?,
        &mut [
            &mut out.ptr(),
            &mut out.dtype_code(),
            &mut x.ptr(),
            &mut x.dtype_code(),
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
    expect_f32(op, "the weight", w)?;
    if rows == 0 {
        return Ok(());
    }
    let (mut alpha, mut accumulate) = store_args(store);
    gpu.launch(
        op,
        "rmsnorm",
        "rmsnorm_backward",
        LaunchConfig::per_row(op, rows, dim, RMSNORM_MAX_THREADS)?,
        &mut [
            &mut dx.ptr(),
            &mut dx.dtype_code(),
            &mut dy.ptr(),
            &mut dy.dtype_code(),
            &mut x.ptr(),
            &mut x.dtype_code(),
            &mut w.ptr(),
            &mut to_u32("dim", dim)?,
            &mut { eps },
            &mut one_plus_weight(style),
            &mut alpha,
            &mut accumulate,
        ],
    )
}
