// runtime.cpp: the emulated device's scheduler and checks (not instrumented itself).
//
// One launch runs at a time (the Rust side holds a lock), on the calling OS thread. Its blocks
// run one after another in a seeded random order; a block's threads are fibers with stacks of
// their own, switched by a few lines of assembly (no system call per switch, unlike
// swapcontext). A thread runs until it reaches __syncthreads, a warp collective (shuffle,
// mma.sync) or its end; when every thread is waiting, the scheduler resolves what can go on:
//   - a warp collective proceeds once every lane its mask names waits at it; a named lane
//     that returned or waits at __syncthreads is an error naming both places;
//   - __syncthreads proceeds once every thread of the block waits at the same one; a thread
//     that already returned, or waits at another __syncthreads, is an error.
// So a diverged or exited lane is a message, never a hang. An infinite loop is caught by a
// watchdog on the launch's wall time.
//
// Every load and store of a kernel arrives here (build.rs compiles kernels with
// -fsanitize=kernel-address and outline calls, so the compiler calls __asan_loadN /
// __asan_storeN, and this file defines them). An access must fall inside the running thread's
// stack, a live allocation of the launching device (as the host's pool handed it out, exact to
// the byte), one of the kernel's shared arrays (whose bounds and names the compiler registers
// through __asan_register_globals, with a red zone after each) or a constant of the kernel; a
// shared access also goes through a race check: two threads touching the same word between
// the same two barriers, at least one of them writing, is a race (compute-sanitizer's
// racecheck). Shared arrays are filled with a NaN pattern (all bits set) before each block.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>
#include <sys/mman.h>

#include "runtime.h"

extern "C" char __bss_start[], _end[];  // the executable's zero-initialised statics
// Saves the callee-saved registers on the current stack, stores its pointer in *from, and
// continues on `to` (a stack saved the same way, or a new one from new_stack).
extern "C" void verdict_emu_switch(void** from, void* to);

