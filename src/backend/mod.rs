//! The op set the decoder is written against: one signature per op, implemented once per
//! device. `cpu` is the plain f32 reference (rayon); a CUDA backend implements the same trait
//! and is tested op by op against it.
//!
//! Place in the data flow: token ids -> `model::decoder` calls these ops -> hidden states ->
//! `model::head`. The model never knows which device runs an op.
//!
//! Layout conventions, shared by every op:
//! - Activations are row-major `[tokens, features]`; a batch is *packed*: the sequences of a
//!   batch are concatenated without padding and described by `cu_seqlens` (sequence `s` owns
//!   rows `cu_seqlens[s]..cu_seqlens[s + 1]`), the layout variable-length flash attention uses.
//!   Positions restart at 0 in every sequence and attention never crosses a sequence boundary,
//!   so a batch gives exactly what each sequence gives alone.
//! - Multi-head tensors are `[tokens, heads * head_dim]`, head-major within a row.
//! - Linear weights are `[out_features, in_features]` (PyTorch's `nn.Linear` layout) and
//!   linear ops compute `X · Wᵀ`.
//!
//! Gradient convention of the backward ops, which sit next to their forwards (as in llm.c):
//! parameter gradients accumulate (`+=`), activation gradients are overwritten (`=`), except
//! where they join the residual stream (or another sum of branches), where they accumulate;
//! ops that can do either take a [`Store`]. The base model is frozen, so no op computes a
//! gradient of a base weight, a norm weight or the embedding: backward needs activation
//! gradients, plus weight gradients of the LoRA matrices and heads only.

pub mod cpu;
pub mod cuda;
pub mod placement;

use crate::quant::nf4::Nf4Weight;

/// How an RMSNorm applies its learned weight to the normalised input `x̂ = x / rms(x)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormStyle {
    /// `w · x̂` (LLaMA).
    Weight,
    /// `(1 + w) · x̂` (Gemma 2/3: the stored weight is an offset from one).
    OnePlusWeight,
}

/// The gate activation of a gated MLP: `down(act(gate(x)) · up(x))`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// GELU with the tanh approximation (`gelu_pytorch_tanh`): GeGLU, Gemma.
    GeluTanh,
    /// `x · sigmoid(x)`: SwiGLU, LLaMA.
    Silu,
}

/// Whether an op overwrites its output or adds a scaled result to it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Store {
    /// `out = result`.
    Overwrite,
    /// `out += s · result` (LoRA's up-projection, merging adapters, gradients summed over
    /// branches).
    Accumulate(f32),
}

impl Store {
    /// The factor the result is stored with: 1 when overwriting, `s` when accumulating.
    pub fn factor(self) -> f32 {
        match self {
            Store::Overwrite => 1.0,
            Store::Accumulate(s) => s,
        }
    }
}

/// The storage of a linear weight on a device.
pub enum WeightData<B: Backend + ?Sized> {
    /// Plain f32, row-major `[out_features, in_features]`.
    Dense(B::Buf),
    /// bitsandbytes NF4 (packed nibbles and absmax tables), as the device holds it.
    Nf4(B::Nf4),
    /// A 16-bit copy ([`Backend::upload_half`]): only embedding tables so far, which the
    /// embedding op reads and no linear op takes.
    Half(B::Half),
    /// bf16 projection weights in the backend's packed layout (`--quant bf16`,
    /// [`Backend::upload_bf16`]: the CPU's `cpu::bf16::Bf16Weight`).
    Bf16(B::Bf16),
}

/// The half-precision buffer of a backend that has none (the CPU reference is f32 only; CUDA
/// has no bf16 projection weights): no value of it exists.
pub enum NoHalf {}

/// A linear weight `[out_features, in_features]`, whatever its storage.
pub struct Weight<B: Backend + ?Sized> {
    /// Rows of the weight: features the op produces.
    pub out_features: usize,
    /// Columns of the weight: features the op consumes.
    pub in_features: usize,
    /// The values.
    pub data: WeightData<B>,
}

