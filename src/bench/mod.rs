//! `verdict bench kernels`: times every op of the CUDA backend at a model's real shapes and
//! sets each time against ceilings measured in the same run on the same card.
//!
//! Place in the data flow: none — it measures the ops `model::decoder` calls, so that kernel
//! work is steered by numbers (`.library/device/METHOD.md`); tools/gpu-check.sh runs it next
//! to tools/bench_torch.py (PyTorch, bitsandbytes, transformers on the same card).
//!
//! Method: each case rotates through enough input sets to exceed the L2 cache several times
//! ([`cases::rotation_sets`]), warms up (module load, cuBLAS heuristics), then times each
//! call with device events recorded between calls queued back to back, and keeps the median
//! ([`cases::Timing`]). The ceilings are measured first: a 512 MiB device-to-device copy
//! (bytes read + written: the bandwidth ceiling) and square 8192³ `cublasGemmEx` products in
//! bf16, TF32 and f32 (the arithmetic ceilings). NF4 linear rows are timed as `linear` runs
//! them (the backend's choice of kernel) and through each NF4 kernel the card can run
//! (`Cuda::nf4_product`), so a kernel's rows show where the choice should switch. Every
//! linear shape is also run through
//! cuBLAS in those three precisions, so each of our linear rows says how it compares with
//! cuBLAS at the same shape. Ops are timed as the backend runs them, host work and scratch
//! included (uploads of index arrays, `nf4_dequant_gemm`'s dequantized weight).
//!
//! Exit codes: 0 every case ran; 1 a case failed or cuBLAS is missing (the rest still runs and
//! the JSON is written); [`EXIT_NO_DEVICE`] no CUDA device here.

pub mod cases;
pub mod cublas;
pub mod train;

use crate::backend::cuda::attention::FlashBackward;
use crate::backend::cuda::gemm::GemmKernel;
use crate::backend::cuda::nf4::{MmaOperands, Nf4Product};
use crate::backend::cuda::{self, Cuda, CudaBuf, Device, DeviceInfo, KernelSource, ModuleReport};
use crate::backend::{
    Activation, AttentionParams, Backend, LoraAdapter, NormStyle, Store, Weight, WeightData,
};
use crate::cli::range;
use crate::quant::nf4::{Nf4Options, Nf4Weight};
use crate::rng::Rng;
pub use crate::selftest::EXIT_NO_DEVICE;
use anyhow::{bail, Context, Result};
use cases::{AttentionPass, Case, Kernel, ModelShapes, Storage, Timing, Variant, OPS, PRESETS};
use cublas::{Cublas, CublasLibrary};
use rayon::prelude::*;
use serde::Serialize;
use std::path::PathBuf;
use std::time::{Instant, SystemTime};

/// Exit code: a case failed, cuBLAS is missing, or the run broke.
pub const EXIT_FAILED: u8 = 1;
/// The `schema` field of the JSON report; bump when a field changes meaning.
pub const SCHEMA: &str = "verdict-bench-kernels/1";
/// Untimed-for-the-result calls before the timed ones (module load, cuBLAS heuristics); their
/// median estimates a call's time, which sets the number of timed calls.
const WARMUP_CALLS: usize = 3;
/// Fewest timed calls per case.
const MIN_REPS: usize = 10;
/// Most timed calls per case.
const MAX_REPS: usize = 2000;

/// `verdict bench ...`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Time every CUDA op at a model's shapes against a device copy and cuBLAS on the same card.
    ///
    /// NF4 linear (as the backend chooses, and each NF4 kernel the card runs: GEMV, bf16 and
    /// fp16 tensor cores, dequantize + f32 GEMM) and f32 linear (q, o, gate, down at 1, 16,
    /// 512, 2048 rows; the input gradient dY·W at 512 and 2048), RMSNorm, add, RoPE,
    /// gated activation, embedding (512 and 2048 tokens), flash attention forward and backward
    /// (atomic and deterministic; 4x512, 1x2048 and 1x4096 tokens; the preset's settings and
    /// head_dim 128 without soft-cap, FlashAttention-2's comparison point);
    /// each against the bandwidth of a 512 MiB device copy and cublasGemmEx (bf16, TF32, f32)
    /// at the same shapes. cuBLAS is loaded at run time (libcublas.so.13 or .12 on the
    /// library path). Exit code 0: every case ran; 1: a case failed or cuBLAS is missing;
    /// 3: no CUDA device here.
    ///
    /// Example: verdict bench kernels --device cuda --preset 2b --json bench-kernels.json
    Kernels(KernelsArgs),
    /// QLoRA training steps of a random Gemma 2 (2b or 9b) through `verdict train`'s path:
    /// tokens/s and peak device memory by use, for comparison with tools/bench_torch.py
    /// --mode train (transformers + PEFT + bitsandbytes) on the same card. Refuses the
    /// emulated device. Exit code 0: measured; 1: failed; 3: no CUDA device here.
    ///
    /// Example: verdict bench train --device cuda --preset 2b --max-len 2048 --json bench-train.json
    Train(train::TrainArgs),
}

