// nf4.cu: bitsandbytes NF4 weights: dequantization, and the linear layer's products computed
// straight from the packed nibbles (the weight is never materialised whole).
//
// ---- the format (the checkpoint's, unchanged) ----
//   w[i] = NF4_CODE[nibble(i)] * absmax[i / blocksize]          one f32 multiply, bit-exact
//                                                               with bnb's dequantize_4bit
//   packed  u8 [ceil(n / 2)]  the row-major [out, in] weight; element 2k is the HIGH nibble of
//                             byte k, element 2k+1 the low nibble.
//   absmax  one f32 per block of `blocksize` consecutive (flat) elements, either
//     plain  ("weight.absmax" as f32), entry points *_plain / nf4_dequant_f32, or
//     nested (double quantization), entry points *_nested:
//            absmax[b] = nested_code[absmax_code[b]] * nested_absmax[b / 256] + offset
//            with absmax_code = "weight.absmax" (u8), nested_code = "weight.nested_quant_map"
//            (256 f32, the signed dynamic map), nested_absmax = "weight.nested_absmax",
//            offset = quant_state's "nested_offset". The multiply and the add are rounded
//            separately (no FMA), as PyTorch does them in two steps.
//   Every kernel decodes 16 consecutive elements at a time (one 64-bit load, nf4_decode16):
//   blocksize is a power of two >= 16 (bnb uses 32..4096), so 16 elements starting at a
//   multiple of 16 share one absmax, whose index is a shift. Nested blocks are 256 (the only
//   nested_blocksize bnb writes). The host launchers check all of this (the kernels trust it).
//
// ---- 1. nf4_dequant_{,nested_}f32: out = w, as f32 ----
//   Each thread reads 8 packed bytes and writes 16 outputs with 16-byte stores: pure
//   bandwidth (0.5 B in, 4 B out per element). (f16/bf16 outputs existed unlaunched and
//   untested until the emulator's coverage check found them; they return with the host code
//   of the half-precision path.) n may be odd or not a multiple of 16 (tail).
//   Launch: 256 threads (NF4_THREADS), ceil(ceil(n / 16) / 256) blocks. packed 8-byte and out
//   16-byte aligned (fresh allocations are 256-byte aligned).
//
// ---- 2. the products: X and out f32 or 16-bit in global memory, W NF4, f32 accumulation ----
//   forward   out[M, N] (=|+= alpha ·) X[M, K] · W[N, K]^T       W is [N, K]: NF4 rows = N
//   backward  dX[M, N] (=|+= alpha ·) dY[M, K] · W[K, N]          W is [K, N]: NF4 rows = K
//   accumulate = 0 overwrites, 1 adds alpha times the product (the trait's Store).
//   X (or dY) and out are each f32 or 16-bit (storage.cuh's Tensor: pointer and dtype code at
//   launch; the decoder's forward reads a 16-bit X and writes q, k, v, gate, up in 16 bits, o
//   and down in f32; the backward is f32 throughout). Arithmetic is f32 whatever they are; an
//   accumulating store into a 16-bit out reads it, adds in f32 and rounds once.
//   M, N and the backward's K are any size (guards: loads past an edge read 0, stores past an
//   edge are skipped). The NF4 weight's column count (forward K, backward N) must be a
//   multiple of 16 (NF4_GROUP): 16-element groups then never straddle a row, and X rows stay
//   aligned for vector loads (nf4_load4: 16 bytes of f32 or 8 bytes of 16-bit values). Other
//   shapes go through nf4_dequant + gemm_f32 (host).
//
//   nf4_mma_{bf16,f16}{,_backward}_{plain,nested}: tensor cores (mma.sync).
//     Operands: bf16 on sm_80+ (mma.m16n8k16.row.col.f32.bf16.bf16.f32), fp16 on sm_75
//     (two mma.m16n8k8.row.col.f32.f16.f16.f32 per 16 of K: sm_75 has no bf16 mma, and its
//     fp16 mma is the k8 shape only). The f16 entry points use the k8 form on every arch, so
//     a Hopper card can check the T4 code path (the selftest forces it there). X is rounded
//     to the operand type as it is staged into shared memory (a 16-bit X of that type stages
//     unchanged; one of the other 16-bit type is widened exactly and rounded once); each group
//     of 16 weights is decoded to f32 (the same product as nf4_dequant, bit for bit) and then
//     rounded.
//     Tile: a block of 4 warps computes 64 x 64 of out; warp w owns rows 32 (w / 2) + 0..31,
//     columns 32 (w % 2) + 0..31 as 2 x 4 mma tiles of 16 x 8 (32 f32 accumulators/thread).
//     Per step of 64 along K: X tile 64 x 64 and W tile 64 x 64 in shared memory as 16-bit
//     values, both K-contiguous, rows padded to 72 halves (36 words): the fragment loads
//     (lane l reads word (row g, k-pair t) with g = l / 4, t = l % 4) then hit 32 distinct
//     banks (36 g + t mod 32). The backward's W tile is stored transposed (b_s[n][k] =
//     W[k][n]): each thread decodes two consecutive W rows and writes their values as pairs,
//     which is exactly a fragment word. Software pipelining: the next step's global loads
//     (X 4 elements per vector load, W as 64-bit words) are issued into registers before the
//     current step's mma, and converted/stored after the barrier.
//     Launch: 128 threads (MMA_THREADS), grid (ceil(N / 64), ceil(M / 64)); static shared
//     memory 2 x 64 x 72 x 2 B + 64 B = 18 496 B (under the 48 KiB static limit of every arch).
//     The fused LoRA (the mma entry points' lora_* arguments, Nf4LowRank): the adapted
//     projection's forward out = X·W^T + s·(X·A^T)·B^T and its input gradient dX = dY·W +
//     s·(dY·B)·A are one product each: the rank-r factor (X·A^T or dY·B, [M, r], computed
//     before by gemm.cu) times B^T (or A) continues the reduction after the NF4 steps, in the
//     same accumulators (mma_stage tiles of K width r: one k16 step for r = 16), so out is
//     written once, without a [M, N] temporary or a second read-modify-write pass of out.
//   nf4_gemv_{plain,nested}: forward only, M <= 8 (NF4_GEMV_MAX_ROWS): a warp per output
//     feature n walks its W row in 512-element strides (lane l decodes elements 16 l..16 l+15,
//     a coalesced 256-byte read per warp), multiplies with up to 8 rows of X (nf4_load4,
//     L1/L2-resident), reduces each row's dot product across the warp. Plain f32 arithmetic:
//     a decode or a generation step is bound by the weight's bytes, not by FMAs.
//     Launch: 256 threads (8 warps, NF4_GEMV_THREADS), ceil(N / 8) blocks.
//   The backward has no GEMV path: training batches have many rows; M <= 8 runs the mma
//   kernel with mostly-empty tiles (correct, not fast).
//   Caveat on sm_75: fp16 operands overflow past 65504 and lose gradients under 6e-8
//   (subnormal floor); DESIGN §5's dynamic loss scaling must keep dY in range there.
//
// ---- ptxas (NVRTC 12.4; target/kernels-report/): registers, spills, shared memory ----
//   With X and out typed (storage.cuh's Tensor):
//                          sm_75        sm_80 / 86 / 89 / 90     spills  smem
//   nf4_mma_f16*            125-130      96-128 (96: backward     0       18 496 B
//                                        on sm_90)
//   nf4_mma_bf16*           63-64 (a     96-127                   0       18 496 B
//                           trap stub)
//   nf4_gemv_*              52-54        40-48                    0       64 B
//   (CUDA 13.0 with an f32-only X: 133-138 / 127-136 / 54-56, 48.)
//   (Before the fused LoRA term and the shared mma.cuh tiles: 163-168 registers, 3 blocks
//   per SM; now 128-138: 3 on sm_75, 4 where ptxas stays at 128. Speed to be measured.)
//   __launch_bounds__(128, 4) capped the old version at 128 with 32 bytes of spills on every
//   arch: rejected then. The PTX holds 32 mma.m16n8k16
//   (bf16) or 64 mma.m16n8k8 (f16) per K step of 64, and 16-byte (f32) or 8-byte (16-bit)
//   global loads of X.
//   Status: compiles for sm_75..sm_90; the index maps pass a CPU emulation
//   (backend/cuda/launch.rs tests). AWAITS ITS FIRST GPU RUN: `verdict selftest --device
//   cuda` checks every kernel, both absmax modes and both stores against the CPU reference.
//
// Variants (speed to be measured by `verdict bench kernels` on a GPU):
//   dequant v1  16 elements per thread, shared-memory code table, 256 threads.  <- shipped
//   products v0 nf4_dequant to a dense f32 W, then gemm_f32 (SIMT): 4.5x the weight's bytes
//               written and read again, no tensor cores. Kept for NF4 column counts that
//               are not a multiple of 16.
//   products v1 mma 64 x 64 x 64 tiles, 4 warps, register prefetch, no cp.async (X must be
//               converted anyway); GEMV for M <= 8.
//   products v2 v1 plus the fused LoRA term (extra K steps over the rank after the NF4
//               steps), the tiles shared with gemm.cu (mma.cuh).  <- shipped. Against v1
//               plus a separate up product (gemm_mma, accumulating into out): one read and
//               one write of the [M, N] f32 output fewer per adapted projection; `verdict
//               bench kernels` times `nf4_lora` against `nf4` at the same shapes.
#include "common.cuh"
#include "storage.cuh"
#include "mma.cuh"

