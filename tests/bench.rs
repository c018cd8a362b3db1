//! `verdict bench kernels` without a GPU: the shapes it times, how it counts FLOPs and bytes,
//! how many input sets it rotates, its statistics and ratios, the JSON it writes, the
//! cuBLAS lookup, and the no-GPU exit path. Each test names the mistake it catches.

mod common;

use verdict::bench::cases::{
    self, nf4_weight_bytes, quantile, reps_for, rotation_sets, visible_pairs, AttentionPass, Case,
    Kernel, ModelShapes, Storage, Timing, Variant,
};
use verdict::bench::cublas::{self, CublasLibrary};
use verdict::bench::{
    format_table, parse_driver_version, random_values, summarize, utc_timestamp, Row,
};
use verdict::quant::nf4::{Nf4Options, Nf4Weight};

#[test]
fn gemma2_presets_give_the_real_projection_shapes() {
    // head_dim is a config field: q of Gemma2-2B is 2304 -> 8 * 256 = 2048, not 2304 -> 2304.
    let g2 = ModelShapes::gemma2("2b").unwrap();
    assert_eq!(
        (
            g2.hidden,
            g2.intermediate,
            g2.heads,
            g2.kv_heads,
            g2.head_dim
        ),
        (2304, 9216, 8, 4, 256)
    );
    assert_eq!((g2.window, g2.softcap), (Some(4096), Some(50.0)));
    assert_eq!(g2.inv_freq.len(), 128);
    let shapes: Vec<_> = g2
        .projections()
        .iter()
        .map(|p| (p.name, p.in_features, p.out_features))
        .collect();
    assert_eq!(
        shapes,
        [
            ("q", 2304, 2048),
            ("o", 2048, 2304),
            ("gate", 2304, 9216),
            ("down", 9216, 2304)
        ]
    );
    let g9 = ModelShapes::gemma2("9b").unwrap();
    assert_eq!(
        (
            g9.hidden,
            g9.intermediate,
            g9.heads,
            g9.kv_heads,
            g9.head_dim
        ),
        (3584, 14336, 16, 8, 256)
    );
    assert_eq!(g9.projections()[0].out_features, 4096);
    assert!(ModelShapes::gemma2("tiny").is_ok());
    let err = ModelShapes::gemma2("70b").unwrap_err().to_string();
    assert!(err.contains("tiny, 2b, 9b"), "{err}");
}

#[test]
fn linear_counts_two_flops_per_multiply_add_and_each_operand_once() {
    let k = |storage| Kernel::Linear {
        m: 2,
        n: 3,
        k: 128,
        storage,
    };
    assert_eq!(k(Storage::F32).flops(), 2.0 * 2.0 * 3.0 * 128.0);
    assert_eq!(
        k(Storage::F32).bytes(),
        4.0 * (2 * 128 + 3 * 128 + 2 * 3) as f64
    );
    assert_eq!(
        k(Storage::Bf16).bytes(),
        2.0 * (2 * 128 + 3 * 128 + 2 * 3) as f64
    );
    // The NF4 floor counts the packed weight, not the f32 copy the shipped path dequantizes.
    let nf4 = k(Storage::Nf4).bytes();
    assert_eq!(
        nf4,
        4.0 * (2 * 128 + 2 * 3) as f64 + nf4_weight_bytes(3 * 128)
    );
    // dX = dY · W reads dY [m, n], writes dX [m, k]: the same counts as the forward.
    let backward = Kernel::LinearBackward {
        m: 2,
        n: 3,
        k: 128,
        storage: Storage::Nf4,
    };
    assert_eq!(
        (backward.flops(), backward.bytes()),
        (k(Storage::Nf4).flops(), nf4)
    );
}

#[test]
fn nf4_byte_count_matches_a_quantized_weight() {
    for (rows, cols) in [(64, 1024), (9, 4096), (3, 64)] {
        let values = random_values(1, rows * cols);
        let w = Nf4Weight::quantize(&values, rows, cols, Nf4Options::default()).unwrap();
        assert_eq!(
            nf4_weight_bytes(rows * cols),
            w.bytes() as f64,
            "[{rows}, {cols}]"
        );
    }
}

