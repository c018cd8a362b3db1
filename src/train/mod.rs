//! Training (in progress).
pub mod batches;
pub mod checkpoint;
pub mod optimizer;
pub mod peft;
pub mod schedule;
