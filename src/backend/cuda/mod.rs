//! The CUDA backend: every op of [`Backend`] as a launch of a hand-written kernel from
//! `kernels/*.cu`, on one stream of one device. Buffers are f32, or the card's 16-bit type for
//! activations ([`Backend::zeros_half`]: f16 on sm_75, bf16 on sm_80+); the ops that take
//! activations read and write either (kernels/storage.cuh's `Tensor`), the others need f32.
//!
//! Place in the data flow: the same as `backend::cpu` — `model::decoder` calls these ops and
//! never knows which device runs them; `selftest` checks each against the CPU reference.
//!
//! Parts: [`device`] (what the user names: `cpu|cuda|cuda:N`, `VERDICT_KERNELS`), [`pool`]
//! (caching allocator with a high-water mark), `driver` (cudarc: context, stream, memory,
//! modules from the embedded images or NVRTC, launches), [`kernels`] (the modules build.rs
//! embeds), [`launch`] (launch shapes and argument checks every family shares), and one file
//! per op family, named as its `kernels/<family>.cu`: [`activation`], [`attention`],
//! [`elementwise`], [`embedding`], [`gemm`], [`nf4`], [`rmsnorm`], [`rope`] (launchers, launch
//! shapes, the constants mirrored from the .cu), plus [`loss`] (no kernel: on the host) and
//! [`lora`] (the fused LoRA ops, launches of gemm.cu's and nf4.cu's kernels).
//!
//! Errors: the trait's ops return no `Result`, so the backend is *sticky*: the first error (a
//! shape the op cannot take, an out-of-memory naming the setting to lower, a driver error
//! naming the op) is stored, every later op does nothing, buffers made after it are empty,
//! downloads after it are all NaN, and [`Backend::check`] returns it. Callers check after each
//! forward (or layer): `model.classify(&cuda, &batch); cuda.check()?`. Nothing panics.
//! Asynchronous kernel faults surface at the next download or [`Backend::check`], which
//! synchronises.

pub mod activation;
pub mod adamw;
pub mod attention;
pub mod device;
mod driver;
pub mod elementwise;
pub mod embedding;
pub mod emu;
pub mod gemm;
pub mod kernels;
pub mod launch;
pub mod lora;
pub mod loss;
pub mod nf4;
pub mod pool;
pub mod rmsnorm;
pub mod rope;
pub mod saved;

pub use device::{Device, KernelSource, KERNELS_ENV};
pub use driver::{
    compile_nvrtc, nvrtc_available, nvrtc_version, probe, DeviceInfo, ModuleReport, Probe,
};

use super::{
    Activation, AdamWStep, AttentionParams, Backend, BackendInfo, LoraAdapter, MemoryByUse,
    MemoryReport, MemoryScope, MemoryUse, NoHalf, NormStyle, Store, Weight, WeightData,
};
use crate::model::weights::Dtype;
use crate::quant::nf4::{Absmax, Nf4Weight, NESTED_BLOCKSIZE};
use anyhow::{anyhow, Result};
use attention::FlashBackward;
use driver::{DeviceBlock, Gpu};
use gemm::GemmKernel;
use nf4::{MmaOperands, Nf4Kernel, Nf4Product};
use pool::PoolStats;
use std::sync::Mutex;

/// A device array of f32, or of f16 / bf16 (activations: [`Backend::zeros_half`]).
pub struct CudaBuf {
    block: DeviceBlock,
    len: usize,
    dtype: Dtype,
}

impl CudaBuf {
    /// Number of values.
    pub fn len(&self) -> usize {
        self.len
    }

    /// The element type.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// Bytes of device memory the values take.
    pub fn bytes(&self) -> usize {
        self.len * self.dtype.size()
    }

    /// The element type's code in kernel arguments (kernels/storage.cuh's `DTYPE_*`): an
    /// activation argument is the pair `ptr(), dtype_code()`.
    pub(super) fn dtype_code(&self) -> u32 {
        dtype_code(self.dtype)
    }

