//! Gated activations on the GPU (kernels/activation.cu): GeGLU (tanh GELU) and SwiGLU,
//! forward and backward. CPU reference: `backend/cpu/activation.rs`; cases:
//! `selftest/activation.rs`.

use super::driver::Gpu;
use super::launch::{expect_len, LaunchConfig};
use super::CudaBuf;
use crate::backend::Activation;
use anyhow::Result;

/// `ACTIVATION_THREADS` (activation.cu).
pub const ACTIVATION_THREADS: u32 = 256;

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
        Activation::GeluTanh => "geglu_tanh",
        Activation::Silu => "swiglu",
    };
    gpu.launch(
        op,
        "activation",
        function,
        LaunchConfig::per_item(op, gate.len, ACTIVATION_THREADS)?,
        &mut [
            &mut out.ptr(),
            &mut out.dtype_code(),
            &mut gate.ptr(),
            &mut gate.dtype_code(),
            &mut up.ptr(),
            &mut up.dtype_code(),
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
        Activation::GeluTanh => "geglu_tanh_backward",
        Activation::Silu => "swiglu_backward",
    };
    gpu.launch(
        op,
        "activation",
        function,
        LaunchConfig::per_item(op, dout.len, ACTIVATION_THREADS)?,
        &mut [
            &mut dgate.ptr(),
            &mut dgate.dtype_code(),
            &mut dup.ptr(),
            &mut dup.dtype_code(),
            &mut dout.ptr(),
            &mut dout.dtype_code(),
            &mut gate.ptr(),
            &mut gate.dtype_code(),
            &mut up.ptr(),
            &mut up.dtype_code(),
            &mut (dout.len as u64),
        ],
    )
}
