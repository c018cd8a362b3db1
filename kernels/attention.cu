// attention.cu: flash attention (FlashAttention-2 tiling) on tensor cores over a packed,
// variable-length batch: causal, sliding window, Gemma 2's logit soft-cap, grouped-query heads,
// any head_dim up to 256. Forward (out and the log-sum-exp) and backward (dQ, dK, dV).
//
// What it computes, for query token t of a sequence and query head h (kv head g = h / group,
// group = heads / kv_heads, transformers' repeat_kv):
//   s_j = scale * (q[t, h] . k[j, g])                       keys j of t's sequence, j <= t,
//   c_j = softcap * tanh(s_j / softcap)  (c_j = s_j without)        t - window < j if windowed
//   P_j = exp(c_j - lse[t, h]),  lse[t, h] = log sum_j exp(c_j),  out[t, h] = sum_j P_j v[j, g]
// The cap comes before the mask (as transformers: capping a -inf mask would give masked keys
// weight). Backward, with dP_j = dout[t, h] . v[j, g] and D[t, h] = dout[t, h] . out[t, h]:
//   dz_j = P_j (dP_j - D) (1 - tanh^2(s_j / softcap))          (last factor 1 without cap)
//   dq[t, h] = scale sum_j dz_j k[j, g]   dk[j, g] = scale sum_{t, h in g} dz q[t, h]
//   dv[j, g] = sum_{t, h in g} P_j dout[t, h]                   (all three overwritten)
// CPU reference: src/backend/cpu/attention.rs. Cases: src/selftest/attention.rs.
//
// Layout: q, out, dq, dout [tokens, heads * head_dim]; k, v, dk, dv [tokens, kv_heads *
//   head_dim]; each of these eight f32 or 16-bit, chosen per tensor at launch (storage.cuh's
//   Tensor; the decoder passes q, k, v, out in the card's type and dout, dq, dk, dv in f32),
//   except the atomic variant's dq: f32 only (f32 atomicAdd). lse, delta [tokens, heads] f32
//   (lse natural log). `tiles` u32 triples (first row, sequence start, sequence end), one per
//   block: the host cuts every sequence of cu_seqlens into tiles of the kernel's rows, so a
//   block never straddles two sequences and a packed batch needs no padding. window 0 means
//   none; softcap 0 means none.
//
// Precision: q, k, v, dout are rounded to the operand type (f16 on sm_75, bf16 on sm_80+) as
//   they are staged into shared memory (q, k, v already of that type stage unchanged), P and
//   dz as they enter their products; scores, softmax, lse and every accumulator are f32; a
//   16-bit out, dq, dk or dv rounds once, at its store. dout is first scaled by a power of two
//   that puts its largest magnitude in [1, 2) (undone exactly at the stores), so f16's range
//   (6e-8 .. 65504) does not clip gradients whatever their size; q, k, v are activations
//   (|x| up to a few hundred) and must stay under 65504 on a T4.
//
// Kernels (Op = OperandF16 | OperandBf16, mma.cuh; D = 64 | 128 | 256 is the compiled head
// size, head_dim <= D, the columns past head_dim are zeros in shared memory, never stored):
//   attention_forward_{f16,bf16}_d{D}: a block of 4 warps per (query tile of 64 rows, query
//     head); warp w owns rows 16w..16w+15. Q tile staged once; then for every key tile of
//     FWD_KEYS keys from the tile's first visible key to its last row: K tile -> S = Q K^T
//     (mma, A = Q rows, B = K rows), scale, cap, mask, online softmax (running max m and sum
//     l per row, the accumulator rescaled by exp(m_old - m_new)), P kept in registers as the
//     A operand (mma.cuh: C layout = A layout), V tile into the same shared buffer ->
//     O += P V (B = V columns, two 16-bit reads per fragment word). Key tiles before the
//     window of the tile's first row or after its last row are never visited; a warp skips
//     the tiles entirely outside its own 16 rows' range. Writes out = O / l and
//     lse = m + log l.
//   attention_backward_dout_max, attention_backward_dout_scale_f32: s = 2^-floor(log2
//     max |dout|), so that s dout fits f16 whatever the loss scale (see "dout's scale" below);
//     every backward kernel stages s dout and stores its gradients times 1 / s.
//   attention_backward_delta_{f16,bf16}: D = rowsum(s dout * out), a warp per (token, head),
//     s dout rounded as the products see it.
//   attention_backward_kv_{f16,bf16}_d{D}: a block per (key tile of BWD_KEYS keys, kv head);
//     K and V tiles stay in shared memory; for every query head of the group and every query
//     tile of BWD_QUERIES rows that sees the keys (from the tile's first key to its last key's
//     window end): stage Q, dout, lse, D; phase 1: warps split the (16 keys x 8 queries) units
//     and compute S^T = K Q^T and dP^T = V dout^T, then P^T and dz^T into shared memory as
//     operands; phase 2: each warp owns 8 of the 32 (16 x 8) tiles of dV and of dK, and
//     accumulates dV += P^T dout and dK += dz^T Q in registers over all query tiles and heads
//     (the GQA sum, in a fixed order). dq is left to attention_backward_q (deterministic).
//   attention_backward_kv_atomic_{f16,bf16}_d{D}: the same, and per query tile also
//     dQ_tile = dz K (A = dz read transposed from shared) added to dq with f32 atomicAdd (dq
//     zeroed by the host first): one kernel instead of two, but the sums' order depends on
//     which blocks finish first, so dq's last bits vary from run to run.
//   attention_backward_q_{f16,bf16}_d{D}: a block per (query tile of BWD_QUERIES rows,
//     query head): the forward's walk over key tiles, phase 1 as above, then dQ += dz K.
//   The host runs dout_max, dout_scale, delta, then kv + q (deterministic) or kv_atomic alone
//   (the default).
//
// Tiles (rows x keys) and static shared memory per block, the same on every arch: each fits
// the 48 KiB of static shared memory every arch allows and a T4's 64 KiB per SM, so no
// dynamic shared memory is needed; rows are padded by 8 halves so fragment loads hit 32
// distinct banks (row stride D/2 + 4 words).
//   D     forward (Q + one K/V buffer)      backward (Q, dout, K, V, P^T, dz^T, lse, D)
//   64    64 x 64   18 432 B                  32 q x 64 k   38 144 B
//   128   64 x 64   34 816 B                  32 q x 32 k   40 192 B
//   256   64 x 16   42 240 B                  16 q x 16 k   35 456 B
// Larger tiles on sm_80+ (up to 227 KiB per block there) need dynamic shared memory: not done.
// Registers (ptxas of NVRTC 12.4, f16 on sm_75 / bf16 on sm_80, with the typed Tensor loads;
// no spills, no stack anywhere; per arch in ARCHITECTURE.md "Flash attention",
// target/kernels-report/attention.ptxas.txt):
//   forward      131 / 119 (D 64)   162 / 153 (D 128)   180 / 167 (D 256)
//   backward_kv  126 / 125          127 / 125           121 / 126   (_atomic: 122-144)
//   backward_q    71 / 84            97 / 106            92 / 91
// One block of the D 256 forward per SM on a T4 (42 KiB of its 64 KiB), three on Hopper.
//
// Variants:
//   v1  one block per (query, head), f32 CUDA cores, keys walked in steps of 32 with an online
//       softmax; backward in two f32 kernels (query-major dq with stats, key-major dk/dv).
//       Every block re-read its K/V rows: ~34 GB of cache traffic per Gemma2-2B layer at
//       2048 tokens. Replaced by:
//   v2  this file: FlashAttention-2 tiles on tensor cores, LSE saved by the forward, backward
//       recomputing P from it; deterministic (kv + q) and atomic (kv_atomic) backward.
//       <- shipped. Written without a GPU: verified on the emulated device (sm_75 and sm_80
//       paths) against the CPU; speed awaits `verdict bench kernels` on a GPU.
// Known costs, for the next version: no cp.async / ldmatrix (tiles go through registers to be
// rounded, transposed operands are two 16-bit shared reads), expf rather than exp2f with a
// folded log2(e), the forward reloads its one K/V buffer between the two products, and a
// 16-bit input of the operand's own type is staged value by value through Tensor::load (one
// 32-bit copy per pair would do).
#include "common.cuh"
#include "storage.cuh"
#include "mma.cuh"

