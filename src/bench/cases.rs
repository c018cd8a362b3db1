//! What `verdict bench kernels` times and how each measurement is counted, all host-side
//! arithmetic (tested without a GPU in tests/bench.rs): the model shapes of a preset, the case
//! list, each kernel's floating-point operations and fewest bytes moved, the number of input
//! sets to rotate through so that repeats do not run from L2, and the statistics of a run.
//!
//! Counting rules (`.library/device/METHOD.md`, "two numbers first"): `flops` counts the
//! multiply-adds of the mathematical op as 2 (elementwise ops count 0: they are bound by
//! bytes); `bytes` is the fewest bytes any implementation must move through device memory —
//! each input read once, each output written once, at the op's storage type. For the NF4
//! linear that is the packed weight and its double-quantized absmax, never a dequantized
//! copy (which `nf4_dequant_gemm` writes and reads back): the floor is a fused kernel's.

use crate::backend::cuda::nf4::{MmaOperands, Nf4Kernel, Nf4Product};
use crate::model::config::{Family, HfConfig, ModelSpec};
use crate::model::init::preset_config;
use crate::model::weights::Dtype;
use crate::quant::nf4::{DEFAULT_BLOCKSIZE, NESTED_BLOCKSIZE};
use anyhow::{ensure, Context, Result};
use serde::Serialize;

/// The presets `--preset` takes (Gemma 2 family; shapes from `verdict init`'s presets).
pub const PRESETS: [&str; 3] = ["tiny", "2b", "9b"];
/// Rows of X in the linear cases: one token, a small batch, a packed prefill, a long one.
pub const LINEAR_ROWS: [usize; 4] = [1, 16, 512, 2048];
/// Rows of dY in the input-gradient cases (`dX = dY · W`): training batches.
pub const BACKWARD_ROWS: [usize; 2] = [512, 2048];
/// Rank of the LoRA adapter of the [`Variant::Lora`] cases (the memory plan's r = 16).
pub const LORA_RANK: usize = 16;
/// Tokens in the per-token cases (norm, RoPE, activation, embedding, add).
pub const TOKEN_COUNTS: [usize; 2] = [512, 2048];
/// Attention batches as (sequences, tokens each): 2048 tokens packed two ways, and 4096.
pub const ATTENTION_BATCHES: [(usize, usize); 3] = [(4, 512), (1, 2048), (1, 4096)];
/// head_dim of the attention cases comparable with FlashAttention-2 (torch SDPA's flash
/// backend): the preset's heads regrouped at this width, no soft-cap, no window.
pub const FA2_HEAD_DIM: usize = 128;
/// Rows of the embedding table: enough that gathers miss L2 (the vocabulary's 256k rows
/// would take seconds to fill and change nothing but the table's size).
pub const EMBEDDING_ROWS: usize = 32_768;
/// Side of the square GEMMs that measure each cuBLAS precision's peak rate on this card.
pub const PEAK_GEMM_SIDE: usize = 8192;
/// Bytes of the device-to-device copy that measures the bandwidth ceiling (read + written
/// count twice this).
pub const COPY_BYTES: usize = 512 << 20;
/// Inputs rotated through are at least this many times the L2 size together.
pub const L2_MULTIPLE: usize = 3;
/// Most input sets a case rotates through.
pub const MAX_SETS: usize = 64;
/// Most bytes all sets of one case may take together.
pub const MAX_SET_BYTES_TOTAL: f64 = 4.0 * (1u64 << 30) as f64;

/// How a linear weight (and the op's operands) is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Storage {
    /// bitsandbytes NF4, blocksize 64, double-quantized absmax; f32 activations.
    Nf4,
    /// f32 weight and activations.
    F32,
    /// bf16 weight, activations and output (the cuBLAS reference).
    Bf16,
}

