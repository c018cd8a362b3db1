//! The decoder, written once for Gemma 2, Gemma 3 and LLaMA: token ids -> final-norm hidden
//! states. Every family difference is a field of [`DecoderSpec`]; every computation is an
//! op of the backend. Reads top to bottom: batch -> layer (forward, then its backward) ->
//! decoder (inference forward, training forward, backward) -> loading.
//!
//! One layer, with the optional parts in brackets:
//! ```text
//! x  = norm(h)                                  input_layernorm
//! q, k, v = x·Wqᵀ, x·Wkᵀ, x·Wvᵀ                  (+ LoRA)
//! [q, k = norm_head(q), norm_head(k)]           Gemma 3 QK-norm, over head_dim
//! q, k = rope(q), rope(k)                       per-layer base and scaling
//! a  = attention(q, k, v)·Woᵀ                   causal, [window], [soft-cap], GQA
//! h += [norm](a)                                Gemma: post_attention_layernorm
//! x  = norm(h)                                  Gemma: pre_feedforward_layernorm,
//!                                               LLaMA: (misnamed) post_attention_layernorm
//! m  = down(act(gate(x)) · up(x))               GeGLU / SwiGLU
//! h += [norm](m)                                Gemma: post_feedforward_layernorm
//! ```
//! and around the layers: `h = embed(ids) · scale`, output `norm(h)` (`model.norm`).
//!
//! Training (explicit backward, as in llm.c): the base is frozen, so the layer backward
//! computes activation gradients, walking the lines above bottom to top, and only the LoRA
//! matrices get parameter gradients; the embedding, first op of the forward, gets none.
//! Per-layer activation checkpointing: the training forward keeps each layer's input, and
//! the backward runs the layer's forward again from it (same dropout masks) before its
//! backward; `recompute_layers: false` keeps every layer's activations instead.
//!
//! The frozen prefix: layers below the lowest one with an adapter (PEFT's
//! `layers_to_transform`) have nothing to train, so training keeps nothing of them and
//! backward stops above them; a [`PrefixCache`] can hold their output per sequence, which
//! turns every epoch after the first (and every cross-validation fold after the first) into
//! work on the adapted layers only.

use crate::backend::{AttentionParams, Backend, MemoryUse, Store, Weight, WeightData};
use crate::model::config::DecoderSpec;
use crate::model::lora::{dense_weight_from_vec, Linear, Lora, LoraGrads};
use crate::model::peft::{Adapter, Projection};
use crate::model::weights::{Checkpoint, Dtype};
use crate::quant::nf4::Nf4Weight;
use crate::quant::Quant;
use crate::rng::Rng;
use anyhow::{ensure, Context, Result};
use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

/// Sequences packed back to back without padding (the variable-length layout).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedBatch {
    /// All token ids, sequence after sequence.
    pub ids: Vec<u32>,
    /// Sequence `s` owns tokens `cu_seqlens[s]..cu_seqlens[s + 1]`.
    pub cu_seqlens: Vec<usize>,
    /// Position of each token within its sequence.
    pub positions: Vec<u32>,
}

impl PackedBatch {
    /// Packs `sequences`; each must be non-empty.
    pub fn new<S: AsRef<[u32]>>(sequences: &[S]) -> PackedBatch {
        let mut batch = PackedBatch {
            ids: Vec::new(),
            cu_seqlens: vec![0],
            positions: Vec::new(),
        };
        for seq in sequences {
            let seq = seq.as_ref();
            assert!(!seq.is_empty(), "PackedBatch: empty sequence");
            batch.ids.extend_from_slice(seq);
            batch.positions.extend(0..seq.len() as u32);
            batch.cu_seqlens.push(batch.ids.len());
        }
        batch
    }

    /// Total tokens.
    pub fn tokens(&self) -> usize {
        self.ids.len()
    }

    /// The ids of sequence `s`.
    pub fn sequence(&self, s: usize) -> &[u32] {
        &self.ids[self.cu_seqlens[s]..self.cu_seqlens[s + 1]]
    }

    /// Number of sequences.
    pub fn sequences(&self) -> usize {
        self.cu_seqlens.len() - 1
    }
}

/// One decoder layer's parameters; optional parts are absent in families without them.
struct Layer<B: Backend> {
    input_norm: B::Buf,
    q_proj: Linear<B>,
    k_proj: Linear<B>,
    v_proj: Linear<B>,
    o_proj: Linear<B>,
    /// Gemma 3: (q_norm, k_norm), weights [head_dim].
    qk_norm: Option<(B::Buf, B::Buf)>,
    post_attn_norm: Option<B::Buf>,
    mlp_norm: B::Buf,
    gate_proj: Linear<B>,
    up_proj: Linear<B>,
    down_proj: Linear<B>,
    post_mlp_norm: Option<B::Buf>,
    attention: AttentionParams,
    /// RoPE inverse frequencies of this layer, [head_dim / 2].
    inv_freq: Vec<f32>,
}

impl<B: Backend> Layer<B> {
    fn projection(&self, p: Projection) -> &Linear<B> {
        match p {
            Projection::Q => &self.q_proj,
            Projection::K => &self.k_proj,
            Projection::V => &self.v_proj,
            Projection::O => &self.o_proj,
            Projection::Gate => &self.gate_proj,
            Projection::Up => &self.up_proj,
            Projection::Down => &self.down_proj,
        }
    }

    /// The seven projections, in [`Projection::ALL`] order.
    fn linears_mut(&mut self) -> [&mut Linear<B>; 7] {
        [
            &mut self.q_proj,
            &mut self.k_proj,
            &mut self.v_proj,
            &mut self.o_proj,
            &mut self.gate_proj,
            &mut self.up_proj,
            &mut self.down_proj,
        ]
    }
}