namespace verdict_emu {

ThreadView view;

namespace {

// ---- what the host hands over ----

// One live device allocation, as the Rust side's pool handed it out.
struct Allocation {
    std::uint64_t lo, hi;
    const char* what;  // the op that asked for it
};

// ---- globals the compiler registers ----

// GCC's __asan_global.
struct AsanGlobal {
    std::uintptr_t beg, size, size_with_redzone;
    const char* name;
    const char* module_name;
    std::uintptr_t has_dynamic_init;
    void* location;
    std::uintptr_t odr_indicator;
};

struct StaticArray {
    std::uintptr_t lo, hi, redzone_end;
    const char* name;
    const char* module;
    bool shared;  // zero-initialised, so a __shared__ array (constants are initialised)
};

std::vector<StaticArray>& static_arrays() {
    static std::vector<StaticArray> arrays;  // sorted once, at the first launch
    return arrays;
}

// ---- fibers ----

#if defined(__x86_64__)
asm(R"(
    .text
    .p2align 4
    .type verdict_emu_switch, @function
verdict_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size verdict_emu_switch, .-verdict_emu_switch
)");
#else
#error "the emulated device's fibers are written for x86-64"
#endif

constexpr std::size_t kStackBytes = 256 << 10;
constexpr std::size_t kGuardBytes = 4096;
constexpr unsigned kMaxThreads = 1024;

struct Stack {
    char* lo;  // usable memory [lo, lo + kStackBytes), a guard page below
};

std::vector<Stack>& stacks() {
    static std::vector<Stack> all;
    return all;
}

void fiber_entry();

// A stack whose first switch starts fiber_entry.
void* new_stack(const Stack& s) {
    auto* top = reinterpret_cast<std::uintptr_t*>(s.lo + kStackBytes);
    *--top = 0;                                                   // fiber_entry's return slot
    *--top = reinterpret_cast<std::uintptr_t>(&fiber_entry);      // where `ret` goes
    for (int i = 0; i < 6; ++i) *--top = 0;                      // rbp rbx r12..r15
    return top;
}

// ---- a launch ----

enum class State : std::uint8_t { Runnable, AtBarrier, AtWarp, Exited };
enum class WarpOp : std::uint8_t { Shuffle, MmaBf16, MmaF16 };

struct Thread {
    void* sp;
    State state;
    const char* file;  // where it waits
    int line;
    // a pending warp collective
    WarpOp op;
    unsigned int mask;
    int kind, lane_arg, width;
    unsigned int value, result;
    unsigned int a[4], b[2];
    float c[4];
};

// Per shared word: who touched it since which barrier.
struct Shadow {
    std::uint64_t write_epoch, read_epoch;
    std::uint16_t writer, reader;
    bool many_readers;
};

struct Launch {
    const char* kernel;
    const char* module_tu;
    void (*thunk)(void**);
    void** params;
    Dim3 grid, block;
    unsigned int threads;
    std::vector<Allocation> allocations;
    std::uint64_t arena_lo, arena_hi;
    // The allocations and static arrays hit last, most recent first: a kernel cycles through
    // a few buffers, so most accesses end here instead of in a binary search.
    const Allocation* recent_allocations[4];
    const StaticArray* recent_arrays[4];
    std::vector<Thread> thread;
    unsigned int current;
    void* scheduler_sp;
    std::uintptr_t stack_lo;
    std::string error;
    std::uint64_t accesses;
    std::chrono::steady_clock::time_point deadline;
    double timeout_s;
    const char* barrier_file;  // the last barrier passed, for race reports
    int barrier_line;
};

Launch* running = nullptr;
std::uint64_t epoch = 1;
std::vector<Shadow> shadow;  // one per 4-byte word of [shadow_lo, shadow_hi)
std::uintptr_t shadow_lo = 0, shadow_hi = 0;

std::string where() {
    const Launch& l = *running;
    const Dim3 t = view.thread_idx, b = view.block_idx;
    char text[160];
    std::snprintf(text, sizeof text, "kernel %s, block (%u, %u, %u), thread (%u, %u, %u)", l.kernel, b.x,
                  b.y, b.z, t.x, t.y, t.z);
    return text;
}

void switch_to_scheduler() {
    Launch& l = *running;
    verdict_emu_switch(&l.thread[l.current].sp, l.scheduler_sp);
}

// Records the launch's first error and leaves the thread for good (its stack is abandoned:
// kernels hold nothing that needs destroying).
[[noreturn]] void fail(const std::string& message) {
    Launch& l = *running;
    if (l.error.empty()) l.error = message;
    switch_to_scheduler();
    std::abort();  // the scheduler never resumes a failed launch
}

void fiber_entry() {
    Launch& l = *running;
    l.thunk(l.params);
    l.thread[l.current].state = State::Exited;
    switch_to_scheduler();
    std::abort();
}

std::string thread_name(const Launch& l, unsigned int linear) {
    const unsigned int x = linear % l.block.x, y = linear / l.block.x % l.block.y,
                       z = linear / (l.block.x * l.block.y);
    char text[64];
    std::snprintf(text, sizeof text, "thread (%u, %u, %u)", x, y, z);
    return text;
}

std::string site(const char* file, int line) {
    return std::string(file ? file : "?") + ":" + std::to_string(line);
}

// Waits at a barrier or collective: hands the fiber back to the scheduler.
void wait_as(State state, const char* file, int line) {
    Launch& l = *running;
    Thread& t = l.thread[l.current];
    t.state = state;
    t.file = file;
    t.line = line;
    switch_to_scheduler();
}

// ---- memory checks ----

std::string describe_near_allocation(std::uintptr_t a, std::size_t n) {
    const Launch& l = *running;
    // The allocation just below the address, if any: the usual overrun.
    const Allocation* below = nullptr;
    const Allocation* above = nullptr;
    for (const Allocation& x : l.allocations) {
        if (x.lo <= a && (!below || x.lo > below->lo)) below = &x;
        if (x.lo > a && (!above || x.lo < above->lo)) above = &x;
    }
    char text[256];
    if (below && a < below->hi) {
        std::snprintf(text, sizeof text, "runs %zu byte(s) past the end of a %llu-byte allocation made by %s",
                      (std::size_t)(a + n - below->hi), (unsigned long long)(below->hi - below->lo), below->what);
    } else if (below) {
        std::snprintf(text, sizeof text, "is %llu byte(s) past the end of a %llu-byte allocation made by %s",
                      (unsigned long long)(a - below->hi), (unsigned long long)(below->hi - below->lo),
                      below->what);
    } else if (above) {
        std::snprintf(text, sizeof text, "is %llu byte(s) before a %llu-byte allocation made by %s",
                      (unsigned long long)(above->lo - a), (unsigned long long)(above->hi - above->lo),
                      above->what);
    } else {
        std::snprintf(text, sizeof text, "is in no live allocation (freed memory?)");
    }
    return text;
}

// Moves `hit` to the front of `recent` (most recent first).
template <typename T, std::size_t N>
void remember(const T* (&recent)[N], const T* hit) {
    std::size_t i = 0;
    while (i + 1 < N && recent[i] != hit) ++i;
    for (; i > 0; --i) recent[i] = recent[i - 1];
    recent[0] = hit;
}

bool in_allocation(std::uintptr_t a, std::size_t n) {
    Launch& l = *running;
    for (const Allocation* x : l.recent_allocations) {
        if (x && a >= x->lo && a + n <= x->hi) return true;
    }
    auto it = std::upper_bound(l.allocations.begin(), l.allocations.end(), a,
                               [](std::uintptr_t v, const Allocation& x) { return v < x.lo; });
    if (it == l.allocations.begin()) return false;
    --it;
    if (a + n > it->hi) return false;
    remember(l.recent_allocations, &*it);
    return true;
}

const StaticArray* static_array_at(std::uintptr_t a) {
    Launch& l = *running;
    for (const StaticArray* x : l.recent_arrays) {
        if (x && a >= x->lo && a < x->redzone_end) return x;
    }
    const auto& arrays = static_arrays();
    auto it = std::upper_bound(arrays.begin(), arrays.end(), a,
                               [](std::uintptr_t v, const StaticArray& x) { return v < x.lo; });
    if (it == arrays.begin()) return nullptr;
    --it;
    if (a >= it->redzone_end) return nullptr;
    remember(l.recent_arrays, &*it);
    return &*it;
}

void race_check(std::uintptr_t a, std::size_t n, bool write, const StaticArray& array) {
    Launch& l = *running;
    const std::uint16_t me = (std::uint16_t)l.current;
    for (std::uintptr_t w = (a - shadow_lo) / 4; w <= (a + n - 1 - shadow_lo) / 4; ++w) {
        Shadow& s = shadow[w];
        const char* other_did = nullptr;
        std::string other;
        if (s.write_epoch == epoch && s.writer != me) {
            other_did = "wrote", other = thread_name(l, s.writer);
        } else if (write && s.read_epoch == epoch && (s.reader != me || s.many_readers)) {
            other_did = "read", other = s.reader != me ? thread_name(l, s.reader) : "another thread";
        }
        if (other_did) {
            char text[400];
            std::snprintf(text, sizeof text,
                          "shared-memory race in %s: it %s %s[byte %llu] which %s %s since the last "
                          "barrier (%s), with no __syncthreads between",
                          where().c_str(), write ? "wrote" : "read", array.name,
                          (unsigned long long)(w * 4 + shadow_lo - array.lo), other.c_str(), other_did,
                          l.barrier_file ? site(l.barrier_file, l.barrier_line).c_str() : "block start");
            fail(text);
        }
        if (write) {
            s.write_epoch = epoch;
            s.writer = me;
        } else if (s.read_epoch != epoch) {
            s.read_epoch = epoch;
            s.reader = me;
            s.many_readers = false;
        } else if (s.reader != me) {
            s.many_readers = true;
        }
    }
}

// Everything but the common cases of check_access, out of line.
__attribute__((noinline)) void check_access_slow(std::uintptr_t a, std::size_t n, bool write) {
    Launch* l = running;
    if ((l->accesses & 0xfffff) == 0 && std::chrono::steady_clock::now() > l->deadline) {
        char text[200];
        std::snprintf(text, sizeof text,
                      "%s: the launch ran for more than %.0f s (VERDICT_EMU_TIMEOUT): an endless loop?",
                      where().c_str(), l->timeout_s);
        fail(text);
    }
    const char* kind = write ? "write" : "read";
    char text[400];
    if (a >= l->arena_lo && a < l->arena_hi) {
        if (in_allocation(a, n)) return;
        std::snprintf(text, sizeof text, "%s: %zu-byte %s at 0x%llx out of bounds: it %s", where().c_str(), n, kind,
                      (unsigned long long)a, describe_near_allocation(a, n).c_str());
        fail(text);
    }
    const std::uintptr_t view_lo = reinterpret_cast<std::uintptr_t>(&view);
    if (a >= view_lo && a + n <= view_lo + sizeof view && !write) return;
    if (const StaticArray* s = static_array_at(a)) {
        if (a >= s->lo && a + n <= s->hi) {
            if (s->shared) {
                race_check(a, n, write, *s);
            } else if (write) {
                fail(where() + ": " + kind + " to the constant " + s->name);
            }
            return;
        }
        std::snprintf(text, sizeof text, "%s: %zu-byte %s at 0x%llx is %llu byte(s) past the end of the %s array %s (%llu bytes)",
                      where().c_str(), n, kind, (unsigned long long)a, (unsigned long long)(a + n - s->hi),
                      s->shared ? "shared" : "constant", s->name, (unsigned long long)(s->hi - s->lo));
        fail(text);
    }
    std::snprintf(text, sizeof text,
                  "%s: %zu-byte %s at 0x%llx, which is not memory of this device (no live allocation, "
                  "shared array or local variable holds it)",
                  where().c_str(), n, kind, (unsigned long long)a);
    fail(text);
}

// One load or store of a kernel: the thread's own stack and the device allocations it used
// last are answered inline; the rest (and every 2^20-th access, for the watchdog) goes to
// check_access_slow.
inline __attribute__((always_inline)) void check_access(std::uintptr_t a, std::size_t n, bool write) {
    Launch* l = running;
    if (!l) return;  // static initialisation, not a kernel
    if (a - l->stack_lo < kStackBytes) return;
    if ((++l->accesses & 0xfffff) != 0) {
        for (const Allocation* x : l->recent_allocations) {
            if (x && a >= x->lo && a + n <= x->hi) return;
        }
    }
    check_access_slow(a, n, write);
}

// ---- warp collectives ----

float half_value(unsigned int word, int high, bool bf16) {
    const unsigned short h = (unsigned short)(high ? word >> 16 : word & 0xffffu);
    return bf16 ? float_of((unsigned int)h << 16) : cvt_f32_f16(h);
}

// D = A·B + C for the warp whose lanes are t[0..32), from the PTX ISA's fragment layout
// ("Matrix Fragments for mma.m16n8k16 / m16n8k8", floating point; g = lane / 4, t = lane % 4):
// A(m, k) is in lane 4 (m % 8) + (k % 8) / 2, register m / 8 + 2 (k / 8), half k % 2;
// B(k, n) in lane 4 n + (k % 8) / 2, register k / 8, half k % 2; D(m, n) for lane g, t is
// register v with m = g + 8 (v / 2), n = 2 t + v % 2. f32 products summed in f32.
void resolve_mma(Thread* lanes, int k_dim, bool bf16) {
    // The operands unpacked once (16 x k_dim and k_dim x 8), then the product.
    float a[16][16], b[16][8];
    for (unsigned int lane = 0; lane < 32; ++lane) {
        const unsigned int g = lane / 4, t = lane % 4;
        for (int r = 0; r < k_dim / 4; ++r) {
            for (int h = 0; h < 2; ++h) a[g + 8 * (r % 2)][2 * t + 8 * (r / 2) + h] = half_value(lanes[lane].a[r], h, bf16);
        }
        for (int r = 0; r < k_dim / 8; ++r) {
            for (int h = 0; h < 2; ++h) b[2 * t + 8 * r + h][g] = half_value(lanes[lane].b[r], h, bf16);
        }
    }
    for (unsigned int lane = 0; lane < 32; ++lane) {
        const unsigned int g = lane / 4, t = lane % 4;
        for (int v = 0; v < 4; ++v) {
            const unsigned int m = g + 8 * (v / 2), col = 2 * t + v % 2;
            float sum = lanes[lane].c[v];
            for (int k = 0; k < k_dim; ++k) sum += a[m][k] * b[k][col];
            lanes[lane].c[v] = sum;
        }
    }
}

int shuffle_source(const Thread& t, unsigned int lane) {
    const int width = t.width, base = (int)(lane / width) * width;
    int src;
    switch (t.kind) {
        case SHFL_IDX: return base + (t.lane_arg % width);
        case SHFL_XOR: src = (int)lane ^ t.lane_arg; break;
        case SHFL_DOWN: src = (int)lane + t.lane_arg; break;
        default: src = (int)lane - t.lane_arg; break;
    }
    return (src < base || src >= base + width) ? (int)lane : src;  // outside its group: own value
}

const char* op_name(WarpOp op) {
    switch (op) {
        case WarpOp::Shuffle: return "a shuffle";
        case WarpOp::MmaBf16: return "mma.sync m16n8k16 bf16";
        default: return "mma.sync m16n8k8 f16";
    }
}

// Resolves warp `w` if it waits at a collective; true if its lanes may go on.
bool resolve_warp(Launch& l, unsigned int w) {
    const unsigned int first = 32 * w, count = std::min(32u, l.threads - first);
    Thread* lanes = &l.thread[first];
    int waiting = -1;
    for (unsigned int i = 0; i < count; ++i) {
        if (lanes[i].state == State::AtWarp) {
            waiting = (int)i;
            break;
        }
    }
    if (waiting < 0) return false;
    const Thread& lead = lanes[waiting];
    const unsigned int mask = lead.op == WarpOp::Shuffle ? lead.mask : 0xffffffffu;
    for (unsigned int lane = 0; lane < 32; ++lane) {
        if (!(mask >> lane & 1u)) continue;
        const Thread* t = lane < count ? &lanes[lane] : nullptr;
        if (t && t->state == State::AtWarp && t->op == lead.op && (lead.op != WarpOp::Shuffle || t->mask == lead.mask)) {
            continue;
        }
        std::string why;
        if (!t) {
            why = "does not exist: the block has " + std::to_string(l.threads) + " threads";
        } else if (t->state == State::Exited) {
            why = "has returned (a diverged lane at a warp collective)";
        } else if (t->state == State::AtBarrier) {
            why = "waits at __syncthreads at " + site(t->file, t->line) + " (divergence)";
        } else {
            why = std::string("waits at ") + op_name(t->op) + " at " + site(t->file, t->line) + " instead";
        }
        l.error = std::string("kernel ") + l.kernel + ": " + op_name(lead.op) + " at " + site(lead.file, lead.line) +
                  " waits for lane " + std::to_string(lane) + " of warp " + std::to_string(w) + " (" +
                  thread_name(l, first + lane) + "), which " + why;
        return false;
    }
    if (lead.op == WarpOp::Shuffle) {
        for (unsigned int lane = 0; lane < 32; ++lane) {
            if (!(mask >> lane & 1u)) continue;
            const int src = shuffle_source(lanes[lane], lane);
            if (!(mask >> src & 1u)) {
                l.error = std::string("kernel ") + l.kernel + ": the shuffle at " + site(lead.file, lead.line) + " makes lane " +
                          std::to_string(lane) + " read lane " + std::to_string(src) + ", which its mask leaves out";
                return false;
            }
            lanes[lane].result = lanes[src].value;
        }
    } else {
        resolve_mma(lanes, lead.op == WarpOp::MmaBf16 ? 16 : 8, lead.op == WarpOp::MmaBf16);
    }
    for (unsigned int lane = 0; lane < 32; ++lane) {
        if (mask >> lane & 1u) lanes[lane].state = State::Runnable;
    }
    return true;
}

// ---- a block ----

void run_block(Launch& l) {
    for (;;) {
        for (unsigned int i = 0; i < l.threads; ++i) {
            Thread& t = l.thread[i];
            if (t.state != State::Runnable) continue;
            l.current = i;
            view.thread_idx = {i % l.block.x, i / l.block.x % l.block.y, i / (l.block.x * l.block.y)};
            l.stack_lo = reinterpret_cast<std::uintptr_t>(stacks()[i].lo);
            verdict_emu_switch(&l.scheduler_sp, t.sp);
            if (!l.error.empty()) return;
        }
        bool released = false;
        for (unsigned int w = 0; w * 32 < l.threads; ++w) {
            released |= resolve_warp(l, w);
            if (!l.error.empty()) return;
        }
        if (released) continue;
        unsigned int exited = 0, at_barrier = 0;
        int first_barrier = -1, first_exited = -1, first_warp = -1;
        for (unsigned int i = 0; i < l.threads; ++i) {
            switch (l.thread[i].state) {
                case State::Exited: exited++, first_exited = first_exited < 0 ? (int)i : first_exited; break;
                case State::AtBarrier: at_barrier++, first_barrier = first_barrier < 0 ? (int)i : first_barrier; break;
                case State::AtWarp: first_warp = first_warp < 0 ? (int)i : first_warp; break;
                case State::Runnable: break;
            }
        }
        if (exited == l.threads) return;
        auto head = [&] {
            return std::string("kernel ") + l.kernel + ", block (" + std::to_string(view.block_idx.x) + ", " +
                   std::to_string(view.block_idx.y) + ", " + std::to_string(view.block_idx.z) + "): ";
        };
        if (first_warp >= 0) {  // a warp collective that cannot resolve: resolve_warp said why, or
            const Thread& t = l.thread[first_warp];
            l.error = head() + thread_name(l, first_warp) + " waits at " + op_name(t.op) + " at " + site(t.file, t.line) +
                      " for lanes that never arrive";
            return;
        }
        const Thread& b = l.thread[first_barrier];
        if (exited > 0) {
            l.error = head() + "__syncthreads at " + site(b.file, b.line) + " is not reached by " +
                      std::to_string(exited) + " thread(s) that returned, " + thread_name(l, first_exited) +
                      " first (every thread of a block must reach it)";
            return;
        }
        for (unsigned int i = 0; i < l.threads; ++i) {
            const Thread& t = l.thread[i];
            if (t.line != b.line || (t.file != b.file && std::strcmp(t.file, b.file) != 0)) {
                l.error = head() + thread_name(l, first_barrier) + " waits at __syncthreads at " + site(b.file, b.line) +
                          " but " + thread_name(l, i) + " at the one at " + site(t.file, t.line) +
                          " (a barrier in divergent code)";
                return;
            }
        }
        for (Thread& t : l.thread) t.state = State::Runnable;
        l.barrier_file = b.file;
        l.barrier_line = b.line;
        ++epoch;
    }
}

std::uint64_t splitmix(std::uint64_t& state) {
    std::uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

void prepare_static_arrays() {
    static bool done = false;
    if (done) return;
    done = true;
    auto& arrays = static_arrays();
    std::sort(arrays.begin(), arrays.end(), [](const StaticArray& a, const StaticArray& b) { return a.lo < b.lo; });
    for (const StaticArray& s : arrays) {
        if (!s.shared) continue;
        shadow_lo = shadow_lo ? std::min(shadow_lo, s.lo & ~(std::uintptr_t)3) : (s.lo & ~(std::uintptr_t)3);
        shadow_hi = std::max(shadow_hi, s.hi);
    }
    if (shadow_hi > shadow_lo) shadow.assign((shadow_hi - shadow_lo + 3) / 4, Shadow{0, 0, 0, 0, false});
}

bool ensure_stacks(unsigned int n, std::string& error) {
    auto& all = stacks();
    while (all.size() < n) {
        void* p = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) {
            error = "cannot map a fiber stack for the emulated device";
            return false;
        }
        mprotect(p, kGuardBytes, PROT_NONE);  // an overflowing thread faults instead of corrupting
        all.push_back(Stack{static_cast<char*>(p) + kGuardBytes});
    }
    return true;
}

}  // namespace

// ---- built-ins that synchronise ----

void syncthreads(const char* file, int line) { wait_as(State::AtBarrier, file, line); }

unsigned int shfl(unsigned int mask, unsigned int value, int kind, int lane_arg, int width, const char* file,
                  int line) {
    Launch& l = *running;
    Thread& t = l.thread[l.current];
    if (width <= 0 || width > 32 || (width & (width - 1))) {
        fail(where() + ": shuffle width " + std::to_string(width) + " at " + site(file, line) +
             " is not a power of two up to 32");
    }
    t.op = WarpOp::Shuffle;
    t.mask = mask;
    t.kind = kind;
    t.lane_arg = lane_arg;
    t.width = width;
    t.value = value;
    wait_as(State::AtWarp, file, line);
    return t.result;
}

void mma_m16n8k16_bf16(float (&c)[4], const unsigned int (&a)[4], const unsigned int (&b)[2], const char* file,
                       int line) {
    Thread& t = running->thread[running->current];
    t.op = WarpOp::MmaBf16;
    std::memcpy(t.a, a, sizeof t.a);
    std::memcpy(t.b, b, sizeof t.b);
    std::memcpy(t.c, c, sizeof t.c);
    wait_as(State::AtWarp, file, line);
    std::memcpy(c, t.c, sizeof t.c);
}

void mma_m16n8k8_f16(float (&c)[4], unsigned int a0, unsigned int a1, unsigned int b0, const char* file,
                     int line) {
    Thread& t = running->thread[running->current];
    t.op = WarpOp::MmaF16;
    t.a[0] = a0, t.a[1] = a1, t.b[0] = b0;
    std::memcpy(t.c, c, sizeof t.c);
    wait_as(State::AtWarp, file, line);
    std::memcpy(c, t.c, sizeof t.c);
}

void trap(const char* file, int line) { fail(where() + ": __trap() at " + site(file, line)); }

void misaligned(const void* p, unsigned int align, const char* what, const char* file, int line) {
    if (!running) return;
    char text[300];
    std::snprintf(text, sizeof text, "%s: misaligned %s at %p (needs %u-byte alignment) at %s", where().c_str(), what, p,
                  align, site(file, line).c_str());
    fail(text);
}

namespace {
// What rounding to f16 did to the values kernels rounded (the f16 tensor-core path of sm_75).
struct F16Stats {
    std::uint64_t values, overflowed, flushed_to_zero, subnormal;
    float max_abs;
} f16_stats;
}  // namespace

unsigned short round_to_f16(float x) {
    const unsigned short h = cvt_rn_f16_f32(x);
    F16Stats& s = f16_stats;
    s.values++;
    const float a = std::fabs(x);
    if (std::isfinite(a)) {
        s.max_abs = std::max(s.max_abs, a);
        if ((h & 0x7fffu) == 0x7c00u) s.overflowed++;
        if ((h & 0x7fffu) == 0 && a != 0.0f) s.flushed_to_zero++;
        if ((h & 0x7c00u) == 0 && (h & 0x3ffu) != 0) s.subnormal++;
    }
    return h;
}

float atomic_add(float* p, float v) {
    check_access(reinterpret_cast<std::uintptr_t>(p), 4, true);
    const float old = *p;
    *p = old + v;  // one thread runs at a time: the add is atomic by construction
    return old;
}

}  // namespace verdict_emu

