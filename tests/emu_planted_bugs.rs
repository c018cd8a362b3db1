//! Planted bugs: proof that the emulated device catches the mistakes kernel code makes.
//!
//! Each case builds a mutated copy of a real kernel file (the unit build.rs generated for
//! the emulator, with one snippet replaced) into a kernel library, opens an emulated device
//! with it (`VERDICT_EMU_KERNELS`'s mechanism) and runs the op that launches the kernel through
//! the real host path. The case passes only if the emulator reports the bug as expected (or,
//! for a wrong result, the op's output leaves the CPU reference's tolerance). The control
//! case builds the same files unmutated and runs every op cleanly, so a catch is the
//! mutation's doing. A snippet that no longer occurs exactly once in its kernel fails its case:
//! a kernel edit must move the mutation along, never silently disable it.
//!
//! | case | kernel | mutation | caught as |
//! |---|---|---|---|
//! | `missing_syncthreads_is_a_shared_race` | gemm.cu | `gemm_mma`'s `__syncthreads` before the next tile is staged removed | shared-memory race |
//! | `off_by_one_guard_reads_past_the_allocation` | elementwise.cu | add's guard `i >= n` -> `i > n` | out of bounds, past the end of the allocation |
//! | `wrong_mma_fragment_breaks_parity` | nf4.cu (mma.cuh's `mma_warp_tile`) | A fragment registers 1 and 2 swapped | result outside tolerance of the CPU |
//! | `shuffle_with_a_diverged_lane_is_named` | common.cuh (rmsnorm.cu) | only lanes < 16 reach the warp shuffle | divergence at a warp collective |
//! | `misaligned_float4_load_is_named` | nf4.cu | the X tile's vector load (float4 for an f32 X) one element off | misaligned load |
//! | `two_writers_of_a_shared_word_race` | common.cuh (rmsnorm.cu) | lanes 0 and 1 both write the warp partial | shared-memory race |
//! | `barrier_not_reached_by_returned_threads` | rmsnorm.cu | the second warp returns before the block reduction | `__syncthreads` not reached |
//! | `shared_array_overrun_is_named` | nf4.cu | the code table loaded by 17 threads | past the end of its object (the compiler's check) |
//! | `shift_past_the_width_is_undefined_behaviour` | nf4.cu | the absmax index shifted by 64 bits more | undefined behaviour at its line |
//! | `lora_term_without_its_scale_breaks_parity` | nf4.cu | the fused LoRA term staged without `s` | result outside tolerance of the CPU |
//! | `window_one_key_too_wide_breaks_attention_parity` | attention.cu | the sliding window's `j + window > t` -> `>=` | out outside the selftest's f16 tolerance (vs the CPU on rounded inputs) |

mod common;

use common::argv;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use verdict::backend::cpu::Cpu;
use verdict::backend::cuda::emu::{self, EmuArch};
use verdict::backend::cuda::nf4::MmaOperands;
use verdict::backend::cuda::Cuda;
use verdict::backend::{
    AttentionParams, Backend, LoraAdapter, NormStyle, Store, Weight, WeightData,
};
use verdict::quant::nf4::{Nf4Options, Nf4Weight};

const ARCH: EmuArch = EmuArch::Sm75;

/// One snippet of a generated kernel unit and what replaces it.
struct Mutation {
    module: &'static str,
    find: &'static str,
    replace: &'static str,
}

/// The compiler and the flags of an instrumented kernel unit, as build.rs wrote them.
fn recipe() -> Option<(String, Vec<String>)> {
    let text = std::fs::read_to_string(Path::new(env!("OUT_DIR")).join("emu_compile.txt")).ok()?;
    let mut lines = text.lines().map(str::to_string);
    let compiler = lines.next().filter(|c| !c.is_empty())?;
    Some((compiler, lines.collect()))
}

fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("verdict-emu-planted-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs `compiler args`, which must succeed.
fn compile(compiler: &str, args: Vec<&OsStr>) {
    let mut command = Command::new(compiler);
    command.args(args);
    let output = command.output().expect("the C++ compiler runs");
    assert!(
        output.status.success(),
        "{command:?} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// runtime.cpp compiled once for every library of this test binary.
fn runtime_object(compiler: &str) -> &'static Path {
    static OBJECT: OnceLock<PathBuf> = OnceLock::new();
    OBJECT.get_or_init(|| {
        let object = scratch().join("runtime.o");
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels/emu/runtime.cpp");
        compile(
            compiler,
            argv!["-std=c++17", "-O2", "-fPIC", "-c", &source, "-o", &object],
        );
        object
    })
}

/// A kernel library of `module`'s generated unit with `mutation` applied (if any), or `None`
/// (said on stderr) when this build has no emulated device.
fn library(case: &str, module: &str, mutation: Option<&Mutation>) -> Option<PathBuf> {
    let Some((compiler, flags)) = recipe() else {
        common::skip(
            &format!("planted bug {case}"),
            "this build has no emulated device (build.rs needs GCC on x86-64)",
        );
        return None;
    };
    let dir = scratch().join(case);
    std::fs::create_dir_all(&dir).unwrap();
    let table = format!(
        "verdict_emu_sm{}_{module}",
        ARCH.to_string().trim_start_matches("sm")
    );
    let unit = std::fs::read_to_string(
        Path::new(env!("OUT_DIR")).join(format!("emu_{}_{module}.cpp", ARCH)),
    )
    .expect("build.rs generated the unit");
    let unit = match mutation {
        Some(m) => {
            assert_eq!(m.module, module);
            let found = unit.matches(m.find).count();
            assert_eq!(
                found, 1,
                "{case}: the snippet occurs {found} times in {module}: move the mutation along"
            );
            unit.replace(m.find, m.replace)
        }
        None => unit,
    };
    let source = dir.join(format!("{module}.cpp"));
    std::fs::write(&source, unit).unwrap();
    let registry = dir.join("registry.cpp");
    std::fs::write(
        &registry,
        format!(
            "#include \"{}\"\nextern \"C\" const verdict_emu_entry {table}[];\n\
             extern \"C\" const verdict_emu_module verdict_emu_modules[] = {{{{{}, {table}}}, {{0, nullptr}}}};\n",
            Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels/emu/runtime.h").display(),
            ARCH.to_string().trim_start_matches("sm"),
        ),
    )
    .unwrap();
    let kernel_object = dir.join(format!("{module}.o"));
    let mut args: Vec<&OsStr> = flags.iter().map(OsStr::new).collect();
    args.extend(argv!["-fPIC", "-c", &source, "-o", &kernel_object]);
    compile(&compiler, args);
    let registry_object = dir.join("registry.o");
    compile(
        &compiler,
        argv![
            "-std=c++17",
            "-fPIC",
            "-c",
            &registry,
            "-o",
            &registry_object
        ],
    );
    // -Bsymbolic: the library's kernels call its own runtime's hooks, not the binary's.
    let library = dir.join("libkernels.so");
    let runtime = runtime_object(&compiler);
    compile(
        &compiler,
        argv![
            "-shared",
            "-Wl,-Bsymbolic",
            "-o",
            &library,
            &kernel_object,
            &registry_object,
            runtime
        ],
    );
    Some(library)
}

fn device(library: &Path) -> Cuda {
    Cuda::emulated(0, ARCH, 1 << 30, Some(library)).expect("the emulated device opens")
}

fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as f32 + 0.5) * 0.7391 + seed as f32).sin())
        .collect()
}

// ---- the ops that launch the mutated kernels ----

fn run_gemm(cuda: &Cuda) -> Vec<f32> {
    let (rows, inf, outf) = (40, 70, 50);
    let x = cuda.upload(&values(rows * inf, 1));
    let w = Weight {
        out_features: outf,
        in_features: inf,
        data: WeightData::Dense(cuda.upload(&values(outf * inf, 2))),
    };
    let mut out = cuda.zeros(rows * outf);
    cuda.linear(&mut out, &x, &w, rows, Store::Overwrite);
    cuda.download(&out)
}

fn run_add(cuda: &Cuda) -> Vec<f32> {
    let mut acc = cuda.upload(&values(1000, 3));
    let x = cuda.upload(&values(1000, 4));
    cuda.add(&mut acc, &x);
    cuda.download(&acc)
}

fn run_rmsnorm(cuda: &Cuda, dim: usize) -> Vec<f32> {
    let rows = 7;
    let x = cuda.upload(&values(rows * dim, 5));
    let w = cuda.upload(&values(dim, 6));
    let mut out = cuda.zeros(rows * dim);
    cuda.rmsnorm(&mut out, &x, &w, dim, 1e-6, NormStyle::OnePlusWeight);
    cuda.download(&out)
}

const NF4_ROWS: usize = 64;
const NF4_IN: usize = 128;
const NF4_OUT: usize = 96;

