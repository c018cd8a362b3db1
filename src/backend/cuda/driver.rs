//! The CUDA driver through cudarc: probing for a device, the context and its one stream,
//! device memory for the pool, kernel modules (embedded images or NVRTC) and launches. Every
//! driver error becomes an anyhow error naming the op it happened in.
//!
//! cudarc is built with `dynamic-loading`: libcuda and libnvrtc are opened on first use, and a
//! missing library makes cudarc panic. [`probe`] therefore checks for the driver library (and
//! catches any such panic) before anything else touches CUDA, and NVRTC is checked for before
//! it is called.

use super::device::KernelSource;
use super::emu::{Arena, EmuArch, EmuDriver, LiveAllocations};
use super::kernels::{self, KernelModule};
use super::launch::LaunchConfig;
use super::pool::{AllocError, Block, DeviceMemory, Pool, PoolStats, UsageByUse};
use crate::backend::{MemoryScope, MemoryUse};
use anyhow::{anyhow, bail, ensure, Context, Result};
use cudarc::driver::{result, sys, CudaContext, CudaStream, DriverError};
use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

/// Whether CUDA can run on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// The driver sees this many devices (at least one).
    Devices(usize),
    /// No usable device, and why.
    Unavailable(String),
}

/// Looks for the CUDA driver and its devices without ever panicking.
pub fn probe() -> Probe {
    let looked = std::panic::catch_unwind(|| {
        // SAFETY: only tries to dlopen the driver library under its usual names.
        if !unsafe { sys::is_culib_present() } {
            return Probe::Unavailable(
                "no CUDA driver library (libcuda.so) on this machine".into(),
            );
        }
        if let Err(e) = result::init() {
            return Probe::Unavailable(format!("the CUDA driver did not start: {}", describe(e)));
        }
        match result::device::get_count() {
            Ok(n) if n > 0 => Probe::Devices(n as usize),
            Ok(_) => Probe::Unavailable("the CUDA driver reports no device".into()),
            Err(e) => Probe::Unavailable(format!("cannot count CUDA devices: {}", describe(e))),
        }
    });
    looked.unwrap_or_else(|_| {
        Probe::Unavailable(
            "the CUDA driver library lacks a function verdict calls (see the panic above)".into(),
        )
    })
}

/// `CUDA_ERROR_NAME: description` of a driver error.
pub fn describe(e: DriverError) -> String {
    let name = e
        .error_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|_| format!("{:?}", e.0));
    let text = e
        .error_string()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!("{name}: {text}")
}

/// A driver error as an error naming the op.
pub fn driver_error(op: &str, e: DriverError) -> anyhow::Error {
    anyhow!("CUDA error in {op}: {}", describe(e))
}

/// What a device is.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeviceInfo {
    /// `cuda:N`.
    pub device: String,
    /// The card's name, e.g. "NVIDIA H100 80GB HBM3".
    pub name: String,
    /// (major, minor), e.g. (9, 0).
    pub compute_capability: (i32, i32),
    /// Device memory in bytes.
    pub total_memory_bytes: usize,
    /// The driver's CUDA version, e.g. 13000 for 13.0.
    pub driver_cuda_version: i32,
    /// Size of the L2 cache in bytes (benchmarks rotate inputs larger than it).
    pub l2_cache_bytes: usize,
}

/// Device memory straight from the driver: the pool's source.
pub struct DriverMemory {
    ctx: Arc<CudaContext>,
}

impl DeviceMemory for DriverMemory {
    fn allocate(&mut self, bytes: usize) -> Result<u64, AllocError> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| AllocError::Driver(driver_error("binding the context", e)))?;
        // SAFETY: a plain allocation in the bound context; the pool owns the pointer.
        match unsafe { result::malloc_sync(bytes) } {
            Ok(ptr) => Ok(ptr),
            Err(e) if e.0 == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY => {
                Err(AllocError::OutOfMemory)
            }
            Err(e) => Err(AllocError::Driver(driver_error("cuMemAlloc", e))),
        }
    }

    fn release(&mut self, ptr: u64, _bytes: usize) {
        // cuMemFree waits for queued work that may still use the block. Errors here (a
        // context already broken by an earlier failure) have been reported by that failure.
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: `ptr` came from `allocate` and the pool releases it once.
            let _ = unsafe { result::free_sync(ptr) };
        }
    }
}

/// Where a device's pool gets memory: the CUDA driver, or an emulated device's arena.
enum Memory {
    Driver(DriverMemory),
    Emu(Arena),
}

impl DeviceMemory for Memory {
    fn allocate(&mut self, bytes: usize) -> Result<u64, AllocError> {
        match self {
            Memory::Driver(m) => m.allocate(bytes),
            Memory::Emu(m) => m.allocate(bytes),
        }
    }

