//! Gradient checks of the training backward on the CPU reference.
//!
//! Three levels:
//! - Every backward op against central finite differences of a small f64 reference forward
//!   written here (step 1e-5, so the differences are exact to ~1e-10): the loss is
//!   `L = Σ r · op(inputs)` with random `r`, the op's backward gets `dy = r`. The op's own
//!   f32 forward is first checked against the same f64 reference, so the reference is the
//!   op being differentiated. Errors are `max |analytic - reference| / max |reference|`.
//! - The whole tiny models (Gemma 2 with its PEFT adapter, Gemma 3 with fresh adapters,
//!   dropout, label smoothing and auxiliary heads, LLaMA made a classifier with an NF4 base):
//!   every trainable tensor's gradient from `Model::loss_and_grads` against (Richardson-
//!   extrapolated) central differences of that call's own loss along two directions (the gradient's and a random
//!   one), in f32, with the error relative to the tensor's gradient norm.
//! - PyTorch autograd: the loss and the gradients of layer 0's and the last layer's LoRA
//!   matrices and of the score head on gemma2_seqcls with its adapter, from
//!   `tools/make_grad_fixture.py` (transformers + peft, f32, eager), at 1e-4 relative.
//!
//! Which deliberate mistake each test catches (those marked (tried) were put into the code
//! and made the named test fail; the mutation is in brackets):
//! - `rmsnorm_*`: the `x · r³ / dim · Σ dy·g·x` term dropped (tried); `w` instead of `1 + w`
//!   in the backward; overwriting where the residual stream must accumulate.
//! - `linear_*`: `dY · Wᵀ` strides (a transposed weight) or a tile edge mis-indexed (the
//!   shapes cross the 256-wide tiles); the weight gradient not accumulating or not scaled.
//! - `lora_*`: a fresh dropout mask in backward (tried: seed + 1); dropout applied to the
//!   gradient of the base path too; the scale `s` missing from `dA` or `dB`.
//! - `rope_*`: rotating the gradient forwards instead of back (tried); positions or
//!   llama3-scaled frequencies ignored in backward.
//! - `attention_*`: the soft-cap derivative `1 - tanh²` dropped (tried: both tests fail); dK/dV
//!   from the first query head of a GQA group only (tried: caught at ratio 2; ratio 1 cannot
//!   see it);
//!   the window or the sequence boundary not applied when probabilities are recomputed;
//!   a query block boundary (the 70-token case crosses the 64-row blocks) mishandled;
//!   the `rowsum(P ∘ dP)` term missing.
//! - `gated_*`: the GELU-tanh or SiLU derivative wrong (tried: 1 - t² dropped in GELU).
//! - `cross_entropy_*`: label smoothing left out of the gradient (tried), or applied to rows
//!   without label.
//! - `dropout_*`, `scatter_*`: a mask that is not a function of (seed, index); the gather's
//!   backward writing the wrong rows.
//! - `model_*`: any wrong link in the decoder backward — the post-norm branch gradient
//!   skipped (tried: Gemma 2 and 3 fail, LLaMA has no post-norms), the input norm's backward
//!   overwriting the residual gradient instead of adding to it (tried: all three fail),
//!   QK-norm, the activation recomputation (checked equal to the kept one), the pooled-token
//!   scatter, the aux heads' shared pooled gradient, the NF4 dX dispatch.
//! - `matches_pytorch_*`: a convention that finite differences of our own loss cannot see
//!   (the loss itself differing from PyTorch's: pooling, label order, mean over sequences).

mod common;

use std::path::{Path, PathBuf};
use verdict::backend::cpu::Cpu;
use verdict::backend::{Activation, AttentionParams, Backend, NormStyle, Store};
use verdict::data::Winner;
use verdict::model::config::{RopeScaling, RopeSpec};
use verdict::model::decoder::PrefixCache;
use verdict::model::lora::{dense_weight, Linear, Lora, LoraGrads};
use verdict::model::peft::Projection;
use verdict::model::trainable::{LoraConfig, LossOptions, Target};
use verdict::model::{Model, PackedBatch};
use verdict::quant::Quant;
use verdict::rng::Rng;

/// Largest error allowed between an op's f32 backward and f64 finite differences.
const OP_TOLERANCE: f64 = 1e-4;
/// Largest directional-derivative error, relative to the gradient norm, of a whole model in
/// f32 (Richardson-extrapolated central differences, steps of about 1% of the tensor's norm).
const MODEL_TOLERANCE: f64 = 2e-3;

fn normal(rng: &mut Rng, n: usize, std: f64) -> Vec<f32> {
    (0..n).map(|_| (rng.normal() * std) as f32).collect()
}

