// mma.cuh: tensor-core operands shared by the kernels that use mma.sync (nf4.cu, attention.cu):
// how f32 values become 16-bit operands, how two of them become one 32-bit fragment word, and
// the mma itself, per operand type.
//
//   OperandBf16  mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 (sm_80 and newer; on sm_75
//                a __trap(): the hosts pick f16 there)
//   OperandF16   two mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 per 16 of K (sm_75, the
//                T4's only tensor-core shape for f16; the same code runs on every later arch,
//                so a newer card can check the T4 path)
// Accumulation is f32 in both.
//
// Fragments (PTX ISA "Matrix Fragments for mma.m16n8k16", floating point). A fragment word
// holds elements (k, k + 1) of one row of A (or one column of B), k in the low 16 bits. For
// lane l, g = l / 4, t = l % 4:
//   a[0] = A(g, 2t..2t+1)   a[1] = A(g+8, 2t..2t+1)   a[2] = A(g, 2t+8..)   a[3] = A(g+8, 2t+8..)
//   b[0] = B(2t..2t+1, g)   b[1] = B(2t+8..2t+9, g)
//   c[0..1] = C(g, 2t..2t+1)   c[2..3] = C(g+8, 2t..2t+1)
// m16n8k8 (fp16) uses the first half of the same layout (a[0], a[1]; b[0]) for k 0..7, so a
// k16 step is two k8 mma: (a[0], a[1], b[0]) then (a[2], a[3], b[1]). Note that the C layout
// of two neighbouring 16 x 8 tiles is the A layout of one 16 x 16 piece (FlashAttention's
// register reuse of P): a[0] = c_j[0..1], a[1] = c_j[2..3], a[2] = c_{j+1}[0..1], a[3] =
// c_{j+1}[2..3].
//
// Every mma is a warp collective: all 32 lanes call it (the emulator checks that).
//
// Block tiles of the products (gemm.cu's dense products, nf4.cu's NF4 products): a block of 4
// warps (MMA_THREADS) computes 64 x 64 of out (MMA_TILE); warp w owns rows 32 (w / 2) + 0..31,
// columns 32 (w % 2) + 0..31 as 2 x 4 mma tiles of 16 x 8 (float acc[2][4][4]: 32 f32
// accumulators per thread). Per step of 64 along K (MMA_K_TILE) the A tile (64 rows of out x
// 64 of K) and the B tile (64 columns of out x 64 of K) sit in shared memory as 16-bit values,
// both K-contiguous, rows padded to 72 halves (MMA_STRIDE, 36 words): the fragment loads
// (lane l reads word (row g, k-pair t) with g = l / 4, t = l % 4) then hit 32 distinct banks
// (36 g + t mod 32). mma_warp_tile runs one step's mma, mma_stage fills a tile from a strided
// matrix of any activation type (storage.cuh's Tensor), mma_store writes the accumulators to
// an out of any type.
// No #include: see common.cuh (include common.cuh and storage.cuh first).
#ifndef VERDICT_MMA_CUH
#define VERDICT_MMA_CUH

// The fragment word of two 16-bit values, `lo` at the lower k.
VERDICT_DEVICE unsigned int operand_pack(unsigned short lo, unsigned short hi) {
    return (unsigned int)lo | ((unsigned int)hi << 16);
}

struct OperandBf16 {
    static VERDICT_DEVICE unsigned short round(float x) { return f32_to_bf16_bits(x); }
    static VERDICT_DEVICE float widen(unsigned short b) { return bf16_bits_to_f32(b); }
    static VERDICT_DEVICE unsigned int pack(float lo, float hi) {
        return operand_pack(f32_to_bf16_bits(lo), f32_to_bf16_bits(hi));
    }
    static VERDICT_DEVICE void mma(float (&c)[4], const unsigned int (&a)[4], const unsigned int (&b)[2]) {
#if defined(VERDICT_EMU) && __CUDA_ARCH__ >= 800
        verdict_emu::mma_m16n8k16_bf16(c, a, b, __FILE__, __LINE__);
#elif __CUDA_ARCH__ >= 800
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
            "{%8, %9}, {%0, %1, %2, %3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
        __trap();  // no bf16 tensor cores before sm_80; the host picks f16 there
#endif
    }
};