    /// Whether the buffer holds no values.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn ptr(&self) -> u64 {
        self.block.ptr()
    }

    /// The device address, for libraries outside the op set (the cuBLAS reference of
    /// `verdict bench`).
    pub fn device_ptr(&self) -> u64 {
        self.ptr()
    }
}

/// Device memory of any element type, for code outside the op set that hands raw device
/// pointers to another library (the bf16 operands of `verdict bench`'s cuBLAS reference).
pub struct RawBuf {
    block: DeviceBlock,
}

impl RawBuf {
    /// The device address.
    pub fn device_ptr(&self) -> u64 {
        self.block.ptr()
    }
}

/// An activation kept for the backward in the card's 16-bit type, with one power-of-two scale
/// per row (kernels/saved.cu).
pub struct CudaKept {
    bits: DeviceBlock,
    scales: DeviceBlock,
    rows: usize,
    dim: usize,
    operands: MmaOperands,
}

/// An NF4 weight on the device: packed nibbles and its absmax tables, as bitsandbytes
/// stores them (kernels/nf4.cu multiplies with them directly, or dequantizes them).
pub struct CudaNf4 {
    rows: usize,
    cols: usize,
    blocksize: usize,
    packed: DeviceBlock,
    absmax: CudaAbsmax,
}

enum CudaAbsmax {
    F32(DeviceBlock),
    Double {
        codes: DeviceBlock,
        nested_code: DeviceBlock,
        nested_absmax: DeviceBlock,
        offset: f32,
    },
}

/// The CUDA backend on one device.
pub struct Cuda {
    gpu: Gpu,
    error: Mutex<Option<anyhow::Error>>,
    /// How `attention_backward` computes dq ([`attention::DETERMINISTIC_ENV`]).
    attention_backward: FlashBackward,
    /// The kernel of the dense products (`linear` with an f32 weight, `linear_backward`,
    /// `linear_weight_grad`, the LoRA factors): tensor cores with the card's operand type
    /// ([`GemmKernel::for_arch`]) unless [`Cuda::set_dense_products`] says otherwise.
    dense_products: GemmKernel,
}

impl Cuda {
    /// Opens CUDA device `ordinal`, with kernels from where `VERDICT_KERNELS` says.
    pub fn new(ordinal: usize) -> Result<Cuda> {
        Cuda::with_kernel_source(ordinal, KernelSource::from_env()?)
    }

    /// Opens CUDA device `ordinal` with kernels from `source`.
    pub fn with_kernel_source(ordinal: usize, source: KernelSource) -> Result<Cuda> {
        Cuda::on(Gpu::open(ordinal, source)?)
    }

    fn on(gpu: Gpu) -> Result<Cuda> {
        let dense_products = GemmKernel::for_arch(gpu.info().compute_capability);
        Ok(Cuda {
            gpu,
            error: Mutex::new(None),
            attention_backward: FlashBackward::from_env()?,
            dense_products,
        })
    }

    /// Opens emulated device `index` of `arch` with `memory_bytes` of device memory: the same
    /// backend, with the kernels run on the CPU and every access checked (see `emu`).
    /// `kernel_library` replaces built-in kernels by those of a shared object (see `emu`).
    pub fn emulated(
        index: usize,
        arch: emu::EmuArch,
        memory_bytes: usize,
        kernel_library: Option<&std::path::Path>,
    ) -> Result<Cuda> {
        Cuda::on(Gpu::open_emulated(
            index,
            arch,
            memory_bytes,
            kernel_library,
        )?)
    }

    /// On an emulated device, the CUDA threads run so far.
    pub fn emulated_threads_run(&self) -> Option<u64> {
        self.gpu.emulated().map(|emu| emu.threads_run())
    }

    /// On an emulated device, how many times each (module, function) was launched: the
    /// coverage of a selftest run.
    pub fn emulated_launch_counts(
        &self,
    ) -> Option<std::collections::BTreeMap<(String, String), u64>> {
        self.gpu.emulated().map(|emu| emu.launch_counts())
    }

    /// The device.
    pub fn info(&self) -> &DeviceInfo {
        self.gpu.info()
    }

    /// The memory pool's numbers (in use, cached, high-water marks).
    pub fn pool_stats(&self) -> PoolStats {
        self.gpu.pool_stats()
    }