    fn release(&mut self, ptr: u64, bytes: usize) {
        match self {
            Memory::Driver(m) => m.release(ptr, bytes),
            Memory::Emu(m) => m.release(ptr, bytes),
        }
    }
}

/// A device's pool and, on the emulated device, the registry of what the pool handed out at
/// the sizes asked for (what kernel accesses are checked against).
struct Heap {
    pool: Mutex<Pool<Memory>>,
    live: Option<Arc<LiveAllocations>>,
}

type SharedPool = Arc<Heap>;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain bookkeeping behind, still usable.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Device memory from the pool, given back to it when dropped.
pub struct DeviceBlock {
    block: Block,
    pool: Option<SharedPool>,
    /// What it was allocated for (the memory report's split).
    use_: MemoryUse,
}

impl DeviceBlock {
    /// A block of no bytes (address 0), for empty buffers and for buffers of a backend that
    /// has already failed.
    pub fn empty() -> DeviceBlock {
        DeviceBlock {
            block: Block { ptr: 0, bytes: 0 },
            pool: None,
            use_: MemoryUse::Workspace,
        }
    }

    /// The device address.
    pub fn ptr(&self) -> u64 {
        self.block.ptr
    }
}

impl Drop for DeviceBlock {
    fn drop(&mut self) {
        if let Some(heap) = &self.pool {
            if let Some(live) = &heap.live {
                live.remove(self.block.ptr);
            }
            lock(&heap.pool).free_for(self.block, self.use_);
        }
    }
}

/// How one kernel module was obtained.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModuleReport {
    /// The kernel file's stem, e.g. "attention".
    pub name: &'static str,
    /// "prebuilt" (an embedded image) or "nvrtc" (compiled at run time).
    pub source: &'static str,
    /// The embedded image loaded: "sm_80 SASS", or "compute_90 PTX" (JIT-compiled by the
    /// driver).
    pub image: Option<String>,
    /// Why no embedded image was used, when NVRTC stood in for them under `auto`.
    pub prebuilt_error: Option<String>,
    /// Time to compile (NVRTC) and load, in milliseconds.
    pub load_ms: f64,
}

/// A kernel entry point.
#[derive(Clone, Copy)]
struct Function(sys::CUfunction);
// SAFETY: a CUfunction is a driver handle, valid from any thread while its module is loaded
// (modules live as long as the `Gpu`), and the driver API is thread-safe.
unsafe impl Send for Function {}

struct LoadedModule {
    module: sys::CUmodule,
    functions: HashMap<&'static str, Function>,
    report: ModuleReport,
}
// SAFETY: as for `Function`.
unsafe impl Send for LoadedModule {}

/// A kernel argument passed by address, as cuLaunchKernel takes them.
pub trait KernelArg {
    /// The address of the value.
    fn param(&mut self) -> *mut c_void;
}

macro_rules! kernel_arg {
    ($($t:ty),*) => {$(
        impl KernelArg for $t {
            fn param(&mut self) -> *mut c_void {
                self as *mut $t as *mut c_void
            }
        }
    )*};
}
kernel_arg!(u32, u64, f32);

/// One CUDA device in use: its driver, memory pool and description.
pub struct Gpu {
    driver: Driver,
    info: DeviceInfo,
    pool: SharedPool,
    /// The [`MemoryUse`] new blocks are tagged with (see [`Gpu::memory_scope`]).
    current_use: std::sync::atomic::AtomicU8,
}

/// What runs the copies and kernels: a real GPU, or the emulated device.
enum Driver {
    Cuda(CudaDriver),
    Emu(EmuDriver),
}

/// A real device: context, stream and the modules loaded so far.
struct CudaDriver {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    source: KernelSource,
    modules: Mutex<HashMap<&'static str, LoadedModule>>,
}

