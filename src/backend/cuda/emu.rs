//! The emulated device (`--device emu`, `emu:sm75|sm80|sm90`): the CUDA backend with only its
//! driver layer swapped, so that every launch takes exactly the path it takes on a GPU (launch
//! shapes, argument packing, the pool, sticky errors) and runs the same `kernels/*.cu` sources,
//! compiled as C++ by build.rs (kernels/emu/build.rs) and run by kernels/emu/runtime.cpp.
//!
//! What this file holds: the device's memory (an address range reserved up front, first-fit,
//! with a gap after each block so an overrun never lands in a neighbour), the registry of live
//! allocations at their exact requested sizes (every kernel access is checked against it),
//! and the launch, which hands the runtime the kernel's entry point, its packed arguments and
//! the live allocations. Fresh allocations hold a NaN pattern (all bits set), as a GPU's
//! uninitialised memory holds anything. Launches run synchronously, one at a time in the
//! process, and an error names the kernel, block, thread and address.

use super::pool::{AllocError, DeviceMemory};
use anyhow::{anyhow, bail, ensure, Result};
use std::collections::BTreeMap;
use std::ffi::{c_char, c_void, CStr, CString};
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The compute capability an emulated device has: it chooses the kernels as on hardware.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EmuArch {
    /// sm_75, a T4: f16 `mma.m16n8k8`.
    Sm75,
    /// sm_80, an A100: bf16 `mma.m16n8k16`.
    Sm80,
    /// sm_90, an H100.
    Sm90,
}

impl EmuArch {
    /// (major, minor).
    pub fn compute_capability(self) -> (i32, i32) {
        match self {
            EmuArch::Sm75 => (7, 5),
            EmuArch::Sm80 => (8, 0),
            EmuArch::Sm90 => (9, 0),
        }
    }

    fn code(self) -> u32 {
        let (major, minor) = self.compute_capability();
        (major * 10 + minor) as u32
    }
}

impl FromStr for EmuArch {
    type Err = anyhow::Error;

    /// `sm75`, `sm80` or `sm90`.
    fn from_str(s: &str) -> Result<EmuArch> {
        match s {
            "sm75" => Ok(EmuArch::Sm75),
            "sm80" => Ok(EmuArch::Sm80),
            "sm90" => Ok(EmuArch::Sm90),
            _ => bail!("unknown emulated architecture {s:?}: expected sm75, sm80 or sm90"),
        }
    }
}

impl fmt::Display for EmuArch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sm{}", self.code())
    }
}

/// The environment variable holding the emulated device memory (`--emu-memory`).
pub const MEMORY_ENV: &str = "VERDICT_EMU_MEMORY";
/// The environment variable naming a kernel library that replaces built-in kernels (see
/// [`Kernels`]): a shared object made like tests/emu_planted_bugs.rs makes them.
pub const KERNELS_ENV: &str = "VERDICT_EMU_KERNELS";
/// The environment variable that, set to 1, makes each emulated device print on stderr, as
/// it closes, what rounding to f16 did during its life ([`F16Rounding`]).
pub const F16_REPORT_ENV: &str = "VERDICT_EMU_F16_REPORT";
/// The environment variable holding the seed of the block order (default 0).
pub const SEED_ENV: &str = "VERDICT_EMU_SEED";
/// The environment variable holding the seconds a launch may run before the watchdog stops it.
pub const TIMEOUT_ENV: &str = "VERDICT_EMU_TIMEOUT";
/// The environment variable that, set to 1, makes emulated devices allocation-only
/// (`--emu-alloc-only`, see [`alloc_only`]).
pub const ALLOC_ONLY_ENV: &str = "VERDICT_EMU_ALLOC_ONLY";
/// A T4's memory.
pub const DEFAULT_MEMORY_BYTES: usize = 16 << 30;

