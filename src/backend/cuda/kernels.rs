//! CUDA kernels compiled by build.rs and embedded in the binary.
//!
//! Place in the data flow: the ops of `backend` run on the GPU by launching the `extern "C"`
//! entry points of these modules; `backend/cuda` loads each module lazily. One module per
//! `kernels/*.cu` file. Its images (SASS cubins for sm_75, sm_80, sm_86, sm_89, sm_90 and PTX
//! for compute_90, from NVRTC 12, so the cubins load on every driver since R525) are there when
//! build.rs found NVRTC 12; [`load_order`] picks among them as the driver would pick from a
//! fatbin. Its source is always there, so a device no image suits, or a CPU-only build, can
//! still compile the module at run time with NVRTC.

/// What an embedded image holds, for which arch (`75` for sm_75).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// An ELF cubin for sm_XY: runs on sm_X.Z for every Z >= Y, never on another major.
    Sass(u32),
    /// NUL-terminated PTX for compute_XY: the driver JIT-compiles it for any sm_XY or newer,
    /// if the driver is at least as new as the NVRTC that wrote it (12.4 writes ISA 8.4).
    Ptx(u32),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Sass(arch) => write!(f, "sm_{arch} SASS"),
            Target::Ptx(arch) => write!(f, "compute_{arch} PTX"),
        }
    }
}

/// One compiled form of a module.
pub struct KernelImage {
    pub target: Target,
    /// The cubin or the PTX (with its NUL), 16-byte aligned, as `cuModuleLoadData` takes it.
    pub bytes: &'static [u8],
}

/// One `kernels/*.cu` file as embedded at build time.
pub struct KernelModule {
    /// The file's stem: `nf4` for `kernels/nf4.cu`.
    pub name: &'static str,
    /// NVRTC 12's images of the file; empty in a CPU-only build (made without NVRTC 12).
    pub images: &'static [KernelImage],
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

/// Whether every module carries its prebuilt images (false in a CPU-only build).
pub fn prebuilt() -> bool {
    PREBUILT
}

/// The images of `images` a device of `compute_capability` can load, best first, by the
/// rules the driver applies to a fatbin: the SASS of the device's major with the highest
/// minor not above the device's (sm_80 runs on sm_86 and sm_89, never on sm_75 or sm_90),
/// then the PTX of the highest arch not above the device's, which the driver JIT-compiles.
/// Empty when none fits (e.g. sm_70 with these images): NVRTC is then the only way.
pub fn load_order(images: &[KernelImage], compute_capability: (i32, i32)) -> Vec<&KernelImage> {
    let (major, minor) = compute_capability;
    let device = (major * 10 + minor) as u32;
    let best = |fits: &dyn Fn(Target) -> Option<u32>| {
        images
            .iter()
            .filter_map(|image| fits(image.target).map(|arch| (arch, image)))
            .max_by_key(|&(arch, _)| arch)
            .map(|(_, image)| image)
    };
    let sass = best(&|target| match target {
        Target::Sass(arch) if arch / 10 == major as u32 && arch <= device => Some(arch),
        _ => None,
    });
    let ptx = best(&|target| match target {
        Target::Ptx(arch) if arch <= device => Some(arch),
        _ => None,
    });
    sass.into_iter().chain(ptx).collect()
}