struct OperandF16 {
    static VERDICT_DEVICE unsigned short round(float x) { return f32_to_f16_bits(x); }
    static VERDICT_DEVICE float widen(unsigned short h) { return f16_bits_to_f32(h); }
    static VERDICT_DEVICE unsigned int pack(float lo, float hi) {
        return operand_pack(f32_to_f16_bits(lo), f32_to_f16_bits(hi));
    }
    static VERDICT_DEVICE void mma(float (&c)[4], const unsigned int (&a)[4], const unsigned int (&b)[2]) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
#ifdef VERDICT_EMU
            verdict_emu::mma_m16n8k8_f16(c, a[2 * half], a[2 * half + 1], b[half], __FILE__, __LINE__);
#else
            asm volatile(
                "mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, "
                "{%0, %1, %2, %3};"
                : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                : "r"(a[2 * half]), "r"(a[2 * half + 1]), "r"(b[half]));
#endif
        }
    }
};

#define MMA_THREADS 128
#define MMA_TILE 64
#define MMA_K_TILE 64
#define MMA_STRIDE 72
#define MMA_WARP_TILE 32

// The 32-bit word holding elements (col, col + 1) of row `row` of a shared tile (col even).
VERDICT_DEVICE unsigned int mma_tile_word(const unsigned short (*tile)[MMA_STRIDE], unsigned int row,
                                          unsigned int col) {
    return *reinterpret_cast<const unsigned int*>(&tile[row][col]);
}

// This thread's place in the block tile: its warp's corner (warp_m, warp_n) and its lane's
// fragment coordinates g = lane / 4, t = lane % 4.
struct MmaLane {
    unsigned int warp_m, warp_n, g, t;
};

VERDICT_DEVICE MmaLane mma_lane() {
    const unsigned int warp = threadIdx.x / 32;
    MmaLane lane;
    lane.warp_m = MMA_WARP_TILE * (warp / 2);
    lane.warp_n = MMA_WARP_TILE * (warp % 2);
    lane.g = (threadIdx.x % 32) / 4;
    lane.t = threadIdx.x % 4;
    return lane;
}

VERDICT_DEVICE void mma_zero(float (&acc)[2][4][4]) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                acc[i][j][c] = 0.0f;
            }
        }
    }
}

// acc += A · B^T over the first k_len columns of the staged tiles (k_len a multiple of 16,
// at most MMA_K_TILE, the same for the whole block: the mma are warp collectives).
template <typename Op>
VERDICT_DEVICE void mma_warp_tile(float (&acc)[2][4][4], const unsigned short (*a_s)[MMA_STRIDE],
                                  const unsigned short (*b_s)[MMA_STRIDE], unsigned int k_len) {
    const MmaLane lane = mma_lane();
    const unsigned int warp_m = lane.warp_m, warp_n = lane.warp_n, g = lane.g, t = lane.t;
#pragma unroll
    for (unsigned int kk = 0; kk < MMA_K_TILE; kk += 16) {
        if (kk >= k_len) {
            break;  // uniform across the block: a rank-16 LoRA fills one k16 step of four
        }
        unsigned int a[2][4], b[4][2];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const unsigned int row = warp_m + 16 * i + g;
            a[i][0] = mma_tile_word(a_s, row, kk + 2 * t);
            a[i][1] = mma_tile_word(a_s, row + 8, kk + 2 * t);
            a[i][2] = mma_tile_word(a_s, row, kk + 8 + 2 * t);
            a[i][3] = mma_tile_word(a_s, row + 8, kk + 8 + 2 * t);
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const unsigned int col = warp_n + 8 * j + g;
            b[j][0] = mma_tile_word(b_s, col, kk + 2 * t);
            b[j][1] = mma_tile_word(b_s, col, kk + 8 + 2 * t);
        }
#pragma unroll
        for (int i = 0; i < 2; ++i) {
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                Op::mma(acc[i][j], a[i], b[j]);
            }
        }
    }
}

