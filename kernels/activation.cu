// activation.cu: the gated MLP activations, GeGLU (Gemma) and SwiGLU (LLaMA), forward and
// backward.
//
// What it computes:
//   forward   out[i] = act(gate[i]) * up[i]
//   backward  dgate[i] = dout[i] * up[i] * act'(gate[i]),  dup[i] = dout[i] * act(gate[i])
//             (both overwritten: they are activation gradients)
// with
//   gelu_tanh(x) = 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3)   (PyTorch's
//                  gelu(approximate="tanh"), Gemma's gelu_pytorch_tanh), computed as the
//                  equal x / (1 + exp(-2u)): no cancellation in 1 + tanh(u) for x << 0, and
//                  one exp (the CPU's tanhf was 30 % of its Gemma 3 forward)
//   gelu_tanh'(x) = 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2), t = tanh(u)
//   silu(x)      = x / (1 + exp(-x)),  silu'(x) = s (1 + x (1 - s)), s = 1 / (1 + exp(-x))
// written as the CPU reference (backend/cpu/activation.rs) writes them, so the two differ
// only by the ulps of tanhf/expf (the CPU's exp is its own, within 2 ulp) and by FMA
// contraction.
// Layout: flat arrays of n = tokens * intermediate elements.
// Launch: one thread per element, blockDim.x = 256, gridDim.x = ceil(n / 256).
//
// Variants (speed to be measured by `verdict bench kernels`):
//   v1  one element per thread, scalar.  <- shipped
#include "common.cuh"
#include "storage.cuh"

#define ACTIVATION_THREADS 256

#define SQRT_2_OVER_PI 0.7978846f

struct GeluTanh {
    VERDICT_DEVICE float operator()(float x) const {
        return x / (1.0f + expf(-2.0f * SQRT_2_OVER_PI * (x + 0.044715f * x * x * x)));
    }
    VERDICT_DEVICE float grad(float x) const {
        const float t = tanhf(SQRT_2_OVER_PI * (x + 0.044715f * x * x * x));
        return 0.5f * (1.0f + t) +
               0.5f * x * (1.0f - t * t) * SQRT_2_OVER_PI * (1.0f + 3.0f * 0.044715f * x * x);
    }
};

struct Silu {
    VERDICT_DEVICE float operator()(float x) const { return x / (1.0f + expf(-x)); }
    VERDICT_DEVICE float grad(float x) const {
        const float s = 1.0f / (1.0f + expf(-x));
        return s * (1.0f + x * (1.0f - s));
    }
};

template <typename S, typename Act>
VERDICT_DEVICE void gated_activation(typename S::T* __restrict__ out, const typename S::T* __restrict__ gate,
                                     const typename S::T* __restrict__ up, unsigned long long n) {
    const unsigned long long i = global_thread_index();
    if (i >= n) {
        return;  // guard: the last block runs past the end
    }
    S::store(out, i, Act()(S::load(gate, i)) * S::load(up, i));
}

template <typename S, typename Act>
VERDICT_DEVICE void gated_activation_backward(typename S::T* __restrict__ dgate, typename S::T* __restrict__ dup,
                                              const typename S::T* __restrict__ dout,
                                              const typename S::T* __restrict__ gate,
                                              const typename S::T* __restrict__ up, unsigned long long n) {
    const unsigned long long i = global_thread_index();
    if (i >= n) {
        return;  // guard: the last block runs past the end
    }
    const float d = S::load(dout, i);
    const float g = S::load(gate, i);
    S::store(dgate, i, d * S::load(up, i) * Act().grad(g));
    S::store(dup, i, d * Act()(g));
}

extern "C" __global__ void __launch_bounds__(ACTIVATION_THREADS)
    geglu_tanh_f32(float* __restrict__ out, const float* __restrict__ gate, const float* __restrict__ up,
                   unsigned long long n) {
    gated_activation<StorageF32, GeluTanh>(out, gate, up, n);
}

extern "C" __global__ void __launch_bounds__(ACTIVATION_THREADS)
    swiglu_f32(float* __restrict__ out, const float* __restrict__ gate, const float* __restrict__ up,
               unsigned long long n) {
    gated_activation<StorageF32, Silu>(out, gate, up, n);
}

#define GATED_BACKWARD_ENTRY(NAME, ACT)                                                              \
    extern "C" __global__ void __launch_bounds__(ACTIVATION_THREADS)                                 \
        NAME(float* __restrict__ dgate, float* __restrict__ dup, const float* __restrict__ dout,     \
             const float* __restrict__ gate, const float* __restrict__ up, unsigned long long n) {   \
        gated_activation_backward<StorageF32, ACT>(dgate, dup, dout, gate, up, n);                  \
    }

GATED_BACKWARD_ENTRY(geglu_tanh_backward_f32, GeluTanh)
GATED_BACKWARD_ENTRY(swiglu_backward_f32, Silu)
