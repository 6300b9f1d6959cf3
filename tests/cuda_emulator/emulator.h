// A CPU emulator of the CUDA features the kernels in csrc/flash_attn use, strict enough to find
// the bugs a GPU would show only as wrong numbers or hangs.
//
// Included before the kernel headers, it defines the include guard of csrc/flash_attn/ptx.cuh and
// provides every function that header declares, so the unchanged kernel source compiles as host
// C++. Each CUDA thread of a block runs as a fiber; a fiber runs until it reaches a
// barrier or a warp collective (ldmatrix, mma, shuffle), which completes once every thread it
// involves has arrived. On top of running the kernels it checks:
//   - shared memory: bounds, alignment, reads of never-written bytes, and data races: two
//     accesses (one a write) to one word by different threads with no barrier between them
//     (__syncthreads between warps, __syncwarp or __syncthreads inside a warp);
//   - cp.async: copies land only at cp.async.wait_group (so reading too early reads stale data),
//     any access to a word with a copy in flight is an error, a thread may not exit with copies
//     in flight;
//   - global memory: every access inside a registered buffer, aligned, plain stores never write
//     one word twice in a launch (each output element has one writer);
//   - convergence: a barrier or collective that not every thread reaches is a deadlock, reported;
//     lanes meeting at different collectives are reported.
// Emulation is deterministic: fibers run in thread order, blocks one after another in launch order
// or, with block_order_seed set, in a permutation of the grid that the seed fixes.
#pragma once

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "flash_attn/elements.h"