#define FLASH_THREADS 128
#define FLASH_WARPS 4
#define FLASH_PAD 8           // 16-bit values of padding per shared row
#define FLASH_FWD_QUERIES 64  // forward rows per block: 16 per warp
#define FLASH_DELTA_ROWS 4    // (token, head) rows per block of the delta kernel: one per warp
#define FLASH_SCALE_THREADS 256  // the one block that reduces dout's maximum

// An activation or gradient argument of an entry point (storage.cuh's Tensor), and the Tensor.
#define FLASH_TENSOR(X) void *X, unsigned int X##_dtype
#define FLASH_AS_TENSOR(X) Tensor{X, X##_dtype}

// Tile shapes per compiled head size (see the header's table).
template <int D>
struct FlashTiles;
template <>
struct FlashTiles<64> {
    enum { FWD_KEYS = 64, BWD_QUERIES = 32, BWD_KEYS = 64 };
};
template <>
struct FlashTiles<128> {
    enum { FWD_KEYS = 64, BWD_QUERIES = 32, BWD_KEYS = 32 };
};
template <>
struct FlashTiles<256> {
    enum { FWD_KEYS = 16, BWD_QUERIES = 16, BWD_KEYS = 16 };
};

// The score as the softmax sees it, c = softcap * tanh(s / softcap) (s without cap), and
// dc/ds = 1 - tanh^2 (1 without cap) in *slope.
VERDICT_DEVICE float attention_cap(float s, float softcap, float* slope) {
    if (softcap > 0.0f) {
        const float th = tanhf(s / softcap);
        *slope = 1.0f - th * th;
        return softcap * th;
    }
    *slope = 1.0f;
    return s;
}

// Whether query t sees key j (both of the same sequence, j < the key limit, t < the row limit).
VERDICT_DEVICE bool attention_visible(unsigned int j, unsigned int t, unsigned int key_limit,
                                      unsigned int row_limit, unsigned int window) {
    return j < key_limit && t < row_limit && j <= t && (window == 0 || j + window > t);
}

// ---- shared tiles of 16-bit operands ----

// rows x D values of `src` (row-major, any storage type, row stride `width`, columns from
// `col0`) times `mul` (a power of two: exact) into `tile`, rounded to the operand type: rows
// row0.. below row_limit, columns below head_dim; the rest zeros (zeros score 0 and add
// nothing). A 16-bit source of the operand's own type widens exactly and rounds back to the
// same bits, so its tile is the one its f32 values rounded first would give. Every thread of
// the block calls it.
template <typename Op, int ROWS, int D>
VERDICT_DEVICE void flash_stage(unsigned short (*tile)[D + FLASH_PAD], Tensor src, unsigned int row0,
                                unsigned int row_limit, unsigned long long width,
                                unsigned long long col0, unsigned int head_dim, float mul = 1.0f) {
    for (unsigned int w = threadIdx.x; w < ROWS * D / 2; w += FLASH_THREADS) {
        const unsigned int r = w / (D / 2);
        const unsigned int c = 2 * (w % (D / 2));
        const unsigned int row = row0 + r;
        const unsigned long long at = (unsigned long long)row * width + col0 + c;
        const bool in = row < row_limit;  // guard: rows past the sequence (or tile) are zeros
        const float lo = in && c < head_dim ? mul * src.load(at) : 0.0f;
        const float hi = in && c + 1 < head_dim ? mul * src.load(at + 1) : 0.0f;
        *reinterpret_cast<unsigned int*>(&tile[r][c]) = Op::pack(lo, hi);
    }
}