/// The decoder stack: embedding, layers, final norm.
pub struct Decoder<B: Backend> {
    /// The normalised configuration.
    pub spec: DecoderSpec,
    /// `embed_tokens` [vocab, hidden]; also the LM head when embeddings are tied.
    pub embed_tokens: Weight<B>,
    /// The factor the embedding is multiplied by.
    pub embed_scale: f32,
    layers: Vec<Layer<B>>,
    final_norm: B::Buf,
    /// Output of the frozen prefix, per sequence (see [`Decoder::attach_prefix_cache`]).
    prefix_cache: Option<Arc<PrefixCache>>,
}

/// How [`Decoder`] stores a tensor a layer makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Storage {
    /// An activation inside a layer (normed projection inputs, q, k, v, the attention
    /// output, gate, up, the gated activation): in the backend's 16-bit type where it has one
    /// ([`Backend::zeros_half`]: CUDA), f32 on the CPU. DESIGN §5: normed inputs stay within
    /// f16's range, and the products and attention round them to the tensor-core operand
    /// type anyway, so storing them rounded halves their memory for one more rounding of
    /// the few ops that read them in f32 (norms, rope, the gated activation).
    Activation,
    /// f32 always: what joins the residual stream (o and down outputs, post-norms), the
    /// residual stream itself, gradients and statistics.
    F32,
}

/// The residual stream at the top of a decoder's frozen prefix, per token sequence, on the
/// host. Exact: the prefix has no adapter, hence no dropout, so a training forward and an
/// inference forward give it the same bits. Shared (behind an `Arc`) by the models of a
/// cross-validation, which differ in their adapters only.
#[derive(Default)]
pub struct PrefixCache {
    /// (prefix layers, hidden size), fixed by the first decoder it is attached to.
    shape: OnceLock<(usize, usize)>,
    rows: Mutex<HashMap<Vec<u32>, Arc<[f32]>>>,
    /// Where the cache is kept between processes (`--prefix-cache-file`), with what it was
    /// computed from and how many sequences the file holds.
    file: Option<CacheFile>,
}

struct CacheFile {
    path: PathBuf,
    origin: OnceLock<String>,
    saved: Mutex<usize>,
}

/// First line of a prefix cache file; the format: this line, a JSON header line
/// (origin, layers, hidden size, sequences), then per sequence its length `n` (u32), `n` ids
/// (u32) and `n × hidden` f32 values, all little-endian.
const CACHE_MAGIC: &str = "verdict prefix cache 1";

#[derive(serde::Serialize, serde::Deserialize)]
struct CacheHeader {
    origin: String,
    layers: usize,
    hidden: usize,
    sequences: usize,
}

impl PrefixCache {
    /// A cache also kept in `path`: [`PrefixCache::open`] loads it, [`PrefixCache::save`]
    /// writes it back when it has grown.
    pub fn with_file(path: PathBuf) -> PrefixCache {
        PrefixCache {
            file: Some(CacheFile {
                path,
                origin: OnceLock::new(),
                saved: Mutex::new(0),
            }),
            ..PrefixCache::default()
        }
    }