#define LLM2VEC_FAST_PTX_CUH  // the emulated instructions below replace csrc/flash_attn/ptx.cuh

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint4 {
  uint32_t x, y, z, w;
};
inline uint4 make_uint4(uint32_t x, uint32_t y, uint32_t z, uint32_t w) { return {x, y, z, w}; }
struct float2 {
  float x, y;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

namespace emu {

constexpr int kMaxWarps = 16;  // 512 threads: three warpgroups of a Hopper kernel fit
constexpr size_t kStackBytes = 256 * 1024;

// ---- fibers: a stack and a saved stack pointer each --------------------------------------------

#if defined(__x86_64__)
// Saves the callee-saved registers on the current stack, stores the stack pointer in *save_sp,
// switches to load_sp and restores what is saved there: a context switch without the signal-mask
// system call of swapcontext (the emulator switches millions of times).
__attribute__((naked, noinline)) inline void switch_stack(void** /*save_sp*/, void* /*load_sp*/) {
  asm volatile(
      "pushq %rbp\n\tpushq %rbx\n\tpushq %r12\n\tpushq %r13\n\tpushq %r14\n\tpushq %r15\n\t"
      "movq %rsp, (%rdi)\n\tmovq %rsi, %rsp\n\t"
      "popq %r15\n\tpopq %r14\n\tpopq %r13\n\tpopq %r12\n\tpopq %rbx\n\tpopq %rbp\n\tret");
}

struct Context {
  void* sp = nullptr;
  // A fresh context that starts in entry() on the stack [stack, stack + bytes).
  void start(char* stack, size_t bytes, void (*entry)()) {
    auto top = reinterpret_cast<uintptr_t>(stack + bytes) & ~uintptr_t{15};
    auto* frame = reinterpret_cast<void**>(top - 64);  // r15 r14 r13 r12 rbx rbp, entry, (no return)
    for (int i = 0; i < 6; ++i) frame[i] = nullptr;
    frame[6] = reinterpret_cast<void*>(entry);  // `ret` lands here with rsp = top - 8, as after a call
    frame[7] = nullptr;
    sp = frame;
  }
};
inline void switch_context(Context& from, Context& to) { switch_stack(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t ctx;
  void start(char* stack, size_t bytes, void (*entry)()) {
    getcontext(&ctx);
    ctx.uc_stack.ss_sp = stack;
    ctx.uc_stack.ss_size = bytes;
    ctx.uc_link = nullptr;
    makecontext(&ctx, entry, 0);
  }
};
inline void switch_context(Context& from, Context& to) { swapcontext(&from.ctx, &to.ctx); }
#endif

// ---- global memory registry --------------------------------------------------------------------

struct Buffer {
  const char* base;
  size_t bytes;
  std::string name;
  bool writable;
  std::vector<uint8_t> stored;  // plain stores per 4-byte word in the current launch
};

// ---- per-block state -----------------------------------------------------------------------------

struct Copy {
  uint32_t smem;
  const char* src;
  int bytes;
  bool zero_fill;
};

enum class Op { kNone, kLdsm, kLdsmTrans, kMma, kShfl };

struct Thread {
  Context ctx;
  bool done = false;
  bool blocked = false;
  std::vector<Copy> open_group;
  std::vector<std::vector<Copy>> groups;  // committed, oldest first
};

struct Collective {
  int arrived = 0;
  Op op = Op::kNone;
  int elem = 0;  // mma element type (0 fp16, 1 bf16)
  const void* in[32];
  void* out[32];
};

struct WordState {
  bool written;
  int16_t pending;  // cp.async copies in flight to this word
  int16_t writer;
  uint32_t w_epoch, w_wepoch;
  uint32_t r_epoch[kMaxWarps], r_wepoch[kMaxWarps], r_lanes[kMaxWarps];
};

// Hooks for an instruction set layered on top (emulator_sm90.h). When one is installed, its
// happens-before model replaces the barrier-epoch race check below, since named barriers and
// mbarriers order threads that __syncthreads/__syncwarp epochs cannot describe.
struct Extension {
  virtual ~Extension() = default;
  virtual void on_launch_block() = 0;                                      // a block starts
  virtual void on_access(uint32_t word, bool write, const char* what) = 0;  // ordinary shared access
  virtual void on_barrier(int first_thread, int count) = 0;                // __syncthreads/__syncwarp completed
  virtual void on_store(const void* src, size_t bytes, const char* what) = 0;  // values a store writes
  virtual void on_exit() = 0;                                                 // the current thread ends
  virtual std::string deadlock_detail() = 0;                                 // appended to a deadlock report
};

struct Emulator {
  Extension* extension = nullptr;
  uint64_t block_order_seed = 0;  // 0: blocks in launch order; else a permutation of the grid this seed fixes
  // registry
  std::vector<Buffer> buffers;
  // launch
  dim3 grid, block_idx;
  int threads = 0;
  std::vector<uint8_t> smem;
  std::vector<WordState> shadow;
  std::vector<std::unique_ptr<Thread>> fibers;
  std::vector<std::unique_ptr<char[]>> stacks;
  Context scheduler;
  int current = -1;
  std::function<void()> body;
  std::string error;  // first error of the launch
  uint32_t epoch = 0;
  uint32_t warp_epoch[kMaxWarps] = {};
  int barrier_arrived = 0;
  int warp_barrier_arrived[kMaxWarps] = {};
  Collective collective[kMaxWarps];

  // ---- errors ----
  void fail(const std::string& msg) {
    if (error.empty()) {
      error = msg + " (block " + std::to_string(block_idx.x) + "," + std::to_string(block_idx.y) + "," +
              std::to_string(block_idx.z) + ", thread " + std::to_string(current) + ")";
    }
    // Abandon this fiber: the scheduler sees the error and ends the launch.
    switch_context(fibers[current]->ctx, scheduler);
    std::abort();  // never resumed
  }

  int tid() const { return current; }
  int warp() const { return current / 32; }
  int lane() const { return current % 32; }

  // ---- global memory ----
  Buffer& find(const void* p, size_t bytes, const char* what) {
    const char* c = static_cast<const char*>(p);
    for (Buffer& b : buffers) {
      if (c >= b.base && c + bytes <= b.base + b.bytes) return b;
    }
    fail(std::string(what) + ": global address outside every registered buffer");
    return buffers.front();
  }
  void check_global(const void* p, size_t bytes, size_t align, const char* what) {
    if (reinterpret_cast<uintptr_t>(p) % align != 0) fail(std::string(what) + ": misaligned global address");
    find(p, bytes, what);
  }
  void global_store(void* p, const void* src, size_t bytes, const char* what) {
    check_global(p, bytes, bytes, what);
    Buffer& b = find(p, bytes, what);
    if (!b.writable) fail(std::string(what) + ": store into read-only buffer " + b.name);
    if (extension != nullptr) extension->on_store(src, bytes, what);
    const size_t word0 = (static_cast<const char*>(p) - b.base) / 4;
    for (size_t w = word0; w < word0 + (bytes + 3) / 4; ++w) {
      if (b.stored[w]) fail(std::string(what) + ": second store to one word of " + b.name + " in a launch");
      b.stored[w] = 1;
    }
    std::memcpy(p, src, bytes);
  }

  // ---- shared memory and its race checks ----
  void check_smem(uint32_t addr, size_t bytes, size_t align, const char* what) {
    if (addr % align != 0) fail(std::string(what) + ": misaligned shared address " + std::to_string(addr));
    if (addr + bytes > smem.size()) {
      fail(std::string(what) + ": shared address " + std::to_string(addr) + " past the " +
           std::to_string(smem.size()) + " bytes allocated");
    }
  }
  // Whether an access by thread `other` at (e, we) happens before the current thread's access.
  bool ordered(int other, uint32_t e, uint32_t we) const {
    if (other == tid()) return true;
    if (e != epoch) return true;  // a block barrier in between
    return other / 32 == warp() && we != warp_epoch[warp()];
  }
  void on_write(uint32_t word, const char* what, bool completing_copy) {
    WordState& s = shadow[word];
    if (s.pending > 0 && !completing_copy) fail(std::string(what) + ": write to shared memory with a cp.async in flight");
    if (extension != nullptr) extension->on_access(word, true, what);
    if (extension == nullptr && s.written && !ordered(s.writer, s.w_epoch, s.w_wepoch)) {
      fail(std::string(what) + ": write-write race in shared memory");
    }
    for (int w = 0; w < kMaxWarps && extension == nullptr; ++w) {
      if (s.r_epoch[w] != epoch) continue;
      const uint32_t others = w == warp() ? s.r_lanes[w] & ~(1u << lane()) : s.r_lanes[w];
      if (others != 0 && (w != warp() || s.r_wepoch[w] == warp_epoch[warp()])) {
        fail(std::string(what) + ": write after an unsynchronised read by another thread (shared memory race)");
      }
    }
    s.written = true;
    s.writer = static_cast<int16_t>(tid());
    s.w_epoch = epoch;
    s.w_wepoch = warp_epoch[warp()];
  }
  void on_read(uint32_t word, const char* what) {
    WordState& s = shadow[word];
    if (s.pending > 0) fail(std::string(what) + ": read of shared memory with a cp.async in flight");
    if (!s.written) fail(std::string(what) + ": read of never-written shared memory at " + std::to_string(word * 4));
    if (extension != nullptr) {
      extension->on_access(word, false, what);
      return;
    }
    if (!ordered(s.writer, s.w_epoch, s.w_wepoch)) fail(std::string(what) + ": read after an unsynchronised write (shared memory race)");
    const int w = warp();
    if (s.r_epoch[w] != epoch || s.r_wepoch[w] != warp_epoch[w]) {
      s.r_epoch[w] = epoch;
      s.r_wepoch[w] = warp_epoch[w];
      s.r_lanes[w] = 0;
    }
    s.r_lanes[w] |= 1u << lane();
  }
  void smem_read(uint32_t addr, void* dst, size_t bytes, const char* what) {
    check_smem(addr, bytes, std::min<size_t>(bytes, 16), what);
    for (uint32_t w = addr / 4; w < (addr + bytes + 3) / 4; ++w) on_read(w, what);
    std::memcpy(dst, smem.data() + addr, bytes);
  }
  void smem_write(uint32_t addr, const void* src, size_t bytes, const char* what) {
    check_smem(addr, bytes, std::min<size_t>(bytes, 16), what);
    if (extension != nullptr) extension->on_store(src, bytes, what);
    for (uint32_t w = addr / 4; w < (addr + bytes + 3) / 4; ++w) on_write(w, what, false);
    std::memcpy(smem.data() + addr, src, bytes);
  }

  // ---- cp.async ----
  void cp_async(uint32_t dst, const void* src, int bytes, bool pred) {
    check_smem(dst, bytes, bytes, "cp.async");
    check_global(src, bytes, bytes, "cp.async source");  // must be valid even when zero-filling
    for (uint32_t w = dst / 4; w < (dst + bytes) / 4; ++w) {
      if (shadow[w].pending > 0) fail("cp.async: two copies in flight to one shared word");
      on_write(w, "cp.async issue", false);
      shadow[w].written = false;  // holds nothing readable until the copy lands
      shadow[w].pending++;
    }
    fibers[tid()]->open_group.push_back({dst, static_cast<const char*>(src), bytes, !pred});
  }
  void cp_async_commit() {
    Thread& t = *fibers[tid()];
    t.groups.push_back(std::move(t.open_group));
    t.open_group.clear();
  }
  void cp_async_wait(int pending) {
    Thread& t = *fibers[tid()];
    while (static_cast<int>(t.groups.size()) > pending) {
      for (const Copy& c : t.groups.front()) {
        for (uint32_t w = c.smem / 4; w < (c.smem + c.bytes) / 4; ++w) {
          shadow[w].pending--;
          on_write(w, "cp.async landing", true);
        }
        if (c.zero_fill) {
          std::memset(smem.data() + c.smem, 0, c.bytes);
        } else {
          std::memcpy(smem.data() + c.smem, c.src, c.bytes);
        }
      }
      t.groups.erase(t.groups.begin());
    }
  }

  // ---- scheduling ----
  void yield_blocked() {
    fibers[tid()]->blocked = true;
    switch_context(fibers[tid()]->ctx, scheduler);
  }
  void syncthreads() {
    const uint32_t e = epoch;
    if (++barrier_arrived == threads) {
      barrier_arrived = 0;
      if (extension != nullptr) extension->on_barrier(0, threads);
      ++epoch;
      for (auto& f : fibers) f->blocked = false;
      return;
    }
    yield_blocked();
    if (epoch == e) fail("__syncthreads: resumed before the barrier completed");
  }
  void syncwarp() {
    const int w = warp();
    const uint32_t e = warp_epoch[w];
    if (++warp_barrier_arrived[w] == 32) {
      warp_barrier_arrived[w] = 0;
      if (extension != nullptr) extension->on_barrier(w * 32, 32);
      ++warp_epoch[w];
      for (int l = 0; l < 32; ++l) fibers[w * 32 + l]->blocked = false;
      return;
    }
    yield_blocked();
    if (warp_epoch[w] == e) fail("__syncwarp: resumed before the barrier completed");
  }
  // Every lane of the warp deposits its operands; the last to arrive performs the operation.
  void collective_op(Op op, int elem, const void* in, void* out) {
    Collective& c = collective[warp()];
    if (c.arrived == 0) {
      c.op = op;
      c.elem = elem;
    } else if (c.op != op || c.elem != elem) {
      fail("divergent warp: lanes meet at different collective operations");
    }
    c.in[lane()] = in;
    c.out[lane()] = out;
    if (++c.arrived == 32) {
      perform(c);
      c.arrived = 0;
      c.op = Op::kNone;
      for (int l = 0; l < 32; ++l) fibers[warp() * 32 + l]->blocked = false;
      return;
    }
    yield_blocked();
  }
  void perform(Collective& c);

  static void fiber_main();
  void launch_block(dim3 b);
  std::string run(dim3 grid_, int threads_, int smem_bytes, std::function<void()> kernel_body);
};

inline Emulator& emulator() {
  static Emulator e;
  return e;
}

// ---- 16-bit float conversions ---------------------------------------------------------------------

inline float bits_to_float(uint32_t f) {
  float r;
  std::memcpy(&r, &f, 4);
  return r;
}
inline uint32_t float_to_bits(float x) {
  uint32_t r;
  std::memcpy(&r, &x, 4);
  return r;
}
inline float half_to_float(uint16_t h) {
  const uint32_t sign = (h >> 15) & 1, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  float v;
  if (exp == 0) {
    v = std::ldexp(static_cast<float>(mant), -24);
  } else if (exp == 31) {
    v = mant ? NAN : INFINITY;
  } else {
    v = std::ldexp(static_cast<float>(mant | 0x400), static_cast<int>(exp) - 25);
  }
  return sign ? -v : v;
}
inline uint16_t float_to_half(float x) {  // round to nearest even
  const uint32_t f = float_to_bits(x);
  const uint32_t sign = (f >> 16) & 0x8000;
  if (std::isnan(x)) return static_cast<uint16_t>(sign | 0x7e00);
  const float a = std::fabs(x);
  if (a >= 65520.f) return static_cast<uint16_t>(sign | 0x7c00);
  if (a < std::ldexp(1.f, -14)) {  // subnormal half: multiples of 2^-24
    const float scaled = a * std::ldexp(1.f, 24);
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(scaled)));
  }
  int e;
  const float m = std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1)
  float mant = std::nearbyint(m * 2048.f);  // 11 significant bits
  if (mant == 2048.f) {
    mant = 1024.f;
    ++e;
  }
  const uint32_t exp = static_cast<uint32_t>(e - 1 + 15);
  if (exp >= 31) return static_cast<uint16_t>(sign | 0x7c00);
  return static_cast<uint16_t>(sign | (exp << 10) | (static_cast<uint32_t>(mant) - 1024));
}
inline float bf16_to_float(uint16_t b) { return bits_to_float(static_cast<uint32_t>(b) << 16); }
inline uint16_t float_to_bf16(float x) {
  const uint32_t f = float_to_bits(x);
  if (std::isnan(x)) return static_cast<uint16_t>((f >> 16) | 0x40);
  const uint32_t rounding = 0x7fff + ((f >> 16) & 1);
  return static_cast<uint16_t>((f + rounding) >> 16);
}
inline float elem_to_float(uint16_t v, int elem) { return elem == 0 ? half_to_float(v) : bf16_to_float(v); }

