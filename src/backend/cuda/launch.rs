//! Launch configurations and the host-side index arrays the kernels read: pure arithmetic on
//! shapes, tested without a GPU (tests/cuda_host.rs). Each constant mirrors a `#define` of
//! its kernel file; a mismatch would launch a kernel with the wrong block shape.

use anyhow::{bail, ensure, Result};

/// `ELEMENTWISE_THREADS`, `ACTIVATION_THREADS`, `ROPE_THREADS` (elementwise.cu,
/// activation.cu, rope.cu) and `NF4_THREADS` (nf4.cu).
pub const ELEMENTWISE_THREADS: u32 = 256;
/// `GATHER_MAX_THREADS` (embedding.cu) and `RMSNORM_MAX_THREADS` (rmsnorm.cu).
pub const ROW_MAX_THREADS: u32 = 256;
/// `GEMM_THREADS` (gemm.cu).
pub const GEMM_THREADS: u32 = 256;
/// `GEMM_TILE` (gemm.cu): rows and columns of out per block.
pub const GEMM_TILE: usize = 64;
/// `ATTN_THREADS` (attention.cu).
pub const ATTENTION_THREADS: u32 = 128;
/// `ATTN_MAX_HEAD_DIM` (attention.cu).
pub const ATTENTION_MAX_HEAD_DIM: usize = 256;
/// `NF4_ELEMS_PER_THREAD` (nf4.cu).
pub const NF4_ELEMS_PER_THREAD: usize = 16;

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

    /// One block per row of width `dim`: `row_threads(dim)` threads.
    pub fn per_row(what: &str, rows: usize, dim: usize) -> Result<LaunchConfig> {
        LaunchConfig::grid_2d(what, rows, 1, row_threads(dim))
    }

    /// The tiled GEMM for an `[m, n]` output: one block per 64 x 64 tile.
    pub fn gemm(what: &str, m: usize, n: usize) -> Result<LaunchConfig> {
        LaunchConfig::grid_2d(
            what,
            n.div_ceil(GEMM_TILE),
            m.div_ceil(GEMM_TILE),
            GEMM_THREADS,
        )
    }

    /// Attention: one block per (query token, query head).
    pub fn attention(what: &str, tokens: usize, heads: usize) -> Result<LaunchConfig> {
        LaunchConfig::grid_2d(what, tokens, heads, ATTENTION_THREADS)
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
/// reductions need whole warps), at most [`ROW_MAX_THREADS`].
pub fn row_threads(dim: usize) -> u32 {
    (dim.max(1).div_ceil(32) * 32).min(ROW_MAX_THREADS as usize) as u32
}

/// `value` as a kernel's `unsigned int` argument, or an error naming `what`.
pub fn to_u32(what: &str, value: usize) -> Result<u32> {
    u32::try_from(value).map_err(|_| anyhow::anyhow!("{what} = {value} does not fit in 32 bits"))
}

/// Checks a packed batch's `cu_seqlens` against its `tokens`: starts at 0, never decreases,
/// ends at `tokens` (empty sequences are allowed: they own no rows).
pub fn check_cu_seqlens(cu_seqlens: &[usize], tokens: usize) -> Result<()> {
    ensure!(
        cu_seqlens.first() == Some(&0),
        "cu_seqlens must start at 0, found {:?}",
        cu_seqlens.first()
    );
    if let Some(i) = (1..cu_seqlens.len()).find(|&i| cu_seqlens[i] < cu_seqlens[i - 1]) {
        bail!(
            "cu_seqlens decreases at entry {i} ({} after {})",
            cu_seqlens[i],
            cu_seqlens[i - 1]
        );
    }
    ensure!(
        cu_seqlens.last() == Some(&tokens),
        "cu_seqlens ends at {:?} but the batch has {tokens} tokens",
        cu_seqlens.last()
    );
    Ok(())
}

/// The first key each query token may attend to: the start of its sequence, or with a
/// sliding window of `w`, the later of that and `t + 1 - w` (query `t` sees keys
/// `t - w < k <= t`). The attention kernel walks keys `first_key[t] ..= t`.
pub fn first_keys(cu_seqlens: &[usize], tokens: usize, window: Option<usize>) -> Result<Vec<u32>> {
    check_cu_seqlens(cu_seqlens, tokens)?;
    to_u32("tokens in one attention call", tokens)?;
    if window == Some(0) {
        bail!("attention window 0 would hide every key, the query's own included");
    }
    let mut first = Vec::with_capacity(tokens);
    for pair in cu_seqlens.windows(2) {
        let (start, end) = (pair[0], pair[1]);
        for t in start..end {
            let key = match window {
                Some(w) => start.max((t + 1).saturating_sub(w)),
                None => start,
            };
            first.push(key as u32);
        }
    }
    Ok(first)
}