using namespace verdict_emu;

extern "C" {

// ---- the compiler's instrumentation hooks (-fsanitize=kernel-address, outline calls) ----
#define VERDICT_EMU_HOOKS(N)                                                                         \
    void __asan_load##N##_noabort(std::uintptr_t a) { check_access(a, N, false); }                   \
    void __asan_store##N##_noabort(std::uintptr_t a) { check_access(a, N, true); }
VERDICT_EMU_HOOKS(1)
VERDICT_EMU_HOOKS(2)
VERDICT_EMU_HOOKS(4)
VERDICT_EMU_HOOKS(8)
VERDICT_EMU_HOOKS(16)
#undef VERDICT_EMU_HOOKS
void __asan_loadN_noabort(std::uintptr_t a, std::uintptr_t n) { check_access(a, n, false); }
void __asan_storeN_noabort(std::uintptr_t a, std::uintptr_t n) { check_access(a, n, true); }
void __asan_handle_no_return() {}

// GCC's -fsanitize=undefined checks in kernels (-fno-sanitize-recover: the *_abort handlers).
// Every handler's data starts with the source location; the launch fails there.
struct UbsanLocation {
    const char* file;
    std::uint32_t line, column;
};
#define VERDICT_EMU_UBSAN(NAME, WHAT)                                                       \
    [[noreturn]] void __ubsan_handle_##NAME##_abort(const UbsanLocation* at, ...) {          \
        if (!running) std::abort();                                                          \
        fail(where() + ": undefined behaviour (" WHAT ") at " + site(at->file, (int)at->line)); \
    }
