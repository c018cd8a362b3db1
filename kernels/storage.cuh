// storage.cuh: how kernels read and write activations and dense weights of one storage type.
//
// Every kernel is a template over a storage struct S with
//   S::T                              the element type in device memory,
//   S::load(const T* p, i) -> float   read and widen element i,
//   S::store(T* p, i, float v)        round and write element i,
// and does all of its arithmetic in f32 (DESIGN §5: accumulation, norms, softmax and the
// residual stream stay f32 whatever the storage). StorageF16 and StorageBf16 go through
// f16_bits_to_f32 / f32_to_f16_bits or bf16_bits_to_f32 / f32_to_bf16_bits (common.cuh,
// T = unsigned short); a kernel gets a half variant by one more entry-point line.
//
// No #include at all, for the reason given in common.cuh; include common.cuh first (it
// defines VERDICT_DEVICE). Headers include nothing, so the standalone sources build.rs
// makes for NVRTC hold each header's text verbatim.
#ifndef VERDICT_STORAGE_CUH
#define VERDICT_STORAGE_CUH

struct StorageF32 {
    typedef float T;
    static VERDICT_DEVICE float load(const T* p, unsigned long long i) { return p[i]; }
    static VERDICT_DEVICE void store(T* p, unsigned long long i, float v) { p[i] = v; }
};

// Half-precision storage (T = unsigned short, the bits): embedding tables so far
// (Backend::upload_half: f16, or bf16 when a value is beyond f16's range). Loads widen
// exactly; stores round to nearest even.
struct StorageF16 {
    typedef unsigned short T;
    static VERDICT_DEVICE float load(const T* p, unsigned long long i) {
        return f16_bits_to_f32(p[i]);
    }
    static VERDICT_DEVICE void store(T* p, unsigned long long i, float v) {
        p[i] = f32_to_f16_bits(v);
    }
};

struct StorageBf16 {
    typedef unsigned short T;
    static VERDICT_DEVICE float load(const T* p, unsigned long long i) {
        return bf16_bits_to_f32(p[i]);
    }
    static VERDICT_DEVICE void store(T* p, unsigned long long i, float v) {
        p[i] = f32_to_bf16_bits(v);
    }
};

// Activations (DESIGN §5): a tensor the host hands a kernel as f32 or as the card's 16-bit type
// (f16 on sm_75, bf16 on sm_80+), chosen per tensor at launch: the pointer and its dtype code
// (mirrored by backend/cuda's `dtype_code`) are two kernel arguments, and the kernel reads and
// writes through a Tensor built from them. Why a run-time type and not one more template
// parameter per tensor: a product or attention kernel takes three or four activations, each
// either type, and the mma kernels stage every operand into 16-bit shared tiles anyway, so the
// storage changes only the load (a branch uniform across the grid, no extra memory traffic);
// templates would multiply the entry points (and the build) by the combinations. Arithmetic
// stays f32; a store rounds to nearest even.
#define DTYPE_F32 0u
#define DTYPE_F16 1u
#define DTYPE_BF16 2u

struct Tensor {
    const void* p;
    unsigned int dtype;

    VERDICT_DEVICE float load(unsigned long long i) const {
        if (dtype == DTYPE_F32) {
            return static_cast<const float*>(p)[i];
        }
        const unsigned short bits = static_cast<const unsigned short*>(p)[i];
        return dtype == DTYPE_F16 ? f16_bits_to_f32(bits) : bf16_bits_to_f32(bits);
    }

    VERDICT_DEVICE void store(unsigned long long i, float v) const {
        if (dtype == DTYPE_F32) {
            static_cast<float*>(const_cast<void*>(p))[i] = v;
            return;
        }
        static_cast<unsigned short*>(const_cast<void*>(p))[i] =
            dtype == DTYPE_F16 ? f32_to_f16_bits(v) : f32_to_bf16_bits(v);
    }
};

// -inf without <math.h>: NVRTC compiles these files with no headers at all.
#define VERDICT_NEG_INF (__int_as_float(0xff800000u))

#endif  // VERDICT_STORAGE_CUH