fn to64(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// `max |a - b| / max |b|`.
fn rel_err(analytic: &[f32], reference: &[f64]) -> f64 {
    assert_eq!(analytic.len(), reference.len(), "lengths differ");
    let scale = reference.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let diff = analytic
        .iter()
        .zip(reference)
        .fold(0.0f64, |m, (&a, &b)| m.max((a as f64 - b).abs()));
    diff / scale.max(1e-30)
}

/// Central differences in f64 of `loss` w.r.t. every element of every input.
fn finite_differences(inputs: &[Vec<f32>], loss: &dyn Fn(&[Vec<f64>]) -> f64) -> Vec<Vec<f64>> {
    let base: Vec<Vec<f64>> = inputs.iter().map(|v| to64(v)).collect();
    let mut x = base.clone();
    (0..inputs.len())
        .map(|i| {
            (0..inputs[i].len())
                .map(|j| {
                    let h = 1e-5 * base[i][j].abs().max(1.0);
                    x[i][j] = base[i][j] + h;
                    let up = loss(&x);
                    x[i][j] = base[i][j] - h;
                    let down = loss(&x);
                    x[i][j] = base[i][j];
                    (up - down) / (2.0 * h)
                })
                .collect()
        })
        .collect()
}

/// Checks an op: its f32 forward against `forward64`, and `analytic` (the backward's
/// gradients w.r.t. each of `inputs` for `dy = r`) against finite differences of
/// `Σ r · forward64`. Prints and returns the worst backward error.
fn check_op(
    name: &str,
    inputs: &[Vec<f32>],
    forward32: &[f32],
    analytic: &[Vec<f32>],
    r: &[f32],
    forward64: impl Fn(&[Vec<f64>]) -> Vec<f64>,
) -> f64 {
    let base: Vec<Vec<f64>> = inputs.iter().map(|v| to64(v)).collect();
    let forward_err = rel_err(forward32, &forward64(&base));
    assert!(
        forward_err < 1e-5,
        "{name}: the f32 forward differs from the f64 reference by {forward_err:.2e}"
    );
    let loss =
        |x: &[Vec<f64>]| -> f64 { forward64(x).iter().zip(r).map(|(y, &r)| y * r as f64).sum() };
    let fd = finite_differences(inputs, &loss);
    let errs: Vec<f64> = analytic
        .iter()
        .zip(&fd)
        .map(|(a, f)| rel_err(a, f))
        .collect();
    let worst = errs.iter().copied().fold(0.0, f64::max);
    println!("{name:58} forward {forward_err:.1e}  backward {worst:.1e}");
    assert!(
        worst < OP_TOLERANCE,
        "{name}: backward differs from finite differences by {errs:?}"
    );
    worst
}

// ---- f64 reference forwards ----

fn rmsnorm64(x: &[f64], w: &[f32], dim: usize, eps: f32, style: NormStyle) -> Vec<f64> {
    x.chunks(dim)
        .flat_map(|row| {
            let ms = row.iter().map(|v| v * v).sum::<f64>() / dim as f64;
            let r = 1.0 / (ms + eps as f64).sqrt();
            row.iter().zip(w).map(move |(&x, &w)| {
                let g = match style {
                    NormStyle::Weight => w as f64,
                    NormStyle::OnePlusWeight => 1.0 + w as f64,
                };
                x * r * g
            })
        })
        .collect()
}

/// `X · Wᵀ`, X [rows, in], W [out, in].
fn xwt64(x: &[f64], w: &[f64], in_f: usize) -> Vec<f64> {
    x.chunks(in_f)
        .flat_map(|row| {
            w.chunks(in_f)
                .map(move |wr| row.iter().zip(wr).map(|(a, b)| a * b).sum())
        })
        .collect()
}

/// The transpose of a `[rows, cols]` matrix, in f64.
fn transpose64(m: &[f32], rows: usize, cols: usize) -> Vec<f64> {
    (0..cols * rows)
        .map(|e| m[(e % rows) * cols + e / rows] as f64)
        .collect()
}

fn rope64(x: &[f64], positions: &[u32], inv_freq: &[f32], heads: usize, d: usize) -> Vec<f64> {
    let half = d / 2;
    let mut out = x.to_vec();
    for (row, &pos) in out.chunks_mut(heads * d).zip(positions) {
        for head in row.chunks_mut(d) {
            for i in 0..half {
                // The angle is an f32 product in the op (as in transformers); only sin/cos
                // and the rotation are computed in f64 here.
                let angle = (pos as f32 * inv_freq[i]) as f64;
                let (s, c) = angle.sin_cos();
                let (a, b) = (head[i], head[i + half]);
                head[i] = a * c - b * s;
                head[i + half] = b * c + a * s;
            }
        }
    }
    out
}

fn gelu_tanh64(x: f64) -> f64 {
    let c = (2.0 / std::f64::consts::PI).sqrt();
    0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
}

fn silu64(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

/// Per-row torch cross-entropy with label smoothing (0 for rows without label).
fn cross_entropy64(logits: &[f64], labels: &[Option<u32>], classes: usize, eps: f64) -> Vec<f64> {
    logits
        .chunks(classes)
        .zip(labels)
        .map(|(z, label)| {
            let Some(y) = label else { return 0.0 };
            let max = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let lse = z.iter().map(|v| (v - max).exp()).sum::<f64>().ln() + max;
            let nll = |c: usize| lse - z[c];
            (1.0 - eps) * nll(*y as usize)
                + eps * (0..classes).map(nll).sum::<f64>() / classes as f64
        })
        .collect()
}

// ---- op checks ----

#[test]
fn rmsnorm_backward_both_styles_and_residual_accumulation() {
    let mut rng = Rng::new(1);
    // 3 rows of a model width and 5 rows of an odd QK-norm head_dim.
    for (rows, dim) in [(3, 16), (5, 7)] {
        for style in [NormStyle::Weight, NormStyle::OnePlusWeight] {
            let x = normal(&mut rng, rows * dim, 1.5);
            let w = normal(&mut rng, dim, 0.5);
            let r = normal(&mut rng, rows * dim, 1.0);
            let eps = 1e-6;
            let mut y = vec![0.0; x.len()];
            Cpu.rmsnorm(&mut y, &x, &w, dim, eps, style);
            let mut dx = vec![0.0; x.len()];
            Cpu.rmsnorm_backward(&mut dx, &r, &x, &w, dim, eps, style, Store::Overwrite);
            check_op(
                &format!("rmsnorm {style:?} [{rows}, {dim}]"),
                std::slice::from_ref(&x),
                &y,
                &[dx.clone()],
                &r,
                |i| rmsnorm64(&i[0], &w, dim, eps, style),
            );
            // Into the residual stream the gradient adds to what is there.
            let before = normal(&mut rng, x.len(), 1.0);
            let mut acc = before.clone();
            Cpu.rmsnorm_backward(
                &mut acc,
                &r,
                &x,
                &w,
                dim,
                eps,
                style,
                Store::Accumulate(1.0),
            );
            for ((a, b), d) in acc.iter().zip(&before).zip(&dx) {
                assert!((a - (b + d)).abs() < 1e-5, "accumulate: {a} vs {b} + {d}");
            }
        }
    }
}

#[test]
fn linear_input_and_weight_gradients() {
    let mut rng = Rng::new(2);
    let (rows, in_f, out_f) = (4, 9, 6);
    let x = normal(&mut rng, rows * in_f, 1.0);
    let w_values = normal(&mut rng, out_f * in_f, 0.5);
    let w = dense_weight(&Cpu, &w_values, out_f, in_f);
    let r = normal(&mut rng, rows * out_f, 1.0);
    let mut y = vec![0.0; rows * out_f];
    Cpu.linear(&mut y, &x, &w, rows, Store::Overwrite);
    let mut dx = vec![0.0; x.len()];
    Cpu.linear_backward(&mut dx, &r, &w, rows, Store::Overwrite);
    // dW accumulates and scales: start from ones, scale 0.5, then undo both.
    let mut dw = vec![1.0; w_values.len()];
    Cpu.linear_weight_grad(&mut dw, &r, &x, rows, in_f, out_f, 0.5);
    let dw: Vec<f32> = dw.iter().map(|g| (g - 1.0) * 2.0).collect();
    check_op(
        "linear dX = dY·W, dW = dYᵀ·X",
        &[x.clone(), w_values.clone()],
        &y,
        &[dx, dw],
        &r,
        |i| xwt64(&i[0], &i[1], in_f),
    );

    // Shapes across the 256 x 256 output tiles of both products; for a linear map the
    // finite difference is the product itself, so compare with it directly.
    let (rows, in_f, out_f) = (3, 300, 260);
    let x = normal(&mut rng, rows * in_f, 1.0);
    let w_values = normal(&mut rng, out_f * in_f, 0.1);
    let w = dense_weight(&Cpu, &w_values, out_f, in_f);
    let dy = normal(&mut rng, rows * out_f, 1.0);
    let mut dx = vec![0.0; x.len()];
    Cpu.linear_backward(&mut dx, &dy, &w, rows, Store::Overwrite);
    // dX = dY · W = dY · (Wᵀ)ᵀ and dW = dYᵀ · X = dYᵀ · (Xᵀ)ᵀ.
    let expected = xwt64(&to64(&dy), &transpose64(&w_values, out_f, in_f), out_f);
    let err_dx = rel_err(&dx, &expected);
    let mut dw = vec![0.0; w_values.len()];
    Cpu.linear_weight_grad(&mut dw, &dy, &x, rows, in_f, out_f, 1.0);
    let expected = xwt64(
        &transpose64(&dy, rows, out_f),
        &transpose64(&x, rows, in_f),
        rows,
    );
    let err_dw = rel_err(&dw, &expected);
    println!("linear across tiles [3, 300] -> [3, 260]                   dX {err_dx:.1e}  dW {err_dw:.1e}");
    assert!(
        err_dx < 1e-5 && err_dw < 1e-5,
        "dX {err_dx:.2e}, dW {err_dw:.2e}"
    );
}

#[test]
fn lora_gradients_with_dropout_use_the_forward_mask() {
    let mut rng = Rng::new(3);
    let (rows, in_f, out_f, r) = (4, 9, 6, 3);
    let (scale, p, seed) = (1.5f32, 0.4f32, 11u64);
    let base = normal(&mut rng, out_f * in_f, 0.5);
    let a = normal(&mut rng, r * in_f, 0.5);
    let b = normal(&mut rng, out_f * r, 0.5);
    let x = normal(&mut rng, rows * in_f, 1.0);
    let dy = normal(&mut rng, rows * out_f, 1.0);
    let linear = |a: &[f32], b: &[f32]| Linear {
        weight: dense_weight(&Cpu, &base, out_f, in_f),
        lora: Some(Lora {
            a: dense_weight(&Cpu, a, r, in_f),
            b: dense_weight(&Cpu, b, out_f, r),
            scale,
            dropout: p,
        }),
    };
    let forward = |l: &Linear<Cpu>, seed| {
        let mut y = vec![0.0; rows * out_f];
        l.forward(&Cpu, &mut y, &x, rows, seed);
        y
    };
    let l = linear(&a, &b);
    // The mask the op uses: dropout of ones with the same seed.
    let mut mask = vec![1.0f32; rows * in_f];
    Cpu.dropout(&mut mask, p, seed);
    assert!(mask.contains(&0.0) && mask.iter().any(|&m| m > 1.0));
    let y = forward(&l, Some(seed));
    let mut dx = vec![0.0; x.len()];
    let lora = l.lora.as_ref().unwrap();
    let mut grads = LoraGrads::zeros(&Cpu, lora);
    l.backward(
        &Cpu,
        &dy,
        &x,
        rows,
        Some(seed),
        &mut dx,
        Store::Overwrite,
        Some(&mut grads),
    );
    let base64 = to64(&base);
    check_op(
        "LoRA dX, dA, dB with dropout 0.4",
        &[x.clone(), a.clone(), b.clone()],
        &y,
        &[dx.clone(), grads.a.clone(), grads.b.clone()],
        &dy,
        |i| {
            let dropped: Vec<f64> = i[0].iter().zip(&mask).map(|(x, &m)| x * m as f64).collect();
            let down = xwt64(&dropped, &i[1], in_f);
            let up = xwt64(&down, &i[2], r);
            xwt64(&i[0], &base64, in_f)
                .iter()
                .zip(&up)
                .map(|(y, u)| y + scale as f64 * u)
                .collect()
        },
    );
    // Without a seed (inference) there is no dropout.
    let y = forward(&l, None);
    let merged = {
        let mut m = linear(&a, &b);
        m.merge(&Cpu);
        forward(&m, None)
    };
    assert!(
        rel_err(&y, &to64(&merged)) < 1e-5,
        "inference applies no dropout"
    );
}

#[test]
fn rope_backward_with_plain_and_llama3_scaled_frequencies() {
    let mut rng = Rng::new(4);
    let (heads, d) = (3, 8);
    let positions = [0u32, 3, 17, 250, 4000, 5];
    let specs = [
        RopeSpec {
            theta: 10_000.0,
            scaling: RopeScaling::None,
        },
        RopeSpec {
            theta: 1_000_000.0,
            scaling: RopeScaling::None,
        },
        RopeSpec {
            theta: 10_000.0,
            scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 32,
            },
        },
    ];
    for spec in specs {
        let inv_freq = spec.inv_freq(d);
        let x = normal(&mut rng, positions.len() * heads * d, 1.0);
        let r = normal(&mut rng, x.len(), 1.0);
        let mut y = x.clone();
        Cpu.rope(&mut y, &positions, &inv_freq, heads, d);
        let mut dx = r.clone();
        Cpu.rope_backward(&mut dx, &positions, &inv_freq, heads, d);
        check_op(
            &format!("rope theta {} {:?}", spec.theta, spec.scaling),
            &[x],
            &y,
            &[dx],
            &r,
            |i| rope64(&i[0], &positions, &inv_freq, heads, d),
        );
    }
}

/// Runs the attention forward and backward and checks them; returns the share of visible
/// scores whose magnitude exceeds the cap (how much the soft-cap bites).
fn check_attention(name: &str, cu: &[usize], p: AttentionParams, seed: u64) -> f64 {
    let mut rng = Rng::new(seed);
    let tokens = *cu.last().unwrap();
    let (qw, kw) = (p.heads * p.head_dim, p.kv_heads * p.head_dim);
    let q = normal(&mut rng, tokens * qw, 1.0);
    let k = normal(&mut rng, tokens * kw, 1.0);
    let v = normal(&mut rng, tokens * kw, 1.0);
    let r = normal(&mut rng, tokens * qw, 1.0);
    let (mut out, mut lse) = (vec![0.0; q.len()], vec![0.0; tokens * p.heads]);
    Cpu.attention(&mut out, &mut lse, &q, &k, &v, cu, &p);
    let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
    Cpu.attention_backward(
        &mut dq, &mut dk, &mut dv, &r, &out, &lse, &q, &k, &v, cu, &p,
    );
    check_op(
        name,
        &[q.clone(), k.clone(), v.clone()],
        &out,
        &[dq, dk, dv],
        &r,
        |i| common::attention_by_definition(&i[0], &i[1], &i[2], cu, &p),
    );
    let Some(cap) = p.softcap else { return 0.0 };
    let d = p.head_dim;
    let (mut capped, mut visible) = (0, 0);
    for s in 0..cu.len() - 1 {
        for t in cu[s]..cu[s + 1] {
            for key in cu[s]..=t {
                if p.window.is_some_and(|w| t - key >= w) {
                    continue;
                }
                for h in 0..p.heads {
                    let g = h / (p.heads / p.kv_heads);
                    let z: f32 = (0..d)
                        .map(|i| q[t * qw + h * d + i] * k[key * kw + g * d + i])
                        .sum();
                    visible += 1;
                    capped += usize::from((p.scale * z).abs() > cap);
                }
            }
        }
    }
    capped as f64 / visible as f64
}

#[test]
fn attention_backward_gqa_window_softcap_packed() {
    // Three packed sequences, a window shorter than each, a cap that bites, head_dim 5
    // (not hidden / heads), GQA ratios 1, 2 and 4.
    for kv_heads in [4, 2, 1] {
        let p = AttentionParams {
            heads: 4,
            kv_heads,
            head_dim: 5,
            scale: 0.9,
            softcap: Some(2.0),
            window: Some(3),
        };
        let name = format!("attention GQA 4/{kv_heads}, window 3, cap 2, [5, 8, 7]");
        let bite = check_attention(&name, &[0, 5, 13, 20], p, 10 + kv_heads as u64);
        assert!(
            bite > 0.2,
            "the soft-cap must bite: only {bite:.2} of scores exceed it"
        );
    }
    let p = AttentionParams {
        heads: 2,
        kv_heads: 2,
        head_dim: 4,
        scale: 0.5,
        softcap: None,
        window: None,
    };
    check_attention(
        "attention causal, no cap, no window, [6, 1, 9]",
        &[0, 6, 7, 16],
        p,
        20,
    );
}

#[test]
fn attention_backward_across_query_blocks() {
    // 70 tokens cross the 64-query blocks of the recomputation; with and without window.
    for window in [Some(20), None] {
        let p = AttentionParams {
            heads: 2,
            kv_heads: 1,
            head_dim: 3,
            scale: 1.3,
            softcap: Some(1.5),
            window,
        };
        let name = format!("attention 70 + 5 tokens, GQA 2/1, window {window:?}, cap 1.5");
        let bite = check_attention(&name, &[0, 70, 75], p, 30);
        assert!(
            bite > 0.2,
            "the soft-cap must bite: only {bite:.2} of scores exceed it"
        );
    }
}

#[test]
fn gated_activation_backward_geglu_and_swiglu() {
    let mut rng = Rng::new(5);
    for act in [Activation::GeluTanh, Activation::Silu] {
        let n = 37;
        let gate = normal(&mut rng, n, 2.0);
        let up = normal(&mut rng, n, 1.0);
        let r = normal(&mut rng, n, 1.0);
        let mut y = vec![0.0; n];
        Cpu.gated_activation(&mut y, &gate, &up, act);
        let (mut dg, mut du) = (vec![0.0; n], vec![0.0; n]);
        Cpu.gated_activation_backward(&mut dg, &mut du, &r, &gate, &up, act);
        let f = match act {
            Activation::GeluTanh => gelu_tanh64,
            Activation::Silu => silu64,
        };
        check_op(
            &format!("gated activation {act:?}"),
            &[gate, up],
            &y,
            &[dg, du],
            &r,
            |i| i[0].iter().zip(&i[1]).map(|(&g, &u)| f(g) * u).collect(),
        );
    }
}

#[test]
fn cross_entropy_with_label_smoothing_and_unlabelled_rows() {
    let mut rng = Rng::new(6);
    let (classes, eps, weight) = (3, 0.1f32, 0.7f32);
    let labels = [Some(0), Some(2), None, Some(1), Some(2)];
    let logits = normal(&mut rng, labels.len() * classes, 2.0);
    let mut dlogits = vec![0.0; logits.len()];
    let losses = Cpu.softmax_cross_entropy(&mut dlogits, &logits, &labels, classes, eps, weight);
    let weighted: Vec<f32> = losses.iter().map(|l| l * weight).collect();
    check_op(
        "softmax cross-entropy, smoothing 0.1, weight 0.7",
        &[logits],
        &weighted,
        &[dlogits.clone()],
        &vec![1.0; labels.len()],
        |i| {
            cross_entropy64(&i[0], &labels, classes, eps as f64)
                .iter()
                .map(|l| l * weight as f64)
                .collect()
        },
    );
    assert!(
        dlogits[6..9].iter().all(|&g| g == 0.0),
        "no label, no gradient"
    );
}

#[test]
fn dropout_mask_is_a_function_of_seed_and_index() {
    let n = 20_000;
    let p = 0.3;
    let mask = |seed| {
        let mut m = vec![1.0f32; n];
        Cpu.dropout(&mut m, p, seed);
        m
    };
    let (a, b) = (mask(7), mask(8));
    assert_eq!(a, mask(7), "same seed, same mask");
    assert_ne!(a, b, "another seed, another mask");
    let dropped = a.iter().filter(|&&m| m == 0.0).count() as f64 / n as f64;
    // 3 standard deviations of a binomial share.
    assert!(
        (dropped - 0.3).abs() < 3.0 * (0.3f64 * 0.7 / n as f64).sqrt(),
        "{dropped}"
    );
    assert!(a.iter().all(|&m| m == 0.0 || (m - 1.0 / 0.7).abs() < 1e-6));
}

#[test]
fn scatter_add_is_the_adjoint_of_gather() {
    // <gather(x), r> = <x, scatter(r)> for every x and r.
    let mut rng = Rng::new(9);
    let (rows, dim, picked) = (7, 5, [6usize, 0, 3]);
    let x = normal(&mut rng, rows * dim, 1.0);
    let r = normal(&mut rng, picked.len() * dim, 1.0);
    let mut gathered = vec![0.0; r.len()];
    Cpu.gather_rows(&mut gathered, &x, &picked, dim);
    let mut scattered = vec![0.0; x.len()];
    Cpu.scatter_add_rows(&mut scattered, &r, &picked, dim);
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(a, b)| (a * b) as f64).sum::<f64>();
    assert!((dot(&gathered, &r) - dot(&x, &scattered)).abs() < 1e-5);
    assert!(
        scattered[dim..2 * dim].iter().all(|&v| v == 0.0),
        "unpicked rows get nothing"
    );
}