    /// How each kernel module used so far was loaded (which prebuilt image, or NVRTC and why).
    pub fn module_reports(&self) -> Vec<ModuleReport> {
        self.gpu.module_reports()
    }

    /// The NF4 weight dequantized to a dense f32 `[rows, cols]` buffer (kernels/nf4.cu).
    pub fn nf4_dequantize(&self, w: &CudaNf4) -> CudaBuf {
        let len = w.rows * w.cols;
        let block = self.attempt("nf4_dequantize", |gpu| nf4::nf4_dequantize(gpu, w));
        CudaBuf {
            block: block.unwrap_or_else(DeviceBlock::empty),
            len,
            dtype: Dtype::F32,
        }
    }

    /// An NF4 product computed by `kernel`: `out (=|+= s·) A · Wᵀ` for
    /// [`Nf4Product::Forward`] (what `linear` computes) or `A · W` for
    /// [`Nf4Product::Backward`] (`linear_backward`), `rows` rows of `a`. The selftest and
    /// benchmarks run every kernel through this; the [`Backend`] ops pick one with
    /// [`Nf4Kernel::choose`].
    #[allow(clippy::too_many_arguments)]
    pub fn nf4_product(
        &self,
        product: Nf4Product,
        out: &mut CudaBuf,
        a: &CudaBuf,
        w: &CudaNf4,
        rows: usize,
        store: Store,
        kernel: Nf4Kernel,
    ) {
        self.attempt("nf4_product", |gpu| {
            nf4::nf4_product(
                gpu,
                "nf4_product",
                product,
                out,
                a,
                w,
                rows,
                store,
                kernel,
                None,
            )
        });
    }

    /// The kernel of the dense products from now on (the selftest and benchmarks run each
    /// of [`GemmKernel::applicable`]; the default is [`GemmKernel::for_arch`]).
    pub fn set_dense_products(&mut self, kernel: GemmKernel) {
        self.dense_products = kernel;
    }

    /// The attention forward with `operands` (the [`Backend`] op uses the card's own type;
    /// the selftest runs both on sm_80+).
    #[allow(clippy::too_many_arguments)]
    pub fn flash_attention(
        &self,
        out: &mut CudaBuf,
        lse: &mut CudaBuf,
        q: &CudaBuf,
        k: &CudaBuf,
        v: &CudaBuf,
        cu_seqlens: &[usize],
        params: &AttentionParams,
        operands: MmaOperands,
    ) {
        self.attempt("attention", |gpu| {
            attention::attention(gpu, out, lse, q, k, v, cu_seqlens, params, operands)
        });
    }

    /// The attention backward with `operands` and `variant`: `[dq, dk, dv]` from
    /// `[dout, out, lse, q, k, v]` (see [`Backend::attention_backward`]).
    pub fn flash_attention_backward(
        &self,
        [dq, dk, dv]: [&mut CudaBuf; 3],
        [dout, out, lse, q, k, v]: [&CudaBuf; 6],
        cu_seqlens: &[usize],
        params: &AttentionParams,
        operands: MmaOperands,
        variant: FlashBackward,
    ) {
        self.attempt("attention_backward", |gpu| {
            attention::attention_backward(
                gpu, dq, dk, dv, dout, out, lse, q, k, v, cu_seqlens, params, operands, variant,
            )
        });
    }

    /// How `attention_backward` computes dq: atomic unless `VERDICT_DETERMINISTIC=1` was set
    /// when the backend opened, or this overrides it.
    pub fn set_attention_backward(&mut self, variant: FlashBackward) {
        self.attention_backward = variant;
    }

    /// A new device block holding `host`, of any element type.
    pub fn upload_raw<T: Copy>(&self, host: &[T]) -> Result<RawBuf> {
        self.check_not_failed()?;
        Ok(RawBuf {
            block: self.gpu.upload("upload_raw", host)?,
        })
    }

    /// Makes this device's context current on the calling thread, for libraries that use the
    /// thread's context (cuBLAS).
    pub fn make_current(&self) -> Result<()> {
        self.gpu.make_current()
    }