#define NF4_THREADS 256
#define NF4_GROUP 16  // elements decoded together: one 64-bit load, one absmax
#define NF4_NESTED_BLOCK_SHIFT 8  // nested absmax blocks of 256 absmax values

// The tensor-core tiles (MMA_THREADS, MMA_TILE, MMA_K_TILE, MMA_STRIDE) are mma.cuh's.

#define NF4_GEMV_THREADS 256
#define NF4_GEMV_MAX_ROWS 8

__constant__ float NF4_CODE[16] = {
    -1.0f,        -0.6961928f,  -0.52507305f, -0.39491749f, -0.28444138f, -0.18477343f,
    -0.09105004f, 0.0f,         0.0795803f,   0.1609302f,   0.2461123f,   0.33791524f,
    0.44070983f,  0.562617f,    0.72295684f,  1.0f,
};

// Where a quantization block's absmax comes from.
struct PlainAbsmax {
    const float* absmax;
    VERDICT_DEVICE float operator()(unsigned long long block) const { return __ldg(absmax + block); }
};

struct NestedAbsmax {
    const unsigned char* absmax_code;
    const float* nested_code;
    const float* nested_absmax;
    float offset;
    VERDICT_DEVICE float operator()(unsigned long long block) const {
        const float code = __ldg(nested_code + __ldg(absmax_code + block));
        const float scale = __ldg(nested_absmax + (block >> NF4_NESTED_BLOCK_SHIFT));
        return __fadd_rn(__fmul_rn(code, scale), offset);
    }
};