VERDICT_EMU_UBSAN(add_overflow, "signed overflow in +")
VERDICT_EMU_UBSAN(sub_overflow, "signed overflow in -")
VERDICT_EMU_UBSAN(mul_overflow, "signed overflow in *")
VERDICT_EMU_UBSAN(negate_overflow, "signed overflow in negation")
VERDICT_EMU_UBSAN(divrem_overflow, "division by zero or overflow")
VERDICT_EMU_UBSAN(shift_out_of_bounds, "shift by a negative amount or past the width")
VERDICT_EMU_UBSAN(out_of_bounds, "array index out of bounds")
VERDICT_EMU_UBSAN(load_invalid_value, "a bool or enum holding an invalid value")
VERDICT_EMU_UBSAN(vla_bound_not_positive, "variable-length array of size <= 0")
VERDICT_EMU_UBSAN(nonnull_arg, "null passed as a nonnull argument")
VERDICT_EMU_UBSAN(nonnull_return_v1, "null returned from a returns_nonnull function")
VERDICT_EMU_UBSAN(pointer_overflow, "pointer arithmetic overflow")
VERDICT_EMU_UBSAN(invalid_builtin, "a builtin called with an invalid argument")
VERDICT_EMU_UBSAN(float_cast_overflow, "a float converted to an integer that cannot hold it")
#undef VERDICT_EMU_UBSAN
struct UbsanTypeMismatch {
    UbsanLocation at;
    const void* type;
    unsigned char log_alignment, check_kind;
};
[[noreturn]] void __ubsan_handle_type_mismatch_v1_abort(const UbsanTypeMismatch* data, std::uintptr_t pointer) {
    if (!running) std::abort();
    const char* what = pointer == 0 ? "null pointer"
                       : pointer % (std::uintptr_t{1} << data->log_alignment) ? "misaligned pointer"
                                                                               : "an access past the end of its object";
    fail(where() + ": undefined behaviour (" + what + ") at " + site(data->at.file, (int)data->at.line));
}
[[noreturn]] void __ubsan_handle_builtin_unreachable(const UbsanLocation* at) {
    if (!running) std::abort();
    fail(where() + ": undefined behaviour (__builtin_unreachable reached) at " + site(at->file, (int)at->line));
}
[[noreturn]] void __ubsan_handle_missing_return(const UbsanLocation* at) {
    if (!running) std::abort();
    fail(where() + ": undefined behaviour (end of a function that returns a value) at " + site(at->file, (int)at->line));
}