    /// Loads the cache file, if there is one and it exists, the first time; `origin` says
    /// what the prefix was computed from (model files, quantization, device), and a file
    /// from anything else is refused, since its hidden states would be silently wrong.
    pub fn open(&self, origin: &str) -> Result<()> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        let first = file.origin.get().is_none();
        let have = file.origin.get_or_init(|| origin.to_string());
        ensure!(
            have == origin,
            "{}: one prefix cache serves one model; it holds {have}, asked for {origin}",
            file.path.display()
        );
        if !first || !file.path.exists() {
            return Ok(());
        }
        let path = &file.path;
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let mut lines = bytes.splitn(3, |&b| b == b'\n');
        let (magic, header, mut body) = (lines.next(), lines.next(), lines.next().unwrap_or(&[]));
        ensure!(
            magic == Some(CACHE_MAGIC.as_bytes()),
            "{}: not a verdict prefix cache file",
            path.display()
        );
        let header: CacheHeader = serde_json::from_slice(header.unwrap_or(&[]))
            .with_context(|| format!("{}: unreadable header", path.display()))?;
        ensure!(
            header.origin == origin,
            "{} was computed from {}, not from {origin}; delete it or give another file",
            path.display(),
            header.origin
        );
        let shape = *self.shape.get_or_init(|| (header.layers, header.hidden));
        ensure!(
            shape == (header.layers, header.hidden),
            "{}: a prefix of {} layers of width {}, but this cache holds {} layers of width {}",
            path.display(),
            header.layers,
            header.hidden,
            shape.0,
            shape.1
        );
        let mut take = |n: usize, what: &str, s: usize| -> Result<&[u8]> {
            ensure!(
                body.len() >= n,
                "{}: truncated in sequence {s} of {} ({what})",
                path.display(),
                header.sequences
            );
            let (head, rest) = body.split_at(n);
            body = rest;
            Ok(head)
        };
        let mut rows = self.rows.lock().expect("prefix cache lock");
        for s in 0..header.sequences {
            let n = u32::from_le_bytes(take(4, "length", s)?.try_into().expect("4 bytes")) as usize;
            let ids = take(4 * n, "ids", s)?
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect();
            let hidden: Arc<[f32]> = take(4 * n * header.hidden, "hidden states", s)?
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect();
            rows.insert(ids, hidden);
        }
        ensure!(
            body.is_empty(),
            "{}: {} bytes after the last of {} sequences",
            path.display(),
            body.len(),
            header.sequences
        );
        *file.saved.lock().expect("prefix cache lock") = rows.len();
        Ok(())
    }

    /// Writes the cache file (atomically) if sequences were added since it was loaded or
    /// last saved.
    pub fn save(&self) -> Result<()> {
        let (Some(file), Some(&(layers, hidden))) = (&self.file, self.shape.get()) else {
            return Ok(());
        };
        let rows = self.rows.lock().expect("prefix cache lock");
        let mut saved = file.saved.lock().expect("prefix cache lock");
        if *saved == rows.len() {
            return Ok(());
        }
        let header = CacheHeader {
            origin: file.origin.get().cloned().unwrap_or_default(),
            layers,
            hidden,
            sequences: rows.len(),
        };
        // Sorted, so the same cache always writes the same bytes.
        let mut keys: Vec<&Vec<u32>> = rows.keys().collect();
        keys.sort_unstable();
        crate::atomic::write_with(&file.path, |w| {
            writeln!(w, "{CACHE_MAGIC}")?;
            writeln!(w, "{}", serde_json::to_string(&header)?)?;
            for ids in keys {
                w.write_all(&(ids.len() as u32).to_le_bytes())?;
                for id in ids {
                    w.write_all(&id.to_le_bytes())?;
                }
                for x in rows[ids].iter() {
                    w.write_all(&x.to_le_bytes())?;
                }
            }
            Ok(())
        })?;
        *saved = rows.len();
        Ok(())
    }

    /// Bytes of hidden states held.
    pub fn bytes(&self) -> usize {
        let rows = self.rows.lock().expect("prefix cache lock");
        rows.values().map(|r| r.len() * 4).sum()
    }

    /// The prefix output of `batch`: sequences not yet held are run through `compute` (one
    /// packed batch of them) and kept.
    fn hidden<B: Backend>(
        &self,
        backend: &B,
        batch: &PackedBatch,
        compute: impl Fn(&PackedBatch) -> B::Buf,
    ) -> B::Buf {
        let hidden_size = self.shape.get().expect("an attached prefix cache").1;
        let mut rows = self.rows.lock().expect("prefix cache lock");
        let mut missing: Vec<&[u32]> = (0..batch.sequences())
            .map(|s| batch.sequence(s))
            .filter(|seq| !rows.contains_key(*seq))
            .collect();
        missing.sort_unstable();
        missing.dedup();
        if !missing.is_empty() {
            let sub = PackedBatch::new(&missing);
            let h = backend.download(&compute(&sub));
            for (s, seq) in missing.iter().enumerate() {
                let span = sub.cu_seqlens[s] * hidden_size..sub.cu_seqlens[s + 1] * hidden_size;
                rows.insert(seq.to_vec(), h[span].into());
            }
        }
        let mut h = Vec::with_capacity(batch.tokens() * hidden_size);
        for s in 0..batch.sequences() {
            h.extend_from_slice(&rows[batch.sequence(s)]);
        }
        backend.upload_vec(h)
    }
}

/// What a layer's backward reads from its forward (the layer's input is kept apart: it is
/// all that activation checkpointing keeps).
struct LayerActivations<B: Backend> {
    /// `input_norm(h)`: the input of q, k, v.
    x_attn: B::Buf,
    /// Gemma 3: q and k before QK-norm.
    qk_raw: Option<(B::Buf, B::Buf)>,
    /// Attention's inputs, after RoPE.
    q: B::Buf,
    k: B::Buf,
    v: B::Buf,
    /// Attention's output: the input of o_proj.
    attn: B::Buf,
    /// Attention's log-sum-exp per (token, head), which its backward recomputes from.
    attn_lse: B::Buf,
    /// o_proj's output: the input of the post-attention norm, when there is one.
    attn_out: B::Buf,
    /// The residual stream between attention and MLP.
    h_mid: B::Buf,
    /// `mlp_norm(h_mid)`: the input of gate and up.
    x_mlp: B::Buf,
    gate: B::Buf,
    up: B::Buf,
    /// `act(gate) · up`: the input of down.
    act: B::Buf,
    /// down's output: the input of the post-MLP norm, when there is one.
    mlp_out: B::Buf,
}

/// What the training forward keeps for [`Decoder::backward`].
pub struct Trace<B: Backend> {
    /// The frozen prefix: layers below this one are not traced.
    first: usize,
    /// The input of each layer from `first` on (the residual stream before it), as the
    /// backend keeps activations for backward ([`Backend::keep`]: 16-bit on CUDA).
    inputs: Vec<B::Kept>,
    /// Each layer's activations; empty when layers are recomputed in backward.
    activations: Vec<LayerActivations<B>>,
    /// The input of the final norm.
    last: B::Buf,
    /// Seeds the LoRA dropout masks (the same in the recomputation and backward).
    dropout_seed: u64,
}

/// The LoRA dropout seed of projection `p` of layer `layer`: PEFT gives every adapted
/// projection its own dropout, so q, k and v see different masks of the same input.
fn projection_seed(seed: Option<u64>, layer: usize, p: Projection) -> Option<u64> {
    seed.map(|s| Rng::new(s ^ ((layer * Projection::ALL.len() + p as usize) as u64)).next_u64())
}

impl<B: Backend> Decoder<B> {
    /// Final-norm hidden states [tokens, hidden] of a packed batch (inference: no dropout,
    /// nothing kept).
    pub fn forward(&self, backend: &B, batch: &PackedBatch) -> B::Buf {
        self.run_forward(backend, batch, None).0
    }

