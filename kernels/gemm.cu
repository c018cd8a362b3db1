// gemm.cu: the dense products (a linear layer's three products with an f32 weight, LoRA's
// down and up products and weight gradients, the classification head), one strided product
// on CUDA cores (gemm_f32) and on tensor cores (gemm_mma_f16 | gemm_mma_bf16).
//
// What it computes: for m < M, n < N, with A(m, k) = a[m * a_row + k * a_k] and
// B(n, k) = b[n * b_row + k * b_k] (strides in elements):
//   acc = sum_{k < K} A(m, k) * B(n, k)                    (f32 FMAs, k in tile order)
//   out[m, n] = acc                                         accumulate = 0 (Store::Overwrite)
//   out[m, n] = out[m, n] + alpha * acc                     accumulate = 1 (Store::Accumulate)
// out is [M, N] row-major. a, b and out are each f32 or 16-bit (storage.cuh's Tensor: pointer
// and dtype code per tensor at launch; the decoder's X is 16-bit, its gradients f32), the
// arithmetic f32 whatever they are; an accumulating store into a 16-bit out reads it, adds in
// f32 and rounds once. The host picks the strides (backend/cuda/gemm.rs):
//   forward      out = X . W^T    A = X [rows, in] (in, 1),    B = W [out, in] (in, 1)
//   input grad   dX = dY . W      A = dY [rows, out] (out, 1), B = W^T: (1, in)
//   weight grad  dW += s dY^T X   A = dY^T: (1, out),          B = X^T: (1, in)
// NF4 weights whose columns are off nf4.cu's 16-element group are dequantized to a dense W
// first (nf4.cu) by the host.
//
// ---- gemm_f32: f32 FMAs on CUDA cores (the device's f32 reference, and the fallback of NF4
// widths off the group) ----
// Algorithm: classic shared-memory tiling. A block computes a 64 x 64 tile of out, walking K
//   in steps of 16: it stages A[64 rows, 16] and B[64 rows, 16] in shared memory, transposed
//   to [16][64 + 1] (k-major, so the inner loop reads a row of each; the +1 column makes the
//   transposing stores conflict-free), then each thread does 16 x 4 x 4 FMAs into a 4 x 4
//   register tile. Thread (tx, ty) = (tid % 16, tid / 16) owns rows ty + 16 i and columns
//   tx + 16 j (i, j < 4): strided rather than adjacent, so the 16 threads of a half-warp
//   read 16 consecutive shared words (no bank conflicts) and write 16 consecutive floats
//   of out (coalesced).
// Loads: a half-warp reads 16 consecutive k of one row, coalesced when the k stride is 1
//   (the forward); the gradients' transposed operands read with a stride (v1 accepts that).
// Guards: M, N and K need not be multiples of anything (M = 1, 7, 333 are tested): loads
//   past an edge read 0 (adding nothing), stores past an edge are skipped.
// Launch: blockDim.x = 256 (fixed by __launch_bounds__), gridDim = (ceil(N / 64),
//   ceil(M / 64)); the host checks gridDim.y <= 65535 (M < 4.2 million rows).
//
//
// ---- gemm_mma_{f16,bf16}: tensor cores (mma.sync), what the CUDA backend's products use ----
// The same product, strides and stores, plus an optional dropout mask (common.cuh's Dropout,
// by element offset) on one of A, B or out (`dropout_on`: GEMM_DROPOUT_*): LoRA's input
// dropout without a dropped copy of the input, in its down product (mask on A = X), its dA
// product (mask on B = X^T) and its input gradient (mask on out = dX).
// Operands: f32 or 16-bit in global memory, rounded to the operand type as they are staged
// (f16 on sm_75: two mma.m16n8k8 per 16 of K; bf16 on sm_80+: mma.m16n8k16; mma.cuh), f32
// accumulation. An operand already of the kernel's type stages unchanged (the tiles of the
// f32 path on the same values); one of the other 16-bit type (f16 data into the bf16 kernel)
// is widened exactly and rounded once, like an f32 operand. Tiles: mma.cuh's block tiles (4
// warps, 64 x 64 of out, K steps of 64); each K step stages A and B with mma_stage
// (coalesced along whichever dimension is contiguous), then one barrier, the warps' mma,
// another barrier. No prefetch into registers (nf4.cu's
// pipelining) in v1: LoRA products are thin (rank 16) and the weight gradients' transposed
// operands are strided anyway.
// Launch: 128 threads (MMA_THREADS), grid (ceil(N / 64), ceil(M / 64)); static shared memory
//   2 x 64 x 72 x 2 B = 18 432 B. ptxas (NVRTC 12.4, target/kernels-report/, typed tensors):
//   64 registers on sm_80/89/90, 74-80 on sm_86, 72 for f16 on sm_75 (CUDA 13.0 with f32-only
//   operands: 60-64, 80); gemm_f32 48-57; no spills.
//
// Variants (speed to be measured by `verdict bench kernels` against cuBLAS via PyTorch):
//   v1  gemm_f32: 64 x 64 x 16 tiles, 4 x 4 per thread, scalar strided loads, CUDA cores.
//   v2  gemm_mma: tensor cores, 64 x 64 x 64 tiles, no prefetch.  <- shipped for every product
#include "common.cuh"
#include "storage.cuh"
#include "mma.cuh"

