//! Launch shapes and argument checks shared by every op family: pure arithmetic on shapes,
//! tested without a GPU (tests/cuda_host.rs). A family's own launch shape and the constants
//! it mirrors from its `kernels/<family>.cu` live next to its launchers in
//! `cuda/<family>.rs`; a mismatch there would launch a kernel with the wrong block shape.
//!
//! Every launcher checks its shapes first (an op the kernel cannot take is an error naming
//! the op, never an out-of-bounds access), uploads the small host-side arrays the kernel
//! reads, then launches. Kernel argument types mirror each kernel's `extern "C"` signature:
//! pointers as u64, `unsigned int` as u32, `unsigned long long` as u64, `float` as f32.

use super::CudaBuf;
use crate::backend::Store;
use crate::model::weights::Dtype;
use anyhow::{ensure, Result};

/// Static shared memory one block may declare on every arch from sm_75 to sm_90.
pub const STATIC_SHARED_LIMIT: usize = 48 * 1024;

/// CUDA's limit on `gridDim.x`.
pub const MAX_GRID_X: usize = (1 << 31) - 1;
/// CUDA's limit on `gridDim.y` and `gridDim.z`.
pub const MAX_GRID_YZ: usize = 65535;

/// Grid and block shape of one launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchConfig {
    /// Blocks in x, y, z.
    pub grid: (u32, u32, u32),
    /// Threads per block in x, y, z.
    pub block: (u32, u32, u32),
}

impl LaunchConfig {
    /// A 2-D grid of `blocks_x` by `blocks_y` blocks of `threads` threads, checked against
    /// CUDA's limits (`what` names the op in the error).
    pub fn grid_2d(
        what: &str,
        blocks_x: usize,
        blocks_y: usize,
        threads: u32,
    ) -> Result<LaunchConfig> {
        ensure!(
            blocks_x <= MAX_GRID_X && blocks_y <= MAX_GRID_YZ,
            "{what}: a grid of {blocks_x} x {blocks_y} blocks exceeds CUDA's limits \
             ({MAX_GRID_X} x {MAX_GRID_YZ}); split the batch (lower --batch-tokens)"
        );
        Ok(LaunchConfig {
            grid: (blocks_x as u32, blocks_y as u32, 1),
            block: (threads, 1, 1),
        })
    }

    /// One thread per item: `ceil(items / threads)` blocks.
    pub fn per_item(what: &str, items: usize, threads: u32) -> Result<LaunchConfig> {
        LaunchConfig::grid_2d(what, items.div_ceil(threads as usize), 1, threads)
    }

    /// One block per row of width `dim`: `row_threads(dim, max_threads)` threads.
    pub fn per_row(what: &str, rows: usize, dim: usize, max_threads: u32) -> Result<LaunchConfig> {
        LaunchConfig::grid_2d(what, rows, 1, row_threads(dim, max_threads))
    }

    /// Total threads launched.
    pub fn threads(&self) -> u64 {
        let (g, b) = (self.grid, self.block);
        [g.0, g.1, g.2, b.0, b.1, b.2]
            .iter()
            .map(|&v| v as u64)
            .product()
    }
}

/// Threads for a one-block-per-row kernel: `dim` rounded up to whole warps (the block
/// reductions need whole warps), at most `max_threads` (the kernel's launch bound).
pub fn row_threads(dim: usize, max_threads: u32) -> u32 {
    (dim.max(1).div_ceil(32) * 32).min(max_threads as usize) as u32
}

/// `value` as a kernel's `unsigned int` argument, or an error naming `what`.
pub fn to_u32(what: &str, value: usize) -> Result<u32> {
    u32::try_from(value).map_err(|_| anyhow::anyhow!("{what} = {value} does not fit in 32 bits"))
}

/// Fails unless `buf` holds `expected` values.
pub(super) fn expect_len(op: &str, what: &str, buf: &CudaBuf, expected: usize) -> Result<()> {
    ensure!(
        buf.len == expected,
        "{op}: {what} holds {} values, expected {expected}",
        buf.len
    );
    Ok(())
}

/// Fails unless `buf` is f32: the residual stream, gradients and statistics, which only
/// activations may replace by 16 bits ([`crate::backend::Backend::zeros_half`]).
pub(super) fn expect_f32(op: &str, what: &str, buf: &CudaBuf) -> Result<()> {
    ensure!(
        buf.dtype == Dtype::F32,
        "{op}: {what} is {:?}; this op takes f32 only (16 bits are for activations)",
        buf.dtype
    );
    Ok(())
}

/// `(alpha, accumulate)` kernel arguments of a store.
pub(super) fn store_args(store: Store) -> (f32, u32) {
    match store {
        Store::Overwrite => (1.0, 0),
        Store::Accumulate(s) => (s, 1),
    }
}

/// Rows of width `dim` in `buf`, or an error if it is not whole rows.
pub(super) fn rows_of(op: &str, what: &str, buf: &CudaBuf, dim: usize) -> Result<usize> {
    ensure!(
        dim > 0 && buf.len % dim == 0,
        "{op}: {what} of {} values is not rows of {dim}",
        buf.len
    );
    Ok(buf.len / dim)
}