#[test]
fn attention_counts_only_the_keys_the_mask_lets_through() {
    assert_eq!(visible_pairs(4, None), 1 + 2 + 3 + 4);
    assert_eq!(visible_pairs(4, Some(2)), 1 + 2 + 2 + 2, "window bites");
    assert_eq!(
        visible_pairs(5, Some(4096)),
        15,
        "window longer than the sequence"
    );
    let attention = |sequences, seq_len, pass| Kernel::Attention {
        sequences,
        seq_len,
        heads: 8,
        kv_heads: 4,
        head_dim: 256,
        window: Some(4096),
        softcap: true,
        pass,
    };
    let one = attention(1, 2048, AttentionPass::Forward);
    assert_eq!(one.flops(), 4.0 * (2048.0 * 2049.0 / 2.0) * 8.0 * 256.0);
    // Packing four 512-token sequences: the same bytes, a quarter of the causal pairs or so.
    let packed = attention(4, 512, AttentionPass::Forward);
    assert_eq!(packed.bytes(), one.bytes());
    assert_eq!(
        packed.flops(),
        4.0 * (4.0 * 512.0 * 513.0 / 2.0) * 8.0 * 256.0
    );
    assert_eq!(
        one.bytes(),
        4.0 * (2048 * 256 * 2 * (8 + 4) + 2048 * 8) as f64,
        "q, k, v read, out and lse written, once each"
    );
    // The backward: FlashAttention's 2.5x the forward's products; q, k, v, out, dout read,
    // dq, dk, dv written, lse read.
    let back = attention(1, 2048, AttentionPass::Backward);
    assert_eq!(back.flops(), 2.5 * one.flops());
    assert_eq!(
        back.bytes(),
        4.0 * (2048 * 256 * 4 * (8 + 4) + 2048 * 8) as f64
    );
}

#[test]
fn elementwise_ops_count_bytes_not_flops() {
    let norm = Kernel::Rmsnorm { tokens: 10, dim: 8 };
    assert_eq!(norm.flops(), 0.0);
    assert_eq!(norm.bytes(), 4.0 * (2 * 80 + 8) as f64);
    let act = Kernel::GatedActivation { tokens: 10, dim: 8 };
    assert_eq!(
        act.bytes(),
        4.0 * 240.0,
        "two inputs read, one output written"
    );
    let copy = Kernel::Copy { bytes: 1000 };
    assert_eq!(copy.bytes(), 2000.0, "a copy reads and writes every byte");
    let embedding = Kernel::Embedding {
        tokens: 10,
        dim: 8,
        rows: 100,
    };
    assert!(
        embedding.set_bytes() > embedding.bytes(),
        "the table counts toward a set's size"
    );
}

#[test]
fn rotation_sets_exceed_l2_several_times_within_bounds() {
    let l2 = 50 << 20;
    let mib = (1 << 20) as f64;
    assert_eq!(rotation_sets(10.0 * mib, l2), 15, "3 x 50 MiB / 10 MiB");
    assert_eq!(
        rotation_sets(200.0 * mib, l2),
        1,
        "one set already misses L2"
    );
    assert_eq!(rotation_sets(1.0 * mib, l2), cases::MAX_SETS, "capped");
    assert_eq!(rotation_sets(0.0, l2), 1);
    assert_eq!(
        rotation_sets(3.0 * (1u64 << 30) as f64, 4 << 30),
        1,
        "the memory cap never leaves zero sets"
    );
}

#[test]
fn timing_takes_the_median_and_percentiles_of_the_calls() {
    // Samples are f32 milliseconds: 0.5 ms etc. are exact in binary.
    let t = Timing::from_ms(&[0.75, 0.25, 0.5]).unwrap();
    assert_eq!((t.reps, t.min_us, t.median_us), (3, 250.0, 500.0), "{t:?}");
    let even = Timing::from_ms(&[1.0, 4.0, 2.0, 3.0]).unwrap();
    assert!(
        (even.median_us - 2500.0).abs() < 1e-6,
        "the mean of the middle two, not the upper one: {even:?}"
    );
    assert_eq!(quantile(&[0.0, 10.0], 0.1), 1.0);
    assert!(Timing::from_ms(&[]).is_none());
}

