// attention.cu: causal softmax attention over a packed (variable-length) batch, with sliding
// window, logit soft-cap and grouped-query heads, head_dim up to 256.
//
// What it computes, for query token t and query head h (g = h / (heads / kv_heads), the KV
// head transformers' repeat_kv gives it):
//   s_j = scale * (q[t, h] . k[j, g])                      for keys j in [first_key[t], t]
//   s_j = softcap * tanhf(s_j / softcap)                   if softcap > 0
//   out[t, h] = sum_j softmax(s)_j * v[j, g]
// The host computes first_key[t] = max(start of t's sequence, t + 1 - window) (window or
// not), so keys of another sequence and keys outside the window are never visited: the same
// as the -inf mask of the CPU reference, which applies the cap before the mask.
// Layout: q, out [tokens, heads * head_dim]; k, v [tokens, kv_heads * head_dim];
//   first_key u32 [tokens]. All row-major, heads contiguous within a row.
// Algorithm: one block per (query token, query head); the keys are walked in steps of
//   ATTN_KEYS with an online softmax (running max m and sum l, accumulator rescaled by
//   exp(m_old - m_new)), so no score row is ever stored whole and any sequence length works.
//   Per step: each warp scores keys warp, warp + 4, ... (lanes split head_dim, a coalesced
//   128-byte read of the key row, then a warp reduction); after a barrier every thread reads
//   the same ATTN_KEYS scores from shared memory, so m and l are computed identically by all
//   threads without another reduction; each thread then accumulates ATTN_DIMS output features
//   (d = tid, tid + 128) over the step's value rows (coalesced across the block).
// Launch: gridDim = (tokens, heads), blockDim.x = ATTN_THREADS = 128 (fixed by
//   __launch_bounds__): 128 threads x 2 features cover head_dim 256, Gemma 2's, the largest
//   supported (the host refuses more). Shared memory: the query row (1 KiB) and the step's
//   scores.
// Cost: every (query, head) block rereads its visible K and V rows, which L2 mostly serves;
//   a flash-attention tile kernel (several queries per block, K/V tiles in shared memory)
//   replaces it once correctness is pinned.
//
// Variants (speed to be measured by `verdict bench kernels`):
//   v1  one block per (query, head), online softmax over steps of 32 keys.  <- shipped
#include "common.cuh"
#include "storage.cuh"

#define ATTN_THREADS 128
#define ATTN_WARPS (ATTN_THREADS / 32)
#define ATTN_KEYS 32
#define ATTN_MAX_HEAD_DIM 256
#define ATTN_DIMS (ATTN_MAX_HEAD_DIM / ATTN_THREADS)

template <typename S>
VERDICT_DEVICE void attention_forward(typename S::T* __restrict__ out, const typename S::T* __restrict__ q,
                                      const typename S::T* __restrict__ k,
                                      const typename S::T* __restrict__ v,
                                      const unsigned int* __restrict__ first_key, unsigned int heads,
                                      unsigned int kv_heads, unsigned int head_dim, float scale,
                                      float softcap) {
    __shared__ float q_s[ATTN_MAX_HEAD_DIM];
    __shared__ float score_s[ATTN_KEYS];
    const unsigned int t = blockIdx.x;
    const unsigned int h = blockIdx.y;
    const unsigned int g = h / (heads / kv_heads);
    const unsigned int lane = threadIdx.x & 31u;
    const unsigned int warp = threadIdx.x >> 5;
    const unsigned long long q_width = (unsigned long long)heads * head_dim;
    const unsigned long long kv_width = (unsigned long long)kv_heads * head_dim;
    const unsigned long long q_base = t * q_width + (unsigned long long)h * head_dim;
    const unsigned long long kv_offset = (unsigned long long)g * head_dim;

    for (unsigned int d = threadIdx.x; d < head_dim; d += ATTN_THREADS) {
        q_s[d] = S::load(q, q_base + d);
    }
    __syncthreads();

    float m = VERDICT_NEG_INF;  // running max of the scores seen
    float l = 0.0f;             // running sum of exp(s - m)
    float acc[ATTN_DIMS];
#pragma unroll
    for (int i = 0; i < ATTN_DIMS; ++i) {
        acc[i] = 0.0f;
    }

    for (unsigned int step = first_key[t]; step <= t; step += ATTN_KEYS) {
        const unsigned int n = min(ATTN_KEYS, t + 1 - step);
        for (unsigned int j = warp; j < n; j += ATTN_WARPS) {
            const unsigned long long k_base = (unsigned long long)(step + j) * kv_width + kv_offset;
            float dot = 0.0f;
            for (unsigned int d = lane; d < head_dim; d += 32) {
                dot += q_s[d] * S::load(k, k_base + d);
            }
            dot = warp_reduce(dot, SumOp());
            if (lane == 0) {
                float s = scale * dot;
                if (softcap > 0.0f) {
                    s = softcap * tanhf(s / softcap);
                }
                score_s[j] = s;
            }
        }
        __syncthreads();

        float step_max = VERDICT_NEG_INF;
        for (unsigned int j = 0; j < n; ++j) {
            step_max = fmaxf(step_max, score_s[j]);
        }
        const float m_new = fmaxf(m, step_max);
        const float rescale = expf(m - m_new);  // 0 on the first step (m = -inf)
        l *= rescale;
#pragma unroll
        for (int i = 0; i < ATTN_DIMS; ++i) {
            acc[i] *= rescale;
        }
        for (unsigned int j = 0; j < n; ++j) {
            const float p = expf(score_s[j] - m_new);
            l += p;
            const unsigned long long v_base = (unsigned long long)(step + j) * kv_width + kv_offset;
#pragma unroll
            for (int i = 0; i < ATTN_DIMS; ++i) {
                const unsigned int d = threadIdx.x + i * ATTN_THREADS;
                if (d < head_dim) {  // guard: head_dim below 256 leaves threads idle
                    acc[i] += p * S::load(v, v_base + d);
                }
            }
        }
        m = m_new;
        __syncthreads();  // the next step overwrites score_s
    }

    // Key t itself is always visible, so l >= exp(0) = 1: no division by zero.
    const float inv_l = 1.0f / l;
#pragma unroll
    for (int i = 0; i < ATTN_DIMS; ++i) {
        const unsigned int d = threadIdx.x + i * ATTN_THREADS;
        if (d < head_dim) {
            S::store(out, q_base + d, acc[i] * inv_l);
        }
    }
}

extern "C" __global__ void __launch_bounds__(ATTN_THREADS)
    attention_f32(float* __restrict__ out, const float* __restrict__ q, const float* __restrict__ k,
                  const float* __restrict__ v, const unsigned int* __restrict__ first_key,
                  unsigned int heads, unsigned int kv_heads, unsigned int head_dim, float scale,
                  float softcap) {
    attention_forward<StorageF32>(out, q, k, v, first_key, heads, kv_heads, head_dim, scale, softcap);
}