// The fragment word of elements (row, col) and (row, col + 1): one 32-bit read.
template <int STRIDE>
VERDICT_DEVICE unsigned int flash_word(const unsigned short (*tile)[STRIDE], unsigned int row,
                                       unsigned int col) {
    return *reinterpret_cast<const unsigned int*>(&tile[row][col]);
}

// The fragment word of elements (row, col) and (row + 1, col): a transposed read, two 16-bit
// loads (lanes g and g ^ 1 share a word, so a warp still hits distinct banks).
template <int STRIDE>
VERDICT_DEVICE unsigned int flash_column_word(const unsigned short (*tile)[STRIDE], unsigned int row,
                                              unsigned int col) {
    return operand_pack(tile[row][col], tile[row + 1][col]);
}

// A fragment of the 16 x 16 piece of A at (row0, k0), A(r, k) = tile[r][k].
template <int STRIDE>
VERDICT_DEVICE void flash_a(unsigned int (&a)[4], const unsigned short (*tile)[STRIDE], unsigned int row0,
                            unsigned int k0) {
    const unsigned int g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
    a[0] = flash_word(tile, row0 + g, k0 + 2 * t);
    a[1] = flash_word(tile, row0 + g + 8, k0 + 2 * t);
    a[2] = flash_word(tile, row0 + g, k0 + 8 + 2 * t);
    a[3] = flash_word(tile, row0 + g + 8, k0 + 8 + 2 * t);
}

// A fragment of the 16 x 16 piece of A at (row0, k0) with A(r, k) = tile[k][r] (transposed).
template <int STRIDE>
VERDICT_DEVICE void flash_a_transposed(unsigned int (&a)[4], const unsigned short (*tile)[STRIDE],
                                       unsigned int row0, unsigned int k0) {
    const unsigned int g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
    a[0] = flash_column_word(tile, k0 + 2 * t, row0 + g);
    a[1] = flash_column_word(tile, k0 + 2 * t, row0 + g + 8);
    a[2] = flash_column_word(tile, k0 + 8 + 2 * t, row0 + g);
    a[3] = flash_column_word(tile, k0 + 8 + 2 * t, row0 + g + 8);
}

// B fragment of the 16 x 8 piece of B at (k0, n0) with B(k, n) = tile[n][k] (B = tile^T).
template <int STRIDE>
VERDICT_DEVICE void flash_b_rows(unsigned int (&b)[2], const unsigned short (*tile)[STRIDE], unsigned int k0,
                                 unsigned int n0) {
    const unsigned int g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
    b[0] = flash_word(tile, n0 + g, k0 + 2 * t);
    b[1] = flash_word(tile, n0 + g, k0 + 8 + 2 * t);
}

// B fragment of the 16 x 8 piece of B at (k0, n0) with B(k, n) = tile[k][n].
template <int STRIDE>
VERDICT_DEVICE void flash_b_columns(unsigned int (&b)[2], const unsigned short (*tile)[STRIDE],
                                    unsigned int k0, unsigned int n0) {
    const unsigned int g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
    b[0] = flash_column_word(tile, k0 + 2 * t, n0 + g);
    b[1] = flash_column_word(tile, k0 + 8 + 2 * t, n0 + g);
}

// The block's tile: (first row, sequence start, sequence end).
struct FlashTile {
    unsigned int first, start, end;
};

VERDICT_DEVICE FlashTile flash_tile(const unsigned int* __restrict__ tiles) {
    const unsigned int* p = tiles + 3ull * blockIdx.x;
    return FlashTile{p[0], p[1], p[2]};
}

// The first key any of rows first.. may see: the sequence start, or the first row's window.
VERDICT_DEVICE unsigned int flash_first_key(FlashTile tile, unsigned int window) {
    if (window != 0 && tile.first + 1 > tile.start + window) {
        return tile.first + 1 - window;
    }
    return tile.start;
}

// ======================= forward =======================

