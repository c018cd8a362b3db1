//! The f32 CPU reference backend: every op of `backend::Backend` as plain Rust over
//! `Vec<f32>`, multi-threaded with rayon. It is the ground truth the CUDA kernels are tested
//! against, so each op favours the obvious formulation over speed, except the linear products,
//! which dominate the time: `gemm.rs` (the `gemm` crate), `nf4.rs` (`matrixmultiply` on
//! dequantized tiles) and, for `--quant bf16` weights, `bf16.rs` (AVX-512 BF16 kernels).
//!
//! One file per op family, forward and backward side by side, as in llm.c.

mod activation;
pub mod adamw;
mod attention;
pub mod bf16;
mod elementwise;
mod embedding;
pub mod gemm;
mod loss;
pub mod nf4;
mod rmsnorm;
mod rope;
pub mod saved;

use super::{
    Activation, AdamWStep, AttentionParams, Backend, BackendInfo, NoHalf, NormStyle, Store, Weight,
    WeightData,
};
use crate::quant::nf4::Nf4Weight;

/// Makes glibc's allocator keep freed memory for reuse. The CPU ops allocate each output
/// (`Vec<f32>`) and the decoder drops a layer's activations before the next layer allocates
/// the same sizes again; by default glibc returns those pages to the kernel (trims the heap,
/// unmaps blocks past 128 KiB..32 MiB), and every layer then page-faults its buffers in anew:
/// 17 % of the CPU forward's time in a profile of SmolLM2-135M at 512 tokens. Process-wide,
/// so the binary and the benches call it first; a no-op off glibc.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // glibc's <malloc.h>: M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD.
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_TOP_PAD: i32 = -2;
        const M_MMAP_THRESHOLD: i32 = -3;
        extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        // SAFETY: mallopt only sets allocator parameters; glibc documents it as callable at
        // any time. Values: never trim, grow the heap 64 MiB at a time, and serve blocks up to
        // glibc's largest mmap threshold (32 MiB) from the heap.
        unsafe {
            mallopt(M_TRIM_THRESHOLD, i32::MAX);
            mallopt(M_TOP_PAD, 64 << 20);
            mallopt(M_MMAP_THRESHOLD, 32 << 20);
        }
    }
}

/// The CPU backend; it runs on rayon's global thread pool.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu;

impl Backend for Cpu {
    type Buf = Vec<f32>;
    type Nf4 = Nf4Weight;
    type Half = NoHalf;
    type Bf16 = bf16::Bf16Weight;
    type Kept = Vec<f32>;

    fn describe(&self) -> BackendInfo {
        BackendInfo {
            device: "cpu".into(),
            name: format!("f32 reference, {} threads", rayon::current_num_threads()),
            peak_reserved_bytes: None,
        }
    }

    fn upload(&self, host: &[f32]) -> Vec<f32> {
        host.to_vec()
    }

    fn upload_nf4(&self, weight: Nf4Weight) -> Nf4Weight {
        weight
    }

    fn upload_vec(&self, host: Vec<f32>) -> Vec<f32> {
        host
    }

    fn upload_bf16(
        &self,
        host: &[f32],
        out_features: usize,
        in_features: usize,
    ) -> Option<bf16::Bf16Weight> {
        Some(bf16::Bf16Weight::pack(host, out_features, in_features))
    }

    /// Exact: the reference keeps f32.
    fn keep(&self, x: &Vec<f32>, _dim: usize) -> Vec<f32> {
        x.clone()
    }

    fn restore(&self, kept: &Vec<f32>) -> Vec<f32> {
        kept.clone()
    }

    fn zeros(&self, len: usize) -> Vec<f32> {
        vec![0.0; len]
    }

    fn download(&self, buf: &Vec<f32>) -> Vec<f32> {
        buf.clone()
    }

    fn copy(&self, buf: &Vec<f32>) -> Vec<f32> {
        buf.clone()
    }

    fn embedding(
        &self,
        out: &mut Vec<f32>,
        table: &WeightData<Cpu>,
        ids: &[u32],
        dim: usize,
        scale: f32,
    ) {
        match table {
            WeightData::Dense(table) => embedding::embedding_forward(out, table, ids, dim, scale),
            WeightData::Nf4(_) | WeightData::Bf16(_) => {
                panic!("embedding: a quantized table (embeddings are never quantized)")
            }
            WeightData::Half(never) => match *never {},
        }
    }

    fn rmsnorm(
        &self,
        out: &mut Vec<f32>,
        x: &Vec<f32>,
        w: &Vec<f32>,
        dim: usize,
        eps: f32,
        style: NormStyle,
    ) {
        rmsnorm::rmsnorm_forward(out, x, w, dim, eps, style);
    }

    fn linear(
        &self,
        out: &mut Vec<f32>,
        x: &Vec<f32>,
        w: &Weight<Self>,
        rows: usize,
        store: Store,
    ) {
        match &w.data {
            WeightData::Dense(values) => {
                gemm::matmul_xwt(out, x, values, rows, w.in_features, w.out_features, store)
            }
            WeightData::Nf4(q) => nf4::store(out, store, |out| nf4::matmul_xwt(x, rows, q, out)),
            WeightData::Bf16(w) => bf16::matmul_xwt(out, x, w, rows, store),
            WeightData::Half(never) => match *never {},
        }
    }

