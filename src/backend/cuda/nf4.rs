//! NF4 products on the GPU (kernels/nf4.cu): which kernel computes a product (GEMV for few
//! rows, tensor cores with bf16 or fp16 operands, or dequantize then `gemm_f32` for widths
//! off the 16-element group), their launch shapes and entry points, the launchers, and the
//! dequantization to a dense copy. CPU reference: `backend/cpu/nf4.rs`; cases:
//! `selftest/nf4.rs`. The activation operand and the output are f32 or 16-bit (their dtype
//! codes go to the kernels; the dequantized path's `gemm_f32` takes them the same way).

use super::driver::{DeviceBlock, Gpu, KernelArg};
use super::gemm::{dense_weight_operand, gemm, row_major, GemmKernel, Operand};
use super::launch::{expect_len, store_args, to_u32, LaunchConfig};
use super::{f32_bytes, CudaAbsmax, CudaBuf, CudaNf4};
use crate::backend::Store;
use anyhow::{ensure, Result};

/// `NF4_THREADS` (nf4.cu): threads per block of the dequantization.
pub const NF4_THREADS: u32 = 256;
/// `NF4_GROUP` (nf4.cu): weights decoded together (one 64-bit load, one absmax), also the
/// elements per thread of the dequantization. The NF4 products need the weight's column
/// count to be a multiple of it.
pub const NF4_GROUP: usize = 16;
/// `MMA_THREADS` (mma.cuh; the tensor-core products of nf4.cu and gemm.cu): 4 warps.
pub const NF4_MMA_THREADS: u32 = 128;
/// `MMA_TILE` (mma.cuh): rows and columns of out per tensor-core block.
pub const NF4_MMA_TILE: usize = 64;
/// `MMA_K_TILE` (mma.cuh): reduction elements staged in shared memory per step.
pub const NF4_MMA_K_TILE: usize = 64;
/// `MMA_STRIDE` (mma.cuh): 16-bit values per shared-memory tile row (64 + 8 of padding).
pub const NF4_MMA_STRIDE: usize = 72;
/// `NF4_GEMV_THREADS` (nf4.cu): 8 warps, one output feature each.
pub const NF4_GEMV_THREADS: u32 = 256;
/// `NF4_GEMV_MAX_ROWS` (nf4.cu): the GEMV path's row limit (its accumulators per lane).
pub const NF4_GEMV_MAX_ROWS: usize = 8;
/// Static shared memory of the tensor-core kernel: the X and W tiles (16-bit values) and the
/// 16 code values (ptxas reports the same 18 496 bytes).
pub const NF4_MMA_SHARED_BYTES: usize =
    2 * NF4_MMA_TILE * NF4_MMA_STRIDE * std::mem::size_of::<u16>()
        + 16 * std::mem::size_of::<f32>();

impl LaunchConfig {
    /// The NF4 tensor-core product for an `[m, n]` output: one block per 64 x 64 tile.
    pub fn nf4_mma(what: &str, m: usize, n: usize) -> Result<LaunchConfig> {
        LaunchConfig::grid_2d(
            what,
            n.div_ceil(NF4_MMA_TILE),
            m.div_ceil(NF4_MMA_TILE),
            NF4_MMA_THREADS,
        )
    }

    /// The NF4 GEMV for `n` output features: one warp per feature.
    pub fn nf4_gemv(what: &str, n: usize) -> Result<LaunchConfig> {
        LaunchConfig::per_item(what, n, NF4_GEMV_THREADS / 32).map(|c| LaunchConfig {
            block: (NF4_GEMV_THREADS, 1, 1),
            ..c
        })
    }
}

/// Which product of an NF4 weight `W [out, in]` a launch computes (kernels/nf4.cu).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nf4Product {
    /// `out [rows, out] = X [rows, in] · Wᵀ` (`linear`).
    Forward,
    /// `dX [rows, in] = dY [rows, out] · W` (`linear_backward`).
    Backward,
}

impl Nf4Product {
    /// `(n, k)` of the product with a weight of `w_rows` x `w_cols`: output columns and
    /// reduction length.
    pub fn output_and_reduction(self, w_rows: usize, w_cols: usize) -> (usize, usize) {
        match self {
            Nf4Product::Forward => (w_rows, w_cols),
            Nf4Product::Backward => (w_cols, w_rows),
        }
    }
}

/// The 16-bit operand type of the tensor-core NF4 product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MmaOperands {
    /// bf16, `mma.m16n8k16` (sm_80 and newer).
    Bf16,
    /// fp16, two `mma.m16n8k8` per 16 of the reduction (sm_75 and newer).
    F16,
}

