//! Cases of the gated-activation family (cuda/activation.rs vs cpu/activation.rs): GeGLU and
//! SwiGLU, forward and backward.

use super::{nan, Activations, Harness};
use crate::backend::{Activation, Backend};
use crate::model::weights::Dtype;

pub(super) fn cases(h: &mut Harness) {
    // Activations (gate, up, out) in f32, then in the card's 16-bit type as the
    // mixed-precision decoder stores them; gradients always f32.
    let half = h.cuda.half_dtype();
    for (n, act_type) in [
        (1, Dtype::F32),
        (7, Dtype::F32),
        (333 * 9216, Dtype::F32),
        (1, half),
        (333 * 9216 + 5, half),
    ] {
        let gate = h.random(n, 3.0);
        let up = h.random(n, 1.0);
        let dout = h.random(n, 1.0);
        for act in [Activation::GeluTanh, Activation::Silu] {
            let case = format!("n={n} {act:?} activations={act_type:?}");
            let pair = on_both!(h, |b| {
                let mut out = b.upload_act(&nan(n), act_type);
                let (gate, up) = (b.upload_act(&gate, act_type), b.upload_act(&up, act_type));
                b.gated_activation(&mut out, &gate, &up, act);
                b.download(&out)
            });
            h.op_stored("gated_activation", act_type, case.clone(), pair);
            let pair = on_both!(h, |b| {
                let (mut dgate, mut dup) = (b.upload(&nan(n)), b.upload(&nan(n)));
                b.gated_activation_backward(
                    &mut dgate,
                    &mut dup,
                    &b.upload(&dout),
                    &b.upload_act(&gate, act_type),
                    &b.upload_act(&up, act_type),
                    act,
                );
                [b.download(&dgate), b.download(&dup)].concat()
            });
            h.op("gated_activation_backward", case, pair);
        }
    }
}