impl Gpu {
    /// Opens device `ordinal`, taking kernels from `source`.
    pub fn open(ordinal: usize, source: KernelSource) -> Result<Gpu> {
        let count = match probe() {
            Probe::Devices(n) => n,
            Probe::Unavailable(why) => bail!("no CUDA device: {why}"),
        };
        ensure!(
            ordinal < count,
            "cuda:{ordinal} was asked for but the driver sees {count} device(s): cuda:0 to cuda:{}",
            count - 1
        );
        let ctx = CudaContext::new(ordinal).map_err(|e| driver_error("creating the context", e))?;
        let name = ctx
            .name()
            .map_err(|e| driver_error("reading the device name", e))?;
        let compute_capability = ctx
            .compute_capability()
            .map_err(|e| driver_error("reading the compute capability", e))?;
        let (major, minor) = compute_capability;
        ensure!(
            major * 10 + minor >= 75,
            "{name} is sm_{major}{minor}; verdict's kernels need sm_75 (T4) or newer"
        );
        let total_memory_bytes = ctx
            .total_mem()
            .map_err(|e| driver_error("reading the memory size", e))?;
        let l2_cache_bytes =
            ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)
                .map_err(|e| driver_error("reading the L2 cache size", e))? as usize;
        let mut driver_cuda_version = 0;
        // SAFETY: writes one int.
        unsafe { sys::cuDriverGetVersion(&mut driver_cuda_version) }
            .result()
            .map_err(|e| driver_error("reading the driver version", e))?;
        let stream = ctx
            .new_stream()
            .map_err(|e| driver_error("creating the stream", e))?;
        let pool = Arc::new(Heap {
            pool: Mutex::new(Pool::new(Memory::Driver(DriverMemory { ctx: ctx.clone() }))),
            live: None,
        });
        Ok(Gpu {
            info: DeviceInfo {
                device: format!("cuda:{ordinal}"),
                name,
                compute_capability,
                total_memory_bytes,
                driver_cuda_version,
                l2_cache_bytes,
            },
            driver: Driver::Cuda(CudaDriver {
                ctx,
                stream,
                source,
                modules: Mutex::new(HashMap::new()),
            }),
            pool,
            current_use: std::sync::atomic::AtomicU8::new(MemoryUse::Workspace as u8),
        })
    }

    /// Opens emulated device number `index` (`emu:N` in reports) of `arch` with
    /// `memory_bytes` of device memory (see `emu`).
    pub fn open_emulated(
        index: usize,
        arch: EmuArch,
        memory_bytes: usize,
        kernel_library: Option<&std::path::Path>,
    ) -> Result<Gpu> {
        let (driver, arena, live) = EmuDriver::open(arch, memory_bytes, kernel_library)?;
        let name = match arch {
            EmuArch::Sm75 => "emulated sm_75 (T4 path: f16 tensor cores)",
            EmuArch::Sm80 => "emulated sm_80 (bf16 tensor cores)",
            EmuArch::Sm90 => "emulated sm_90 (bf16 tensor cores)",
        };
        Ok(Gpu {
            info: DeviceInfo {
                device: if index == 0 {
                    format!("emu:{arch}")
                } else {
                    format!("emu:{arch}#{index}")
                },
                name: name.into(),
                compute_capability: arch.compute_capability(),
                total_memory_bytes: memory_bytes,
                driver_cuda_version: 0,
                l2_cache_bytes: 4 << 20,
            },
            driver: Driver::Emu(driver),
            pool: Arc::new(Heap {
                pool: Mutex::new(Pool::new(Memory::Emu(arena))),
                live: Some(live),
            }),
            current_use: std::sync::atomic::AtomicU8::new(MemoryUse::Workspace as u8),
        })
    }

    /// The emulated device's driver, if this is one.
    pub fn emulated(&self) -> Option<&EmuDriver> {
        match &self.driver {
            Driver::Emu(emu) => Some(emu),
            Driver::Cuda(_) => None,
        }
    }

    /// What the device is.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// The pool's numbers.
    pub fn pool_stats(&self) -> PoolStats {
        lock(&self.pool.pool).stats()
    }

    /// The pool's numbers and its bytes in use per [`MemoryUse`], read together.
    pub fn pool_usage(&self) -> (PoolStats, UsageByUse) {
        let pool = lock(&self.pool.pool);
        (pool.stats(), pool.usage())
    }

    /// Tags the blocks allocated while the scope lives with `use_`.
    pub fn memory_scope(&self, use_: MemoryUse) -> MemoryScope<'_> {
        MemoryScope::enter(&self.current_use, use_)
    }

    /// Whether this is an allocation-only emulated device (`--emu-alloc-only`).
    pub fn alloc_only(&self) -> bool {
        self.emulated().is_some_and(EmuDriver::is_alloc_only)
    }

    /// How each module loaded so far was obtained, by name.
    pub fn module_reports(&self) -> Vec<ModuleReport> {
        let Driver::Cuda(cuda) = &self.driver else {
            return Vec::new();
        };
        let mut reports: Vec<ModuleReport> = lock(&cuda.modules)
            .values()
            .map(|m| m.report.clone())
            .collect();
        reports.sort_by_key(|r| r.name);
        reports
    }

    fn bind(&self, op: &str) -> Result<()> {
        match &self.driver {
            Driver::Cuda(cuda) => cuda
                .ctx
                .bind_to_thread()
                .map_err(|e| driver_error(&format!("{op} (binding the context)"), e)),
            Driver::Emu(_) => Ok(()),
        }
    }

    /// A block of at least `bytes` from the pool; out of memory names what to lower.
    pub fn alloc(&self, op: &str, bytes: usize) -> Result<DeviceBlock> {
        if bytes == 0 {
            return Ok(DeviceBlock::empty());
        }
        self.bind(op)?;
        let mut pool = lock(&self.pool.pool);
        let use_ = MemoryScope::current(&self.current_use);
        match pool.allocate_for(bytes, use_) {
            Ok(block) => {
                if let Some(live) = &self.pool.live {
                    live.add(block.ptr, bytes, op);
                }
                Ok(DeviceBlock {
                    block,
                    pool: Some(self.pool.clone()),
                    use_,
                })
            }
            Err(AllocError::Driver(e)) => Err(e.context(format!("{op}: allocating {bytes} bytes"))),
            Err(AllocError::OutOfMemory) => {
                let stats = pool.stats();
                let free = match &self.driver {
                    Driver::Cuda(_) => result::mem_get_info().map(|(free, _)| free).unwrap_or(0),
                    Driver::Emu(_) => self
                        .info
                        .total_memory_bytes
                        .saturating_sub(stats.in_use_bytes + stats.cached_bytes),
                };
                let mib = |b: usize| b as f64 / (1 << 20) as f64;
                bail!(
                    "CUDA out of memory in {op}: {:.1} MiB asked for, {:.1} MiB in use by verdict \
                     (peak {:.1} MiB), {:.1} MiB free of {:.1} MiB on {} ({}); lower --batch-tokens \
                     (tokens per packed batch) or --max-len",
                    mib(bytes),
                    mib(stats.in_use_bytes),
                    mib(stats.peak_in_use_bytes),
                    mib(free),
                    mib(self.info.total_memory_bytes),
                    self.info.device,
                    self.info.name
                )
            }
        }
    }

    /// A new block holding `host`.
    pub fn upload<T: Copy>(&self, op: &str, host: &[T]) -> Result<DeviceBlock> {
        let block = self.alloc(op, std::mem::size_of_val(host))?;
        self.write(op, &block, host)?;
        Ok(block)
    }

    /// Copies `host` into the start of `block`, which the caller has checked is large enough.
    pub fn write<T: Copy>(&self, op: &str, block: &DeviceBlock, host: &[T]) -> Result<()> {
        if host.is_empty() {
            return Ok(());
        }
        let bytes = std::mem::size_of_val(host);
        match &self.driver {
            Driver::Cuda(cuda) => {
                self.bind(op)?;
                // SAFETY: the block holds at least `bytes` (checked by the caller); a copy
                // from pageable memory has read `host` by the time the call returns.
                unsafe { result::memcpy_htod_async(block.ptr(), host, cuda.stream.cu_stream()) }
                    .map_err(|e| driver_error(&format!("{op} (copy to the device)"), e))
            }
            // SAFETY: a plain-data slice seen as its bytes.
            Driver::Emu(emu) => emu.write(op, block.ptr(), unsafe {
                std::slice::from_raw_parts(host.as_ptr() as *const u8, bytes)
            }),
        }
    }

    /// A new block holding the first `bytes` of `src`.
    pub fn duplicate(&self, op: &str, src: &DeviceBlock, bytes: usize) -> Result<DeviceBlock> {
        let block = self.alloc(op, bytes)?;
        if bytes > 0 {
            match &self.driver {
                // SAFETY: both blocks hold at least `bytes` bytes; the copy is stream-ordered.
                Driver::Cuda(cuda) => unsafe {
                    result::memcpy_dtod_async(
                        block.ptr(),
                        src.ptr(),
                        bytes,
                        cuda.stream.cu_stream(),
                    )
                }
                .map_err(|e| driver_error(&format!("{op} (device copy)"), e))?,
                Driver::Emu(emu) => emu.copy(op, block.ptr(), src.ptr(), bytes)?,
            }
        }
        Ok(block)
    }

    /// Sets the first `bytes` of `block` to zero bytes.
    pub fn zero(&self, op: &str, block: &DeviceBlock, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        match &self.driver {
            // SAFETY: the block holds at least `bytes` bytes.
            Driver::Cuda(cuda) => {
                unsafe { result::memset_d8_async(block.ptr(), 0, bytes, cuda.stream.cu_stream()) }
                    .map_err(|e| driver_error(&format!("{op} (memset)"), e))
            }
            Driver::Emu(emu) => emu.zero(op, block.ptr(), bytes),
        }
    }

    /// Copies `len` values of `T` (f32, or the bits of a 16-bit type) from `block` to the
    /// host, after all queued work.
    pub fn download<T: Copy + Default>(
        &self,
        op: &str,
        block: &DeviceBlock,
        len: usize,
    ) -> Result<Vec<T>> {
        let mut host = vec![T::default(); len];
        if len > 0 {
            match &self.driver {
                Driver::Cuda(cuda) => {
                    self.bind(op)?;
                    // SAFETY: the block holds at least `len` values of T.
                    unsafe {
                        result::memcpy_dtoh_async(&mut host, block.ptr(), cuda.stream.cu_stream())
                    }
                    .map_err(|e| driver_error(&format!("{op} (copy to the host)"), e))?;
                }
                // SAFETY: plain values seen as their bytes.
                Driver::Emu(emu) => emu.read(op, block.ptr(), unsafe {
                    std::slice::from_raw_parts_mut(
                        host.as_mut_ptr() as *mut u8,
                        len * std::mem::size_of::<T>(),
                    )
                })?,
            }
        }
        self.synchronize(op)?;
        Ok(host)
    }

    /// Waits for all queued work; an asynchronous kernel failure surfaces here.
    pub fn synchronize(&self, op: &str) -> Result<()> {
        let Driver::Cuda(cuda) = &self.driver else {
            return Ok(()); // the emulated device runs each launch to its end
        };
        cuda.stream.synchronize().map_err(|e| {
            driver_error(&format!("{op} (waiting for queued work)"), e).context(
                "an earlier kernel may have failed asynchronously; rerun with \
                 CUDA_LAUNCH_BLOCKING=1 to stop at the failing launch",
            )
        })
    }

    /// Makes this device's context current on the calling thread, for libraries that use the
    /// thread's context (cuBLAS).
    pub fn make_current(&self) -> Result<()> {
        self.bind("make_current")
    }

    /// The stream every op runs on, as a raw `CUstream` for libraries that take one.
    pub fn raw_stream(&self) -> *mut c_void {
        match &self.driver {
            Driver::Cuda(cuda) => cuda.stream.cu_stream() as *mut c_void,
            Driver::Emu(_) => std::ptr::null_mut(),
        }
    }

    /// Device time of each of `reps` calls of `f`, in milliseconds: timing events recorded
    /// between the calls, all queued before one wait, so the host never idles the device
    /// between calls (a gap shows only where the host cannot queue work as fast as the
    /// device runs it). `f(i)` queues the i-th call's work on the stream.
    pub fn time_each(
        &self,
        reps: usize,
        mut f: impl FnMut(usize) -> Result<()>,
    ) -> Result<Vec<f32>> {
        let op = "timing";
        let Driver::Cuda(cuda) = &self.driver else {
            bail!(
                "{} is emulated: its times say nothing about a GPU, so nothing is timed on it",
                self.info.device
            );
        };
        self.bind(op)?;
        let events = (0..=reps)
            .map(|_| {
                cuda.ctx
                    .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| driver_error("creating timing events", e))?;
        let record = |event: &cudarc::driver::CudaEvent| {
            event
                .record(&cuda.stream)
                .map_err(|e| driver_error("recording a timing event", e))
        };
        record(&events[0])?;
        for (i, event) in events[1..].iter().enumerate() {
            f(i)?;
            record(event)?;
        }
        self.synchronize(op)?;
        events
            .windows(2)
            .map(|pair| event_elapsed_ms(&pair[0], &pair[1]))
            .collect()
    }

    /// Launches `function` of kernels/`module`.cu on the stream.
    pub fn launch(
        &self,
        op: &str,
        module: &'static str,
        function: &'static str,
        config: LaunchConfig,
        args: &mut [&mut dyn KernelArg],
    ) -> Result<()> {
        let mut params: Vec<*mut c_void> = args.iter_mut().map(|a| a.param()).collect();
        let cuda = match &self.driver {
            Driver::Cuda(cuda) => cuda,
            Driver::Emu(emu) => {
                return emu
                    .launch(module, function, config.grid, config.block, &mut params)
                    .map_err(|e| e.context(format!("{op} (launching {module}.cu:{function})")));
            }
        };
        self.bind(op)?;
        let f = cuda.function(module, function, self.info.compute_capability)?;
        // SAFETY: `params` matches the kernel's signature (each launcher passes the types of
        // its extern "C" declaration) and every pointer argument is a live block of the size
        // the launcher checked.
        unsafe {
            result::launch_kernel(
                f.0,
                config.grid,
                config.block,
                0,
                cuda.stream.cu_stream(),
                &mut params,
            )
        }
        .map_err(|e| driver_error(&format!("{op} (launching {module}.cu:{function})"), e))
    }
}

