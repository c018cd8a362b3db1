//! Cases of the attention family (cuda/attention.rs vs cpu/attention.rs): flash attention's
//! forward (out, lse) and backward (dq, dk, dv, both variants) on the card's operand type,
//! over every combination of sliding window, soft-cap, GQA, head size and packing (all
//! causal), plus edge cases: a 1-token batch, head_dim 40 and 96 (padded), a window longer
//! than the batch, Gemma 2's cap of 50; and the deterministic backward run twice, bit for bit.

use super::{
    nan, packing, round_to_operand, Harness, FLASH_BF16_ROUNDED_TOLERANCE, FLASH_BF16_TOLERANCE,
    FLASH_F16_ROUNDED_TOLERANCE, FLASH_F16_TOLERANCE,
};
use crate::backend::cpu::Cpu;
use crate::backend::cuda::attention::FlashBackward;
use crate::backend::cuda::nf4::MmaOperands;
use crate::backend::{AttentionParams, Backend};

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

/// The CPU reference of one case: `[out, lse, dq, dk, dv]`, the backward from the CPU's own
/// forward.
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
/// backward from its own device's forward (out, lse) as training runs it. Two references:
/// the CPU on q, k, v, dout rounded to the operand type as the kernels round them (what is
/// left is the rounding of P and dz and the summation order: a tight bound that a wrong mask
/// or tile edge breaks), and the CPU on the exact inputs (the precision a model gets).
/// A 1-token batch has dq = dk = 0 exactly (one key: P = 1, dP = D): checked against 0.
pub(super) fn cases(h: &mut Harness) {
    let operands = MmaOperands::for_arch(h.cuda.info().compute_capability);
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
        let case = format!(
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
        let check = |h: &mut Harness, op: &str, output: usize, gpu: &[f32]| {
            h.record(
                &format!("{op} vs rounded"),
                dtype,
                case.clone(),
                &rounded[output],
                gpu,
                rounded_tolerance,
            );
            h.record(
                op,
                dtype,
                case.clone(),
                &exact[output],
                gpu,
                exact_tolerance,
            );
        };

        let c = &h.cuda;
        let (q_d, k_d, v_d, dout_d) = (c.upload(&q), c.upload(&k), c.upload(&v), c.upload(&dout));
        let (mut out_d, mut lse_d) = (c.upload(&nan(q_len)), c.upload(&nan(tokens * heads)));
        c.flash_attention(
            &mut out_d, &mut lse_d, &q_d, &k_d, &v_d, &cu, &params, operands,
        );
        let (out_g, lse_g) = (c.download(&out_d), c.download(&lse_d));
        check(h, "attention out", 0, &out_g);
        check(h, "attention lse", 1, &lse_g);

        // Both variants on every case; the deterministic one a second time on some, bit for
        // bit (the emulator runs blocks in a new order every launch, so an order-dependent
        // sum would show).
        let repeat = index % 4 == 0;
        for variant in [FlashBackward::Deterministic, FlashBackward::Atomic] {
            let runs = if repeat && variant == FlashBackward::Deterministic {
                2
            } else {
                1
            };
            let op = format!("attention_backward {variant:?}").to_lowercase();
            let mut first: Option<[Vec<f32>; 3]> = None;
            for run in 0..runs {
                let c = &h.cuda;
                let (mut dq, mut dk, mut dv) = (
                    c.upload(&nan(q_len)),
                    c.upload(&nan(kv_len)),
                    c.upload(&nan(kv_len)),
                );
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
                            check(h, &format!("{op} {}", OUTPUTS[2 + i]), 2 + i, grad);
                        }
                    }
                    Some(before) => {
                        for (i, grad) in grads.iter().enumerate() {
                            let same = before[i]
                                .iter()
                                .zip(grad)
                                .all(|(a, b)| a.to_bits() == b.to_bits());
                            h.record(
                                &format!("{op} {} rerun, bitwise", OUTPUTS[2 + i]),
                                dtype,
                                format!("{case} run {run}"),
                                &[0.0],
                                &[if same { 0.0 } else { 1.0 }],
                                0.0,
                            );
                        }
                    }
                }
                first.get_or_insert(grads);
            }
        }
    }
}
