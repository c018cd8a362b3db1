//! Attention on the GPU (kernels/attention.cu): flash-style forward and the two-kernel
//! backward over packed variable-length batches (causal, sliding window, soft-cap, GQA), and
//! the host-side key ranges they read (`first_keys`, `last_queries`: pure arithmetic, tested
//! without a GPU). CPU reference: `backend/cpu/attention.rs`; cases: `selftest/attention.rs`.

use super::driver::{Gpu, KernelArg};
use super::launch::{expect_len, to_u32, LaunchConfig};
use super::{f32_bytes, CudaBuf};
use crate::backend::AttentionParams;
use anyhow::{bail, ensure, Result};

/// `ATTN_THREADS` (attention.cu).
pub const ATTENTION_THREADS: u32 = 128;
/// `ATTN_MAX_HEAD_DIM` (attention.cu).
pub const ATTENTION_MAX_HEAD_DIM: usize = 256;
/// `ATTN_STATS` (attention.cu): f32 values per (query token, query head) that the backward's
/// query kernel leaves for its key kernel: the softmax max, 1 / sum, and `D = Σ P·dP`.
pub const ATTENTION_STATS: usize = 3;

impl LaunchConfig {
    /// Attention: one block per (token, head): query heads for the forward and the
    /// backward's query kernel (`dq`), key/value heads for its key kernel (`dk`, `dv`).
    pub fn attention(what: &str, tokens: usize, heads: usize) -> Result<LaunchConfig> {
        LaunchConfig::grid_2d(what, tokens, heads, ATTENTION_THREADS)
    }
}

/// Checks a packed batch's `cu_seqlens` against its `tokens`: starts at 0, never decreases,
/// ends at `tokens` (empty sequences are allowed: they own no rows).
pub fn check_cu_seqlens(cu_seqlens: &[usize], tokens: usize) -> Result<()> {
    ensure!(
        cu_seqlens.first() == Some(&0),
        "cu_seqlens must start at 0, found {:?}",
        cu_seqlens.first()
    );
    if let Some(i) = (1..cu_seqlens.len()).find(|&i| cu_seqlens[i] < cu_seqlens[i - 1]) {
        bail!(
            "cu_seqlens decreases at entry {i} ({} after {})",
            cu_seqlens[i],
            cu_seqlens[i - 1]
        );
    }
    ensure!(
        cu_seqlens.last() == Some(&tokens),
        "cu_seqlens ends at {:?} but the batch has {tokens} tokens",
        cu_seqlens.last()
    );
    Ok(())
}

/// The first key each query token may attend to: the start of its sequence, or with a
/// sliding window of `w`, the later of that and `t + 1 - w` (query `t` sees keys
/// `t - w < k <= t`). The forward and the backward's query kernel walk keys
/// `first_key[t] ..= t`.
pub fn first_keys(cu_seqlens: &[usize], tokens: usize, window: Option<usize>) -> Result<Vec<u32>> {
    per_token(cu_seqlens, tokens, window, |start, _, t| match window {
        Some(w) => start.max((t + 1).saturating_sub(w)),
        None => start,
    })
}

/// The last query token that sees each key: the end of its sequence, or with a sliding
/// window of `w`, the earlier of that and `k + w - 1` — the inverse of [`first_keys`] (query
/// `t` sees key `k` iff `first_key[t] <= k <= t` iff `k <= t <= last_query[k]`). The
/// backward's key kernel walks queries `k ..= last_query[k]`.
pub fn last_queries(
    cu_seqlens: &[usize],
    tokens: usize,
    window: Option<usize>,
) -> Result<Vec<u32>> {
    per_token(cu_seqlens, tokens, window, |_, end, k| match window {
        Some(w) => (end - 1).min(k + w - 1),
        None => end - 1,
    })
}

/// `range(start, end, t)` for every token `t` of every sequence `[start, end)` of a packed
/// batch, as the kernels' u32, after checking `cu_seqlens` and the window.
fn per_token(
    cu_seqlens: &[usize],
    tokens: usize,
    window: Option<usize>,
    range: impl Fn(usize, usize, usize) -> usize,
) -> Result<Vec<u32>> {
    check_cu_seqlens(cu_seqlens, tokens)?;
    to_u32("tokens in one attention call", tokens)?;
    if window == Some(0) {
        bail!("attention window 0 would hide every key, the query's own included");
    }
    let mut out = Vec::with_capacity(tokens);
    for pair in cu_seqlens.windows(2) {
        let (start, end) = (pair[0], pair[1]);
        out.extend((start..end).map(|t| range(start, end, t) as u32));
    }
    Ok(out)
}