impl CudaDriver {
    /// The entry point `function` of kernels/`module`.cu, loading the module on first use.
    fn function(
        &self,
        module: &'static str,
        function: &'static str,
        compute_capability: (i32, i32),
    ) -> Result<Function> {
        let mut modules = lock(&self.modules);
        if !modules.contains_key(module) {
            let loaded = self.load_module(module, compute_capability)?;
            modules.insert(module, loaded);
        }
        let loaded = modules.get_mut(module).expect("inserted above");
        if let Some(&f) = loaded.functions.get(function) {
            return Ok(f);
        }
        let c_name = CString::new(function).expect("kernel names have no NUL");
        // SAFETY: the module is loaded and stays loaded while the Gpu lives.
        let f = unsafe { result::module::get_function(loaded.module, c_name) }
            .map_err(|e| driver_error(&format!("finding {function} in {module}.cu"), e))?;
        loaded.functions.insert(function, Function(f));
        Ok(Function(f))
    }

    fn load_module(
        &self,
        name: &'static str,
        compute_capability: (i32, i32),
    ) -> Result<LoadedModule> {
        let embedded = kernels::module(name)
            .with_context(|| format!("no kernels/{name}.cu is embedded in this binary"))?;
        let started = Instant::now();
        let prebuilt = |(module, target): (sys::CUmodule, kernels::Target)| {
            (module, "prebuilt", Some(target.to_string()), None)
        };
        let (module, source, image, prebuilt_error) = match self.source {
            KernelSource::Prebuilt => prebuilt(self.load_prebuilt(embedded, compute_capability)?),
            KernelSource::Nvrtc => (
                self.load_nvrtc(embedded, compute_capability)?,
                "nvrtc",
                None,
                None,
            ),
            KernelSource::Auto => match self.load_prebuilt(embedded, compute_capability) {
                Ok(loaded) => prebuilt(loaded),
                Err(e) => {
                    let module =
                        self.load_nvrtc(embedded, compute_capability)
                            .with_context(|| {
                                format!("the prebuilt {name} module did not load either: {e:#}")
                            })?;
                    (module, "nvrtc", None, Some(format!("{e:#}")))
                }
            },
        };
        Ok(LoadedModule {
            module,
            functions: HashMap::new(),
            report: ModuleReport {
                name,
                source,
                image,
                prebuilt_error,
                load_ms: started.elapsed().as_secs_f64() * 1e3,
            },
        })
    }