fn nf4_weight() -> Nf4Weight {
    let options = Nf4Options {
        blocksize: 64,
        double_quant: false,
    };
    Nf4Weight::quantize(&values(NF4_OUT * NF4_IN, 7), NF4_OUT, NF4_IN, options).unwrap()
}

/// `X · Wᵀ` with an NF4 weight: the tensor-core kernel at 64 rows.
fn run_nf4<B: Backend>(backend: &B) -> Vec<f32> {
    let x = backend.upload(&values(NF4_ROWS * NF4_IN, 8));
    let w = Weight {
        out_features: NF4_OUT,
        in_features: NF4_IN,
        data: WeightData::Nf4(backend.upload_nf4(nf4_weight())),
    };
    let mut out = backend.zeros(NF4_ROWS * NF4_OUT);
    backend.linear(&mut out, &x, &w, NF4_ROWS, Store::Overwrite);
    backend.download(&out)
}

/// `lora_linear` over [`run_nf4`]'s NF4 weight with a rank-4 adapter, scale 2: the LoRA term
/// fused into the tensor-core NF4 product (about as large as the base product here).
fn run_lora<B: Backend>(backend: &B) -> Vec<f32> {
    let x = backend.upload(&values(NF4_ROWS * NF4_IN, 8));
    let dense = |values: Vec<f32>, out_features, in_features| Weight {
        out_features,
        in_features,
        data: WeightData::Dense(backend.upload(&values)),
    };
    let w = Weight {
        out_features: NF4_OUT,
        in_features: NF4_IN,
        data: WeightData::Nf4(backend.upload_nf4(nf4_weight())),
    };
    let (a, b) = (
        dense(values(4 * NF4_IN, 9), 4, NF4_IN),
        dense(values(NF4_OUT * 4, 10), NF4_OUT, 4),
    );
    let adapter = LoraAdapter {
        a: &a,
        b: &b,
        scale: 2.0,
        dropout: None,
    };
    let mut out = backend.zeros(NF4_ROWS * NF4_OUT);
    backend.lora_linear(&mut out, &x, &w, &adapter, NF4_ROWS);
    backend.download(&out)
}

/// Attention with a sliding window of 16 over 70 tokens, 2 heads, head_dim 64: most queries
/// have a key at the window's edge.
const ATTENTION_PARAMS: AttentionParams = AttentionParams {
    heads: 2,
    kv_heads: 2,
    head_dim: 64,
    scale: 0.125,
    softcap: None,
    window: Some(16),
};
const ATTENTION_TOKENS: usize = 70;

fn attention_inputs() -> [Vec<f32>; 3] {
    let n = ATTENTION_TOKENS * 2 * 64;
    // Small q and k: a flat softmax, in which one key more or less shows (a peaked one would
    // hide it behind its largest score).
    let small = |x: Vec<f32>| x.iter().map(|v| 0.5 * v).collect();
    [small(values(n, 9)), small(values(n, 10)), values(n, 11)]
}

/// The attention forward's output on `[q, k, v]`.
fn run_attention<B: Backend>(backend: &B, [q, k, v]: [Vec<f32>; 3]) -> Vec<f32> {
    let tokens = ATTENTION_TOKENS;
    let mut out = backend.zeros(q.len());
    let mut lse = backend.zeros(tokens * ATTENTION_PARAMS.heads);
    let (q, k, v) = (backend.upload(&q), backend.upload(&k), backend.upload(&v));
    backend.attention(
        &mut out,
        &mut lse,
        &q,
        &k,
        &v,
        &[0, tokens],
        &ATTENTION_PARAMS,
    );
    backend.download(&out)
}