/// Flags of `verdict bench kernels`.
#[derive(Debug, Clone, clap::Args)]
pub struct KernelsArgs {
    /// cuda or cuda:N.
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// Also write the report as JSON here (rewritten after every case, so a killed run
    /// leaves the cases done so far).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Model shapes: Gemma 2 tiny, 2b or 9b.
    #[arg(long, default_value = "2b", value_parser = PRESETS)]
    pub preset: String,
    /// Only these ops (comma-separated); the ceilings always run.
    #[arg(long, value_delimiter = ',', value_parser = OPS)]
    pub ops: Vec<String>,
    /// Device time to spend timing each case, in milliseconds (at least 10 calls, at most
    /// 2000).
    #[arg(long, allow_negative_numbers = true, value_parser = range::positive::<f64>, default_value_t = 30.0)]
    pub ms_per_case: f64,
    /// Seed of the random inputs.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Ceilings measured in the run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Limits {
    /// Device-to-device copy, GB/s of bytes read + written.
    pub copy_gbps: Option<f64>,
    /// Fastest cuBLAS bf16 product of the run, TFLOP/s.
    pub cublas_bf16_tflops: Option<f64>,
    /// Fastest cuBLAS TF32 product.
    pub cublas_tf32_tflops: Option<f64>,
    /// Fastest cuBLAS f32 product.
    pub cublas_f32_tflops: Option<f64>,
}

/// One measured case and what it means against the ceilings.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// The op (`linear`, `attention`, ...) or `copy`.
    pub op: &'static str,
    /// Who ran it.
    pub variant: Variant,
    /// The shape in words (tools/bench_torch.py uses the same labels).
    pub label: String,
    /// The shape.
    pub kernel: Kernel,
    /// Floating-point operations of one call.
    pub flops: f64,
    /// Fewest bytes one call must move.
    pub bytes: f64,
    /// Input sets rotated through.
    pub sets: usize,
    /// Per-call device time, when the case ran.
    pub timing: Option<Timing>,
    /// Why the case did not run.
    pub error: Option<String>,
    /// Achieved TFLOP/s at the median (ops with arithmetic only).
    pub tflops: Option<f64>,
    /// Achieved GB/s of the fewest bytes at the median.
    pub gbps: Option<f64>,
    /// `gbps` / the copy's GB/s.
    pub of_copy_bandwidth: Option<f64>,
    /// `tflops` / the fastest cuBLAS f32 rate (CUDA cores, what our f32 kernels use).
    pub of_cublas_f32_peak: Option<f64>,
    /// `tflops` / the fastest cuBLAS bf16 rate (tensor cores: where the kernels are going).
    pub of_cublas_bf16_peak: Option<f64>,
    /// The roofline floor: max(bytes / copy bandwidth, flops / bf16 peak), microseconds.
    pub floor_us: Option<f64>,
    /// `floor_us` / median: 1 is as fast as the card allows.
    pub of_floor: Option<f64>,
    /// For verdict's linear and linear_backward rows: cuBLAS bf16 time at the same shape and
    /// direction / ours (above 1: faster than cuBLAS).
    pub vs_cublas_bf16: Option<f64>,
    /// As `vs_cublas_bf16`, TF32.
    pub vs_cublas_tf32: Option<f64>,
    /// As `vs_cublas_bf16`, f32.
    pub vs_cublas_f32: Option<f64>,
}

impl Row {
    /// A row for `case`, not yet measured.
    pub fn new(case: &Case, sets: usize) -> Row {
        Row {
            op: case.op,
            variant: case.variant,
            label: case.label.clone(),
            kernel: case.kernel,
            flops: case.kernel.flops(),
            bytes: case.kernel.bytes(),
            sets,
            timing: None,
            error: None,
            tflops: None,
            gbps: None,
            of_copy_bandwidth: None,
            of_cublas_f32_peak: None,
            of_cublas_bf16_peak: None,
            floor_us: None,
            of_floor: None,
            vs_cublas_bf16: None,
            vs_cublas_tf32: None,
            vs_cublas_f32: None,
        }
    }

    fn median_us(&self) -> Option<f64> {
        self.timing.map(|t| t.median_us)
    }
}