/// One timed kernel, with its shape. Serialised with `"kind"`, so rows from `verdict` and
/// from tools/bench_torch.py join on it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Kernel {
    /// `out[m, n] = X[m, k] · W[n, k]ᵀ`.
    Linear {
        m: usize,
        n: usize,
        k: usize,
        storage: Storage,
    },
    /// The input gradient of that linear: `dX[m, k] = dY[m, n] · W[n, k]`.
    LinearBackward {
        m: usize,
        n: usize,
        k: usize,
        storage: Storage,
    },
    /// RMSNorm of `tokens` rows of `dim`.
    Rmsnorm { tokens: usize, dim: usize },
    /// Residual add `acc += x` of `tokens` rows of `dim`.
    Add { tokens: usize, dim: usize },
    /// RoPE in place on `[tokens, heads · head_dim]`.
    Rope {
        tokens: usize,
        heads: usize,
        head_dim: usize,
    },
    /// Causal attention over `sequences` packed sequences of `seq_len` tokens, forward or
    /// backward (`pass`), with or without the preset's logit soft-cap.
    Attention {
        sequences: usize,
        seq_len: usize,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        window: Option<usize>,
        softcap: bool,
        pass: AttentionPass,
    },
    /// `act(gate) · up` over `tokens` rows of `dim`.
    GatedActivation { tokens: usize, dim: usize },
    /// Gathering `tokens` rows of `dim` from a table of `rows`.
    Embedding {
        tokens: usize,
        dim: usize,
        rows: usize,
    },
    /// A device-to-device copy of `bytes`.
    Copy { bytes: usize },
}

/// Which direction of attention a case times.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AttentionPass {
    /// `out` and `lse` from q, k, v.
    Forward,
    /// dq, dk, dv from dout and the forward's out and lse.
    Backward,
}

const F32: f64 = 4.0;

/// Bytes of an NF4 weight of `elements` as the cases store it (`Nf4Weight::bytes` of the
/// default options, without making one): packed nibbles, one u8 absmax code per block of 64,
/// one f32 nested absmax per 256 blocks, the 256-entry f32 nested code table, the offset.
pub fn nf4_weight_bytes(elements: usize) -> f64 {
    let blocks = elements.div_ceil(DEFAULT_BLOCKSIZE);
    (elements.div_ceil(2) + blocks + 4 * blocks.div_ceil(NESTED_BLOCKSIZE) + 4 * 256 + 4) as f64
}

/// Query-key pairs causal attention visits in one sequence of `len` tokens: query `t` sees
/// `min(t + 1, window)` keys.
pub fn visible_pairs(len: usize, window: Option<usize>) -> usize {
    (0..len)
        .map(|t| window.map_or(t + 1, |w| (t + 1).min(w)))
        .sum()
}

impl Kernel {
    /// Floating-point operations (a multiply-add counts 2; elementwise work counts 0).
    pub fn flops(&self) -> f64 {
        match *self {
            Kernel::Linear { m, n, k, .. } | Kernel::LinearBackward { m, n, k, .. } => {
                2.0 * m as f64 * n as f64 * k as f64
            }
            Kernel::Attention {
                sequences,
                seq_len,
                heads,
                head_dim,
                window,
                pass,
                ..
            } => {
                // Forward: Q·Kᵀ and P·V, two multiply-adds per (pair, head, feature). Backward:
                // 2.5 times that (Q·Kᵀ again, dO·Vᵀ, Pᵀ·dO, dSᵀ·Q, dS·K), FlashAttention's
                // convention, so rates compare with its published ones and torch's.
                let pairs = sequences * visible_pairs(seq_len, window);
                let products = match pass {
                    AttentionPass::Forward => 4.0,
                    AttentionPass::Backward => 10.0,
                };
                products * pairs as f64 * heads as f64 * head_dim as f64
            }
            _ => 0.0,
        }
    }

