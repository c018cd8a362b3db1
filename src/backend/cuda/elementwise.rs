//! Elementwise ops on the GPU (kernels/elementwise.cu): residual add, soft-cap, dropout.
//! CPU reference: `backend/cpu/elementwise.rs`; cases: `selftest/elementwise.rs`.

use super::driver::Gpu;
use super::launch::{expect_f32, expect_len, LaunchConfig};
use super::CudaBuf;
use anyhow::{ensure, Result};

/// `ELEMENTWISE_THREADS` (elementwise.cu).
pub const ELEMENTWISE_THREADS: u32 = 256;

pub(super) fn add(gpu: &Gpu, acc: &CudaBuf, x: &CudaBuf) -> Result<()> {
    let op = "add";
    expect_len(op, "x", x, acc.len)?;
    expect_f32(op, "the accumulator", acc)?;
    expect_f32(op, "x", x)?;
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
    expect_f32(op, "x", x)?;
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
    expect_f32(op, "x", x)?;
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
