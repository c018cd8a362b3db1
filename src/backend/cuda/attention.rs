//! Attention on the GPU (kernels/attention.cu): flash attention on tensor cores over packed
//! variable-length batches (causal, sliding window, soft-cap, GQA, head_dim up to 256), the
//! forward writing the log-sum-exp its backward recomputes the probabilities from; the
//! kernel choice (compiled head size, operand type, backward variant) and the host-side tile
//! tables (pure arithmetic, tested without a GPU). CPU reference: `backend/cpu/attention.rs`;
//! cases: `selftest/attention.rs`.

use super::driver::{Gpu, KernelArg};
use super::launch::{expect_f32, expect_len, to_u32, LaunchConfig};
use super::nf4::MmaOperands;
use super::{f32_bytes, CudaBuf};
use crate::backend::AttentionParams;
use anyhow::{bail, ensure, Result};
use std::ffi::c_void;

/// `FLASH_THREADS` (attention.cu): 4 warps per block, every kernel.
pub const FLASH_THREADS: u32 = 128;
/// `FLASH_FWD_QUERIES` (attention.cu): query rows per forward block.
pub const FORWARD_ROWS: usize = 64;
/// `FLASH_DELTA_ROWS` (attention.cu): (token, head) rows per block of the delta kernel.
pub const DELTA_ROWS: usize = 4;
/// `FLASH_SCALE_THREADS` (attention.cu): the one block that reduces max |dout|.
pub const SCALE_THREADS: u32 = 256;
/// The largest head_dim: the largest compiled head size.
pub const MAX_HEAD_DIM: usize = 256;
/// Environment variable that selects the deterministic attention backward (`1`) for every
/// CUDA backend opened afterwards; otherwise the atomic one runs.
pub const DETERMINISTIC_ENV: &str = "VERDICT_DETERMINISTIC";

/// A compiled head size of attention.cu (`D`): head_dim is padded with zeros up to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadSize {
    /// `_d64`.
    D64,
    /// `_d128`.
    D128,
    /// `_d256`.
    D256,
}

impl HeadSize {
    /// The smallest compiled size that holds `head_dim` (1 to [`MAX_HEAD_DIM`]).
    pub fn for_head_dim(head_dim: usize) -> Result<HeadSize> {
        Ok(match head_dim {
            1..=64 => HeadSize::D64,
            65..=128 => HeadSize::D128,
            129..=MAX_HEAD_DIM => HeadSize::D256,
            _ => bail!(
                "attention: head_dim {head_dim} is not supported (1 to {MAX_HEAD_DIM}; \
                 kernels/attention.cu is compiled for 64, 128 and 256 and pads smaller ones)"
            ),
        })
    }

    /// `D`.
    pub fn dim(self) -> usize {
        match self {
            HeadSize::D64 => 64,
            HeadSize::D128 => 128,
            HeadSize::D256 => 256,
        }
    }

    /// `FlashTiles<D>` (attention.cu): forward keys per step, backward query rows and keys
    /// per tile. Each tile set fits 48 KiB of static shared memory (the header's table).
    pub fn tiles(self) -> FlashTiles {
        let (forward_keys, backward_rows, backward_keys) = match self {
            HeadSize::D64 => (64, 32, 64),
            HeadSize::D128 => (64, 32, 32),
            HeadSize::D256 => (16, 16, 16),
        };
        FlashTiles {
            forward_rows: FORWARD_ROWS,
            forward_keys,
            backward_rows,
            backward_keys,
        }
    }

    /// Static shared memory per block of the forward and of the backward kernels (bytes), as
    /// attention.cu declares it: 16-bit rows padded by 8 values, two f32 per backward row.
    pub fn shared_bytes(self) -> (usize, usize) {
        let d = self.dim();
        let t = self.tiles();
        let row = |values: usize| 2 * (values + 8);
        let forward = (t.forward_rows + t.forward_keys) * row(d);
        let backward = 2 * (t.backward_rows + t.backward_keys) * row(d)
            + 2 * t.backward_keys * row(t.backward_rows)
            + 2 * 4 * t.backward_rows;
        (forward, backward)
    }
}

/// The tile shapes of one compiled head size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlashTiles {
    /// Query rows per forward block (16 per warp).
    pub forward_rows: usize,
    /// Keys per forward step.
    pub forward_keys: usize,
    /// Query rows per backward step (and per block of the dq kernel).
    pub backward_rows: usize,
    /// Keys per block of the backward's kv kernels (and per step of the dq kernel).
    pub backward_keys: usize,
}