    /// The fewest bytes the op must move through device memory.
    pub fn bytes(&self) -> f64 {
        match *self {
            // Both directions read one [m, k] or [m, n] activation and write the other.
            Kernel::Linear { m, n, k, storage } | Kernel::LinearBackward { m, n, k, storage } => {
                let (act, weight) = match storage {
                    Storage::Nf4 => (F32, nf4_weight_bytes(n * k)),
                    Storage::F32 => (F32, F32 * (n * k) as f64),
                    Storage::Bf16 => (2.0, 2.0 * (n * k) as f64),
                };
                act * (m * k + m * n) as f64 + weight
            }
            Kernel::Rmsnorm { tokens, dim } => F32 * (2 * tokens * dim + dim) as f64,
            Kernel::Add { tokens, dim } => F32 * (3 * tokens * dim) as f64,
            Kernel::Rope {
                tokens,
                heads,
                head_dim,
            } => F32 * (2 * tokens * heads * head_dim + tokens + head_dim / 2) as f64,
            Kernel::Attention {
                sequences,
                seq_len,
                heads,
                kv_heads,
                head_dim,
                pass,
                ..
            } => {
                let tokens = sequences * seq_len;
                // Forward: q, k, v read, out and lse written. Backward: q, k, v, out, dout,
                // lse read, dq, dk, dv written.
                let per_head = match pass {
                    AttentionPass::Forward => 2,
                    AttentionPass::Backward => 4,
                };
                F32 * (tokens * head_dim * per_head * (heads + kv_heads) + tokens * heads) as f64
            }
            Kernel::GatedActivation { tokens, dim } => F32 * (3 * tokens * dim) as f64,
            Kernel::Embedding { tokens, dim, .. } => F32 * (2 * tokens * dim + tokens) as f64,
            Kernel::Copy { bytes } => 2.0 * bytes as f64,
        }
    }

    /// Bytes of one rotation set: the buffers a case allocates per set (inputs, outputs and
    /// the weight), which is what must exceed L2 across sets.
    pub fn set_bytes(&self) -> f64 {
        match *self {
            Kernel::Embedding { dim, rows, .. } => self.bytes() + F32 * (rows * dim) as f64,
            _ => self.bytes(),
        }
    }
}

/// How many input sets to rotate through so that together they exceed [`L2_MULTIPLE`] times
/// the L2 cache: one set when one already does, at most [`MAX_SETS`] and
/// [`MAX_SET_BYTES_TOTAL`] bytes.
pub fn rotation_sets(set_bytes: f64, l2_bytes: usize) -> usize {
    if set_bytes <= 0.0 {
        return 1;
    }
    let wanted = ((L2_MULTIPLE * l2_bytes) as f64 / set_bytes).ceil() as usize;
    let affordable = (MAX_SET_BYTES_TOTAL / set_bytes).floor() as usize;
    wanted.min(affordable).clamp(1, MAX_SETS)
}

/// A projection of one decoder layer: `X · Wᵀ` with `W` `[out, in]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Projection {
    /// `q`, `o`, `gate` or `down`.
    pub name: &'static str,
    /// Input features.
    pub in_features: usize,
    /// Output features.
    pub out_features: usize,
}

/// The shapes of one model that the cases use.
#[derive(Debug, Clone, Serialize)]
pub struct ModelShapes {
    /// The preset, e.g. "2b".
    pub preset: String,
    /// `hidden_size`.
    pub hidden: usize,
    /// `intermediate_size`.
    pub intermediate: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// `head_dim` (a config field).
    pub head_dim: usize,
    /// Sliding window of the local layers.
    pub window: Option<usize>,
    /// Attention logit soft-cap.
    pub softcap: Option<f32>,
    /// Attention scale.
    pub attn_scale: f32,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f32,
    /// RoPE inverse frequencies of the first layer (`head_dim / 2`).
    #[serde(skip)]
    pub inv_freq: Vec<f32>,
}

impl ModelShapes {
    /// The shapes of Gemma 2 preset `preset` (`verdict init --arch gemma2 --preset`), read
    /// through the same config normalisation a checkpoint load uses.
    pub fn gemma2(preset: &str) -> Result<ModelShapes> {
        ensure!(
            PRESETS.contains(&preset),
            "no benchmark preset {preset:?}; available: {}",
            PRESETS.join(", ")
        );
        let config: HfConfig =
            serde_json::from_value(preset_config(Family::Gemma2, preset, Dtype::BF16)?)
                .context("the preset's config.json")?;
        let d = ModelSpec::from_hf(&config)?.decoder;
        // Layer 0 is a sliding-window layer in Gemma 2: the window and RoPE the cases use.
        let layer = d.layers.first().context("the preset has no layers")?;
        Ok(ModelShapes {
            preset: preset.to_string(),
            hidden: d.hidden_size,
            intermediate: d.intermediate_size,
            heads: d.num_heads,
            kv_heads: d.num_kv_heads,
            head_dim: d.head_dim,
            window: layer.window,
            softcap: d.attn_softcap,
            attn_scale: d.attn_scale,
            rms_norm_eps: d.rms_norm_eps,
            inv_freq: layer.rope.inv_freq(d.head_dim),
        })
    }