// The 16 code values in shared memory: threads index them at random, which in __constant__
// memory would serialise the warp, while 16 distinct shared words never conflict. Every thread
// of the block must call this (it holds a barrier).
VERDICT_DEVICE void nf4_load_code(float* code) {
    if (threadIdx.x < 16) {
        code[threadIdx.x] = NF4_CODE[threadIdx.x];
    }
    __syncthreads();
}

// One group: the 8 packed bytes of flat elements first..first+15 (first a multiple of 16).
VERDICT_DEVICE unsigned long long nf4_load_group(const unsigned char* packed,
                                                 unsigned long long first) {
    return __ldg(reinterpret_cast<const unsigned long long*>(packed + first / 2));
}

// The group's 16 weights in f32; byte k of `bytes` is bits 8k..8k+7 (little-endian).
VERDICT_DEVICE void nf4_decode16(unsigned long long bytes, float scale, const float* code,
                                 float (&v)[NF4_GROUP]) {
#pragma unroll
    for (int k = 0; k < NF4_GROUP / 2; ++k) {
        const unsigned int byte = (unsigned int)(bytes >> (8 * k)) & 0xffu;
        v[2 * k] = code[byte >> 4] * scale;
        v[2 * k + 1] = code[byte & 0xfu] * scale;
    }
}

// ======================= 1. dequantization =======================

