//! `verdict selftest --device cuda`: every op of the CUDA backend against the CPU reference,
//! then whole models (the tiny checkpoints of tests/fixtures/models) GPU against CPU: their
//! forward, and one training step of each f32 one (loss and every trainable gradient).
//!
//! Place in the data flow: none — it is the gate before the CUDA backend is trusted with
//! training or prediction, run on each new card and driver (`tools/gpu-check.sh`).
//!
//! Method (.library/device/METHOD.md): fresh random inputs for every case (never zeros);
//! outputs an op overwrites start as NaN on both devices, so an element the kernel never
//! wrote stays NaN and fails the case; shapes include odd ones (1, 7, 333 rows; head_dim
//! 64/128/256; windows shorter and longer than the sequence; GQA ratios 1, 2, 4, 8). Each case
//! reports `max_rel_err = max |gpu - cpu| / max |cpu|` against the tolerance of its dtype,
//! plus `‖gpu - cpu‖ / ‖cpu‖` (outputs whose relative error means nothing, attention's lse,
//! report `max |gpu - cpu|` in their own unit instead: [`compare_absolute`]). After a failing case the backend (sticky on errors) is opened
//! afresh so the remaining cases still run.
//!
//! Exit codes: 0 all passed, [`EXIT_FAILED`] a case failed or the run broke,
//! [`EXIT_NO_DEVICE`] no CUDA device here ("no CUDA device: selftest needs a GPU").

use crate::backend::cuda::nf4::MmaOperands;
use crate::backend::cuda::{self, Cuda, Device, DeviceInfo, KernelSource, ModuleReport, Probe};
use crate::backend::{cpu::Cpu, Backend, Weight, WeightData};
use crate::model::weights::Dtype;
use crate::quant::nf4::Nf4Weight;
use crate::rng::Rng;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

/// Exit code: a case failed, or the selftest could not run.
pub const EXIT_FAILED: u8 = 1;
/// Exit code: no CUDA device on this machine.
pub const EXIT_NO_DEVICE: u8 = 3;

/// f32 ops: `max |gpu - cpu| / max |cpu|`. The two sides differ only in summation order and
/// in the last ulps of expf/tanhf/sincosf, about 1e-7 of the largest value; 2e-5 leaves two
/// orders of magnitude, while a wrong index or mask moves values by O(1).
pub const F32_OP_TOLERANCE: f64 = 2e-5;
/// What one 16-bit store of an op's output adds to [`F32_OP_TOLERANCE`]-sized errors, as
/// `max |gpu - cpu| / max |cpu|`: half an ulp of the largest value (2^-9 bf16, 2^-12 f16)
/// with room for the ops whose output is a product of rounded terms (x2), plus the f32 part.
/// A wrong index or type code moves values by O(1).
pub fn half_store_tolerance(dtype: Dtype) -> f64 {
    match dtype {
        Dtype::F32 => F32_OP_TOLERANCE,
        Dtype::F16 => 2.0 * 2f64.powi(-11) + F32_OP_TOLERANCE,
        Dtype::BF16 => 2.0 * 2f64.powi(-8) + F32_OP_TOLERANCE,
    }
}

/// Whole models in f32: dozens of ops deep, rounding compounds through the layers. (With
/// attention on tensor cores no CUDA model is all f32 any more: [`flash_model_tolerance`];
/// this labels the records of models that could not be loaded.)
pub const F32_MODEL_TOLERANCE: f64 = 1e-4;
/// Tensor-core NF4 products against the CPU reference computed on the same bf16/fp16-rounded
/// operands: the products are then exact on both sides and only the f32 summation differs
/// (the tensor cores' inner sums truncate: a few ulps of the running sum per mma, about 1e-6
/// of the largest output at K = 2304). A wrong fragment row, column, half-word or edge guard
/// moves an output by at least one product, > 5e-3 of the largest output in these cases.
pub const MMA_ROUNDED_TOLERANCE: f64 = 2e-4;
/// The same products against the exact f32 reference, bf16 operands: the rounding of X and W
/// itself (unit roundoff 2^-8). Measured on the selftest's shapes and distributions by
/// `operand_rounding_error_stays_under_the_operand_tolerances`: 2.6e-3 at most.
pub const BF16_OPERAND_TOLERANCE: f64 = 1e-2;
/// As [`BF16_OPERAND_TOLERANCE`] for fp16 operands (unit roundoff 2^-11): measured 3.7e-4.
pub const F16_OPERAND_TOLERANCE: f64 = 1.5e-3;

