//! Row gathers on the GPU (kernels/embedding.cu): the token embedding, the gather of chosen
//! rows (the pooled positions) and its backward, the scatter-add. CPU reference:
//! `backend/cpu/embedding.rs`; cases: `selftest/embedding.rs`.

use super::driver::Gpu;
use super::launch::{expect_f32, expect_len, rows_of, to_u32, LaunchConfig};
use super::{Cuda, CudaBuf};
use crate::backend::WeightData;
use crate::model::weights::Dtype;
use anyhow::{bail, ensure, Result};

/// `GATHER_MAX_THREADS` (embedding.cu): the most threads per row.
pub const GATHER_MAX_THREADS: u32 = 256;

/// `out[r] = scale · src[index[r]]` (kernels/embedding.cu), `src` f32 or a 16-bit table.
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
    let config = LaunchConfig::per_row(op, index.len(), dim, GATHER_MAX_THREADS)?;
    let function = match src.dtype {
        Dtype::F32 => "gather_rows_scaled_f32",
        Dtype::F16 => "gather_rows_scaled_f16",
        Dtype::BF16 => "gather_rows_scaled_bf16",
    };
    gpu.launch(
        op,
        "embedding",
        function,
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

pub(super) fn embedding(
    gpu: &Gpu,
    out: &CudaBuf,
    table: &WeightData<Cuda>,
    ids: &[u32],
    dim: usize,
    scale: f32,
) -> Result<()> {
    let op = "embedding";
    let table = match table {
        // f32, or 16 bits ([`Backend::upload_half`](crate::backend::Backend::upload_half))
        WeightData::Dense(t) | WeightData::Half(t) => t,
        WeightData::Nf4(_) => bail!("{op}: an NF4 table (embeddings are never quantized)"),
        WeightData::Bf16(never) => match *never {},
    };
    let vocab = rows_of(op, "the table", table, dim)?;
    expect_len(op, "the output", out, ids.len() * dim)?;
    expect_f32(op, "the output", out)?;
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
    expect_f32(op, "the output", out)?;
    expect_f32(op, "the input", x)?;
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
    expect_f32(op, "the accumulator", acc)?;
    expect_f32(op, "the input", x)?;
    if rows.is_empty() {
        return Ok(());
    }
    let index = gpu.upload(op, &row_indices(op, rows, available)?)?;
    gpu.launch(
        op,
        "embedding",
        "scatter_add_rows_f32",
        LaunchConfig::per_row(op, rows.len(), dim, GATHER_MAX_THREADS)?,
        &mut [
            &mut acc.ptr(),
            &mut x.ptr(),
            &mut index.ptr(),
            &mut to_u32("dim", dim)?,
        ],
    )
}
