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

/// Value parsers for numeric flags. Each takes what clap would (a leading '-' too: their
/// flags set `allow_negative_numbers`) and refuses a value outside its range by naming the
/// range, so `--lr -1` reads "must be > 0" rather than "unexpected argument '-1'", and
/// `--lr inf` or `nan` never reaches the optimizer.
pub mod range {
    use std::str::FromStr;

    fn number<T: FromStr + Copy + Into<f64>>(s: &str) -> Result<T, String> {
        let v: T = s
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not a number"))?;
        if v.into().is_finite() {
            Ok(v)
        } else {
            Err(format!("{s} is not a finite number"))
        }
    }

    fn within<T: FromStr + Copy + Into<f64>>(
        s: &str,
        ok: impl Fn(f64) -> bool,
        range: &str,
    ) -> Result<T, String> {
        let v = number::<T>(s)?;
        if ok(v.into()) {
            Ok(v)
        } else {
            Err(format!("{s} is out of range: must be {range}"))
        }
    }

    /// A finite number > 0.
    pub fn positive<T: FromStr + Copy + Into<f64>>(s: &str) -> Result<T, String> {
        within(s, |v| v > 0.0, "> 0")
    }

    /// A finite number >= 0.
    pub fn non_negative<T: FromStr + Copy + Into<f64>>(s: &str) -> Result<T, String> {
        within(s, |v| v >= 0.0, ">= 0")
    }

    /// A share in [0, 1).
    pub fn fraction<T: FromStr + Copy + Into<f64>>(s: &str) -> Result<T, String> {
        within(s, |v| (0.0..1.0).contains(&v), "in [0, 1)")
    }

    /// A share in [0, 1].
    pub fn unit<T: FromStr + Copy + Into<f64>>(s: &str) -> Result<T, String> {
        within(s, |v| (0.0..=1.0).contains(&v), "in [0, 1]")
    }

    /// A whole number >= `least` (parsed wide, so "-1" is out of range, not unparsable).
    fn whole_from(s: &str, least: i128) -> Result<usize, String> {
        match s.trim().parse::<i128>() {
            Ok(n) if n >= least && n <= usize::MAX as i128 => Ok(n as usize),
            Ok(_) => Err(format!(
                "{s} is out of range: must be a whole number >= {least}"
            )),
            Err(_) => Err(format!("{s:?} is not a whole number")),
        }
    }

    /// A whole number >= 1.
    pub fn count(s: &str) -> Result<usize, String> {
        whole_from(s, 1)
    }

    /// A whole number >= 0.
    pub fn whole(s: &str) -> Result<usize, String> {
        whole_from(s, 0)
    }
}