// ---- the collectives -------------------------------------------------------------------------------

struct MmaOperands {
  const uint32_t* a;
  uint32_t b0, b1;
  float* d;
};

inline void Emulator::perform(Collective& c) {
  const int w = warp();
  const int self = current;
  switch (c.op) {
    case Op::kLdsm:
    case Op::kLdsmTrans: {
      // Matrix i's row r is read at the address lane 8i + r gave; attribute the read to that lane.
      uint16_t m[4][8][8];
      for (int l = 0; l < 32; ++l) {
        const uint32_t addr = *static_cast<const uint32_t*>(c.in[l]);
        current = w * 32 + l;
        smem_read(addr, m[l / 8][l % 8], 16, c.op == Op::kLdsm ? "ldmatrix" : "ldmatrix.trans");
      }
      current = self;
      for (int l = 0; l < 32; ++l) {
        uint32_t* r = static_cast<uint32_t*>(c.out[l]);
        const int g = l / 4, q = l % 4;
        for (int i = 0; i < 4; ++i) {
          const uint16_t lo = c.op == Op::kLdsm ? m[i][g][2 * q] : m[i][2 * q][g];
          const uint16_t hi = c.op == Op::kLdsm ? m[i][g][2 * q + 1] : m[i][2 * q + 1][g];
          r[i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
        }
      }
      break;
    }
    case Op::kMma: {
      float A[16][16], B[16][8], C[16][8];
      for (int l = 0; l < 32; ++l) {
        const MmaOperands& o = *static_cast<const MmaOperands*>(c.in[l]);
        const int g = l / 4, q = l % 4;
        auto lo = [&](uint32_t v) { return elem_to_float(static_cast<uint16_t>(v & 0xffff), c.elem); };
        auto hi = [&](uint32_t v) { return elem_to_float(static_cast<uint16_t>(v >> 16), c.elem); };
        A[g][2 * q] = lo(o.a[0]);
        A[g][2 * q + 1] = hi(o.a[0]);
        A[g + 8][2 * q] = lo(o.a[1]);
        A[g + 8][2 * q + 1] = hi(o.a[1]);
        A[g][8 + 2 * q] = lo(o.a[2]);
        A[g][8 + 2 * q + 1] = hi(o.a[2]);
        A[g + 8][8 + 2 * q] = lo(o.a[3]);
        A[g + 8][8 + 2 * q + 1] = hi(o.a[3]);
        B[2 * q][g] = lo(o.b0);
        B[2 * q + 1][g] = hi(o.b0);
        B[8 + 2 * q][g] = lo(o.b1);
        B[8 + 2 * q + 1][g] = hi(o.b1);
        C[g][2 * q] = o.d[0];
        C[g][2 * q + 1] = o.d[1];
        C[g + 8][2 * q] = o.d[2];
        C[g + 8][2 * q + 1] = o.d[3];
      }
      float D[16][8];
      for (int i = 0; i < 16; ++i) {
        for (int j = 0; j < 8; ++j) {
          double acc = C[i][j];
          for (int k = 0; k < 16; ++k) acc += static_cast<double>(A[i][k]) * B[k][j];
          D[i][j] = static_cast<float>(acc);
        }
      }
      for (int l = 0; l < 32; ++l) {
        float* d = static_cast<float*>(c.out[l]);
        const int g = l / 4, q = l % 4;
        d[0] = D[g][2 * q];
        d[1] = D[g][2 * q + 1];
        d[2] = D[g + 8][2 * q];
        d[3] = D[g + 8][2 * q + 1];
      }
      break;
    }
    case Op::kShfl: {
      float v[32];
      int mask = 0;
      for (int l = 0; l < 32; ++l) {
        const float* in = static_cast<const float*>(c.in[l]);
        v[l] = in[0];
        const int m = static_cast<int>(in[1]);
        if (l > 0 && m != mask) fail("shfl.xor: lanes disagree on the lane mask");
        mask = m;
      }
      for (int l = 0; l < 32; ++l) *static_cast<float*>(c.out[l]) = v[l ^ mask];
      break;
    }
    case Op::kNone:
      break;
  }
}

// ---- launching -----------------------------------------------------------------------------------

inline void Emulator::fiber_main() {
  Emulator& e = emulator();
  e.body();
  Thread& t = *e.fibers[e.current];
  if (!t.open_group.empty() || !t.groups.empty()) e.fail("thread exited with cp.async copies in flight");
  if (e.extension != nullptr) e.extension->on_exit();
  t.done = true;
  switch_context(t.ctx, e.scheduler);
  std::abort();  // a finished fiber is never resumed
}

inline void Emulator::launch_block(dim3 b) {
  block_idx = b;
  std::fill(smem.begin(), smem.end(), 0xff);  // NaN in every float format: unwritten data shows
  std::fill(shadow.begin(), shadow.end(), WordState{});
  epoch = 1;  // shadow state starts at epoch 0: "never"
  std::fill(std::begin(warp_epoch), std::end(warp_epoch), 1u);
  barrier_arrived = 0;
  std::fill(std::begin(warp_barrier_arrived), std::end(warp_barrier_arrived), 0);
  for (Collective& c : collective) c = Collective{};
  if (extension != nullptr) extension->on_launch_block();
  for (int t = 0; t < threads; ++t) {
    Thread& f = *fibers[t];
    f.done = false;
    f.blocked = false;
    f.open_group.clear();
    f.groups.clear();
    f.ctx.start(stacks[t].get(), kStackBytes, &Emulator::fiber_main);
  }
  for (;;) {
    bool ran = false, all_done = true;
    for (int t = 0; t < threads; ++t) {
      Thread& f = *fibers[t];
      if (f.done) continue;
      all_done = false;
      if (f.blocked) continue;
      current = t;
      ran = true;
      switch_context(scheduler, f.ctx);
      if (!error.empty()) return;
    }
    if (all_done) return;
    if (!ran) {
      int done = 0, at_barrier = 0;
      for (auto& f : fibers) done += f->done;
      at_barrier = barrier_arrived;
      current = -1;
      error = "deadlock in block (" + std::to_string(b.x) + "," + std::to_string(b.y) + "," + std::to_string(b.z) +
              "): " + std::to_string(done) + " threads exited, " + std::to_string(at_barrier) +
              " wait at __syncthreads, the rest at a warp barrier or collective that not every lane reaches" +
              (extension != nullptr ? extension->deadlock_detail() : std::string());
      return;
    }
  }
}

// Runs `kernel_body` (the kernel called with its parameters) over the grid. Returns "" or the
// first error.
inline std::string Emulator::run(dim3 grid_, int threads_, int smem_bytes, std::function<void()> kernel_body) {
  if (threads_ % 32 != 0 || threads_ / 32 > kMaxWarps) return "unsupported block size";
  grid = grid_;
  threads = threads_;
  smem.assign(static_cast<size_t>(smem_bytes), 0);
  shadow.assign(static_cast<size_t>(smem_bytes + 3) / 4, WordState{});
  while (static_cast<int>(fibers.size()) < threads) {
    fibers.push_back(std::make_unique<Thread>());
    stacks.push_back(std::unique_ptr<char[]>(new char[kStackBytes]));
  }
  body = std::move(kernel_body);
  error.clear();
  for (Buffer& b : buffers) std::fill(b.stored.begin(), b.stored.end(), 0);
  std::vector<dim3> order;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) order.push_back(dim3(x, y, z));
    }
  }
  if (block_order_seed != 0) {
    std::mt19937_64 rng(block_order_seed);
    std::shuffle(order.begin(), order.end(), rng);
  }
  for (size_t i = 0; i < order.size() && error.empty(); ++i) launch_block(order[i]);
  return error;
}