template <typename Op, int D>
VERDICT_DEVICE void attention_forward(Tensor out, float* __restrict__ lse, Tensor q, Tensor k,
                                      Tensor v, const unsigned int* __restrict__ tiles,
                                      unsigned int heads, unsigned int kv_heads, unsigned int head_dim,
                                      float scale, float softcap, unsigned int window) {
    enum { BC = FlashTiles<D>::FWD_KEYS, BR = FLASH_FWD_QUERIES, STRIDE = D + FLASH_PAD };
    __shared__ __align__(16) unsigned short q_s[BR][STRIDE];
    __shared__ __align__(16) unsigned short kv_s[BC][STRIDE];  // K, then V, of one key tile

    const FlashTile tile = flash_tile(tiles);
    const unsigned int h = blockIdx.y;
    const unsigned int g_kv = h / (heads / kv_heads);
    const unsigned int warp = threadIdx.x / 32;
    const unsigned int g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
    const unsigned long long q_width = (unsigned long long)heads * head_dim;
    const unsigned long long kv_width = (unsigned long long)kv_heads * head_dim;
    const unsigned int row_limit = min(tile.first + BR, tile.end);
    const unsigned int warp_first = tile.first + 16 * warp;  // this warp's rows: 16 from here

    flash_stage<Op, BR, D>(q_s, q, tile.first, row_limit, q_width, (unsigned long long)h * head_dim,
                           head_dim);

    float m[2] = {VERDICT_NEG_INF, VERDICT_NEG_INF};  // running max of rows g, g + 8
    float l[2] = {0.0f, 0.0f};  // this thread's part of the running sums of exp(c - m)
    float o[D / 8][4];
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            o[j][c] = 0.0f;
        }
    }

    // Keys from the first row's window start to the last row: tiles wholly outside are skipped.
    for (unsigned int k0 = flash_first_key(tile, window); k0 < row_limit; k0 += BC) {
        // Warp-uniform: whether any of this warp's rows sees any key of this tile.
        const bool active = warp_first < row_limit && k0 <= warp_first + 15 &&
                            (window == 0 || k0 + BC - 1 + window > warp_first);
        __syncthreads();  // the previous tile's V readers are done with kv_s
        flash_stage<Op, BC, D>(kv_s, k, k0, row_limit, kv_width, (unsigned long long)g_kv * head_dim,
                               head_dim);
        __syncthreads();

        unsigned int p_frag[BC / 16][4];
        float rescale[2] = {1.0f, 1.0f};
        if (active) {
            float s[BC / 8][4];
#pragma unroll
            for (int j = 0; j < BC / 8; ++j) {
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    s[j][c] = 0.0f;
                }
            }
#pragma unroll
            for (int kk = 0; kk < D; kk += 16) {
                unsigned int a[4];
                flash_a(a, q_s, 16 * warp, kk);
#pragma unroll
                for (int j = 0; j < BC / 8; ++j) {
                    unsigned int b[2];
                    flash_b_rows(b, kv_s, kk, 8 * j);
                    Op::mma(s[j], a, b);
                }
            }
            // Scale, cap, mask; the rows' maxima over this tile.
            float tile_max[2] = {VERDICT_NEG_INF, VERDICT_NEG_INF};
#pragma unroll
            for (int j = 0; j < BC / 8; ++j) {
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    const unsigned int key = k0 + 8 * j + 2 * t + (c & 1);
                    const unsigned int row = warp_first + g + 8 * (c / 2);
                    float slope;
                    const float capped = attention_cap(scale * s[j][c], softcap, &slope);
                    s[j][c] = attention_visible(key, row, row_limit, row_limit, window) ? capped
                                                                                        : VERDICT_NEG_INF;
                    tile_max[c / 2] = fmaxf(tile_max[c / 2], s[j][c]);
                }
            }
            float base[2];
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                // The four lanes of a row (t = 0..3) agree on its max.
                tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
                tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
                const float m_new = fmaxf(m[r], tile_max[r]);
                // A row with no visible key yet keeps m = -inf: exponentiate against 0 instead
                // (every exp is then exp(-inf) = 0, never exp(-inf + inf)).
                base[r] = m_new == VERDICT_NEG_INF ? 0.0f : m_new;
                rescale[r] = expf(m[r] - base[r]);
                m[r] = m_new;
                l[r] *= rescale[r];
            }
#pragma unroll
            for (int j = 0; j < BC / 8; ++j) {
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    s[j][c] = expf(s[j][c] - base[c / 2]);
                    l[c / 2] += s[j][c];
                }
            }
#pragma unroll
            for (int kk = 0; kk < BC / 16; ++kk) {
                p_frag[kk][0] = Op::pack(s[2 * kk][0], s[2 * kk][1]);
                p_frag[kk][1] = Op::pack(s[2 * kk][2], s[2 * kk][3]);
                p_frag[kk][2] = Op::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
                p_frag[kk][3] = Op::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
            }
        }
        __syncthreads();  // every warp has read K
        flash_stage<Op, BC, D>(kv_s, v, k0, row_limit, kv_width, (unsigned long long)g_kv * head_dim,
                               head_dim);
        __syncthreads();
        if (active) {
#pragma unroll
            for (int j = 0; j < D / 8; ++j) {
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    o[j][c] *= rescale[c / 2];
                }
            }
#pragma unroll
            for (int kk = 0; kk < BC / 16; ++kk) {
#pragma unroll
                for (int j = 0; j < D / 8; ++j) {
                    unsigned int b[2];
                    flash_b_columns(b, kv_s, 16 * kk, 8 * j);
                    Op::mma(o[j], p_frag[kk], b);
                }
            }
        }
    }

#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const unsigned int row = warp_first + g + 8 * r;
        if (row < row_limit) {  // guard: rows past the sequence are computed, never stored
            // Key `row` itself is visible, so l >= exp(0) = 1.
            const float inv_l = 1.0f / l[r];
            const unsigned long long base = row * q_width + (unsigned long long)h * head_dim;
#pragma unroll
            for (int j = 0; j < D / 8; ++j) {
#pragma unroll
                for (int c = 0; c < 2; ++c) {
                    const unsigned int d = 8 * j + 2 * t + c;
                    if (d < head_dim) {
                        out.store(base + d, o[j][2 * r + c] * inv_l);
                    }
                }
            }
            if (t == 0) {
                lse[(unsigned long long)row * heads + h] = m[r] + logf(l[r]);
            }
        }
    }
}

// ======================= backward =======================

// ---- dout's scale: f16 keeps 6e-8 .. 65504, and gradients reaching attention can be far
// smaller than 1 (1e-6 in a tiny model's training: subnormal, a few bits left). The backward
// therefore stages s * dout with s = 2^-floor(log2(max |dout|)), the largest magnitude then
// in [1, 2) and every value within 2^-14 of it a normal f16; dq, dk, dv are linear in dout, so
// the stores multiply by 1 / s, exactly (powers of two). bf16 has f32's exponent range: the
// scaling changes nothing there, and the same code runs. ----

// max |dout| of each (token, head) row: a warp per row, lanes split head_dim.
extern "C" __global__ void __launch_bounds__(FLASH_THREADS)
    attention_backward_dout_max(float* __restrict__ row_max, FLASH_TENSOR(dout_p), unsigned int rows,
                                unsigned int head_dim) {
    const Tensor dout = FLASH_AS_TENSOR(dout_p);
    const unsigned int row = blockIdx.x * FLASH_DELTA_ROWS + threadIdx.x / 32;
    if (row >= rows) {
        return;  // guard: the last block's extra warps (no barrier follows)
    }
    const unsigned long long base = (unsigned long long)row * head_dim;
    float m = 0.0f;
    for (unsigned int d = threadIdx.x % 32; d < head_dim; d += 32) {
        m = fmaxf(m, fabsf(dout.load(base + d)));
    }
    m = warp_reduce(m, MaxOp());
    if (threadIdx.x % 32 == 0) {
        row_max[row] = m;
    }
}

