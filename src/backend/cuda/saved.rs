//! Activations kept for backward in 16 bits on the GPU (kernels/saved.cu): f16 on sm_75, bf16
//! on sm_80+, one power-of-two scale per row. CPU reference: `backend/cpu/saved.rs`; cases:
//! `selftest/saved.rs`.

use super::driver::{DeviceBlock, Gpu};
use super::launch::LaunchConfig;
use super::nf4::MmaOperands;
use super::{f32_bytes, CudaBuf, CudaKept};
use anyhow::{ensure, Result};

/// `SAVED_THREADS` (saved.cu).
pub const SAVED_THREADS: u32 = 256;

/// `x` ([rows, dim]) in `operands`' 16-bit type with its row scales.
pub(super) fn keep(gpu: &Gpu, x: &CudaBuf, dim: usize, operands: MmaOperands) -> Result<CudaKept> {
    let op = "keep";
    super::launch::expect_f32(op, "x", x)?;
    ensure!(
        dim > 0 && x.len % dim == 0,
        "{op}: {} values are not rows of {dim}",
        x.len
    );
    let rows = x.len / dim;
    let bits = gpu.alloc(op, x.len * 2)?;
    let scales = gpu.alloc(op, f32_bytes(rows))?;
    if rows > 0 {
        let function = match operands {
            MmaOperands::F16 => "keep_rows_f16",
            MmaOperands::Bf16 => "keep_rows_bf16",
        };
        gpu.launch(
            op,
            "saved",
            function,
            LaunchConfig::grid_2d(op, rows, 1, SAVED_THREADS)?,
            &mut [
                &mut bits.ptr(),
                &mut scales.ptr(),
                &mut x.ptr(),
                &mut (dim as u64),
            ],
        )?;
    }
    Ok(CudaKept {
        bits,
        scales,
        rows,
        dim,
        operands,
    })
}

/// The f32 values of `kept`, in a new buffer.
pub(super) fn restore(gpu: &Gpu, kept: &CudaKept) -> Result<DeviceBlock> {
    let op = "restore";
    let len = kept.rows * kept.dim;
    let out = gpu.alloc(op, f32_bytes(len))?;
    if kept.rows > 0 {
        let function = match kept.operands {
            MmaOperands::F16 => "restore_rows_f16",
            MmaOperands::Bf16 => "restore_rows_bf16",
        };
        gpu.launch(
            op,
            "saved",
            function,
            LaunchConfig::grid_2d(op, kept.rows, 1, SAVED_THREADS)?,
            &mut [
                &mut out.ptr(),
                &mut kept.bits.ptr(),
                &mut kept.scales.ptr(),
                &mut (kept.dim as u64),
            ],
        )?;
    }
    Ok(out)
}