// How dequantized values are written.
struct StoreF32 {
    float* out;
    VERDICT_DEVICE void group(unsigned long long first, const float (&v)[NF4_GROUP]) const {
        float4* dst = reinterpret_cast<float4*>(out + first);
#pragma unroll
        for (int i = 0; i < NF4_GROUP / 4; ++i) {
            dst[i] = make_float4(v[4 * i], v[4 * i + 1], v[4 * i + 2], v[4 * i + 3]);
        }
    }
    VERDICT_DEVICE void one(unsigned long long i, float v) const { out[i] = v; }
};

template <typename Absmax, typename Store>
VERDICT_DEVICE void nf4_dequant(const unsigned char* __restrict__ packed, Absmax absmax, Store store,
                                unsigned long long n, unsigned int blocksize) {
    __shared__ float code[16];
    nf4_load_code(code);

    const unsigned long long first = global_thread_index() * NF4_GROUP;
    if (first >= n) {
        return;  // guard: the last block runs past the end
    }
    const float scale = absmax(first >> (__ffs(blocksize) - 1));

    if (first + NF4_GROUP <= n) {
        float v[NF4_GROUP];
        nf4_decode16(nf4_load_group(packed, first), scale, code, v);
        store.group(first, v);
    } else {
        // tail: fewer than 16 elements left, possibly an odd count
        for (unsigned long long i = first; i < n; ++i) {
            const unsigned int byte = packed[i / 2];
            store.one(i, code[(i & 1) ? (byte & 0xfu) : (byte >> 4)] * scale);
        }
    }
}

#define NF4_DEQUANT_ENTRY(NAME, OUT_T, STORE)                                                        \
    extern "C" __global__ void __launch_bounds__(NF4_THREADS)                                        \
        nf4_dequant_##NAME(const unsigned char* __restrict__ packed, const float* __restrict__ absmax, \
                           OUT_T* __restrict__ out, unsigned long long n, unsigned int blocksize) {    \
        nf4_dequant(packed, PlainAbsmax{absmax}, STORE{out}, n, blocksize);                          \
    }                                                                                                \
    extern "C" __global__ void __launch_bounds__(NF4_THREADS) nf4_dequant_nested_##NAME(            \
        const unsigned char* __restrict__ packed, const unsigned char* __restrict__ absmax_code,     \
        const float* __restrict__ nested_code, const float* __restrict__ nested_absmax, float offset, \
        OUT_T* __restrict__ out, unsigned long long n, unsigned int blocksize) {                     \
        nf4_dequant(packed, NestedAbsmax{absmax_code, nested_code, nested_absmax, offset}, STORE{out}, \
                    n, blocksize);                                                                   \
    }

NF4_DEQUANT_ENTRY(f32, float, StoreF32)

// ======================= 2. the products =======================

// out = accumulate ? out + alpha * acc : acc, the trait's Store.
VERDICT_DEVICE void nf4_store(Tensor out, unsigned long long i, float acc, float alpha,
                              unsigned int accumulate) {
    out.store(i, accumulate ? out.load(i) + alpha * acc : acc);
}

// A 16-bit activation value of type `dtype` (DTYPE_F16 or DTYPE_BF16), widened exactly.
VERDICT_DEVICE float nf4_widen(unsigned int dtype, unsigned int bits) {
    const unsigned short h = (unsigned short)bits;
    return dtype == DTYPE_F16 ? f16_bits_to_f32(h) : bf16_bits_to_f32(h);
}

// x[i .. i + 3] widened to f32 in one vector load: 16 bytes of f32 or 8 bytes of 16-bit values
// (i a multiple of 4 and x's rows so aligned: the host's and the kernels' shape rules).
VERDICT_DEVICE float4 nf4_load4(Tensor x, unsigned long long i) {
    if (x.dtype == DTYPE_F32) {
        return __ldg(reinterpret_cast<const float4*>(static_cast<const float*>(x.p) + i));
    }
    const uint2 w = __ldg(reinterpret_cast<const uint2*>(static_cast<const unsigned short*>(x.p) + i));
    return make_float4(nf4_widen(x.dtype, w.x & 0xffffu), nf4_widen(x.dtype, w.x >> 16),
                       nf4_widen(x.dtype, w.y & 0xffffu), nf4_widen(x.dtype, w.y >> 16));
}