// 2^-floor(log2(m)), clamped to normal f32 powers of two; 1 for m = 0 (or NaN: it stays NaN).
VERDICT_DEVICE float flash_dout_scale(float m) {
    if (!(m > 0.0f)) {
        return 1.0f;
    }
    int e = (int)((__float_as_uint(m) >> 23) & 0xffu) - 127;  // subnormal m: -127
    e = max(-126, min(126, -e));                                 // 2^-e within 2^-126 .. 2^126
    return __uint_as_float((unsigned int)(e + 127) << 23);
}

// The scale from every row's max: one block.
extern "C" __global__ void __launch_bounds__(FLASH_SCALE_THREADS)
    attention_backward_dout_scale_f32(float* __restrict__ scale, const float* __restrict__ row_max,
                                      unsigned int rows) {
    float m = 0.0f;
    for (unsigned int r = threadIdx.x; r < rows; r += FLASH_SCALE_THREADS) {
        m = fmaxf(m, row_max[r]);
    }
    m = block_reduce(m, MaxOp(), 0.0f);
    if (threadIdx.x == 0) {
        *scale = flash_dout_scale(m);
    }
}

// D[t, h] = s dout[t, h] . out[t, h]: a warp per (token, head) row, lanes split head_dim. The
// scaled dout is rounded to the operand type as the kv and q kernels stage it, so that D is
// exactly the sum_j P_j dP_j their products imply (a lone key then gets dz = 0, as it should).
template <typename Op>
VERDICT_DEVICE void attention_backward_delta(float* __restrict__ delta, Tensor dout, Tensor out,
                                             const float* __restrict__ dout_scale, unsigned int rows,
                                             unsigned int head_dim) {
    const unsigned int row = blockIdx.x * FLASH_DELTA_ROWS + threadIdx.x / 32;
    if (row >= rows) {
        return;  // guard: the last block's extra warps (no barrier follows)
    }
    const float mul = *dout_scale;
    const unsigned long long base = (unsigned long long)row * head_dim;
    float sum = 0.0f;
    for (unsigned int d = threadIdx.x % 32; d < head_dim; d += 32) {
        sum += Op::widen(Op::round(mul * dout.load(base + d))) * out.load(base + d);
    }
    sum = warp_reduce(sum, SumOp());
    if (threadIdx.x % 32 == 0) {
        delta[row] = sum;
    }
}

// The shared tiles of a backward block (one query tile of BR rows, one key tile of BC keys).
template <int D, int BR, int BC>
struct FlashBackwardTiles {
    unsigned short (*q)[D + FLASH_PAD];
    unsigned short (*dout)[D + FLASH_PAD];
    unsigned short (*k)[D + FLASH_PAD];
    unsigned short (*v)[D + FLASH_PAD];
    unsigned short (*pt)[BR + FLASH_PAD];   // P^T [key][query], as operands
    unsigned short (*dzt)[BR + FLASH_PAD];  // dz^T [key][query], as operands
    float* lse;
    float* delta;
};

// Stages the query side of a backward step: Q, dout (times its scale) rows row0.. below
// row_limit of head h, and their lse and D.
template <typename Op, int D, int BR, int BC>
VERDICT_DEVICE void flash_stage_queries(const FlashBackwardTiles<D, BR, BC>& s, Tensor q, Tensor dout,
                                        float dout_mul,
                                        const float* __restrict__ lse, const float* __restrict__ delta,
                                        unsigned int row0, unsigned int row_limit, unsigned int h,
                                        unsigned int heads, unsigned int head_dim) {
    const unsigned long long width = (unsigned long long)heads * head_dim;
    const unsigned long long col0 = (unsigned long long)h * head_dim;
    flash_stage<Op, BR, D>(s.q, q, row0, row_limit, width, col0, head_dim);
    flash_stage<Op, BR, D>(s.dout, dout, row0, row_limit, width, col0, head_dim, dout_mul);
    for (unsigned int r = threadIdx.x; r < BR; r += FLASH_THREADS) {
        const bool in = row0 + r < row_limit;  // guard: rows past the limit are masked anyway
        s.lse[r] = in ? lse[(unsigned long long)(row0 + r) * heads + h] : 0.0f;
        s.delta[r] = in ? delta[(unsigned long long)(row0 + r) * heads + h] : 0.0f;
    }
}