    /// The training forward: final-norm hidden states with LoRA dropout (masks from
    /// `dropout_seed`), plus the [`Trace`] that [`Decoder::backward`] needs. With
    /// `recompute_layers`, only each layer's input is kept and backward runs the layer again
    /// (activation checkpointing); otherwise every layer's activations are kept.
    pub fn forward_train(
        &self,
        backend: &B,
        batch: &PackedBatch,
        dropout_seed: u64,
        recompute_layers: bool,
    ) -> (B::Buf, Trace<B>) {
        let (out, trace) = self.run_forward(backend, batch, Some((dropout_seed, recompute_layers)));
        (out, trace.expect("a training forward keeps a trace"))
    }

    /// The forward behind both: `training` is `(dropout seed, recompute_layers)`.
    fn run_forward(
        &self,
        backend: &B,
        batch: &PackedBatch,
        training: Option<(u64, bool)>,
    ) -> (B::Buf, Option<Trace<B>>) {
        let s = &self.spec;
        let n = batch.tokens();
        let first = self.frozen_prefix();
        // The residual stream ends up in the trace (`last`) when training.
        let kept = training.map(|_| backend.memory_scope(MemoryUse::SavedActivations));
        let mut h = match &self.prefix_cache {
            Some(cache) if first > 0 => {
                assert_eq!(
                    cache.shape.get(),
                    Some(&(first, s.hidden_size)),
                    "a prefix cache of another frozen prefix"
                );
                cache.hidden(backend, batch, |b| self.bottom(backend, b, first))
            }
            _ => self.bottom(backend, batch, first),
        };
        drop(kept);
        let mut inputs = Vec::new();
        let mut activations = Vec::new();
        for (i, layer) in self.layers.iter().enumerate().skip(first) {
            if training.is_some() {
                let _kept = backend.memory_scope(MemoryUse::SavedActivations);
                inputs.push(backend.keep(&h, s.hidden_size));
            }
            let seed = training.map(|(seed, _)| seed);
            let _kept = matches!(training, Some((_, false)))
                .then(|| backend.memory_scope(MemoryUse::SavedActivations));
            let acts = self.layer_forward(backend, layer, i, &mut h, batch, seed);
            if let Some((_, false)) = training {
                activations.push(acts);
            }
        }
        let out = self.norm(
            backend,
            &h,
            &self.final_norm,
            n,
            s.hidden_size,
            Storage::F32,
        );
        let trace = training.map(|(dropout_seed, _)| Trace {
            first,
            inputs,
            activations,
            last: h,
            dropout_seed,
        });
        (out, trace)
    }

    /// The residual stream after the embedding and the first `layers` layers (inference:
    /// what the frozen prefix computes).
    fn bottom(&self, backend: &B, batch: &PackedBatch, layers: usize) -> B::Buf {
        let s = &self.spec;
        let mut h = backend.zeros(batch.tokens() * s.hidden_size);
        backend.embedding(
            &mut h,
            &self.embed_tokens.data,
            &batch.ids,
            s.hidden_size,
            self.embed_scale,
        );
        for (i, layer) in self.layers.iter().enumerate().take(layers) {
            self.layer_forward(backend, layer, i, &mut h, batch, None);
        }
        h
    }

    /// The residual stream [tokens, hidden] after the bottom `layers` layers (HF's
    /// `hidden_states[layers]`), without the final norm.
    pub fn hidden_after(&self, backend: &B, batch: &PackedBatch, layers: usize) -> B::Buf {
        self.bottom(backend, batch, layers.min(self.layers.len()))
    }

    /// The number of bottom layers without any adapter: training neither keeps nor
    /// backpropagates through them.
    pub fn frozen_prefix(&self) -> usize {
        self.layers
            .iter()
            .position(|l| {
                Projection::ALL
                    .iter()
                    .any(|&p| l.projection(p).lora.is_some())
            })
            .unwrap_or(self.layers.len())
    }

    /// Keeps the frozen prefix's output per sequence in `cache` from now on. A cache serves
    /// decoders with the same prefix only (the first one it is attached to fixes it);
    /// adapters must not be added below the prefix afterwards.
    pub fn attach_prefix_cache(&mut self, cache: Arc<PrefixCache>) -> Result<()> {
        let want = (self.frozen_prefix(), self.spec.hidden_size);
        let have = *cache.shape.get_or_init(|| want);
        ensure!(
            have == want,
            "a prefix cache of {} layers of width {}; this decoder's frozen prefix is {} layers of width {}",
            have.0,
            have.1,
            want.0,
            want.1
        );
        self.prefix_cache = Some(cache);
        Ok(())
    }