    fn rope(
        &self,
        x: &mut Vec<f32>,
        positions: &[u32],
        inv_freq: &[f32],
        heads: usize,
        head_dim: usize,
    ) {
        rope::rope_forward(x, positions, inv_freq, heads, head_dim);
    }

    fn attention(
        &self,
        out: &mut Vec<f32>,
        lse: &mut Vec<f32>,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        cu_seqlens: &[usize],
        params: &AttentionParams,
    ) {
        attention::attention_forward(out, lse, q, k, v, cu_seqlens, params);
    }

    fn gated_activation(
        &self,
        out: &mut Vec<f32>,
        gate: &Vec<f32>,
        up: &Vec<f32>,
        act: Activation,
    ) {
        activation::gated_activation_forward(out, gate, up, act);
    }

    fn add(&self, acc: &mut Vec<f32>, x: &Vec<f32>) {
        elementwise::add(acc, x);
    }

    fn softcap(&self, x: &mut Vec<f32>, cap: f32) {
        elementwise::softcap(x, cap);
    }

    fn gather_rows(&self, out: &mut Vec<f32>, x: &Vec<f32>, rows: &[usize], dim: usize) {
        embedding::gather_rows(out, x, rows, dim);
    }

    fn rmsnorm_backward(
        &self,
        dx: &mut Vec<f32>,
        dy: &Vec<f32>,
        x: &Vec<f32>,
        w: &Vec<f32>,
        dim: usize,
        eps: f32,
        style: NormStyle,
        store: Store,
    ) {
        rmsnorm::rmsnorm_backward(dx, dy, x, w, dim, eps, style, store);
    }

    fn linear_backward(
        &self,
        dx: &mut Vec<f32>,
        dy: &Vec<f32>,
        w: &Weight<Self>,
        rows: usize,
        store: Store,
    ) {
        match &w.data {
            WeightData::Dense(values) => {
                gemm::matmul_dyw(dx, dy, values, rows, w.in_features, w.out_features, store)
            }
            WeightData::Nf4(q) => nf4::store(dx, store, |dx| nf4::matmul_dyw(dy, rows, q, dx)),
            WeightData::Bf16(w) => bf16::matmul_dyw(dx, dy, w, rows, store),
            WeightData::Half(never) => match *never {},
        }
    }

    fn linear_weight_grad(
        &self,
        dw: &mut Vec<f32>,
        dy: &Vec<f32>,
        x: &Vec<f32>,
        rows: usize,
        in_features: usize,
        out_features: usize,
        scale: f32,
    ) {
        gemm::matmul_dytx(dw, dy, x, rows, in_features, out_features, scale);
    }

    fn rope_backward(
        &self,
        dx: &mut Vec<f32>,
        positions: &[u32],
        inv_freq: &[f32],
        heads: usize,
        head_dim: usize,
    ) {
        rope::rope_backward(dx, positions, inv_freq, heads, head_dim);
    }

    fn attention_backward(
        &self,
        dq: &mut Vec<f32>,
        dk: &mut Vec<f32>,
        dv: &mut Vec<f32>,
        dout: &Vec<f32>,
        out: &Vec<f32>,
        lse: &Vec<f32>,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        cu_seqlens: &[usize],
        params: &AttentionParams,
    ) {
        attention::attention_backward(dq, dk, dv, dout, out, lse, q, k, v, cu_seqlens, params);
    }

    fn gated_activation_backward(
        &self,
        dgate: &mut Vec<f32>,
        dup: &mut Vec<f32>,
        dout: &Vec<f32>,
        gate: &Vec<f32>,
        up: &Vec<f32>,
        act: Activation,
    ) {
        activation::gated_activation_backward(dgate, dup, dout, gate, up, act);
    }

    fn scatter_add_rows(&self, acc: &mut Vec<f32>, x: &Vec<f32>, rows: &[usize], dim: usize) {
        embedding::scatter_add_rows(acc, x, rows, dim);
    }

    fn dropout(&self, x: &mut Vec<f32>, p: f32, seed: u64) {
        elementwise::dropout(x, p, seed);
    }

    fn adamw(
        &self,
        param: &mut Vec<f32>,
        grad: &Vec<f32>,
        m: &mut Vec<f32>,
        v: &mut Vec<f32>,
        step: &AdamWStep,
    ) {
        adamw::adamw(param, grad, m, v, step);
    }

    fn squared_norms(&self, xs: &[&Vec<f32>]) -> Vec<f64> {
        adamw::squared_norms(xs)
    }

    fn softmax_cross_entropy(
        &self,
        dlogits: &mut Vec<f32>,
        logits: &Vec<f32>,
        labels: &[Option<u32>],
        classes: usize,
        smoothing: f32,
        weight: f32,
    ) -> Vec<f32> {
        loss::softmax_cross_entropy(dlogits, logits, labels, classes, smoothing, weight)
    }
}