/// Flash attention (kernels/attention.cu) on bf16 operands against the CPU reference on the
/// same inputs rounded to bf16 (`max |gpu - cpu| / max |cpu|` of out, lse, dq, dk, dv): what
/// remains is the rounding of P and dz to bf16 and the summation order. Measured on the
/// emulator (ARCHITECTURE.md, "Flash attention"); a key masked wrongly at a window edge, a
/// lost tile or a wrong fragment moves outputs by far more.
pub const FLASH_BF16_ROUNDED_TOLERANCE: f64 = 1e-2;
/// As [`FLASH_BF16_ROUNDED_TOLERANCE`] for f16 operands (sm_75).
pub const FLASH_F16_ROUNDED_TOLERANCE: f64 = 2e-3;
/// Flash attention on bf16 operands against the exact f32 CPU reference: the rounding of q,
/// k, v, dout themselves, amplified by scores up to ~30 in the soft-capped cases.
pub const FLASH_BF16_TOLERANCE: f64 = 8e-2;
/// As [`FLASH_BF16_TOLERANCE`] for f16 operands (sm_75).
pub const FLASH_F16_TOLERANCE: f64 = 1e-2;

/// Whole models whose NF4 projections run on tensor cores, against the f32 CPU model: every
/// projection's operand rounding passes through the layers and the final norm. Measured by
/// rounding the CPU model's NF4 operands the same way (an experiment on the 7 fixtures, 3
/// random batches each): worst max_rel 4.3e-2 (bf16, logits of gemma2_seqcls_bnb4) and 4.0e-3
/// (fp16). These bounds (2.3x and 3.7x that) still catch a product computed wrongly
/// (O(1)); the op cases above are the precise check.
pub fn nf4_model_tolerance(operands: MmaOperands) -> f64 {
    match operands {
        MmaOperands::Bf16 => 1e-1,
        MmaOperands::F16 => 1.5e-2,
    }
}

/// Whole models on the CUDA backend with f32 weights, against the f32 CPU model: attention
/// and the dense products run on tensor cores (f16 operands on sm_75, bf16 on sm_80+), so
/// their operand rounding passes through the layers. Measured on the emulator (7 fixtures,
/// seed 0): worst max_rel 1.7e-2 (bf16) and 3.2e-3 (f16) with attention alone; 2.1e-2 and
/// 3.8e-3 with the products too, hidden states and logits. These bounds still catch an op
/// computed wrongly (O(1)); the op cases are the precise check.
pub fn flash_model_tolerance(operands: MmaOperands) -> f64 {
    match operands {
        MmaOperands::Bf16 => 5e-2,
        MmaOperands::F16 => 1e-2,
    }
}

/// A training step (loss and every trainable gradient) of an f32-weight model with flash
/// attention, against the CPU: measured worst 5.2e-3 (bf16) and 7.1e-4 (f16); with the dense
/// products (projections, LoRA factors and their weight gradients, heads) on tensor cores
/// too, 1.3e-2 (bf16) and 2.1e-3 (f16); with the activations inside each layer and the
/// gradients of the wide ones stored in the card's 16-bit type as well (the decoder's
/// `Storage::Activation`), 1.93e-2 (bf16, seed 0; 1.55e-2 with seeds 1 and 2) and 2.4e-3
/// (f16). bf16's bound leaves 1.5x that; a wrong op moves gradients by O(1).
pub fn flash_train_tolerance(operands: MmaOperands) -> f64 {
    match operands {
        MmaOperands::Bf16 => 3e-2,
        MmaOperands::F16 => 5e-3,
    }
}

/// Where the tiny model checkpoints are, relative to the repository root.
pub const DEFAULT_MODELS_DIR: &str = "tests/fixtures/models";