// Phase 1: P^T and dz^T of keys k0.. (below key_limit) x rows row0.. (below row_limit) into
// s.pt, s.dzt. Warps take the (16 keys x 8 rows) units in turn; S^T = K Q^T and dP^T = V dout^T.
template <typename Op, int D, int BR, int BC>
VERDICT_DEVICE void flash_probabilities(const FlashBackwardTiles<D, BR, BC>& s, unsigned int k0,
                                        unsigned int key_limit, unsigned int row0,
                                        unsigned int row_limit, float scale, float softcap,
                                        unsigned int window) {
    const unsigned int warp = threadIdx.x / 32;
    const unsigned int g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
    for (unsigned int u = warp; u < (BC / 16) * (BR / 8); u += FLASH_WARPS) {  // warp-uniform
        const unsigned int kt = 16 * (u / (BR / 8));
        const unsigned int qt = 8 * (u % (BR / 8));
        float st[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        float dpt[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
        for (int kk = 0; kk < D; kk += 16) {
            unsigned int a[4], b[2];
            flash_a(a, s.k, kt, kk);
            flash_b_rows(b, s.q, kk, qt);
            Op::mma(st, a, b);
            flash_a(a, s.v, kt, kk);
            flash_b_rows(b, s.dout, kk, qt);
            Op::mma(dpt, a, b);
        }
        float p[4], dz[4];
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            const unsigned int key = kt + g + 8 * (c / 2);
            const unsigned int row = qt + 2 * t + (c & 1);
            float slope;
            const float capped = attention_cap(scale * st[c], softcap, &slope);
            const bool visible = attention_visible(k0 + key, row0 + row, key_limit, row_limit, window);
            p[c] = visible ? expf(capped - s.lse[row]) : 0.0f;
            dz[c] = visible ? p[c] * (dpt[c] - s.delta[row]) * slope : 0.0f;
        }
        *reinterpret_cast<unsigned int*>(&s.pt[kt + g][qt + 2 * t]) = Op::pack(p[0], p[1]);
        *reinterpret_cast<unsigned int*>(&s.pt[kt + g + 8][qt + 2 * t]) = Op::pack(p[2], p[3]);
        *reinterpret_cast<unsigned int*>(&s.dzt[kt + g][qt + 2 * t]) = Op::pack(dz[0], dz[1]);
        *reinterpret_cast<unsigned int*>(&s.dzt[kt + g + 8][qt + 2 * t]) = Op::pack(dz[2], dz[3]);
    }
}

// dV and dK tiles per warp: 8 of the 32 (16 x 8) tiles of each [BC, D] gradient.
#define FLASH_KV_TILES 8

// Phase 2 of the kv kernels: dV += P^T dout and dK += dz^T Q over the step's BR rows, warp w
// owning keys kt.. and columns of tiles nt0..nt0+7 of both.
template <typename Op, int D, int BR, int BC>
VERDICT_DEVICE void flash_accumulate_kv(float (&dk)[FLASH_KV_TILES][4], float (&dv)[FLASH_KV_TILES][4],
                                        const FlashBackwardTiles<D, BR, BC>& s) {
    static_assert((BC / 16) * (D / 8) == FLASH_WARPS * FLASH_KV_TILES, "8 tiles of dK, dV per warp");
    const unsigned int u0 = (threadIdx.x / 32) * FLASH_KV_TILES;
    const unsigned int kt = 16 * (u0 / (D / 8));
    const unsigned int nt0 = u0 % (D / 8);
#pragma unroll
    for (int kk = 0; kk < BR; kk += 16) {
        unsigned int ap[4], adz[4];
        flash_a(ap, s.pt, kt, kk);
        flash_a(adz, s.dzt, kt, kk);
#pragma unroll
        for (int i = 0; i < FLASH_KV_TILES; ++i) {
            unsigned int b[2];
            flash_b_columns(b, s.dout, kk, 8 * (nt0 + i));
            Op::mma(dv[i], ap, b);
            flash_b_columns(b, s.q, kk, 8 * (nt0 + i));
            Op::mma(dk[i], adz, b);
        }
    }
}

// dQ tiles per warp: (BR / 16) * (D / 8) tiles of [BR, D] over 4 warps.
template <int D, int BR>
struct FlashQTiles {
    enum { PER_WARP = (BR / 16) * (D / 8) / FLASH_WARPS };
};

// dQ += dz K over the step's BC keys; warp w owns rows qt.. and column tiles nt0...
template <typename Op, int D, int BR, int BC>
VERDICT_DEVICE void flash_accumulate_q(float (&dq)[FlashQTiles<D, BR>::PER_WARP][4],
                                       const FlashBackwardTiles<D, BR, BC>& s) {
    enum { PER_WARP = FlashQTiles<D, BR>::PER_WARP };
    const unsigned int u0 = (threadIdx.x / 32) * PER_WARP;
    const unsigned int qt = 16 * (u0 / (D / 8));
    const unsigned int nt0 = u0 % (D / 8);
#pragma unroll
    for (int kk = 0; kk < BC; kk += 16) {
        unsigned int a[4];
        flash_a_transposed(a, s.dzt, qt, kk);
#pragma unroll
        for (int i = 0; i < PER_WARP; ++i) {
            unsigned int b[2];
            flash_b_columns(b, s.k, kk, 8 * (nt0 + i));
            Op::mma(dq[i], a, b);
        }
    }
}

// Where element c of dQ tile i of this warp lands: (row in the step, column).
template <int D, int BR>
VERDICT_DEVICE void flash_q_element(int i, int c, unsigned int* row, unsigned int* col) {
    enum { PER_WARP = FlashQTiles<D, BR>::PER_WARP };
    const unsigned int u0 = (threadIdx.x / 32) * PER_WARP;
    const unsigned int g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
    *row = 16 * (u0 / (D / 8)) + g + 8 * (c / 2);
    *col = 8 * (u0 % (D / 8) + i) + 2 * t + (c & 1);
}

#define FLASH_BACKWARD_SHARED(D, BR, BC)                                            \
    __shared__ __align__(16) unsigned short q_s[BR][D + FLASH_PAD];                \
    __shared__ __align__(16) unsigned short do_s[BR][D + FLASH_PAD];               \
    __shared__ __align__(16) unsigned short k_s[BC][D + FLASH_PAD];                \
    __shared__ __align__(16) unsigned short v_s[BC][D + FLASH_PAD];                \
    __shared__ __align__(16) unsigned short pt_s[BC][BR + FLASH_PAD];              \
    __shared__ __align__(16) unsigned short dzt_s[BC][BR + FLASH_PAD];             \
    __shared__ float lse_s[BR];                                                    \
    __shared__ float delta_s[BR];                                                  \
    const FlashBackwardTiles<D, BR, BC> s = {q_s, do_s, k_s, v_s, pt_s, dzt_s, lse_s, delta_s};

template <typename Op, int D, bool ATOMIC_DQ>
VERDICT_DEVICE void attention_backward_kv(Tensor dk, Tensor dv, float* __restrict__ dq, Tensor dout,
                                          Tensor q, Tensor k, Tensor v, const float* __restrict__ lse,
                                          const float* __restrict__ delta,
                                          const float* __restrict__ dout_scale,
                                          const unsigned int* __restrict__ tiles, unsigned int heads,
                                          unsigned int kv_heads, unsigned int head_dim, float scale,
                                          float softcap, unsigned int window) {
    enum { BR = FlashTiles<D>::BWD_QUERIES, BC = FlashTiles<D>::BWD_KEYS };
    FLASH_BACKWARD_SHARED(D, BR, BC)
    const FlashTile tile = flash_tile(tiles);
    const unsigned int g_kv = blockIdx.y;
    const float dout_mul = *dout_scale;
    const float unscale = 1.0f / dout_mul;  // exact: a power of two
    const unsigned int group = heads / kv_heads;
    const unsigned int g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
    const unsigned long long kv_width = (unsigned long long)kv_heads * head_dim;
    const unsigned long long kv_col0 = (unsigned long long)g_kv * head_dim;
    const unsigned int key_limit = min(tile.first + BC, tile.end);
    // Queries that see a key of this tile: from its first key to its last key's window end.
    const unsigned int row_end = window == 0 ? tile.end : min(tile.end, key_limit - 1 + window);

    flash_stage<Op, BC, D>(s.k, k, tile.first, key_limit, kv_width, kv_col0, head_dim);
    flash_stage<Op, BC, D>(s.v, v, tile.first, key_limit, kv_width, kv_col0, head_dim);

    float dk_acc[FLASH_KV_TILES][4], dv_acc[FLASH_KV_TILES][4];
#pragma unroll
    for (int i = 0; i < FLASH_KV_TILES; ++i) {
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            dk_acc[i][c] = 0.0f;
            dv_acc[i][c] = 0.0f;
        }
    }
    for (unsigned int h = g_kv * group; h < (g_kv + 1) * group; ++h) {
        for (unsigned int row0 = tile.first; row0 < row_end; row0 += BR) {
            const unsigned int row_limit = min(row0 + BR, row_end);
            __syncthreads();  // the previous step's readers are done with q_s, do_s, pt_s, dzt_s
            flash_stage_queries<Op, D, BR, BC>(s, q, dout, dout_mul, lse, delta, row0, row_limit, h,
                                               heads, head_dim);
            __syncthreads();
            flash_probabilities<Op, D, BR, BC>(s, tile.first, key_limit, row0, row_limit, scale,
                                               softcap, window);
            __syncthreads();
            flash_accumulate_kv<Op, D, BR, BC>(dk_acc, dv_acc, s);
            if (ATOMIC_DQ) {
                float dq_acc[FlashQTiles<D, BR>::PER_WARP][4];
#pragma unroll
                for (int i = 0; i < FlashQTiles<D, BR>::PER_WARP; ++i) {
#pragma unroll
                    for (int c = 0; c < 4; ++c) {
                        dq_acc[i][c] = 0.0f;
                    }
                }
                flash_accumulate_q<Op, D, BR, BC>(dq_acc, s);
#pragma unroll
                for (int i = 0; i < FlashQTiles<D, BR>::PER_WARP; ++i) {
#pragma unroll
                    for (int c = 0; c < 4; ++c) {
                        unsigned int row, col;
                        flash_q_element<D, BR>(i, c, &row, &col);
                        if (row0 + row < row_limit && col < head_dim) {
                            atomicAdd(dq + (unsigned long long)(row0 + row) * heads * head_dim +
                                          (unsigned long long)h * head_dim + col,
                                      scale * unscale * dq_acc[i][c]);
                        }
                    }
                }
            }
        }
    }

    const unsigned int u0 = (threadIdx.x / 32) * FLASH_KV_TILES;
#pragma unroll
    for (int i = 0; i < FLASH_KV_TILES; ++i) {
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            const unsigned int key = tile.first + 16 * (u0 / (D / 8)) + g + 8 * (c / 2);
            const unsigned int col = 8 * (u0 % (D / 8) + i) + 2 * t + (c & 1);
            if (key < key_limit && col < head_dim) {  // guard: the tile's padding
                const unsigned long long at = (unsigned long long)key * kv_width + kv_col0 + col;
                dk.store(at, scale * unscale * dk_acc[i][c]);
                dv.store(at, unscale * dv_acc[i][c]);
            }
        }
    }
}