/// How the backward computes dq.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlashBackward {
    /// The kv kernel adds each query tile's dq with f32 atomics: one kernel, but dq's last
    /// bits depend on the order blocks finish.
    Atomic,
    /// A separate query-major kernel writes dq: no atomics, the same bits on every run, at
    /// the cost of recomputing the scores once more.
    Deterministic,
}

impl FlashBackward {
    /// [`FlashBackward::Deterministic`] when `VERDICT_DETERMINISTIC=1`, else atomic.
    pub fn from_env() -> Result<FlashBackward> {
        match std::env::var(DETERMINISTIC_ENV).as_deref() {
            Err(_) | Ok("") | Ok("0") => Ok(FlashBackward::Atomic),
            Ok("1") => Ok(FlashBackward::Deterministic),
            Ok(other) => bail!("{DETERMINISTIC_ENV}={other}: expected 1 or 0"),
        }
    }
}

/// The flash kernels that come per operand type and compiled head size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlashKernel {
    /// `attention_forward_*`.
    Forward,
    /// `attention_backward_kv_*`: dk, dv.
    BackwardKv,
    /// `attention_backward_kv_atomic_*`: dk, dv and dq with atomics.
    BackwardKvAtomic,
    /// `attention_backward_q_*`: dq.
    BackwardQ,
}

/// Every `attention_<kind>_<f16|bf16>_d<D>` entry point, by kind, operand type, head size.
const ENTRY_POINTS: [[[&str; 3]; 2]; 4] = [
    [
        [
            "attention_forward_f16_d64",
            "attention_forward_f16_d128",
            "attention_forward_f16_d256",
        ],
        [
            "attention_forward_bf16_d64",
            "attention_forward_bf16_d128",
            "attention_forward_bf16_d256",
        ],
    ],
    [
        [
            "attention_backward_kv_f16_d64",
            "attention_backward_kv_f16_d128",
            "attention_backward_kv_f16_d256",
        ],
        [
            "attention_backward_kv_bf16_d64",
            "attention_backward_kv_bf16_d128",
            "attention_backward_kv_bf16_d256",
        ],
    ],
    [
        [
            "attention_backward_kv_atomic_f16_d64",
            "attention_backward_kv_atomic_f16_d128",
            "attention_backward_kv_atomic_f16_d256",
        ],
        [
            "attention_backward_kv_atomic_bf16_d64",
            "attention_backward_kv_atomic_bf16_d128",
            "attention_backward_kv_atomic_bf16_d256",
        ],
    ],
    [
        [
            "attention_backward_q_f16_d64",
            "attention_backward_q_f16_d128",
            "attention_backward_q_f16_d256",
        ],
        [
            "attention_backward_q_bf16_d64",
            "attention_backward_q_bf16_d128",
            "attention_backward_q_bf16_d256",
        ],
    ],
];

/// The entry point of one kernel.
pub fn entry_point(kernel: FlashKernel, operands: MmaOperands, size: HeadSize) -> &'static str {
    let op = match operands {
        MmaOperands::F16 => 0,
        MmaOperands::Bf16 => 1,
    };
    let d = match size {
        HeadSize::D64 => 0,
        HeadSize::D128 => 1,
        HeadSize::D256 => 2,
    };
    ENTRY_POINTS[kernel as usize][op][d]
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

/// The kernels' tile table: every sequence of `cu_seqlens` cut into tiles of `rows` rows, one
/// `(first row, sequence start, sequence end)` triple per block, so that no block straddles two
/// sequences (empty sequences have none).
pub fn tiles(cu_seqlens: &[usize], rows: usize) -> Result<Vec<u32>> {
    let mut out = Vec::new();
    for pair in cu_seqlens.windows(2) {
        let (start, end) = (to_u32("tokens", pair[0])?, to_u32("tokens", pair[1])?);
        for first in (start..end).step_by(rows) {
            out.extend([first, start, end]);
        }
    }
    Ok(out)
}

impl LaunchConfig {
    /// Flash attention: one block per tile of a [`tiles`] table (`tile_values / 3` of them)
    /// and per head (query heads for the forward and dq, key/value heads for dk/dv).
    pub fn flash_attention(what: &str, tile_values: usize, heads: usize) -> Result<LaunchConfig> {
        LaunchConfig::grid_2d(what, tile_values / 3, heads, FLASH_THREADS)
    }
}

