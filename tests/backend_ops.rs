//! Each CPU op on tiny inputs whose answer is known by hand. The same cases will run against
//! the CUDA backend; each test names the mistake it catches.

mod common;

use verdict::backend::cpu::Cpu;
use verdict::backend::{
    Activation, AttentionParams, Backend, NormStyle, Store, Weight, WeightData,
};
use verdict::model::config::{RopeScaling, RopeSpec};

fn close(a: &[f32], b: &[f32], tol: f32) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol)
}

/// Attention with all-zero queries: every visible key gets the same weight, so each output
/// is the mean of the visible values, which shows exactly which keys were visible.
fn mean_of_visible(values: &[f32], cu_seqlens: &[usize], window: Option<usize>) -> Vec<f32> {
    let n = values.len();
    let params = AttentionParams {
        heads: 1,
        kv_heads: 1,
        head_dim: 1,
        scale: 1.0,
        softcap: None,
        window,
    };
    attention(&vec![0.0; n], &vec![0.0; n], values, cu_seqlens, &params)
}

/// `Cpu.attention` into fresh output and log-sum-exp buffers; returns the output.
fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    cu_seqlens: &[usize],
    params: &AttentionParams,
) -> Vec<f32> {
    let mut out = vec![0.0; q.len()];
    let mut lse = vec![0.0; cu_seqlens.last().unwrap() * params.heads];
    let (q, k, v) = (q.to_vec(), k.to_vec(), v.to_vec());
    Cpu.attention(&mut out, &mut lse, &q, &k, &v, cu_seqlens, params);
    out
}

#[test]
fn sliding_window_excludes_key_at_distance_w() {
    // Values 0..5; window 2: query q sees keys q-1 and q only (q - 2 < k <= q).
    let out = mean_of_visible(&[0.0, 1.0, 2.0, 3.0, 4.0], &[0, 5], Some(2));
    assert!(close(&out, &[0.0, 0.5, 1.5, 2.5, 3.5], 1e-6), "{out:?}");
}

#[test]
fn causal_attention_sees_all_earlier_keys_without_window() {
    let out = mean_of_visible(&[0.0, 1.0, 2.0, 3.0], &[0, 4], None);
    assert!(close(&out, &[0.0, 0.5, 1.0, 1.5], 1e-6), "{out:?}");
}

#[test]
fn packed_attention_never_crosses_sequences() {
    // Two sequences [0, 1] and [10, 20, 30]; the window counts positions within a sequence.
    let out = mean_of_visible(&[0.0, 1.0, 10.0, 20.0, 30.0], &[0, 2, 5], None);
    assert!(close(&out, &[0.0, 0.5, 10.0, 15.0, 20.0], 1e-6), "{out:?}");
    let out = mean_of_visible(&[0.0, 1.0, 10.0, 20.0, 30.0], &[0, 2, 5], Some(2));
    assert!(close(&out, &[0.0, 0.5, 10.0, 15.0, 25.0], 1e-6), "{out:?}");
}

#[test]
fn gqa_query_head_h_reads_kv_head_h_div_group() {
    // 4 query heads, 2 KV heads: heads 0,1 read KV head 0 and heads 2,3 read KV head 1
    // (transformers' repeat_kv), not h % kv_heads.
    let params = AttentionParams {
        heads: 4,
        kv_heads: 2,
        head_dim: 1,
        scale: 1.0,
        softcap: None,
        window: None,
    };
    let out = attention(&[0.0; 4], &[0.0; 2], &[10.0, 20.0], &[0, 1], &params);
    assert_eq!(out, [10.0, 10.0, 20.0, 20.0]);
}

#[test]
fn softcap_bounds_scores_before_softmax() {
    // Scores 100 and 0 for the second query; cap 1 turns them into tanh(100) ≈ 1 and 0, so
    // the weights are softmax([1, 0]) instead of ≈ [1, 0].
    let params = AttentionParams {
        heads: 1,
        kv_heads: 1,
        head_dim: 1,
        scale: 1.0,
        softcap: Some(1.0),
        window: None,
    };
    let (q, k, v) = (vec![0.0, 1.0], vec![100.0, 0.0], vec![1.0, 0.0]);
    let out = attention(&q, &k, &v, &[0, 2], &params);
    let expected = 1f32.exp() / (1f32.exp() + 1.0);
    assert!((out[1] - expected).abs() < 1e-6, "{out:?}");
}