template <typename Op, int D>
VERDICT_DEVICE void attention_backward_q(Tensor dq, Tensor dout, Tensor q, Tensor k, Tensor v,
                                         const float* __restrict__ lse,
                                         const float* __restrict__ delta,
                                         const float* __restrict__ dout_scale,
                                         const unsigned int* __restrict__ tiles, unsigned int heads,
                                         unsigned int kv_heads, unsigned int head_dim, float scale,
                                         float softcap, unsigned int window) {
    enum { BR = FlashTiles<D>::BWD_QUERIES, BC = FlashTiles<D>::BWD_KEYS };
    enum { PER_WARP = FlashQTiles<D, BR>::PER_WARP };
    const float dout_mul = *dout_scale;
    FLASH_BACKWARD_SHARED(D, BR, BC)
    const FlashTile tile = flash_tile(tiles);
    const unsigned int h = blockIdx.y;
    const unsigned int g_kv = h / (heads / kv_heads);
    const unsigned long long kv_width = (unsigned long long)kv_heads * head_dim;
    const unsigned long long kv_col0 = (unsigned long long)g_kv * head_dim;
    const unsigned int row_limit = min(tile.first + BR, tile.end);

    flash_stage_queries<Op, D, BR, BC>(s, q, dout, dout_mul, lse, delta, tile.first, row_limit, h,
                                       heads, head_dim);
    float dq_acc[PER_WARP][4];
#pragma unroll
    for (int i = 0; i < PER_WARP; ++i) {
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            dq_acc[i][c] = 0.0f;
        }
    }
    for (unsigned int k0 = flash_first_key(tile, window); k0 < row_limit; k0 += BC) {
        const unsigned int key_limit = min(k0 + BC, row_limit);
        __syncthreads();  // the previous step's readers are done with k_s, v_s, dzt_s
        flash_stage<Op, BC, D>(s.k, k, k0, key_limit, kv_width, kv_col0, head_dim);
        flash_stage<Op, BC, D>(s.v, v, k0, key_limit, kv_width, kv_col0, head_dim);
        __syncthreads();
        flash_probabilities<Op, D, BR, BC>(s, k0, key_limit, tile.first, row_limit, scale, softcap,
                                           window);
        __syncthreads();
        flash_accumulate_q<Op, D, BR, BC>(dq_acc, s);
    }
