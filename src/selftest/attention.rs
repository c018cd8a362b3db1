//! Cases of the attention family (cuda/attention.rs vs cpu/attention.rs): flash attention's
//! forward (out, lse) and backward (dq, dk, dv, both variants) on the card's operand type,
//! over every combination of sliding window, soft-cap, GQA, head size and packing (all
//! causal), plus edge cases: a 1-token batch, head_dim 40 and 96 (padded), a window longer
//! than the batch, Gemma 2's cap of 50; and the deterministic backward run twice, bit for bit.

use super::{
    half_store_tolerance, nan, packing, round_to_operand, Harness, FLASH_BF16_ROUNDED_TOLERANCE,
    FLASH_BF16_TOLERANCE, FLASH_F16_ROUNDED_TOLERANCE, FLASH_F16_TOLERANCE,
};
use crate::backend::cpu::Cpu;
use crate::backend::cuda::attention::FlashBackward;
use crate::backend::cuda::nf4::MmaOperands;
use crate::backend::{AttentionParams, Backend};
use crate::model::weights::Dtype;

/// Attention settings with the usual `head_dim^-0.5` scale.
fn attention_params(
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    window: Option<usize>,
    softcap: Option<f32>,
) -> AttentionParams {
    AttentionParams {
        heads,
        kv_heads,
        head_dim,
        scale: (head_dim as f32).powf(-0.5),
        softcap,
        window,
    }
}

/// The window of the combination cases: the packed lengths below hold sequences of window
/// - 1, window + 1 and past two windows.
const WINDOW: usize = 16;

/// One case: (sequence lengths, settings, q/k scale).
type Case = (Vec<usize>, AttentionParams, f32);

/// Every combination of window (none, [`WINDOW`]) x soft-cap (none, 5 biting on q/k of scale
/// 3: scores ~ 9) x GQA (2 heads / 2, 4 heads / 2) x head_dim (64, 128, 256) x packing (one
/// sequence of 70: past the 64-row forward tile and every backward tile, or 1, 17, 15 and 33
/// packed), then the edge cases.
pub fn attention_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for window in [None, Some(WINDOW)] {
        for (softcap, input_scale) in [(None, 1.0), (Some(5.0), 3.0)] {
            for (heads, kv_heads) in [(2, 2), (4, 2)] {
                for head_dim in [64, 128, 256] {
                    for lengths in [vec![70], vec![1, 17, 15, 33]] {
                        let params = attention_params(heads, kv_heads, head_dim, window, softcap);
                        cases.push((lengths, params, input_scale));
                    }
                }
            }
        }
    }
    cases.extend([
        (vec![1], attention_params(1, 1, 64, None, None), 1.0),
        (
            vec![5, 2, 9],
            attention_params(2, 2, 96, Some(4), None),
            1.0,
        ),
        (
            vec![40, 1],
            attention_params(8, 1, 40, None, Some(50.0)),
            4.0,
        ),
        (
            vec![33, 17],
            attention_params(2, 1, 256, Some(1000), Some(50.0)),
            4.0,
        ),
        (
            vec![130],
            attention_params(2, 1, 128, Some(63), Some(50.0)),
            4.0,
        ),
    ]);
    cases
}

/// lse against the CPU on the same rounded operands, as max |Δ lse| in nats (lse near 0, as
/// with a lone key, makes a relative error meaningless). lse = log Σ_j exp(c_j) moves by at
/// most max_j |Δc_j| (its gradient is P, which sums to 1; the cap's slope is at most 1), and
/// with identical operands the scores differ only in the order of f32 sums of exact products
/// (and the tensor cores' truncated inner sums): a few ulps of scale·Σ_i |q_i k_i| (under
/// ~200 in these cases), below 1e-4 nats, plus the last ulps of expf/logf. A key masked
/// wrongly, a lost tile or an lse off by ln 2 = 0.69 moves it by far more.
const LSE_ROUNDED_NATS: f64 = 1e-3;

