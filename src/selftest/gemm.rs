//! Cases of the GEMM family (cuda/gemm.rs vs cpu/gemm.rs): dense `linear`,
//! `linear_backward` and `linear_weight_grad`, both stores.

use super::{dense, nan, Harness};
use crate::backend::{Backend, Store};

pub(super) fn cases(h: &mut Harness) {
    for (rows, in_f, out_f) in [(1, 64, 3), (7, 333, 129), (333, 256, 1000), (64, 2304, 256)] {
        let x = h.random(rows * in_f, 1.0);
        let w = h.random(out_f * in_f, 0.05);
        let out0 = h.random(rows * out_f, 1.0);
        let dy = h.random(rows * out_f, 1.0);
        let dx0 = h.random(rows * in_f, 1.0);
        let shape = format!("rows={rows} in={in_f} out={out_f}");
        for store in [Store::Overwrite, Store::Accumulate(0.5)] {
            let overwrite = store == Store::Overwrite;
            let start = if overwrite {
                nan(rows * out_f)
            } else {
                out0.clone()
            };
            let pair = on_both!(h, |b| {
                let mut out = b.upload(&start);
                b.linear(
                    &mut out,
                    &b.upload(&x),
                    &dense(b, &w, out_f, in_f),
                    rows,
                    store,
                );
                b.download(&out)
            });
            h.op("linear (dense)", format!("{shape} {store:?}"), pair);
            let start = if overwrite {
                nan(rows * in_f)
            } else {
                dx0.clone()
            };
            let pair = on_both!(h, |b| {
                let mut dx = b.upload(&start);
                b.linear_backward(
                    &mut dx,
                    &b.upload(&dy),
                    &dense(b, &w, out_f, in_f),
                    rows,
                    store,
                );
                b.download(&dx)
            });
            h.op(
                "linear_backward (dense)",
                format!("{shape} {store:?}"),
                pair,
            );
        }
        let dw0 = h.random(out_f * in_f, 1.0);
        let pair = on_both!(h, |b| {
            let mut dw = b.upload(&dw0);
            b.linear_weight_grad(
                &mut dw,
                &b.upload(&dy),
                &b.upload(&x),
                rows,
                in_f,
                out_f,
                0.5,
            );
            b.download(&dw)
        });
        h.op("linear_weight_grad", format!("{shape} scale=0.5"), pair);
    }
}