    /// The stream every op runs on, as a raw `CUstream` (cuBLAS's `cudaStream_t`).
    pub fn raw_stream(&self) -> *mut std::ffi::c_void {
        self.gpu.raw_stream()
    }

    /// Device time of each of `reps` calls of `f` in milliseconds, by events recorded between
    /// the calls and read after one wait (see `driver::Gpu::time_each`). `f(i)` queues work on
    /// this backend's stream: ops, or another library's calls on [`Cuda::raw_stream`]. Any
    /// op error, the sticky ones included, fails the whole measurement.
    pub fn time_each(&self, reps: usize, f: impl FnMut(usize) -> Result<()>) -> Result<Vec<f32>> {
        self.check_not_failed()?;
        let times = self.gpu.time_each(reps, f);
        self.check()?;
        times
    }

    /// The stored error, without waiting for queued work.
    fn check_not_failed(&self) -> Result<()> {
        match self.first_error() {
            Some(message) => Err(anyhow!("{message}")),
            None => Ok(()),
        }
    }

    fn first_error(&self) -> Option<String> {
        let error = self.error.lock().unwrap_or_else(|p| p.into_inner());
        error.as_ref().map(|e| format!("{e:#}"))
    }

    fn failed(&self) -> bool {
        self.error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    fn record(&self, e: anyhow::Error) {
        let mut error = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if error.is_none() {
            *error = Some(e.context(format!("CUDA backend on {}", self.gpu.info().device)));
        }
    }

    /// Runs `f` unless an earlier op failed; stores its error. `None` when it did not run or
    /// failed.
    fn attempt<T>(&self, op: &str, f: impl FnOnce(&Gpu) -> Result<T>) -> Option<T> {
        if self.failed() {
            return None;
        }
        match f(&self.gpu) {
            Ok(value) => Some(value),
            Err(e) => {
                self.record(e.context(op.to_string()));
                None
            }
        }
    }

    /// A buffer of `len` f32 values from `f`'s block, or an empty one after a failure.
    fn buffer(&self, op: &str, len: usize, f: impl FnOnce(&Gpu) -> Result<DeviceBlock>) -> CudaBuf {
        self.typed_buffer(op, len, Dtype::F32, f)
    }

    /// A buffer of `len` values of `dtype` from `f`'s block, or an empty one after a failure.
    fn typed_buffer(
        &self,
        op: &str,
        len: usize,
        dtype: Dtype,
        f: impl FnOnce(&Gpu) -> Result<DeviceBlock>,
    ) -> CudaBuf {
        CudaBuf {
            block: self.attempt(op, f).unwrap_or_else(DeviceBlock::empty),
            len,
            dtype,
        }
    }

    /// A new buffer of `len` zeros of `dtype`.
    fn typed_zeros(&self, op: &str, len: usize, dtype: Dtype) -> CudaBuf {
        let bytes = len * dtype.size();
        self.typed_buffer(op, len, dtype, |gpu| {
            let block = gpu.alloc(op, bytes)?;
            gpu.zero(op, &block, bytes)?;
            Ok(block)
        })
    }

    /// The card's 16-bit activation type (DESIGN §5): the tensor cores' operand type, bf16 on
    /// sm_80+, f16 on sm_75.
    pub fn half_dtype(&self) -> Dtype {
        match MmaOperands::for_arch(self.info().compute_capability) {
            MmaOperands::Bf16 => Dtype::BF16,
            MmaOperands::F16 => Dtype::F16,
        }
    }

    /// `host` rounded to `dtype` (to nearest even) in a new device buffer: 16-bit embedding
    /// tables ([`Backend::upload_half`]) and the selftest's 16-bit activations.
    pub fn upload_as(&self, host: &[f32], dtype: Dtype) -> CudaBuf {
        self.typed_buffer("upload_as", host.len(), dtype, |gpu| match dtype {
            Dtype::F32 => gpu.upload("upload_as", host),
            Dtype::F16 => {
                let bits: Vec<u16> = host
                    .iter()
                    .map(|&v| half::f16::from_f32(v).to_bits())
                    .collect();
                gpu.upload("upload_as", &bits)
            }
            Dtype::BF16 => {
                let bits: Vec<u16> = host
                    .iter()
                    .map(|&v| half::bf16::from_f32(v).to_bits())
                    .collect();
                gpu.upload("upload_as", &bits)
            }
        })
    }
}

/// Whether [`Backend::upload_half`] stores `values` as bf16 (some finite |x| beyond f16's
/// largest, 65504) rather than f16 (see `Backend::upload_half` for [`Cuda`]).
pub fn half_is_bf16(values: &[f32]) -> bool {
    values
        .iter()
        .any(|v| v.is_finite() && v.abs() > half::f16::MAX.to_f32())
}

/// The f32 size of `len` values.
fn f32_bytes(len: usize) -> usize {
    len * std::mem::size_of::<f32>()
}

/// `dtype`'s code in kernel arguments (kernels/storage.cuh's `DTYPE_*`).
fn dtype_code(dtype: Dtype) -> u32 {
    match dtype {
        Dtype::F32 => 0,
        Dtype::F16 => 1,
        Dtype::BF16 => 2,
    }
}

impl Backend for Cuda {
    type Buf = CudaBuf;
    type Nf4 = CudaNf4;
    type Half = CudaBuf;
    type Bf16 = NoHalf;
    type Kept = CudaKept;

