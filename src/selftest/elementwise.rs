//! Cases of the elementwise family (cuda/elementwise.rs vs cpu/elementwise.rs): add,
//! soft-cap, dropout.

use super::Harness;
use crate::backend::Backend;

pub(super) fn cases(h: &mut Harness) {
    for n in [1, 7, 333 * 9216] {
        let acc = h.random(n, 1.0);
        let x = h.random(n, 1.0);
        let pair = on_both!(h, |b| {
            let mut buf = b.upload(&acc);
            b.add(&mut buf, &b.upload(&x));
            b.download(&buf)
        });
        h.op("add", format!("n={n}"), pair);
        let logits = h.random(n, 50.0);
        for cap in [30.0, 50.0] {
            let pair = on_both!(h, |b| {
                let mut buf = b.upload(&logits);
                b.softcap(&mut buf, cap);
                b.download(&buf)
            });
            h.op("softcap", format!("n={n} cap={cap}"), pair);
        }
        for (p, seed) in [(0.1, 7), (0.5, 12345)] {
            let pair = on_both!(h, |b| {
                let mut buf = b.upload(&x);
                b.dropout(&mut buf, p, seed);
                b.download(&buf)
            });
            h.op("dropout", format!("n={n} p={p} seed={seed}"), pair);
        }
    }
}
