// embedding.cu: scaled row gather (the token embedding and the pooled-row gather) and its
// backward, the row scatter-add.
//
// What it computes:
//   gather_rows_scaled_f32:  out[r, :] = scale * src[index[r], :] for r < rows, width dim.
//   gather_rows_scaled_f16|bf16: the same from a half table (f16, bf16 beyond f16's range),
//                            widened exactly, multiplied in f32, out f32.
//   Token embedding: src = embed_tokens, index = token ids, scale = sqrt(hidden) rounded to
//   the weight dtype (Gemma) or 1 (LLaMA). Pooling (Backend::gather_rows): index = the
//   classified row of each sequence, scale = 1 (x * 1.0f == x exactly, so it is a copy).
//   scatter_add_rows_f32:    acc[index[r], :] += x[r, :] (Backend::scatter_add_rows, the
//                            gradient of the gather; it joins a sum, so it accumulates).
//                            atomicAdd, because two r may name the same row; the order of
//                            such additions is then unspecified (f32 rounding may differ
//                            from run to run, only then).
// Layout: src/acc [src_rows, dim] row-major; index u32 [rows]; out/x [rows, dim].
// Guards: every index is checked against src_rows by the host launcher (a token id outside
//   the vocabulary is an error there), so the kernel never reads past the table.
// Launch: one block per output row (gridDim.x = rows, up to 2^31 - 1 tokens), blockDim.x =
//   min(256, dim rounded up to a warp); threads stride over the row, so consecutive threads
//   read and write consecutive floats (coalesced). The row's source index is read once per
//   thread from the same address (a broadcast).
//
// Variants (speed to be measured by `verdict bench kernels`):
//   v1  one block per row, scalar loads.  <- shipped
#include "common.cuh"
#include "storage.cuh"

#define GATHER_MAX_THREADS 256

// Out is stored as S, src read as Src (a half table widened to an f32 output: the embedding
// of a table held in f16/bf16; the product scale * value is in f32).
template <typename S, typename Src>
VERDICT_DEVICE void gather_rows_scaled(typename S::T* __restrict__ out,
                                       const typename Src::T* __restrict__ src,
                                       const unsigned int* __restrict__ index, unsigned int dim,
                                       float scale) {
    const unsigned long long row = blockIdx.x;
    const unsigned long long from = (unsigned long long)index[row] * dim;
    for (unsigned int i = threadIdx.x; i < dim; i += blockDim.x) {
        S::store(out, row * dim + i, scale * Src::load(src, from + i));
    }
}

extern "C" __global__ void __launch_bounds__(GATHER_MAX_THREADS)
    gather_rows_scaled_f32(float* __restrict__ out, const float* __restrict__ src,
                           const unsigned int* __restrict__ index, unsigned int dim, float scale) {
    gather_rows_scaled<StorageF32, StorageF32>(out, src, index, dim, scale);
}

// The embedding from a half table (Backend::upload_half chooses f16 unless a value needs bf16).
extern "C" __global__ void __launch_bounds__(GATHER_MAX_THREADS)
    gather_rows_scaled_f16(float* __restrict__ out, const unsigned short* __restrict__ src,
                           const unsigned int* __restrict__ index, unsigned int dim, float scale) {
    gather_rows_scaled<StorageF32, StorageF16>(out, src, index, dim, scale);
}

extern "C" __global__ void __launch_bounds__(GATHER_MAX_THREADS)
    gather_rows_scaled_bf16(float* __restrict__ out, const unsigned short* __restrict__ src,
                            const unsigned int* __restrict__ index, unsigned int dim,
                            float scale) {
    gather_rows_scaled<StorageF32, StorageBf16>(out, src, index, dim, scale);
}

extern "C" __global__ void __launch_bounds__(GATHER_MAX_THREADS)
    scatter_add_rows_f32(float* __restrict__ acc, const float* __restrict__ x,
                         const unsigned int* __restrict__ index, unsigned int dim) {
    const unsigned long long row = blockIdx.x;
    const unsigned long long to = (unsigned long long)index[row] * dim;
    for (unsigned int i = threadIdx.x; i < dim; i += blockDim.x) {
        atomicAdd(acc + to + i, x[row * dim + i]);
    }
}
