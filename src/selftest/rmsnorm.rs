//! Cases of the RMSNorm family (cuda/rmsnorm.rs vs cpu/rmsnorm.rs): forward and backward,
//! both norm styles, both stores.

use super::{nan, Activations, Harness};
use crate::backend::{Backend, NormStyle, Store};
use crate::model::weights::Dtype;

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
        // The mixed-precision decoder's layouts: the f32 residual stream normed into a 16-bit
        // projection input, and Gemma 3's QK-norm from 16-bit q / k to 16-bit.
        let half = h.cuda.half_dtype();
        for x_type in [Dtype::F32, half] {
            let pair = on_both!(h, |b| {
                let mut out = b.upload_act(&nan(rows * dim), half);
                let x = b.upload_act(&x, x_type);
                b.rmsnorm(&mut out, &x, &b.upload(&w), dim, 1e-6, style);
                b.download(&out)
            });
            h.op_stored(
                "rmsnorm",
                half,
                format!("{case} x={x_type:?} out={half:?}"),
                pair,
            );
        }
        let dy = h.random(rows * dim, 1.0);
        let dx0 = h.random(rows * dim, 1.0);
        for store in [Store::Overwrite, Store::Accumulate(1.0)] {
            let start = if store == Store::Overwrite {
                nan(rows * dim)
            } else {
                dx0.clone()
            };
            // f32 x, and the 16-bit q / k that QK-norm's backward reads.
            for x_type in [Dtype::F32, h.cuda.half_dtype()] {
                let pair = on_both!(h, |b| {
                    let mut dx = b.upload(&start);
                    b.rmsnorm_backward(
                        &mut dx,
                        &b.upload(&dy),
                        &b.upload_act(&x, x_type),
                        &b.upload(&w),
                        dim,
                        1e-6,
                        style,
                        store,
                    );
                    b.download(&dx)
                });
                let label = format!("{case} {store:?} x={x_type:?}");
                h.op("rmsnorm_backward", label, pair);
            }
        }
    }
}