    /// The first embedded image of `kernels::load_order` that the driver loads, and which
    /// one it was; an error naming each failure when none does.
    fn load_prebuilt(
        &self,
        embedded: &KernelModule,
        compute_capability: (i32, i32),
    ) -> Result<(sys::CUmodule, kernels::Target)> {
        let name = embedded.name;
        ensure!(
            !embedded.images.is_empty(),
            "this binary has no prebuilt {name} module (built without NVRTC 12); \
             VERDICT_KERNELS=auto or nvrtc compiles it at run time"
        );
        let (major, minor) = compute_capability;
        let candidates = kernels::load_order(embedded.images, compute_capability);
        ensure!(
            !candidates.is_empty(),
            "no prebuilt {name} image runs on sm_{major}{minor} (there are {})",
            embedded
                .images
                .iter()
                .map(|image| image.target.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let mut failures = Vec::new();
        for image in candidates {
            // SAFETY: a complete cubin or NUL-terminated PTX, 16-byte aligned by build.rs,
            // alive for 'static.
            match unsafe { result::module::load_data(image.bytes.as_ptr() as *const c_void) } {
                Ok(module) => return Ok((module, image.target)),
                Err(e) => failures.push(format!("{}: {}", image.target, describe(e))),
            }
        }
        bail!(
            "loading the prebuilt {name} module on sm_{major}{minor}: {}",
            failures.join("; ")
        )
    }

    fn load_nvrtc(
        &self,
        embedded: &KernelModule,
        compute_capability: (i32, i32),
    ) -> Result<sys::CUmodule> {
        let cubin = compile_nvrtc(embedded, compute_capability)?;
        // 16-byte aligned, as the embedded images are, so the driver never parses a
        // misaligned ELF image.
        let mut image = vec![0u128; cubin.len().div_ceil(16)];
        // SAFETY: `image` holds at least `cubin.len()` bytes; the two do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                cubin.as_ptr(),
                image.as_mut_ptr() as *mut u8,
                cubin.len(),
            )
        };
        // SAFETY: a complete cubin, alive during the call (the driver copies it).
        unsafe { result::module::load_data(image.as_ptr() as *const c_void) }.map_err(|e| {
            driver_error(
                &format!("loading the NVRTC-compiled {} module", embedded.name),
                e,
            )
        })
    }
}

