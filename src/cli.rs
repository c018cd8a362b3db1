//! Flag groups shared by the commands that run a model, and the check for a flag that a
//! command's fit mode needs (clap cannot require it while an `apply` subcommand exists).
//! Each command's own flags live with its code (`predict::Args`, `ensemble::Args`, ...).

use crate::backend::placement::Placement;
use anyhow::{Context, Result};

/// Where the model runs.
#[derive(clap::Args, Debug, Clone)]
pub struct DeviceArgs {
    /// cpu, cuda, cuda:N, auto (cuda:0 when the driver sees a GPU, else the CPU), or the
    /// emulated GPU: emu (a T4), emu:sm80, emu:sm90.
    #[arg(long, default_value = "cpu")]
    pub device: Placement,
}

/// `value`, or an error naming the missing `flag`.
pub fn required<T>(value: Option<T>, flag: &str) -> Result<T> {
    value.with_context(|| format!("missing {flag}"))
}