/// Checks an attention call's settings and the q, k, v, lse shapes against `cu_seqlens`;
/// returns the tokens, the compiled head size and the kernels' settings.
fn check_attention(
    op: &str,
    q: &CudaBuf,
    k: &CudaBuf,
    v: &CudaBuf,
    lse: &CudaBuf,
    cu_seqlens: &[usize],
    params: &AttentionParams,
) -> Result<(usize, HeadSize, Settings)> {
    let AttentionParams {
        heads,
        kv_heads,
        head_dim,
        softcap,
        window,
        scale,
    } = *params;
    let size = HeadSize::for_head_dim(head_dim)?;
    ensure!(
        kv_heads > 0 && heads % kv_heads == 0,
        "{op}: {heads} query heads cannot share {kv_heads} key/value heads evenly"
    );
    let cap = match softcap {
        None => 0.0,
        Some(cap) if cap > 0.0 => cap,
        Some(cap) => bail!("{op}: soft-cap {cap} must be positive"),
    };
    let tokens = cu_seqlens.last().copied().unwrap_or(0);
    check_cu_seqlens(cu_seqlens, tokens)?;
    let window = match window {
        Some(0) => bail!("{op}: window 0 would hide every key, the query's own included"),
        // A window of at least the batch hides nothing: the kernels' 0 (none).
        Some(w) if w < tokens => to_u32("window", w)?,
        _ => 0,
    };
    expect_len(op, "q", q, tokens * heads * head_dim)?;
    expect_len(op, "k", k, tokens * kv_heads * head_dim)?;
    expect_len(op, "v", v, k.len)?;
    expect_len(op, "lse", lse, tokens * heads)?;
    expect_f32(op, "lse", lse)?;
    let settings = Settings {
        heads: to_u32("heads", heads)?,
        kv_heads: to_u32("kv_heads", kv_heads)?,
        head_dim: to_u32("head_dim", head_dim)?,
        scale,
        cap,
        window,
    };
    Ok((tokens, size, settings))
}

/// The settings every flash entry point takes after its pointers and tile table.
#[derive(Clone, Copy)]
struct Settings {
    heads: u32,
    kv_heads: u32,
    head_dim: u32,
    scale: f32,
    /// The soft-cap, 0 for none.
    cap: f32,
    /// The sliding window, 0 for none.
    window: u32,
}

impl Settings {
    /// The settings as the entry points' last arguments.
    fn args(self) -> [Arg; 6] {
        [
            Arg::U32(self.heads),
            Arg::U32(self.kv_heads),
            Arg::U32(self.head_dim),
            Arg::F32(self.scale),
            Arg::F32(self.cap),
            Arg::U32(self.window),
        ]
    }
}

/// One argument of an attention.cu entry point, by value until the launch takes its address.
#[derive(Clone, Copy)]
enum Arg {
    /// A device pointer.
    Ptr(u64),
    /// A dtype code, a count or a setting.
    U32(u32),
    /// The scale or the soft-cap.
    F32(f32),
}

impl KernelArg for Arg {
    fn param(&mut self) -> *mut c_void {
        match self {
            Arg::Ptr(p) => p as *mut u64 as *mut c_void,
            Arg::U32(v) => v as *mut u32 as *mut c_void,
            Arg::F32(v) => v as *mut f32 as *mut c_void,
        }
    }
}

/// An activation or gradient argument: its pointer and dtype code (storage.cuh's Tensor).
fn tensor(buf: &CudaBuf) -> [Arg; 2] {
    [Arg::Ptr(buf.ptr()), Arg::U32(buf.dtype_code())]
}

/// Launches attention.cu's `function` with `args` in signature order.
fn launch(
    gpu: &Gpu,
    op: &str,
    function: &'static str,
    config: LaunchConfig,
    args: &[Arg],
) -> Result<()> {
    let mut args = args.to_vec();
    let mut params: Vec<&mut dyn KernelArg> =
        args.iter_mut().map(|a| a as &mut dyn KernelArg).collect();
    gpu.launch(op, "attention", function, config, &mut params)
}

/// Checks that `operands` run on this card (bf16 needs sm_80).
fn check_operands(gpu: &Gpu, operands: MmaOperands) -> Result<()> {
    let (major, minor) = gpu.info().compute_capability;
    ensure!(
        operands == MmaOperands::F16 || major >= 8,
        "attention: bf16 tensor cores need sm_80 or newer; this card is sm_{major}{minor}"
    );
    Ok(())
}

