//! Weight quantization (bitsandbytes-exact NF4), and the choice a loader is given.
//!
//! Place in the data flow: a command's `--quant` flags become a [`Quant`]; `model::Model::load`
//! passes it to `model::decoder`, which quantizes each dense projection right after reading it
//! from the memory-mapped checkpoint (so no more than one f32 projection exists at a time).
//! A bitsandbytes 4-bit checkpoint is NF4 whatever [`Quant`] says.

pub mod nf4;

use anyhow::{bail, Result};
use nf4::{Nf4Options, DEFAULT_BLOCKSIZE};
use serde::{Deserialize, Serialize};

/// How the decoder's seven projections per layer are held after loading. Embeddings, norms
/// and heads always keep their dtype (f32 on the CPU).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Quant {
    /// As stored: dense f32 on the CPU, NF4 for the quantized weights of a bnb-4bit checkpoint.
    #[default]
    None,
    /// Every dense projection rounded to bf16 while loading, products summed in f32 (CPU
    /// only: half the memory of f32, and AVX-512 BF16 products where the CPU has them).
    Bf16,
    /// Quantize every dense projection to NF4 while loading (QLoRA's base model).
    Nf4(Nf4Options),
}

/// The quantization flags of every command that loads a model.
#[derive(clap::Args, Debug, Clone, Copy, Default)]
pub struct QuantArgs {
    /// Projection weights: "none" (as stored; f32 on the CPU), "bf16" (CPU only: rounded
    /// to bf16 while loading, f32 sums) or "nf4" (bitsandbytes NF4, quantized while loading;
    /// a bitsandbytes 4-bit checkpoint is NF4 either way).
    #[arg(long, value_enum, default_value_t = QuantKind::None)]
    pub quant: QuantKind,
    /// NF4 elements per absmax block: a power of two in 32..=4096 [default: 64].
    #[arg(long)]
    pub nf4_blocksize: Option<usize>,
    /// Keep one f32 absmax per NF4 block instead of double-quantizing them to 8 bits
    /// (4.5 instead of 4.127 bits per parameter at blocksize 64).
    #[arg(long)]
    pub no_double_quant: bool,
}

/// `--quant` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum QuantKind {
    /// Weights as stored.
    #[default]
    None,
    /// bf16 projections (CPU only).
    Bf16,
    /// NF4 with double quantization, blocksize 64 (QLoRA's setting).
    Nf4,
}

impl QuantArgs {
    /// The [`Quant`] these flags ask for; NF4 options without `--quant nf4` are an error.
    pub fn quant(&self) -> Result<Quant> {
        match self.quant {
            QuantKind::None | QuantKind::Bf16 => {
                if self.nf4_blocksize.is_some() || self.no_double_quant {
                    bail!("--nf4-blocksize and --no-double-quant need --quant nf4");
                }
                Ok(match self.quant {
                    QuantKind::Bf16 => Quant::Bf16,
                    _ => Quant::None,
                })
            }
            QuantKind::Nf4 => {
                let options = Nf4Options {
                    blocksize: self.nf4_blocksize.unwrap_or(DEFAULT_BLOCKSIZE),
                    double_quant: !self.no_double_quant,
                };
                options.check()?;
                Ok(Quant::Nf4(options))
            }
        }
    }
}