struct ThreadIndex {
  unsigned x;
};

}  // namespace emu

// ---- what kernels name directly -------------------------------------------------------------------

#define threadIdx (::emu::ThreadIndex{static_cast<unsigned>(::emu::emulator().current)})
#define blockIdx (::emu::emulator().block_idx)
inline void __syncthreads() { emu::emulator().syncthreads(); }
inline void __syncwarp() { emu::emulator().syncwarp(); }

// ---- the instructions of csrc/flash_attn/ptx.cuh -------------------------------------------------

namespace l2vf {

inline uint32_t dynamic_smem() { return 0; }

inline void ldmatrix_x4(uint32_t (&r)[4], uint32_t smem_row) {
  emu::emulator().collective_op(emu::Op::kLdsm, 0, &smem_row, r);
}
inline void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t smem_row) {
  emu::emulator().collective_op(emu::Op::kLdsmTrans, 0, &smem_row, r);
}

template <class Elem>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const emu::MmaOperands o{a, b0, b1, d};
  float out[4];
  emu::emulator().collective_op(emu::Op::kMma, std::is_same<Elem, Bf16>::value ? 1 : 0, &o, out);
  std::copy(out, out + 4, d);
}

template <class Elem>
inline uint32_t pack_pair(float lo, float hi) {
  if (std::is_same<Elem, Bf16>::value) {
    return static_cast<uint32_t>(emu::float_to_bf16(lo)) | (static_cast<uint32_t>(emu::float_to_bf16(hi)) << 16);
  }
  return static_cast<uint32_t>(emu::float_to_half(lo)) | (static_cast<uint32_t>(emu::float_to_half(hi)) << 16);
}