/// lse against the CPU on the exact inputs, as max |Δ lse| in nats: rounding q and k to the
/// operand type moves each score scale·Σ_i q_i k_i by a sum of head_dim independent rounding
/// errors, standard deviation √2·σ²·ρ with scale = head_dim^-0.5, inputs N(0, σ²) (σ ≤ 4 in
/// these cases) and ρ the rms relative rounding error (2^-7·0.21 = 1.7e-3 bf16, 2^-10·0.21 =
/// 2.1e-4 f16): 0.038 and 0.0047 nats at σ = 4; lse moves by at most its largest key's share.
/// Bounds of 8 standard deviations, still under ln 2 so that an lse off by ln 2 fails both
/// comparisons.
fn lse_nats(operands: MmaOperands) -> f64 {
    match operands {
        MmaOperands::Bf16 => 0.3,
        MmaOperands::F16 => 0.04,
    }
}

/// What storing an output in `stored` adds to its bound: one 16-bit rounding
/// ([`half_store_tolerance`]), nothing for f32.
fn store_bound(stored: Dtype) -> f64 {
    match stored {
        Dtype::F32 => 0.0,
        Dtype::F16 | Dtype::BF16 => half_store_tolerance(stored),
    }
}

/// What a 16-bit `out` adds to the bounds of dq and dk: the backward's D = dout · out reads
/// the stored out, each element off by up to u (the unit roundoff: 2^-8 bf16, 2^-11 f16)
/// relative, and every dz_j of the row takes -P_j·slope_j·δD, an error that the cancellation
/// inside dq = scale Σ_j dz_j k_j (Σ_j dz_j ≈ 0) does not shrink like dz's own terms (the CPU
/// reference computes D = Σ_j P_j dP_j and has no out to round). dv does not use D. Measured
/// over seeds 0-4 of these cases: dq and dk against the rounded reference grew by up to 5u
/// (bf16, emu:sm80: 4.8e-3 -> 2.3e-2) and 3u (f16, emu:sm75: 6.4e-4 -> 2.0e-3); bound 8u.
fn out_store_in_gradients(out: Dtype) -> f64 {
    match out {
        Dtype::F32 => 0.0,
        Dtype::F16 => 8.0 * 2f64.powi(-11),
        Dtype::BF16 => 8.0 * 2f64.powi(-8),
    }
}

/// The CPU reference of one case: `[out, lse, dq, dk, dv]`, the backward from the CPU's own
/// forward (it computes D = Σ_j P_j dP_j, so it reads out only for its shape).
fn cpu_reference(
    [q, k, v, dout]: [&[f32]; 4],
    cu: &[usize],
    params: &AttentionParams,
) -> [Vec<f32>; 5] {
    let tokens = *cu.last().unwrap();
    let (mut out, mut lse) = (nan(q.len()), nan(tokens * params.heads));
    let [q, k, v, dout] = [q, k, v, dout].map(<[f32]>::to_vec);
    Cpu.attention(&mut out, &mut lse, &q, &k, &v, cu, params);
    let (mut dq, mut dk, mut dv) = (nan(q.len()), nan(k.len()), nan(k.len()));
    Cpu.attention_backward(
        &mut dq, &mut dk, &mut dv, &dout, &out, &lse, &q, &k, &v, cu, params,
    );
    [out, lse, dq, dk, dv]
}

/// The outputs of a case, in [`cpu_reference`]'s order.
const OUTPUTS: [&str; 5] = ["out", "lse", "dq", "dk", "dv"];