#[test]
fn attention_handles_head_dim_not_hidden_over_heads() {
    // head_dim 3 with 2 heads (a 6-wide row) — the shape never comes from a hidden size.
    let params = AttentionParams {
        heads: 2,
        kv_heads: 1,
        head_dim: 3,
        scale: 0.5,
        softcap: None,
        window: None,
    };
    let q = vec![1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0];
    let k = vec![2.0, 0.0, 0.0, 0.0, 2.0, 0.0];
    let v = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
    let out = attention(&q, &k, &v, &[0, 2], &params);
    // Token 1, head 0: scores 0.5·(1·2) = 1 and 0 -> weights e/(e+1), 1/(e+1).
    let w = 1f32.exp() / (1f32.exp() + 1.0);
    let head0: Vec<f32> = (0..3).map(|i| w * v[i] + (1.0 - w) * v[3 + i]).collect();
    assert!(close(&out[6..9], &head0, 1e-6), "{out:?}");
    assert!(close(&out[0..6], &[1.0, 2.0, 3.0, 1.0, 2.0, 3.0], 1e-6));
}

#[test]
fn rope_pairs_feature_i_with_i_plus_half() {
    // rotate_half layout: (x0, x2) and (x1, x3) rotate together; interleaved RoPE would
    // rotate (x0, x1) instead.
    let mut x = vec![1.0, 0.0, 0.0, 0.0];
    Cpu.rope(&mut x, &[1], &[1.0, 0.5], 1, 4);
    assert!(
        close(&x, &[1f32.cos(), 0.0, 1f32.sin(), 0.0], 1e-6),
        "{x:?}"
    );
    let mut x = vec![0.0, 1.0, 0.0, 0.0];
    Cpu.rope(&mut x, &[2], &[1.0, 0.5], 1, 4);
    assert!(
        close(&x, &[0.0, 1f32.cos(), 0.0, 1f32.sin()], 1e-6),
        "{x:?}"
    );
}

#[test]
fn rope_is_identity_at_position_zero_and_rotates_every_head() {
    let row = vec![0.3, -0.2, 0.7, 0.1, 0.5, 0.4, -0.6, 0.9];
    let mut x = row.clone();
    Cpu.rope(&mut x, &[0], &[1.0, 0.1], 2, 4);
    assert_eq!(x, row);
    let mut x = [row.clone(), row.clone()].concat();
    Cpu.rope(&mut x, &[0, 3], &[1.0, 0.1], 2, 4);
    assert_eq!(x[..8], row[..]);
    let (c, s) = (3f32.cos(), 3f32.sin());
    assert!(
        (x[12] - (0.5 * c - (-0.6) * s)).abs() < 1e-6,
        "second head rotated with its own halves"
    );
}

#[test]
fn llama3_rope_scaling_matches_transformers() {
    // Llama 3.1: theta 5e5, factor 8, low 1, high 4, original context 8192, head_dim 128;
    // values from transformers 5.23 `_compute_llama3_parameters`.
    let spec = RopeSpec {
        theta: 500_000.0,
        scaling: RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        },
    };
    let inv_freq = spec.inv_freq(128);
    let plain = RopeSpec {
        theta: 500_000.0,
        scaling: RopeScaling::None,
    }
    .inv_freq(128);
    for (i, expected) in [
        (0, 1.0),
        (20, 0.016560440883040428),
        (40, 3.428102354519069e-05),
        (44, 1.5096217794052791e-05),
        (48, 6.647869668086059e-06),
        (63, 3.068925877869333e-07),
    ] {
        let rel = (inv_freq[i] as f64 - expected).abs() / expected;
        assert!(rel < 1e-6, "inv_freq[{i}] = {} vs {expected}", inv_freq[i]);
    }
    assert_eq!(inv_freq[0], plain[0], "high frequencies are kept");
    assert_eq!(
        inv_freq[63],
        plain[63] / 8.0,
        "low frequencies are divided by factor"
    );
}

#[test]
fn rmsnorm_gain_is_w_for_llama_and_one_plus_w_for_gemma() {
    let x = vec![3.0, 4.0];
    let w = vec![0.5, 0.5];
    let inv_rms = 1.0 / (12.5f32 + 1e-6).sqrt();
    let mut out = vec![0.0; 2];
    Cpu.rmsnorm(&mut out, &x, &w, 2, 1e-6, NormStyle::Weight);
    assert!(close(&out, &[1.5 * inv_rms, 2.0 * inv_rms], 1e-6));
    Cpu.rmsnorm(&mut out, &x, &w, 2, 1e-6, NormStyle::OnePlusWeight);
    assert!(close(&out, &[4.5 * inv_rms, 6.0 * inv_rms], 1e-6));
}