/// A LoRA adapter as the adapted projection's ops take it ([`Backend::lora_linear`]):
/// `y = X·Wᵀ + s·(dropout(X)·Aᵀ)·Bᵀ` (`model::lora`).
pub struct LoraAdapter<'a, B: Backend + ?Sized> {
    /// Down-projection `A` [r, in], dense.
    pub a: &'a Weight<B>,
    /// Up-projection `B` [out, r], dense.
    pub b: &'a Weight<B>,
    /// `s`.
    pub scale: f32,
    /// PEFT's `lora_dropout` on the adapter's input while training: `(p, seed)`; `None` when
    /// off (inference, or p = 0).
    pub dropout: Option<(f32, u64)>,
}

/// Shape and masking of one attention call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionParams {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads; query head `h` reads key/value head `h / (heads / kv_heads)` (GQA).
    pub kv_heads: usize,
    /// Features per head (a config field, not `hidden / heads`).
    pub head_dim: usize,
    /// Multiplies `q · k` before soft-capping.
    pub scale: f32,
    /// If set, scores become `cap · tanh(score / cap)` before masking and softmax.
    pub softcap: Option<f32>,
    /// If set, query at position `q` sees keys `q - window < k <= q` only.
    pub window: Option<usize>,
}

/// The scalars of one AdamW update of one tensor (kernels/adamw.cu), computed by the host in
/// f64 as torch does and rounded to f32: `g = grad · grad_scale`, `p ← p · decay`,
/// `m ← m + one_minus_beta1 · (g − m)`, `v ← v · beta2 + one_minus_beta2 · g²`,
/// `p ← p − step_size · m / (√v / bias2_sqrt + eps)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    /// Multiplies the gradient first: `1 / loss scale` times the clipping factor.
    pub grad_scale: f32,
    /// `1 − lr · weight_decay`.
    pub decay: f32,
    pub one_minus_beta1: f32,
    pub beta2: f32,
    pub one_minus_beta2: f32,
    /// `√(1 − beta2ᵗ)`.
    pub bias2_sqrt: f32,
    pub eps: f32,
    /// `lr / (1 − beta1ᵗ)`.
    pub step_size: f32,
}

/// What a backend runs on and the most device memory it held: for command reports.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BackendInfo {
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// What the device is, e.g. "Tesla T4".
    pub name: String,
    /// High-water mark of the device memory the backend's pool held (none on the CPU).
    pub peak_reserved_bytes: Option<usize>,
}

impl std::fmt::Display for BackendInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}", self.device, self.name)?;
        if let Some(bytes) = self.peak_reserved_bytes {
            write!(f, ", peak {:.1} MiB", bytes as f64 / (1u64 << 20) as f64)?;
        }
        write!(f, ")")
    }
}

/// What a device allocation is for: the split of the memory report (`verdict train`'s
/// summary.json `memory`, BENCHMARKS.md's memory table). An allocation takes the use of the
/// innermost [`MemoryScope`] open when it is made ([`Backend::memory_scope`]), else
/// `Workspace`; the scopes are opened where the memory is asked for (model loading, the
/// adapters, the decoder's trace and recomputation, the head loss, the attention ops), so
/// tagging is one mechanism with its uses listed here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemoryUse {
    /// The frozen base: embedding table, norm weights, (NF4) projections.
    Weights,
    /// LoRA matrices and heads with their gradient buffers and AdamW's moments (on the
    /// device, beside the parameters they update: `train::optimizer::DeviceAdamW`).
    Adapters,
    /// What the training forward keeps for backward: each layer's input and the last
    /// residual stream (with `--no-recompute-layers`, every layer's activations too).
    SavedActivations,
    /// The activations of the one layer the backward runs again from its saved input.
    Recomputation,
    /// The attention ops' own buffers (statistics, index arrays), not their inputs and outputs.
    Attention,
    /// Final-norm output, pooled rows, head logits and their gradients.
    LogitsLoss,
    /// Everything else: forward temporaries, activation gradients, ops' index arrays.
    Workspace,
}

impl MemoryUse {
    /// Every use, in report order.
    pub const ALL: [MemoryUse; 7] = [
        MemoryUse::Weights,
        MemoryUse::Adapters,
        MemoryUse::SavedActivations,
        MemoryUse::Recomputation,
        MemoryUse::Attention,
        MemoryUse::LogitsLoss,
        MemoryUse::Workspace,
    ];