/// A memory size: bytes, or a number with K/M/G/T (powers of 1024; `GiB`, `GB`, `G` alike).
pub fn parse_size(text: &str) -> Result<usize> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| anyhow!("memory size {text:?}: expected e.g. 16GiB, 512M or 1000000"))?;
    let shift = match unit
        .trim()
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => bail!("memory size {text:?}: unknown unit {unit:?} (K, M, G or T)"),
    };
    let bytes = value * (1u64 << shift) as f64;
    ensure!(
        bytes >= 1.0 && bytes <= (1u64 << 42) as f64,
        "memory size {text:?}: expected between 1 byte and 4 TiB"
    );
    Ok(bytes as usize)
}

/// The device memory of emulated devices: `VERDICT_EMU_MEMORY` (which `--emu-memory` sets),
/// else a T4's 16 GiB.
pub fn memory_bytes() -> Result<usize> {
    match std::env::var(MEMORY_ENV) {
        Ok(v) if !v.is_empty() => {
            parse_size(&v).map_err(|e| e.context(format!("{MEMORY_ENV}={v:?}")))
        }
        _ => Ok(DEFAULT_MEMORY_BYTES),
    }
}

/// Whether emulated devices are allocation-only (`VERDICT_EMU_ALLOC_ONLY=1`, which
/// `--emu-alloc-only` sets): allocations and frees are real operations of the pool and the
/// arena (so the high-water mark and out-of-memory are those of a real run), but no byte is
/// written or read: fresh blocks are not filled, copies to the device and memsets are skipped,
/// kernels are counted but not run, and every copy back to the host is refused with an error,
/// so no unwritten value can pass for a result. The backend says so
/// (`Backend::computes_values`), and code that would read results skips, saying why.
pub fn alloc_only() -> bool {
    std::env::var(ALLOC_ONLY_ENV).as_deref() == Ok("1")
}

/// The kernel library `VERDICT_EMU_KERNELS` names, if any.
pub fn kernel_library() -> Option<std::path::PathBuf> {
    std::env::var_os(KERNELS_ENV)
        .filter(|v| !v.is_empty())
        .map(std::path::PathBuf::from)
}

/// The emulated `cvt.rn.f16.f32`, `cvt.f32.f16` and `cvt.rn.bf16.f32` (what kernels round
/// with on the emulated device), for tests against a reference. `None` without the emulator.
pub fn conversions() -> Option<(fn(f32) -> u16, fn(u16) -> f32, fn(f32) -> u16)> {
    #[cfg(verdict_emu)]
    {
        // SAFETY: pure functions of their argument.
        Some((
            |x| unsafe { ffi::verdict_emu_f32_to_f16(x) },
            |h| unsafe { ffi::verdict_emu_f16_to_f32(h) },
            |x| unsafe { ffi::verdict_emu_f32_to_bf16(x) },
        ))
    }
    #[cfg(not(verdict_emu))]
    None
}

/// What rounding to f16 did to the values kernels rounded on emulated devices (sm_75's
/// tensor-core operands), since the last [`take_f16_rounding`].
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct F16Rounding {
    /// Values rounded.
    pub values: u64,
    /// Finite values that became infinite (|x| >= 65520).
    pub overflowed: u64,
    /// Nonzero values that became zero (|x| < 2^-25).
    pub flushed_to_zero: u64,
    /// Results in f16's subnormal range (|x| < 2^-14: precision lost).
    pub subnormal: u64,
    /// The largest finite magnitude rounded.
    pub max_abs: f32,
}

/// The f16 rounding counts of this process's emulated devices, reset to zero.
pub fn take_f16_rounding() -> F16Rounding {
    #[cfg(verdict_emu)]
    {
        let (mut counts, mut max_abs) = ([0u64; 4], 0.0f32);
        // SAFETY: writes four counts and one float.
        unsafe { ffi::verdict_emu_f16_stats(counts.as_mut_ptr(), &mut max_abs, 1) };
        F16Rounding {
            values: counts[0],
            overflowed: counts[1],
            flushed_to_zero: counts[2],
            subnormal: counts[3],
            max_abs,
        }
    }
    #[cfg(not(verdict_emu))]
    F16Rounding::default()
}