/// Forward (out, lse) and backward (dq, dk, dv; deterministic and atomic) of every case on
/// the card's operand type (f16 on sm_75, bf16 on sm_80+), every output starting as NaN, each
/// backward from its own device's forward (out, lse) as training runs it. Each case runs with
/// q, k, v, out in f32 and again in the card's 16-bit type (as the decoder stores them), dout,
/// dq, dk, dv in f32; the 16-bit run once more with dout, dq, dk, dv 16-bit too (the
/// deterministic backward only: the atomic one adds into an f32 dq). Two references: the CPU
/// on q, k, v, dout rounded to the operand type as the kernels round them (what is left is
/// the rounding of P and dz and the summation order: a tight bound that a wrong mask or tile
/// edge breaks), and the CPU on the exact inputs (the precision a model gets); an output
/// stored in 16 bits has its store in its bound, dq and dk a 16-bit out's too
/// ([`out_store_in_gradients`]); lse is compared in nats. A 16-bit q, k, v must stage the
/// very tiles their f32 values do: lse and the deterministic dv (which does not read out) of
/// the 16-bit run are checked bit for bit against the f32 run's. A 1-token batch has
/// dq = dk = 0 exactly (one key: P = 1, dP = D): checked against 0.
pub(super) fn cases(h: &mut Harness) {
    let operands = MmaOperands::for_arch(h.cuda.info().compute_capability);
    let half = h.cuda.half_dtype();
    let dtype = operands.name();
    let (rounded_tolerance, exact_tolerance) = match operands {
        MmaOperands::Bf16 => (FLASH_BF16_ROUNDED_TOLERANCE, FLASH_BF16_TOLERANCE),
        MmaOperands::F16 => (FLASH_F16_ROUNDED_TOLERANCE, FLASH_F16_TOLERANCE),
    };
    for (index, (lengths, params, input_scale)) in attention_cases().into_iter().enumerate() {
        let (cu, _) = packing(&lengths);
        let tokens = *cu.last().unwrap();
        let AttentionParams {
            heads,
            kv_heads,
            head_dim,
            window,
            softcap,
            ..
        } = params;
        let (q_len, kv_len) = (tokens * heads * head_dim, tokens * kv_heads * head_dim);
        let q = h.random(q_len, input_scale);
        let k = h.random(kv_len, input_scale);
        let v = h.random(kv_len, 1.0);
        let dout = h.random(q_len, 1.0);
        let settings = format!(
            "lengths={lengths:?} heads={heads}/{kv_heads} d={head_dim} window={window:?} cap={softcap:?}"
        );
        let mut exact = cpu_reference([&q, &k, &v, &dout], &cu, &params);
        let rounded = [&q, &k, &v, &dout].map(|x| round_to_operand(x, operands));
        let mut rounded = cpu_reference(
            [&rounded[0], &rounded[1], &rounded[2], &rounded[3]],
            &cu,
            &params,
        );
        if tokens == 1 {
            // Both CPU references hold rounding noise there; the answer is 0.
            for reference in [&mut exact, &mut rounded] {
                reference[2].fill(0.0);
                reference[3].fill(0.0);
            }
        }
        // One output against both references, `extra` added to both bounds; lse in nats.
        let check =
            |h: &mut Harness, op: &str, output: usize, extra: f64, case: String, gpu: &[f32]| {
                let (rounded, exact) = (&rounded[output], &exact[output]);
                if OUTPUTS[output] == "lse" {
                    let op = format!("{op} (nats)");
                    let vs_rounded = format!("{op} vs rounded");
                    h.record_absolute(
                        &vs_rounded,
                        dtype,
                        case.clone(),
                        rounded,
                        gpu,
                        LSE_ROUNDED_NATS,
                    );
                    h.record_absolute(&op, dtype, case, exact, gpu, lse_nats(operands));
                    return;
                }
                let vs_rounded = format!("{op} vs rounded");
                h.record(
                    &vs_rounded,
                    dtype,
                    case.clone(),
                    rounded,
                    gpu,
                    rounded_tolerance + extra,
                );
                h.record(op, dtype, case, exact, gpu, exact_tolerance + extra);
            };
        // The f32 run's lse and deterministic dv, for the 16-bit run's bitwise check.
        let mut f32_run: Option<(Vec<f32>, Vec<f32>)> = None;
        let same_bits = |a: &[f32], b: &[f32]| {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
        };

        for activations in [Dtype::F32, half] {
            let case = |gradients: Dtype| {
                format!("{settings} qkv/out={activations:?} dout/grads={gradients:?}")
            };
            let c = &h.cuda;
            let [q_d, k_d, v_d] = [&q, &k, &v].map(|x| c.upload_as(x, activations));
            let mut out_d = c.upload_as(&nan(q_len), activations);
            let mut lse_d = c.upload(&nan(tokens * heads));
            c.flash_attention(
                &mut out_d, &mut lse_d, &q_d, &k_d, &v_d, &cu, &params, operands,
            );
            let (out_g, lse_g) = (c.download(&out_d), c.download(&lse_d));
            check(
                h,
                "attention out",
                0,
                store_bound(activations),
                case(Dtype::F32),
                &out_g,
            );
            check(h, "attention lse", 1, 0.0, case(Dtype::F32), &lse_g);

            let gradient_types: &[Dtype] = if activations == Dtype::F32 {
                &[Dtype::F32]
            } else {
                &[Dtype::F32, half]
            };
            for &gradients in gradient_types {
                let dout_d = h.cuda.upload_as(&dout, gradients);
                // Both variants (the atomic one only into an f32 dq); the deterministic one a
                // second time on some cases, bit for bit (the emulator runs blocks in a new
                // order every launch, so an order-dependent sum would show).
                let variants: &[FlashBackward] = if gradients == Dtype::F32 {
                    &[FlashBackward::Deterministic, FlashBackward::Atomic]
                } else {
                    &[FlashBackward::Deterministic]
                };
                for &variant in variants {
                    let runs = if index % 4 == 0 && variant == FlashBackward::Deterministic {
                        2
                    } else {
                        1
                    };
                    let op = format!("attention_backward {variant:?}").to_lowercase();
                    let mut first: Option<[Vec<f32>; 3]> = None;
                    for run in 0..runs {
                        let c = &h.cuda;
                        let [mut dq, mut dk, mut dv] =
                            [q_len, kv_len, kv_len].map(|n| c.upload_as(&nan(n), gradients));
                        c.flash_attention_backward(
                            [&mut dq, &mut dk, &mut dv],
                            [&dout_d, &out_d, &lse_d, &q_d, &k_d, &v_d],
                            &cu,
                            &params,
                            operands,
                            variant,
                        );
                        let grads = [c.download(&dq), c.download(&dk), c.download(&dv)];
                        match &first {
                            None => {
                                for (i, grad) in grads.iter().enumerate() {
                                    let through_d = if i < 2 {
                                        out_store_in_gradients(activations)
                                    } else {
                                        0.0
                                    };
                                    let extra = store_bound(gradients) + through_d;
                                    let op = format!("{op} {}", OUTPUTS[2 + i]);
                                    check(h, &op, 2 + i, extra, case(gradients), grad);
                                }
                            }
                            Some(before) => {
                                for (i, grad) in grads.iter().enumerate() {
                                    let same = same_bits(&before[i], grad);
                                    h.record(
                                        &format!("{op} {} rerun, bitwise", OUTPUTS[2 + i]),
                                        dtype,
                                        format!("{} run {run}", case(gradients)),
                                        &[0.0],
                                        &[if same { 0.0 } else { 1.0 }],
                                        0.0,
                                    );
                                }
                            }
                        }
                        first.get_or_insert(grads);
                    }
                    let Some([_, _, dv]) = first else { continue };
                    if variant != FlashBackward::Deterministic || gradients != Dtype::F32 {
                        continue;
                    }
                    match &f32_run {
                        None => f32_run = Some((lse_g.clone(), dv)),
                        Some((f32_lse, f32_dv)) => {
                            for (what, f32_values, values) in
                                [("lse", f32_lse, &lse_g), ("dv", f32_dv, &dv)]
                            {
                                let same = same_bits(f32_values, values);
                                h.record(
                                    &format!("attention {what}: 16-bit q/k/v as f32, bitwise"),
                                    dtype,
                                    case(gradients),
                                    &[0.0],
                                    &[if same { 0.0 } else { 1.0 }],
                                    0.0,
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{compare, compare_absolute};
    use super::*;

    #[test]
    fn lse_near_zero_is_compared_in_nats_and_an_lse_off_by_ln2_fails() {
        // A lone key makes lse that key's score, here near 0: the relative measure divides
        // by max |lse| and fails a device 1e-4 nats off, the absolute one does not.
        let reference = [2e-3f32, -1e-3];
        let device = [2.1e-3f32, -1e-3];
        assert!(compare(&device, &reference).0 > FLASH_BF16_ROUNDED_TOLERANCE);
        assert!(compare_absolute(&device, &reference).0 <= LSE_ROUNDED_NATS);
        // An lse off by ln 2 (its sum of exponentials counted twice) fails every lse bound.
        let planted = reference.map(|x| x + std::f32::consts::LN_2);
        let off = compare_absolute(&planted, &reference).0;
        for bound in [
            LSE_ROUNDED_NATS,
            lse_nats(MmaOperands::Bf16),
            lse_nats(MmaOperands::F16),
        ] {
            assert!(off > bound, "{off} vs {bound}");
        }
        // An unwritten (NaN) value is counted whatever the unit.
        assert_eq!(compare_absolute(&[f32::NAN, -1e-3], &reference).2, 1);
    }
}