/// Checks an attention call's settings and the q, k, v shapes against `cu_seqlens`; returns
/// the tokens and the kernels' soft-cap argument (0 for none).
fn check_attention(
    op: &str,
    q: &CudaBuf,
    k: &CudaBuf,
    v: &CudaBuf,
    cu_seqlens: &[usize],
    params: &AttentionParams,
) -> Result<(usize, f32)> {
    let AttentionParams {
        heads,
        kv_heads,
        head_dim,
        softcap,
        ..
    } = *params;
    ensure!(
        head_dim > 0 && head_dim <= ATTENTION_MAX_HEAD_DIM,
        "{op}: head_dim {head_dim} is not supported (1 to {ATTENTION_MAX_HEAD_DIM})"
    );
    ensure!(
        kv_heads > 0 && heads % kv_heads == 0,
        "{op}: {heads} query heads cannot share {kv_heads} key/value heads evenly"
    );
    let cap = match softcap {
        None => 0.0,
        Some(cap) if cap > 0.0 => cap,
        Some(cap) => bail!("{op}: soft-cap {cap} must be positive"),
    };
    let tokens = cu_seqlens.last().copied().unwrap_or(0);
    expect_len(op, "q", q, tokens * heads * head_dim)?;
    expect_len(op, "k", k, tokens * kv_heads * head_dim)?;
    expect_len(op, "v", v, k.len)?;
    Ok((tokens, cap))
}

/// The settings every attention kernel takes after its device pointers.
struct Settings {
    heads: u32,
    kv_heads: u32,
    head_dim: u32,
    scale: f32,
    /// The soft-cap, 0 for none.
    cap: f32,
}

fn attention_settings(params: &AttentionParams, cap: f32) -> Result<Settings> {
    Ok(Settings {
        heads: to_u32("heads", params.heads)?,
        kv_heads: to_u32("kv_heads", params.kv_heads)?,
        head_dim: to_u32("head_dim", params.head_dim)?,
        scale: params.scale,
        cap,
    })
}

/// Launches attention.cu's `function`: every entry point takes its device pointers (in
/// signature order) and then the same settings.
fn launch(
    gpu: &Gpu,
    op: &str,
    function: &'static str,
    config: LaunchConfig,
    pointers: &[u64],
    settings: Settings,
) -> Result<()> {
    let mut pointers = pointers.to_vec();
    let Settings {
        mut heads,
        mut kv_heads,
        mut head_dim,
        mut scale,
        mut cap,
    } = settings;
    let mut args: Vec<&mut dyn KernelArg> = pointers
        .iter_mut()
        .map(|p| p as &mut dyn KernelArg)
        .collect();
    args.extend([
        &mut heads as &mut dyn KernelArg,
        &mut kv_heads,
        &mut head_dim,
        &mut scale,
        &mut cap,
    ]);
    gpu.launch(op, "attention", function, config, &mut args)
}

pub(super) fn attention(
    gpu: &Gpu,
    out: &CudaBuf,
    q: &CudaBuf,
    k: &CudaBuf,
    v: &CudaBuf,
    cu_seqlens: &[usize],
    params: &AttentionParams,
) -> Result<()> {
    let op = "attention";
    let (tokens, cap) = check_attention(op, q, k, v, cu_seqlens, params)?;
    expect_len(op, "the output", out, q.len)?;
    let first_keys = first_keys(cu_seqlens, tokens, params.window)?;
    if tokens == 0 || params.heads == 0 {
        return Ok(());
    }
    let first_keys = gpu.upload(op, &first_keys)?;
    launch(
        gpu,
        op,
        "attention_f32",
        LaunchConfig::attention(op, tokens, params.heads)?,
        &[out.ptr(), q.ptr(), k.ptr(), v.ptr(), first_keys.ptr()],
        attention_settings(params, cap)?,
    )
}