impl MmaOperands {
    /// The card's operand type (DESIGN §5): bf16 where it exists, fp16 on sm_75.
    pub fn for_arch(compute_capability: (i32, i32)) -> MmaOperands {
        if compute_capability.0 >= 8 {
            MmaOperands::Bf16
        } else {
            MmaOperands::F16
        }
    }

    /// "bf16" or "f16".
    pub fn name(self) -> &'static str {
        match self {
            MmaOperands::Bf16 => "bf16",
            MmaOperands::F16 => "f16",
        }
    }
}

/// The kernel that computes an NF4 product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nf4Kernel {
    /// f32 on CUDA cores, one warp per output feature: forward with few rows.
    Gemv,
    /// Tensor cores with 16-bit operands, f32 accumulation.
    Mma(MmaOperands),
    /// `nf4_dequant` to a dense f32 copy, then `gemm_f32`: weights whose column count is not
    /// a multiple of [`NF4_GROUP`].
    Dequantized,
}

impl Nf4Kernel {
    /// The kernel the backend uses for `rows` rows and a weight of `w_cols` columns on a card
    /// of `compute_capability`: GEMV for at most [`NF4_GEMV_MAX_ROWS`] rows (forward; a
    /// 64-row tensor-core tile would be mostly empty and the weight's bytes bound the time),
    /// tensor cores above and for every backward.
    pub fn choose(
        product: Nf4Product,
        rows: usize,
        w_cols: usize,
        compute_capability: (i32, i32),
    ) -> Nf4Kernel {
        if w_cols % NF4_GROUP != 0 {
            Nf4Kernel::Dequantized
        } else if product == Nf4Product::Forward && rows <= NF4_GEMV_MAX_ROWS {
            Nf4Kernel::Gemv
        } else {
            Nf4Kernel::Mma(MmaOperands::for_arch(compute_capability))
        }
    }

    /// Every kernel that can compute this product on this card (the selftest checks each).
    pub fn applicable(
        product: Nf4Product,
        rows: usize,
        w_cols: usize,
        compute_capability: (i32, i32),
    ) -> Vec<Nf4Kernel> {
        [
            Nf4Kernel::Gemv,
            Nf4Kernel::Mma(MmaOperands::F16),
            Nf4Kernel::Mma(MmaOperands::Bf16),
            Nf4Kernel::Dequantized,
        ]
        .into_iter()
        .filter(|k| {
            k.check(product, rows, w_cols, compute_capability).is_ok()
                && (*k != Nf4Kernel::Dequantized || w_cols % NF4_GROUP != 0)
        })
        .collect()
    }

    /// Fails unless this kernel can compute the product (`what` names the op).
    pub fn check(
        self,
        product: Nf4Product,
        rows: usize,
        w_cols: usize,
        compute_capability: (i32, i32),
    ) -> Result<()> {
        let (major, minor) = compute_capability;
        if self != Nf4Kernel::Dequantized {
            ensure!(
                w_cols % NF4_GROUP == 0,
                "the NF4 {self:?} kernel needs the weight's columns to be a multiple of \
                 {NF4_GROUP}, found {w_cols}"
            );
        }
        match self {
            Nf4Kernel::Gemv => {
                ensure!(
                    product == Nf4Product::Forward,
                    "the NF4 GEMV kernel computes the forward product only"
                );
                ensure!(
                    rows <= NF4_GEMV_MAX_ROWS,
                    "the NF4 GEMV kernel takes at most {NF4_GEMV_MAX_ROWS} rows, found {rows}"
                );
            }
            Nf4Kernel::Mma(MmaOperands::Bf16) => ensure!(
                major >= 8,
                "bf16 tensor cores need sm_80 or newer; this card is sm_{major}{minor}"
            ),
            Nf4Kernel::Mma(MmaOperands::F16) | Nf4Kernel::Dequantized => {}
        }
        Ok(())
    }