/// Device time from `start` to `end` in milliseconds, through the driver's first
/// `cuEventElapsedTime`, which every driver has: cudarc's CUDA 13 bindings call
/// `cuEventElapsedTime_v2`, which drivers before R570 (Kaggle's CUDA 12) lack, and a missing
/// symbol panics inside cudarc.
fn event_elapsed_ms(
    start: &cudarc::driver::CudaEvent,
    end: &cudarc::driver::CudaEvent,
) -> Result<f32> {
    type ElapsedTime = unsafe extern "C" fn(*mut f32, sys::CUevent, sys::CUevent) -> sys::CUresult;
    // SAFETY: the driver library is loaded (a context exists); the symbol has this
    // signature in every CUDA version.
    let elapsed: libloading::Symbol<ElapsedTime> =
        unsafe { sys::culib().get(b"cuEventElapsedTime\0") }
            .context("the CUDA driver has no cuEventElapsedTime")?;
    let mut ms = 0.0f32;
    // SAFETY: both events were recorded on this context's stream and have completed.
    unsafe { elapsed(&mut ms, start.cu_event(), end.cu_event()) }
        .result()
        .map_err(|e| driver_error("reading a timing event", e))?;
    Ok(ms)
}

impl Drop for CudaDriver {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            let _ = self.stream.synchronize();
            for loaded in lock(&self.modules).values() {
                // SAFETY: every function handle dies with the Gpu; buffers hold no module.
                let _ = unsafe { result::module::unload(loaded.module) };
            }
        }
    }
}

