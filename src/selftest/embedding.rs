//! Cases of the embedding family (cuda/embedding.rs vs cpu/embedding.rs): the token
//! embedding, row gathers and scatter-adds.

use super::{nan, Harness};
use crate::backend::cpu::Cpu;
use crate::backend::{Backend, WeightData};

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
            b.embedding(
                &mut out,
                &WeightData::Dense(b.upload(&table)),
                &ids,
                dim,
                scale,
            );
            b.download(&out)
        });
        h.op(
            "embedding",
            format!("tokens={tokens} vocab={vocab} dim={dim} scale={scale}"),
            pair,
        );
        // The table in 16 bits (Backend::upload_half: f16, or bf16 when a value is beyond
        // f16's range, as the last case's is) against the CPU reference on the same table
        // rounded to it: widening is exact and the product is f32 on both, so the results
        // agree as the f32 ones do.
        let mut table = table;
        if vocab == 4096 {
            table[5] = 1e6;
        }
        let bf16 = crate::backend::cuda::half_is_bf16(&table);
        let rounded: Vec<f32> = table
            .iter()
            .map(|&v| {
                if bf16 {
                    half::bf16::from_f32(v).to_f32()
                } else {
                    half::f16::from_f32(v).to_f32()
                }
            })
            .collect();
        let cpu = {
            let mut out = nan(tokens * dim);
            Cpu.embedding(&mut out, &WeightData::Dense(rounded), &ids, dim, scale);
            out
        };
        let gpu = {
            let b = &h.cuda;
            let mut out = b.upload(&nan(tokens * dim));
            let half = b.upload_half(&table).expect("CUDA has a half type");
            b.embedding(&mut out, &WeightData::Half(half), &ids, dim, scale);
            b.download(&out)
        };
        h.op(
            "embedding",
            format!(
                "{} table tokens={tokens} vocab={vocab} dim={dim} scale={scale}",
                if bf16 { "bf16" } else { "f16" }
            ),
            (cpu, gpu),
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