    /// The kernels/nf4.cu entry point, `None` for [`Nf4Kernel::Dequantized`] (two launches).
    pub fn entry_point(self, product: Nf4Product, nested_absmax: bool) -> Option<&'static str> {
        use MmaOperands::{Bf16, F16};
        use Nf4Product::{Backward, Forward};
        let [plain, nested] = match (self, product) {
            (Nf4Kernel::Gemv, Forward) => ["nf4_gemv_plain", "nf4_gemv_nested"],
            (Nf4Kernel::Mma(Bf16), Forward) => ["nf4_mma_bf16_plain", "nf4_mma_bf16_nested"],
            (Nf4Kernel::Mma(F16), Forward) => ["nf4_mma_f16_plain", "nf4_mma_f16_nested"],
            (Nf4Kernel::Mma(Bf16), Backward) => [
                "nf4_mma_bf16_backward_plain",
                "nf4_mma_bf16_backward_nested",
            ],
            (Nf4Kernel::Mma(F16), Backward) => {
                ["nf4_mma_f16_backward_plain", "nf4_mma_f16_backward_nested"]
            }
            (Nf4Kernel::Gemv, Backward) | (Nf4Kernel::Dequantized, _) => return None,
        };
        Some(if nested_absmax { nested } else { plain })
    }

    /// The launch shape for an `[m, n]` output (`None` for [`Nf4Kernel::Dequantized`]).
    pub fn launch_config(self, what: &str, m: usize, n: usize) -> Result<Option<LaunchConfig>> {
        match self {
            Nf4Kernel::Gemv => LaunchConfig::nf4_gemv(what, n).map(Some),
            Nf4Kernel::Mma(_) => LaunchConfig::nf4_mma(what, m, n).map(Some),
            Nf4Kernel::Dequantized => Ok(None),
        }
    }

    /// A short name for reports: "gemv", "mma-bf16", "mma-f16", "dequant+gemm".
    pub fn name(self) -> String {
        match self {
            Nf4Kernel::Gemv => "gemv".into(),
            Nf4Kernel::Mma(op) => format!("mma-{}", op.name()),
            Nf4Kernel::Dequantized => "dequant+gemm".into(),
        }
    }
}

/// The LoRA term a tensor-core NF4 product adds to its own (the fused LoRA, kernels/nf4.cu's
/// `Nf4LowRank`): `scale · x · w` with `x` [rows, rank] row-major and `w(n, r)` strided, each
/// of its own dtype.
pub(super) struct Nf4LowRank<'a> {
    pub(super) x: &'a CudaBuf,
    pub(super) w: Operand,
    pub(super) rank: usize,
    pub(super) scale: f32,
}

/// An NF4 product with `kernel` (kernels/nf4.cu): `out [rows, w.rows] (=|+= s·) A · Wᵀ`
/// (forward) or `out [rows, w.cols] (=|+= s·) A · W` (backward), plus `low_rank` inside the
/// same product (tensor-core kernels only).
#[allow(clippy::too_many_arguments)]
pub(super) fn nf4_product(
    gpu: &Gpu,
    op: &str,
    product: Nf4Product,
    out: &CudaBuf,
    a: &CudaBuf,
    w: &CudaNf4,
    rows: usize,
    store: Store,
    kernel: Nf4Kernel,
    low_rank: Option<&Nf4LowRank>,
) -> Result<()> {
    let (n, k) = product.output_and_reduction(w.rows, w.cols);
    expect_len(op, "the input", a, rows * k)?;
    expect_len(op, "the output", out, rows * n)?;
    kernel
        .check(product, rows, w.cols, gpu.info().compute_capability)
        .map_err(|e| e.context(op.to_string()))?;
    if let Some(term) = low_rank {
        ensure!(
            matches!(kernel, Nf4Kernel::Mma(_)),
            "{op}: only the tensor-core NF4 kernels add a LoRA term, not {}",
            kernel.name()
        );
        expect_len(op, "the LoRA factor", term.x, rows * term.rank)?;
    }
    if rows == 0 || n == 0 {
        return Ok(());
    }
    let nested = matches!(w.absmax, CudaAbsmax::Double { .. });
    let (Some(function), Some(config)) = (
        kernel.entry_point(product, nested),
        kernel.launch_config(op, rows, n)?,
    ) else {
        let dense = nf4_dequantize(gpu, w)?;
        let b = dense_weight_operand(dense.ptr(), w.cols, product);
        return gemm(
            gpu,
            op,
            GemmKernel::F32,
            out,
            row_major(a, k),
            b,
            (rows, n, k),
            store,
            None,
        );
    };
    let (alpha, accumulate) = store_args(store);
    let mut args: Vec<Box<dyn KernelArg>> = vec![
        Box::new(out.ptr()),
        Box::new(out.dtype_code()),
        Box::new(a.ptr()),
        Box::new(a.dtype_code()),
        Box::new(w.packed.ptr()),
        Box::new(to_u32("rows", rows)?),
        Box::new(to_u32("output features", n)?),
        Box::new(to_u32("reduction length", k)?),
        Box::new(to_u32("NF4 blocksize", w.blocksize)?),
        Box::new(alpha),
        Box::new(accumulate),
    ];
    // The absmax tables of the weight's mode follow the common arguments.
    match &w.absmax {
        CudaAbsmax::F32(absmax) => args.push(Box::new(absmax.ptr())),
        CudaAbsmax::Double {
            codes,
            nested_code,
            nested_absmax,
            offset,
        } => args.extend([
            Box::new(codes.ptr()) as Box<dyn KernelArg>,
            Box::new(nested_code.ptr()),
            Box::new(nested_absmax.ptr()),
            Box::new(*offset),
        ]),
    }
    if let Nf4Kernel::Mma(_) = kernel {
        // The LoRA term's arguments (rank 0: none; the pointers are then never read).
        let (x, x_dtype, w, rank, scale) = match low_rank {
            Some(t) => (t.x.ptr(), t.x.dtype_code(), &t.w, t.rank, t.scale),
            None => (0, NO_LOW_RANK.dtype, &NO_LOW_RANK, 0, 0.0),
        };
        args.extend([
            Box::new(x) as Box<dyn KernelArg>,
            Box::new(x_dtype),
            Box::new(w.ptr),
            Box::new(w.dtype),
            Box::new(to_u32("LoRA rank", rank)?),
            Box::new(w.row_stride as u64),
            Box::new(w.k_stride as u64),
            Box::new(scale),
        ]);
    }
    let mut params: Vec<&mut dyn KernelArg> = args
        .iter_mut()
        .map(|arg| arg.as_mut() as &mut dyn KernelArg)
        .collect();
    gpu.launch(op, "nf4", function, config, &mut params)
}