/// Whether this binary has the emulated device (build.rs needs GCC on x86-64 for it).
pub fn available() -> bool {
    cfg!(verdict_emu)
}

#[repr(C)]
struct Entry {
    module: *const c_char,
    function: *const c_char,
    thunk: *const c_void,
    translation_unit: *const c_char,
}

#[repr(C)]
struct Module {
    arch: u32,
    entries: *const Entry,
}

#[repr(C)]
struct LiveRange {
    lo: u64,
    hi: u64,
    what: *const c_char,
}

#[cfg(verdict_emu)]
mod ffi {
    use super::{Entry, LiveRange, Module};
    use std::ffi::{c_char, c_void};
    extern "C" {
        pub static verdict_emu_modules: Module;
        #[allow(clippy::too_many_arguments)]
        pub fn verdict_emu_launch(
            entry: *const Entry,
            grid: *const u32,
            block: *const u32,
            params: *mut *mut c_void,
            allocations: *const LiveRange,
            allocation_count: usize,
            arena_lo: u64,
            arena_hi: u64,
            seed: u64,
            timeout_s: f64,
            error: *mut c_char,
            error_len: usize,
        ) -> i32;
        pub fn verdict_emu_map(bytes: usize) -> *mut c_void;
        pub fn verdict_emu_f32_to_f16(x: f32) -> u16;
        pub fn verdict_emu_f16_to_f32(h: u16) -> f32;
        pub fn verdict_emu_f32_to_bf16(x: f32) -> u16;
        pub fn verdict_emu_f16_stats(counts: *mut u64, max_abs: *mut f32, reset: i32);
        pub fn verdict_emu_unmap(p: *mut c_void, bytes: usize);
        pub fn verdict_emu_discard(p: *mut c_void, bytes: usize);
    }
}

/// Without the emulator built in, `EmuDriver::open` fails before any of these is reached.
#[cfg(not(verdict_emu))]
mod ffi {
    use std::ffi::c_void;
    pub unsafe fn verdict_emu_map(_: usize) -> *mut c_void {
        std::ptr::null_mut()
    }
    pub unsafe fn verdict_emu_unmap(_: *mut c_void, _: usize) {}
    pub unsafe fn verdict_emu_discard(_: *mut c_void, _: usize) {}
}

// SAFETY (for the raw pointers below): entry tables are static data of the binary, immutable.
#[derive(Clone, Copy)]
struct EntryRef(*const Entry);
unsafe impl Send for EntryRef {}
unsafe impl Sync for EntryRef {}

type LaunchFn = unsafe extern "C" fn(
    *const Entry,
    *const u32,
    *const u32,
    *mut *mut c_void,
    *const LiveRange,
    usize,
    u64,
    u64,
    u64,
    f64,
    *mut c_char,
    usize,
) -> i32;

/// A set of compiled kernels and the runtime that runs them: the ones built into this binary,
/// or a kernel library (`--emu-kernels`, a shared object with its own runtime: how a kernel
/// engineer tries a changed .cu without rebuilding verdict, and how tests/emu_planted_bugs.rs
/// runs mutated kernels).
struct Kernels {
    modules: *const Module,
    launch: LaunchFn,
    _library: Option<libloading::Library>,
}

// SAFETY: the tables are immutable static data of the binary or of the loaded library, which
// lives as long as this value.
unsafe impl Send for Kernels {}
unsafe impl Sync for Kernels {}

impl Kernels {
    #[cfg(verdict_emu)]
    fn built_in() -> Kernels {
        Kernels {
            modules: std::ptr::addr_of!(ffi::verdict_emu_modules),
            launch: ffi::verdict_emu_launch,
            _library: None,
        }
    }

