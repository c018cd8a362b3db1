//! Cases of the gated-activation family (cuda/activation.rs vs cpu/activation.rs): GeGLU and
//! SwiGLU, forward and backward.

use super::{nan, Harness};
use crate::backend::{Activation, Backend};

pub(super) fn cases(h: &mut Harness) {
    for n in [1, 7, 333 * 9216] {
        let gate = h.random(n, 3.0);
        let up = h.random(n, 1.0);
        let dout = h.random(n, 1.0);
        for act in [Activation::GeluTanh, Activation::Silu] {
            let pair = on_both!(h, |b| {
                let mut out = b.upload(&nan(n));
                b.gated_activation(&mut out, &b.upload(&gate), &b.upload(&up), act);
                b.download(&out)
            });
            h.op("gated_activation", format!("n={n} {act:?}"), pair);
            let pair = on_both!(h, |b| {
                let (mut dgate, mut dup) = (b.upload(&nan(n)), b.upload(&nan(n)));
                b.gated_activation_backward(
                    &mut dgate,
                    &mut dup,
                    &b.upload(&dout),
                    &b.upload(&gate),
                    &b.upload(&up),
                    act,
                );
                [b.download(&dgate), b.download(&dup)].concat()
            });
            h.op("gated_activation_backward", format!("n={n} {act:?}"), pair);
        }
    }
}