// Tensor-core operands (OperandBf16, OperandF16: rounding, fragment words, the mma and its
// fragment layout) and the block tiles (mma_warp_tile, mma_stage, mma_store) are in mma.cuh,
// shared with gemm.cu (and the operands with attention.cu).

// The next K step's global data, held in registers while the current step computes.
struct Nf4MmaStage {
    float4 a[MMA_TILE * MMA_K_TILE / 4 / MMA_THREADS];  // 8 float4 of X
    unsigned long long w[2];  // two groups of 16 packed weights
    float scale[2];           // and their absmax (0 past an edge: decodes to zeros)
};

// X tile element e = 4 (r * 128 + tid) .. +3 is row (r * 128 + tid) / 16, column 4 ((r * 128 +
// tid) % 16): 16 threads read one row's 64 consecutive elements. `vec4` (K % 4 == 0) allows
// vector loads (nf4_load4); otherwise (the backward's K = out_features can be anything) scalar
// loads. Held in registers as f32 whatever X's type (a 16-bit value widens exactly).
VERDICT_DEVICE void nf4_mma_load_x(Nf4MmaStage& s, Tensor x, unsigned int M, unsigned int K,
                                   unsigned int m0, unsigned int k0, bool vec4) {
#pragma unroll
    for (int r = 0; r < MMA_TILE * MMA_K_TILE / 4 / MMA_THREADS; ++r) {
        const unsigned int e = r * MMA_THREADS + threadIdx.x;
        const unsigned int m = m0 + e / (MMA_K_TILE / 4);
        const unsigned int k = k0 + 4 * (e % (MMA_K_TILE / 4));
        const unsigned long long row = (unsigned long long)m * K;
        float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);  // guard: past M or K reads 0
        if (m < M && vec4) {
            if (k < K) {
                v = nf4_load4(x, row + k);
            }
        } else if (m < M) {
            v.x = k < K ? x.load(row + k) : 0.0f;
            v.y = k + 1 < K ? x.load(row + k + 1) : 0.0f;
            v.z = k + 2 < K ? x.load(row + k + 2) : 0.0f;
            v.w = k + 3 < K ? x.load(row + k + 3) : 0.0f;
        }
        s.a[r] = v;
    }
}

template <typename Op>
VERDICT_DEVICE void nf4_mma_store_x(unsigned short (*a_s)[MMA_STRIDE], const Nf4MmaStage& s) {
#pragma unroll
    for (int r = 0; r < MMA_TILE * MMA_K_TILE / 4 / MMA_THREADS; ++r) {
        const unsigned int e = r * MMA_THREADS + threadIdx.x;
        const float4 v = s.a[r];
        *reinterpret_cast<uint2*>(&a_s[e / (MMA_K_TILE / 4)][4 * (e % (MMA_K_TILE / 4))]) =
            make_uint2(Op::pack(v.x, v.y), Op::pack(v.z, v.w));
    }
}

// W groups of one step. Forward (W [N, K], b_s[n][k] = W[n0 + n][k0 + k]): group e = r * 128 +
// tid (r < 2) is tile row e / 4, columns 16 (e % 4) .. +15. Backward (W [K, N], b_s[n][k] =
// W[k0 + k][n0 + n]): thread tid takes W rows k0 + 2 (tid % 32) + r (r < 2), columns
// n0 + 16 (tid / 32) .. +15, so each lane ends up with the two rows of one fragment word.
template <bool Backward>
struct Nf4WeightTile {
    // (W row, W column) of group r of this thread, relative to the tile's corner.
    static VERDICT_DEVICE unsigned int row(int r) {
        return Backward ? 2 * (threadIdx.x % 32) + r : (r * MMA_THREADS + threadIdx.x) / 4;
    }
    static VERDICT_DEVICE unsigned int col(int r) {
        return Backward ? NF4_GROUP * (threadIdx.x / 32)
                        : NF4_GROUP * ((r * MMA_THREADS + threadIdx.x) % 4);
    }
};