void __asan_register_globals(AsanGlobal* globals, std::uintptr_t n) {
    for (std::uintptr_t i = 0; i < n; ++i) {
        const AsanGlobal& g = globals[i];
        const bool shared = g.beg >= reinterpret_cast<std::uintptr_t>(__bss_start) &&
                            g.beg < reinterpret_cast<std::uintptr_t>(_end);
        static_arrays().push_back(
            StaticArray{g.beg, g.beg + g.size, g.beg + g.size_with_redzone, g.name, g.module_name, shared});
    }
}
void __asan_unregister_globals(AsanGlobal*, std::uintptr_t) {}

// ---- the entry points the Rust side calls (src/backend/cuda/emu.rs) ----

struct verdict_emu_allocation {
    std::uint64_t lo, hi;
    const char* what;
};

// Runs one launch to its end; 0, or 1 with the first error in `error`.
int verdict_emu_launch(const verdict_emu_entry* entry, const unsigned int* grid, const unsigned int* block,
                       void** params, const verdict_emu_allocation* allocations, std::size_t allocation_count,
                       std::uint64_t arena_lo, std::uint64_t arena_hi, std::uint64_t seed, double timeout_s,
                       char* error, std::size_t error_len) {
    prepare_static_arrays();
    Launch l{};
    l.kernel = entry->function;
    l.module_tu = entry->translation_unit;
    l.thunk = entry->thunk;
    l.params = params;
    l.grid = {grid[0], grid[1], grid[2]};
    l.block = {block[0], block[1], block[2]};
    l.threads = block[0] * block[1] * block[2];
    l.arena_lo = arena_lo;
    l.arena_hi = arena_hi;
    l.timeout_s = timeout_s;
    l.deadline = std::chrono::steady_clock::now() +
                 std::chrono::microseconds((long long)(timeout_s * 1e6));
    for (std::size_t i = 0; i < allocation_count; ++i) {
        l.allocations.push_back(Allocation{allocations[i].lo, allocations[i].hi, allocations[i].what});
    }
    std::sort(l.allocations.begin(), l.allocations.end(),
              [](const Allocation& a, const Allocation& b) { return a.lo < b.lo; });
    auto finish = [&](const std::string& message) {
        std::snprintf(error, error_len, "%s", message.c_str());
        return message.empty() ? 0 : 1;
    };
    if (l.threads == 0 || l.threads > kMaxThreads) {
        return finish(std::string("kernel ") + l.kernel + ": " + std::to_string(l.threads) +
                      " threads per block (1 to 1024 allowed)");
    }
    std::string stack_error;
    if (!ensure_stacks(l.threads, stack_error)) return finish(stack_error);

    const std::uint64_t blocks = (std::uint64_t)grid[0] * grid[1] * grid[2];
    std::vector<std::uint64_t> order(blocks);
    for (std::uint64_t i = 0; i < blocks; ++i) order[i] = i;
    std::uint64_t state = seed;
    for (std::uint64_t i = blocks; i > 1; --i) std::swap(order[i - 1], order[splitmix(state) % i]);

    std::vector<const StaticArray*> shared;  // this kernel file's shared arrays
    for (const StaticArray& s : static_arrays()) {
        if (s.shared && std::strcmp(s.module, l.module_tu) == 0) shared.push_back(&s);
    }
    running = &l;
    view.block_dim = l.block;
    view.grid_dim = l.grid;
    for (std::uint64_t b : order) {
        view.block_idx = {(unsigned int)(b % grid[0]), (unsigned int)(b / grid[0] % grid[1]),
                          (unsigned int)(b / ((std::uint64_t)grid[0] * grid[1]))};
        for (const StaticArray* s : shared) std::memset(reinterpret_cast<void*>(s->lo), 0xff, s->hi - s->lo);
        ++epoch;
        l.barrier_file = nullptr;
        l.thread.assign(l.threads, Thread{});
        for (unsigned int i = 0; i < l.threads; ++i) {
            l.thread[i].sp = new_stack(stacks()[i]);
            l.thread[i].state = State::Runnable;
        }
        run_block(l);
        if (!l.error.empty()) break;
    }
    running = nullptr;
    return finish(l.error);
}

}  // extern "C"