#[test]
fn gated_activations_match_pytorch_values() {
    // torch.nn.functional.gelu(x, approximate="tanh") and silu at 1 and -2, times up = 2.
    for (activation, expected, tol) in [
        (
            Activation::GeluTanh,
            [2.0 * 0.841_192, 2.0 * -0.045_402_3],
            1e-5,
        ),
        (
            Activation::Silu,
            [2.0 * 0.731_058_6, 2.0 * -0.238_405_84],
            1e-6,
        ),
    ] {
        let mut out = vec![0.0; 2];
        Cpu.gated_activation(&mut out, &vec![1.0, -2.0], &vec![2.0, 2.0], activation);
        assert!(close(&out, &expected, tol), "{activation:?}: {out:?}");
    }
}

#[test]
fn linear_is_x_times_w_transposed_across_tile_edges() {
    // Sizes that cut the 128-row / 256-column tiles unevenly.
    let (rows, inp, outf) = (131, 19, 301);
    let x: Vec<f32> = (0..rows * inp)
        .map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1)
        .collect();
    let w: Vec<f32> = (0..outf * inp)
        .map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.1)
        .collect();
    let naive: Vec<f32> = (0..rows * outf)
        .map(|o| {
            (0..inp)
                .map(|k| x[o / outf * inp + k] * w[o % outf * inp + k])
                .sum()
        })
        .collect();
    let weight: Weight<Cpu> = Weight {
        out_features: outf,
        in_features: inp,
        data: WeightData::Dense(w),
    };
    let mut out = vec![f32::NAN; rows * outf];
    Cpu.linear(&mut out, &x, &weight, rows, Store::Overwrite);
    assert!(close(&out, &naive, 1e-4), "overwrite ignores old contents");
    Cpu.linear(&mut out, &x, &weight, rows, Store::Accumulate(0.5));
    let expected: Vec<f32> = naive.iter().map(|v| 1.5 * v).collect();
    assert!(close(&out, &expected, 1e-4), "accumulate adds s·X·Wᵀ");
}

#[test]
fn embedding_gathers_rows_and_scales() {
    let table = vec![0.0, 1.0, 10.0, 11.0, 20.0, 21.0];
    let mut out = vec![0.0; 6];
    Cpu.embedding(&mut out, &WeightData::Dense(table), &[2, 0, 2], 2, 0.5);
    assert_eq!(out, [10.0, 10.5, 0.0, 0.5, 10.0, 10.5]);
}

#[test]
fn gather_rows_and_final_softcap() {
    let mut out = vec![0.0; 4];
    Cpu.gather_rows(&mut out, &vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 0], 2);
    assert_eq!(out, [5.0, 6.0, 1.0, 2.0]);
    let mut x = vec![0.0, 30.0, -1e6];
    Cpu.softcap(&mut x, 30.0);
    assert!(close(&x, &[0.0, 30.0 * 1f32.tanh(), -30.0], 1e-4), "{x:?}");
}

#[test]
fn blocked_attention_matches_the_definition_across_block_and_sequence_edges() {
    // Sequences longer than a 64-row query block, one ending mid-block, a window that cuts
    // inside blocks, GQA, soft-cap.
    let cu_seqlens = [0, 70, 220, 223, 300];
    let p = AttentionParams {
        heads: 4,
        kv_heads: 2,
        head_dim: 6,
        scale: 0.4,
        softcap: Some(5.0),
        window: Some(37),
    };
    let n = *cu_seqlens.last().unwrap();
    let val = |len: usize, seed: f32| {
        (0..len)
            .map(|i| (i as f32 * seed).sin() * 2.0)
            .collect::<Vec<f32>>()
    };
    let (q, k, v) = (val(n * 24, 0.37), val(n * 12, 0.91), val(n * 12, 1.7));
    for window in [Some(37), None] {
        let p = AttentionParams { window, ..p };
        let (mut out, mut lse) = (vec![0.0; n * 24], vec![0.0; n * 4]);
        Cpu.attention(&mut out, &mut lse, &q, &k, &v, &cu_seqlens, &p);
        let f64s = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<f64>>();
        let expected: Vec<f32> =
            common::attention_by_definition(&f64s(&q), &f64s(&k), &f64s(&v), &cu_seqlens, &p)
                .into_iter()
                .map(|x| x as f32)
                .collect();
        assert!(close(&out, &expected, 1e-5), "window {window:?}");
    }
}