#[test]
fn reps_fill_the_budget_within_bounds() {
    assert_eq!(reps_for(1.0, 40.0, 10, 2000), 40);
    assert_eq!(reps_for(100.0, 40.0, 10, 2000), 10, "slow: the minimum");
    assert_eq!(reps_for(1e-4, 40.0, 10, 2000), 2000, "fast: the maximum");
    assert_eq!(reps_for(0.0, 40.0, 10, 2000), 2000, "no estimate");
}

const HOPPER: (i32, i32) = (9, 0);
const TURING: (i32, i32) = (7, 5);

#[test]
fn cases_cover_every_op_with_the_ceilings_first() {
    let shapes = ModelShapes::gemma2("2b").unwrap();
    let all = cases::cases(&shapes, &[], HOPPER);
    // copy + 3 square cuBLAS; 4 projections x (forward at m = 1: nf4, gemv, mma bf16, mma
    // f16, dequant, gemm_mma, f32, 3 cuBLAS; m = 16: the same without gemv; m = 512, 2048:
    // as m = 16 plus the adapted projection nf4_lora; backward at m = 512, 2048: as forward
    // at those rows); 2 token counts x 5 per-token ops; attention: 3 batches x 2 settings
    // (the preset's, head_dim 128) x (forward + 2 backward variants).
    assert_eq!(
        all.len(),
        4 + 4 * (10 + 9 + 2 * 10 + 2 * 10) + 10 + 3 * 2 * 3
    );
    assert_eq!(all[0].variant, Variant::DeviceCopy);
    assert!(all[1..4].iter().all(|c| c.variant.is_cublas()));
    let mut keys: Vec<_> = all
        .iter()
        .map(|c| (c.op, c.variant.name(), c.label.clone()))
        .collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), all.len(), "(op, variant, label) names one case");
    assert!(all.iter().any(|c| c.label == "down 9216->2304 m=2048"));
    for op in cases::OPS {
        assert!(all.iter().any(|c| c.op == op), "{op} missing");
    }
    let only = cases::cases(&shapes, &["attention".to_string()], HOPPER);
    assert_eq!(only.len(), 4 + 6, "the ceilings always run");
}

#[test]
fn nf4_kernel_cases_are_those_the_card_can_run() {
    // A case the kernel would refuse (GEMV past its row limit, bf16 tensor cores on a T4)
    // would only fail on the GPU: the list must not hold it.
    let shapes = ModelShapes::gemma2("2b").unwrap();
    let names = |cc, m: usize| -> Vec<&str> {
        cases::cases(&shapes, &["linear".to_string()], cc)
            .iter()
            .filter(|c| c.label == format!("q 2304->2048 m={m}"))
            .map(|c| c.variant.name())
            .filter(|n| n.starts_with("nf4"))
            .collect()
    };
    assert_eq!(
        names(HOPPER, 1),
        [
            "nf4",
            "nf4_gemv",
            "nf4_mma_bf16",
            "nf4_mma_f16",
            "nf4_dequant_gemm"
        ]
    );
    assert_eq!(
        names(HOPPER, 16),
        ["nf4", "nf4_mma_bf16", "nf4_mma_f16", "nf4_dequant_gemm"]
    );
    assert_eq!(
        names(TURING, 512),
        ["nf4", "nf4_mma_f16", "nf4_dequant_gemm", "nf4_lora"]
    );
    let backward: Vec<&str> = cases::cases(&shapes, &["linear_backward".to_string()], HOPPER)
        .iter()
        .filter(|c| c.label == "q 2304->2048 m=512")
        .map(|c| c.variant.name())
        .collect();
    assert_eq!(
        backward,
        [
            "nf4",
            "nf4_mma_bf16",
            "nf4_mma_f16",
            "nf4_dequant_gemm",
            "nf4_lora",
            "gemm_mma",
            "f32",
            "cublas_bf16",
            "cublas_tf32",
            "cublas_f32"
        ],
        "no GEMV for dY·W"
    );
    let json = serde_json::to_value(Variant::Nf4Kernel(
        verdict::backend::cuda::nf4::Nf4Kernel::Gemv,
    ))
    .unwrap();
    assert_eq!(json, "nf4_gemv", "variants serialise by name");
}