/// The absent LoRA term's operand (rank 0: never read).
const NO_LOW_RANK: Operand = Operand {
    ptr: 0,
    dtype: 0,
    row_stride: 0,
    k_stride: 0,
};

/// A dense f32 copy of an NF4 weight (kernels/nf4.cu).
pub(super) fn nf4_dequantize(gpu: &Gpu, w: &CudaNf4) -> Result<DeviceBlock> {
    let op = "nf4_dequantize";
    let n = w.rows * w.cols;
    let out = gpu.alloc(op, f32_bytes(n))?;
    if n == 0 {
        return Ok(out);
    }
    let config = LaunchConfig::per_item(op, n.div_ceil(NF4_GROUP), NF4_THREADS)?;
    let mut blocksize = to_u32("NF4 blocksize", w.blocksize)?;
    let mut n = n as u64;
    match &w.absmax {
        CudaAbsmax::F32(absmax) => gpu.launch(
            op,
            "nf4",
            "nf4_dequant_f32",
            config,
            &mut [
                &mut w.packed.ptr(),
                &mut absmax.ptr(),
                &mut out.ptr(),
                &mut n,
                &mut blocksize,
            ],
        )?,
        CudaAbsmax::Double {
            codes,
            nested_code,
            nested_absmax,
            offset,
        } => gpu.launch(
            op,
            "nf4",
            "nf4_dequant_nested_f32",
            config,
            &mut [
                &mut w.packed.ptr(),
                &mut codes.ptr(),
                &mut nested_code.ptr(),
                &mut nested_absmax.ptr(),
                &mut { *offset },
                &mut out.ptr(),
                &mut n,
                &mut blocksize,
            ],
        )?,
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::launch::STATIC_SHARED_LIMIT;
    use super::*;
    use crate::rng::Rng;

    const HOPPER: (i32, i32) = (9, 0);
    const TURING: (i32, i32) = (7, 5);
    const FORWARD: Nf4Product = Nf4Product::Forward;
    const BACKWARD: Nf4Product = Nf4Product::Backward;

    #[test]
    fn nf4_forward_takes_gemv_up_to_8_rows_and_tensor_cores_above() {
        for rows in [1, 7, 8] {
            assert_eq!(
                Nf4Kernel::choose(FORWARD, rows, 2304, HOPPER),
                Nf4Kernel::Gemv
            );
        }
        for rows in [9, 16, 333, 512] {
            assert_eq!(
                Nf4Kernel::choose(FORWARD, rows, 2304, HOPPER),
                Nf4Kernel::Mma(MmaOperands::Bf16)
            );
        }
        assert_eq!(
            Nf4Kernel::choose(FORWARD, 333, 2304, TURING),
            Nf4Kernel::Mma(MmaOperands::F16),
            "a T4 has no bf16 tensor cores"
        );
    }

    #[test]
    fn nf4_backward_never_takes_the_forward_only_gemv() {
        assert_eq!(
            Nf4Kernel::choose(BACKWARD, 1, 2304, HOPPER),
            Nf4Kernel::Mma(MmaOperands::Bf16)
        );
        assert!(Nf4Kernel::Gemv.check(BACKWARD, 1, 2304, HOPPER).is_err());
        assert_eq!(Nf4Kernel::Gemv.entry_point(BACKWARD, false), None);
    }

    #[test]
    fn nf4_columns_off_the_16_group_fall_back_to_dequantize_then_gemm() {
        // 333 columns: a group of 16 would straddle two rows and X rows lose float4 alignment.
        for rows in [1, 333] {
            assert_eq!(
                Nf4Kernel::choose(FORWARD, rows, 333, HOPPER),
                Nf4Kernel::Dequantized
            );
            assert_eq!(
                Nf4Kernel::applicable(FORWARD, rows, 333, HOPPER),
                [Nf4Kernel::Dequantized]
            );
        }
        assert!(Nf4Kernel::Mma(MmaOperands::F16)
            .check(FORWARD, 64, 333, HOPPER)
            .is_err());
        // 336 = 21 x 16 is fine although not a multiple of the 64-element tile or blocksize.
        assert_eq!(
            Nf4Kernel::choose(BACKWARD, 64, 336, HOPPER),
            Nf4Kernel::Mma(MmaOperands::Bf16)
        );
    }

    #[test]
    fn bf16_tensor_cores_are_refused_before_sm_80_and_listed_after() {
        let err = Nf4Kernel::Mma(MmaOperands::Bf16)
            .check(FORWARD, 64, 64, TURING)
            .unwrap_err();
        assert!(err.to_string().contains("sm_75"), "{err}");
        assert_eq!(
            Nf4Kernel::applicable(FORWARD, 7, 64, TURING),
            [Nf4Kernel::Gemv, Nf4Kernel::Mma(MmaOperands::F16)]
        );
        assert_eq!(
            Nf4Kernel::applicable(FORWARD, 7, 64, HOPPER),
            [
                Nf4Kernel::Gemv,
                Nf4Kernel::Mma(MmaOperands::F16),
                Nf4Kernel::Mma(MmaOperands::Bf16)
            ]
        );
        assert_eq!(Nf4Kernel::applicable(BACKWARD, 7, 64, HOPPER).len(), 2);
    }

    #[test]
    fn nf4_entry_points_name_operands_direction_and_absmax_mode() {
        let k = Nf4Kernel::Mma(MmaOperands::F16);
        assert_eq!(
            k.entry_point(BACKWARD, true),
            Some("nf4_mma_f16_backward_nested")
        );
        assert_eq!(
            Nf4Kernel::Mma(MmaOperands::Bf16).entry_point(FORWARD, false),
            Some("nf4_mma_bf16_plain")
        );
        assert_eq!(Nf4Kernel::Dequantized.entry_point(FORWARD, false), None);
    }

    #[test]
    fn nf4_grids_tile_odd_shapes() {
        let c = Nf4Kernel::Mma(MmaOperands::Bf16)
            .launch_config("t", 333, 1001)
            .unwrap()
            .unwrap();
        assert_eq!(
            c.grid,
            (16, 6, 1),
            "ceil(1001/64) column tiles, ceil(333/64) row tiles"
        );
        assert_eq!(c.block, (NF4_MMA_THREADS, 1, 1));
        let c = Nf4Kernel::Gemv
            .launch_config("t", 7, 1001)
            .unwrap()
            .unwrap();
        assert_eq!(
            c.grid,
            (126, 1, 1),
            "one warp per output feature: ceil(1001/8)"
        );
        assert_eq!(c.block, (NF4_GEMV_THREADS, 1, 1));
        assert!(c.threads() / 32 >= 1001);
        assert!(LaunchConfig::nf4_mma("linear", 65_536 * 64, 8).is_err());
    }

    #[test]
    fn nf4_mma_shared_memory_fits_the_static_limit_of_every_arch() {
        assert_eq!(
            NF4_MMA_SHARED_BYTES, 18_496,
            "the size ptxas reports for nf4_mma_*"
        );
        assert!(NF4_MMA_SHARED_BYTES <= STATIC_SHARED_LIMIT);
        // Three resident blocks per SM (ptxas: 167 registers x 128 threads) need 55 KiB of
        // the smallest shared-memory carve-out of these archs (64 KiB on sm_75).
        assert!(3 * NF4_MMA_SHARED_BYTES <= 64 * 1024);
        // 16-byte rows keep the uint4 stores aligned; 36 words (4 mod 32) spread fragment rows.
        assert_eq!(NF4_MMA_STRIDE * 2 % 16, 0);
        assert_eq!(NF4_MMA_STRIDE / 2 % 32, 4);
    }

    // ---- the tensor-core kernel's index maps, emulated on the CPU ----
    //
    // The `kernel_*` functions repeat nf4.cu's formulas (thread -> staged elements, lane ->
    // fragment words, lane -> output elements); the `ptx_*` functions state which matrix
    // element each lane's register element holds in the form CUTLASS writes the PTX ISA's
    // fragment tables (cute/atom/mma_traits_sm80.hpp: thread (4, 8), value strides, column-
    // major index), an independent spelling of the same facts. The emulation stages tiles,
    // loads fragments, runs each mma as the PTX ISA defines it and stores the results; a
    // wrong row, column, half-word or edge guard in the kernel's maps changes the product.

    const LANES: usize = 32;
    const WARPS: usize = NF4_MMA_THREADS as usize / LANES;
    /// A 32-bit fragment word: element `k` (low half) and `k + 1` (high half).
    type Word = [f32; 2];
    type Tile = Vec<[f32; NF4_MMA_STRIDE]>;

    /// nf4_mma_load_x: (tile row, first of 4 columns) of thread `tid`'s float4 `r`.
    fn kernel_x_element(tid: usize, r: usize) -> (usize, usize) {
        let e = r * NF4_MMA_THREADS as usize + tid;
        (e / (NF4_MMA_K_TILE / 4), 4 * (e % (NF4_MMA_K_TILE / 4)))
    }

    /// Nf4WeightTile: (W row, W column) of thread `tid`'s group `r`, relative to the tile.
    fn kernel_w_group(backward: bool, tid: usize, r: usize) -> (usize, usize) {
        if backward {
            (2 * (tid % 32) + r, NF4_GROUP * (tid / 32))
        } else {
            let e = r * NF4_MMA_THREADS as usize + tid;
            (e / 4, NF4_GROUP * (e % 4))
        }
    }

    /// The (row, column) of a_s whose word is A register `reg` of mma tile `i`.
    fn kernel_a_word(warp: usize, lane: usize, i: usize, kk: usize, reg: usize) -> (usize, usize) {
        let (g, t) = (lane / 4, lane % 4);
        (
            32 * (warp / 2) + 16 * i + g + 8 * (reg % 2),
            kk + 2 * t + 8 * (reg / 2),
        )
    }

    /// The (row, column) of b_s whose word is B register `reg` of mma tile `j`.
    fn kernel_b_word(warp: usize, lane: usize, j: usize, kk: usize, reg: usize) -> (usize, usize) {
        let (g, t) = (lane / 4, lane % 4);
        (32 * (warp % 2) + 8 * j + g, kk + 2 * t + 8 * reg)
    }

    /// The out element (relative to the block) of accumulator `c` of mma tile (i, j).
    fn kernel_c_element(warp: usize, lane: usize, i: usize, j: usize, c: usize) -> (usize, usize) {
        let (g, t) = (lane / 4, lane % 4);
        (
            32 * (warp / 2) + 16 * i + g + 8 * (c / 2),
            32 * (warp % 2) + 8 * j + 2 * t + c % 2,
        )
    }

    /// Element `v` of a lane's A fragment: (m, k) of the 16 x `k` A (k = 16 or 8).
    fn ptx_a(k: usize, lane: usize, v: usize) -> (usize, usize) {
        let thread = 32 * (lane % 4) + lane / 4;
        let idx = if k == 16 {
            thread + 16 * (v % 2) + 8 * (v / 2 % 2) + 128 * (v / 4)
        } else {
            thread + 16 * (v % 2) + 8 * (v / 2)
        };
        (idx % 16, idx / 16)
    }

    /// Element `v` of a lane's B fragment: (k, n) of the `k` x 8 B.
    fn ptx_b(k: usize, lane: usize, v: usize) -> (usize, usize) {
        let thread = 16 * (lane % 4) + lane / 4;
        let idx = if k == 16 {
            thread + 8 * (v % 2) + 64 * (v / 2)
        } else {
            thread + 8 * v
        };
        (idx / 8, idx % 8)
    }

    /// Element `v` of a lane's C/D fragment: (m, n) of the 16 x 8 C.
    fn ptx_c(lane: usize, v: usize) -> (usize, usize) {
        let idx = 32 * (lane % 4) + lane / 4 + 16 * (v % 2) + 8 * (v / 2);
        (idx % 16, idx / 16)
    }

    /// `mma.m16n8k{k}` as the PTX ISA defines it: D = A · B + C from the lanes' registers
    /// (register `r` holds elements 2r (low half) and 2r + 1).
    fn ptx_mma(k: usize, acc: &mut [[f32; 4]; LANES], a: &[Vec<Word>], b: &[Vec<Word>]) {
        let mut am = [[f32::NAN; 16]; 16];
        let mut bm = [[f32::NAN; 8]; 16];
        let mut cm = [[f32::NAN; 8]; 16];
        for lane in 0..LANES {
            for v in 0..k / 2 {
                let (m, kk) = ptx_a(k, lane, v);
                assert!(am[m][kk].is_nan(), "A({m}, {kk}) held twice");
                am[m][kk] = a[lane][v / 2][v % 2];
            }
            for v in 0..k / 4 {
                let (kk, n) = ptx_b(k, lane, v);
                assert!(bm[kk][n].is_nan(), "B({kk}, {n}) held twice");
                bm[kk][n] = b[lane][v / 2][v % 2];
            }
            for (v, &c) in acc[lane].iter().enumerate() {
                let (m, n) = ptx_c(lane, v);
                cm[m][n] = c;
            }
        }
        for (m, row) in cm.iter_mut().enumerate() {
            for (n, c) in row.iter_mut().enumerate() {
                *c += (0..k).map(|kk| am[m][kk] * bm[kk][n]).sum::<f32>();
            }
        }
        for (lane, lane_acc) in acc.iter_mut().enumerate() {
            for (v, c) in lane_acc.iter_mut().enumerate() {
                let (m, n) = ptx_c(lane, v);
                *c = cm[m][n];
            }
        }
    }

    fn word(tile: &Tile, (row, col): (usize, usize)) -> Word {
        assert_eq!(col % 2, 0, "a fragment word starts at an even column");
        [tile[row][col], tile[row][col + 1]]
    }

    /// nf4_mma for `out [m, n]` from `x [m, k]` and a dense W (`[n, k]` forward, `[k, n]`
    /// backward), with the k16 (bf16) or two-k8 (fp16) mma schedule. Unwritten outputs stay
    /// NaN; tile padding and unstaged shared memory are NaN, so reading them shows.
    fn emulate_nf4_mma(
        backward: bool,
        k16: bool,
        (m, n, k): (usize, usize, usize),
        x: &[f32],
        w: &[f32],
    ) -> Vec<f32> {
        let (w_rows, w_cols) = if backward { (k, n) } else { (n, k) };
        assert_eq!(w_cols % NF4_GROUP, 0);
        let mut out = vec![f32::NAN; m * n];
        for m0 in (0..m).step_by(NF4_MMA_TILE) {
            for n0 in (0..n).step_by(NF4_MMA_TILE) {
                let mut acc = vec![[[[0f32; 4]; LANES]; 4 * 2]; WARPS];
                for k0 in (0..k).step_by(NF4_MMA_K_TILE) {
                    let mut a_s: Tile = vec![[f32::NAN; NF4_MMA_STRIDE]; NF4_MMA_TILE];
                    let mut b_s: Tile = a_s.clone();
                    for tid in 0..NF4_MMA_THREADS as usize {
                        for r in 0..NF4_MMA_TILE * NF4_MMA_K_TILE / 4 / NF4_MMA_THREADS as usize {
                            let (row, col) = kernel_x_element(tid, r);
                            for q in 0..4 {
                                let (mm, kk) = (m0 + row, k0 + col + q);
                                a_s[row][col + q] = if mm < m && kk < k {
                                    x[mm * k + kk]
                                } else {
                                    0.0
                                };
                            }
                        }
                        for r in 0..2 {
                            let (row, col) = kernel_w_group(backward, tid, r);
                            let (wr, wc) = if backward {
                                (k0 + row, n0 + col)
                            } else {
                                (n0 + row, k0 + col)
                            };
                            for j in 0..NF4_GROUP {
                                let v = if wr < w_rows && wc < w_cols {
                                    w[wr * w_cols + wc + j]
                                } else {
                                    0.0
                                };
                                if backward {
                                    b_s[col + j][row] = v;
                                } else {
                                    b_s[row][col + j] = v;
                                }
                            }
                        }
                    }
                    for (warp, warp_acc) in acc.iter_mut().enumerate() {
                        for kk in (0..NF4_MMA_K_TILE).step_by(16) {
                            for (tile, lanes_acc) in warp_acc.iter_mut().enumerate() {
                                let (i, j) = (tile / 4, tile % 4);
                                let a: Vec<Vec<Word>> = (0..LANES)
                                    .map(|l| {
                                        (0..4)
                                            .map(|reg| {
                                                word(&a_s, kernel_a_word(warp, l, i, kk, reg))
                                            })
                                            .collect()
                                    })
                                    .collect();
                                let b: Vec<Vec<Word>> = (0..LANES)
                                    .map(|l| {
                                        (0..2)
                                            .map(|reg| {
                                                word(&b_s, kernel_b_word(warp, l, j, kk, reg))
                                            })
                                            .collect()
                                    })
                                    .collect();
                                if k16 {
                                    ptx_mma(16, lanes_acc, &a, &b);
                                } else {
                                    for half in 0..2 {
                                        let a_half: Vec<Vec<Word>> = a
                                            .iter()
                                            .map(|r| r[2 * half..2 * half + 2].to_vec())
                                            .collect();
                                        let b_half: Vec<Vec<Word>> =
                                            b.iter().map(|r| vec![r[half]]).collect();
                                        ptx_mma(8, lanes_acc, &a_half, &b_half);
                                    }
                                }
                            }
                        }
                    }
                }
                for (warp, warp_acc) in acc.iter().enumerate() {
                    for (tile, lanes_acc) in warp_acc.iter().enumerate() {
                        for (lane, values) in lanes_acc.iter().enumerate() {
                            for (c, &value) in values.iter().enumerate() {
                                let (row, col) =
                                    kernel_c_element(warp, lane, tile / 4, tile % 4, c);
                                let (mm, nn) = (m0 + row, n0 + col);
                                if mm < m && nn < n {
                                    assert!(
                                        out[mm * n + nn].is_nan(),
                                        "out[{mm}, {nn}] written twice"
                                    );
                                    out[mm * n + nn] = value;
                                }
                            }
                        }
                    }
                }
            }
        }
        out
    }

    #[test]
    fn emulated_mma_index_maps_reproduce_both_products_with_edge_tiles() {
        let mut rng = Rng::new(6);
        // Rows, output columns and reduction all end in partial tiles; the backward's
        // reduction (out_features) is not even a multiple of 4.
        for (backward, shape) in [
            (false, (70, 72, 80)),
            (false, (5, 16, 16)),
            (true, (70, 80, 67)),
            (true, (1, 16, 3)),
        ] {
            let (m, n, k) = shape;
            let x: Vec<f32> = (0..m * k).map(|_| rng.normal() as f32).collect();
            let w: Vec<f32> = (0..n * k).map(|_| rng.normal() as f32).collect();
            let reference: Vec<f32> = (0..m * n)
                .map(|e| {
                    let (r, c) = (e / n, e % n);
                    (0..k)
                        .map(|kk| {
                            let b = if backward {
                                w[kk * n + c]
                            } else {
                                w[c * k + kk]
                            };
                            x[r * k + kk] as f64 * b as f64
                        })
                        .sum::<f64>() as f32
                })
                .collect();
            for k16 in [true, false] {
                let out = emulate_nf4_mma(backward, k16, shape, &x, &w);
                for (e, (&o, &r)) in out.iter().zip(&reference).enumerate() {
                    assert!(
                        (o - r).abs() <= 1e-4 * (1.0 + r.abs()),
                        "backward={backward} k16={k16} {shape:?}: out[{}, {}] = {o}, expected {r}",
                        e / n,
                        e % n
                    );
                }
            }
        }
    }

    #[test]
    fn mma_fragment_loads_and_transposed_stores_hit_32_distinct_banks() {
        let bank = |(row, col): (usize, usize)| (row * NF4_MMA_STRIDE + col) / 2 % 32;
        let distinct = |banks: Vec<usize>| {
            let mut sorted = banks.clone();
            sorted.sort_unstable();
            sorted.dedup();
            sorted.len() == banks.len()
        };
        for warp in 0..WARPS {
            for kk in (0..NF4_MMA_K_TILE).step_by(16) {
                for reg in 0..4 {
                    let banks = (0..LANES)
                        .map(|l| bank(kernel_a_word(warp, l, 1, kk, reg)))
                        .collect();
                    assert!(distinct(banks), "A register {reg} at k {kk}");
                }
                for reg in 0..2 {
                    let banks = (0..LANES)
                        .map(|l| bank(kernel_b_word(warp, l, 3, kk, reg)))
                        .collect();
                    assert!(distinct(banks), "B register {reg} at k {kk}");
                }
            }
            // the backward's transposed W store: word (n + j, k) for each lane's (k, n)
            for j in 0..NF4_GROUP {
                let banks = (0..LANES)
                    .map(|l| {
                        let (row, col) = kernel_w_group(true, warp * LANES + l, 0);
                        bank((col + j, row))
                    })
                    .collect();
                assert!(distinct(banks), "transposed store {j}");
            }
        }
    }
}