/// The forward: `out` and `lse` (`[tokens, heads]`, natural log) from q, k, v.
#[allow(clippy::too_many_arguments)]
pub(super) fn attention(
    gpu: &Gpu,
    out: &CudaBuf,
    lse: &CudaBuf,
    q: &CudaBuf,
    k: &CudaBuf,
    v: &CudaBuf,
    cu_seqlens: &[usize],
    params: &AttentionParams,
    operands: MmaOperands,
) -> Result<()> {
    let op = "attention";
    let (tokens, size, settings) = check_attention(op, q, k, v, lse, cu_seqlens, params)?;
    expect_len(op, "the output", out, q.len)?;
    check_operands(gpu, operands)?;
    if tokens == 0 || params.heads == 0 {
        return Ok(());
    }
    let tiles = tiles(cu_seqlens, FORWARD_ROWS)?;
    let config = LaunchConfig::flash_attention(op, tiles.len(), params.heads)?;
    let tiles = gpu.upload(op, &tiles)?;
    let args = [
        &tensor(out)[..],
        &[Arg::Ptr(lse.ptr())],
        &tensor(q),
        &tensor(k),
        &tensor(v),
        &[Arg::Ptr(tiles.ptr())],
        &settings.args(),
    ]
    .concat();
    launch(
        gpu,
        op,
        entry_point(FlashKernel::Forward, operands, size),
        config,
        &args,
    )
}

