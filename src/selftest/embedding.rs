//! Cases of the embedding family (cuda/embedding.rs vs cpu/embedding.rs): the token
//! embedding, row gathers and scatter-adds.

use super::{nan, Harness};
use crate::backend::Backend;

pub(super) fn cases(h: &mut Harness) {
    for (tokens, vocab, dim, scale) in [
        (1, 50, 64, 8.0),
        (7, 1000, 333, 1.0),
        (333, 4096, 2304, 48.0),
    ] {
        let table = h.random(vocab * dim, 1.0);
        let ids: Vec<u32> = (0..tokens).map(|_| h.rng.below(vocab) as u32).collect();
        let pair = on_both!(h, |b| {
            let mut out = b.upload(&nan(tokens * dim));
            b.embedding(&mut out, &b.upload(&table), &ids, dim, scale);
            b.download(&out)
        });
        h.op(
            "embedding",
            format!("tokens={tokens} vocab={vocab} dim={dim} scale={scale}"),
            pair,
        );
    }
    for (rows_in, dim, rows) in [(7, 7, vec![6]), (333, 2304, vec![332, 0, 17, 17])] {
        let x = h.random(rows_in * dim, 1.0);
        let pair = on_both!(h, |b| {
            let mut out = b.upload(&nan(rows.len() * dim));
            b.gather_rows(&mut out, &b.upload(&x), &rows, dim);
            b.download(&out)
        });
        h.op(
            "gather_rows",
            format!("from {rows_in}x{dim} rows={rows:?}"),
            pair,
        );
        let grad = h.random(rows.len() * dim, 1.0);
        let acc = h.random(rows_in * dim, 1.0);
        let pair = on_both!(h, |b| {
            let mut out = b.upload(&acc);
            b.scatter_add_rows(&mut out, &b.upload(&grad), &rows, dim);
            b.download(&out)
        });
        h.op(
            "scatter_add_rows",
            format!("into {rows_in}x{dim} rows={rows:?}"),
            pair,
        );
    }
}