/// Flags of `verdict selftest`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// cuda or cuda:N.
    #[arg(long, default_value = "cuda")]
    pub device: Device,
    /// Also write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Folder of model fixtures [default: tests/fixtures/models if present].
    #[arg(long)]
    pub models: Option<PathBuf>,
    /// Seed of the random inputs.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Run only these op families (comma-separated), e.g. `--only attention,nf4`; one family
    /// per process keeps a GPU fault in one family from hiding the others (a new context
    /// after an illegal address inherits the fault). Default: every family.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<Family>,
    /// Print the family names, one a line, and exit.
    #[arg(long)]
    pub list_families: bool,
    /// Append the run as JSON lines here, flushed case by case (a `start` line, one `case`
    /// line per case, an `end` line), so a run killed midway keeps what it measured; several
    /// runs may append to one file.
    #[arg(long)]
    pub jsonl: Option<PathBuf>,
}

/// A group of selftest cases, selectable with `--only`: the op families of `backend`, in
/// the order they run, then `models` (whole-model parity on the fixtures).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// upload, copy, download, zeros.
    Buffer,
    /// Embedding gather and its backward.
    Embedding,
    /// RMSNorm (+ residual) forward and backward.
    Rmsnorm,
    /// Dense products.
    Gemm,
    /// NF4 dequantization and products.
    Nf4,
    /// The fused LoRA forward and backward.
    Lora,
    /// Rotary position embedding.
    Rope,
    /// Flash attention forward and backward.
    Attention,
    /// GeGLU / SwiGLU.
    Activation,
    /// Element-wise ops.
    Elementwise,
    /// AdamW update and the squared norms of global-norm clipping.
    Adamw,
    /// 16-bit storage of the activations kept for backward.
    Saved,
    /// Head loss (cross-entropy).
    Loss,
    /// Whole tiny models: forward and one training step.
    Models,
}

impl Family {
    /// Every family, in the order a full run takes them.
    pub const ALL: [Family; 14] = [
        Family::Buffer,
        Family::Embedding,
        Family::Rmsnorm,
        Family::Gemm,
        Family::Nf4,
        Family::Lora,
        Family::Rope,
        Family::Attention,
        Family::Activation,
        Family::Elementwise,
        Family::Adamw,
        Family::Saved,
        Family::Loss,
        Family::Models,
    ];

    /// The name `--only` takes.
    pub fn name(self) -> &'static str {
        match self {
            Family::Buffer => "buffer",
            Family::Embedding => "embedding",
            Family::Rmsnorm => "rmsnorm",
            Family::Gemm => "gemm",
            Family::Nf4 => "nf4",
            Family::Lora => "lora",
            Family::Rope => "rope",
            Family::Attention => "attention",
            Family::Activation => "activation",
            Family::Elementwise => "elementwise",
            Family::Adamw => "adamw",
            Family::Saved => "saved",
            Family::Loss => "loss",
            Family::Models => "models",
        }
    }
}

/// One compared output.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// The op, e.g. "attention", or "model" for whole-model parity.
    pub op: String,
    /// The shape and settings of the case.
    pub case: String,
    /// Storage dtype of the CUDA side.
    pub dtype: &'static str,
    /// `max |gpu - cpu| / max |cpu|`; `max |gpu - cpu|` where the op names a unit (an
    /// absolute check, e.g. "attention lse (nats)").
    pub max_rel_err: f64,
    /// `‖gpu - cpu‖₂ / ‖cpu‖₂`; the root mean square of `gpu - cpu` in an absolute check.
    pub norm_rel_err: f64,
    /// Elements where the GPU gave NaN/inf and the CPU did not (unwritten outputs stay NaN).
    pub non_finite: usize,
    /// The bound `max_rel_err` must stay under.
    pub tolerance: f64,
    /// Whether the case passed.
    pub passed: bool,
    /// The error, if the op failed rather than differed.
    pub error: Option<String>,
}