#pragma unroll
    for (int i = 0; i < PER_WARP; ++i) {
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            unsigned int row, col;
            flash_q_element<D, BR>(i, c, &row, &col);
            if (tile.first + row < row_limit && col < head_dim) {  // guard: the tile's padding
                dq.store((unsigned long long)(tile.first + row) * heads * head_dim +
                             (unsigned long long)h * head_dim + col,
                         scale / dout_mul * dq_acc[i][c]);
            }
        }
    }
}

// ---- entry points: per operand type and compiled head size ----
// Every activation and gradient is a (pointer, dtype code) pair; lse, delta, the dout scale
// and the atomic variant's dq are f32 only.

#define FLASH_SETTINGS                                                                         \
    const unsigned int *__restrict__ tiles, unsigned int heads, unsigned int kv_heads,         \
        unsigned int head_dim, float scale, float softcap, unsigned int window
#define FLASH_INPUTS FLASH_TENSOR(q), FLASH_TENSOR(k), FLASH_TENSOR(v)
#define FLASH_GRADIENT_INPUTS                                                                  \
    FLASH_TENSOR(dout), FLASH_INPUTS, const float *__restrict__ lse,                           \
        const float *__restrict__ delta, const float *__restrict__ dout_scale
#define FLASH_GRADIENT_ARGS                                                                    \
    FLASH_AS_TENSOR(dout), FLASH_AS_TENSOR(q), FLASH_AS_TENSOR(k), FLASH_AS_TENSOR(v), lse,   \
        delta, dout_scale, tiles, heads, kv_heads, head_dim, scale, softcap, window

#define FLASH_ENTRIES(NAME, OP, D)                                                                   \
    extern "C" __global__ void __launch_bounds__(FLASH_THREADS) attention_forward_##NAME##_d##D(    \
        FLASH_TENSOR(out), float* __restrict__ lse, FLASH_INPUTS, FLASH_SETTINGS) {                  \
        attention_forward<OP, D>(FLASH_AS_TENSOR(out), lse, FLASH_AS_TENSOR(q), FLASH_AS_TENSOR(k), \
                                 FLASH_AS_TENSOR(v), tiles, heads, kv_heads, head_dim, scale,       \
                                 softcap, window);                                                   \
    }                                                                                                \
    extern "C" __global__ void __launch_bounds__(FLASH_THREADS) attention_backward_kv_##NAME##_d##D( \
        FLASH_TENSOR(dk), FLASH_TENSOR(dv), FLASH_GRADIENT_INPUTS, FLASH_SETTINGS) {                 \
        attention_backward_kv<OP, D, false>(FLASH_AS_TENSOR(dk), FLASH_AS_TENSOR(dv), nullptr,      \
                                            FLASH_GRADIENT_ARGS);                                    \
    }                                                                                                \
    extern "C" __global__ void __launch_bounds__(FLASH_THREADS)                                      \
        attention_backward_kv_atomic_##NAME##_d##D(FLASH_TENSOR(dk), FLASH_TENSOR(dv),               \
                                                   float* __restrict__ dq, FLASH_GRADIENT_INPUTS,    \
                                                   FLASH_SETTINGS) {                                 \
        attention_backward_kv<OP, D, true>(FLASH_AS_TENSOR(dk), FLASH_AS_TENSOR(dv), dq,            \
                                           FLASH_GRADIENT_ARGS);                                     \
    }                                                                                                \
    extern "C" __global__ void __launch_bounds__(FLASH_THREADS) attention_backward_q_##NAME##_d##D(  \
        FLASH_TENSOR(dq), FLASH_GRADIENT_INPUTS, FLASH_SETTINGS) {                                   \
        attention_backward_q<OP, D>(FLASH_AS_TENSOR(dq), FLASH_GRADIENT_ARGS);                       \
    }

#define FLASH_DELTA_ENTRY(NAME, OP)                                                               \
    extern "C" __global__ void __launch_bounds__(FLASH_THREADS) attention_backward_delta_##NAME(   \
        float* __restrict__ delta, FLASH_TENSOR(dout), FLASH_TENSOR(out),                          \
        const float* __restrict__ dout_scale, unsigned int rows, unsigned int head_dim) {         \
        attention_backward_delta<OP>(delta, FLASH_AS_TENSOR(dout), FLASH_AS_TENSOR(out),          \
                                     dout_scale, rows, head_dim);                                 \
    }

FLASH_DELTA_ENTRY(f16, OperandF16)
FLASH_DELTA_ENTRY(bf16, OperandBf16)
FLASH_ENTRIES(f16, OperandF16, 64)
FLASH_ENTRIES(f16, OperandF16, 128)
FLASH_ENTRIES(f16, OperandF16, 256)
FLASH_ENTRIES(bf16, OperandBf16, 64)
FLASH_ENTRIES(bf16, OperandBf16, 128)
FLASH_ENTRIES(bf16, OperandBf16, 256)