    /// The first error any op met (see the module comment), after waiting for queued work so
    /// that asynchronous kernel faults are caught too. Once failed, always failed.
    fn check(&self) -> Result<()> {
        if self.first_error().is_none() {
            if let Err(e) = self.gpu.synchronize("check") {
                self.record(e);
            }
        }
        match self.first_error() {
            Some(message) => Err(anyhow!("{message}")),
            None => Ok(()),
        }
    }

    fn describe(&self) -> BackendInfo {
        let info = self.info();
        BackendInfo {
            device: info.device.clone(),
            name: info.name.clone(),
            peak_reserved_bytes: Some(self.pool_stats().peak_reserved_bytes),
        }
    }

    fn memory_scope(&self, use_: MemoryUse) -> MemoryScope<'_> {
        self.gpu.memory_scope(use_)
    }

    fn memory_report(&self) -> Option<MemoryReport> {
        let (stats, usage) = self.gpu.pool_usage();
        Some(MemoryReport {
            peak_in_use_bytes: stats.peak_in_use_bytes,
            peak_reserved_bytes: stats.peak_reserved_bytes,
            at_peak: MemoryByUse::from_indexed(&usage.at_peak),
            values_computed: self.computes_values(),
        })
    }

    fn computes_values(&self) -> bool {
        !self.gpu.alloc_only()
    }

    /// sm_75: the NF4 backward rounds dY to f16 ([`MmaOperands::for_arch`]).
    fn gradients_in_f16(&self) -> bool {
        MmaOperands::for_arch(self.info().compute_capability) == MmaOperands::F16
    }

    fn upload(&self, host: &[f32]) -> CudaBuf {
        self.buffer("upload", host.len(), |gpu| gpu.upload("upload", host))
    }

    fn upload_nf4(&self, weight: Nf4Weight) -> CudaNf4 {
        let uploaded = self.attempt("upload_nf4", |gpu| {
            let op = "upload_nf4";
            anyhow::ensure!(
                weight.blocksize().is_power_of_two() && weight.blocksize() >= 16,
                "NF4 blocksize {} is not a power of two >= 16 (kernels/nf4.cu needs one)",
                weight.blocksize()
            );
            let absmax = match weight.absmax() {
                Absmax::F32(values) => CudaAbsmax::F32(gpu.upload(op, values)?),
                Absmax::Double {
                    codes,
                    nested_absmax,
                    nested_code,
                    offset,
                    nested_blocksize,
                } => {
                    anyhow::ensure!(
                        *nested_blocksize == NESTED_BLOCKSIZE,
                        "nested absmax blocks of {nested_blocksize}: kernels/nf4.cu handles \
                         {NESTED_BLOCKSIZE} only"
                    );
                    CudaAbsmax::Double {
                        codes: gpu.upload(op, codes)?,
                        nested_code: gpu.upload(op, &nested_code[..])?,
                        nested_absmax: gpu.upload(op, nested_absmax)?,
                        offset: *offset,
                    }
                }
            };
            Ok(CudaNf4 {
                rows: weight.rows(),
                cols: weight.cols(),
                blocksize: weight.blocksize(),
                packed: gpu.upload(op, weight.packed())?,
                absmax,
            })
        });
        uploaded.unwrap_or_else(|| CudaNf4 {
            rows: weight.rows(),
            cols: weight.cols(),
            blocksize: weight.blocksize(),
            packed: DeviceBlock::empty(),
            absmax: CudaAbsmax::F32(DeviceBlock::empty()),
        })
    }

