//! Cases of the RoPE family (cuda/rope.rs vs cpu/rope.rs): forward and backward.

use super::{inv_freq, packing, Activations, Harness};
use crate::backend::Backend;

pub(super) fn cases(h: &mut Harness) {
    // (sequence lengths, heads, head_dim, position offset): the offset reaches the long
    // positions where the angle needs full range reduction.
    for (lengths, heads, head_dim, offset) in [
        (vec![1], 1, 64, 0),
        (vec![3, 7], 4, 128, 0),
        (vec![333], 8, 256, 0),
        (vec![100, 233], 2, 64, 120_000),
    ] {
        let (_, positions) = packing(&lengths);
        let positions: Vec<u32> = positions.iter().map(|&p| p + offset).collect();
        let freq = inv_freq(head_dim, 10_000.0);
        let x = h.random(positions.len() * heads * head_dim, 1.0);
        let case = format!("lengths={lengths:?} heads={heads} head_dim={head_dim} offset={offset}");
        let pair = on_both!(h, |b| {
            let mut buf = b.upload(&x);
            b.rope(&mut buf, &positions, &freq, heads, head_dim);
            b.download(&buf)
        });
        h.op("rope", case.clone(), pair);
        let pair = on_both!(h, |b| {
            let mut buf = b.upload(&x);
            b.rope_backward(&mut buf, &positions, &freq, heads, head_dim);
            b.download(&buf)
        });
        h.op("rope_backward", case.clone(), pair);
        // q and k as the mixed-precision decoder stores them: in the card's 16-bit type.
        let half = h.cuda.half_dtype();
        let pair = on_both!(h, |b| {
            let mut buf = b.upload_act(&x, half);
            b.rope(&mut buf, &positions, &freq, heads, head_dim);
            b.download(&buf)
        });
        h.op_stored("rope", half, format!("{case} x={half:?}"), pair);
    }
}