    /// The name in reports (as serialised).
    pub fn name(self) -> &'static str {
        match self {
            MemoryUse::Weights => "weights",
            MemoryUse::Adapters => "adapters",
            MemoryUse::SavedActivations => "saved_activations",
            MemoryUse::Recomputation => "recomputation",
            MemoryUse::Attention => "attention",
            MemoryUse::LogitsLoss => "logits_loss",
            MemoryUse::Workspace => "workspace",
        }
    }

    /// Its index in [`MemoryUse::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// While alive, allocations of its backend are tagged with its [`MemoryUse`]; dropping it
/// restores the use that was open before (scopes nest). A backend without a device (the CPU)
/// hands out scopes that do nothing.
#[must_use = "a scope tags allocations only while it is alive"]
pub struct MemoryScope<'a> {
    slot: Option<(&'a std::sync::atomic::AtomicU8, u8)>,
}

impl<'a> MemoryScope<'a> {
    /// A scope that tags nothing.
    pub fn none() -> MemoryScope<'static> {
        MemoryScope { slot: None }
    }

    /// Opens `use_` in `current` (the backend's current use) until dropped.
    pub fn enter(current: &'a std::sync::atomic::AtomicU8, use_: MemoryUse) -> MemoryScope<'a> {
        let before = current.swap(use_ as u8, std::sync::atomic::Ordering::Relaxed);
        MemoryScope {
            slot: Some((current, before)),
        }
    }

    /// The use `current` holds.
    pub fn current(current: &std::sync::atomic::AtomicU8) -> MemoryUse {
        let i = current.load(std::sync::atomic::Ordering::Relaxed) as usize;
        MemoryUse::ALL
            .get(i)
            .copied()
            .unwrap_or(MemoryUse::Workspace)
    }
}

