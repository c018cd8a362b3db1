//! Cases of the NF4 family (cuda/nf4.rs vs cpu/nf4.rs): every NF4 kernel the card runs, both
//! products, both absmax modes, against the CPU product on operands rounded as the kernel
//! rounds them; the forward also on a 16-bit X into a 16-bit and an f32 out (the decoder's
//! projections), the backward also on a 16-bit dY into a 16-bit dX (the scalar loads of a
//! reduction length off a multiple of 4, and the backward's typed store).

use super::gemm::{activation_types, round_to, store_term, types_label};
use super::{
    dense, half_store_tolerance, nan, nf4, Harness, BF16_OPERAND_TOLERANCE, F16_OPERAND_TOLERANCE,
    MMA_ROUNDED_TOLERANCE,
};
use crate::backend::cpu::Cpu;
use crate::backend::cuda::nf4::{MmaOperands, Nf4Kernel, Nf4Product};
use crate::backend::{Backend, Store, Weight};
use crate::model::weights::Dtype;
use crate::quant::nf4::{Nf4Options, Nf4Weight};

/// `values` rounded to the tensor cores' operand type, as nf4.cu rounds X and each decoded
/// weight (round to nearest even).
pub fn round_to_operand(values: &[f32], operands: MmaOperands) -> Vec<f32> {
    match operands {
        MmaOperands::Bf16 => values
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_f32())
            .collect(),
        MmaOperands::F16 => values
            .iter()
            .map(|&v| half::f16::from_f32(v).to_f32())
            .collect(),
    }
}

/// The CPU reference of an NF4 product: `start` updated by `linear` (forward) or
/// `linear_backward` (backward) with weight `w`.
fn cpu_product(
    product: Nf4Product,
    input: &[f32],
    w: &Weight<Cpu>,
    rows: usize,
    store: Store,
    start: &[f32],
) -> Vec<f32> {
    let mut out = start.to_vec();
    let input = input.to_vec();
    match product {
        Nf4Product::Forward => Cpu.linear(&mut out, &input, w, rows, store),
        Nf4Product::Backward => Cpu.linear_backward(&mut out, &input, w, rows, store),
    }
    out
}

/// The selftest's NF4 product shapes `(rows, out_features, in_features)`: rows 1, 7, 16, 333
/// and 512 (GEMV and tensor-core paths, partial row tiles), odd output features (partial
/// column tiles), in_features multiples of 64 plus 336 (21 groups of 16: a partial K tile,
/// and blocks of 64 that straddle weight rows) and 333 (the dequantize-then-GEMM fallback).
pub const NF4_PRODUCT_SHAPES: [(usize, usize, usize); 6] = [
    (1, 129, 256),
    (7, 1001, 320),
    (16, 257, 2304),
    (333, 1001, 576),
    (512, 383, 336),
    (64, 129, 333),
];

/// Every NF4 kernel this card can run (Nf4Kernel::applicable), forward and backward, both
/// absmax modes and both stores, on poisoned or random starting outputs, in the activation
/// types of the module comment. Tensor-core kernels are held to [`MMA_ROUNDED_TOLERANCE`]
/// against the reference on rounded operands, and once per shape and types to the operand
/// type's tolerance against the exact f32 reference; GEMV and the dequantize fallback compute
/// in f32. A 16-bit out adds [`half_store_tolerance`].
pub(super) fn cases(h: &mut Harness) {
    let arch = h.cuda.info().compute_capability;
    let half = h.cuda.half_dtype();
    for (rows, out_f, in_f) in NF4_PRODUCT_SHAPES {
        let w = h.random(out_f * in_f, 0.05);
        let shape = format!("rows={rows} out={out_f} in={in_f}");
        for double_quant in [true, false] {
            let options = Nf4Options {
                blocksize: 64,
                double_quant,
            };
            let q = match Nf4Weight::quantize(&w, out_f, in_f, options) {
                Ok(q) => q,
                Err(e) => {
                    eprintln!("cannot quantize {shape}: {e:#}");
                    continue;
                }
            };
            let absmax = if double_quant { "nested" } else { "plain" };
            let gpu = h
                .cuda
                .download(&h.cuda.nf4_dequantize(&h.cuda.upload_nf4(q.clone())));
            h.op(
                "nf4_dequantize",
                format!("{shape} blocksize=64 absmax={absmax}"),
                (q.dequantize(), gpu),
            );
            let exact = nf4(&Cpu, &q);
            for product in [Nf4Product::Forward, Nf4Product::Backward] {
                let (n, k) = product.output_and_reduction(out_f, in_f);
                let input = h.random(rows * k, 1.0);
                let out0 = h.random(rows * n, 1.0);
                let types = match product {
                    Nf4Product::Forward => activation_types(half).to_vec(),
                    Nf4Product::Backward => vec![(Dtype::F32, Dtype::F32), (half, half)],
                };
                for kernel in Nf4Kernel::applicable(product, rows, in_f, arch) {
                    for &types in &types {
                        let what = Nf4Case {
                            product,
                            kernel,
                            shape: (rows, out_f, in_f),
                            types,
                            double_quant,
                        };
                        nf4_case(h, &q, &exact, what, &input, &out0);
                    }
                }
            }
        }
    }
}

/// What one NF4 case computes: `product` on `kernel` for `shape` `(rows, out, in)`, with the
/// input and output activation types `types`.
struct Nf4Case {
    product: Nf4Product,
    kernel: Nf4Kernel,
    shape: (usize, usize, usize),
    types: (Dtype, Dtype),
    double_quant: bool,
}