    /// An embedding table (or any array) in a 16-bit type: f16 when every value is within
    /// f16's range, else bf16 ([`half_is_bf16`]). Read by the embedding op only
    /// (kernels/embedding.cu's `gather_rows_scaled_f16|bf16`), never by a tensor-core product,
    /// so the type is chosen for precision, not by the device: f16 holds every bf16 value of
    /// its normal range exactly (a bf16 checkpoint's table loses nothing) and an f32 one 8
    /// times finer than bf16 (measured on the fixtures: `llama_seqcls --quant nf4` logits
    /// 1.5e-2 from the CPU's with a bf16 table, within the usual NF4 error with f16); bf16
    /// only where f16 would overflow.
    fn upload_half(&self, host: &[f32]) -> Option<CudaBuf> {
        let dtype = match half_is_bf16(host) {
            true => Dtype::BF16,
            false => Dtype::F16,
        };
        Some(self.upload_as(host, dtype))
    }

    fn keep(&self, x: &CudaBuf, dim: usize) -> CudaKept {
        let operands = MmaOperands::for_arch(self.info().compute_capability);
        self.attempt("keep", |gpu| saved::keep(gpu, x, dim, operands))
            .unwrap_or_else(|| CudaKept {
                bits: DeviceBlock::empty(),
                scales: DeviceBlock::empty(),
                rows: 0,
                dim,
                operands,
            })
    }

    fn restore(&self, kept: &CudaKept) -> CudaBuf {
        self.buffer("restore", kept.rows * kept.dim, |gpu| {
            saved::restore(gpu, kept)
        })
    }

    fn zeros(&self, len: usize) -> CudaBuf {
        self.typed_zeros("zeros", len, Dtype::F32)
    }

    fn zeros_half(&self, len: usize) -> Option<CudaBuf> {
        Some(self.typed_zeros("zeros_half", len, self.half_dtype()))
    }

    /// Widens 16-bit buffers exactly.
    fn download(&self, buf: &CudaBuf) -> Vec<f32> {
        self.attempt("download", |gpu| {
            let op = "download";
            Ok(match buf.dtype {
                Dtype::F32 => gpu.download::<f32>(op, &buf.block, buf.len)?,
                Dtype::F16 => gpu
                    .download::<u16>(op, &buf.block, buf.len)?
                    .into_iter()
                    .map(|b| half::f16::from_bits(b).to_f32())
                    .collect(),
                Dtype::BF16 => gpu
                    .download::<u16>(op, &buf.block, buf.len)?
                    .into_iter()
                    .map(|b| half::bf16::from_bits(b).to_f32())
                    .collect(),
            })
        })
        .unwrap_or_else(|| vec![f32::NAN; buf.len])
    }

    fn copy(&self, buf: &CudaBuf) -> CudaBuf {
        self.typed_buffer("copy", buf.len, buf.dtype, |gpu| {
            gpu.duplicate("copy", &buf.block, buf.bytes())
        })
    }

    fn embedding(
        &self,
        out: &mut CudaBuf,
        table: &WeightData<Self>,
        ids: &[u32],
        dim: usize,
        scale: f32,
    ) {
        self.attempt("embedding", |gpu| {
            embedding::embedding(gpu, out, table, ids, dim, scale)
        });
    }