// w_rows x w_cols is the whole NF4 weight; (row0, col0) the tile's corner in it.
template <bool Backward, typename Absmax>
VERDICT_DEVICE void nf4_mma_load_w(Nf4MmaStage& s, const unsigned char* __restrict__ packed,
                                   Absmax absmax, unsigned int w_rows, unsigned int w_cols,
                                   unsigned int row0, unsigned int col0, unsigned int block_shift) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const unsigned int row = row0 + Nf4WeightTile<Backward>::row(r);
        const unsigned int col = col0 + Nf4WeightTile<Backward>::col(r);
        s.w[r] = 0;
        s.scale[r] = 0.0f;  // guard: groups past the weight's edge decode to (signed) zeros
        if (row < w_rows && col < w_cols) {  // w_cols % 16 == 0: a group is all in or all out
            const unsigned long long first = (unsigned long long)row * w_cols + col;
            s.w[r] = nf4_load_group(packed, first);
            s.scale[r] = absmax(first >> block_shift);
        }
    }
}

// Forward: group r of this thread into its tile row as 8 words (two 16-byte stores).
template <typename Op>
VERDICT_DEVICE void nf4_mma_store_group(unsigned short (*b_s)[MMA_STRIDE], int r,
                                        const float (&v)[NF4_GROUP]) {
    unsigned int p[NF4_GROUP / 2];
#pragma unroll
    for (int i = 0; i < NF4_GROUP / 2; ++i) {
        p[i] = Op::pack(v[2 * i], v[2 * i + 1]);
    }
    uint4* dst = reinterpret_cast<uint4*>(
        &b_s[Nf4WeightTile<false>::row(r)][Nf4WeightTile<false>::col(r)]);
    dst[0] = make_uint4(p[0], p[1], p[2], p[3]);
    dst[1] = make_uint4(p[4], p[5], p[6], p[7]);
}

template <typename Op, bool Backward>
VERDICT_DEVICE void nf4_mma_store_w(unsigned short (*b_s)[MMA_STRIDE], const Nf4MmaStage& s,
                                    const float* code) {
    float v0[NF4_GROUP], v1[NF4_GROUP];
    nf4_decode16(s.w[0], s.scale[0], code, v0);
    nf4_decode16(s.w[1], s.scale[1], code, v1);
    if (Backward) {
        // v0[j] = W[k, n], v1[j] = W[k + 1, n] for k = 2 (tid % 32), n = 16 (tid / 32) + j: one
        // word of b_s row n. A warp writes 32 consecutive words of a row per j: no conflicts.
        const unsigned int k = Nf4WeightTile<true>::row(0);
        const unsigned int n = Nf4WeightTile<true>::col(0);
#pragma unroll
        for (int j = 0; j < NF4_GROUP; ++j) {
            *reinterpret_cast<unsigned int*>(&b_s[n + j][k]) = Op::pack(v0[j], v1[j]);
        }
    } else {
        nf4_mma_store_group<Op>(b_s, 0, v0);
        nf4_mma_store_group<Op>(b_s, 1, v1);
    }
}

// A LoRA term the NF4 product adds (the fused LoRA forward and backward, see the header):
// out += scale · x[M, R] · w(n, r) with x row-major and w(n, r) = w[n * w_row + r * w_r], each
// of any type (the host's: f32). R = 0: none.
struct Nf4LowRank {
    Tensor x;
    Tensor w;
    unsigned int R;
    unsigned long long w_row;
    unsigned long long w_r;
    float scale;
};