/// Fills each row's rates and ratios and returns the ceilings: the copy's bandwidth and the
/// fastest cuBLAS rate per precision among the rows (the square products are meant to set
/// them). Pure arithmetic on the timings.
pub fn summarize(rows: &mut [Row]) -> Limits {
    for row in rows.iter_mut() {
        if let Some(us) = row.median_us().filter(|&us| us > 0.0) {
            row.tflops = (row.flops > 0.0).then(|| row.flops / us * 1e-6);
            row.gbps = Some(row.bytes / us * 1e-3);
        }
    }
    let best = |variant: Variant| {
        rows.iter()
            .filter(|r| r.variant == variant)
            .filter_map(|r| r.tflops)
            .reduce(f64::max)
    };
    let limits = Limits {
        copy_gbps: rows
            .iter()
            .filter(|r| r.variant == Variant::DeviceCopy)
            .filter_map(|r| r.gbps)
            .reduce(f64::max),
        cublas_bf16_tflops: best(Variant::CublasBf16),
        cublas_tf32_tflops: best(Variant::CublasTf32),
        cublas_f32_tflops: best(Variant::CublasF32),
    };
    let cublas_us = |rows: &[Row], op: &str, label: &str, variant: Variant| {
        rows.iter()
            .find(|r| r.op == op && r.label == label && r.variant == variant)
            .and_then(Row::median_us)
    };
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let references: Vec<[Option<f64>; 3]> = rows
        .iter()
        .map(|r| {
            [Variant::CublasBf16, Variant::CublasTf32, Variant::CublasF32]
                .map(|v| cublas_us(rows, r.op, &r.label, v))
        })
        .collect();
    for (row, [bf16, tf32, f32]) in rows.iter_mut().zip(references) {
        let Some(us) = row.median_us() else { continue };
        row.of_copy_bandwidth = ratio(row.gbps, limits.copy_gbps);
        row.of_cublas_f32_peak = ratio(row.tflops, limits.cublas_f32_tflops);
        row.of_cublas_bf16_peak = ratio(row.tflops, limits.cublas_bf16_tflops);
        let byte_floor = limits.copy_gbps.map(|gbps| row.bytes / gbps * 1e-3);
        let flop_floor = limits
            .cublas_bf16_tflops
            .map(|tflops| row.flops / tflops * 1e-6);
        row.floor_us = match (byte_floor, flop_floor) {
            (Some(b), Some(f)) => Some(b.max(f)),
            (b, f) => b.or(f),
        };
        row.of_floor = ratio(row.floor_us, Some(us));
        if matches!(row.op, "linear" | "linear_backward") && !row.variant.is_cublas() {
            row.vs_cublas_bf16 = ratio(bf16, Some(us));
            row.vs_cublas_tf32 = ratio(tf32, Some(us));
            row.vs_cublas_f32 = ratio(f32, Some(us));
        }
    }
    limits
}

/// The whole run, as written to `--json`.
#[derive(Debug, Serialize)]
pub struct Report {
    /// [`SCHEMA`].
    pub schema: &'static str,
    /// "running" (a partial file), "ok", "failed" or "no_device".
    pub status: &'static str,
    /// Why the run failed or found no device.
    pub reason: Option<String>,
    /// When the run started, UTC.
    pub date_utc: String,
    /// verdict's version.
    pub verdict_version: &'static str,
    /// The shapes measured.
    pub shapes: Option<ModelShapes>,
    /// The card.
    pub device: Option<DeviceInfo>,
    /// The NVIDIA kernel driver's version (from /proc/driver/nvidia/version).
    pub driver_version: Option<String>,
    /// `VERDICT_KERNELS` as used.
    pub kernel_source: Option<String>,
    /// How each kernel module was loaded.
    pub modules: Vec<ModuleReport>,
    /// The cuBLAS library and `cublasGetVersion`, when it loaded.
    pub cublas: Option<String>,
    /// Why cuBLAS is missing, when it is.
    pub cublas_error: Option<String>,
    /// The ceilings.
    pub limits: Limits,
    /// Every case.
    pub rows: Vec<Row>,
    /// Cases that did not run.
    pub failures: usize,
    /// Wall time.
    pub seconds: f64,
}