extern "C" {
// Device memory of an emulated device: address space reserved up front, pages given by the
// kernel as they are touched (so a 16 GiB device costs what it holds).
void* verdict_emu_map(std::size_t bytes) {
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    return p == MAP_FAILED ? nullptr : p;
}
void verdict_emu_unmap(void* p, std::size_t bytes) { munmap(p, bytes); }
// Gives freed pages back to the system (they read as zeros if touched again).
void verdict_emu_discard(void* p, std::size_t bytes) { madvise(p, bytes, MADV_DONTNEED); }
}

extern "C" {
// The conversions kernels use, for tests/emu_device.rs to hold against a reference.
unsigned short verdict_emu_f32_to_f16(float x) { return cvt_rn_f16_f32(x); }
float verdict_emu_f16_to_f32(unsigned short h) { return cvt_f32_f16(h); }
unsigned short verdict_emu_f32_to_bf16(float x) { return cvt_rn_bf16_f32(x); }

// What rounding to f16 did since the last reset (all emulated devices of the process):
// values rounded, finite ones that became infinite, nonzero ones that became zero, results
// that are subnormal, and the largest finite magnitude rounded.
void verdict_emu_f16_stats(std::uint64_t* counts, float* max_abs, int reset) {
    counts[0] = f16_stats.values;
    counts[1] = f16_stats.overflowed;
    counts[2] = f16_stats.flushed_to_zero;
    counts[3] = f16_stats.subnormal;
    *max_abs = f16_stats.max_abs;
    if (reset) f16_stats = F16Stats{};
}
}
