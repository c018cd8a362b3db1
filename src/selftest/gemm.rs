//! Cases of the GEMM family (cuda/gemm.rs vs cpu/gemm.rs): dense `linear`,
//! `linear_backward` and `linear_weight_grad`, both stores, on every dense-product kernel the
//! card runs (f32 CUDA cores; tensor cores with f16 and, on sm_80+, bf16 operands). The
//! tensor-core kernels are held to [`MMA_ROUNDED_TOLERANCE`] against the CPU product of the
//! operands rounded as the kernel rounds them, and to their operand type's tolerance against
//! the exact f32 product. The forward also runs on a 16-bit X (the card's activation type)
//! into a 16-bit and an f32 out, the weight gradient on a 16-bit X (read transposed), as the
//! mixed-precision decoder calls them, and the forward on X of the other 16-bit type (the
//! kernels widen it and round it to their operand type); the references see the same rounded
//! values, and a 16-bit out adds [`half_store_tolerance`] to the bounds.

use super::{
    dense, half_store_tolerance, nan, round_to_operand, Activations, Harness,
    BF16_OPERAND_TOLERANCE, F16_OPERAND_TOLERANCE, MMA_ROUNDED_TOLERANCE,
};
use crate::backend::cpu::Cpu;
use crate::backend::cuda::gemm::GemmKernel;
use crate::backend::cuda::nf4::MmaOperands;
use crate::backend::{Backend, Store};
use crate::model::weights::Dtype;

/// `(rows, in, out)`: rows 1, 7, 333 and 64; in and out off any multiple of 16 (partial K
/// steps and column tiles) and up to 2304 (a Gemma2-2B hidden row).
pub const GEMM_SHAPES: [(usize, usize, usize); 4] =
    [(1, 64, 3), (7, 333, 129), (333, 256, 1000), (64, 2304, 256)];

/// The bound of a tensor-core product against the exact f32 one: its operands' rounding.
pub fn operand_tolerance(operands: MmaOperands) -> f64 {
    match operands {
        MmaOperands::Bf16 => BF16_OPERAND_TOLERANCE,
        MmaOperands::F16 => F16_OPERAND_TOLERANCE,
    }
}

/// `(input, output)` activation types of a product's cases: all f32, and the decoder's 16-bit
/// input (`half`, the card's type) into a 16-bit and into an f32 output.
pub(super) fn activation_types(half: Dtype) -> [(Dtype, Dtype); 3] {
    [(Dtype::F32, Dtype::F32), (half, half), (half, Dtype::F32)]
}

/// The case-name suffix of activation types other than f32.
pub(super) fn types_label(input: Dtype, output: Dtype) -> String {
    match (input, output) {
        (Dtype::F32, Dtype::F32) => String::new(),
        _ => format!(" x={input:?} out={output:?}"),
    }
}

/// `values` rounded to `dtype`, as an activation buffer of that type holds them.
pub(super) fn round_to(values: &[f32], dtype: Dtype) -> Vec<f32> {
    values.iter().map(|&v| dtype.round(v)).collect()
}

/// What a 16-bit output's store adds to a product's bound (nothing for f32).
pub(super) fn store_term(output: Dtype) -> f64 {
    match output {
        Dtype::F32 => 0.0,
        _ => half_store_tolerance(output),
    }
}

