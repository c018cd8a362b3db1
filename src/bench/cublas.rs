//! cuBLAS, opened at run time: the reference matrix products `verdict bench kernels` compares
//! the linear kernels with. cudarc's own cuBLAS bindings are left out of the build on purpose
//! (they double cudarc's compile time), and five functions are all the benchmark needs, so
//! they are declared here and looked up with libloading, like cudarc does for the driver.
//!
//! Library lookup: `libcublas.so.13`, then `.so.12`, then `libcublas.so`, each by the
//! dynamic loader's search (LD_LIBRARY_PATH, the cache, the system folders). PyTorch's pip
//! wheels carry it in `site-packages/nvidia/cu13/lib` (CUDA 13) or
//! `site-packages/nvidia/cublas/lib` (CUDA 12); tools/gpu-check.sh adds those folders.

use super::cases::Variant;
use crate::backend::cuda::nf4::Nf4Product;
use crate::backend::cuda::Cuda;
use anyhow::{bail, Context, Result};
use libloading::Library;
use std::ffi::{c_int, c_void};

/// The library names tried, in order.
pub const LIBRARY_NAMES: [&str; 3] = ["libcublas.so.13", "libcublas.so.12", "libcublas.so"];

type Handle = *mut c_void;
type Status = c_int;
type CreateFn = unsafe extern "C" fn(*mut Handle) -> Status;
type DestroyFn = unsafe extern "C" fn(Handle) -> Status;
type SetStreamFn = unsafe extern "C" fn(Handle, *mut c_void) -> Status;
type GetVersionFn = unsafe extern "C" fn(Handle, *mut c_int) -> Status;
#[allow(clippy::type_complexity)]
type GemmExFn = unsafe extern "C" fn(
    Handle,
    c_int,         // transa
    c_int,         // transb
    c_int,         // m
    c_int,         // n
    c_int,         // k
    *const c_void, // alpha
    *const c_void, // A
    c_int,         // Atype
    c_int,         // lda
    *const c_void, // B
    c_int,         // Btype
    c_int,         // ldb
    *const c_void, // beta
    *mut c_void,   // C
    c_int,         // Ctype
    c_int,         // ldc
    c_int,         // computeType
    c_int,         // algo
) -> Status;

// Values of cublas_api.h and library_types.h (stable across CUDA 11 to 13).
const CUBLAS_OP_N: c_int = 0;
const CUBLAS_OP_T: c_int = 1;
const CUDA_R_32F: c_int = 0;
const CUDA_R_16BF: c_int = 14;
const CUBLAS_COMPUTE_32F: c_int = 68;
const CUBLAS_COMPUTE_32F_FAST_TF32: c_int = 77;
const CUBLAS_GEMM_DEFAULT: c_int = -1;

/// The name of a `cublasStatus_t`.
pub fn status_name(status: c_int) -> String {
    match status {
        0 => "CUBLAS_STATUS_SUCCESS".into(),
        1 => "CUBLAS_STATUS_NOT_INITIALIZED".into(),
        3 => "CUBLAS_STATUS_ALLOC_FAILED".into(),
        7 => "CUBLAS_STATUS_INVALID_VALUE".into(),
        8 => "CUBLAS_STATUS_ARCH_MISMATCH".into(),
        11 => "CUBLAS_STATUS_MAPPING_ERROR".into(),
        13 => "CUBLAS_STATUS_EXECUTION_FAILED".into(),
        14 => "CUBLAS_STATUS_INTERNAL_ERROR".into(),
        15 => "CUBLAS_STATUS_NOT_SUPPORTED".into(),
        16 => "CUBLAS_STATUS_LICENSE_ERROR".into(),
        other => format!("cublasStatus_t {other}"),
    }
}

fn check(call: &str, status: Status) -> Result<()> {
    if status != 0 {
        bail!("{call} failed: {}", status_name(status));
    }
    Ok(())
}

/// The cuBLAS library and the entry points the benchmark calls, resolved.
pub struct CublasLibrary {
    /// The name it was opened under.
    pub name: &'static str,
    create: CreateFn,
    destroy: DestroyFn,
    set_stream: SetStreamFn,
    get_version: GetVersionFn,
    gemm_ex: GemmExFn,
    // Keeps the functions above loaded; dropped last.
    _library: Library,
}

impl CublasLibrary {
    /// Opens the first of [`LIBRARY_NAMES`] the loader finds and resolves the functions; the
    /// error names the libraries tried and where to get one. Needs no GPU.
    pub fn open() -> Result<CublasLibrary> {
        let mut failures = Vec::new();
        for name in LIBRARY_NAMES {
            // SAFETY: loading cuBLAS runs its initialisers, which only set up its own state.
            match unsafe { Library::new(name) } {
                Ok(library) => return CublasLibrary::resolve(name, library),
                Err(e) => failures.push(format!("{name}: {e}")),
            }
        }
        bail!(
            "cuBLAS not found: none of {} is on the library path (LD_LIBRARY_PATH={}); add the \
             folder holding it, e.g. <site-packages>/nvidia/cu13/lib or nvidia/cublas/lib of \
             PyTorch's pip wheels (tools/gpu-check.sh does). Loader errors: {}",
            LIBRARY_NAMES.join(", "),
            std::env::var("LD_LIBRARY_PATH").unwrap_or_default(),
            failures.join("; ")
        )
    }