    /// One layer (number `index`) on the residual stream `h`, in place; returns what its
    /// backward needs. `dropout_seed` is `Some` while training.
    fn layer_forward(
        &self,
        backend: &B,
        layer: &Layer<B>,
        index: usize,
        h: &mut B::Buf,
        batch: &PackedBatch,
        dropout_seed: Option<u64>,
    ) -> LayerActivations<B> {
        let s = &self.spec;
        let n = batch.tokens();
        let (heads, kv_heads, d) = (s.num_heads, s.num_kv_heads, s.head_dim);
        // Projection `p` of `x`, with its LoRA (and that projection's dropout mask).
        // Its output joins the residual stream (o, down) or feeds the next op (the others).
        let project = |p, x: &B::Buf| {
            let seed = projection_seed(dropout_seed, index, p);
            let linear = layer.projection(p);
            let storage = match p {
                Projection::O | Projection::Down => Storage::F32,
                _ => Storage::Activation,
            };
            let mut out = self.buffer(backend, n * linear.weight.out_features, storage);
            linear.forward(backend, &mut out, x, n, seed);
            out
        };
        let act = Storage::Activation;

        let x_attn = self.norm(backend, h, &layer.input_norm, n, s.hidden_size, act);
        let q = project(Projection::Q, &x_attn);
        let k = project(Projection::K, &x_attn);
        let v = project(Projection::V, &x_attn);
        let (mut q, mut k, qk_raw) = match &layer.qk_norm {
            Some((q_norm, k_norm)) => (
                self.norm(backend, &q, q_norm, n * heads, d, act),
                self.norm(backend, &k, k_norm, n * kv_heads, d, act),
                Some((q, k)),
            ),
            None => (q, k, None),
        };
        backend.rope(&mut q, &batch.positions, &layer.inv_freq, heads, d);
        backend.rope(&mut k, &batch.positions, &layer.inv_freq, kv_heads, d);
        let mut attn = self.buffer(backend, n * heads * d, act);
        let mut attn_lse = backend.zeros(n * heads);
        backend.attention(
            &mut attn,
            &mut attn_lse,
            &q,
            &k,
            &v,
            &batch.cu_seqlens,
            &layer.attention,
        );
        let attn_out = project(Projection::O, &attn);
        self.add_residual(backend, h, &attn_out, layer.post_attn_norm.as_ref(), n);
        let h_mid = backend.copy(h);

        let x_mlp = self.norm(backend, h, &layer.mlp_norm, n, s.hidden_size, act);
        let gate = project(Projection::Gate, &x_mlp);
        let up = project(Projection::Up, &x_mlp);
        let mut act = self.buffer(backend, n * s.intermediate_size, act);
        backend.gated_activation(&mut act, &gate, &up, s.activation);
        let mlp_out = project(Projection::Down, &act);
        self.add_residual(backend, h, &mlp_out, layer.post_mlp_norm.as_ref(), n);
        LayerActivations {
            x_attn,
            qk_raw,
            q,
            k,
            v,
            attn,
            attn_lse,
            attn_out,
            h_mid,
            x_mlp,
            gate,
            up,
            act,
            mlp_out,
        }
    }

    /// Backward of [`Decoder::layer_forward`]: `dh` holds the gradient of the layer's output
    /// and becomes that of its input (the residual stream carries it through; each branch
    /// adds its part). LoRA gradients accumulate into `grads` (indexed by [`Projection`]).
    #[allow(clippy::too_many_arguments)]
    fn layer_backward(
        &self,
        backend: &B,
        layer: &Layer<B>,
        index: usize,
        input: &B::Buf,
        a: &LayerActivations<B>,
        dh: &mut B::Buf,
        batch: &PackedBatch,
        dropout_seed: Option<u64>,
        grads: &mut [Option<LoraGrads<B>>; 7],
    ) {
        let s = &self.spec;
        let n = batch.tokens();
        let (heads, kv_heads, d, hidden) = (s.num_heads, s.num_kv_heads, s.head_dim, s.hidden_size);
        let seed = |p| projection_seed(dropout_seed, index, p);
        let add = Store::Accumulate(1.0);
        // Projection `p`'s backward: input gradient into `dx`, its adapter's into `grads[p]`.
        let mut project_back = |p: Projection, dy: &B::Buf, x: &B::Buf, dx: &mut B::Buf, store| {
            let grads = grads[p as usize].as_mut();
            layer
                .projection(p)
                .backward(backend, dy, x, n, seed(p), dx, store, grads);
        };

        // MLP block, last op first: h = h_mid + [post_norm](down(act(gate(x)) · up(x))).
        let d_mlp_out = self.branch_grad(backend, dh, &a.mlp_out, layer.post_mlp_norm.as_ref(), n);
        // The gradients of the wide activations (act, gate, up, the attention output) are
        // stored like the activations; the rest stay f32 (see `Storage`).
        let grad = Storage::Activation;
        let mut d_act = self.buffer(backend, n * s.intermediate_size, grad);
        let d_mlp_out = d_mlp_out.as_ref().unwrap_or(dh);
        project_back(
            Projection::Down,
            d_mlp_out,
            &a.act,
            &mut d_act,
            Store::Overwrite,
        );
        let mut d_gate = self.buffer(backend, n * s.intermediate_size, grad);
        let mut d_up = self.buffer(backend, n * s.intermediate_size, grad);
        backend.gated_activation_backward(
            &mut d_gate,
            &mut d_up,
            &d_act,
            &a.gate,
            &a.up,
            s.activation,
        );
        drop(d_act);
        let mut dx = backend.zeros(n * hidden);
        for (p, dy, store) in [
            (Projection::Gate, &d_gate, Store::Overwrite),
            (Projection::Up, &d_up, add),
        ] {
            project_back(p, dy, &a.x_mlp, &mut dx, store);
        }
        self.norm_backward(backend, dh, &dx, &a.h_mid, &layer.mlp_norm, hidden, add);

        // Attention block: h_mid = h + [post_norm](o(attention(rope(q), rope(k), v))).
        let d_attn_out =
            self.branch_grad(backend, dh, &a.attn_out, layer.post_attn_norm.as_ref(), n);
        let mut d_attn = self.buffer(backend, n * heads * d, grad);
        let d_attn_out = d_attn_out.as_ref().unwrap_or(dh);
        project_back(
            Projection::O,
            d_attn_out,
            &a.attn,
            &mut d_attn,
            Store::Overwrite,
        );
        let mut dq = backend.zeros(n * heads * d);
        let mut dk = backend.zeros(n * kv_heads * d);
        let mut dv = backend.zeros(n * kv_heads * d);
        backend.attention_backward(
            &mut dq,
            &mut dk,
            &mut dv,
            &d_attn,
            &a.attn,
            &a.attn_lse,
            &a.q,
            &a.k,
            &a.v,
            &batch.cu_seqlens,
            &layer.attention,
        );
        backend.rope_backward(&mut dq, &batch.positions, &layer.inv_freq, heads, d);
        backend.rope_backward(&mut dk, &batch.positions, &layer.inv_freq, kv_heads, d);
        if let (Some((q_norm, k_norm)), Some((q_raw, k_raw))) = (&layer.qk_norm, &a.qk_raw) {
            let mut dq_raw = backend.zeros(n * heads * d);
            let mut dk_raw = backend.zeros(n * kv_heads * d);
            self.norm_backward(
                backend,
                &mut dq_raw,
                &dq,
                q_raw,
                q_norm,
                d,
                Store::Overwrite,
            );
            self.norm_backward(
                backend,
                &mut dk_raw,
                &dk,
                k_raw,
                k_norm,
                d,
                Store::Overwrite,
            );
            (dq, dk) = (dq_raw, dk_raw);
        }
        let mut dx = backend.zeros(n * hidden);
        for (p, dy, store) in [
            (Projection::Q, &dq, Store::Overwrite),
            (Projection::K, &dk, add),
            (Projection::V, &dv, add),
        ] {
            project_back(p, dy, &a.x_attn, &mut dx, store);
        }
        self.norm_backward(backend, dh, &dx, input, &layer.input_norm, hidden, add);
    }