/// The environment variable naming libnvrtc by absolute path, for an NVRTC that is neither on
/// the library path nor in the places [`nvrtc_candidates`] looks.
pub const NVRTC_ENV: &str = "VERDICT_NVRTC";

/// Places a libnvrtc may be outside the library path, most specific first: `$VERDICT_NVRTC`;
/// the CUDA toolkit's folders; the pip wheels of Python environments (CUDA 13's
/// `nvidia/cu13/lib`, CUDA 12's `nvidia/cuda_nvrtc/lib`) in the active virtual environment,
/// conda, the system's and the user's site/dist-packages (Kaggle: /usr/local/lib/python3.*),
/// and the venv of tools/install-nvcc.sh.
pub fn nvrtc_candidates() -> Vec<std::path::PathBuf> {
    use std::path::{Path, PathBuf};
    let mut found: Vec<PathBuf> = Vec::new();
    if let Some(path) = std::env::var_os(NVRTC_ENV).filter(|v| !v.is_empty()) {
        found.push(PathBuf::from(path));
    }
    for dir in [
        "/usr/local/cuda/lib64",
        "/usr/local/cuda/targets/x86_64-linux/lib",
    ] {
        found.push(Path::new(dir).join("libnvrtc.so.12"));
        found.push(Path::new(dir).join("libnvrtc.so.13"));
    }
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let mut prefixes: Vec<PathBuf> = ["VIRTUAL_ENV", "CONDA_PREFIX", "VERDICT_NVCC_VENV"]
        .iter()
        .filter_map(|v| {
            std::env::var_os(v)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        })
        .collect();
    prefixes.extend(["/usr/local", "/usr", "/opt/conda"].map(PathBuf::from));
    if let Some(home) = &home {
        prefixes.push(home.join(".local"));
        prefixes.push(home.join(".cache/verdict/nvcc-venv"));
    }
    for prefix in prefixes {
        let mut pythons: Vec<PathBuf> = std::fs::read_dir(prefix.join("lib"))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
            .map(|e| e.path())
            .collect();
        pythons.sort();
        for python in pythons.iter().rev() {
            for packages in ["site-packages", "dist-packages"] {
                let nvidia = python.join(packages).join("nvidia");
                // CUDA 12 first: its cubins load on every driver since R525.
                found.push(nvidia.join("cuda_nvrtc/lib/libnvrtc.so.12"));
                found.push(nvidia.join("cu13/lib/libnvrtc.so.13"));
            }
        }
    }
    found
}

/// Makes NVRTC loadable by cudarc, which opens it by name (libnvrtc.so, .so.13, .so.12, ...)
/// from the library path only: when that fails, the first of [`nvrtc_candidates`] that opens
/// is loaded and kept, and the dynamic loader then answers cudarc's open of its soname
/// (libnvrtc.so.13 or .12) with it. Once per process; says where it came from on stderr.
fn ensure_nvrtc_loaded() {
    static LOADED: std::sync::Once = std::sync::Once::new();
    LOADED.call_once(|| {
        // SAFETY: only tries to dlopen the library under its usual names.
        let present =
            std::panic::catch_unwind(|| unsafe { cudarc::nvrtc::sys::is_culib_present() })
                .unwrap_or(false);
        if present {
            return;
        }
        for path in nvrtc_candidates() {
            if !path.is_file() {
                continue;
            }
            // SAFETY: loading NVRTC runs no initialisers with preconditions.
            match unsafe { libloading::Library::new(&path) } {
                Ok(library) => {
                    eprintln!("NVRTC: {}", path.display());
                    // Kept for the life of the process, as cudarc keeps its own handle.
                    std::mem::forget(library);
                    return;
                }
                Err(e) => eprintln!("NVRTC: cannot load {}: {e}", path.display()),
            }
        }
    });
}