/// The backward: dout's power-of-two scale (max |dout| per row, then overall), `D =
/// rowsum(s·dout ∘ out)`, then dk, dv and dq from the forward's `out` and `lse` — the kv
/// kernel and the dq kernel (deterministic), or the kv kernel adding dq with atomics into a
/// zeroed dq, which must then be f32 (f32 atomicAdd; the deterministic variant stores dq in
/// any type).
#[allow(clippy::too_many_arguments)]
pub(super) fn attention_backward(
    gpu: &Gpu,
    dq: &CudaBuf,
    dk: &CudaBuf,
    dv: &CudaBuf,
    dout: &CudaBuf,
    out: &CudaBuf,
    lse: &CudaBuf,
    q: &CudaBuf,
    k: &CudaBuf,
    v: &CudaBuf,
    cu_seqlens: &[usize],
    params: &AttentionParams,
    operands: MmaOperands,
    variant: FlashBackward,
) -> Result<()> {
    let op = "attention_backward";
    let (tokens, size, settings) = check_attention(op, q, k, v, lse, cu_seqlens, params)?;
    for (name, buf, len) in [
        ("dout", dout, q.len),
        ("out", out, q.len),
        ("dq", dq, q.len),
        ("dk", dk, k.len),
        ("dv", dv, k.len),
    ] {
        expect_len(op, name, buf, len)?;
    }
    if variant == FlashBackward::Atomic {
        expect_f32(
            op,
            "dq (the atomic backward adds into it with f32 atomics; \
             VERDICT_DETERMINISTIC=1 stores any type)",
            dq,
        )?;
    }
    check_operands(gpu, operands)?;
    if tokens == 0 || params.heads == 0 {
        return Ok(());
    }
    let tile = size.tiles();
    let rows = tokens * params.heads;
    let rows_arg = Arg::U32(to_u32("tokens x heads", rows)?);
    let head_dim_arg = Arg::U32(settings.head_dim);
    // dout's scale (attention.cu: a power of two putting max |dout| in [1, 2)), then D.
    let row_max = gpu.alloc(op, f32_bytes(rows))?;
    let dout_scale = gpu.alloc(op, f32_bytes(1))?;
    let delta = gpu.alloc(op, f32_bytes(rows))?;
    let per_row = LaunchConfig::grid_2d(op, rows.div_ceil(DELTA_ROWS), 1, FLASH_THREADS)?;
    let args = [
        &[Arg::Ptr(row_max.ptr())][..],
        &tensor(dout),
        &[rows_arg, head_dim_arg],
    ]
    .concat();
    launch(gpu, op, "attention_backward_dout_max", per_row, &args)?;
    launch(
        gpu,
        op,
        "attention_backward_dout_scale_f32",
        LaunchConfig::grid_2d(op, 1, 1, SCALE_THREADS)?,
        &[
            Arg::Ptr(dout_scale.ptr()),
            Arg::Ptr(row_max.ptr()),
            rows_arg,
        ],
    )?;
    let args = [
        &[Arg::Ptr(delta.ptr())][..],
        &tensor(dout),
        &tensor(out),
        &[Arg::Ptr(dout_scale.ptr()), rows_arg, head_dim_arg],
    ]
    .concat();
    let delta_kernel = match operands {
        MmaOperands::F16 => "attention_backward_delta_f16",
        MmaOperands::Bf16 => "attention_backward_delta_bf16",
    };
    launch(gpu, op, delta_kernel, per_row, &args)?;
    let key_tiles = tiles(cu_seqlens, tile.backward_keys)?;
    let key_config = LaunchConfig::flash_attention(op, key_tiles.len(), params.kv_heads)?;
    let key_tiles = gpu.upload(op, &key_tiles)?;
    // Every backward entry point: its outputs, then these inputs, its tile table, settings.
    let inputs = [
        &tensor(dout)[..],
        &tensor(q),
        &tensor(k),
        &tensor(v),
        &[
            Arg::Ptr(lse.ptr()),
            Arg::Ptr(delta.ptr()),
            Arg::Ptr(dout_scale.ptr()),
        ],
    ]
    .concat();
    let args = |outputs: &[Arg], tiles: u64| -> Vec<Arg> {
        [outputs, &inputs, &[Arg::Ptr(tiles)], &settings.args()].concat()
    };
    let (kv_kernel, kv_outputs) = match variant {
        FlashBackward::Deterministic => {
            (FlashKernel::BackwardKv, [tensor(dk), tensor(dv)].concat())
        }
        FlashBackward::Atomic => {
            gpu.zero(op, &dq.block, dq.bytes())?;
            (
                FlashKernel::BackwardKvAtomic,
                [&tensor(dk)[..], &tensor(dv), &[Arg::Ptr(dq.ptr())]].concat(),
            )
        }
    };
    launch(
        gpu,
        op,
        entry_point(kv_kernel, operands, size),
        key_config,
        &args(&kv_outputs, key_tiles.ptr()),
    )?;
    if variant == FlashBackward::Atomic {
        return Ok(());
    }
    let query_tiles = tiles(cu_seqlens, tile.backward_rows)?;
    let query_config = LaunchConfig::flash_attention(op, query_tiles.len(), params.heads)?;
    let query_tiles = gpu.upload(op, &query_tiles)?;
    launch(
        gpu,
        op,
        entry_point(FlashKernel::BackwardQ, operands, size),
        query_config,
        &args(&tensor(dq), query_tiles.ptr()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_cut_each_sequence_and_never_straddle_two() {
        // Catches a block whose rows run into the next sequence (its keys would then be
        // another sequence's) and a tile lost at a sequence end.
        assert_eq!(
            tiles(&[0, 1, 18, 18, 20], 16).unwrap(),
            [0, 0, 1, 1, 1, 18, 17, 1, 18, 18, 18, 20]
        );
        assert!(tiles(&[0, 0], 64).unwrap().is_empty());
    }

    #[test]
    fn entry_points_are_named_by_kind_operands_and_head_size() {
        // A swapped index would launch a kernel compiled for another head size or operand.
        assert_eq!(
            entry_point(
                FlashKernel::BackwardKvAtomic,
                MmaOperands::Bf16,
                HeadSize::D128
            ),
            "attention_backward_kv_atomic_bf16_d128"
        );
        assert_eq!(
            entry_point(FlashKernel::BackwardQ, MmaOperands::F16, HeadSize::D64),
            "attention_backward_q_f16_d64"
        );
        assert_eq!(
            entry_point(FlashKernel::Forward, MmaOperands::F16, HeadSize::D256),
            "attention_forward_f16_d256"
        );
    }

    #[test]
    fn head_sizes_pad_up_and_refuse_past_256() {
        assert_eq!(HeadSize::for_head_dim(1).unwrap(), HeadSize::D64);
        assert_eq!(HeadSize::for_head_dim(96).unwrap(), HeadSize::D128);
        assert_eq!(HeadSize::for_head_dim(256).unwrap(), HeadSize::D256);
        let err = HeadSize::for_head_dim(257).unwrap_err().to_string();
        assert!(err.contains("head_dim 257"), "{err}");
        assert!(HeadSize::for_head_dim(0).is_err());
    }

    #[test]
    fn every_tile_set_fits_static_shared_memory_and_the_warps() {
        // attention.cu's static_assert: 32 tiles of dK/dV per block (8 per warp); the dq
        // tiles split evenly over the 4 warps; forward and backward under 48 KiB.
        for size in [HeadSize::D64, HeadSize::D128, HeadSize::D256] {
            let (d, t) = (size.dim(), size.tiles());
            assert_eq!(t.backward_keys / 16 * d / 8, 32, "{size:?}");
            assert_eq!((t.backward_rows / 16 * d / 8) % 4, 0, "{size:?}");
            let (forward, backward) = size.shared_bytes();
            assert!(
                forward <= super::super::launch::STATIC_SHARED_LIMIT,
                "{size:?}"
            );
            assert!(
                backward <= super::super::launch::STATIC_SHARED_LIMIT,
                "{size:?}"
            );
        }
        assert_eq!(HeadSize::D256.shared_bytes(), (42_240, 35_456));
    }
}
