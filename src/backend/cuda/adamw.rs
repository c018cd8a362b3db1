//! The optimizer on the GPU (kernels/adamw.cu): AdamW's update and the per-tensor squared
//! norms of global-norm clipping. CPU reference: `backend/cpu/adamw.rs`; cases:
//! `selftest/adamw.rs`.

use super::driver::Gpu;
use super::launch::{expect_f32, expect_len, LaunchConfig};
use super::{f32_bytes, CudaBuf};
use crate::backend::AdamWStep;
use anyhow::Result;

/// `ADAMW_THREADS` (adamw.cu).
pub const ADAMW_THREADS: u32 = 256;

pub(super) fn adamw(
    gpu: &Gpu,
    param: &CudaBuf,
    grad: &CudaBuf,
    m: &CudaBuf,
    v: &CudaBuf,
    s: &AdamWStep,
) -> Result<()> {
    let op = "adamw";
    for (what, buf) in [("grad", grad), ("m", m), ("v", v)] {
        expect_len(op, what, buf, param.len)?;
    }
    for (what, buf) in [("param", param), ("grad", grad), ("m", m), ("v", v)] {
        expect_f32(op, what, buf)?;
    }
    if param.len == 0 {
        return Ok(());
    }
    gpu.launch(
        op,
        "adamw",
        "adamw_f32",
        LaunchConfig::per_item(op, param.len, ADAMW_THREADS)?,
        &mut [
            &mut param.ptr(),
            &mut grad.ptr(),
            &mut m.ptr(),
            &mut v.ptr(),
            &mut (param.len as u64),
            &mut { s.grad_scale },
            &mut { s.decay },
            &mut { s.one_minus_beta1 },
            &mut { s.beta2 },
            &mut { s.one_minus_beta2 },
            &mut { s.bias2_sqrt },
            &mut { s.eps },
            &mut { s.step_size },
        ],
    )
}

/// One reduction block per tensor into slot `i` of a device array, then one download.
pub(super) fn squared_norms(gpu: &Gpu, xs: &[&CudaBuf]) -> Result<Vec<f64>> {
    let op = "squared_norms";
    if xs.is_empty() {
        return Ok(Vec::new());
    }
    for x in xs {
        expect_f32(op, "a tensor", x)?;
    }
    let out = gpu.alloc(op, f32_bytes(xs.len()))?;
    gpu.zero(op, &out, f32_bytes(xs.len()))?;
    for (slot, x) in xs.iter().enumerate() {
        if x.len == 0 {
            continue;
        }
        gpu.launch(
            op,
            "adamw",
            "squared_norm_f32",
            LaunchConfig::grid_2d(op, 1, 1, ADAMW_THREADS)?,
            &mut [
                &mut out.ptr(),
                &mut (slot as u64),
                &mut x.ptr(),
                &mut (x.len as u64),
            ],
        )?;
    }
    let sums = gpu.download::<f32>(op, &out, xs.len())?;
    Ok(sums.into_iter().map(f64::from).collect())
}