/// `YYYY-MM-DDTHH:MM:SSZ` of a Unix time (proleptic Gregorian calendar, UTC).
pub fn utc_timestamp(unix_seconds: u64) -> String {
    let (days, rem) = (unix_seconds / 86_400, unix_seconds % 86_400);
    // Days since 1970-01-01 to a civil date (H. Hinnant's days_from_civil, inverted).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The driver version in the text of /proc/driver/nvidia/version: the first token of its
/// first line shaped like `580.82.07`.
pub fn parse_driver_version(text: &str) -> Option<String> {
    text.lines().next()?.split_whitespace().find_map(|token| {
        let parts: Vec<&str> = token.split('.').collect();
        let numeric = parts.len() >= 2
            && parts
                .iter()
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
        numeric.then(|| token.to_string())
    })
}

fn driver_version() -> Option<String> {
    parse_driver_version(&std::fs::read_to_string("/proc/driver/nvidia/version").ok()?)
}

/// Runs a `verdict bench` command as the CLI does and returns the process exit code.
pub fn run(command: &Command) -> Result<u8> {
    Ok(match command {
        Command::Kernels(args) => run_kernels_and_report(args),
        Command::Train(args) => train::run(args)?,
    })
}

fn run_kernels_and_report(args: &KernelsArgs) -> u8 {
    let started = Instant::now();
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut report = Report {
        schema: SCHEMA,
        status: "running",
        reason: None,
        date_utc: utc_timestamp(now),
        verdict_version: env!("CARGO_PKG_VERSION"),
        shapes: None,
        device: None,
        driver_version: driver_version(),
        kernel_source: None,
        modules: Vec::new(),
        cublas: None,
        cublas_error: None,
        limits: Limits::default(),
        rows: Vec::new(),
        failures: 0,
        seconds: 0.0,
    };
    let code = match run_kernels(args, &mut report, started) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            report.status = "failed";
            report.reason = Some(format!("{e:#}"));
            EXIT_FAILED
        }
    };
    report.seconds = started.elapsed().as_secs_f64();
    match write_report(args, &report) {
        Ok(()) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            EXIT_FAILED
        }
    }
}

fn write_report(args: &KernelsArgs, report: &Report) -> Result<()> {
    match &args.json {
        Some(path) => crate::atomic::write_json(path, report)
            .with_context(|| format!("cannot write {}", path.display())),
        None => Ok(()),
    }
}

fn run_kernels(args: &KernelsArgs, report: &mut Report, started: Instant) -> Result<u8> {
    let ordinal = match args.device.parse::<Device>()? {
        Device::Cuda(ordinal) => ordinal,
        Device::Cpu => bail!("bench kernels times the CUDA backend: use --device cuda or cuda:N"),
        Device::Emu(_) => bail!(
            "bench kernels refuses the emulated device: its times say nothing about a GPU \
             (use --device emu with selftest, logits, predict or train to check results)"
        ),
    };
    let shapes = ModelShapes::gemma2(&args.preset)?;
    report.shapes = Some(shapes.clone());
    if let cuda::Probe::Unavailable(why) = cuda::probe() {
        eprintln!("no CUDA device: bench kernels needs a GPU ({why})");
        report.status = "no_device";
        report.reason = Some(why);
        return Ok(EXIT_NO_DEVICE);
    }
    let source = KernelSource::from_env()?;
    report.kernel_source = Some(format!("{source:?}").to_lowercase());
    let mut bench = Bench::open(ordinal, source, args, &shapes)?;
    let info = bench.cuda.info().clone();
    println!(
        "bench kernels on {} ({}, sm_{}{}, {:.1} GiB, L2 {:.0} MiB, driver {} / CUDA {}.{}), \
         preset {}, kernels: {source:?}",
        info.device,
        info.name,
        info.compute_capability.0,
        info.compute_capability.1,
        info.total_memory_bytes as f64 / (1u64 << 30) as f64,
        info.l2_cache_bytes as f64 / (1u64 << 20) as f64,
        report.driver_version.as_deref().unwrap_or("?"),
        info.driver_cuda_version / 1000,
        info.driver_cuda_version % 1000 / 10,
        shapes.preset,
    );
    report.device = Some(info);
    match &bench.cublas {
        Ok(c) => {
            report.cublas = Some(format!("{} (version {})", c.library_name(), c.version));
        }
        Err(e) => {
            eprintln!("error: {e}; the cuBLAS rows are skipped");
            report.cublas_error = Some(e.clone());
        }
    }

    let cases = cases::cases(&shapes, &args.ops, bench.cuda.info().compute_capability);
    for (i, case) in cases.iter().enumerate() {
        let l2 = bench.cuda.info().l2_cache_bytes;
        let mut row = Row::new(case, cases::rotation_sets(case.kernel.set_bytes(), l2));
        if case.variant.is_cublas() && bench.cublas.is_err() {
            row.error = Some("cuBLAS not loaded".into());
        } else {
            match bench.measure(case, row.sets) {
                Ok(timing) => row.timing = Some(timing),
                Err(e) => {
                    row.error = Some(format!("{e:#}"));
                    // The backend's errors are sticky: start afresh for the next case.
                    bench.reopen()?;
                }
            }
        }
        eprintln!(
            "[{}/{}] {} {} {}: {}",
            i + 1,
            cases.len(),
            row.op,
            row.variant.name(),
            row.label,
            match (&row.timing, &row.error) {
                (Some(t), _) => format!(
                    "{:.1} us (p10 {:.1}, p90 {:.1}, {} calls, {} sets)",
                    t.median_us, t.p10_us, t.p90_us, t.reps, row.sets
                ),
                (None, Some(e)) => format!("FAILED: {e}"),
                (None, None) => "not run".into(),
            }
        );
        report.rows.push(row);
        report.limits = summarize(&mut report.rows);
        report.seconds = started.elapsed().as_secs_f64();
        write_report(args, report)?;
    }
    report.modules = bench.cuda.module_reports();
    report.failures = report.rows.iter().filter(|r| r.timing.is_none()).count();
    print!("{}", format_table(report));
    let failed = report.failures > 0 || report.cublas_error.is_some();
    report.status = if failed { "failed" } else { "ok" };
    Ok(if failed { EXIT_FAILED } else { 0 })
}