template <class Elem>
inline float2 unpack_pair(uint32_t bits) {
  const int elem = std::is_same<Elem, Bf16>::value ? 1 : 0;
  return make_float2(emu::elem_to_float(static_cast<uint16_t>(bits & 0xffff), elem),
                     emu::elem_to_float(static_cast<uint16_t>(bits >> 16), elem));
}

inline float fast_exp2(float x) { return std::exp2(x); }
inline float accurate_tanh(float x) {
  const float e = fast_exp2(2.f * 1.4426950408889634f * std::fabs(x));
  return std::copysign(1.f - 2.f / (e + 1.f), x);
}

inline float warp_shfl_xor(float v, int lane_mask) {
  const float in[2] = {v, static_cast<float>(lane_mask)};
  float out;
  emu::emulator().collective_op(emu::Op::kShfl, 0, in, &out);
  return out;
}

inline void cp_async_16(uint32_t smem, const void* gmem, bool pred) { emu::emulator().cp_async(smem, gmem, 16, pred); }
inline void cp_async_4(uint32_t smem, const void* gmem, bool pred) { emu::emulator().cp_async(smem, gmem, 4, pred); }
inline void cp_async_commit() { emu::emulator().cp_async_commit(); }
template <int kPending>
inline void cp_async_wait() {
  emu::emulator().cp_async_wait(kPending);
}