/// Whether an NVRTC library can be opened (on the library path, or in a place
/// [`nvrtc_candidates`] names).
pub fn nvrtc_available() -> bool {
    ensure_nvrtc_loaded();
    // SAFETY: only tries to dlopen the library under its usual names.
    std::panic::catch_unwind(|| unsafe { cudarc::nvrtc::sys::is_culib_present() }).unwrap_or(false)
}

/// NVRTC's version as (major, minor), if the library is there.
pub fn nvrtc_version() -> Option<(i32, i32)> {
    if !nvrtc_available() {
        return None;
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: writes two ints.
    let status = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    (status == cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS).then_some((major, minor))
}

/// Compiles the standalone source of `embedded` with NVRTC to a cubin (SASS) for
/// `sm_{compute_capability}`: machine code the driver loads as it is, where PTX would need
/// a driver at least as new as the NVRTC that wrote it to JIT it. Needs no GPU, only the
/// NVRTC library, so it is also tested on machines without one.
pub fn compile_nvrtc(embedded: &KernelModule, compute_capability: (i32, i32)) -> Result<Vec<u8>> {
    use cudarc::nvrtc::{result as nvrtc, sys as nvrtc_sys};
    ensure!(
        nvrtc_available(),
        "NVRTC (libnvrtc.so.13 or .12) is not on the library path nor in the places verdict \
         looks (pip's nvidia/cuda_nvrtc/lib and nvidia/cu13/lib, /usr/local/cuda), so \
         kernels/{}.cu cannot be compiled at run time; add its folder to LD_LIBRARY_PATH or \
         set {NVRTC_ENV}=/absolute/path/libnvrtc.so.12",
        embedded.name
    );
    let (major, minor) = compute_capability;
    let name = embedded.name;
    let source = CString::new(embedded.standalone_source)
        .with_context(|| format!("kernels/{name}.cu holds a NUL byte"))?;
    let file = CString::new(format!("{name}.cu")).expect("module names have no NUL");
    let nvrtc_error = |what: &str, e: cudarc::nvrtc::result::NvrtcError| {
        anyhow!("NVRTC failed {what} kernels/{name}.cu: {:?}", e.0)
    };
    let compiled = std::panic::catch_unwind(|| -> Result<Vec<u8>> {
        let program = nvrtc::create_program(&source, Some(&file))
            .map_err(|e| nvrtc_error("creating a program for", e))?;
        let options = [
            format!("--gpu-architecture=sm_{major}{minor}"),
            "-std=c++17".to_string(),
        ];
        // SAFETY: a live program, destroyed below on every path.
        let result = unsafe { nvrtc::compile_program(program, &options) };
        let outcome = match result {
            Ok(()) => {
                let mut size = 0usize;
                // SAFETY: the program compiled; NVRTC writes its cubin's size, then the cubin
                // into a buffer of that size.
                unsafe { nvrtc_sys::nvrtcGetCUBINSize(program, &mut size) }
                    .result()
                    .map_err(|e| nvrtc_error("sizing the cubin of", e))
                    .and_then(|()| {
                        let mut cubin = vec![0u8; size];
                        unsafe { nvrtc_sys::nvrtcGetCUBIN(program, cubin.as_mut_ptr() as *mut _) }
                            .result()
                            .map_err(|e| nvrtc_error("reading the cubin of", e))
                            .map(|()| cubin)
                    })
            }
            Err(e) => {
                // SAFETY: the program is live; the log is NUL-terminated.
                let log = unsafe { nvrtc::get_program_log(program) }
                    .map(|log| {
                        let bytes: Vec<u8> = log.iter().map(|&c| c as u8).collect();
                        String::from_utf8_lossy(&bytes).trim_end_matches('\0').to_string()
                    })
                    .unwrap_or_default();
                Err(anyhow!(
                    "NVRTC could not compile kernels/{name}.cu for sm_{major}{minor} ({:?}):\n{log}",
                    e.0
                ))
            }
        };
        // SAFETY: the program is live and not used after this.
        let _ = unsafe { nvrtc::destroy_program(program) };
        outcome
    })
    .map_err(|_| anyhow!("NVRTC panicked compiling kernels/{name}.cu"))??;
    ensure!(
        compiled.starts_with(b"\x7fELF"),
        "NVRTC returned no ELF cubin for kernels/{name}.cu"
    );
    Ok(compiled)
}
