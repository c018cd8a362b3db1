// common.cuh: helpers shared by every kernels/*.cu file.
//
// No #include on purpose: build.rs inlines this header into each kernel's embedded source,
// and that text must compile with the NVRTC of an older CUDA (Kaggle's drivers are CUDA 12)
// with no include path at all. So half-precision values are handled as their raw bits
// (`unsigned short`, the same layout as Rust's `half::f16` / `half::bf16`), converted with
// one PTX instruction each, and sizes are `unsigned long long` rather than <cstdint> types.
#ifndef VERDICT_COMMON_CUH
#define VERDICT_COMMON_CUH

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 750
#error "verdict kernels target sm_75 (T4) and newer"
#endif

#define VERDICT_DEVICE __device__ __forceinline__

// Index of this thread across the whole grid, 64-bit: weights such as a 256000 x 3584
// embedding have more elements than a 32-bit product of blockIdx and blockDim can name.
VERDICT_DEVICE unsigned long long global_thread_index() {
    return (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
}

// ---- half-precision conversions (round to nearest even, as PyTorch's .to() does) ----
// The PTX sites have a VERDICT_EMU branch: the emulated device (kernels/emu/runtime.h) runs
// these sources as C++ and supplies bit-exact equivalents.

VERDICT_DEVICE unsigned short f32_to_f16_bits(float x) {
#ifdef VERDICT_EMU
    return verdict_emu::round_to_f16(x);
#else
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
    return h;
#endif
}

VERDICT_DEVICE float f16_bits_to_f32(unsigned short h) {
#ifdef VERDICT_EMU
    return verdict_emu::cvt_f32_f16(h);
#else
    float x;
    asm("cvt.f32.f16 %0, %1;" : "=f"(x) : "h"(h));
    return x;
#endif
}

VERDICT_DEVICE unsigned short f32_to_bf16_bits(float x) {
#if defined(VERDICT_EMU) && __CUDA_ARCH__ >= 800
    return verdict_emu::cvt_rn_bf16_f32(x);
#elif __CUDA_ARCH__ >= 800
    unsigned short b;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(b) : "f"(x));
    return b;
#else
    // sm_75 has no bf16 cvt instruction: round the f32 bits to nearest even by hand.
    const unsigned int u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (unsigned short)((u >> 16) | 0x0040u);  // NaN: keep it a quiet NaN
    }
    return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
#endif
}

VERDICT_DEVICE float bf16_bits_to_f32(unsigned short b) {
    return __uint_as_float((unsigned int)b << 16);
}

// ---- dropout ----

// Inverted dropout of element `i` of a tensor, value v: 0 with probability p, else
// v * keep_scale, keep_scale = 1 / (1 - p) (computed by the host in f32). u is the CPU's dropout_uniform: one
// SplitMix64 finalisation of seed ^ (i * golden), top 24 bits / 2^24, so the same (seed, i)
// gives the same mask on either device, in the forward, its recomputation and the backward,
// whether the mask is applied in place (elementwise.cu) or to an operand as a product stages
// it (gemm.cu). p = 0 keeps everything (u < 0 never holds; keep_scale is then 1).
struct Dropout {
    float p;
    float keep_scale;
    unsigned long long seed;
    VERDICT_DEVICE float operator()(unsigned long long i, float v) const {
        unsigned long long z = seed ^ (i * 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        const float u = (float)(z >> 40) / 16777216.0f;
        return u < p ? 0.0f : v * keep_scale;
    }
};

// The same interface when no dropout applies (the common case: no hashing at all).
struct NoDropout {
    VERDICT_DEVICE float operator()(unsigned long long, float v) const { return v; }
};

// ---- reductions ----

struct SumOp {
    VERDICT_DEVICE float operator()(float a, float b) const { return a + b; }
};

struct MaxOp {
    VERDICT_DEVICE float operator()(float a, float b) const { return fmaxf(a, b); }
};

// Every lane of the warp gets the reduction of all 32 lanes' values.
template <typename Op>
VERDICT_DEVICE float warp_reduce(float v, Op op) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
    }
    return v;
}

// Every thread of the block gets the reduction of all threads' values. Needs blockDim.x a
// multiple of 32 and every thread of the block calling it (it holds two __syncthreads).
// `identity` is the neutral element (0 for SumOp, -INFINITY for MaxOp).
template <typename Op>
VERDICT_DEVICE float block_reduce(float v, Op op, float identity) {
    __shared__ float warp_partials[32];
    const unsigned int lane = threadIdx.x & 31u;
    const unsigned int warp = threadIdx.x >> 5;
    const unsigned int warps = blockDim.x >> 5;
    v = warp_reduce(v, op);
    __syncthreads();  // a previous call's readers may still be reading warp_partials
    if (lane == 0) {
        warp_partials[warp] = v;
    }
    __syncthreads();
    // Each warp reduces the partials itself, so no third barrier is needed to broadcast.
    v = lane < warps ? warp_partials[lane] : identity;
    return warp_reduce(v, op);
}

#endif  // VERDICT_COMMON_CUH