    /// Gradients of every LoRA matrix, from `d_out`, the gradient of the final-norm hidden
    /// states of the training forward that made `trace`. In trainable-parameter order: layer
    /// by layer, each layer's adapters in [`Projection::ALL`] order, `dA` then `dB`.
    pub fn backward(
        &self,
        backend: &B,
        batch: &PackedBatch,
        trace: Trace<B>,
        d_out: &B::Buf,
    ) -> Vec<B::Buf> {
        let s = &self.spec;
        let n = batch.tokens();
        let Trace {
            first,
            mut inputs,
            mut activations,
            last,
            dropout_seed,
        } = trace;
        let mut grads: Vec<[Option<LoraGrads<B>>; 7]> = self
            .layers
            .iter()
            .map(|layer| {
                Projection::ALL.map(|p| {
                    let lora = layer.projection(p).lora.as_ref();
                    lora.map(|lora| LoraGrads::zeros(backend, lora))
                })
            })
            .collect();
        let mut dh = backend.zeros(n * s.hidden_size);
        self.norm_backward(
            backend,
            &mut dh,
            d_out,
            &last,
            &self.final_norm,
            s.hidden_size,
            Store::Overwrite,
        );
        for (i, layer) in self.layers.iter().enumerate().skip(first).rev() {
            let seed = Some(dropout_seed);
            // Layers run backward: the last kept input is this layer's (freed after it).
            let kept = inputs.pop().expect("one kept input per traced layer");
            let input = {
                let _recomputed = backend.memory_scope(MemoryUse::Recomputation);
                backend.restore(&kept)
            };
            drop(kept);
            let input = &input;
            let acts = match activations.pop() {
                Some(acts) => acts,
                None => {
                    let _recomputed = backend.memory_scope(MemoryUse::Recomputation);
                    let mut h = backend.copy(input);
                    self.layer_forward(backend, layer, i, &mut h, batch, seed)
                }
            };
            self.layer_backward(
                backend,
                layer,
                i,
                input,
                &acts,
                &mut dh,
                batch,
                seed,
                &mut grads[i],
            );
        }
        grads
            .into_iter()
            .flatten()
            .flatten()
            .flat_map(|g| [g.a, g.b])
            .collect()
    }

    /// A new buffer of `len` values stored as `storage` says.
    fn buffer(&self, backend: &B, len: usize, storage: Storage) -> B::Buf {
        match storage {
            Storage::Activation => backend.zeros_half(len),
            _ => None,
        }
        .unwrap_or_else(|| backend.zeros(len))
    }

    /// RMSNorm of `rows` rows of width `dim`, in the family's style, stored as `storage` says.
    fn norm(
        &self,
        backend: &B,
        x: &B::Buf,
        w: &B::Buf,
        rows: usize,
        dim: usize,
        storage: Storage,
    ) -> B::Buf {
        let mut out = self.buffer(backend, rows * dim, storage);
        backend.rmsnorm(
            &mut out,
            x,
            w,
            dim,
            self.spec.rms_norm_eps,
            self.spec.norm_style,
        );
        out
    }

    /// Backward of [`Decoder::norm`] (rows of width `dim`) into `dx` as `store` says.
    #[allow(clippy::too_many_arguments)]
    fn norm_backward(
        &self,
        backend: &B,
        dx: &mut B::Buf,
        dy: &B::Buf,
        x: &B::Buf,
        w: &B::Buf,
        dim: usize,
        store: Store,
    ) {
        backend.rmsnorm_backward(
            dx,
            dy,
            x,
            w,
            dim,
            self.spec.rms_norm_eps,
            self.spec.norm_style,
            store,
        );
    }

