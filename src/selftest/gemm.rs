//! Cases of the GEMM family (cuda/gemm.rs vs cpu/gemm.rs): dense `linear`,
//! `linear_backward` and `linear_weight_grad`, both stores, on every dense-product kernel the
//! card runs (f32 CUDA cores; tensor cores with f16 and, on sm_80+, bf16 operands). The
//! tensor-core kernels are held to [`MMA_ROUNDED_TOLERANCE`] against the CPU product of the
//! operands rounded as the kernel rounds them, and to their operand type's tolerance against
//! the exact f32 product.

use super::{
    dense, nan, round_to_operand, Harness, BF16_OPERAND_TOLERANCE, F16_OPERAND_TOLERANCE,
    F32_OP_TOLERANCE, MMA_ROUNDED_TOLERANCE,
};
use crate::backend::cpu::Cpu;
use crate::backend::cuda::gemm::GemmKernel;
use crate::backend::cuda::nf4::MmaOperands;
use crate::backend::{Backend, Store};

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

pub(super) fn cases(h: &mut Harness) {
    let arch = h.cuda.info().compute_capability;
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
            let (x_r, w_r, dy_r) = (round(&x), round(&w), round(&dy));
            let check = |h: &mut Harness,
                         op: &str,
                         case: String,
                         pair: (Vec<f32>, Vec<f32>),
                         rounded: Vec<f32>| {
                let (exact, gpu) = pair;
                let op = format!("{op} {}", kernel.name());
                match kernel {
                    GemmKernel::F32 => h.record(&op, "f32", case, &exact, &gpu, F32_OP_TOLERANCE),
                    GemmKernel::Mma(operands) => {
                        let dtype = operands.name();
                        let tolerance = MMA_ROUNDED_TOLERANCE;
                        h.record(
                            &op,
                            dtype,
                            format!("{case} vs rounded"),
                            &rounded,
                            &gpu,
                            tolerance,
                        );
                        let tolerance = operand_tolerance(operands);
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
            for store in [Store::Overwrite, Store::Accumulate(0.5)] {
                let overwrite = store == Store::Overwrite;
                let start = if overwrite {
                    nan(rows * out_f)
                } else {
                    out0.clone()
                };
                h.cuda.set_dense_products(kernel);
                let forward = |x: &[f32], w: &[f32]| {
                    let mut out = start.clone();
                    Cpu.linear(
                        &mut out,
                        &x.to_vec(),
                        &dense(&Cpu, w, out_f, in_f),
                        rows,
                        store,
                    );
                    out
                };
                let pair = on_both!(h, |b| {
                    let mut out = b.upload(&start);
                    b.linear(
                        &mut out,
                        &b.upload(&x),
                        &dense(b, &w, out_f, in_f),
                        rows,
                        store,
                    );
                    b.download(&out)
                });
                check(
                    h,
                    "linear (dense)",
                    format!("{shape} {store:?}"),
                    pair,
                    forward(&x_r, &w_r),
                );

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
                check(
                    h,
                    "linear_backward (dense)",
                    case,
                    pair,
                    backward(&dy_r, &w_r),
                );
            }
            let weight_grad = |dy: &[f32], x: &[f32]| {
                let mut dw = dw0.clone();
                Cpu.linear_weight_grad(&mut dw, &dy.to_vec(), &x.to_vec(), rows, in_f, out_f, 0.5);
                dw
            };
            h.cuda.set_dense_products(kernel);
            let pair = on_both!(h, |b| {
                let mut dw = b.upload(&dw0);
                b.linear_weight_grad(
                    &mut dw,
                    &b.upload(&dy),
                    &b.upload(&x),
                    rows,
                    in_f,
                    out_f,
                    0.5,
                );
                b.download(&dw)
            });
            let case = format!("{shape} scale=0.5");
            check(
                h,
                "linear_weight_grad",
                case,
                pair,
                weight_grad(&dy_r, &x_r),
            );
        }
        h.cuda.set_dense_products(GemmKernel::for_arch(arch));
    }
}