    fn rmsnorm(
        &self,
        out: &mut CudaBuf,
        x: &CudaBuf,
        w: &CudaBuf,
        dim: usize,
        eps: f32,
        style: NormStyle,
    ) {
        self.attempt("rmsnorm", |gpu| {
            rmsnorm::rmsnorm(gpu, out, x, w, dim, eps, style)
        });
    }

    fn linear(&self, out: &mut CudaBuf, x: &CudaBuf, w: &Weight<Self>, rows: usize, store: Store) {
        self.attempt("linear", |gpu| {
            let (product, dense) = (Nf4Product::Forward, self.dense_products);
            gemm::linear_product(gpu, "linear", product, out, x, w, rows, store, dense)
        });
    }

    fn rope(
        &self,
        x: &mut CudaBuf,
        positions: &[u32],
        inv_freq: &[f32],
        heads: usize,
        head_dim: usize,
    ) {
        self.attempt("rope", |gpu| {
            rope::rope(gpu, "rope", x, positions, inv_freq, heads, head_dim, 1.0)
        });
    }

    fn attention(
        &self,
        out: &mut CudaBuf,
        lse: &mut CudaBuf,
        q: &CudaBuf,
        k: &CudaBuf,
        v: &CudaBuf,
        cu_seqlens: &[usize],
        params: &AttentionParams,
    ) {
        let _scope = self.memory_scope(MemoryUse::Attention);
        let operands = MmaOperands::for_arch(self.info().compute_capability);
        self.flash_attention(out, lse, q, k, v, cu_seqlens, params, operands);
    }

    fn gated_activation(&self, out: &mut CudaBuf, gate: &CudaBuf, up: &CudaBuf, act: Activation) {
        self.attempt("gated_activation", |gpu| {
            activation::gated_activation(gpu, out, gate, up, act)
        });
    }

    fn add(&self, acc: &mut CudaBuf, x: &CudaBuf) {
        self.attempt("add", |gpu| elementwise::add(gpu, acc, x));
    }

    fn softcap(&self, x: &mut CudaBuf, cap: f32) {
        self.attempt("softcap", |gpu| elementwise::softcap(gpu, x, cap));
    }

    fn gather_rows(&self, out: &mut CudaBuf, x: &CudaBuf, rows: &[usize], dim: usize) {
        self.attempt("gather_rows", |gpu| {
            embedding::gather_rows(gpu, out, x, rows, dim)
        });
    }

    fn rmsnorm_backward(
        &self,
        dx: &mut CudaBuf,
        dy: &CudaBuf,
        x: &CudaBuf,
        w: &CudaBuf,
        dim: usize,
        eps: f32,
        style: NormStyle,
        store: Store,
    ) {
        self.attempt("rmsnorm_backward", |gpu| {
            rmsnorm::rmsnorm_backward(gpu, dx, dy, x, w, dim, eps, style, store)
        });
    }

    fn linear_backward(
        &self,
        dx: &mut CudaBuf,
        dy: &CudaBuf,
        w: &Weight<Self>,
        rows: usize,
        store: Store,
    ) {
        self.attempt("linear_backward", |gpu| {
            let (product, dense) = (Nf4Product::Backward, self.dense_products);
            gemm::linear_product(
                gpu,
                "linear_backward",
                product,
                dx,
                dy,
                w,
                rows,
                store,
                dense,
            )
        });
    }

    fn linear_weight_grad(
        &self,
        dw: &mut CudaBuf,
        dy: &CudaBuf,
        x: &CudaBuf,
        rows: usize,
        in_features: usize,
        out_features: usize,
        scale: f32,
    ) {
        self.attempt("linear_weight_grad", |gpu| {
            let shape = (rows, in_features, out_features);
            let kernel = self.dense_products;
            gemm::weight_grad(
                gpu,
                "linear_weight_grad",
                kernel,
                dw,
                dy,
                x,
                shape,
                scale,
                None,
            )
        });
    }

    fn lora_linear(
        &self,
        out: &mut CudaBuf,
        x: &CudaBuf,
        w: &Weight<Self>,
        lora: &LoraAdapter<Self>,
        rows: usize,
    ) {
        self.attempt("lora_linear", |gpu| {
            lora::forward(gpu, out, x, w, lora, rows)
        });
    }