/// One case, both stores (poisoned out, or `out0` updated): `input` and `out0` are rounded to
/// the case's types, so the references see what the device holds.
fn nf4_case(
    h: &mut Harness,
    q: &Nf4Weight,
    exact: &Weight<Cpu>,
    case: Nf4Case,
    input: &[f32],
    out0: &[f32],
) {
    let Nf4Case {
        product,
        kernel,
        shape: (rows, out_f, in_f),
        types: (x_type, out_type),
        double_quant,
    } = case;
    let operands = match kernel {
        Nf4Kernel::Mma(operands) => Some(operands),
        Nf4Kernel::Gemv | Nf4Kernel::Dequantized => None,
    };
    let dtype = operands.map_or("f32", MmaOperands::name);
    let input = round_to(input, x_type);
    let rounded = operands.map(|op| {
        let dense = round_to_operand(&q.dequantize(), op);
        (round_to_operand(&input, op), dense)
    });
    let absmax = if double_quant { "nested" } else { "plain" };
    let name = format!(
        "rows={rows} out={out_f} in={in_f} absmax={absmax}{}",
        types_label(x_type, out_type)
    );
    let stored = store_term(out_type);
    for store in [Store::Overwrite, Store::Accumulate(0.5)] {
        let start = match store {
            Store::Overwrite => nan(out0.len()),
            Store::Accumulate(_) => round_to(out0, out_type),
        };
        let gpu = {
            let c = &h.cuda;
            let mut out = c.upload_as(&start, out_type);
            let (x, w) = (c.upload_as(&input, x_type), c.upload_nf4(q.clone()));
            c.nf4_product(product, &mut out, &x, &w, rows, store, kernel);
            c.download(&out)
        };
        let exact_ref = cpu_product(product, &input, exact, rows, store, &start);
        let op = format!("nf4 {product:?} {}", kernel.name());
        let case = format!("{name} {store:?}");
        match (&rounded, operands) {
            (Some((input_r, dense_r)), Some(operands)) => {
                let w_r = dense(&Cpu, dense_r, out_f, in_f);
                let reference = cpu_product(product, input_r, &w_r, rows, store, &start);
                h.record(
                    &op,
                    dtype,
                    format!("{case} vs rounded"),
                    &reference,
                    &gpu,
                    MMA_ROUNDED_TOLERANCE + stored,
                );
                if store == Store::Overwrite && double_quant {
                    let tolerance = match operands {
                        MmaOperands::Bf16 => BF16_OPERAND_TOLERANCE,
                        MmaOperands::F16 => F16_OPERAND_TOLERANCE,
                    };
                    h.record(
                        &op,
                        dtype,
                        format!("{case} vs f32"),
                        &exact_ref,
                        &gpu,
                        tolerance + stored,
                    );
                }
            }
            _ => {
                let tolerance = half_store_tolerance(out_type);
                h.record(&op, dtype, case, &exact_ref, &gpu, tolerance)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::compare;
    use super::*;
    use crate::rng::Rng;

    /// The tolerances against the exact f32 reference must cover the operands' own rounding
    /// with room to spare (a false failure on a GPU costs a lease), yet stay tight enough to
    /// catch a kernel that rounds to the wrong type: measures that rounding on the CPU, on
    /// the selftest's shapes and input distributions.
    #[test]
    fn operand_rounding_error_stays_under_the_operand_tolerances() {
        let mut rng = Rng::new(7);
        let mut worst = [0.0f64; 2];
        for (rows, out_f, in_f) in NF4_PRODUCT_SHAPES {
            if in_f % crate::backend::cuda::nf4::NF4_GROUP != 0 {
                continue; // the dequantize fallback computes in f32
            }
            let w: Vec<f32> = (0..out_f * in_f)
                .map(|_| rng.normal() as f32 * 0.05)
                .collect();
            let q = Nf4Weight::quantize(&w, out_f, in_f, Nf4Options::default()).unwrap();
            let exact = nf4(&Cpu, &q);
            for product in [Nf4Product::Forward, Nf4Product::Backward] {
                let (n, k) = product.output_and_reduction(out_f, in_f);
                let input: Vec<f32> = (0..rows * k).map(|_| rng.normal() as f32).collect();
                let start = vec![f32::NAN; rows * n];
                let reference =
                    cpu_product(product, &input, &exact, rows, Store::Overwrite, &start);
                for (i, operands) in [MmaOperands::Bf16, MmaOperands::F16]
                    .into_iter()
                    .enumerate()
                {
                    let w_r = dense(
                        &Cpu,
                        &round_to_operand(&q.dequantize(), operands),
                        out_f,
                        in_f,
                    );
                    let input_r = round_to_operand(&input, operands);
                    let rounded =
                        cpu_product(product, &input_r, &w_r, rows, Store::Overwrite, &start);
                    let (max_rel, _, non_finite) = compare(&rounded, &reference);
                    assert_eq!(non_finite, 0);
                    worst[i] = worst[i].max(max_rel);
                }
            }
        }
        eprintln!(
            "operand rounding, worst max_rel: bf16 {:.2e}, f16 {:.2e}",
            worst[0], worst[1]
        );
        assert!(
            worst[0] <= BF16_OPERAND_TOLERANCE / 2.0,
            "bf16: {:.2e}",
            worst[0]
        );
        assert!(
            worst[1] <= F16_OPERAND_TOLERANCE / 2.0,
            "f16: {:.2e}",
            worst[1]
        );
        // A kernel that rounded to bf16 where it should use fp16 would not pass the fp16 bound.
        assert!(worst[0] > F16_OPERAND_TOLERANCE, "bf16: {:.2e}", worst[0]);
    }
}
