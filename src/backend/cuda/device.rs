//! What the user chooses: the device a command runs on (`cpu`, `cuda`, `cuda:N`, `emu`,
//! `emu:smXY`) and where the CUDA kernels come from (`VERDICT_KERNELS`). Parsing only, so it is
//! tested without a GPU.

use super::emu::EmuArch;
use anyhow::{bail, Result};
use std::fmt;
use std::str::FromStr;

/// A device as named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// The f32 CPU reference backend.
    Cpu,
    /// CUDA device with this ordinal (`cuda` is `cuda:0`).
    Cuda(usize),
    /// The emulated device of this compute capability (`emu` is `emu:sm75`, a T4).
    Emu(EmuArch),
}

impl FromStr for Device {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Device> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            "emu" => Ok(Device::Emu(EmuArch::Sm75)),
            _ => {
                if let Some(arch) = s.strip_prefix("emu:") {
                    return Ok(Device::Emu(arch.parse()?));
                }
                match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                    Some(Ok(ordinal)) => Ok(Device::Cuda(ordinal)),
                    _ => bail!(
                        "unknown device {s:?}: expected cpu, cuda, cuda:N (N = 0, 1, ...), emu or \
                         emu:sm75|sm80|sm90"
                    ),
                }
            }
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(ordinal) => write!(f, "cuda:{ordinal}"),
            Device::Emu(arch) => write!(f, "emu:{arch}"),
        }
    }
}

/// The environment variable that chooses [`KernelSource`].
pub const KERNELS_ENV: &str = "VERDICT_KERNELS";

/// Where kernel modules come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelSource {
    /// The embedded image for the card (`kernels::load_order`); NVRTC on the embedded source
    /// when none fits the card or loads, or the build had none.
    Auto,
    /// The embedded images only: a module none of whose images loads is an error.
    Prebuilt,
    /// NVRTC on the embedded source always (tests the fallback on a machine whose driver
    /// would load the embedded images).
    Nvrtc,
}

impl KernelSource {
    /// The choice from the value of `VERDICT_KERNELS` (unset or empty: `auto`).
    pub fn from_env_value(value: Option<&str>) -> Result<KernelSource> {
        match value.unwrap_or("") {
            "" | "auto" => Ok(KernelSource::Auto),
            "prebuilt" => Ok(KernelSource::Prebuilt),
            "nvrtc" => Ok(KernelSource::Nvrtc),
            other => bail!("{KERNELS_ENV}={other:?}: expected auto, prebuilt or nvrtc"),
        }
    }

    /// The choice from the environment.
    pub fn from_env() -> Result<KernelSource> {
        KernelSource::from_env_value(std::env::var(KERNELS_ENV).ok().as_deref())
    }
}