    /// The projections timed: q (hidden -> heads · head_dim), o (back), gate (hidden ->
    /// intermediate; up has its shape) and down (back). k and v are q's with fewer heads.
    pub fn projections(&self) -> [Projection; 4] {
        let attn = self.heads * self.head_dim;
        let p = |name, in_features, out_features| Projection {
            name,
            in_features,
            out_features,
        };
        [
            p("q", self.hidden, attn),
            p("o", attn, self.hidden),
            p("gate", self.hidden, self.intermediate),
            p("down", self.intermediate, self.hidden),
        ]
    }
}

/// Who runs a case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// verdict's `linear` on an NF4 weight: the kernel the backend chooses.
    Nf4,
    /// One NF4 kernel, named (`Cuda::nf4_product`), whether or not the backend would choose it.
    Nf4Kernel(Nf4Kernel),
    /// verdict's kernel, f32 (for products: `gemm_f32` on CUDA cores, forced).
    F32,
    /// verdict's dense product as the backend runs it: f32 weight and activations, tensor
    /// cores with the card's operand type (`gemm_mma_f16|bf16`).
    DenseMma,
    /// The NF4 product with a rank-[`LORA_RANK`] LoRA adapter (no dropout), as the backend
    /// runs an adapted projection: `lora_linear` / `lora_linear_backward` (forward: the term
    /// inside the NF4 product; backward: also dA and dB). Against [`Variant::Nf4`] at the
    /// same shape: the adapter's cost (flops and bytes count the base product only).
    Lora,
    /// verdict's flash attention (f32 storage, f16 operands on sm_75, bf16 on sm_80+); the
    /// backward with atomic dq, the backend's default.
    Flash,
    /// The deterministic flash attention backward (`VERDICT_DETERMINISTIC=1`).
    FlashDeterministic,
    /// `cublasGemmEx`, bf16 operands and output, f32 accumulation.
    CublasBf16,
    /// `cublasGemmEx`, f32 operands, TF32 tensor cores (`CUBLAS_COMPUTE_32F_FAST_TF32`).
    CublasTf32,
    /// `cublasGemmEx`, f32 operands, f32 arithmetic (`CUBLAS_COMPUTE_32F`).
    CublasF32,
    /// `cuMemcpyDtoDAsync`: the bandwidth ceiling.
    DeviceCopy,
}

/// The NF4 kernels a case list names, in the order they run.
pub const NF4_KERNELS: [Nf4Kernel; 4] = [
    Nf4Kernel::Gemv,
    Nf4Kernel::Mma(MmaOperands::Bf16),
    Nf4Kernel::Mma(MmaOperands::F16),
    Nf4Kernel::Dequantized,
];

impl Variant {
    /// The name in tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Variant::Nf4 => "nf4",
            Variant::Nf4Kernel(Nf4Kernel::Gemv) => "nf4_gemv",
            Variant::Nf4Kernel(Nf4Kernel::Mma(MmaOperands::Bf16)) => "nf4_mma_bf16",
            Variant::Nf4Kernel(Nf4Kernel::Mma(MmaOperands::F16)) => "nf4_mma_f16",
            Variant::Nf4Kernel(Nf4Kernel::Dequantized) => "nf4_dequant_gemm",
            Variant::F32 => "f32",
            Variant::DenseMma => "gemm_mma",
            Variant::Lora => "nf4_lora",
            Variant::Flash => "flash",
            Variant::FlashDeterministic => "flash_deterministic",
            Variant::CublasBf16 => "cublas_bf16",
            Variant::CublasTf32 => "cublas_tf32",
            Variant::CublasF32 => "cublas_f32",
            Variant::DeviceCopy => "device_copy",
        }
    }

    /// Whether cuBLAS runs it.
    pub fn is_cublas(self) -> bool {
        matches!(
            self,
            Variant::CublasBf16 | Variant::CublasTf32 | Variant::CublasF32
        )
    }
}