/// Two launches on the stream (kernels/attention.cu): the query kernel writes `dq` and each
/// (query, head)'s softmax statistics into a scratch buffer, then the key kernel reads them
/// and writes `dk`, `dv` — deterministic, no atomics.
#[allow(clippy::too_many_arguments)]
pub(super) fn attention_backward(
    gpu: &Gpu,
    dq: &CudaBuf,
    dk: &CudaBuf,
    dv: &CudaBuf,
    dout: &CudaBuf,
    q: &CudaBuf,
    k: &CudaBuf,
    v: &CudaBuf,
    cu_seqlens: &[usize],
    params: &AttentionParams,
) -> Result<()> {
    let op = "attention_backward";
    let (tokens, cap) = check_attention(op, q, k, v, cu_seqlens, params)?;
    expect_len(op, "dout", dout, q.len)?;
    expect_len(op, "dq", dq, q.len)?;
    expect_len(op, "dk", dk, k.len)?;
    expect_len(op, "dv", dv, k.len)?;
    let first_keys = first_keys(cu_seqlens, tokens, params.window)?;
    let last_queries = last_queries(cu_seqlens, tokens, params.window)?;
    if tokens == 0 || params.heads == 0 {
        return Ok(());
    }
    let first_keys = gpu.upload(op, &first_keys)?;
    let last_queries = gpu.upload(op, &last_queries)?;
    let stats = gpu.alloc(op, f32_bytes(tokens * params.heads * ATTENTION_STATS))?;
    launch(
        gpu,
        op,
        "attention_backward_query_f32",
        LaunchConfig::attention(op, tokens, params.heads)?,
        &[
            dq.ptr(),
            stats.ptr(),
            dout.ptr(),
            q.ptr(),
            k.ptr(),
            v.ptr(),
            first_keys.ptr(),
        ],
        attention_settings(params, cap)?,
    )?;
    launch(
        gpu,
        op,
        "attention_backward_key_f32",
        LaunchConfig::attention(op, tokens, params.kv_heads)?,
        &[
            dk.ptr(),
            dv.ptr(),
            stats.ptr(),
            dout.ptr(),
            q.ptr(),
            k.ptr(),
            v.ptr(),
            last_queries.ptr(),
        ],
        attention_settings(params, cap)?,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sequence `[start, end)` of a packed batch that holds token `t`.
    fn sequence_of(cu_seqlens: &[usize], t: usize) -> (usize, usize) {
        cu_seqlens
            .windows(2)
            .map(|s| (s[0], s[1]))
            .find(|s| (s.0..s.1).contains(&t))
            .unwrap()
    }

    /// Query `t` of sequence `[start, end)` sees key `k` (the CPU reference's mask).
    fn sees(window: Option<usize>, (start, end): (usize, usize), t: usize, k: usize) -> bool {
        (start..end).contains(&t) && (start..=t).contains(&k) && window.map_or(true, |w| k + w > t)
    }

    #[test]
    fn last_queries_invert_first_keys_for_every_window() {
        // Catches a backward that gives a key to a query outside its window (or sequence),
        // or misses one: dK/dV would then differ from the forward's softmax.
        let cu = [0, 1, 18, 18, 351, 356];
        let tokens = *cu.last().unwrap();
        for window in [
            None,
            Some(1),
            Some(2),
            Some(16),
            Some(332),
            Some(333),
            Some(1000),
        ] {
            let first = first_keys(&cu, tokens, window).unwrap();
            let last = last_queries(&cu, tokens, window).unwrap();
            // Every (query, key) of the batch, across sequences too.
            for (t, &first_key) in first.iter().enumerate() {
                let seq = sequence_of(&cu, t);
                for k in 0..tokens {
                    assert_eq!(
                        (first_key as usize..=t).contains(&k),
                        sees(window, seq, t, k),
                        "{window:?}: first_key[{t}] = {first_key} and key {k}"
                    );
                }
            }
            for (k, &last_query) in last.iter().enumerate() {
                let seq = sequence_of(&cu, k);
                for t in 0..tokens {
                    assert_eq!(
                        (k..=last_query as usize).contains(&t),
                        sees(window, seq, t, k),
                        "{window:?}: last_query[{k}] = {last_query} and query {t}"
                    );
                }
            }
        }
    }

    #[test]
    fn last_query_stops_at_the_sequence_end_or_distance_window() {
        assert_eq!(last_queries(&[0, 3, 5], 5, None).unwrap(), [2, 2, 2, 4, 4]);
        assert_eq!(
            last_queries(&[0, 5], 5, Some(2)).unwrap(),
            [1, 2, 3, 4, 4],
            "key k is seen by queries k and k + 1 only"
        );
        assert_eq!(last_queries(&[0, 3], 3, Some(1)).unwrap(), [0, 1, 2]);
        assert_eq!(last_queries(&[0, 0, 2, 2], 2, Some(7)).unwrap(), [1, 1]);
        assert!(last_queries(&[0, 3], 3, Some(0)).is_err());
        assert!(last_queries(&[0, 3], 4, None).is_err());
    }

    #[test]
    fn attention_backward_grids_cover_query_heads_then_key_heads() {
        // Gemma2-2B: 8 query heads, 4 key/value heads, a packed batch of 4096 tokens.
        let query = LaunchConfig::attention("attention_backward", 4096, 8).unwrap();
        let key = LaunchConfig::attention("attention_backward", 4096, 4).unwrap();
        assert_eq!(query.grid, (4096, 8, 1));
        assert_eq!(key.grid, (4096, 4, 1));
        assert_eq!(query.block, (ATTENTION_THREADS, 1, 1));
        // 128 threads x 2 features per thread cover the largest head_dim.
        assert_eq!(ATTENTION_THREADS as usize * 2, ATTENTION_MAX_HEAD_DIM);
    }
}