pub(super) fn cases(h: &mut Harness) {
    let arch = h.cuda.info().compute_capability;
    let half = h.cuda.half_dtype();
    for (rows, in_f, out_f) in GEMM_SHAPES {
        let x = h.random(rows * in_f, 1.0);
        let w = h.random(out_f * in_f, 0.05);
        let out0 = h.random(rows * out_f, 1.0);
        let dy = h.random(rows * out_f, 1.0);
        let dx0 = h.random(rows * in_f, 1.0);
        let dw0 = h.random(out_f * in_f, 1.0);
        let shape = format!("rows={rows} in={in_f} out={out_f}");
        for kernel in GemmKernel::applicable(arch) {
            // What the kernel's operands are: the inputs themselves (f32) or rounded.
            let round = |v: &[f32]| match kernel {
                GemmKernel::F32 => v.to_vec(),
                GemmKernel::Mma(op) => round_to_operand(v, op),
            };
            let (w_r, dy_r) = (round(&w), round(&dy));
            // `stored`: the output's type.
            let check = |h: &mut Harness,
                         op: &str,
                         case: String,
                         pair: (Vec<f32>, Vec<f32>),
                         rounded: Vec<f32>,
                         stored: Dtype| {
                let (exact, gpu) = pair;
                let op = format!("{op} {}", kernel.name());
                match kernel {
                    GemmKernel::F32 => {
                        let tolerance = half_store_tolerance(stored);
                        h.record(&op, "f32", case, &exact, &gpu, tolerance)
                    }
                    GemmKernel::Mma(operands) => {
                        let dtype = operands.name();
                        let tolerance = MMA_ROUNDED_TOLERANCE + store_term(stored);
                        h.record(
                            &op,
                            dtype,
                            format!("{case} vs rounded"),
                            &rounded,
                            &gpu,
                            tolerance,
                        );
                        let tolerance = operand_tolerance(operands) + store_term(stored);
                        h.record(
                            &op,
                            dtype,
                            format!("{case} vs f32"),
                            &exact,
                            &gpu,
                            tolerance,
                        );
                    }
                }
            };
            // Plus X of the other 16-bit type (f16 data into a bf16 kernel and the reverse):
            // widened exactly, rounded once to the operand type.
            let other = match half {
                Dtype::BF16 => Dtype::F16,
                _ => Dtype::BF16,
            };
            let types = activation_types(half).into_iter().chain([(other, half)]);
            for (x_type, out_type) in types {
                let x_r = round(&round_to(&x, x_type));
                let types = types_label(x_type, out_type);
                for store in [Store::Overwrite, Store::Accumulate(0.5)] {
                    let start = match store {
                        Store::Overwrite => nan(rows * out_f),
                        Store::Accumulate(_) => round_to(&out0, out_type),
                    };
                    h.cuda.set_dense_products(kernel);
                    let forward = |x: &[f32], w: &[f32]| {
                        let mut out = start.clone();
                        let w = dense(&Cpu, w, out_f, in_f);
                        Cpu.linear(&mut out, &x.to_vec(), &w, rows, store);
                        out
                    };
                    let pair = on_both!(h, |b| {
                        let mut out = b.upload_act(&start, out_type);
                        let x = b.upload_act(&x, x_type);
                        b.linear(&mut out, &x, &dense(b, &w, out_f, in_f), rows, store);
                        b.download(&out)
                    });
                    let case = format!("{shape} {store:?}{types}");
                    let rounded = forward(&x_r, &w_r);
                    check(h, "linear (dense)", case, pair, rounded, out_type);
                }
            }
            for store in [Store::Overwrite, Store::Accumulate(0.5)] {
                let overwrite = store == Store::Overwrite;
                let start = if overwrite {
                    nan(rows * in_f)
                } else {
                    dx0.clone()
                };
                let backward = |dy: &[f32], w: &[f32]| {
                    let mut dx = start.clone();
                    let w = dense(&Cpu, w, out_f, in_f);
                    Cpu.linear_backward(&mut dx, &dy.to_vec(), &w, rows, store);
                    dx
                };
                h.cuda.set_dense_products(kernel);
                let pair = on_both!(h, |b| {
                    let mut dx = b.upload(&start);
                    let w = dense(b, &w, out_f, in_f);
                    b.linear_backward(&mut dx, &b.upload(&dy), &w, rows, store);
                    b.download(&dx)
                });
                let case = format!("{shape} {store:?}");
                let rounded = backward(&dy_r, &w_r);
                check(
                    h,
                    "linear_backward (dense)",
                    case,
                    pair,
                    rounded,
                    Dtype::F32,
                );
            }
            let weight_grad = |dy: &[f32], x: &[f32]| {
                let mut dw = dw0.clone();
                Cpu.linear_weight_grad(&mut dw, &dy.to_vec(), &x.to_vec(), rows, in_f, out_f, 0.5);
                dw
            };
            // X as saved for the backward: f32, or the decoder's 16-bit projection input.
            for x_type in [Dtype::F32, half] {
                h.cuda.set_dense_products(kernel);
                let pair = on_both!(h, |b| {
                    let mut dw = b.upload(&dw0);
                    let (dy, x) = (b.upload(&dy), b.upload_act(&x, x_type));
                    b.linear_weight_grad(&mut dw, &dy, &x, rows, in_f, out_f, 0.5);
                    b.download(&dw)
                });
                let case = format!("{shape} scale=0.5{}", types_label(x_type, Dtype::F32));
                let rounded = weight_grad(&dy_r, &round(&round_to(&x, x_type)));
                check(h, "linear_weight_grad", case, pair, rounded, Dtype::F32);
            }
        }
        h.cuda.set_dense_products(GemmKernel::for_arch(arch));
    }
}