    #[cfg(not(verdict_emu))]
    fn built_in() -> Kernels {
        unreachable!("EmuDriver::open checks available() first")
    }

    /// The kernels of the shared object at `path`.
    fn load(path: &std::path::Path) -> Result<Kernels> {
        // SAFETY: loading runs the library's constructors (the runtime registering its
        // kernels' static arrays); a library built as tests/emu_planted_bugs.rs builds them
        // (-Wl,-Bsymbolic) keeps its runtime to itself.
        let library = unsafe { libloading::Library::new(path) }
            .map_err(|e| anyhow!("cannot load the kernel library {}: {e}", path.display()))?;
        // SAFETY: the symbols have the types kernels/emu/runtime.cpp and build.rs give them.
        let (modules, launch) = unsafe {
            let modules = library
                .get::<*const Module>(b"verdict_emu_modules\0")
                .map_err(|e| anyhow!("{}: no kernel table: {e}", path.display()))?;
            let launch = library
                .get::<LaunchFn>(b"verdict_emu_launch\0")
                .map_err(|e| anyhow!("{}: no launch function: {e}", path.display()))?;
            (*modules as *const Module, *launch)
        };
        Ok(Kernels {
            modules,
            launch,
            _library: Some(library),
        })
    }

    /// The entry point `function` of kernels/`module`.cu compiled for `arch`.
    fn entry(&self, arch: EmuArch, module: &str, function: &str) -> Option<EntryRef> {
        self.entries(arch)
            .into_iter()
            .find(|&(m, f, _)| m == module && f == function)
            .map(|(_, _, e)| e)
    }

    /// Every (module, function) compiled for `arch`.
    fn entries(&self, arch: EmuArch) -> Vec<(&'static str, &'static str, EntryRef)> {
        let mut found = Vec::new();
        // SAFETY: a module table ends with a zero `arch`, each entry table with a null
        // `function`; the strings are NUL-terminated ASCII literals that live as long as the
        // binary or library (tables of a library are read while it is loaded only; the
        // &'static here never outlives `self`'s use in this module).
        unsafe {
            let mut m = self.modules;
            while (*m).arch != 0 {
                if (*m).arch == arch.code() {
                    let mut e = (*m).entries;
                    while !(*e).function.is_null() {
                        let text = |p: *const c_char| CStr::from_ptr(p).to_str().unwrap_or("?");
                        found.push((text((*e).module), text((*e).function), EntryRef(e)));
                        e = e.add(1);
                    }
                }
                m = m.add(1);
            }
        }
        found
    }
}

/// Every kernel entry point built into this binary for `arch`, as (module, function): what the
/// emulator's coverage check expects a selftest to launch.
pub fn entry_points(arch: EmuArch) -> Vec<(String, String)> {
    if !available() {
        return Vec::new();
    }
    Kernels::built_in()
        .entries(arch)
        .into_iter()
        .map(|(m, f, _)| (m.to_string(), f.to_string()))
        .collect()
}

/// An emulated device's memory: one reserved address range, blocks handed out first-fit at
/// 256-byte alignment (as cuMemAlloc's) with a 256-byte gap after each.
pub struct Arena {
    base: u64,
    bytes: usize,
    /// Free ranges by start address: length.
    free: BTreeMap<u64, usize>,
    /// Handed-out blocks by start: length including the gap.
    used: BTreeMap<u64, usize>,
}

const ALIGN: usize = 256;

// SAFETY: the arena owns its mapping; the pool that holds it sits behind a Mutex.
unsafe impl Send for Arena {}

impl Arena {
    fn new(bytes: usize) -> Result<Arena> {
        // Room for the gap after a block that fills the whole device.
        let reserve = bytes + ALIGN;
        // SAFETY: a fresh anonymous mapping, released in Drop.
        let base = unsafe { ffi::verdict_emu_map(reserve) } as u64;
        ensure!(
            base != 0,
            "cannot reserve {bytes} bytes of address space for the emulated device"
        );
        Ok(Arena {
            base,
            bytes,
            free: BTreeMap::from([(base, reserve)]),
            used: BTreeMap::new(),
        })
    }
}