impl Serialize for Variant {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

/// One measurement to make.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Case {
    /// The backend op (`linear`, `rmsnorm`, ...) or `copy`.
    pub op: &'static str,
    /// Who runs it.
    pub variant: Variant,
    /// The shape in words, the same in tools/bench_torch.py: e.g. `q 2304->2048 m=16`.
    pub label: String,
    /// The shape.
    pub kernel: Kernel,
}

/// The label of a linear case (tools/bench_torch.py writes the same).
pub fn linear_label(name: &str, in_features: usize, out_features: usize, m: usize) -> String {
    format!("{name} {in_features}->{out_features} m={m}")
}

/// Every case for `shapes` on a card of `compute_capability`, the limits first (copy, then the
/// square cuBLAS GEMMs), then per projection, direction (`linear` at [`LINEAR_ROWS`],
/// `linear_backward` at [`BACKWARD_ROWS`]) and row count: verdict's NF4 op as the backend
/// runs it, each NF4 kernel that can compute it on this card, the adapted projection (rows
/// from [`BACKWARD_ROWS`] on), the dense tensor-core and f32 products, and the three cuBLAS
/// references; then the other ops. `ops` keeps only the ops named (empty: all;
/// the limits always run).
pub fn cases(shapes: &ModelShapes, ops: &[String], compute_capability: (i32, i32)) -> Vec<Case> {
    let wanted = |op: &str| ops.is_empty() || ops.iter().any(|o| o == op);
    let mut out = vec![Case {
        op: "copy",
        variant: Variant::DeviceCopy,
        label: format!("{} MiB", COPY_BYTES >> 20),
        kernel: Kernel::Copy { bytes: COPY_BYTES },
    }];
    let cublas = [
        (Variant::CublasBf16, Storage::Bf16),
        (Variant::CublasTf32, Storage::F32),
        (Variant::CublasF32, Storage::F32),
    ];
    let side = PEAK_GEMM_SIDE;
    for (variant, storage) in cublas {
        out.push(Case {
            op: "linear",
            variant,
            label: linear_label("square", side, side, side),
            kernel: Kernel::Linear {
                m: side,
                n: side,
                k: side,
                storage,
            },
        });
    }
    for p in shapes.projections() {
        let (n, k) = (p.out_features, p.in_features);
        let directions = [
            ("linear", Nf4Product::Forward, &LINEAR_ROWS[..]),
            ("linear_backward", Nf4Product::Backward, &BACKWARD_ROWS[..]),
        ];
        for (op, product, rows) in directions.into_iter().filter(|(op, ..)| wanted(op)) {
            for &m in rows {
                let nf4_kernels = NF4_KERNELS
                    .into_iter()
                    .filter(|kernel| kernel.check(product, m, k, compute_capability).is_ok())
                    .map(|kernel| (Variant::Nf4Kernel(kernel), Storage::Nf4));
                // The adapted projection at training's row counts (the backward's).
                let lora = (m >= BACKWARD_ROWS[0]).then_some((Variant::Lora, Storage::Nf4));
                let variants = [(Variant::Nf4, Storage::Nf4)]
                    .into_iter()
                    .chain(nf4_kernels)
                    .chain(lora)
                    .chain([
                        (Variant::DenseMma, Storage::F32),
                        (Variant::F32, Storage::F32),
                    ])
                    .chain(cublas);
                for (variant, storage) in variants {
                    let kernel = match product {
                        Nf4Product::Forward => Kernel::Linear { m, n, k, storage },
                        Nf4Product::Backward => Kernel::LinearBackward { m, n, k, storage },
                    };
                    out.push(Case {
                        op,
                        variant,
                        label: linear_label(p.name, k, n, m),
                        kernel,
                    });
                }
            }
        }
    }
    let (hidden, attn) = (shapes.hidden, shapes.heads * shapes.head_dim);
    for tokens in TOKEN_COUNTS {
        let per_token = [
            (
                "rmsnorm",
                Kernel::Rmsnorm {
                    tokens,
                    dim: hidden,
                },
            ),
            (
                "add",
                Kernel::Add {
                    tokens,
                    dim: hidden,
                },
            ),
            (
                "rope",
                Kernel::Rope {
                    tokens,
                    heads: shapes.heads,
                    head_dim: shapes.head_dim,
                },
            ),
            (
                "gated_activation",
                Kernel::GatedActivation {
                    tokens,
                    dim: shapes.intermediate,
                },
            ),
            (
                "embedding",
                Kernel::Embedding {
                    tokens,
                    dim: hidden,
                    rows: EMBEDDING_ROWS,
                },
            ),
        ];
        for (op, kernel) in per_token.into_iter().filter(|(op, _)| wanted(op)) {
            let width = match kernel {
                Kernel::Rope { .. } => attn,
                Kernel::GatedActivation { dim, .. } => dim,
                _ => hidden,
            };
            out.push(Case {
                op,
                variant: Variant::F32,
                label: format!("tokens={tokens} dim={width}"),
                kernel,
            });
        }
    }
    // Attention at the preset's own settings (Gemma 2: head_dim 256, soft-cap, window), and
    // at head_dim 128 without cap or window, where torch SDPA's FlashAttention-2 runs too
    // (tools/bench_torch.py times both at the same shapes).
    let settings = [
        (
            shapes.heads,
            shapes.kv_heads,
            shapes.head_dim,
            shapes.window,
            shapes.softcap.is_some(),
        ),
        (
            shapes.heads * shapes.head_dim / FA2_HEAD_DIM,
            shapes.kv_heads * shapes.head_dim / FA2_HEAD_DIM,
            FA2_HEAD_DIM,
            None,
            false,
        ),
    ];
    for (op, pass, variants) in [
        ("attention", AttentionPass::Forward, &[Variant::Flash][..]),
        (
            "attention_backward",
            AttentionPass::Backward,
            &[Variant::Flash, Variant::FlashDeterministic][..],
        ),
    ] {
        if !wanted(op) {
            continue;
        }
        for (sequences, seq_len) in ATTENTION_BATCHES {
            for (heads, kv_heads, head_dim, window, softcap) in settings {
                for &variant in variants {
                    out.push(Case {
                        op,
                        variant,
                        label: format!(
                            "{sequences}x{seq_len} h{heads}/{kv_heads} d{head_dim} w{} cap{}",
                            window.map_or("none".into(), |w| w.to_string()),
                            if softcap {
                                shapes.softcap.map_or("none".into(), |c| c.to_string())
                            } else {
                                "none".into()
                            },
                        ),
                        kernel: Kernel::Attention {
                            sequences,
                            seq_len,
                            heads,
                            kv_heads,
                            head_dim,
                            window,
                            softcap,
                            pass,
                        },
                    });
                }
            }
        }
    }
    out
}