/// The whole run, as written to `--json`.
#[derive(Debug, Serialize)]
pub struct Report {
    /// "passed", "failed" or "no_device".
    pub status: &'static str,
    /// Why there is no device, for "no_device".
    pub reason: Option<String>,
    /// The card.
    pub device: Option<DeviceInfo>,
    /// `VERDICT_KERNELS` as used.
    pub kernel_source: Option<String>,
    /// NVRTC's version, if the library is on the path.
    pub nvrtc_version: Option<(i32, i32)>,
    /// How each kernel module was loaded.
    pub modules: Vec<ModuleReport>,
    /// Every case.
    pub checks: Vec<Check>,
    /// Why model parity was skipped, if it was.
    pub models_skipped: Option<String>,
    /// Peak device memory held by the pool, in bytes.
    pub peak_reserved_bytes: usize,
    /// On the emulated device: every kernel entry point built for its compute capability and
    /// how many times the run launched it (0: not covered by this run).
    pub emulated_launches: Option<Vec<EntryLaunches>>,
    /// Cases failed.
    pub failures: usize,
    /// Wall time.
    pub seconds: f64,
}

/// How often a run launched one kernel entry point (on the emulated device, which counts).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct EntryLaunches {
    /// The kernel file's stem, e.g. "nf4".
    pub module: String,
    /// The entry point, e.g. "nf4_mma_forward_f16".
    pub function: String,
    /// Launches during the run.
    pub launches: u64,
}

/// Runs the selftest as the CLI does: prints a line per case and a summary, writes the JSON
/// report, and returns the process exit code (a `u8`, for `std::process::exit`; its own: no device is not a failure of the
/// code under test). Errors are reported in the JSON and the exit code, never returned.
pub fn run(args: Args) -> Result<u8> {
    if args.list_families {
        for family in Family::ALL {
            println!("{}", family.name());
        }
        return Ok(0);
    }
    Ok(run_and_report(&args))
}

/// The families a run takes: `--only`'s, or all.
fn selected(options: &Args) -> Vec<Family> {
    Family::ALL
        .into_iter()
        .filter(|f| options.only.is_empty() || options.only.contains(f))
        .collect()
}

/// `--jsonl`: one JSON object a line, appended and flushed as each case ends.
struct CaseStream {
    path: PathBuf,
    file: std::fs::File,
}

