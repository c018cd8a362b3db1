// adamw.cu: the optimizer on the device: AdamW's update and the squared norms of the global
// gradient-norm clipping, so the training loop downloads one float per trainable tensor per
// step instead of every gradient (issue #17).
//
// What it computes (the CPU reference is backend/cpu/adamw.rs, which train::optimizer's
// host AdamW also runs; torch's order: decoupled weight decay, then the Adam step):
//   adamw_f32:       g = grad[i] * grad_scale          (undoes the loss scale, applies clipping)
//                    p = p * decay                      (decay = 1 - lr * weight_decay)
//                    m = m + (1 - beta1) * (g - m)
//                    v = v * beta2 + (1 - beta2) * g * g
//                    p = p - step_size * m / (sqrt(v) / bias2_sqrt + eps)
//                    with step_size = lr / (1 - beta1^t), bias2_sqrt = sqrt(1 - beta2^t), all
//                    scalars computed by the host in f64 and passed as f32, as torch does.
//   squared_norm_f32: out[slot] = sum of x[i]^2 over the tensor, in f32 (a non-finite element
//                    makes it inf or NaN: the loss scaler's overflow test).
// Layout: flat f32 arrays of n elements; params, moments and gradients are each trainable
//   tensor's own buffer.
// Launch: adamw_f32 one thread per element, blockDim.x = 256, gridDim.x = ceil(n / 256).
//   squared_norm_f32 ONE block of 256 threads per tensor (a grid-stride loop, then
//   block_reduce): a fixed summation order, so the norm (and clipping) is the same bits on
//   every run, with no float atomics. LoRA and head tensors are small (r x hidden, at most
//   64 x 3584 here), so one block per tensor is not the bottleneck; the launches are.
//
// Variants:
//   v1  one update per thread, one reduction block per tensor.  <- shipped
#include "common.cuh"

#define ADAMW_THREADS 256

extern "C" __global__ void __launch_bounds__(ADAMW_THREADS)
    adamw_f32(float* __restrict__ param, const float* __restrict__ grad, float* __restrict__ m,
              float* __restrict__ v, unsigned long long n, float grad_scale, float decay,
              float one_minus_beta1, float beta2, float one_minus_beta2, float bias2_sqrt,
              float eps, float step_size) {
    const unsigned long long i = global_thread_index();
    if (i >= n) {
        return;  // guard: the last block runs past the end
    }
    const float g = grad[i] * grad_scale;
    // __fmul_rn / __fadd_rn keep nvcc from contracting into FMAs: the same roundings as the
    // CPU reference, so the two agree to the last bit but for sqrtf and the division.
    float p = __fmul_rn(param[i], decay);
    const float mi = __fadd_rn(m[i], __fmul_rn(one_minus_beta1, __fadd_rn(g, -m[i])));
    const float vi = __fadd_rn(__fmul_rn(v[i], beta2), __fmul_rn(__fmul_rn(one_minus_beta2, g), g));
    const float denom = __fadd_rn(sqrtf(vi) / bias2_sqrt, eps);
    p = __fadd_rn(p, -__fmul_rn(step_size, mi / denom));
    m[i] = mi;
    v[i] = vi;
    param[i] = p;
}

extern "C" __global__ void __launch_bounds__(ADAMW_THREADS)
    squared_norm_f32(float* __restrict__ out, unsigned long long slot, const float* __restrict__ x,
                     unsigned long long n) {
    float sum = 0.0f;
    for (unsigned long long i = threadIdx.x; i < n; i += blockDim.x) {
        sum += x[i] * x[i];
    }
    sum = block_reduce(sum, SumOp(), 0.0f);
    if (threadIdx.x == 0) {
        out[slot] = sum;
    }
}
