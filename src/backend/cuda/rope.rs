//! Rotary position embedding on the GPU (kernels/rope.cu): one kernel rotates by +θ
//! (forward) or -θ (backward: the inverse rotation). CPU reference: `backend/cpu/rope.rs`;
//! cases: `selftest/rope.rs`.

use super::driver::Gpu;
use super::launch::{expect_len, to_u32, LaunchConfig};
use super::CudaBuf;
use anyhow::{ensure, Result};

/// `ROPE_THREADS` (rope.cu).
pub const ROPE_THREADS: u32 = 256;

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
        "rope",
        LaunchConfig::per_item(op, pairs, ROPE_THREADS)?,
        &mut [
            &mut x.ptr(),
            &mut x.dtype_code(),
            &mut positions.ptr(),
            &mut inv_freq.ptr(),
            &mut (pairs as u64),
            &mut to_u32("heads", heads)?,
            &mut to_u32("head_dim / 2", half)?,
            &mut { direction },
        ],
    )
}