/// max |a - b| / max |b|.
fn relative_error(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

// ---- the cases ----

/// The op that launches a mutated kernel.
#[derive(Clone, Copy)]
enum Op {
    Gemm,
    Add,
    Rmsnorm,
    Nf4,
    Nf4Dequantize,
    Lora,
    Attention,
}

impl Op {
    fn module(self) -> &'static str {
        match self {
            Op::Gemm => "gemm",
            Op::Add => "elementwise",
            Op::Rmsnorm => "rmsnorm",
            Op::Nf4 | Op::Nf4Dequantize | Op::Lora => "nf4",
            Op::Attention => "attention",
        }
    }

    /// The CPU result a wrongly computing mutant must leave, and by how much (max |a - b| /
    /// max |b|), for the ops whose wrong results are cases.
    fn reference(self) -> Option<(Vec<f32>, f32)> {
        match self {
            Op::Nf4 => Some((run_nf4(&Cpu), 0.1)),
            Op::Lora => Some((run_lora(&Cpu), 0.1)),
            Op::Attention => {
                // The selftest's check: the CPU on the inputs rounded to f16 as sm_75 rounds
                // them, within FLASH_F16_ROUNDED_TOLERANCE.
                let [q, k, v] = attention_inputs()
                    .map(|x| verdict::selftest::round_to_operand(&x, MmaOperands::F16));
                let tolerance = verdict::selftest::FLASH_F16_ROUNDED_TOLERANCE as f32;
                Some((run_attention(&Cpu, [q, k, v]), tolerance))
            }
            _ => None,
        }
    }

    fn run(self, cuda: &Cuda) -> Vec<f32> {
        match self {
            Op::Gemm => run_gemm(cuda),
            Op::Add => run_add(cuda),
            Op::Rmsnorm => run_rmsnorm(cuda, 40),
            Op::Nf4 => run_nf4(cuda),
            Op::Nf4Dequantize => {
                cuda.download(&cuda.nf4_dequantize(&cuda.upload_nf4(nf4_weight())))
            }
            Op::Lora => run_lora(cuda),
            Op::Attention => run_attention(cuda, attention_inputs()),
        }
    }
}

/// How a case is caught.
enum Caught {
    /// The device reports an error holding every one of these parts.
    Report(&'static [&'static str]),
    /// The op runs, and its result leaves the CPU reference (`Op::reference`).
    WrongResult,
}

/// Builds `op`'s kernel file with `find` replaced by `replace` and checks the bug is caught.
fn assert_caught(case: &str, op: Op, find: &'static str, replace: &'static str, caught: Caught) {
    let mutation = Mutation {
        module: op.module(),
        find,
        replace,
    };
    let Some(lib) = library(case, op.module(), Some(&mutation)) else {
        return;
    };
    let cuda = device(&lib);
    let got = op.run(&cuda);
    match caught {
        Caught::Report(parts) => {
            let message = match cuda.check() {
                Err(e) => format!("{e:#}"),
                Ok(()) => panic!("{case}: the mutated kernel ran without an error"),
            };
            for part in parts {
                assert!(
                    message.contains(part),
                    "{case}: expected {part:?} in the report:\n{message}"
                );
            }
        }
        Caught::WrongResult => {
            cuda.check().expect("a wrong kernel computes, wrongly");
            let (reference, bound) = op.reference().expect("a reference for the op");
            let err = relative_error(&got, &reference);
            eprintln!("{case}: {err:.2e} from the CPU (bound {bound:.0e})");
            assert!(
                err > bound,
                "{case}: the mutated kernel still matches the CPU ({err} <= {bound})"
            );
        }
    }
}

#[test]
fn control_unmutated_kernels_run_clean_and_match_the_cpu() {
    for op in [
        Op::Gemm,
        Op::Add,
        Op::Rmsnorm,
        Op::Nf4,
        Op::Lora,
        Op::Attention,
    ] {
        let Some(lib) = library(&format!("control-{}", op.module()), op.module(), None) else {
            return;
        };
        let cuda = device(&lib);
        let got = op.run(&cuda);
        cuda.check()
            .unwrap_or_else(|e| panic!("unmutated {}: {e:#}", op.module()));
        if let Some((reference, bound)) = op.reference() {
            let err = relative_error(&got, &reference);
            eprintln!("unmutated {}: {err:.2e} from the CPU", op.module());
            assert!(
                err < bound / 2.0,
                "unmutated {} differs from the CPU by {err}",
                op.module()
            );
        }
    }
}

#[test]
fn missing_syncthreads_is_a_shared_race() {
    assert_caught(
        "missing-syncthreads",
        Op::Gemm,
        "        mma_warp_tile<Op>(acc, a_s, b_s, mma_k_len(K - k0));\n        __syncthreads();  // the next step overwrites the tiles\n",
        "        mma_warp_tile<Op>(acc, a_s, b_s, mma_k_len(K - k0));\n",
        Caught::Report(&["shared-memory race", "gemm_mma_f16", "no __syncthreads between"]),
    );
}

#[test]
fn lora_term_without_its_scale_breaks_parity() {
    assert_caught(
        "lora-scale-lost",
        Op::Lora,
        "lora.R, 1, lora.scale, NoDropout());",
        "lora.R, 1, 1.0f, NoDropout());",
        Caught::WrongResult,
    );
}