impl Drop for MemoryScope<'_> {
    fn drop(&mut self) {
        if let Some((current, before)) = self.slot {
            current.store(before, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// Device memory by use: now, and at the moment the pool's in-use bytes were highest.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MemoryReport {
    /// The pool's high-water mark of bytes in use (blocks handed out, at their rounded size).
    pub peak_in_use_bytes: usize,
    /// The high-water mark of bytes the pool held (in use + cached for reuse): what the
    /// device had to give.
    pub peak_reserved_bytes: usize,
    /// At the in-use high-water mark: bytes in use per [`MemoryUse`] (they sum to
    /// `peak_in_use_bytes`).
    pub at_peak: MemoryByUse,
    /// Whether the device computed values (false under `--emu-alloc-only`: allocations are
    /// real, kernels did not run).
    pub values_computed: bool,
}

/// Bytes per [`MemoryUse`], one field each (named as [`MemoryUse::name`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemoryByUse {
    pub weights: usize,
    pub adapters: usize,
    pub saved_activations: usize,
    pub recomputation: usize,
    pub attention: usize,
    pub logits_loss: usize,
    pub workspace: usize,
}

impl MemoryByUse {
    /// From bytes indexed by [`MemoryUse::index`].
    pub fn from_indexed(bytes: &[usize; MemoryUse::ALL.len()]) -> MemoryByUse {
        let b = |u: MemoryUse| bytes[u.index()];
        MemoryByUse {
            weights: b(MemoryUse::Weights),
            adapters: b(MemoryUse::Adapters),
            saved_activations: b(MemoryUse::SavedActivations),
            recomputation: b(MemoryUse::Recomputation),
            attention: b(MemoryUse::Attention),
            logits_loss: b(MemoryUse::LogitsLoss),
            workspace: b(MemoryUse::Workspace),
        }
    }

    /// The bytes of `use_`.
    pub fn get(&self, use_: MemoryUse) -> usize {
        match use_ {
            MemoryUse::Weights => self.weights,
            MemoryUse::Adapters => self.adapters,
            MemoryUse::SavedActivations => self.saved_activations,
            MemoryUse::Recomputation => self.recomputation,
            MemoryUse::Attention => self.attention,
            MemoryUse::LogitsLoss => self.logits_loss,
            MemoryUse::Workspace => self.workspace,
        }
    }

    /// The sum over every use.
    pub fn total(&self) -> usize {
        MemoryUse::ALL.iter().map(|&u| self.get(u)).sum()
    }
}

impl MemoryReport {
    /// A table: one line per use (GiB and share of the peak), then the peaks.
    pub fn table(&self) -> String {
        let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
        let mut out = String::new();
        for use_ in MemoryUse::ALL {
            let bytes = self.at_peak.get(use_);
            out.push_str(&format!(
                "  {:<18} {:>8.3} GiB {:>5.1}%\n",
                use_.name(),
                gib(bytes),
                100.0 * bytes as f64 / self.peak_in_use_bytes.max(1) as f64
            ));
        }
        out.push_str(&format!(
            "  {:<18} {:>8.3} GiB (reserved by the pool: {:.3} GiB)\n",
            "peak in use",
            gib(self.peak_in_use_bytes),
            gib(self.peak_reserved_bytes)
        ));
        out
    }
}

/// A device that runs the ops. Buffers are flat f32 arrays; every op is told its shapes.
pub trait Backend: Sync {
    /// A device array of f32.
    type Buf: Send + Sync;
    /// A device copy of an NF4 weight.
    type Nf4: Send + Sync;
    /// A device array in the device's half type ([`WeightData::Half`]).
    type Half: Send + Sync;
    /// A bf16 projection weight packed for the backend's linear product
    /// ([`WeightData::Bf16`]).
    type Bf16: Send + Sync;
    /// An activation kept from the forward for the backward ([`Backend::keep`]).
    type Kept: Send + Sync;

    /// The first error an op met. Ops return no `Result`: a backend whose ops can fail (CUDA:
    /// out of memory, a kernel fault) stores the first error and skips later ops, so callers
    /// check after each batch. The default is for backends whose ops cannot fail that way.
    fn check(&self) -> anyhow::Result<()> {
        Ok(())
    }
    /// The device and its memory high-water mark so far.
    fn describe(&self) -> BackendInfo;
    /// Tags the device allocations made while the returned scope lives with `use_` (see
    /// [`MemoryUse`]). The default (no device memory) tags nothing.
    fn memory_scope(&self, use_: MemoryUse) -> MemoryScope<'_> {
        let _ = use_;
        MemoryScope::none()
    }
    /// The device memory by use at the pool's high-water mark; `None` without device memory.
    fn memory_report(&self) -> Option<MemoryReport> {
        None
    }
    /// Whether the ops compute values. False only on an emulated device under
    /// `--emu-alloc-only`, whose allocations are real but whose kernels never run: callers
    /// that would read results (losses, gradients, parameters, predictions) must not, and a
    /// download there is refused with an error.
    fn computes_values(&self) -> bool {
        true
    }
    /// Whether gradients pass through f16 on this device (sm_75's f16 tensor-core operands,
    /// range 6e-8 .. 65504), so that training scales the loss (`train::scaler`, DESIGN §5).
    /// False for f32 (the CPU) and bf16 (sm_80+: f32's exponent range).
    fn gradients_in_f16(&self) -> bool {
        false
    }

    /// Copies host values to a new device buffer.
    fn upload(&self, host: &[f32]) -> Self::Buf;
    /// Moves an NF4 weight to the device.
    fn upload_nf4(&self, weight: Nf4Weight) -> Self::Nf4;
    /// [`Backend::upload`] of a vector the caller gives up (the CPU keeps it: no copy, so a
    /// loaded tensor never exists twice).
    fn upload_vec(&self, host: Vec<f32>) -> Self::Buf {
        self.upload(&host)
    }
    /// `host` rounded (to nearest even) to a 16-bit type, in a new device buffer (CUDA: f16,
    /// or bf16 when a value is beyond f16's range: its `upload_half`). `None` where the
    /// backend keeps f32 only (the CPU reference).
    fn upload_half(&self, host: &[f32]) -> Option<Self::Half> {
        let _ = host;
        None
    }
    /// A row-major `[out_features, in_features]` weight rounded to bf16 and packed for the
    /// linear ops ([`WeightData::Bf16`]); `None` where the backend has no bf16 products.
    fn upload_bf16(
        &self,
        host: &[f32],
        out_features: usize,
        in_features: usize,
    ) -> Option<Self::Bf16> {
        let _ = (host, out_features, in_features);
        None
    }
    /// A copy of the activation `x` (rows of width `dim`) kept for the backward: each layer's
    /// input, which per-layer recomputation starts from. The CPU keeps f32; CUDA keeps the
    /// card's 16-bit type (f16 on sm_75, bf16 on sm_80+) with a power-of-two scale per row,
    /// which holds the residual stream's range (kernels/saved.cu; DESIGN §5).
    fn keep(&self, x: &Self::Buf, dim: usize) -> Self::Kept;
    /// The f32 values of a kept activation, in a new buffer.
    fn restore(&self, kept: &Self::Kept) -> Self::Buf;
    /// A new device buffer of `len` zeros.
    fn zeros(&self, len: usize) -> Self::Buf;
    /// A new device buffer of `len` zeros in the device's 16-bit activation type (DESIGN §5:
    /// CUDA's tensor-core operand type, f16 on sm_75 and bf16 on sm_80+), for the activations
    /// the decoder stores between ops when it runs mixed precision: normed inputs, q, k, v,
    /// attention output, gate, up and the gated activation. The ops that take activations
    /// read and write either type and compute in f32; the residual stream, gradients, norm
    /// and attention statistics stay f32 buffers ([`Backend::zeros`]). `None` where the
    /// backend is f32 only (the CPU reference).
    fn zeros_half(&self, len: usize) -> Option<Self::Buf> {
        let _ = len;
        None
    }
    /// Copies a device buffer back to the host (16-bit values widened exactly).
    fn download(&self, buf: &Self::Buf) -> Vec<f32>;
    /// A new device buffer equal to `buf`.
    fn copy(&self, buf: &Self::Buf) -> Self::Buf;

    /// `out[t] = scale · table[ids[t]]`, rows of width `dim`, computed in f32 from a table
    /// held in f32 ([`WeightData::Dense`]) or in the device's half type
    /// ([`WeightData::Half`]); never NF4.
    fn embedding(
        &self,
        out: &mut Self::Buf,
        table: &WeightData<Self>,
        ids: &[u32],
        dim: usize,
        scale: f32,
    );

    /// Row-wise RMSNorm over rows of width `dim`, computed in f32:
    /// `out = x / sqrt(mean(x²) + eps) · w` or `· (1 + w)` as `style` says.
    fn rmsnorm(
        &self,
        out: &mut Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        dim: usize,
        eps: f32,
        style: NormStyle,
    );

    /// `out = X · Wᵀ` or `out += s · X · Wᵀ` for `rows` rows of `X` (`[rows, in]` -> `[rows, out]`).
    fn linear(
        &self,
        out: &mut Self::Buf,
        x: &Self::Buf,
        w: &Weight<Self>,
        rows: usize,
        store: Store,
    );

    /// Rotary position embedding in place, rotate_half layout: for each head, feature `i` of
    /// the first half pairs with feature `i + head_dim / 2` and both turn by
    /// `positions[t] · inv_freq[i]`. `inv_freq` has `head_dim / 2` entries.
    fn rope(
        &self,
        x: &mut Self::Buf,
        positions: &[u32],
        inv_freq: &[f32],
        heads: usize,
        head_dim: usize,
    );

    /// Causal softmax attention over a packed batch: `out = softmax(mask(cap(scale · Q·Kᵀ))) · V`
    /// per sequence of `cu_seqlens` and per head. `q`/`out` are `[tokens, heads · head_dim]`,
    /// `k`/`v` are `[tokens, kv_heads · head_dim]`. Also writes `lse` (`[tokens, heads]`): each
    /// row's log-sum-exp of its capped, masked scores (natural log), which
    /// [`Backend::attention_backward`] recomputes the probabilities from (flash attention's
    /// way: no `S x S` matrix is ever kept).
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        out: &mut Self::Buf,
        lse: &mut Self::Buf,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        cu_seqlens: &[usize],
        params: &AttentionParams,
    );

    /// Gated activation: `out = act(gate) · up`, elementwise.
    fn gated_activation(
        &self,
        out: &mut Self::Buf,
        gate: &Self::Buf,
        up: &Self::Buf,
        act: Activation,
    );

    /// Residual add: `acc += x`, elementwise.
    fn add(&self, acc: &mut Self::Buf, x: &Self::Buf);

    /// `x = cap · tanh(x / cap)`, elementwise (Gemma 2's final logit soft-cap).
    fn softcap(&self, x: &mut Self::Buf, cap: f32);

    /// `out[i] = x[rows[i]]`, rows of width `dim` (pooling the classified token of each sequence).
    fn gather_rows(&self, out: &mut Self::Buf, x: &Self::Buf, rows: &[usize], dim: usize);

    // Backward ops and training-only ops.

    /// Backward of [`Backend::rmsnorm`] w.r.t. `x` only (norm weights are frozen), stored
    /// into `dx` as `store` says.
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_backward(
        &self,
        dx: &mut Self::Buf,
        dy: &Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        dim: usize,
        eps: f32,
        style: NormStyle,
        store: Store,
    );

    /// Input gradient of [`Backend::linear`]: `dX = dY · W` or `dX += s · dY · W`
    /// (`[rows, out]` -> `[rows, in]`), whatever the weight's storage.
    fn linear_backward(
        &self,
        dx: &mut Self::Buf,
        dy: &Self::Buf,
        w: &Weight<Self>,
        rows: usize,
        store: Store,
    );

    /// Weight gradient of a trained (dense) linear weight: `dW += s · dYᵀ · X`, with
    /// `dY` `[rows, out]`, `X` `[rows, in]`, `dW` `[out, in]`.
    #[allow(clippy::too_many_arguments)]
    fn linear_weight_grad(
        &self,
        dw: &mut Self::Buf,
        dy: &Self::Buf,
        x: &Self::Buf,
        rows: usize,
        in_features: usize,
        out_features: usize,
        scale: f32,
    );

    /// The adapted projection's forward (fused LoRA, DESIGN §6): `out = X·Wᵀ +
    /// s·(dropout(X)·Aᵀ)·Bᵀ` for `rows` rows, overwritten. The default composes the ops above
    /// (the CPU reference: a dropped copy of X, the rank-r factor, two products into `out`);
    /// CUDA adds the LoRA term inside the NF4 product and drops X's elements as the down
    /// product reads them (no copy).
    fn lora_linear(
        &self,
        out: &mut Self::Buf,
        x: &Self::Buf,
        w: &Weight<Self>,
        lora: &LoraAdapter<Self>,
        rows: usize,
    ) {
        self.linear(out, x, w, rows, Store::Overwrite);
        let dropped = lora.dropout.map(|(p, seed)| {
            let mut dropped = self.copy(x);
            self.dropout(&mut dropped, p, seed);
            dropped
        });
        let lora_x = dropped.as_ref().unwrap_or(x);
        let mut down = self.zeros(rows * lora.a.out_features);
        self.linear(&mut down, lora_x, lora.a, rows, Store::Overwrite);
        self.linear(out, &down, lora.b, rows, Store::Accumulate(lora.scale));
    }

    /// Backward of [`Backend::lora_linear`] (same `x`, `rows`, dropout): the input gradient
    /// `dY·W + s·dropout(dY·B·A)` into `dx` as `store` says, `da += s·(dY·B)ᵀ·dropout(X)`,
    /// `db += s·dYᵀ·(dropout(X)·Aᵀ)`; the frozen `W` gets none. The rank-r factor is
    /// recomputed, not kept. The default composes the ops above (the CPU reference).
    #[allow(clippy::too_many_arguments)]
    fn lora_linear_backward(
        &self,
        dx: &mut Self::Buf,
        dy: &Self::Buf,
        x: &Self::Buf,
        w: &Weight<Self>,
        lora: &LoraAdapter<Self>,
        rows: usize,
        store: Store,
        [da, db]: [&mut Self::Buf; 2],
    ) {
        self.linear_backward(dx, dy, w, rows, store);
        let (r, in_f, out_f) = (lora.a.out_features, lora.a.in_features, lora.b.out_features);
        let dropped = lora.dropout.map(|(p, seed)| {
            let mut dropped = self.copy(x);
            self.dropout(&mut dropped, p, seed);
            dropped
        });
        let lora_x = dropped.as_ref().unwrap_or(x);
        let mut down = self.zeros(rows * r);
        self.linear(&mut down, lora_x, lora.a, rows, Store::Overwrite);
        self.linear_weight_grad(db, dy, &down, rows, r, out_f, lora.scale);
        let mut d_down = self.zeros(rows * r);
        self.linear_backward(&mut d_down, dy, lora.b, rows, Store::Overwrite);
        self.linear_weight_grad(da, &d_down, lora_x, rows, in_f, r, lora.scale);
        // The LoRA term joins dx with the store's own factor.
        let term = Store::Accumulate(lora.scale * store.factor());
        match lora.dropout {
            Some((p, seed)) => {
                let mut d_lora_x = self.zeros(rows * in_f);
                self.linear_backward(&mut d_lora_x, &d_down, lora.a, rows, term);
                self.dropout(&mut d_lora_x, p, seed);
                self.add(dx, &d_lora_x);
            }
            None => self.linear_backward(dx, &d_down, lora.a, rows, term),
        }
    }

    /// Backward of [`Backend::rope`], in place on the gradient: the inverse rotation.
    fn rope_backward(
        &self,
        dx: &mut Self::Buf,
        positions: &[u32],
        inv_freq: &[f32],
        heads: usize,
        head_dim: usize,
    );

    /// Backward of [`Backend::attention`]: `dq`, `dk`, `dv` overwritten from `dout`; `dk`/`dv`
    /// sum over the query heads of each GQA group. `out` and `lse` are what the forward wrote
    /// for these q, k, v: the probabilities are `exp(capped score - lse)`, and the softmax's
    /// row term `rowsum(P ∘ dP)` may be taken as `rowsum(dout ∘ out)` (the CUDA kernels do).
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        dq: &mut Self::Buf,
        dk: &mut Self::Buf,
        dv: &mut Self::Buf,
        dout: &Self::Buf,
        out: &Self::Buf,
        lse: &Self::Buf,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        cu_seqlens: &[usize],
        params: &AttentionParams,
    );

    /// Backward of [`Backend::gated_activation`]: `dgate`, `dup` overwritten.
    fn gated_activation_backward(
        &self,
        dgate: &mut Self::Buf,
        dup: &mut Self::Buf,
        dout: &Self::Buf,
        gate: &Self::Buf,
        up: &Self::Buf,
        act: Activation,
    );

    /// Backward of [`Backend::gather_rows`]: `acc[rows[i]] += x[i]`.
    fn scatter_add_rows(&self, acc: &mut Self::Buf, x: &Self::Buf, rows: &[usize], dim: usize);

    /// Inverted dropout in place, `x = x · mask / (1 - p)`, the mask a function of `(seed,
    /// element index)`: the same call is the forward and, on the gradient, the backward.
    fn dropout(&self, x: &mut Self::Buf, p: f32, seed: u64);

    /// One AdamW update of a trainable tensor in place: `param` and its moments `m`, `v` from
    /// `grad` (see [`AdamWStep`]).
    fn adamw(
        &self,
        param: &mut Self::Buf,
        grad: &Self::Buf,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
        step: &AdamWStep,
    );

    /// The sum of squares of each of `xs` (f32 sums on a device, f64 on the CPU), read back
    /// together: the global gradient norm without downloading the gradients. Not finite
    /// when a tensor holds a non-finite value.
    fn squared_norms(&self, xs: &[&Self::Buf]) -> Vec<f64>;

    /// Softmax cross-entropy of `[rows, classes]` logits against `labels` (`None`: no loss,
    /// no gradient), with torch's label smoothing; returns each row's loss on the host and
    /// writes `dlogits = weight · (softmax - target)`.
    fn softmax_cross_entropy(
        &self,
        dlogits: &mut Self::Buf,
        logits: &Self::Buf,
        labels: &[Option<u32>],
        classes: usize,
        smoothing: f32,
        weight: f32,
    ) -> Vec<f32>;
}
