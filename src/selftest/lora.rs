//! Cases of the LoRA family (cuda/lora.rs vs the reference composition, `Backend::lora_linear`'s
//! default as the CPU runs it): the adapted projection's forward and backward (dX, dA, dB)
//! with and without PEFT's dropout, over an NF4 base on the fused tensor-core path (the LoRA
//! term inside the NF4 product), an NF4 base on the paths that add the term separately (GEMV
//! rows, widths off the 16-element group) and a dense base. X also in the card's 16-bit type
//! (the decoder's projection input), the forward's out in 16 bits and in f32 (q, k, v, gate,
//! up vs o, down); dy, dx, dA, dB stay f32.
//!
//! Tolerance: [`lora_tolerance`], twice the operand type's product tolerance against the exact
//! f32 reference. Each output is the sum of two products on rounded operands, and the LoRA
//! term's rank-r factor is itself such a product, rounded again as the next product's operand:
//! two operand roundings in a chain instead of one. A lost LoRA term, a wrong dropout mask or
//! a transposed factor moves outputs by the term's own size (the cases make it comparable
//! with the base product's), far past this. A 16-bit out adds [`super::half_store_tolerance`].

use super::gemm::{activation_types, operand_tolerance, store_term, types_label};
use super::{dense, nan, nf4, Activations, Harness};
use crate::backend::cuda::nf4::MmaOperands;
use crate::backend::{Backend, LoraAdapter, Store};
use crate::model::weights::Dtype;
use crate::quant::nf4::{Nf4Options, Nf4Weight};

/// See the module comment.
pub fn lora_tolerance(operands: MmaOperands) -> f64 {
    2.0 * operand_tolerance(operands)
}

/// The base weight of a case.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Base {
    Nf4,
    Dense,
}

/// `(rows, out, in, rank, base)`: the fused NF4 path at rows 7 and 333 (partial row tiles,
/// rank 7: a rank off the k16 step) and rows 1 (its forward takes the GEMV, then the term
/// separately; its backward is fused), an NF4 width off the group (333: dequantize, then the
/// term), and a dense base.
const LORA_SHAPES: [(usize, usize, usize, usize, Base); 5] = [
    (1, 129, 256, 16, Base::Nf4),
    (7, 200, 320, 7, Base::Nf4),
    (333, 129, 576, 16, Base::Nf4),
    (64, 100, 333, 8, Base::Nf4),
    (7, 129, 333, 16, Base::Dense),
];

pub(super) fn cases(h: &mut Harness) {
    let operands = MmaOperands::for_arch(h.cuda.info().compute_capability);
    let (dtype, tolerance) = (operands.name(), lora_tolerance(operands));
    let half = h.cuda.half_dtype();
    for (rows, out_f, in_f, r, base) in LORA_SHAPES {
        let w = h.random(out_f * in_f, 0.05);
        let q = match base {
            Base::Nf4 => {
                let options = Nf4Options {
                    blocksize: 64,
                    double_quant: true,
                };
                match Nf4Weight::quantize(&w, out_f, in_f, options) {
                    Ok(q) => Some(q),
                    Err(e) => {
                        eprintln!("cannot quantize [{out_f}, {in_f}]: {e:#}");
                        continue;
                    }
                }
            }
            Base::Dense => None,
        };
        // A and B of the size PEFT's init gives A (kaiming-uniform: ~1/sqrt(in)) and a trained
        // B, scale 2: the term s·(X·Aᵀ)·Bᵀ is then about half the base product.
        let a = h.random(r * in_f, 1.0 / (in_f as f32).sqrt());
        let b = h.random(out_f * r, 0.15);
        let x = h.random(rows * in_f, 1.0);
        let dy = h.random(rows * out_f, 1.0);
        let dx0 = h.random(rows * in_f, 1.0);
        let (da0, db0) = (h.random(r * in_f, 1.0), h.random(out_f * r, 1.0));
        for dropout in [None, Some((0.25f32, 7u64))] {
            let case = format!(
                "rows={rows} out={out_f} in={in_f} r={r} base={base:?} dropout={}",
                dropout.map_or("off".into(), |(p, _)| format!("{p}"))
            );
            // The base weight and the adapter's matrices on backend `bk`.
            macro_rules! weights {
                ($bk:expr) => {{
                    let base_w = match &q {
                        Some(q) => nf4($bk, q),
                        None => dense($bk, &w, out_f, in_f),
                    };
                    (base_w, dense($bk, &a, r, in_f), dense($bk, &b, out_f, r))
                }};
            }
            for (x_type, out_type) in activation_types(half) {
                let pair = on_both!(h, |bk| {
                    let (base_w, a_w, b_w) = weights!(bk);
                    let adapter = LoraAdapter {
                        a: &a_w,
                        b: &b_w,
                        scale: 2.0,
                        dropout,
                    };
                    let mut out = bk.upload_act(&nan(rows * out_f), out_type);
                    let x = bk.upload_act(&x, x_type);
                    bk.lora_linear(&mut out, &x, &base_w, &adapter, rows);
                    bk.download(&out)
                });
                h.record(
                    "lora_linear",
                    dtype,
                    format!("{case}{}", types_label(x_type, out_type)),
                    &pair.0,
                    &pair.1,
                    tolerance + store_term(out_type),
                );
            }
            // X as saved for the backward: f32, or the decoder's 16-bit projection input.
            for (x_type, store) in [Dtype::F32, half]
                .into_iter()
                .flat_map(|t| [(t, Store::Overwrite), (t, Store::Accumulate(0.5))])
            {
                let start = match store {
                    Store::Overwrite => nan(rows * in_f),
                    Store::Accumulate(_) => dx0.clone(),
                };
                let (cpu, gpu) = on_both!(h, |bk| {
                    let (base_w, a_w, b_w) = weights!(bk);
                    let adapter = LoraAdapter {
                        a: &a_w,
                        b: &b_w,
                        scale: 2.0,
                        dropout,
                    };
                    let mut dx = bk.upload(&start);
                    let (mut da, mut db) = (bk.upload(&da0), bk.upload(&db0));
                    bk.lora_linear_backward(
                        &mut dx,
                        &bk.upload(&dy),
                        &bk.upload_act(&x, x_type),
                        &base_w,
                        &adapter,
                        rows,
                        store,
                        [&mut da, &mut db],
                    );
                    [bk.download(&dx), bk.download(&da), bk.download(&db)]
                });
                let types = types_label(x_type, Dtype::F32);
                for (i, name) in ["dx", "dA (+=)", "dB (+=)"].into_iter().enumerate() {
                    let op = format!("lora_linear_backward {name}");
                    let case = format!("{case} {store:?}{types}");
                    h.record(&op, dtype, case, &cpu[i], &gpu[i], tolerance);
                }
            }
        }
    }
}
