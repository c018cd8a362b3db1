//! Where a command's model runs, as the user chose it (`--device cpu|cuda|cuda:N|auto`,
//! `--devices 0,1`), and how a command body written once, generic over [`Backend`], is run on
//! the backends that choice opens ([`Job`]).
//!
//! Place in the data flow: between the CLI and the model code. `verdict logits`, `verdict
//! predict` and the demo's prediction stages describe their work as a [`Job`];
//! [`Placement::run`] opens the CPU or the CUDA devices and instantiates the job for that
//! backend type.

use super::cpu::Cpu;
use super::cuda::emu::{self, EmuArch};
use super::cuda::{self, Cuda, Device, Probe};
use super::Backend;
use anyhow::{bail, ensure, Context, Result};
use std::fmt;
use std::str::FromStr;

/// The devices a command runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// The f32 CPU reference.
    Cpu,
    /// These CUDA devices (at least one, each once); work is shared among them.
    Cuda(Vec<usize>),
    /// Emulated devices of these compute capabilities (at least one; the same one may repeat),
    /// with the device memory `--emu-memory` sets.
    Emu(Vec<EmuArch>),
    /// `cuda:0` when the driver sees a CUDA device, else the CPU.
    Auto,
}

impl FromStr for Placement {
    type Err = anyhow::Error;

    /// A `--device` value: `auto` or a [`Device`] (`cpu`, `cuda`, `cuda:N`).
    fn from_str(s: &str) -> Result<Placement> {
        if s == "auto" {
            return Ok(Placement::Auto);
        }
        match s.parse::<Device>() {
            Ok(Device::Cpu) => Ok(Placement::Cpu),
            Ok(Device::Cuda(ordinal)) => Ok(Placement::Cuda(vec![ordinal])),
            Ok(Device::Emu(arch)) => Ok(Placement::Emu(vec![arch])),
            Err(_) => bail!(
                "unknown device {s:?}: expected cpu, cuda, cuda:N (N = 0, 1, ...), emu, \
                 emu:sm75|sm80|sm90 or auto"
            ),
        }
    }
}

impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Placement::Cpu => write!(f, "cpu"),
            Placement::Auto => write!(f, "auto"),
            Placement::Cuda(ordinals) => {
                let names: Vec<String> = ordinals.iter().map(|n| format!("cuda:{n}")).collect();
                write!(f, "{}", names.join(","))
            }
            Placement::Emu(archs) => {
                let names: Vec<String> = archs.iter().map(|a| format!("emu:{a}")).collect();
                write!(f, "{}", names.join(","))
            }
        }
    }
}

impl Placement {
    /// One item of `--devices`: a CUDA ordinal (`0` is `cuda:0`) or a device name.
    pub fn devices_item(name: &str) -> Result<Device> {
        match name.parse::<usize>() {
            Ok(ordinal) => Ok(Device::Cuda(ordinal)),
            Err(_) => name.parse::<Device>(),
        }
    }

    /// The devices of `--devices`: CUDA devices (`0,1`, `cuda:0,cuda:1`), each once, or
    /// emulated devices (`emu,emu`: two of them, each with its own memory).
    pub fn devices(devices: &[Device]) -> Result<Placement> {
        ensure!(!devices.is_empty(), "--devices needs at least one device");
        let (mut ordinals, mut archs) = (Vec::new(), Vec::new());
        for device in devices {
            match *device {
                Device::Cuda(n) => ordinals.push(n),
                Device::Emu(arch) => archs.push(arch),
                Device::Cpu => {}
            }
        }
        if archs.len() == devices.len() {
            return Ok(Placement::Emu(archs));
        }
        ensure!(
            ordinals.len() == devices.len(),
            "--devices takes CUDA devices (0,1 or cuda:0,cuda:1) or emulated ones (emu,emu), \
             not {}",
            devices
                .iter()
                .map(Device::to_string)
                .collect::<Vec<_>>()
                .join(",")
        );
        for (i, n) in ordinals.iter().enumerate() {
            ensure!(
                !ordinals[..i].contains(n),
                "--devices names cuda:{n} twice (one model copy per device)"
            );
        }
        Ok(Placement::Cuda(ordinals))
    }

    /// `Auto` decided by what the driver sees; the others as they are.
    pub fn resolve(&self) -> Placement {
        match self {
            Placement::Auto => match cuda::probe() {
                Probe::Devices(_) => Placement::Cuda(vec![0]),
                Probe::Unavailable(_) => Placement::Cpu,
            },
            other => other.clone(),
        }
    }

