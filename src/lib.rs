//! verdict: fine-tune small LLMs as pairwise preference classifiers.
//!
//! Data flow: `data` (CSV -> Battle -> token ids) -> `model` (decoder + LoRA + heads,
//! running on a `backend`) -> `train` / `predict` -> `ensemble` -> `calibrate` -> submission.
//! The length-bucket `baseline` needs no model at all.

pub mod atomic;
pub mod backend;
pub mod baseline;
pub mod bench;
pub mod bundle;
pub mod calibrate;
pub mod cli;
pub mod data;
pub mod demo;
pub mod ensemble;
pub mod metrics;
pub mod model;
pub mod plot;
pub mod predict;
pub mod probe;
pub mod progress;
pub mod quant;
pub mod rng;
pub mod selftest;
pub mod submission;
pub mod train;
