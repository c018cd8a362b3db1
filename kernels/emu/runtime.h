// runtime.h: the CUDA built-ins kernels/*.cu use, for running those same sources on the CPU
// (the emulated device, `--device emu`; ARCHITECTURE.md "The emulated GPU").
//
// build.rs compiles each kernel file as C++ once per emulated compute capability, with
// __CUDA_ARCH__ and VERDICT_EMU defined and this header first, the kernel text wrapped in a
// namespace of its own (so the sm_75 and sm_80 copies of one entry point can live in one
// binary) and every memory access instrumented (-fsanitize=kernel-address with outline
// calls): runtime.cpp receives each load and store and checks it against the live device
// allocations, the block's shared arrays and the running thread's stack.
//
// A CUDA thread is a fiber; the scheduler in runtime.cpp runs a block's threads until each
// reaches a barrier, a warp collective or its end, then resolves what can proceed. So the
// built-ins below that synchronise are calls into runtime.cpp, which is not instrumented; the
// ones that only compute are inline here.
#ifndef VERDICT_EMU_RUNTIME_H
#define VERDICT_EMU_RUNTIME_H

#include <math.h>
#include <cstring>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
// Block-local storage as statics: one block runs at a time (runtime.cpp), which fills every
// shared array with a NaN pattern before each block starts.
#define __shared__ static
#define __constant__ static const
#define __align__(n) __attribute__((aligned(n)))

