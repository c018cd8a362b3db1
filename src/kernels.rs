//! CUDA kernels compiled by build.rs and embedded in the binary.
