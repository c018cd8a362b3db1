//! The classifier loss on a CUDA backend, computed on the host: the logits are
//! `[rows, classes]` with a handful of classes, so the download, the CPU reference
//! (`backend/cpu/loss.rs`) and the upload of `dlogits` cost less than a launch would save, and
//! the loss is needed on the host anyway. No kernel, so no `kernels/loss.cu`; cases:
//! `selftest/loss.rs`.

use super::driver::Gpu;
use super::CudaBuf;
use crate::backend::cpu::Cpu;
use crate::backend::Backend;
use anyhow::Result;

/// The per-row losses, with `dlogits` written, as [`Backend::softmax_cross_entropy`].
pub(super) fn softmax_cross_entropy(
    gpu: &Gpu,
    dlogits: &CudaBuf,
    logits: &CudaBuf,
    labels: &[Option<u32>],
    classes: usize,
    smoothing: f32,
    weight: f32,
) -> Result<Vec<f32>> {
    let op = "softmax_cross_entropy";
    super::launch::expect_f32(op, "the logits", logits)?;
    super::launch::expect_f32(op, "dlogits", dlogits)?;
    anyhow::ensure!(
        logits.len == labels.len() * classes && dlogits.len == logits.len,
        "{op}: logits ({}) / dlogits ({}) are not [{}, {classes}]",
        logits.len,
        dlogits.len,
        labels.len()
    );
    if let Some(bad) = labels.iter().flatten().find(|&&y| y as usize >= classes) {
        anyhow::bail!("{op}: label {bad} of {classes} classes");
    }
    let host_logits = gpu.download::<f32>(op, &logits.block, logits.len)?;
    let mut host_grad = vec![0.0; logits.len];
    let losses = Cpu.softmax_cross_entropy(
        &mut host_grad,
        &host_logits,
        labels,
        classes,
        smoothing,
        weight,
    );
    gpu.write(op, &dlogits.block, &host_grad)?;
    Ok(losses)
}