namespace verdict_emu {

struct Dim3 {
    unsigned int x, y, z;
};

// What the running CUDA thread sees; the scheduler writes it before resuming a thread.
struct ThreadView {
    Dim3 thread_idx, block_idx, block_dim, grid_dim;
};
extern ThreadView view;

// ---- calls into runtime.cpp (each names its call site for the error messages) ----
void syncthreads(const char* file, int line);
unsigned int shfl(unsigned int mask, unsigned int value, int kind, int lane_arg, int width,
                  const char* file, int line);
void mma_m16n8k16_bf16(float (&c)[4], const unsigned int (&a)[4], const unsigned int (&b)[2],
                       const char* file, int line);
void mma_m16n8k8_f16(float (&c)[4], unsigned int a0, unsigned int a1, unsigned int b0,
                     const char* file, int line);
[[noreturn]] void trap(const char* file, int line);
void misaligned(const void* p, unsigned int align, const char* what, const char* file, int line);
float atomic_add(float* p, float v);
// cvt.rn.f16.f32 as a kernel uses it: also counts what the rounding lost (runtime.cpp).
unsigned short round_to_f16(float x);

enum ShuffleKind { SHFL_IDX = 0, SHFL_XOR = 1, SHFL_DOWN = 2, SHFL_UP = 3 };

// ---- half precision, bit-exact with the PTX cvt instructions (round to nearest even,
// subnormals kept, overflow to infinity, NaN to the canonical NaN) ----
inline unsigned int bits_of(float x) {
    unsigned int u;
    std::memcpy(&u, &x, 4);
    return u;
}
inline float float_of(unsigned int u) {
    float x;
    std::memcpy(&x, &u, 4);
    return x;
}
inline unsigned short cvt_rn_f16_f32(float x) {
    const unsigned int u = bits_of(x);
    const unsigned short sign = (unsigned short)((u >> 16) & 0x8000u);
    const unsigned int a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return 0x7fffu;                   // NaN
    if (a >= 0x477ff000u) return sign | 0x7c00u;            // |x| >= 65520 rounds to infinity
    if (a < 0x38800000u) {                                  // below 2^-14: f16 subnormal or zero
        // Scaling by 2^24 is exact, and rint rounds to nearest even: the subnormal's units.
        return sign | (unsigned short)rintf(float_of(a) * 16777216.0f);
    }
    unsigned int h = ((a >> 23) - 112u) << 10 | ((a >> 13) & 0x3ffu);
    const unsigned int rest = a & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // a carry may reach the exponent
    return sign | (unsigned short)h;
}
inline float cvt_f32_f16(unsigned short h) {
    const unsigned int sign = (unsigned int)(h & 0x8000u) << 16;
    const unsigned int e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0x1fu) return m ? float_of(0x7fffffffu) : float_of(sign | 0x7f800000u);
    if (e == 0) return float_of(sign) + (sign ? -1.0f : 1.0f) * (float)m / 16777216.0f;
    return float_of(sign | (e + 112u) << 23 | m << 13);
}
inline unsigned short cvt_rn_bf16_f32(float x) {
    const unsigned int u = bits_of(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;  // NaN
    return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// ---- CUDA's vector types. Copies check alignment, as the hardware's vector loads and stores
// fault on a misaligned address (the compiler may split a copy into scalar accesses, which
// the access hooks alone would let through). ----
#define VERDICT_EMU_VECTOR(NAME, T, N, ALIGN, ...)                                        \
    struct alignas(ALIGN) NAME {                                                          \
        T __VA_ARGS__;                                                                    \
        NAME() = default;                                                                 \
        NAME(const NAME& o) { copy_from(o); }                                             \
        NAME& operator=(const NAME& o) {                                                  \
            if (reinterpret_cast<unsigned long>(this) % ALIGN)                            \
                misaligned(this, ALIGN, "store of " #NAME, __FILE__, __LINE__);          \
            copy_from(o);                                                                 \
            return *this;                                                                 \
        }                                                                                 \
        void copy_from(const NAME& o) {                                                   \
            if (reinterpret_cast<unsigned long>(&o) % ALIGN)                              \
                misaligned(&o, ALIGN, "load of " #NAME, __FILE__, __LINE__);             \
            std::memcpy(static_cast<void*>(this), &o, sizeof(NAME));                      \
        }                                                                                 \
    };
VERDICT_EMU_VECTOR(float2, float, 2, 8, x, y)
VERDICT_EMU_VECTOR(float4, float, 4, 16, x, y, z, w)
VERDICT_EMU_VECTOR(uint2, unsigned int, 2, 8, x, y)
VERDICT_EMU_VECTOR(uint4, unsigned int, 4, 16, x, y, z, w)
#undef VERDICT_EMU_VECTOR

}  // namespace verdict_emu

using verdict_emu::float2;
using verdict_emu::float4;
using verdict_emu::uint2;
using verdict_emu::uint4;

#define threadIdx (::verdict_emu::view.thread_idx)
#define blockIdx (::verdict_emu::view.block_idx)
#define blockDim (::verdict_emu::view.block_dim)
#define gridDim (::verdict_emu::view.grid_dim)
#define warpSize 32

#define __syncthreads() ::verdict_emu::syncthreads(__FILE__, __LINE__)
#define __shfl_sync(mask, v, lane, ...) \
    ::verdict_emu::shfl_value(mask, v, ::verdict_emu::SHFL_IDX, lane, __FILE__, __LINE__, ##__VA_ARGS__)
#define __shfl_xor_sync(mask, v, lane_mask, ...) \
    ::verdict_emu::shfl_value(mask, v, ::verdict_emu::SHFL_XOR, lane_mask, __FILE__, __LINE__, ##__VA_ARGS__)
#define __shfl_down_sync(mask, v, delta, ...) \
    ::verdict_emu::shfl_value(mask, v, ::verdict_emu::SHFL_DOWN, delta, __FILE__, __LINE__, ##__VA_ARGS__)
#define __shfl_up_sync(mask, v, delta, ...) \
    ::verdict_emu::shfl_value(mask, v, ::verdict_emu::SHFL_UP, delta, __FILE__, __LINE__, ##__VA_ARGS__)
#define __trap() ::verdict_emu::trap(__FILE__, __LINE__)

namespace verdict_emu {
// A 32-bit value through a shuffle; width as CUDA's optional last argument.
template <typename T>
inline T shfl_value(unsigned int mask, T v, int kind, int lane_arg, const char* file, int line,
                    int width = 32) {
    static_assert(sizeof(T) == 4, "the emulator shuffles 32-bit values");
    unsigned int u;
    std::memcpy(&u, &v, 4);
    u = shfl(mask, u, kind, lane_arg, width, file, line);
    std::memcpy(&v, &u, 4);
    return v;
}

// __ldg: a read-only load; a vector type must be aligned to its size.
template <typename T>
inline T ldg(const T* p, const char* file, int line) {
    if (reinterpret_cast<unsigned long>(p) % alignof(T)) misaligned(p, alignof(T), "__ldg", file, line);
    return *p;
}
}  // namespace verdict_emu
#define __ldg(p) ::verdict_emu::ldg(p, __FILE__, __LINE__)

inline float atomicAdd(float* p, float v) { return verdict_emu::atomic_add(p, v); }
inline unsigned int __float_as_uint(float x) { return verdict_emu::bits_of(x); }
inline float __uint_as_float(unsigned int u) { return verdict_emu::float_of(u); }
inline int __float_as_int(float x) { return (int)verdict_emu::bits_of(x); }
inline float __int_as_float(int i) { return verdict_emu::float_of((unsigned int)i); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float4 make_float4(float x, float y, float z, float w) {
    float4 v;
    v.x = x, v.y = y, v.z = z, v.w = w;
    return v;
}
inline float2 make_float2(float x, float y) {
    float2 v;
    v.x = x, v.y = y;
    return v;
}
inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) {
    uint4 v;
    v.x = x, v.y = y, v.z = z, v.w = w;
    return v;
}
inline uint2 make_uint2(unsigned int x, unsigned int y) {
    uint2 v;
    v.x = x, v.y = y;
    return v;
}
inline void sincosf(float x, float* s, float* c) {
    *s = sinf(x);
    *c = cosf(x);
}
template <typename A, typename B>
inline auto min(A a, B b) -> decltype(a < b ? a : b) {
    return a < b ? a : b;
}
template <typename A, typename B>
inline auto max(A a, B b) -> decltype(a < b ? a : b) {
    return a < b ? b : a;
}

// Launches a kernel's thread body from the packed argument array cuLaunchKernel takes (one
// pointer per argument, pointing at its value): what each fiber runs. Not instrumented: the
// argument array is host memory, not the kernel's.
namespace verdict_emu {
template <typename... Args, std::size_t... I>
__attribute__((no_sanitize_address)) inline void call_with(void (*kernel)(Args...), void** params,
                                                          std::index_sequence<I...>) {
    kernel(*static_cast<Args*>(params[I])...);
}
template <typename... Args>
__attribute__((no_sanitize_address)) inline void call(void (*kernel)(Args...), void** params) {
    call_with(kernel, params, std::index_sequence_for<Args...>{});
}
template <auto Kernel>
__attribute__((no_sanitize_address)) void thunk(void** params) {
    call(Kernel, params);
}
}  // namespace verdict_emu

// A kernel entry point of one emulated architecture, as build.rs lists them in the table of
// each generated source; a table ends with a null `function`.
struct verdict_emu_entry {
    const char* module;
    const char* function;
    void (*thunk)(void**);
    const char* translation_unit;  // __FILE__ of its generated source, as the globals name it
};

// The entry table of one (compute capability, kernel file); `verdict_emu_modules`, which
// build.rs generates, lists them and ends with a zero `arch`.
struct verdict_emu_module {
    unsigned int arch;
    const verdict_emu_entry* entries;
};

#endif  // VERDICT_EMU_RUNTIME_H
