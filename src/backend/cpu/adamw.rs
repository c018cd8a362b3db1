//! The optimizer's ops (kernels/adamw.cu): AdamW's update of one tensor and squared norms.
//! `train::optimizer::AdamW` (the host optimizer, checked against torch) runs [`adamw`] too.

use crate::backend::AdamWStep;
use rayon::prelude::*;

/// One AdamW update of `param` and its moments from `grad · step.grad_scale`, in torch's
/// order and f32 roundings (see [`AdamWStep`]).
pub fn adamw(param: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32], step: &AdamWStep) {
    let n = param.len();
    assert!(
        grad.len() == n && m.len() == n && v.len() == n,
        "adamw: sizes differ"
    );
    let s = *step;
    param
        .par_iter_mut()
        .zip(grad.par_iter())
        .zip(m.par_iter_mut().zip(v.par_iter_mut()))
        .for_each(|((p, &g), (m, v))| {
            let g = g * s.grad_scale;
            *p *= s.decay;
            *m += s.one_minus_beta1 * (g - *m);
            *v = *v * s.beta2 + s.one_minus_beta2 * g * g;
            let denom = v.sqrt() / s.bias2_sqrt + s.eps;
            *p -= s.step_size * (*m / denom);
        });
}

/// The sum of squares of each tensor, in f64.
pub fn squared_norms(xs: &[&Vec<f32>]) -> Vec<f64> {
    xs.iter()
        .map(|x| x.iter().map(|&g| g as f64 * g as f64).sum())
        .collect()
}
