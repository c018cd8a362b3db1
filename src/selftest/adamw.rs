//! Cases of the adamw family (cuda/adamw.rs vs cpu/adamw.rs): AdamW's update of a tensor and
//! the squared norms of global-norm clipping.

use super::Harness;
use crate::backend::{AdamWStep, Backend};
use crate::train::optimizer::AdamWConfig;

pub(super) fn cases(h: &mut Harness) {
    let config = AdamWConfig {
        weight_decay: 0.01,
        ..AdamWConfig::default()
    };
    // Odd sizes around the 256-thread block, a LoRA A of a 2B model (16 x 2304); steps 1
    // (lr · sign(g)), 2 and 1000 (bias corrections near one); gradients scaled by an
    // unscaling-and-clipping factor, or not.
    for n in [1, 255, 257, 16 * 2304] {
        for (t, grad_scale) in [(1u64, 1.0f32), (2, 2f32.powi(-16) * 0.3), (1000, 0.5)] {
            let param = h.random(n, 0.05);
            let grad = h.random(n, 1e-3 / grad_scale);
            // Moments as after earlier steps: m of either sign, v positive.
            let m = h.random(n, 1e-3);
            let v: Vec<f32> = h.random(n, 1e-3).iter().map(|x| x * x).collect();
            let step: AdamWStep = config.scalars(t, 2e-4, grad_scale);
            let pair = on_both!(h, |b| {
                let (mut p, mut mm, mut vv) = (b.upload(&param), b.upload(&m), b.upload(&v));
                b.adamw(&mut p, &b.upload(&grad), &mut mm, &mut vv, &step);
                [b.download(&p), b.download(&mm), b.download(&vv)]
            });
            let case = format!("n={n} t={t} grad_scale={grad_scale:.3e}");
            for (i, what) in ["param", "m", "v"].into_iter().enumerate() {
                h.op(
                    &format!("adamw {what}"),
                    case.clone(),
                    (pair.0[i].clone(), pair.1[i].clone()),
                );
            }
        }
    }
    // Tensors of several sizes at once, one of them empty; values of a scaled gradient.
    let sizes = [1usize, 300, 0, 64 * 3584, 16 * 2304];
    let tensors: Vec<Vec<f32>> = sizes.iter().map(|&n| h.random(n, 30.0)).collect();
    let pair = on_both!(h, |b| {
        let bufs: Vec<_> = tensors.iter().map(|t| b.upload(t)).collect();
        let sums = b.squared_norms(&bufs.iter().collect::<Vec<_>>());
        sums.into_iter().map(|s| s as f32).collect::<Vec<f32>>()
    });
    h.op("squared_norms", format!("sizes={sizes:?}"), pair);
    // An overflow anywhere must show as a non-finite sum of that tensor only (the loss
    // scaler's test): 1 where finite, 0 where not.
    for bad in [f32::INFINITY, f32::NAN] {
        let mut poisoned = tensors.clone();
        poisoned[3][12345] = bad;
        let pair = on_both!(h, |b| {
            let bufs: Vec<_> = poisoned.iter().map(|t| b.upload(t)).collect();
            let sums = b.squared_norms(&bufs.iter().collect::<Vec<_>>());
            sums.iter()
                .map(|s| if s.is_finite() { 1.0 } else { 0.0 })
                .collect::<Vec<f32>>()
        });
        assert_eq!(pair.0, [1.0, 1.0, 1.0, 0.0, 1.0], "the CPU reference");
        h.op(
            "squared_norms non-finite",
            format!("{bad} in tensor 3"),
            pair,
        );
    }
}