#define GEMM_THREADS 256
#define GEMM_TILE 64
#define GEMM_K_STEP 16
#define GEMM_PER_THREAD 4
#define GEMM_STRIDE (GEMM_TILE / GEMM_PER_THREAD)  // 16: distance between a thread's rows

VERDICT_DEVICE void gemm(Tensor out, Tensor a, Tensor b, unsigned int M, unsigned int N,
                         unsigned int K, unsigned long long a_row, unsigned long long a_k,
                         unsigned long long b_row, unsigned long long b_k, float alpha,
                         unsigned int accumulate) {
    __shared__ float a_s[GEMM_K_STEP][GEMM_TILE + 1];
    __shared__ float b_s[GEMM_K_STEP][GEMM_TILE + 1];
    const unsigned int tx = threadIdx.x % GEMM_STRIDE;
    const unsigned int ty = threadIdx.x / GEMM_STRIDE;
    const unsigned int m0 = blockIdx.y * GEMM_TILE;
    const unsigned int n0 = blockIdx.x * GEMM_TILE;
    // Tile loads: element e = tid + 256 r of the 64 x 16 tile is row e / 16, column e % 16,
    // so a half-warp reads 16 consecutive k of one row.
    const unsigned int load_k = threadIdx.x % GEMM_K_STEP;
    const unsigned int load_row = threadIdx.x / GEMM_K_STEP;

    float acc[GEMM_PER_THREAD][GEMM_PER_THREAD];
#pragma unroll
    for (int i = 0; i < GEMM_PER_THREAD; ++i) {
#pragma unroll
        for (int j = 0; j < GEMM_PER_THREAD; ++j) {
            acc[i][j] = 0.0f;
        }
    }

    for (unsigned int k0 = 0; k0 < K; k0 += GEMM_K_STEP) {
        const unsigned int k = k0 + load_k;
#pragma unroll
        for (int r = 0; r < GEMM_TILE * GEMM_K_STEP / GEMM_THREADS; ++r) {
            const unsigned int row = load_row + r * (GEMM_THREADS / GEMM_K_STEP);
            const unsigned int m = m0 + row;
            const unsigned int n = n0 + row;
            // guards: rows past M or N and columns past K load 0, which adds nothing
            a_s[load_k][row] = (m < M && k < K) ? a.load(m * a_row + k * a_k) : 0.0f;
            b_s[load_k][row] = (n < N && k < K) ? b.load(n * b_row + k * b_k) : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < GEMM_K_STEP; ++kk) {
            float a[GEMM_PER_THREAD], b[GEMM_PER_THREAD];
#pragma unroll
            for (int i = 0; i < GEMM_PER_THREAD; ++i) {
                a[i] = a_s[kk][ty + i * GEMM_STRIDE];
                b[i] = b_s[kk][tx + i * GEMM_STRIDE];
            }
#pragma unroll
            for (int i = 0; i < GEMM_PER_THREAD; ++i) {
#pragma unroll
                for (int j = 0; j < GEMM_PER_THREAD; ++j) {
                    acc[i][j] += a[i] * b[j];
                }
            }
        }
        __syncthreads();  // the next step overwrites the tiles
    }

#pragma unroll
    for (int i = 0; i < GEMM_PER_THREAD; ++i) {
        const unsigned int m = m0 + ty + i * GEMM_STRIDE;
#pragma unroll
        for (int j = 0; j < GEMM_PER_THREAD; ++j) {
            const unsigned int n = n0 + tx + j * GEMM_STRIDE;
            if (m < M && n < N) {  // guard: the edge tiles run past the matrix
                const unsigned long long o = (unsigned long long)m * N + n;
                out.store(o, accumulate ? out.load(o) + alpha * acc[i][j] : acc[i][j]);
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(GEMM_THREADS)
    gemm_f32(void* out, unsigned int out_dtype, const void* a, unsigned int a_dtype, const void* b,
             unsigned int b_dtype, unsigned int M, unsigned int N, unsigned int K,
             unsigned long long a_row, unsigned long long a_k, unsigned long long b_row,
             unsigned long long b_k, float alpha, unsigned int accumulate) {
    gemm(Tensor{out, out_dtype}, Tensor{a, a_dtype}, Tensor{b, b_dtype}, M, N, K, a_row, a_k, b_row,
         b_k, alpha, accumulate);
}

// Where gemm_mma applies its dropout mask (`dropout_on`).
#define GEMM_DROPOUT_NONE 0u
#define GEMM_DROPOUT_A 1u
#define GEMM_DROPOUT_B 2u
#define GEMM_DROPOUT_OUT 3u

template <typename Op>
VERDICT_DEVICE void gemm_mma(Tensor out, Tensor a, Tensor b, unsigned int M, unsigned int N,
                             unsigned int K, unsigned long long a_row, unsigned long long a_k,
                             unsigned long long b_row, unsigned long long b_k, float alpha,
                             unsigned int accumulate, unsigned int dropout_on, Dropout drop) {
    __shared__ __align__(16) unsigned short a_s[MMA_TILE][MMA_STRIDE];
    __shared__ __align__(16) unsigned short b_s[MMA_TILE][MMA_STRIDE];
    const unsigned int m0 = blockIdx.y * MMA_TILE;
    const unsigned int n0 = blockIdx.x * MMA_TILE;
    float acc[2][4][4];
    mma_zero(acc);
    for (unsigned int k0 = 0; k0 < K; k0 += MMA_K_TILE) {
        if (dropout_on == GEMM_DROPOUT_A) {
            mma_stage<Op>(a_s, a, M, K, m0, k0, a_row, a_k, 1.0f, drop);
        } else {
            mma_stage<Op>(a_s, a, M, K, m0, k0, a_row, a_k, 1.0f, NoDropout());
        }
        if (dropout_on == GEMM_DROPOUT_B) {
            mma_stage<Op>(b_s, b, N, K, n0, k0, b_row, b_k, 1.0f, drop);
        } else {
            mma_stage<Op>(b_s, b, N, K, n0, k0, b_row, b_k, 1.0f, NoDropout());
        }
        __syncthreads();
        mma_warp_tile<Op>(acc, a_s, b_s, mma_k_len(K - k0));
        __syncthreads();  // the next step overwrites the tiles
    }
    if (dropout_on == GEMM_DROPOUT_OUT) {
        mma_store(out, acc, M, N, m0, n0, alpha, accumulate, drop);
    } else {
        mma_store(out, acc, M, N, m0, n0, alpha, accumulate, NoDropout());
    }
}

#define GEMM_MMA_ENTRY(NAME, OP)                                                                     \
    extern "C" __global__ void __launch_bounds__(MMA_THREADS) NAME(                                 \
        void* out, unsigned int out_dtype, const void* a, unsigned int a_dtype, const void* b,      \
        unsigned int b_dtype, unsigned int M, unsigned int N, unsigned int K,                       \
        unsigned long long a_row, unsigned long long a_k, unsigned long long b_row,                 \
        unsigned long long b_k, float alpha, unsigned int accumulate, unsigned int dropout_on,      \
        float dropout_p, float keep_scale, unsigned long long seed) {                               \
        gemm_mma<OP>(Tensor{out, out_dtype}, Tensor{a, a_dtype}, Tensor{b, b_dtype}, M, N, K,       \
                     a_row, a_k, b_row, b_k, alpha, accumulate, dropout_on,                         \
                     Dropout{dropout_p, keep_scale, seed});                                         \
    }

GEMM_MMA_ENTRY(gemm_mma_f16, OperandF16)
GEMM_MMA_ENTRY(gemm_mma_bf16, OperandBf16)
