//! Compute ops: one signature per op, a plain f32 CPU reference, CUDA kernels later.