#[test]
fn off_by_one_guard_reads_past_the_allocation() {
    assert_caught(
        "off-by-one",
        Op::Add,
        "    if (i >= n) {\n        return;  // guard: the last block runs past the end\n    }\n    S::store(acc, i, ",
        "    if (i > n) {\n        return;\n    }\n    S::store(acc, i, ",
        Caught::Report(&["add_f32", "thread (232, 0, 0)", "past the end of a 4000-byte allocation made by upload"]),
    );
}

#[test]
fn wrong_mma_fragment_breaks_parity() {
    assert_caught(
        "wrong-fragment",
        Op::Nf4,
        "a[i][1] = mma_tile_word(a_s, row + 8, kk + 2 * t);\n            a[i][2] = mma_tile_word(a_s, row, kk + 8 + 2 * t);",
        "a[i][1] = mma_tile_word(a_s, row, kk + 8 + 2 * t);\n            a[i][2] = mma_tile_word(a_s, row + 8, kk + 2 * t);",
        Caught::WrongResult,
    );
}

#[test]
fn shuffle_with_a_diverged_lane_is_named() {
    assert_caught(
        "diverged-shuffle",
        Op::Rmsnorm,
        "    v = warp_reduce(v, op);\n    __syncthreads();  // a previous call's readers",
        "    if (lane < 16) v = warp_reduce(v, op);\n    __syncthreads();  // a previous call's readers",
        Caught::Report(&["rmsnorm", "a shuffle", "waits for lane 16 of warp 0", "waits at __syncthreads", "(divergence)"]),
    );
}

#[test]
fn misaligned_float4_load_is_named() {
    assert_caught(
        "misaligned",
        Op::Nf4,
        "v = nf4_load4(x, row + k);",
        "v = nf4_load4(x, row + k + 1);",
        Caught::Report(&["misaligned __ldg", "needs 16-byte alignment", "nf4_mma"]),
    );
}

#[test]
fn two_writers_of_a_shared_word_race() {
    assert_caught(
        "two-writers",
        Op::Rmsnorm,
        "    if (lane == 0) {\n        warp_partials[warp] = v;",
        "    if (lane < 2) {\n        warp_partials[warp] = v;",
        Caught::Report(&[
            "shared-memory race",
            "wrote warp_partials",
            "thread (0, 0, 0) wrote",
        ]),
    );
}

#[test]
fn barrier_not_reached_by_returned_threads() {
    assert_caught(
        "barrier-not-reached",
        Op::Rmsnorm,
        "    const unsigned long long base = (unsigned long long)blockIdx.x * dim;\n    float sum_sq = 0.0f;\n    for",
        "    const unsigned long long base = (unsigned long long)blockIdx.x * dim;\n    if (threadIdx.x >= 32) return;\n    float sum_sq = 0.0f;\n    for",
        Caught::Report(&["rmsnorm", "is not reached by 32 thread(s) that returned"]),
    );
}

#[test]
fn shared_array_overrun_is_named() {
    assert_caught(
        "shared-overrun",
        Op::Nf4,
        "    if (threadIdx.x < 16) {\n        code[threadIdx.x] = NF4_CODE[threadIdx.x];",
        "    if (threadIdx.x < 17) {\n        code[threadIdx.x] = threadIdx.x;",
        // The compiler knows `code`'s size, so its undefined-behaviour check fires before the
        // emulator's bounds check would name the array.
        Caught::Report(&[
            "thread (16, 0, 0)",
            "undefined behaviour (an access past the end of its object)",
        ]),
    );
}

#[test]
fn shift_past_the_width_is_undefined_behaviour() {
    assert_caught(
        "shift-past-width",
        Op::Nf4Dequantize,
        "const float scale = absmax(first >> (__ffs(blocksize) - 1));",
        "const float scale = absmax(first >> (__ffs(blocksize) + 63));",
        Caught::Report(&[
            "nf4_dequant_f32",
            "undefined behaviour (shift by a negative amount or past the width)",
            "nf4.cu:",
        ]),
    );
}

#[test]
fn window_one_key_too_wide_breaks_attention_parity() {
    // Off by one at the window's edge: each query also sees the key at distance `window`.
    assert_caught(
        "window-too-wide",
        Op::Attention,
        "(window == 0 || j + window > t)",
        "(window == 0 || j + window >= t)",
        Caught::WrongResult,
    );
}

#[test]
fn the_emulator_is_built_where_ci_runs() {
    // CI builds with VERDICT_REQUIRE_KERNELS=1, which makes a missing emulator a build error;
    // here the library API must agree with the build.
    assert_eq!(emu::available(), recipe().is_some());
}
