//! Cases of the loss (cuda/loss.rs, on the host, vs cpu/loss.rs): softmax cross-entropy with
//! smoothing, weights and unlabeled rows.

use super::{nan, Harness};
use crate::backend::Backend;

pub(super) fn cases(h: &mut Harness) {
    let (rows, classes) = (7, 3);
    let logits = h.random(rows * classes, 2.0);
    let labels = [Some(0), Some(2), None, Some(1), Some(1), None, Some(0)];
    let pair = on_both!(h, |b| {
        let mut dlogits = b.upload(&nan(rows * classes));
        let losses =
            b.softmax_cross_entropy(&mut dlogits, &b.upload(&logits), &labels, classes, 0.1, 0.5);
        [losses, b.download(&dlogits)].concat()
    });
    h.op(
        "softmax_cross_entropy",
        format!("rows={rows} classes={classes} smoothing=0.1"),
        pair,
    );
}