    /// `h += post_norm(branch)` (Gemma) or `h += branch` (LLaMA).
    fn add_residual(
        &self,
        backend: &B,
        h: &mut B::Buf,
        branch: &B::Buf,
        post_norm: Option<&B::Buf>,
        rows: usize,
    ) {
        match post_norm {
            Some(w) => backend.add(
                h,
                &self.norm(
                    backend,
                    branch,
                    w,
                    rows,
                    self.spec.hidden_size,
                    Storage::F32,
                ),
            ),
            None => backend.add(h, branch),
        }
    }

    /// Backward of [`Decoder::add_residual`] for the branch: its gradient is `dh` itself
    /// without post-norm (`None`: use `dh`), else the post-norm's backward of `dh`.
    fn branch_grad(
        &self,
        backend: &B,
        dh: &B::Buf,
        branch: &B::Buf,
        post_norm: Option<&B::Buf>,
        rows: usize,
    ) -> Option<B::Buf> {
        post_norm.map(|w| {
            let hidden = self.spec.hidden_size;
            let mut d_branch = backend.zeros(rows * hidden);
            self.norm_backward(
                backend,
                &mut d_branch,
                dh,
                branch,
                w,
                hidden,
                Store::Overwrite,
            );
            d_branch
        })
    }

    /// Loads the decoder's tensors (`model.*`) from `checkpoint`, with LoRA pairs from
    /// `adapter` where it has them, and the projections held as `quant` says.
    ///
    /// The embedding table: on a device with 16-bit tables ([`Backend::upload_half`]: CUDA),
    /// held in 16 bits (f16, bf16 only past f16's range; half the memory: 1.2 GB instead of
    /// 2.4 GB for Gemma2-2B) when the projections are NF4 (the mixed-precision path; an f32 model
    /// stays f32 throughout, matching the CPU reference to summation order) and the table is
    /// not also the LM head (`lm_head_tied`: the linear ops read f32 or NF4 weights only).
    pub fn load(
        backend: &B,
        spec: DecoderSpec,
        checkpoint: &mut Checkpoint,
        mut adapter: Option<&mut Adapter>,
        quant: Quant,
        lm_head_tied: bool,
    ) -> Result<Decoder<B>> {
        let s = &spec;
        let (hidden, d) = (s.hidden_size, s.head_dim);
        let embed_name = "model.embed_tokens.weight";
        let table = checkpoint.take(embed_name, &[s.vocab_size, hidden])?;
        let nf4 = matches!(quant, Quant::Nf4(_))
            || checkpoint.names().any(|n| n.contains(".quant_state."));
        let half = (nf4 && !lm_head_tied)
            .then(|| backend.upload_half(&table))
            .flatten();
        let embed_tokens = match half {
            Some(half) => Weight {
                out_features: s.vocab_size,
                in_features: hidden,
                data: WeightData::Half(half),
            },
            None => dense_weight_from_vec(backend, table, s.vocab_size, hidden),
        };
        let mut layers = Vec::with_capacity(s.layers.len());
        for (i, layer_spec) in s.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            let mut vector = |name: &str, len: usize| -> Result<B::Buf> {
                Ok(backend.upload_vec(checkpoint.take(&format!("{p}.{name}.weight"), &[len])?))
            };
            let input_norm = vector("input_layernorm", hidden)?;
            let qk_norm = if s.qk_norm {
                Some((
                    vector("self_attn.q_norm", d)?,
                    vector("self_attn.k_norm", d)?,
                ))
            } else {
                None
            };
            // LLaMA calls its pre-MLP norm `post_attention_layernorm`; Gemma's sandwich
            // layout uses that name for the norm after attention.
            let (post_attn_norm, mlp_norm, post_mlp_norm) = if s.sandwich_norms {
                (
                    Some(vector("post_attention_layernorm", hidden)?),
                    vector("pre_feedforward_layernorm", hidden)?,
                    Some(vector("post_feedforward_layernorm", hidden)?),
                )
            } else {
                (None, vector("post_attention_layernorm", hidden)?, None)
            };
            let mut linear = |name: &str, out: usize, inp: usize| -> Result<Linear<B>> {
                let full = format!("{p}.{name}");
                let weight = projection_weight(backend, checkpoint, &full, out, inp, quant)?;
                let mut l = Linear { weight, lora: None };
                if let Some(adapter) = adapter.as_deref_mut() {
                    l.lora = adapter.take_lora(backend, &full, out, inp)?;
                }
                Ok(l)
            };
            let (q_width, kv_width) = (s.num_heads * d, s.num_kv_heads * d);
            layers.push(Layer {
                input_norm,
                q_proj: linear("self_attn.q_proj", q_width, hidden)?,
                k_proj: linear("self_attn.k_proj", kv_width, hidden)?,
                v_proj: linear("self_attn.v_proj", kv_width, hidden)?,
                o_proj: linear("self_attn.o_proj", hidden, q_width)?,
                qk_norm,
                post_attn_norm,
                mlp_norm,
                gate_proj: linear("mlp.gate_proj", s.intermediate_size, hidden)?,
                up_proj: linear("mlp.up_proj", s.intermediate_size, hidden)?,
                down_proj: linear("mlp.down_proj", hidden, s.intermediate_size)?,
                post_mlp_norm,
                attention: AttentionParams {
                    heads: s.num_heads,
                    kv_heads: s.num_kv_heads,
                    head_dim: d,
                    scale: s.attn_scale,
                    softcap: s.attn_softcap,
                    window: layer_spec.window,
                },
                inv_freq: layer_spec.rope.inv_freq(d),
            });
        }
        let final_norm = backend.upload(&checkpoint.take("model.norm.weight", &[hidden])?);
        ensure!(!layers.is_empty(), "the decoder has no layers");
        Ok(Decoder {
            embed_scale: embed_scale(&spec, Dtype::F32),
            spec,
            embed_tokens,
            layers,
            final_norm,
            prefix_cache: None,
        })
    }

    /// Number of decoder layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Every norm weight: each layer's, then the final norm's.
    pub fn norm_weights(&self) -> Vec<&B::Buf> {
        let mut out = Vec::new();
        for l in &self.layers {
            out.push(&l.input_norm);
            if let Some((q_norm, k_norm)) = &l.qk_norm {
                out.extend([q_norm, k_norm]);
            }
            out.extend(&l.post_attn_norm);
            out.push(&l.mlp_norm);
            out.extend(&l.post_mlp_norm);
        }
        out.push(&self.final_norm);
        out
    }

    /// Projection `p` of layer `layer`.
    pub fn projection(&self, layer: usize, p: Projection) -> &Linear<B> {
        self.layers[layer].projection(p)
    }

    /// Projection `p` of layer `layer`, to add or update its adapter.
    pub fn projection_mut(&mut self, layer: usize, p: Projection) -> &mut Linear<B> {
        self.layers[layer]
            .linears_mut()
            .into_iter()
            .nth(p as usize)
            .expect("seven projections")
    }

    /// Every LoRA adapter, layer by layer, each layer's in [`Projection::ALL`] order.
    pub fn adapters_mut(&mut self) -> impl Iterator<Item = &mut Lora<B>> {
        self.layers
            .iter_mut()
            .flat_map(Layer::linears_mut)
            .filter_map(|linear| linear.lora.as_mut())
    }

    /// Folds every LoRA adapter into its base weight.
    pub fn merge_adapters(&mut self, backend: &B) {
        // Without adapters the whole stack is frozen: a cache of a shorter prefix is stale.
        self.prefix_cache = None;
        for linear in self.layers.iter_mut().flat_map(Layer::linears_mut) {
            linear.merge(backend);
        }
    }
}