// ---- whole models ----

fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models")
        .join(case)
}

/// Three sequences: lengths beyond Gemma's window of 6, the last ending in pad ids.
fn batch(pad: u32) -> PackedBatch {
    PackedBatch::new(&[
        vec![5u32, 9, 33, 7, 100, 3, 8, 12, 40],
        vec![17, 18, 19, 20],
        vec![250, 11, 12, 13, 301, 14, 15, 16, 400, 17, pad, pad],
    ])
}

/// Rank-`r` adapters (alpha 2r, not rsLoRA) on `targets` of every layer.
fn lora(r: usize, targets: Vec<Projection>, dropout: f32) -> LoraConfig {
    LoraConfig {
        r,
        alpha: 2.0 * r as f32,
        targets,
        rslora: false,
        dropout,
        layers: None,
    }
}

/// No label smoothing, no auxiliary loss, layers recomputed in backward, dropout seed 0.
const PLAIN: LossOptions = LossOptions {
    label_smoothing: 0.0,
    aux_weight: 0.0,
    recompute_layers: true,
    dropout_seed: 0,
};

/// Checks every trainable tensor's gradient against central differences of the loss along
/// the gradient's own direction and a random one; returns the worst error (relative to
/// the tensor's gradient norm).
fn check_model(
    name: &str,
    model: &mut Model<Cpu>,
    targets: &[Target],
    options: &LossOptions,
) -> f64 {
    let batch = batch(model.spec.pad_token_id.unwrap_or(0));
    let (report, grads) = model
        .loss_and_grads(&Cpu, &batch, targets, options)
        .unwrap();
    // Keeping every activation must give exactly what recomputing the layers gives.
    let kept = LossOptions {
        recompute_layers: !options.recompute_layers,
        ..*options
    };
    let (report_kept, grads_kept) = model.loss_and_grads(&Cpu, &batch, targets, &kept).unwrap();
    assert_eq!(
        report, report_kept,
        "{name}: recomputed and kept activations differ"
    );
    assert_eq!(
        grads, grads_kept,
        "{name}: recomputed and kept activations differ"
    );

    let specs = model.trainable_params();
    let params = model.read_params(&Cpu);
    let mut rng = Rng::new(99);
    let mut worst: f64 = 0.0;
    for (t, spec) in specs.iter().enumerate() {
        let g = to64(&grads[t]);
        let g_norm = g.iter().map(|v| v * v).sum::<f64>().sqrt();
        assert!(g_norm > 0.0, "{name}: {} has a zero gradient", spec.name);
        let p_norm = params[t]
            .iter()
            .map(|&v| (v as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        let h = 1e-2 * p_norm.clamp(1e-2, 1.0);
        let random: Vec<f64> = g.iter().map(|_| rng.normal()).collect();
        for dir in [g.clone(), random] {
            let n = dir.iter().map(|v| v * v).sum::<f64>().sqrt();
            let u: Vec<f64> = dir.iter().map(|v| v / n).collect();
            let mut loss_at = |step: f64| {
                let mut moved = params.clone();
                for (x, du) in moved[t].iter_mut().zip(&u) {
                    *x = (*x as f64 + step * du) as f32;
                }
                model.write_params(&Cpu, &moved);
                model
                    .loss_and_grads(&Cpu, &batch, targets, options)
                    .unwrap()
                    .0
                    .loss
            };
            // Richardson extrapolation of two central differences cancels their h² error.
            let mut central = |h: f64| (loss_at(h) - loss_at(-h)) / (2.0 * h);
            let fd = (4.0 * central(h / 2.0) - central(h)) / 3.0;
            let analytic: f64 = g.iter().zip(&u).map(|(a, b)| a * b).sum();
            let err = (fd - analytic).abs() / g_norm;
            assert!(
                err < MODEL_TOLERANCE,
                "{name}: {} along a direction: finite difference {fd:.6e} vs gradient {analytic:.6e} (|g| {g_norm:.3e})",
                spec.name
            );
            worst = worst.max(err);
        }
        model.write_params(&Cpu, &params);
    }
    println!(
        "{name:58} loss {:.4} (pref {:.4}, aux {:.4}), {} tensors, worst {worst:.1e}",
        report.loss,
        report.pref_loss,
        report.aux_loss,
        specs.len()
    );
    worst
}

fn targets(aux: bool) -> Vec<Target> {
    let ids = |a: Option<u32>| if aux { a } else { None };
    vec![
        Target {
            winner: Winner::A,
            offset: [0.0; 3],
            model_a: ids(Some(1)),
            model_b: ids(Some(4)),
        },
        // A logit offset (`--on-baseline`) shifts the loss surface; its gradients must follow.
        Target {
            winner: Winner::Tie,
            offset: [-0.9, -1.3, -1.2],
            model_a: ids(None),
            model_b: ids(Some(0)),
        },
        Target {
            winner: Winner::B,
            offset: [0.0; 3],
            model_a: ids(Some(2)),
            model_b: ids(None),
        },
    ]
}

/// LoRA B starts at zero, which would make every A gradient zero: give B random values.
fn randomize_lora_b(model: &mut Model<Cpu>, seed: u64) {
    let mut rng = Rng::new(seed);
    let specs = model.trainable_params();
    let mut values = model.read_params(&Cpu);
    for (spec, v) in specs.iter().zip(&mut values) {
        if spec.name.ends_with("lora_B.weight") {
            *v = normal(&mut rng, v.len(), 0.2);
        }
    }
    model.write_params(&Cpu, &values);
}

#[test]
fn model_gemma2_loaded_adapter_gradients() {
    // Soft-capped attention, a window of 6 on layers 0 and 2, post-norms, GeGLU; the loaded
    // PEFT adapter (all seven projections) and its saved score head are what trains.
    let dir = fixture("gemma2_seqcls");
    let mut model = Model::load(&Cpu, &dir, Some(&dir.join("adapter")), Quant::None).unwrap();
    let options = LossOptions {
        dropout_seed: 1,
        ..PLAIN
    };
    check_model(
        "gemma2_seqcls + adapter",
        &mut model,
        &targets(false),
        &options,
    );
}

#[test]
fn model_gemma3_fresh_adapters_dropout_smoothing_aux_heads() {
    // QK-norm, per-layer RoPE bases, window 6; fresh adapters with dropout, label smoothing
    // and the two auxiliary heads (some model ids unknown). q and k adapters sit before the
    // QK-norm; gate and up are covered by the other models (six layers of all seven would
    // double the test time).
    let mut model = Model::load(&Cpu, &fixture("gemma3_seqcls"), None, Quant::None).unwrap();
    let config = lora(
        3,
        vec![
            Projection::Q,
            Projection::K,
            Projection::O,
            Projection::Down,
        ],
        0.2,
    );
    model.add_lora(&Cpu, &config, 5).unwrap();
    model.add_aux_heads(&Cpu, 5, 6);
    randomize_lora_b(&mut model, 7);
    let options = LossOptions {
        label_smoothing: 0.1,
        aux_weight: 0.3,
        recompute_layers: false,
        dropout_seed: 8,
    };
    check_model(
        "gemma3_seqcls + LoRA, dropout, smoothing, aux",
        &mut model,
        &targets(true),
        &options,
    );
}

#[test]
fn model_llama_causal_made_classifier_on_nf4_base() {
    // A causal checkpoint with a new score head; rsLoRA on some projections; the base
    // quantized to NF4 at load (QLoRA), so dX goes through the NF4 dY·W product.
    let mut model = Model::load(
        &Cpu,
        &fixture("llama_causal"),
        None,
        Quant::Nf4(Default::default()),
    )
    .unwrap();
    model.add_score_head(&Cpu, 3, 0.02, 9);
    let config = LoraConfig {
        rslora: true,
        ..lora(
            4,
            vec![
                Projection::Q,
                Projection::V,
                Projection::Up,
                Projection::Down,
            ],
            0.1,
        )
    };
    model.add_lora(&Cpu, &config, 10).unwrap();
    randomize_lora_b(&mut model, 11);
    let options = LossOptions {
        label_smoothing: 0.05,
        dropout_seed: 12,
        ..PLAIN
    };
    check_model(
        "llama_causal -> classifier, NF4 base, rsLoRA",
        &mut model,
        &targets(false),
        &options,
    );
}

#[test]
fn model_gemma2_top_layers_only_with_prefix_cache() {
    // LoRA on the top two of three layers: backward stops above layer 0 (nothing there
    // trains), which finite differences of the whole loss confirm; then the frozen layer's
    // output served from a prefix cache must give the same bits as computing it.
    let mut model = Model::load(&Cpu, &fixture("gemma2_seqcls"), None, Quant::None).unwrap();
    let config = LoraConfig {
        layers: Some(vec![1, 2]),
        ..lora(2, vec![Projection::Q, Projection::V, Projection::Gate], 0.1)
    };
    model.add_lora(&Cpu, &config, 13).unwrap();
    randomize_lora_b(&mut model, 14);
    assert_eq!(model.decoder.frozen_prefix(), 1);
    assert!(model
        .trainable_params()
        .iter()
        .all(|p| !p.name.contains("layers.0.")));
    let options = LossOptions {
        dropout_seed: 15,
        ..PLAIN
    };
    check_model(
        "gemma2_seqcls, LoRA on layers 1-2",
        &mut model,
        &targets(false),
        &options,
    );

    let batch = batch(model.spec.pad_token_id.unwrap_or(0));
    let uncached = model
        .loss_and_grads(&Cpu, &batch, &targets(false), &options)
        .unwrap();
    let classified = model.classify(&Cpu, &batch);
    let cache = std::sync::Arc::new(PrefixCache::default());
    model.decoder.attach_prefix_cache(cache.clone()).unwrap();
    for pass in ["filling", "hitting"] {
        let cached = model
            .loss_and_grads(&Cpu, &batch, &targets(false), &options)
            .unwrap();
        assert_eq!(cached.0, uncached.0, "loss, {pass} the cache");
        assert_eq!(cached.1, uncached.1, "gradients, {pass} the cache");
        assert_eq!(model.classify(&Cpu, &batch), classified, "{pass} the cache");
    }
    let hidden = model.spec.decoder.hidden_size;
    let distinct: std::collections::HashSet<&[u32]> =
        (0..batch.sequences()).map(|s| batch.sequence(s)).collect();
    let tokens: usize = distinct.iter().map(|s| s.len()).sum();
    assert_eq!(
        cache.bytes(),
        tokens * hidden * 4,
        "one row per token of each distinct sequence"
    );

    let mut other = Model::load(&Cpu, &fixture("gemma2_seqcls"), None, Quant::None).unwrap();
    let top = LoraConfig {
        layers: Some(vec![2]),
        ..config.clone()
    };
    other.add_lora(&Cpu, &top, 1).unwrap();
    let err = other
        .decoder
        .attach_prefix_cache(cache)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cache of 1 layers of width 64; this decoder's frozen prefix is 2 layers"),
        "{err}"
    );
    let config = LoraConfig {
        layers: Some(vec![3]),
        ..config
    };
    let err = model.add_lora(&Cpu, &config, 1).unwrap_err().to_string();
    assert!(err.contains("layer 3, but the model has 3 layers"), "{err}");
}

// ---- PyTorch ----

#[derive(serde::Deserialize)]
struct TorchGrad {
    shape: Vec<usize>,
    values: Vec<f64>,
}

#[derive(serde::Deserialize)]
struct TorchFixture {
    inputs: Vec<Vec<u32>>,
    labels: Vec<usize>,
    loss: f64,
    grads: std::collections::BTreeMap<String, TorchGrad>,
}

#[test]
fn matches_pytorch_autograd_on_gemma2_seqcls() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/grad/gemma2_seqcls.json");
    let torch: TorchFixture =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let dir = fixture("gemma2_seqcls");
    let model = Model::load(&Cpu, &dir, Some(&dir.join("adapter")), Quant::None).unwrap();
    let targets: Vec<Target> = torch
        .labels
        .iter()
        .map(|&l| Target {
            winner: Winner::ALL[l],
            offset: [0.0; 3],
            model_a: None,
            model_b: None,
        })
        .collect();
    let batch = PackedBatch::new(&torch.inputs);
    let (report, grads) = model
        .loss_and_grads(&Cpu, &batch, &targets, &PLAIN)
        .unwrap();
    let loss_err = (report.loss - torch.loss).abs() / torch.loss;
    println!(
        "pytorch: loss {:.6} vs {:.6} (rel {loss_err:.1e})",
        report.loss, torch.loss
    );
    assert!(
        loss_err < 1e-5,
        "loss {} vs torch {}",
        report.loss,
        torch.loss
    );
    let specs = model.trainable_params();
    let mut worst: f64 = 0.0;
    for (name, expected) in &torch.grads {
        let t = specs
            .iter()
            .position(|s| &s.name == name)
            .unwrap_or_else(|| panic!("torch has {name}, verdict has no such parameter"));
        assert_eq!(specs[t].shape, expected.shape, "{name}");
        let err = rel_err(&grads[t], &expected.values);
        println!("pytorch: {name:70} {err:.1e}");
        assert!(err <= 1e-4, "{name}: {err:.2e} from torch");
        worst = worst.max(err);
    }
    println!(
        "pytorch: {} gradients, worst {worst:.1e}",
        torch.grads.len()
    );
}