// out[M, N] (=|+= alpha ·) (A[M, K] · B[K, N] + low-rank term) with A = x (row-major, row
// stride K) and B from the NF4 weight (see the header). Block (blockIdx.x, blockIdx.y) owns
// out rows 64 blockIdx.y .. +63 and columns 64 blockIdx.x .. +63.
template <typename Op, bool Backward, typename Absmax>
VERDICT_DEVICE void nf4_mma(Tensor out, Tensor x, const unsigned char* __restrict__ packed,
                            Absmax absmax, unsigned int M, unsigned int N, unsigned int K,
                            unsigned int blocksize, float alpha, unsigned int accumulate, Nf4LowRank lora) {
    __shared__ __align__(16) unsigned short a_s[MMA_TILE][MMA_STRIDE];
    __shared__ __align__(16) unsigned short b_s[MMA_TILE][MMA_STRIDE];
    __shared__ float code[16];
    nf4_load_code(code);

    const unsigned int m0 = blockIdx.y * MMA_TILE;
    const unsigned int n0 = blockIdx.x * MMA_TILE;
    const unsigned int block_shift = __ffs(blocksize) - 1;
    const bool vec4 = K % 4 == 0;
    // The NF4 weight's shape: [N, K] forward, [K, N] backward.
    const unsigned int w_rows = Backward ? K : N;
    const unsigned int w_cols = Backward ? N : K;

    float acc[2][4][4];
    mma_zero(acc);

    Nf4MmaStage stage;
    nf4_mma_load_x(stage, x, M, K, m0, 0, vec4);
    nf4_mma_load_w<Backward>(stage, packed, absmax, w_rows, w_cols, Backward ? 0 : n0,
                             Backward ? n0 : 0, block_shift);
    for (unsigned int k0 = 0; k0 < K; k0 += MMA_K_TILE) {
        nf4_mma_store_x<Op>(a_s, stage);
        nf4_mma_store_w<Op, Backward>(b_s, stage, code);
        __syncthreads();
        const unsigned int next = k0 + MMA_K_TILE;
        if (next < K) {  // prefetch: these loads fly while the tensor cores work
            nf4_mma_load_x(stage, x, M, K, m0, next, vec4);
            nf4_mma_load_w<Backward>(stage, packed, absmax, w_rows, w_cols, Backward ? next : n0,
                                     Backward ? n0 : next, block_shift);
        }
        mma_warp_tile<Op>(acc, a_s, b_s, MMA_K_TILE);
        __syncthreads();  // the next step overwrites the tiles
    }
    // The LoRA term continues the same reduction over the rank: the accumulators take it
    // before the one store, so out is written once (no second pass over [M, N]).
    for (unsigned int r0 = 0; r0 < lora.R; r0 += MMA_K_TILE) {
        mma_stage<Op>(a_s, lora.x, M, lora.R, m0, r0, lora.R, 1, lora.scale, NoDropout());
        mma_stage<Op>(b_s, lora.w, N, lora.R, n0, r0, lora.w_row, lora.w_r, 1.0f, NoDropout());
        __syncthreads();
        mma_warp_tile<Op>(acc, a_s, b_s, mma_k_len(lora.R - r0));
        __syncthreads();
    }
    mma_store(out, acc, M, N, m0, n0, alpha, accumulate, NoDropout());
}

// out[M, N] (=|+= alpha ·) X[M, K] · W[N, K]^T for M <= 8, in f32 (see the header).
template <typename Absmax>
VERDICT_DEVICE void nf4_gemv(Tensor out, Tensor x, const unsigned char* __restrict__ packed,
                             Absmax absmax, unsigned int M, unsigned int N, unsigned int K,
                             unsigned int blocksize, float alpha, unsigned int accumulate) {
    __shared__ float code[16];
    nf4_load_code(code);
    const unsigned int lane = threadIdx.x % 32;
    const unsigned int n = blockIdx.x * (NF4_GEMV_THREADS / 32) + threadIdx.x / 32;
    if (n >= N) {
        return;  // guard: the last block's extra warps (no barrier follows)
    }
    const unsigned int block_shift = __ffs(blocksize) - 1;
    float acc[NF4_GEMV_MAX_ROWS];
#pragma unroll
    for (int m = 0; m < NF4_GEMV_MAX_ROWS; ++m) {
        acc[m] = 0.0f;
    }
    for (unsigned int k = NF4_GROUP * lane; k < K; k += NF4_GROUP * 32) {
        const unsigned long long first = (unsigned long long)n * K + k;
        float w[NF4_GROUP];
        nf4_decode16(nf4_load_group(packed, first), absmax(first >> block_shift), code, w);
#pragma unroll
        for (int m = 0; m < NF4_GEMV_MAX_ROWS; ++m) {
            if (m < M) {
                const unsigned long long xm = (unsigned long long)m * K + k;
#pragma unroll
                for (int q = 0; q < NF4_GROUP / 4; ++q) {
                    const float4 v = nf4_load4(x, xm + 4 * q);
                    acc[m] += v.x * w[4 * q] + v.y * w[4 * q + 1] + v.z * w[4 * q + 2] +
                              v.w * w[4 * q + 3];
                }
            }
        }
    }
#pragma unroll
    for (int m = 0; m < NF4_GEMV_MAX_ROWS; ++m) {
        if (m < M) {  // uniform across the warp: every lane joins the reduction
            const float sum = warp_reduce(acc[m], SumOp());
            if (lane == 0) {
                nf4_store(out, (unsigned long long)m * N + n, sum, alpha, accumulate);
            }
        }
    }
}

