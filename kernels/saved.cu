// saved.cu: activations kept for backward in 16 bits (issue #17, DESIGN §5): each layer's
// input, which per-layer recomputation keeps from the forward to the backward, stored as f16
// on sm_75 and bf16 on sm_80+ with one power-of-two scale per row, and widened back to f32
// when the backward recomputes the layer.
//
// What it computes (CPU reference: backend/cpu/saved.rs, `round_rows`):
//   keep_rows_{f16,bf16}:    e = the exponent of max |x| over the row (its f32 bits), minus 14,
//                            clamped to [-126, 126]; scales[row] = 2^e; bits[i] = round(x[i] * 2^-e)
//   restore_rows_{f16,bf16}: x[i] = widen(bits[i]) * scales[row]
// Why the scale: the layer inputs are the residual stream, which real models drive past f16's
// 65504 (DESIGN §5: Gemma 3 270M 103,795); a power of two putting each row's largest value in
// [2^14, 2^15) keeps every row in range, exactly undone (scaling by 2^e commutes with
// rounding), with f16's 11 significant bits for every element within 2^-28 of its row's
// largest. bf16 needs no range help but gets the same code (exact there too).
// Non-finite rows keep scale 1 (an inf stays inf, the loss check names it).
// Layout: x, out [rows, dim] f32; bits [rows, dim] 16-bit; scales [rows] f32.
// Launch: one block per row, 256 threads (keep: a max reduction, then the stores; restore:
//   elementwise over the row).
//
// Variants:
//   v1  block per row, scalar loads.  <- shipped
#include "common.cuh"
#include "storage.cuh"

#define SAVED_THREADS 256

template <typename S>
VERDICT_DEVICE void keep_rows(typename S::T* __restrict__ bits, float* __restrict__ scales,
                              const float* __restrict__ x, unsigned long long dim) {
    const unsigned long long row = blockIdx.x;
    const float* xr = x + row * dim;
    float largest = 0.0f;
    for (unsigned long long i = threadIdx.x; i < dim; i += blockDim.x) {
        largest = fmaxf(largest, fabsf(xr[i]));
    }
    largest = block_reduce(largest, MaxOp(), 0.0f);
    int e = 0;
    const unsigned int u = __float_as_uint(largest);
    if ((u & 0x7f800000u) != 0x7f800000u && largest > 0.0f) {
        e = (int)((u >> 23) & 0xffu) - 127 - 14;
        e = e < -126 ? -126 : (e > 126 ? 126 : e);
    }
    const float down = __uint_as_float((unsigned int)(127 - e) << 23);  // 2^-e
    for (unsigned long long i = threadIdx.x; i < dim; i += blockDim.x) {
        S::store(bits, row * dim + i, xr[i] * down);
    }
    if (threadIdx.x == 0) {
        scales[row] = __uint_as_float((unsigned int)(127 + e) << 23);  // 2^e
    }
}

template <typename S>
VERDICT_DEVICE void restore_rows(float* __restrict__ out, const typename S::T* __restrict__ bits,
                                 const float* __restrict__ scales, unsigned long long dim) {
    const unsigned long long row = blockIdx.x;
    const float up = scales[row];
    for (unsigned long long i = threadIdx.x; i < dim; i += blockDim.x) {
        out[row * dim + i] = S::load(bits, row * dim + i) * up;
    }
}

extern "C" __global__ void __launch_bounds__(SAVED_THREADS)
    keep_rows_f16(unsigned short* __restrict__ bits, float* __restrict__ scales,
                  const float* __restrict__ x, unsigned long long dim) {
    keep_rows<StorageF16>(bits, scales, x, dim);
}

extern "C" __global__ void __launch_bounds__(SAVED_THREADS)
    keep_rows_bf16(unsigned short* __restrict__ bits, float* __restrict__ scales,
                   const float* __restrict__ x, unsigned long long dim) {
    keep_rows<StorageBf16>(bits, scales, x, dim);
}

extern "C" __global__ void __launch_bounds__(SAVED_THREADS)
    restore_rows_f16(float* __restrict__ out, const unsigned short* __restrict__ bits,
                     const float* __restrict__ scales, unsigned long long dim) {
    restore_rows<StorageF16>(out, bits, scales, dim);
}

extern "C" __global__ void __launch_bounds__(SAVED_THREADS)
    restore_rows_bf16(float* __restrict__ out, const unsigned short* __restrict__ bits,
                      const float* __restrict__ scales, unsigned long long dim) {
    restore_rows<StorageBf16>(out, bits, scales, dim);
}