template <class T>
inline T emu_load(const void* p, const char* what) {
  emu::emulator().check_global(p, sizeof(T), sizeof(T), what);
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}
inline uint4 ld_global_16(const void* p) { return emu_load<uint4>(p, "ld.global.v4"); }
inline void st_global_16(void* p, uint4 v) { emu::emulator().global_store(p, &v, 16, "st.global.v4"); }
inline float ld_global_f32(const float* p) { return emu_load<float>(p, "ld.global.f32"); }
inline void st_global_f32(float* p, float v) { emu::emulator().global_store(p, &v, 4, "st.global.f32"); }
inline int ld_global_i32(const int* p) { return emu_load<int>(p, "ld.global.s32"); }
inline uint32_t ld_global_u32(const uint32_t* p) { return emu_load<uint32_t>(p, "ld.global.u32"); }
inline void st_global_u32(uint32_t* p, uint32_t v) { emu::emulator().global_store(p, &v, 4, "st.global.u32"); }
inline bool ld_global_bool(const bool* p) { return emu_load<bool>(p, "ld.global.u8"); }
inline void atomic_add_f32(float* p, float v) {
  emu::Emulator& e = emu::emulator();
  e.check_global(p, 4, 4, "red.global.add.f32");
  if (!e.find(p, 4, "red.global.add.f32").writable) e.fail("red.global.add.f32: read-only buffer");
  *p += v;
}

inline void st_shared_u32(uint32_t p, uint32_t v) { emu::emulator().smem_write(p, &v, 4, "st.shared.u32"); }
inline uint4 ld_shared_16(uint32_t p) {
  uint4 v;
  emu::emulator().smem_read(p, &v, 16, "ld.shared.v4");
  return v;
}
inline float2 ld_shared_f32x2(uint32_t p) {
  float2 v;
  emu::emulator().smem_read(p, &v, 8, "ld.shared.v2.f32");
  return v;
}

}  // namespace l2vf