// Arguments shared by every product entry point, then the absmax tables of one mode.
#define NF4_PRODUCT_ARGS                                                                       \
    void *out, unsigned int out_dtype, const void *x, unsigned int x_dtype,                        \
        const unsigned char *__restrict__ packed, unsigned int M, unsigned int N, unsigned int K,  \
        unsigned int blocksize, float alpha, unsigned int accumulate
#define NF4_PLAIN_ARGS const float *__restrict__ absmax
#define NF4_NESTED_ARGS                                                                          \
    const unsigned char *__restrict__ absmax_code, const float *__restrict__ nested_code,            \
        const float *__restrict__ nested_absmax, float offset
#define NF4_PLAIN PlainAbsmax{absmax}
#define NF4_NESTED NestedAbsmax{absmax_code, nested_code, nested_absmax, offset}

// The tensor-core entry points also take a LoRA term (KIND lora: Nf4LowRank, lora_rank = 0 for
// none); the GEMV takes none (KIND plain_product).
#define NF4_EXTRA_ARGS_lora                                                                        \
    , const void *lora_x, unsigned int lora_x_dtype, const void *lora_w, unsigned int lora_w_dtype, \
        unsigned int lora_rank, unsigned long long lora_w_row, unsigned long long lora_w_r,        \
        float lora_scale
#define NF4_EXTRA_lora                                                                             \
    , Nf4LowRank{Tensor{lora_x, lora_x_dtype}, Tensor{lora_w, lora_w_dtype}, lora_rank, lora_w_row, \
                 lora_w_r, lora_scale}
#define NF4_EXTRA_ARGS_plain_product
#define NF4_EXTRA_plain_product

#define NF4_PRODUCT_ENTRY(NAME, THREADS, CALL, MODE, MODE_ARGS, ABSMAX, KIND)                         \
    extern "C" __global__ void __launch_bounds__(THREADS)                                            \
        NAME##_##MODE(NF4_PRODUCT_ARGS, MODE_ARGS NF4_EXTRA_ARGS_##KIND) {                           \
        CALL(Tensor{out, out_dtype}, Tensor{x, x_dtype}, packed, ABSMAX, M, N, K, blocksize, alpha,  \
             accumulate NF4_EXTRA_##KIND);                                                           \
    }
#define NF4_PRODUCT_ENTRIES(NAME, THREADS, CALL, KIND)                                               \
    NF4_PRODUCT_ENTRY(NAME, THREADS, CALL, plain, NF4_PLAIN_ARGS, NF4_PLAIN, KIND)                   \
    NF4_PRODUCT_ENTRY(NAME, THREADS, CALL, nested, NF4_NESTED_ARGS, NF4_NESTED, KIND)

NF4_PRODUCT_ENTRIES(nf4_mma_bf16, MMA_THREADS, (nf4_mma<OperandBf16, false>), lora)
NF4_PRODUCT_ENTRIES(nf4_mma_f16, MMA_THREADS, (nf4_mma<OperandF16, false>), lora)
NF4_PRODUCT_ENTRIES(nf4_mma_bf16_backward, MMA_THREADS, (nf4_mma<OperandBf16, true>), lora)
NF4_PRODUCT_ENTRIES(nf4_mma_f16_backward, MMA_THREADS, (nf4_mma<OperandF16, true>), lora)
NF4_PRODUCT_ENTRIES(nf4_gemv, NF4_GEMV_THREADS, nf4_gemv, plain_product)