impl CaseStream {
    fn open(path: &std::path::Path) -> Result<CaseStream> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open --jsonl {}", path.display()))?;
        Ok(CaseStream {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Appends `value` as one line in a single unbuffered write (so appending runs do not
    /// interleave within a line, and a killed process loses no finished case).
    fn append(&mut self, value: &serde_json::Value) {
        use std::io::Write;
        let mut line = value.to_string();
        line.push('\n');
        if let Err(e) = self.file.write_all(line.as_bytes()) {
            eprintln!("error: cannot append to {}: {e}", self.path.display());
        }
    }
}

fn run_and_report(options: &Args) -> u8 {
    let started = Instant::now();
    let mut report = Report {
        status: "failed",
        reason: None,
        device: None,
        kernel_source: None,
        nvrtc_version: cuda::nvrtc_version(),
        modules: Vec::new(),
        checks: Vec::new(),
        models_skipped: None,
        peak_reserved_bytes: 0,
        emulated_launches: None,
        failures: 0,
        seconds: 0.0,
    };
    let mut stream = match options.jsonl.as_deref().map(CaseStream::open).transpose() {
        Ok(stream) => stream,
        Err(e) => {
            eprintln!("error: {e:#}");
            return EXIT_FAILED;
        }
    };
    let families: Vec<&str> = selected(options).into_iter().map(Family::name).collect();
    if let Some(stream) = &mut stream {
        stream.append(&serde_json::json!({
            "event": "start",
            "families": families,
            "device": options.device.to_string(),
            "kernel_source": std::env::var("VERDICT_KERNELS").ok(),
            "nvrtc_version": report.nvrtc_version,
            "pid": std::process::id(),
        }));
    }
    let code = match run_cases(options, &mut report, &mut stream) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            report.reason = Some(format!("{e:#}"));
            EXIT_FAILED
        }
    };
    report.seconds = started.elapsed().as_secs_f64();
    if let Some(stream) = &mut stream {
        stream.append(&serde_json::json!({
            "event": "end",
            "families": families,
            "status": report.status,
            "reason": report.reason,
            "device": report.device,
            "modules": report.modules,
            "models_skipped": report.models_skipped,
            "cases": report.checks.len(),
            "failures": report.failures,
            "peak_reserved_bytes": report.peak_reserved_bytes,
            "seconds": report.seconds,
        }));
    }
    if let Some(path) = &options.json {
        if let Err(e) = crate::atomic::write_json(path, &report) {
            eprintln!("error: cannot write {}: {e:#}", path.display());
            return EXIT_FAILED;
        }
    }
    code
}

fn run_cases(options: &Args, report: &mut Report, stream: &mut Option<CaseStream>) -> Result<u8> {
    let source = KernelSource::from_env()?;
    if cuda::emu::alloc_only() {
        bail!(
            "selftest compares computed values, and an allocation-only device \
             (--emu-alloc-only) computes none: drop the flag"
        );
    }
    let (cuda, ordinal) = match options.device {
        Device::Cuda(ordinal) => {
            if let Probe::Unavailable(why) = cuda::probe() {
                eprintln!("no CUDA device: selftest needs a GPU ({why})");
                report.status = "no_device";
                report.reason = Some(why);
                return Ok(EXIT_NO_DEVICE);
            }
            (Cuda::with_kernel_source(ordinal, source)?, ordinal)
        }
        Device::Emu(arch) => {
            let library = cuda::emu::kernel_library();
            let memory = cuda::emu::memory_bytes()?;
            (Cuda::emulated(0, arch, memory, library.as_deref())?, 0)
        }
        Device::Cpu => bail!(
            "selftest compares the CUDA backend with the CPU reference: use --device cuda, \
             cuda:N or emu[:sm75|sm80|sm90]"
        ),
    };
    let mut harness = Harness {
        cuda,
        ordinal,
        source,
        seed: options.seed,
        rng: Rng::new(options.seed),
        checks: Vec::new(),
        peak_reserved_bytes: 0,
        family: Family::Buffer,
        stream: stream.take(),
    };
    let info = harness.cuda.info().clone();
    println!(
        "selftest on {} ({}, sm_{}{}, {:.1} GiB, driver CUDA {}.{}), kernels: {source:?}, NVRTC: {}",
        info.device,
        info.name,
        info.compute_capability.0,
        info.compute_capability.1,
        info.total_memory_bytes as f64 / (1u64 << 30) as f64,
        info.driver_cuda_version / 1000,
        info.driver_cuda_version % 1000 / 10,
        report
            .nvrtc_version
            .map_or("not found".to_string(), |(a, b)| format!("{a}.{b}"))
    );
    report.device = Some(info);
    report.kernel_source = Some(format!("{source:?}").to_lowercase());

    let families = selected(options);
    op_cases(&mut harness, &families);
    report.models_skipped = if families.contains(&Family::Models) {
        harness.start(Family::Models);
        models::model_cases(&mut harness, options.models.as_deref())
    } else {
        Some("not selected (--only)".into())
    };
    *stream = harness.stream.take();

    report.modules = harness.cuda.module_reports();
    for m in &report.modules {
        println!(
            "module {:<12} {:<8} {:<16} {:>8.1} ms{}",
            m.name,
            m.source,
            m.image.as_deref().unwrap_or(""),
            m.load_ms,
            m.prebuilt_error
                .as_ref()
                .map_or(String::new(), |e| format!("  (prebuilt failed: {e})"))
        );
    }
    if let Some(counts) = harness.cuda.emulated_launch_counts() {
        let arch = match options.device {
            Device::Emu(arch) => arch,
            _ => unreachable!("only an emulated device counts launches"),
        };
        let entries: Vec<EntryLaunches> = cuda::emu::entry_points(arch)
            .into_iter()
            .map(|(module, function)| {
                let launches = counts
                    .get(&(module.clone(), function.clone()))
                    .copied()
                    .unwrap_or(0);
                EntryLaunches {
                    module,
                    function,
                    launches,
                }
            })
            .collect();
        let unlaunched: Vec<String> = entries
            .iter()
            .filter(|e| e.launches == 0)
            .map(|e| format!("{}.cu:{}", e.module, e.function))
            .collect();
        println!(
            "emulated {arch}: {} of {} kernel entry points launched{}",
            entries.len() - unlaunched.len(),
            entries.len(),
            if unlaunched.is_empty() {
                String::new()
            } else {
                format!("; not by this run: {}", unlaunched.join(", "))
            }
        );
        report.emulated_launches = Some(entries);
    }
    harness.note_memory();
    report.peak_reserved_bytes = harness.peak_reserved_bytes;
    report.failures = harness.checks.iter().filter(|c| !c.passed).count();
    report.checks = harness.checks;
    let total = report.checks.len();
    println!(
        "{} passed, {} failed (peak device memory {:.1} MiB)",
        total - report.failures,
        report.failures,
        report.peak_reserved_bytes as f64 / (1 << 20) as f64
    );
    if report.failures == 0 {
        report.status = "passed";
        Ok(0)
    } else {
        Ok(EXIT_FAILED)
    }
}

/// `(max_rel, norm_rel, non_finite)` of `gpu` against `cpu` (equal lengths).
pub fn compare(gpu: &[f32], cpu: &[f32]) -> (f64, f64, usize) {
    let d = Differences::of(gpu, cpu);
    let rel = |num: f64, den: f64| if den > 0.0 { num / den } else { num };
    (
        rel(d.max_diff, d.max_ref),
        rel(d.diff_sq.sqrt(), d.ref_sq.sqrt()),
        d.non_finite,
    )
}

/// `(max |gpu - cpu|, root mean square of gpu - cpu, non_finite)`: errors in the values' own
/// unit, for outputs whose relative error means nothing (a log-sum-exp near 0 nats).
pub fn compare_absolute(gpu: &[f32], cpu: &[f32]) -> (f64, f64, usize) {
    let d = Differences::of(gpu, cpu);
    let rms = (d.diff_sq / d.compared.max(1) as f64).sqrt();
    (d.max_diff, rms, d.non_finite)
}

/// [`compare`] or [`compare_absolute`]: `(max error, norm error, non_finite)` of gpu, cpu.
type Comparison = fn(&[f32], &[f32]) -> (f64, f64, usize);

/// What [`compare`] and [`compare_absolute`] summarise.
struct Differences {
    max_ref: f64,
    max_diff: f64,
    diff_sq: f64,
    ref_sq: f64,
    /// Elements where both sides are finite.
    compared: usize,
    non_finite: usize,
}

impl Differences {
    fn of(gpu: &[f32], cpu: &[f32]) -> Differences {
        let mut d = Differences {
            max_ref: 0.0,
            max_diff: 0.0,
            diff_sq: 0.0,
            ref_sq: 0.0,
            compared: 0,
            non_finite: 0,
        };
        for (&g, &c) in gpu.iter().zip(cpu) {
            let (g, c) = (g as f64, c as f64);
            if !g.is_finite() && c.is_finite() || g.is_nan() != c.is_nan() {
                d.non_finite += 1;
                continue;
            }
            if !c.is_finite() {
                continue;
            }
            d.max_ref = d.max_ref.max(c.abs());
            d.max_diff = d.max_diff.max((g - c).abs());
            d.diff_sq += (g - c) * (g - c);
            d.ref_sq += c * c;
            d.compared += 1;
        }
        d
    }
}

/// Runs `$body` with `$b` bound to the CPU backend, then to the CUDA backend of `$h`; gives
/// `(cpu, gpu)`. A macro because the body is generic over the backend type.
macro_rules! on_both {
    ($h:expr, |$b:ident| $body:expr) => {{
        let cpu = {
            let $b = &$crate::backend::cpu::Cpu;
            $body
        };
        let gpu = {
            let $b = &$h.cuda;
            $body
        };
        (cpu, gpu)
    }};
}

/// Activations as an op under test takes them (DESIGN §5): f32, or the card's 16-bit type
/// (`Cuda::half_dtype`). The CPU reference computes in f32 on the same values rounded to
/// `dtype`, so a comparison sees only what the device does after loading them.
trait Activations: Backend {
    /// `host` as an activation buffer of `dtype` (the CPU: f32 holding the rounded values).
    fn upload_act(&self, host: &[f32], dtype: Dtype) -> Self::Buf;
}

impl Activations for Cpu {
    fn upload_act(&self, host: &[f32], dtype: Dtype) -> Self::Buf {
        self.upload_vec(host.iter().map(|&v| dtype.round(v)).collect())
    }
}

impl Activations for Cuda {
    fn upload_act(&self, host: &[f32], dtype: Dtype) -> Self::Buf {
        self.upload_as(host, dtype)
    }
}

// After `on_both!`: a macro is visible to the modules declared below it.
mod activation;
mod adamw;
mod attention;
mod elementwise;
mod embedding;
mod gemm;
mod lora;
mod loss;
mod models;
mod nf4;
mod rmsnorm;
mod rope;
mod saved;

pub use nf4::{round_to_operand, NF4_PRODUCT_SHAPES};

struct Harness {
    cuda: Cuda,
    ordinal: usize,
    source: KernelSource,
    /// `--seed`: each family draws its inputs from its own stream of it ([`Harness::start`]).
    seed: u64,
    rng: Rng,
    checks: Vec<Check>,
    peak_reserved_bytes: usize,
    /// The family whose cases run now (named in `--jsonl` lines).
    family: Family,
    /// `--jsonl`, if given.
    stream: Option<CaseStream>,
}

impl Harness {
    /// Starts `family`'s cases: its inputs come from a stream of its own (the seed and the
    /// family), so they are the same whichever families ran before it: a full run and
    /// `--only` (tools/gpu-check.sh runs one family per process) check the same cases.
    fn start(&mut self, family: Family) {
        self.family = family;
        self.rng = Rng::new(self.seed ^ (family as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    }

    /// `n` values from N(0, scale²).
    fn random(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.rng.normal() as f32 * scale).collect()
    }

    fn note_memory(&mut self) {
        self.peak_reserved_bytes = self
            .peak_reserved_bytes
            .max(self.cuda.pool_stats().peak_reserved_bytes);
    }

    /// Records one comparison, after asking the backend for any error; a failed backend is
    /// replaced by a fresh one.
    fn record(
        &mut self,
        op: &str,
        dtype: &'static str,
        case: String,
        cpu: &[f32],
        gpu: &[f32],
        tolerance: f64,
    ) {
        self.record_by(compare, op, dtype, case, cpu, gpu, tolerance);
    }

    /// As [`Harness::record`] with [`compare_absolute`]: `bound` is in the values' own unit
    /// (the record's max_rel_err and norm_rel_err then hold the absolute errors).
    fn record_absolute(
        &mut self,
        op: &str,
        dtype: &'static str,
        case: String,
        cpu: &[f32],
        gpu: &[f32],
        bound: f64,
    ) {
        self.record_by(compare_absolute, op, dtype, case, cpu, gpu, bound);
    }

    #[allow(clippy::too_many_arguments)]
    fn record_by(
        &mut self,
        measure: Comparison,
        op: &str,
        dtype: &'static str,
        case: String,
        cpu: &[f32],
        gpu: &[f32],
        tolerance: f64,
    ) {
        let error = self.cuda.check().err().map(|e| format!("{e:#}"));
        let (max_rel_err, norm_rel_err, non_finite) = if cpu.len() == gpu.len() {
            measure(gpu, cpu)
        } else {
            (f64::INFINITY, f64::INFINITY, gpu.len().max(cpu.len()))
        };
        let passed = error.is_none() && non_finite == 0 && max_rel_err <= tolerance;
        println!(
            "{} {:<26} {:<58} max_rel {:.2e} norm_rel {:.2e} (tol {:.1e}){}{}",
            if passed { "PASS" } else { "FAIL" },
            op,
            case,
            max_rel_err,
            norm_rel_err,
            tolerance,
            if non_finite > 0 {
                format!("  {non_finite} non-finite/unwritten")
            } else {
                String::new()
            },
            error
                .as_ref()
                .map_or(String::new(), |e| format!("  error: {e}"))
        );
        let check = Check {
            op: op.to_string(),
            case,
            dtype,
            max_rel_err,
            norm_rel_err,
            non_finite,
            tolerance,
            passed,
            error: error.clone(),
        };
        if let Some(stream) = &mut self.stream {
            let mut line = serde_json::json!({ "event": "case", "family": self.family });
            if let (Some(line), serde_json::Value::Object(fields)) =
                (line.as_object_mut(), serde_json::json!(check))
            {
                line.extend(fields);
            }
            stream.append(&line);
        }
        self.checks.push(check);
        if error.is_some() {
            self.note_memory();
            match Cuda::with_kernel_source(self.ordinal, self.source) {
                Ok(fresh) => self.cuda = fresh,
                Err(e) => eprintln!("cannot reopen the CUDA backend: {e:#}"),
            }
        }
    }

    /// Records a case that could not be compared because a device returned an error: prints
    /// `errors` (either device's) and fails the case.
    fn broken(
        &mut self,
        op: &str,
        dtype: &'static str,
        case: String,
        tolerance: f64,
        errors: impl IntoIterator<Item = anyhow::Error>,
    ) {
        let error = errors
            .into_iter()
            .map(|e| format!("{e:#}"))
            .collect::<Vec<_>>()
            .join("; ");
        eprintln!("error: {op} {case}: {error}");
        self.record(op, dtype, case, &[], &[f32::NAN], tolerance);
    }

    fn op(&mut self, op: &str, case: String, (cpu, gpu): (Vec<f32>, Vec<f32>)) {
        self.record(op, "f32", case, &cpu, &gpu, F32_OP_TOLERANCE);
    }

    /// An op case whose outputs the device stored as `stored` ([`half_store_tolerance`]), its
    /// inputs in the activation types the case names.
    fn op_stored(
        &mut self,
        op: &str,
        stored: Dtype,
        case: String,
        (cpu, gpu): (Vec<f32>, Vec<f32>),
    ) {
        let label = match stored {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::BF16 => "bf16",
        };
        self.record(op, label, case, &cpu, &gpu, half_store_tolerance(stored));
    }
}

fn nan(n: usize) -> Vec<f32> {
    vec![f32::NAN; n]
}

/// Sequences of these lengths packed: (cu_seqlens, positions).
fn packing(lengths: &[usize]) -> (Vec<usize>, Vec<u32>) {
    let mut cu = vec![0];
    let mut positions = Vec::new();
    for &n in lengths {
        cu.push(cu.last().unwrap() + n);
        positions.extend(0..n as u32);
    }
    (cu, positions)
}

fn inv_freq(head_dim: usize, theta: f32) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32))
        .collect()
}