    fn resolve(name: &'static str, library: Library) -> Result<CublasLibrary> {
        // SAFETY: each symbol is declared above with its C signature from cublas_api.h.
        unsafe {
            let symbol = |sym: &str| format!("{name} has no {sym}");
            // One C function of the library, by its name in cublas_api.h.
            macro_rules! function {
                ($type:ty, $symbol:literal) => {
                    *library
                        .get::<$type>(concat!($symbol, "\0").as_bytes())
                        .with_context(|| symbol($symbol))?
                };
            }
            Ok(CublasLibrary {
                name,
                create: function!(CreateFn, "cublasCreate_v2"),
                destroy: function!(DestroyFn, "cublasDestroy_v2"),
                set_stream: function!(SetStreamFn, "cublasSetStream_v2"),
                get_version: function!(GetVersionFn, "cublasGetVersion_v2"),
                gemm_ex: function!(GemmExFn, "cublasGemmEx"),
                _library: library,
            })
        }
    }
}

/// A cuBLAS handle bound to the CUDA backend's stream, so its products queue between the
/// backend's timing events like any op.
pub struct Cublas {
    library: CublasLibrary,
    handle: Handle,
    /// `cublasGetVersion`, e.g. 130100 for 13.1.0.
    pub version: i32,
}

impl Cublas {
    /// A handle on `cuda`'s device and stream.
    pub fn new(library: CublasLibrary, cuda: &Cuda) -> Result<Cublas> {
        // cuBLAS works in the calling thread's current context: make it the backend's.
        cuda.make_current()?;
        let mut handle: Handle = std::ptr::null_mut();
        // SAFETY: writes one handle.
        check("cublasCreate", unsafe { (library.create)(&mut handle) })?;
        let mut cublas = Cublas {
            library,
            handle,
            version: 0,
        };
        // SAFETY: a live handle and the backend's live stream.
        check("cublasSetStream", unsafe {
            (cublas.library.set_stream)(cublas.handle, cuda.raw_stream())
        })?;
        let mut version = 0;
        // SAFETY: writes one int.
        check("cublasGetVersion", unsafe {
            (cublas.library.get_version)(cublas.handle, &mut version)
        })?;
        cublas.version = version;
        Ok(cublas)
    }

    /// The library's name.
    pub fn library_name(&self) -> &'static str {
        self.library.name
    }

    /// Queues the product of a linear layer with a row-major weight `W[n, k]`, as the
    /// backend's ops compute it: `out[m, n] = X[m, k] · Wᵀ` (`Forward`, `linear`) or
    /// `out[m, k] = X[m, n] · W` (`Backward`, `linear_backward`: X is dY, out is dX). The
    /// operand types and arithmetic are `variant`'s: bf16 in and out for `CublasBf16`, f32
    /// for the other two, accumulation in f32 always. The pointers are device addresses of
    /// buffers that large, of that type.
    #[allow(clippy::too_many_arguments)]
    pub fn linear(
        &self,
        variant: Variant,
        product: Nf4Product,
        m: usize,
        n: usize,
        k: usize,
        x: u64,
        w: u64,
        out: u64,
    ) -> Result<()> {
        let (dtype, compute) = match variant {
            Variant::CublasBf16 => (CUDA_R_16BF, CUBLAS_COMPUTE_32F),
            Variant::CublasTf32 => (CUDA_R_32F, CUBLAS_COMPUTE_32F_FAST_TF32),
            Variant::CublasF32 => (CUDA_R_32F, CUBLAS_COMPUTE_32F),
            other => bail!("{} is not a cuBLAS variant", other.name()),
        };
        let dim = |what: &str, v: usize| {
            c_int::try_from(v).with_context(|| format!("cuBLAS {what} = {v} exceeds int"))
        };
        let (m, n, k) = (dim("m", m)?, dim("n", n)?, dim("k", k)?);
        // cuBLAS is column-major, and a row-major [r, c] buffer read column-major is its
        // transpose [c, r]. Forward: out[m, n] is outᵀ [n, m] = W · Xᵀ, where W's buffer
        // reads as Wᵀ [k, n] (so transpose it back) and X's as Xᵀ [k, m]. Backward:
        // out[m, k] is outᵀ [k, m] = Wᵀ · Xᵀ, W's buffer already Wᵀ [k, n], X's Xᵀ [n, m].
        let (transa, rows, reduction, ldb) = match product {
            Nf4Product::Forward => (CUBLAS_OP_T, n, k, k),
            Nf4Product::Backward => (CUBLAS_OP_N, k, n, n),
        };
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: live handle; alpha/beta are host f32 (the default pointer mode, and the
        // scalar type of a 32F compute type); the caller passes device buffers of the sizes
        // and types above.
        let status = unsafe {
            (self.library.gemm_ex)(
                self.handle,
                transa,
                CUBLAS_OP_N,
                rows,
                m,
                reduction,
                &alpha as *const f32 as *const c_void,
                w as *const c_void,
                dtype,
                k,
                x as *const c_void,
                dtype,
                ldb,
                &beta as *const f32 as *const c_void,
                out as *mut c_void,
                dtype,
                rows,
                compute,
                CUBLAS_GEMM_DEFAULT,
            )
        };
        check("cublasGemmEx", status)
    }
}

impl Drop for Cublas {
    fn drop(&mut self) {
        // SAFETY: the handle was created by this library and is destroyed once.
        unsafe { (self.library.destroy)(self.handle) };
    }
}