fn row(case: &Case, median_us: f64) -> Row {
    let mut row = Row::new(case, 1);
    row.timing = Some(Timing {
        reps: 10,
        median_us,
        min_us: median_us,
        p10_us: median_us,
        p90_us: median_us,
    });
    row
}

#[test]
fn summarize_sets_each_row_against_the_ceilings_of_the_same_run() {
    let linear = |variant, storage| Case {
        op: "linear",
        variant,
        label: "q 2304->2048 m=512".into(),
        kernel: Kernel::Linear {
            m: 512,
            n: 2048,
            k: 2304,
            storage,
        },
    };
    let copy = Case {
        op: "copy",
        variant: Variant::DeviceCopy,
        label: "1 GB".into(),
        kernel: Kernel::Copy {
            bytes: 1_000_000_000,
        },
    };
    let mut rows = vec![
        row(&copy, 1000.0), // 2e9 bytes in 1 ms: 2000 GB/s
        row(&linear(Variant::CublasBf16, Storage::Bf16), 10.0),
        row(&linear(Variant::CublasF32, Storage::F32), 100.0),
        row(&linear(Variant::Nf4, Storage::Nf4), 200.0),
    ];
    let mut failed = Row::new(&linear(Variant::F32, Storage::F32), 1);
    failed.error = Some("out of memory".into());
    rows.push(failed);
    let limits = summarize(&mut rows);
    assert!((limits.copy_gbps.unwrap() - 2000.0).abs() < 1e-9);
    let flops = 2.0 * 512.0 * 2048.0 * 2304.0;
    assert!((limits.cublas_bf16_tflops.unwrap() - flops / 10e-6 * 1e-12).abs() < 1e-9);
    assert_eq!(
        limits.cublas_tf32_tflops, None,
        "no TF32 row: no ceiling, not 0"
    );
    let nf4 = &rows[3];
    assert!(
        (nf4.vs_cublas_bf16.unwrap() - 0.05).abs() < 1e-12,
        "10 us / 200 us"
    );
    assert!((nf4.vs_cublas_f32.unwrap() - 0.5).abs() < 1e-12);
    assert_eq!(nf4.vs_cublas_tf32, None);
    assert!((nf4.of_cublas_bf16_peak.unwrap() - 0.05).abs() < 1e-12);
    let byte_floor = nf4.bytes / 2000.0 * 1e-3;
    let floor = byte_floor.max(10.0);
    assert!((nf4.floor_us.unwrap() - floor).abs() < 1e-9);
    assert!((nf4.of_floor.unwrap() - floor / 200.0).abs() < 1e-12);
    assert_eq!(
        rows[1].vs_cublas_bf16, None,
        "cuBLAS is not compared with itself"
    );
    assert_eq!(rows[4].tflops, None, "a failed case gets no rates");
    let table = format_table(&verdict::bench::Report {
        schema: verdict::bench::SCHEMA,
        status: "ok",
        reason: None,
        date_utc: utc_timestamp(0),
        verdict_version: "test",
        shapes: None,
        device: None,
        driver_version: None,
        kernel_source: None,
        modules: Vec::new(),
        cublas: None,
        cublas_error: None,
        limits,
        rows: rows.clone(),
        failures: 1,
        seconds: 0.0,
    });
    assert!(table.contains("FAILED"), "{table}");
    assert!(table.contains("copy 2000 GB/s"), "{table}");
    let json = serde_json::to_value(&rows[3]).unwrap();
    assert_eq!(json["kernel"]["kind"], "linear");
    assert_eq!(json["kernel"]["storage"], "nf4");
    assert_eq!(json["variant"], "nf4");
    assert_eq!(json["label"], "q 2304->2048 m=512");
    assert_eq!(json["timing"]["median_us"], 200.0);
}

