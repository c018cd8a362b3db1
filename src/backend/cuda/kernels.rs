//! CUDA kernels compiled by build.rs and embedded in the binary.
//!
//! Place in the data flow: the ops of `backend` run on the GPU by launching the `extern "C"`
//! entry points of these modules; `backend/cuda` loads each module lazily. One module per
//! `kernels/*.cu` file. Its fatbin (SASS for sm_75, sm_80, sm_86, sm_89, sm_90 and PTX for
//! compute_90, built with CUDA 13, so it needs a driver >= 580) is there when build.rs found
//! nvcc; its source is always there, so a machine whose driver rejects the fatbin (CUDA 12 on
//! Kaggle) or a CPU-only build can still compile the module at run time with NVRTC.

/// One `kernels/*.cu` file as embedded at build time.
pub struct KernelModule {
    /// The file's stem: `nf4` for `kernels/nf4.cu`.
    pub name: &'static str,
    /// nvcc's fatbin for the file; `None` in a CPU-only build (made without nvcc).
    pub fatbin: Option<&'static [u8]>,
    /// The file's text, exactly as in the repository.
    pub source: &'static str,
    /// The text with its `#include "*.cuh"` files inlined (and `#line` markers), so NVRTC
    /// compiles it with no include path.
    pub standalone_source: &'static str,
}

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// Every embedded module, sorted by name.
pub fn modules() -> &'static [KernelModule] {
    MODULES
}

/// The module built from `kernels/<name>.cu`, if that file exists.
pub fn module(name: &str) -> Option<&'static KernelModule> {
    MODULES.iter().find(|m| m.name == name)
}

/// Whether every module carries an nvcc-built fatbin (false in a CPU-only build).
pub fn prebuilt() -> bool {
    PREBUILT
}
