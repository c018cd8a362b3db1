//! The emulated device's speed (`--device emu`): how long the CPU takes to run our kernels
//! as C++ fibers with every access checked, next to the CPU reference doing the same op in
//! the same run. These are NOT GPU timings (`verdict bench` refuses the emulator); they say
//! what a selftest or a parity test costs in CI.
//!
//! `cargo bench --bench emulator` prints, per op and shape: the emulator's wall time, CUDA
//! threads run per second, useful GFLOP/s, and the ratio to the CPU reference's time (rayon,
//! all cores). Shapes: a tiny model's and one Gemma2-2B layer's (hidden 2304, 8 heads of 256,
//! 4 KV heads, MLP 9216), at 64 tokens.

use std::time::Instant;
use verdict::backend::cpu::Cpu;
use verdict::backend::cuda::emu::{self, EmuArch};
use verdict::backend::cuda::Cuda;
use verdict::backend::{AttentionParams, Backend, Store, Weight, WeightData};
use verdict::quant::nf4::{Nf4Options, Nf4Weight};

fn values(n: usize) -> Vec<f32> {
    (0..n).map(|i| ((i as f32) * 0.618).sin() * 0.5).collect()
}

/// Seconds of `f` (one run: the emulator is deterministic enough, and slow).
fn time(f: impl FnOnce()) -> f64 {
    let start = Instant::now();
    f();
    start.elapsed().as_secs_f64()
}

fn nf4_linear<B: Backend>(b: &B, tokens: usize, inf: usize, outf: usize, w: &Nf4Weight) -> f64 {
    let x = b.upload(&values(tokens * inf));
    let w = Weight {
        out_features: outf,
        in_features: inf,
        data: WeightData::Nf4(b.upload_nf4(w.clone())),
    };
    let mut out = b.zeros(tokens * outf);
    let seconds = time(|| b.linear(&mut out, &x, &w, tokens, Store::Overwrite));
    b.download(&out);
    seconds
}

fn attention<B: Backend>(b: &B, tokens: usize, p: &AttentionParams) -> f64 {
    let q = b.upload(&values(tokens * p.heads * p.head_dim));
    let kv = b.upload(&values(tokens * p.kv_heads * p.head_dim));
    let mut out = b.zeros(tokens * p.heads * p.head_dim);
    let mut lse = b.zeros(tokens * p.heads);
    let seconds = time(|| b.attention(&mut out, &mut lse, &q, &kv, &kv, &[0, tokens], p));
    b.download(&out);
    seconds
}

fn main() {
    if !emu::available() {
        println!("no emulated device in this build (build.rs needs GCC on x86-64)");
        return;
    }
    println!(
        "{:<34} {:>9} {:>12} {:>9} {:>9} {:>8}",
        "op (64 tokens)", "emu s", "threads/s", "GFLOP/s", "cpu s", "emu/cpu"
    );
    let tokens = 64;
    for arch in [EmuArch::Sm75, EmuArch::Sm80] {
        for (label, inf, outf) in [("tiny 64->128", 64, 128), ("2B 2304->9216", 2304, 9216)] {
            let w =
                Nf4Weight::quantize(&values(outf * inf), outf, inf, Nf4Options::default()).unwrap();
            let cuda = Cuda::emulated(0, arch, 4 << 30, None).unwrap();
            let emu_s = nf4_linear(&cuda, tokens, inf, outf, &w);
            cuda.check().unwrap();
            let cpu_s = nf4_linear(&Cpu, tokens, inf, outf, &w);
            let threads = cuda.emulated_threads_run().unwrap() as f64;
            let flops = 2.0 * (tokens * inf * outf) as f64;
            println!(
                "{:<34} {:>9.3} {:>12.3e} {:>9.3} {:>9.4} {:>8.0}",
                format!("nf4 linear {label} {arch}"),
                emu_s,
                threads / emu_s,
                flops / emu_s / 1e9,
                cpu_s,
                emu_s / cpu_s
            );
        }
    }
    for (label, heads, kv_heads, head_dim) in
        [("tiny 2x32", 2, 1, 32), ("2B 8x256 (4 kv)", 8, 4, 256)]
    {
        let p = AttentionParams {
            heads,
            kv_heads,
            head_dim,
            scale: 1.0 / (head_dim as f32).sqrt(),
            softcap: Some(50.0),
            window: None,
        };
        let cuda = Cuda::emulated(0, EmuArch::Sm75, 4 << 30, None).unwrap();
        let emu_s = attention(&cuda, tokens, &p);
        cuda.check().unwrap();
        let cpu_s = attention(&Cpu, tokens, &p);
        let threads = cuda.emulated_threads_run().unwrap() as f64;
        // QKᵀ and PV over the causal half.
        let flops = 2.0 * 2.0 * (heads * head_dim * tokens * (tokens + 1) / 2) as f64;
        println!(
            "{:<34} {:>9.3} {:>12.3e} {:>9.3} {:>9.4} {:>8.0}",
            format!("attention {label} sm75"),
            emu_s,
            threads / emu_s,
            flops / emu_s / 1e9,
            cpu_s,
            emu_s / cpu_s
        );
    }
}