    fn lora_linear_backward(
        &self,
        dx: &mut CudaBuf,
        dy: &CudaBuf,
        x: &CudaBuf,
        w: &Weight<Self>,
        lora: &LoraAdapter<Self>,
        rows: usize,
        store: Store,
        [da, db]: [&mut CudaBuf; 2],
    ) {
        self.attempt("lora_linear_backward", |gpu| {
            lora::backward(gpu, dx, dy, x, w, lora, rows, store, [da, db])
        });
    }

    fn rope_backward(
        &self,
        dx: &mut CudaBuf,
        positions: &[u32],
        inv_freq: &[f32],
        heads: usize,
        head_dim: usize,
    ) {
        self.attempt("rope_backward", |gpu| {
            rope::rope(
                gpu,
                "rope_backward",
                dx,
                positions,
                inv_freq,
                heads,
                head_dim,
                -1.0,
            )
        });
    }

    fn attention_backward(
        &self,
        dq: &mut CudaBuf,
        dk: &mut CudaBuf,
        dv: &mut CudaBuf,
        dout: &CudaBuf,
        out: &CudaBuf,
        lse: &CudaBuf,
        q: &CudaBuf,
        k: &CudaBuf,
        v: &CudaBuf,
        cu_seqlens: &[usize],
        params: &AttentionParams,
    ) {
        let _scope = self.memory_scope(MemoryUse::Attention);
        let operands = MmaOperands::for_arch(self.info().compute_capability);
        self.flash_attention_backward(
            [dq, dk, dv],
            [dout, out, lse, q, k, v],
            cu_seqlens,
            params,
            operands,
            self.attention_backward,
        );
    }

    fn gated_activation_backward(
        &self,
        dgate: &mut CudaBuf,
        dup: &mut CudaBuf,
        dout: &CudaBuf,
        gate: &CudaBuf,
        up: &CudaBuf,
        act: Activation,
    ) {
        self.attempt("gated_activation_backward", |gpu| {
            activation::gated_activation_backward(gpu, dgate, dup, dout, gate, up, act)
        });
    }

    fn scatter_add_rows(&self, acc: &mut CudaBuf, x: &CudaBuf, rows: &[usize], dim: usize) {
        self.attempt("scatter_add_rows", |gpu| {
            embedding::scatter_add_rows(gpu, acc, x, rows, dim)
        });
    }

    fn dropout(&self, x: &mut CudaBuf, p: f32, seed: u64) {
        self.attempt("dropout", |gpu| elementwise::dropout(gpu, x, p, seed));
    }

    fn adamw(
        &self,
        param: &mut CudaBuf,
        grad: &CudaBuf,
        m: &mut CudaBuf,
        v: &mut CudaBuf,
        step: &AdamWStep,
    ) {
        self.attempt("adamw", |gpu| adamw::adamw(gpu, param, grad, m, v, step));
    }

    /// NaN for every tensor after an error (a NaN norm is an overflow to the caller, which
    /// checks the backend first).
    fn squared_norms(&self, xs: &[&CudaBuf]) -> Vec<f64> {
        self.attempt("squared_norms", |gpu| adamw::squared_norms(gpu, xs))
            .unwrap_or_else(|| vec![f64::NAN; xs.len()])
    }

    /// On the host (see `loss.rs`). Allocation-only: nothing to download, so NaN losses
    /// (callers know the mode: [`Backend::computes_values`]) and `dlogits` as it was.
    fn softmax_cross_entropy(
        &self,
        dlogits: &mut CudaBuf,
        logits: &CudaBuf,
        labels: &[Option<u32>],
        classes: usize,
        smoothing: f32,
        weight: f32,
    ) -> Vec<f32> {
        if !self.computes_values() {
            return vec![f32::NAN; labels.len()];
        }
        let losses = self.attempt("softmax_cross_entropy", |gpu| {
            loss::softmax_cross_entropy(gpu, dlogits, logits, labels, classes, smoothing, weight)
        });
        losses.unwrap_or_else(|| vec![f32::NAN; labels.len()])
    }
}
