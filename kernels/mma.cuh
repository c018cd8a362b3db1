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
// No #include: see common.cuh (include it first).
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

#endif  // VERDICT_MMA_CUH