/// The base weight `[out, inp]` of projection `name`: NF4 as stored in a bitsandbytes 4-bit
/// checkpoint, else dense, quantized right here if `quant` asks for NF4 (so at most one f32
/// projection exists at a time).
fn projection_weight<B: Backend>(
    backend: &B,
    checkpoint: &mut Checkpoint,
    name: &str,
    out: usize,
    inp: usize,
    quant: Quant,
) -> Result<Weight<B>> {
    let tensor = format!("{name}.weight");
    let data = if checkpoint.is_bnb_4bit(&tensor) {
        WeightData::Nf4(backend.upload_nf4(checkpoint.take_nf4(&tensor, out, inp)?))
    } else {
        let values = checkpoint.take(&tensor, &[out, inp])?;
        match quant {
            Quant::None => WeightData::Dense(backend.upload_vec(values)),
            Quant::Bf16 => WeightData::Bf16(
                backend
                    .upload_bf16(&values, out, inp)
                    .context("--quant bf16: this device has no bf16 projections (the CPU has)")?,
            ),
            // Shapes only (an allocation-only device): the NF4 buffers at their sizes.
            Quant::Nf4(options) if !checkpoint.holds_values() => {
                WeightData::Nf4(backend.upload_nf4(Nf4Weight::placeholder(out, inp, options)?))
            }
            Quant::Nf4(options) => {
                let quantized = Nf4Weight::quantize(&values, out, inp, options)
                    .with_context(|| format!("quantizing {tensor}"))?;
                WeightData::Nf4(backend.upload_nf4(quantized))
            }
        }
    };
    Ok(Weight {
        out_features: out,
        in_features: inp,
        data,
    })
}

/// Gemma multiplies embeddings by sqrt(hidden) cast to the compute dtype first
/// (transformers: `embed_scale.to(hidden_states.dtype)`): 55.5 rather than 55.4256 for
/// hidden 3072 when running in bf16. Every verdict backend keeps the residual stream in f32
/// (as transformers does when a bf16 checkpoint is loaded with dtype=float32, which is what
/// the parity references use), so the decoder asks for f32. LLaMA does not scale.
fn embed_scale(spec: &DecoderSpec, compute: Dtype) -> f32 {
    if spec.scale_embeddings {
        compute.round((spec.hidden_size as f32).sqrt())
    } else {
        1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::{HfConfig, ModelSpec};

    fn spec(family_json: &str, hidden: usize) -> DecoderSpec {
        let json = format!(
            r#"{{"architectures": ["{family_json}"], "vocab_size": 8, "hidden_size": {hidden}, "intermediate_size": 8,
                "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 8}}"#
        );
        ModelSpec::from_hf(&serde_json::from_str::<HfConfig>(&json).unwrap())
            .unwrap()
            .decoder
    }

    #[test]
    fn gemma_embed_scale_is_rounded_to_the_compute_dtype() {
        let gemma = spec("Gemma2ForCausalLM", 3072);
        assert_eq!(embed_scale(&gemma, Dtype::BF16), 55.5);
        assert_eq!(embed_scale(&gemma, Dtype::F32), 3072f32.sqrt());
        assert_eq!(
            embed_scale(&spec("LlamaForCausalLM", 3072), Dtype::BF16),
            1.0
        );
    }

    #[test]
    fn packed_batch_restarts_positions_per_sequence() {
        let batch = PackedBatch::new(&[vec![7u32, 8, 9], vec![4, 5]]);
        assert_eq!(batch.cu_seqlens, [0, 3, 5]);
        assert_eq!(batch.positions, [0, 1, 2, 0, 1]);
        assert_eq!(batch.sequence(1), [4, 5]);
    }
}