/// The op names `--ops` accepts.
pub const OPS: [&str; 9] = [
    "linear",
    "linear_backward",
    "rmsnorm",
    "add",
    "rope",
    "gated_activation",
    "embedding",
    "attention",
    "attention_backward",
];

/// Summary statistics of one case's per-call device times.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Timing {
    /// Timed calls.
    pub reps: usize,
    /// Median, microseconds.
    pub median_us: f64,
    /// Fastest call.
    pub min_us: f64,
    /// 10th percentile.
    pub p10_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
}

/// The `q`-quantile (0..=1) of sorted values, interpolating linearly between neighbours (the
/// median of an even count is the mean of the middle two).
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    let pos = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

impl Timing {
    /// The statistics of per-call times in milliseconds; `None` for no samples.
    pub fn from_ms(samples_ms: &[f32]) -> Option<Timing> {
        if samples_ms.is_empty() {
            return None;
        }
        let mut us: Vec<f64> = samples_ms.iter().map(|&ms| ms as f64 * 1e3).collect();
        us.sort_by(f64::total_cmp);
        Some(Timing {
            reps: us.len(),
            median_us: quantile(&us, 0.5),
            min_us: us[0],
            p10_us: quantile(&us, 0.1),
            p90_us: quantile(&us, 0.9),
        })
    }
}

/// Calls to time for a case whose calls take about `estimate_ms`: enough to fill
/// `budget_ms`, within `[min, max]`.
pub fn reps_for(estimate_ms: f64, budget_ms: f64, min: usize, max: usize) -> usize {
    // No usable estimate (a zero or NaN time): as many calls as allowed.
    if estimate_ms.is_nan() || estimate_ms <= 0.0 {
        return max;
    }
    ((budget_ms / estimate_ms).ceil() as usize).clamp(min, max)
}