/// The report as a table: the ceilings, then one line per case.
pub fn format_table(report: &Report) -> String {
    let l = &report.limits;
    let num = |v: Option<f64>, scale: f64, digits: usize| {
        v.map_or("-".to_string(), |v| format!("{:.*}", digits, v * scale))
    };
    let mut out = format!(
        "ceilings: copy {} GB/s; cuBLAS bf16 {} TFLOP/s, tf32 {}, f32 {}\n",
        num(l.copy_gbps, 1.0, 0),
        num(l.cublas_bf16_tflops, 1.0, 1),
        num(l.cublas_tf32_tflops, 1.0, 1),
        num(l.cublas_f32_tflops, 1.0, 1),
    );
    out += &format!(
        "{:<17} {:<16} {:<34} {:>10} {:>8} {:>7} {:>6} {:>7} {:>8} {:>8}\n",
        "op",
        "variant",
        "case",
        "median us",
        "TFLOP/s",
        "GB/s",
        "%copy",
        "%floor",
        "xcuB f32",
        "xcuB b16"
    );
    for r in &report.rows {
        let median = match (&r.timing, &r.error) {
            (Some(t), _) => format!("{:.1}", t.median_us),
            _ => "FAILED".into(),
        };
        out += &format!(
            "{:<17} {:<16} {:<34} {:>10} {:>8} {:>7} {:>6} {:>7} {:>8} {:>8}\n",
            r.op,
            r.variant.name(),
            r.label,
            median,
            num(r.tflops, 1.0, 2),
            num(r.gbps, 1.0, 0),
            num(r.of_copy_bandwidth, 100.0, 0),
            num(r.of_floor, 100.0, 1),
            num(r.vs_cublas_f32, 1.0, 2),
            num(r.vs_cublas_bf16, 1.0, 3),
        );
    }
    out
}