// The K steps a tile of `k_left` remaining reduction elements needs: up to MMA_K_TILE,
// rounded up to the k16 of one mma (the staged zeros past the edge add nothing).
VERDICT_DEVICE unsigned int mma_k_len(unsigned int k_left) {
    return k_left >= MMA_K_TILE ? MMA_K_TILE : (k_left + 15u) & ~15u;
}

// Stages tile rows row0 .. +63, reduction elements k0 .. +63 of a strided matrix M (`rows` x
// K, element (r, k) at p[r * row_stride + k * k_stride], p f32 or 16-bit) as 16-bit K-contiguous
// words: tile[r][k] = Op(drop(offset, M(row0 + r, k0 + k)) * scale), 0 past the matrix's edges
// (adds nothing). A 16-bit M is widened exactly and rounded again: a value already of Op's
// type comes back unchanged (with scale 1 and no dropout), so its tile is the f32 path's tile
// of the same values, and the other 16-bit type is rounded once from its exact value. drop
// sees each element's offset in p, which for a row-major tensor read as itself or transposed
// is its flat index: the dropout mask of that tensor (common.cuh). Each thread writes 16
// words; consecutive threads walk the contiguous dimension so a warp's loads coalesce: along
// k (k_stride 1: a warp reads 64 consecutive elements of one row) or along rows (a transposed
// operand, row_stride 1: 32 rows at k and at k + 1; its word stores then conflict 4 ways, v1
// accepts that). Scalar loads: operands need no alignment.
template <typename Op, typename Drop>
VERDICT_DEVICE void mma_stage(unsigned short (*tile)[MMA_STRIDE], Tensor p, unsigned int rows,
                              unsigned int K, unsigned int row0, unsigned int k0,
                              unsigned long long row_stride, unsigned long long k_stride, float scale,
                              Drop drop) {
    const bool k_contiguous = k_stride == 1;
#pragma unroll 4
    for (int i = 0; i < MMA_TILE * MMA_K_TILE / 2 / MMA_THREADS; ++i) {
        const unsigned int e = i * MMA_THREADS + threadIdx.x;  // word e of the tile
        const unsigned int r = k_contiguous ? e / (MMA_K_TILE / 2) : e % MMA_TILE;
        const unsigned int k = 2 * (k_contiguous ? e % (MMA_K_TILE / 2) : e / MMA_TILE);
        float v[2] = {0.0f, 0.0f};  // guard: past the edges reads 0
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            if (row0 + r < rows && k0 + k + h < K) {
                const unsigned long long offset =
                    (unsigned long long)(row0 + r) * row_stride + (unsigned long long)(k0 + k + h) * k_stride;
                v[h] = drop(offset, p.load(offset)) * scale;
            }
        }
        *reinterpret_cast<unsigned int*>(&tile[r][k]) = Op::pack(v[0], v[1]);
    }
}

// out[m, n] (=|+= alpha ·) drop(m * N + n, acc) for this block's tile at (m0, n0) of the
// row-major [M, N] out (f32 or 16-bit: an accumulating store reads out, adds in f32 and
// rounds once): accumulate = 0 overwrites, 1 adds (the host's Store); drop is the dropout mask
// of out's own elements (a gradient that flows into a dropped input).
template <typename Drop>
VERDICT_DEVICE void mma_store(Tensor out, const float (&acc)[2][4][4], unsigned int M, unsigned int N,
                              unsigned int m0, unsigned int n0, float alpha, unsigned int accumulate,
                              Drop drop) {
    const MmaLane lane = mma_lane();
    const unsigned int warp_m = lane.warp_m, warp_n = lane.warp_n, g = lane.g, t = lane.t;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const unsigned int m = m0 + warp_m + 16 * i + g + 8 * (c / 2);
                const unsigned int n = n0 + warp_n + 8 * j + 2 * t + c % 2;
                if (m < M && n < N) {  // guard: the edge tiles run past the matrix
                    const unsigned long long o = (unsigned long long)m * N + n;
                    const float v = drop(o, acc[i][j][c]);
                    out.store(o, accumulate ? out.load(o) + alpha * v : v);
                }
            }
        }
    }
}

#endif  // VERDICT_MMA_CUH