fn dense<B: Backend>(b: &B, values: &[f32], out_features: usize, in_features: usize) -> Weight<B> {
    Weight {
        out_features,
        in_features,
        data: WeightData::Dense(b.upload(values)),
    }
}

fn nf4<B: Backend>(b: &B, q: &Nf4Weight) -> Weight<B> {
    Weight {
        out_features: q.rows(),
        in_features: q.cols(),
        data: WeightData::Nf4(b.upload_nf4(q.clone())),
    }
}

/// The cases of each op family in `families`, in the order of `backend::Backend`'s ops
/// (`models` is run by the caller).
fn op_cases(h: &mut Harness, families: &[Family]) {
    for &family in families {
        h.start(family);
        match family {
            Family::Buffer => buffer_cases(h),
            Family::Embedding => embedding::cases(h),
            Family::Rmsnorm => rmsnorm::cases(h),
            Family::Gemm => gemm::cases(h),
            Family::Nf4 => nf4::cases(h),
            Family::Lora => lora::cases(h),
            Family::Rope => rope::cases(h),
            Family::Attention => attention::cases(h),
            Family::Activation => activation::cases(h),
            Family::Elementwise => elementwise::cases(h),
            Family::Adamw => adamw::cases(h),
            Family::Saved => saved::cases(h),
            Family::Loss => loss::cases(h),
            Family::Models => {}
        }
    }
}

fn buffer_cases(h: &mut Harness) {
    for n in [1, 7, 333 * 257] {
        let x = h.random(n, 1.0);
        let pair = on_both!(h, |b| b.download(&b.copy(&b.upload(&x))));
        h.op("upload/copy/download", format!("n={n}"), pair);
        let pair = on_both!(h, |b| b.download(&b.zeros(n)));
        h.op("zeros", format!("n={n}"), pair);
    }
}
