// elementwise.cu: the residual add, the soft-cap and dropout.
//
// What it computes:
//   add_f32:      acc[i] += x[i]                    (the residual stream)
//   softcap_f32:  x[i] = cap * tanhf(x[i] / cap)    (Gemma 2's final logit soft-cap; the same
//                                                   expression as the CPU reference)
//   dropout_f32:  x[i] = u(seed, i) < p ? 0 : x[i] * keep_scale (common.cuh's Dropout, which
//                 gemm.cu also applies to operands as it stages them)
// Layout: flat arrays of n elements.
// Launch: one thread per element, blockDim.x = 256, gridDim.x = ceil(n / 256) (the host
//   checks it fits). Pure bandwidth; the last block's surplus threads return at the guard.
//
// Variants (speed to be measured by `verdict bench kernels`):
//   v1  one element per thread, scalar.  <- shipped
#include "common.cuh"
#include "storage.cuh"

#define ELEMENTWISE_THREADS 256

template <typename S>
VERDICT_DEVICE void add_in_place(typename S::T* __restrict__ acc, const typename S::T* __restrict__ x,
                                 unsigned long long n) {
    const unsigned long long i = global_thread_index();
    if (i >= n) {
        return;  // guard: the last block runs past the end
    }
    S::store(acc, i, S::load(acc, i) + S::load(x, i));
}

template <typename S>
VERDICT_DEVICE void softcap_in_place(typename S::T* __restrict__ x, unsigned long long n, float cap) {
    const unsigned long long i = global_thread_index();
    if (i >= n) {
        return;  // guard: the last block runs past the end
    }
    S::store(x, i, cap * tanhf(S::load(x, i) / cap));
}

template <typename S>
VERDICT_DEVICE void dropout_in_place(typename S::T* __restrict__ x, unsigned long long n, float p,
                                     float keep_scale, unsigned long long seed) {
    const unsigned long long i = global_thread_index();
    if (i >= n) {
        return;  // guard: the last block runs past the end
    }
    S::store(x, i, Dropout{p, keep_scale, seed}(i, S::load(x, i)));
}

extern "C" __global__ void __launch_bounds__(ELEMENTWISE_THREADS)
    add_f32(float* __restrict__ acc, const float* __restrict__ x, unsigned long long n) {
    add_in_place<StorageF32>(acc, x, n);
}

extern "C" __global__ void __launch_bounds__(ELEMENTWISE_THREADS)
    softcap_f32(float* __restrict__ x, unsigned long long n, float cap) {
    softcap_in_place<StorageF32>(x, n, cap);
}

extern "C" __global__ void __launch_bounds__(ELEMENTWISE_THREADS)
    dropout_f32(float* __restrict__ x, unsigned long long n, float p, float keep_scale,
                unsigned long long seed) {
    dropout_in_place<StorageF32>(x, n, p, keep_scale, seed);
}