#[test]
fn timestamps_and_driver_versions_parse() {
    assert_eq!(utc_timestamp(0), "1970-01-01T00:00:00Z");
    assert_eq!(utc_timestamp(951_782_400), "2000-02-29T00:00:00Z");
    assert_eq!(utc_timestamp(1_700_000_000), "2023-11-14T22:13:20Z");
    assert_eq!(
        parse_driver_version(
            "NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.82.07  Sun Aug 17 2025\nGCC version: gcc 12.3"
        )
        .as_deref(),
        Some("580.82.07")
    );
    assert_eq!(
        parse_driver_version(
            "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.86.15  Release Build  (dvs-builder@U16-I3-B03-4-3)"
        )
        .as_deref(),
        Some("570.86.15")
    );
    assert_eq!(parse_driver_version("no version here"), None);
}

#[test]
fn random_inputs_are_reproducible_and_never_zero() {
    let a = random_values(7, 200_000);
    assert_eq!(a, random_values(7, 200_000), "same seed, same values");
    assert_ne!(a, random_values(8, 200_000));
    assert!(a.iter().all(|&v| v != 0.0 && (-1.0..1.0).contains(&v)));
}

#[test]
fn cublas_is_found_or_the_error_names_the_library() {
    // Found where LD_LIBRARY_PATH holds libcublas (e.g. <venv>/.../nvidia/cu13/lib): the
    // five entry points resolve. Loading needs no GPU.
    match CublasLibrary::open() {
        Ok(library) => assert!(cublas::LIBRARY_NAMES.contains(&library.name)),
        Err(e) => {
            let message = format!("{e:#}");
            assert!(message.contains("libcublas.so.13"), "{message}");
            assert!(message.contains("LD_LIBRARY_PATH"), "{message}");
            eprintln!("bench: cuBLAS not on the library path, checked the error only");
        }
    }
    assert_eq!(cublas::status_name(7), "CUBLAS_STATUS_INVALID_VALUE");
}

#[test]
fn bench_without_a_gpu_says_so_and_exits_3() {
    let Some(report) = common::no_device_report(
        &["bench", "kernels"],
        "no CUDA device: bench kernels needs a GPU",
    ) else {
        return;
    };
    assert_eq!(report["status"], "no_device");
    assert_eq!(report["schema"], verdict::bench::SCHEMA);
    assert_eq!(report["shapes"]["hidden"], 2304);
    // --device cpu is a usage error, not "no device"; an unknown preset is refused by clap.
    let cpu = common::verdict(["bench", "kernels", "--device", "cpu"]);
    assert_eq!(cpu.status.code(), Some(1));
    let preset = common::verdict(["bench", "kernels", "--preset", "70b"]);
    assert_eq!(preset.status.code(), Some(2));
}

/// `verdict bench train`'s body (the GPU command wraps it) runs the training path on any
/// backend: here the CPU, tiny preset, so the code a first GPU run depends on is exercised.
#[test]
fn bench_train_body_runs_the_training_path() {
    let dir = tempfile::tempdir().unwrap();
    let args = verdict::bench::train::TrainArgs {
        device: "cuda".into(),
        preset: "tiny".into(),
        max_len: 64,
        steps: 3,
        model: None,
        scratch: None,
        json: None,
    };
    let report =
        verdict::bench::train::bench(&verdict::backend::cpu::Cpu, &args, dir.path()).unwrap();
    assert_eq!(report.steps, 3);
    assert_eq!(report.tokens_per_step, 64);
    assert_eq!(report.step_tokens_per_s.len(), 3);
    assert!(
        report.tokens_per_s.is_finite() && report.tokens_per_s > 0.0,
        "{report:?}"
    );
    assert!(report.memory.is_none(), "the CPU has no device pool");
}