    /// Opens the backends and runs `job` on them. Without a CUDA device, asking for one is an
    /// error that says why and what to use instead.
    pub fn run<J: Job>(&self, job: J) -> Result<J::Output> {
        let resolved = self.resolve();
        ensure!(
            !emu::alloc_only() || matches!(resolved, Placement::Emu(_)),
            "--emu-alloc-only ({}=1) applies to emulated devices only, not {resolved}: use \
             --device emu (or emu:sm80, emu:sm90)",
            emu::ALLOC_ONLY_ENV
        );
        match resolved {
            Placement::Cpu | Placement::Auto => job.run(&[Cpu]),
            Placement::Cuda(ordinals) => {
                if let Probe::Unavailable(why) = cuda::probe() {
                    bail!(
                        "{self} was asked for, but {why}; use --device cpu (or --device auto: \
                         the GPU when there is one)"
                    );
                }
                let backends = ordinals
                    .iter()
                    .map(|&n| Cuda::new(n).with_context(|| format!("cannot open cuda:{n}")))
                    .collect::<Result<Vec<Cuda>>>()?;
                job.run(&backends)
            }
            Placement::Emu(archs) => {
                let memory = emu::memory_bytes()?;
                let backends = archs
                    .iter()
                    .enumerate()
                    .map(|(i, &arch)| {
                        Cuda::emulated(i, arch, memory, emu::kernel_library().as_deref())
                    })
                    .collect::<Result<Vec<Cuda>>>()?;
                job.run(&backends)
            }
        }
    }
}

/// A command body written once for every backend type: [`Placement::run`] calls it with the
/// backends it opened (one, or one per device for work that is shared out).
pub trait Job {
    /// What the job returns.
    type Output;
    /// Runs on `backends` (never empty).
    fn run<B: Backend>(self, backends: &[B]) -> Result<Self::Output>;
}

/// `f` on each backend, one thread per backend (loading a model copy on each device at
/// once); results in backend order, the first error if any failed. Each backend is checked
/// ([`Backend::check`]) after `f`, so a failed upload (out of memory) surfaces here.
pub fn on_each<B: Backend, T: Send>(
    backends: &[B],
    f: impl Fn(&B) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    let f = &f;
    std::thread::scope(|s| {
        let handles: Vec<_> = backends
            .iter()
            .map(|b| {
                s.spawn(move || {
                    f(b).and_then(|value| b.check().map(|()| value))
                        .with_context(|| format!("on {}", b.describe().device))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_flag_takes_auto_and_every_device_name() {
        assert_eq!("auto".parse::<Placement>().unwrap(), Placement::Auto);
        assert_eq!("cpu".parse::<Placement>().unwrap(), Placement::Cpu);
        assert_eq!(
            "cuda".parse::<Placement>().unwrap(),
            Placement::Cuda(vec![0])
        );
        assert_eq!(
            "cuda:1".parse::<Placement>().unwrap(),
            Placement::Cuda(vec![1])
        );
        let err = "cuda:x".parse::<Placement>().unwrap_err().to_string();
        assert!(err.contains("cuda:N") && err.contains("auto"), "{err}");
    }

    #[test]
    fn devices_list_refuses_repeats_and_prints_as_given() {
        let names = |list: &str| {
            list.split(',')
                .map(|name| Placement::devices_item(name).unwrap())
                .collect::<Vec<_>>()
        };
        let p = Placement::devices(&names("0,1")).unwrap();
        assert_eq!(p.to_string(), "cuda:0,cuda:1");
        assert_eq!(
            Placement::devices(&names("cuda:1,0")).unwrap().to_string(),
            "cuda:1,cuda:0"
        );
        assert!(Placement::devices(&names("1,1")).is_err());
        assert!(Placement::devices(&names("cuda:1,1")).is_err());
        assert!(Placement::devices(&[]).is_err());
        // Emulated devices may repeat: each is a device of its own.
        assert_eq!(
            Placement::devices(&names("emu,emu")).unwrap().to_string(),
            "emu:sm75,emu:sm75"
        );
        let err = Placement::devices(&names("emu,0")).unwrap_err().to_string();
        assert!(err.contains("not emu:sm75,cuda:0"), "{err}");
        assert!(Placement::devices_item("a").is_err());
        assert!(Placement::devices(&names("cpu")).is_err());
    }
}