impl DeviceMemory for Arena {
    fn allocate(&mut self, bytes: usize) -> Result<u64, AllocError> {
        let need = bytes.div_ceil(ALIGN) * ALIGN + ALIGN;
        let in_use: usize = self.used.values().sum::<usize>();
        if in_use + need > self.bytes + ALIGN {
            return Err(AllocError::OutOfMemory);
        }
        let Some((&start, &len)) = self.free.iter().find(|(_, &len)| len >= need) else {
            return Err(AllocError::OutOfMemory);
        };
        self.free.remove(&start);
        if len > need {
            self.free.insert(start + need as u64, len - need);
        }
        self.used.insert(start, need);
        Ok(start)
    }

    fn release(&mut self, ptr: u64, _bytes: usize) {
        let Some(mut len) = self.used.remove(&ptr) else {
            return;
        };
        // SAFETY: the range is inside the mapping and no longer handed out.
        unsafe { ffi::verdict_emu_discard(ptr as *mut c_void, len) };
        let mut start = ptr;
        if let Some((&next, &next_len)) = self.free.range(ptr + len as u64..).next() {
            if next == ptr + len as u64 {
                self.free.remove(&next);
                len += next_len;
            }
        }
        if let Some((&prev, &prev_len)) = self.free.range(..ptr).next_back() {
            if prev + prev_len as u64 == ptr {
                self.free.remove(&prev);
                start = prev;
                len += prev_len;
            }
        }
        self.free.insert(start, len);
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`; no block outlives the pool that owns the arena.
        unsafe { ffi::verdict_emu_unmap(self.base as *mut c_void, self.bytes + ALIGN) };
    }
}

/// The allocations kernels may touch, at the sizes the ops asked for.
#[derive(Default)]
pub struct LiveAllocations {
    ranges: Mutex<BTreeMap<u64, (u64, CString)>>,
    /// Allocation-only: fresh blocks are not filled (nothing is ever read).
    alloc_only: bool,
}

impl LiveAllocations {
    /// Registers `[ptr, ptr + bytes)`, made for `op`, and fills it with the NaN pattern
    /// (unless allocation-only: then the arena's pages are never touched).
    pub fn add(&self, ptr: u64, bytes: usize, op: &str) {
        if !self.alloc_only {
            // SAFETY: the pool handed out at least `bytes` bytes at `ptr`, inside the arena.
            unsafe { std::ptr::write_bytes(ptr as *mut u8, 0xff, bytes) };
        }
        let what = CString::new(op.replace('\0', " ")).expect("NULs replaced");
        lock(&self.ranges).insert(ptr, (ptr + bytes as u64, what));
    }

    /// Forgets the allocation at `ptr`.
    pub fn remove(&self, ptr: u64) {
        lock(&self.ranges).remove(&ptr);
    }

    /// Whether `[ptr, ptr + bytes)` lies in one live allocation.
    fn contains(&self, ptr: u64, bytes: usize) -> bool {
        let ranges = lock(&self.ranges);
        match ranges.range(..=ptr).next_back() {
            Some((_, (hi, _))) => ptr + bytes as u64 <= *hi,
            None => false,
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Drop for EmuDriver {
    fn drop(&mut self) {
        if std::env::var(F16_REPORT_ENV).as_deref() == Ok("1") {
            let f = take_f16_rounding();
            eprintln!(
                "emulated {}: {} values rounded to f16, max |x| {}, {} overflowed, {} flushed to zero, {} subnormal",
                self.arch, f.values, f.max_abs, f.overflowed, f.flushed_to_zero, f.subnormal
            );
        }
    }
}

/// One launch at a time in the process: shared arrays are the runtime's statics.
static LAUNCH_LOCK: Mutex<()> = Mutex::new(());

/// The emulated device's driver: what `driver::Gpu` calls instead of the CUDA driver.
pub struct EmuDriver {
    arch: EmuArch,
    built_in: Kernels,
    library: Option<Kernels>,
    launched: Mutex<BTreeMap<(String, String), u64>>,
    threads_run: AtomicU64,
    live: Arc<LiveAllocations>,
    arena_lo: u64,
    arena_hi: u64,
    seed: u64,
    launches: AtomicU64,
    timeout_s: f64,
    /// See [`alloc_only`].
    alloc_only: bool,
}

impl EmuDriver {
    /// A device of `arch` with `bytes` of memory: the driver and the arena its pool draws on.
    pub fn open(
        arch: EmuArch,
        bytes: usize,
        library: Option<&std::path::Path>,
    ) -> Result<(EmuDriver, Arena, Arc<LiveAllocations>)> {
        ensure!(
            available(),
            "this binary has no emulated device (build.rs needs GCC on x86-64 for it)"
        );
        let library = library.map(Kernels::load).transpose()?;
        let arena = Arena::new(bytes)?;
        let alloc_only = alloc_only();
        let live = Arc::new(LiveAllocations {
            alloc_only,
            ..LiveAllocations::default()
        });
        let env_number = |name: &str, default: f64| -> Result<f64> {
            match std::env::var(name) {
                Ok(v) if !v.is_empty() => v
                    .parse::<f64>()
                    .ok()
                    .filter(|x| x.is_finite() && *x >= 0.0)
                    .ok_or_else(|| anyhow!("{name}={v:?}: expected a non-negative number")),
                _ => Ok(default),
            }
        };
        let driver = EmuDriver {
            arch,
            built_in: Kernels::built_in(),
            library,
            launched: Mutex::new(BTreeMap::new()),
            threads_run: AtomicU64::new(0),
            live: live.clone(),
            arena_lo: arena.base,
            arena_hi: arena.base + (bytes + ALIGN) as u64,
            seed: env_number(SEED_ENV, 0.0)? as u64,
            launches: AtomicU64::new(0),
            timeout_s: env_number(TIMEOUT_ENV, 600.0)?,
            alloc_only,
        };
        Ok((driver, arena, live))
    }

    /// Fails unless `[ptr, ptr + bytes)` is inside one live allocation: a host copy out of
    /// bounds would corrupt the host's memory, where a GPU would fault.
    fn check_range(&self, op: &str, ptr: u64, bytes: usize) -> Result<()> {
        ensure!(
            bytes == 0 || self.live.contains(ptr, bytes),
            "{op}: a copy of {bytes} bytes at 0x{ptr:x} is outside every live allocation of \
             the emulated device"
        );
        Ok(())
    }

    /// Whether this device is allocation-only (see [`alloc_only`]).
    pub fn is_alloc_only(&self) -> bool {
        self.alloc_only
    }

    /// Copies `host` to device address `dst` (cuMemcpyHtoD); allocation-only: checks only.
    pub fn write(&self, op: &str, dst: u64, host: &[u8]) -> Result<()> {
        self.check_range(op, dst, host.len())?;
        if self.alloc_only {
            return Ok(());
        }
        // SAFETY: checked to lie in a live allocation of this device.
        unsafe { std::ptr::copy_nonoverlapping(host.as_ptr(), dst as *mut u8, host.len()) };
        Ok(())
    }

    /// Copies device address `src` to `host` (cuMemcpyDtoH).
    /// Allocation-only: refused, as no kernel ran to write what would be read.
    pub fn read(&self, op: &str, src: u64, host: &mut [u8]) -> Result<()> {
        self.check_range(op, src, host.len())?;
        ensure!(
            !self.alloc_only,
            "{op}: the emulated device is allocation-only (--emu-alloc-only): its kernels do \
             not run, so there are no values to copy back ({} bytes asked for); only memory \
             can be measured there",
            host.len()
        );
        // SAFETY: checked to lie in a live allocation of this device.
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, host.as_mut_ptr(), host.len()) };
        Ok(())
    }

    /// Copies `bytes` from device address `src` to `dst` (cuMemcpyDtoD).
    pub fn copy(&self, op: &str, dst: u64, src: u64, bytes: usize) -> Result<()> {
        self.check_range(op, src, bytes)?;
        self.check_range(op, dst, bytes)?;
        if self.alloc_only {
            return Ok(());
        }
        // SAFETY: both ranges checked to lie in live allocations (which never overlap).
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, bytes) };
        Ok(())
    }

    /// Sets `bytes` at device address `dst` to zero (cuMemsetD8).
    pub fn zero(&self, op: &str, dst: u64, bytes: usize) -> Result<()> {
        self.check_range(op, dst, bytes)?;
        if self.alloc_only {
            return Ok(());
        }
        // SAFETY: checked to lie in a live allocation of this device.
        unsafe { std::ptr::write_bytes(dst as *mut u8, 0, bytes) };
        Ok(())
    }

    /// CUDA threads run so far, over all launches (for the emulator's speed in threads/s).
    pub fn threads_run(&self) -> u64 {
        self.threads_run.load(Ordering::Relaxed)
    }

    /// How many times each (module, function) was launched so far.
    pub fn launch_counts(&self) -> BTreeMap<(String, String), u64> {
        lock(&self.launched).clone()
    }

    /// Runs `function` of kernels/`module`.cu over the grid, to its end.
    pub fn launch(
        &self,
        module: &str,
        function: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        params: &mut [*mut c_void],
    ) -> Result<()> {
        let (kernels, entry) = self
            .library
            .iter()
            .chain([&self.built_in])
            .find_map(|k| k.entry(self.arch, module, function).map(|e| (k, e)))
            .ok_or_else(|| {
                anyhow!(
                    "no {function} in kernels/{module}.cu for the emulated {}",
                    self.arch
                )
            })?;
        *lock(&self.launched)
            .entry((module.to_string(), function.to_string()))
            .or_default() += 1;
        if self.alloc_only {
            // Counted, not run: the entry point exists and its arguments were packed.
            let _ = kernels;
            return Ok(());
        }
        let _one_at_a_time = lock(&LAUNCH_LOCK);
        let live = lock(&self.live.ranges);
        let ranges: Vec<LiveRange> = live
            .iter()
            .map(|(&lo, (hi, what))| LiveRange {
                lo,
                hi: *hi,
                what: what.as_ptr(),
            })
            .collect();
        let launch = self.launches.fetch_add(1, Ordering::Relaxed);
        let threads = [grid.0, grid.1, grid.2, block.0, block.1, block.2]
            .iter()
            .map(|&n| n as u64)
            .product::<u64>();
        self.threads_run.fetch_add(threads, Ordering::Relaxed);
        let seed = self.seed ^ launch.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut error = vec![0u8; 2048];
        // SAFETY: `entry` is from the binary's tables; `params` holds one pointer per kernel
        // argument of the types the launcher packed (as for cuLaunchKernel); the ranges
        // outlive the call (the live map stays locked, so no block is freed meanwhile).
        let status = unsafe {
            (kernels.launch)(
                entry.0,
                [grid.0, grid.1, grid.2].as_ptr(),
                [block.0, block.1, block.2].as_ptr(),
                params.as_mut_ptr(),
                ranges.as_ptr(),
                ranges.len(),
                self.arena_lo,
                self.arena_hi,
                seed,
                self.timeout_s,
                error.as_mut_ptr() as *mut c_char,
                error.len(),
            )
        };
        if status != 0 {
            let text = CStr::from_bytes_until_nul(&error)
                .map(|c| c.to_string_lossy().into_owned())
                .unwrap_or_default();
            bail!("emulated {}: {text}", self.arch);
        }
        Ok(())
    }
}
