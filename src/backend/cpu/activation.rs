//! Gated MLP activations: GeGLU (`gelu_tanh(gate) · up`, Gemma) and SwiGLU
//! (`silu(gate) · up`, LLaMA).

use crate::backend::Activation;
use rayon::prelude::*;

/// GELU, tanh approximation, as PyTorch's `gelu(approximate="tanh")`.
fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x)).tanh())
}

/// SiLU (swish): `x · sigmoid(x)`.
fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// `out = act(gate) · up`, elementwise.
pub fn gated_activation_forward(out: &mut [f32], gate: &[f32], up: &[f32], act: Activation) {
    assert!(
        out.len() == gate.len() && gate.len() == up.len(),
        "gated activation: sizes differ"
    );
    let f = match act {
        Activation::GeluTanh => gelu_tanh,
        Activation::Silu => silu,
    };
    out.par_iter_mut()
        .zip(gate)
        .zip(up)
        .for_each(|((o, &g), &u)| *o = f(g) * u);
}
