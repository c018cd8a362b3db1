//! Cases of the RMSNorm family (cuda/rmsnorm.rs vs cpu/rmsnorm.rs): forward and backward,
//! both norm styles, both stores.

use super::{nan, Harness};
use crate::backend::{Backend, NormStyle, Store};

pub(super) fn cases(h: &mut Harness) {
    let shapes = [
        (1, 64),
        (7, 333),
        (333, 2304),
        (333 * 8, 256),
        (7, 128),
        (1, 4608),
    ];
    for (i, &(rows, dim)) in shapes.iter().enumerate() {
        let style = if i % 2 == 0 {
            NormStyle::OnePlusWeight
        } else {
            NormStyle::Weight
        };
        let x = h.random(rows * dim, 2.0);
        let w = h.random(dim, 0.5);
        let case = format!("rows={rows} dim={dim} {style:?}");
        let pair = on_both!(h, |b| {
            let mut out = b.upload(&nan(rows * dim));
            b.rmsnorm(&mut out, &b.upload(&x), &b.upload(&w), dim, 1e-6, style);
            b.download(&out)
        });
        h.op("rmsnorm", case.clone(), pair);
        let dy = h.random(rows * dim, 1.0);
        let dx0 = h.random(rows * dim, 1.0);
        for store in [Store::Overwrite, Store::Accumulate(1.0)] {
            let start = if store == Store::Overwrite {
                nan(rows * dim)
            } else {
                dx0.clone()
            };
            let pair = on_both!(h, |b| {
                let mut dx = b.upload(&start);
                b.rmsnorm_backward(
                    &mut dx,
                    &b.upload(&dy),
                    &b.upload(&x),
                    &b.upload(&w),
                    dim,
                    1e-6,
                    style,
                    store,
                );
                b.download(&dx)
            });
            h.op("rmsnorm_backward", format!("{case} {store:?}"), pair);
        }
    }
}