/// `n` values uniform in [-1, 1): never zeros (METHOD.md), reproducible from `seed` whatever
/// the thread count (one generator per chunk).
pub fn random_values(seed: u64, n: usize) -> Vec<f32> {
    const CHUNK: usize = 1 << 16;
    let mut values = vec![0.0f32; n];
    values
        .par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(c, chunk)| {
            let mut rng = Rng::new(seed ^ (c as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            for v in chunk {
                *v = (2.0 * rng.uniform() - 1.0) as f32;
            }
        });
    values
}

/// One product of a linear layer to time: its direction, and `m` rows against a `[n, k]`
/// weight.
#[derive(Debug, Clone, Copy)]
struct Product {
    direction: Nf4Product,
    m: usize,
    n: usize,
    k: usize,
}

impl Product {
    /// Values of the input (X, or dY) and of the output (out, or dX).
    fn lens(self) -> (usize, usize) {
        let Product { m, n, k, .. } = self;
        match self.direction {
            Nf4Product::Forward => (m * k, m * n),
            Nf4Product::Backward => (m * n, m * k),
        }
    }
}

/// A linear weight on the host, with its NF4 and bf16 forms made when first asked for; kept
/// while the cases of one projection run.
struct HostWeight {
    shape: (usize, usize),
    values: Vec<f32>,
    nf4: Option<Nf4Weight>,
    bf16: Option<Vec<half::bf16>>,
}

/// The device, cuBLAS and the inputs in reach while the cases run.
struct Bench {
    // Before `cuda`: fields drop in order, and the handle must go before its stream.
    cublas: std::result::Result<Cublas, String>,
    cuda: Cuda,
    ordinal: usize,
    source: KernelSource,
    shapes: ModelShapes,
    rng: Rng,
    budget_ms: f64,
    weight: Option<HostWeight>,
}

impl Bench {
    fn open(
        ordinal: usize,
        source: KernelSource,
        args: &KernelsArgs,
        shapes: &ModelShapes,
    ) -> Result<Bench> {
        let cuda = Cuda::with_kernel_source(ordinal, source)?;
        let cublas = open_cublas(&cuda);
        Ok(Bench {
            cublas,
            cuda,
            ordinal,
            source,
            shapes: shapes.clone(),
            rng: Rng::new(args.seed),
            budget_ms: args.ms_per_case,
            weight: None,
        })
    }

    /// A fresh backend (and cuBLAS handle on its stream) after a failed case.
    fn reopen(&mut self) -> Result<()> {
        // The handle is bound to the old stream: it goes first.
        self.cublas = Err("reopening".into());
        self.cuda = Cuda::with_kernel_source(self.ordinal, self.source)?;
        self.cublas = open_cublas(&self.cuda);
        Ok(())
    }

    fn random(&mut self, n: usize) -> Vec<f32> {
        random_values(self.rng.next_u64(), n)
    }

    /// Makes `self.weight` the `[n, k]` weight of the current projection (on first use), with
    /// the `storage` form the caller reads from it.
    fn prepare_weight(&mut self, n: usize, k: usize, storage: Storage) -> Result<()> {
        if self.weight.as_ref().map(|w| w.shape) != Some((n, k)) {
            self.weight = None;
            let values = self.random(n * k);
            self.weight = Some(HostWeight {
                shape: (n, k),
                values,
                nf4: None,
                bf16: None,
            });
        }
        let w = self.weight.as_mut().expect("made above");
        match storage {
            Storage::Nf4 if w.nf4.is_none() => {
                w.nf4 = Some(Nf4Weight::quantize(&w.values, n, k, Nf4Options::default())?)
            }
            Storage::Bf16 if w.bf16.is_none() => w.bf16 = Some(to_bf16(&w.values)),
            _ => {}
        }
        Ok(())
    }

    /// Warms up, then times calls of `call(i)` (set `i % sets`) for about the budget.
    fn time(&self, mut call: impl FnMut(usize) -> Result<()>) -> Result<Timing> {
        let warmup = Timing::from_ms(&self.cuda.time_each(WARMUP_CALLS, &mut call)?)
            .context("no warm-up calls")?;
        let reps = cases::reps_for(warmup.median_us * 1e-3, self.budget_ms, MIN_REPS, MAX_REPS);
        Timing::from_ms(&self.cuda.time_each(reps, &mut call)?).context("no timed calls")
    }

    fn upload_sets(&mut self, sets: usize, len: usize) -> Vec<CudaBuf> {
        (0..sets)
            .map(|_| {
                let values = self.random(len);
                self.cuda.upload(&values)
            })
            .collect()
    }

    fn measure(&mut self, case: &Case, sets: usize) -> Result<Timing> {
        match case.kernel {
            Kernel::Copy { bytes } => {
                let src = self.upload_sets(1, bytes / 4).remove(0);
                self.cuda.check()?;
                let cuda = &self.cuda;
                // Each copy's block comes back to the pool when dropped and serves the next.
                self.time(|_| {
                    drop(cuda.copy(&src));
                    Ok(())
                })
            }
            Kernel::Linear { m, n, k, .. } | Kernel::LinearBackward { m, n, k, .. } => {
                let direction = match case.kernel {
                    Kernel::Linear { .. } => Nf4Product::Forward,
                    _ => Nf4Product::Backward,
                };
                let product = Product { direction, m, n, k };
                if case.variant.is_cublas() {
                    self.measure_cublas(case.variant, product, sets)
                } else {
                    self.measure_linear(case.variant, product, sets)
                }
            }
            _ => self.measure_op(case.kernel, case.variant, sets),
        }
    }

    fn measure_linear(
        &mut self,
        variant: Variant,
        product: Product,
        sets: usize,
    ) -> Result<Timing> {
        let Product { direction, m, n, k } = product;
        let (input, output) = product.lens();
        let xs = self.upload_sets(sets, input);
        let mut outs = self.upload_sets(sets, output);
        let storage = match variant {
            Variant::Nf4 | Variant::Nf4Kernel(_) | Variant::Lora => Storage::Nf4,
            _ => Storage::F32,
        };
        self.prepare_weight(n, k, storage)?;
        let weight = self.weight.as_ref().expect("prepared");
        let weights: Vec<Weight<Cuda>> = (0..sets)
            .map(|_| Weight {
                out_features: n,
                in_features: k,
                data: match &weight.nf4 {
                    Some(nf4) if storage == Storage::Nf4 => {
                        WeightData::Nf4(self.cuda.upload_nf4(nf4.clone()))
                    }
                    _ => WeightData::Dense(self.cuda.upload(&weight.values)),
                },
            })
            .collect();
        // The adapter of the Lora variant (one for all sets: it is small), its input X for
        // the backward, and its gradient buffers.
        let r = cases::LORA_RANK;
        let dense = |b: &Cuda, values: Vec<f32>, out_features, in_features| Weight {
            out_features,
            in_features,
            data: WeightData::Dense(b.upload(&values)),
        };
        let (a, b) = (self.random(r * k), self.random(n * r));
        let (lora_a, lora_b) = (dense(&self.cuda, a, r, k), dense(&self.cuda, b, n, r));
        let lora_xs = match (variant, direction) {
            (Variant::Lora, Nf4Product::Backward) => self.upload_sets(sets, m * k),
            _ => Vec::new(),
        };
        let (mut da, mut db) = (self.cuda.zeros(r * k), self.cuda.zeros(n * r));
        let dense_products = match variant {
            Variant::F32 => GemmKernel::F32,
            _ => GemmKernel::for_arch(self.cuda.info().compute_capability),
        };
        self.cuda.set_dense_products(dense_products);
        self.cuda.check()?;
        let cuda = &self.cuda;
        let timing = self.time(|i| {
            let s = i % sets;
            let (out, x, w, store) = (&mut outs[s], &xs[s], &weights[s], Store::Overwrite);
            let adapter = LoraAdapter {
                a: &lora_a,
                b: &lora_b,
                scale: 2.0,
                dropout: None,
            };
            match (variant, &w.data, direction) {
                (Variant::Nf4Kernel(kernel), WeightData::Nf4(q), _) => {
                    cuda.nf4_product(direction, out, x, q, m, store, kernel)
                }
                (Variant::Lora, _, Nf4Product::Forward) => cuda.lora_linear(out, x, w, &adapter, m),
                (Variant::Lora, _, Nf4Product::Backward) => {
                    let grads = [&mut da, &mut db];
                    cuda.lora_linear_backward(out, x, &lora_xs[s], w, &adapter, m, store, grads)
                }
                (_, _, Nf4Product::Forward) => cuda.linear(out, x, w, m, store),
                (_, _, Nf4Product::Backward) => cuda.linear_backward(out, x, w, m, store),
            }
            Ok(())
        });
        self.cuda
            .set_dense_products(GemmKernel::for_arch(self.cuda.info().compute_capability));
        timing
    }

    fn measure_cublas(
        &mut self,
        variant: Variant,
        product: Product,
        sets: usize,
    ) -> Result<Timing> {
        let Product { direction, m, n, k } = product;
        let (input, output) = product.lens();
        let bf16 = variant == Variant::CublasBf16;
        let storage = if bf16 { Storage::Bf16 } else { Storage::F32 };
        // The square peak products have no projection: they get a random weight the same way.
        let mut operands = Vec::with_capacity(sets);
        for _ in 0..sets {
            let (x, out) = (self.random(input), self.random(output));
            self.prepare_weight(n, k, storage)?;
            let w = self.weight.as_ref().expect("prepared");
            let set = match &w.bf16 {
                Some(w_bf16) if bf16 => [
                    self.cuda.upload_raw(&to_bf16(&x))?,
                    self.cuda.upload_raw(w_bf16)?,
                    self.cuda.upload_raw(&to_bf16(&out))?,
                ],
                _ => [
                    self.cuda.upload_raw(&x)?,
                    self.cuda.upload_raw(&w.values)?,
                    self.cuda.upload_raw(&out)?,
                ],
            };
            operands.push(set);
        }
        let cublas = self.cublas.as_ref().map_err(|e| anyhow::anyhow!("{e}"))?;
        self.time(|i| {
            let [x, w, out] = &operands[i % sets];
            cublas.linear(
                variant,
                direction,
                m,
                n,
                k,
                x.device_ptr(),
                w.device_ptr(),
                out.device_ptr(),
            )
        })
    }

    fn measure_op(&mut self, kernel: Kernel, variant: Variant, sets: usize) -> Result<Timing> {
        let shapes = self.shapes.clone();
        match kernel {
            Kernel::Rmsnorm { tokens, dim } => {
                let xs = self.upload_sets(sets, tokens * dim);
                let mut outs = self.upload_sets(sets, tokens * dim);
                let w = self.upload_sets(1, dim).remove(0);
                let cuda = &self.cuda;
                self.time(|i| {
                    let s = i % sets;
                    let (eps, style) = (shapes.rms_norm_eps, NormStyle::OnePlusWeight);
                    cuda.rmsnorm(&mut outs[s], &xs[s], &w, dim, eps, style);
                    Ok(())
                })
            }
            Kernel::Add { tokens, dim } => {
                let mut accs = self.upload_sets(sets, tokens * dim);
                let xs = self.upload_sets(sets, tokens * dim);
                let cuda = &self.cuda;
                self.time(|i| {
                    let s = i % sets;
                    cuda.add(&mut accs[s], &xs[s]);
                    Ok(())
                })
            }
            Kernel::Rope {
                tokens,
                heads,
                head_dim,
            } => {
                let mut xs = self.upload_sets(sets, tokens * heads * head_dim);
                let positions: Vec<u32> = (0..tokens as u32).collect();
                let cuda = &self.cuda;
                self.time(|i| {
                    let x = &mut xs[i % sets];
                    cuda.rope(x, &positions, &shapes.inv_freq, heads, head_dim);
                    Ok(())
                })
            }
            Kernel::GatedActivation { tokens, dim } => {
                let gates = self.upload_sets(sets, tokens * dim);
                let ups = self.upload_sets(sets, tokens * dim);
                let mut outs = self.upload_sets(sets, tokens * dim);
                let cuda = &self.cuda;
                self.time(|i| {
                    let s = i % sets;
                    cuda.gated_activation(&mut outs[s], &gates[s], &ups[s], Activation::GeluTanh);
                    Ok(())
                })
            }
            Kernel::Embedding { tokens, dim, rows } => {
                let tables: Vec<WeightData<Cuda>> = self
                    .upload_sets(sets, rows * dim)
                    .into_iter()
                    .map(WeightData::Dense)
                    .collect();
                let mut outs = self.upload_sets(sets, tokens * dim);
                let ids: Vec<Vec<u32>> = (0..sets)
                    .map(|_| (0..tokens).map(|_| self.rng.below(rows) as u32).collect())
                    .collect();
                let cuda = &self.cuda;
                self.time(|i| {
                    let s = i % sets;
                    cuda.embedding(&mut outs[s], &tables[s], &ids[s], dim, 1.0);
                    Ok(())
                })
            }
            Kernel::Attention {
                sequences,
                seq_len,
                heads,
                kv_heads,
                head_dim,
                window,
                softcap,
                pass,
            } => {
                let tokens = sequences * seq_len;
                let (q_len, kv_len) = (tokens * heads * head_dim, tokens * kv_heads * head_dim);
                let qs = self.upload_sets(sets, q_len);
                let ks = self.upload_sets(sets, kv_len);
                let vs = self.upload_sets(sets, kv_len);
                let mut outs = self.upload_sets(sets, q_len);
                let mut lses = self.upload_sets(sets, tokens * heads);
                let cu_seqlens: Vec<usize> = (0..=sequences).map(|s| s * seq_len).collect();
                let params = AttentionParams {
                    heads,
                    kv_heads,
                    head_dim,
                    // The preset's query_pre_attn_scalar^-0.5; the usual head_dim^-0.5 for
                    // the regrouped FlashAttention-2 comparison.
                    scale: if head_dim == shapes.head_dim {
                        shapes.attn_scale
                    } else {
                        (head_dim as f32).powf(-0.5)
                    },
                    softcap: if softcap { shapes.softcap } else { None },
                    window,
                };
                let operands = MmaOperands::for_arch(self.cuda.info().compute_capability);
                let cuda = &self.cuda;
                let forward = |s: usize, out: &mut CudaBuf, lse: &mut CudaBuf| {
                    cuda.attention(out, lse, &qs[s], &ks[s], &vs[s], &cu_seqlens, &params)
                };
                match pass {
                    AttentionPass::Forward => self.time(|i| {
                        let s = i % sets;
                        forward(s, &mut outs[s], &mut lses[s]);
                        Ok(())
                    }),
                    AttentionPass::Backward => {
                        // The backward reads the forward's own out and lse.
                        for s in 0..sets {
                            forward(s, &mut outs[s], &mut lses[s]);
                        }
                        let douts = self.upload_sets(sets, q_len);
                        let mut dqs = self.upload_sets(sets, q_len);
                        let mut dks = self.upload_sets(sets, kv_len);
                        let mut dvs = self.upload_sets(sets, kv_len);
                        let variant = match variant {
                            Variant::FlashDeterministic => FlashBackward::Deterministic,
                            _ => FlashBackward::Atomic,
                        };
                        let cuda = &self.cuda;
                        self.time(|i| {
                            let s = i % sets;
                            cuda.flash_attention_backward(
                                [&mut dqs[s], &mut dks[s], &mut dvs[s]],
                                [&douts[s], &outs[s], &lses[s], &qs[s], &ks[s], &vs[s]],
                                &cu_seqlens,
                                &params,
                                operands,
                                variant,
                            );
                            Ok(())
                        })
                    }
                }
            }
            Kernel::Linear { .. } | Kernel::LinearBackward { .. } | Kernel::Copy { .. } => {
                bail!("{kernel:?} is measured by its own path")
            }
        }
    }
}

fn to_bf16(values: &[f32]) -> Vec<half::bf16> {
    values
        .par_iter()
        .map(|&v| half::bf16::from_f32(v))
        .collect()
}

fn open_cublas(cuda: &Cuda) -> std::result::Result<Cublas, String> {
    CublasLibrary::open()
        .and_then(|library| Cublas::new(library, cuda))
        .map_err(|e| format!("{e:#}"))
}