// ---- the interface ----

#[test]
fn add_lora_keeps_outputs_and_names_params_in_peft_order() {
    let dir = fixture("llama_seqcls");
    let mut model = Model::load(&Cpu, &dir, None, Quant::None).unwrap();
    let batch = batch(2);
    let before = model.classify(&Cpu, &batch);
    let config = lora(2, vec![Projection::Down, Projection::Q], 0.0);
    model.add_lora(&Cpu, &config, 1).unwrap();
    assert_eq!(
        model.classify(&Cpu, &batch),
        before,
        "B = 0: a fresh adapter changes nothing"
    );
    let names: Vec<String> = model
        .trainable_params()
        .into_iter()
        .map(|p| p.name)
        .collect();
    let p = "base_model.model.model.layers";
    assert_eq!(
        names,
        [
            format!("{p}.0.self_attn.q_proj.lora_A.weight"),
            format!("{p}.0.self_attn.q_proj.lora_B.weight"),
            format!("{p}.0.mlp.down_proj.lora_A.weight"),
            format!("{p}.0.mlp.down_proj.lora_B.weight"),
            format!("{p}.1.self_attn.q_proj.lora_A.weight"),
            format!("{p}.1.self_attn.q_proj.lora_B.weight"),
            format!("{p}.1.mlp.down_proj.lora_A.weight"),
            format!("{p}.1.mlp.down_proj.lora_B.weight"),
            "base_model.model.score.weight".to_string(),
        ]
    );
    // PEFT's kaiming-uniform(a = sqrt(5)) bound for A is 1 / sqrt(in_features).
    let values = model.read_params(&Cpu);
    let bound = 1.0 / (48f32).sqrt();
    assert!(values[0].iter().all(|v| v.abs() <= bound));
    assert!(values[0].iter().any(|v| v.abs() > 0.8 * bound));
    assert!(values[1].iter().all(|&v| v == 0.0));
    let err = model.add_lora(&Cpu, &config, 1).unwrap_err().to_string();
    assert!(err.contains("already has a LoRA adapter"), "{err}");
    assert_eq!("gate".parse::<Projection>().unwrap(), Projection::Gate);
    assert_eq!("o_proj".parse::<Projection>().unwrap(), Projection::O);
    assert!("qkv".parse::<Projection>().is_err());
}

#[test]
fn non_finite_parameter_is_named() {
    let dir = fixture("gemma2_seqcls");
    let mut model = Model::load(&Cpu, &dir, Some(&dir.join("adapter")), Quant::None).unwrap();
    let mut values = model.read_params(&Cpu);
    values[3][0] = f32::NAN;
    model.write_params(&Cpu, &values);
    let err = model
        .loss_and_grads(&Cpu, &batch(0), &targets(false), &PLAIN)
        .unwrap_err()
        .to_string();
    let name = &model.trainable_params()[3].name;
    assert!(err.contains(name.as_str()), "{err}");
}
