// The Hopper instructions of csrc/flash_attn/ptx_sm90.cuh on the CPU emulator (emulator.h), with
// the ordering rules that a GPU shows only as wrong numbers or hangs turned into named errors.
//
// Included after emulator.h and before the kernel headers, it defines the include guard of
// ptx_sm90.cuh and provides every function that header declares; tma_host.h is included with
// LLM2VEC_FAST_TMA_EMULATED, and encode_tma_descriptor below stores the checked spec in the
// descriptor's bytes. Launch Hopper kernels with emu::run_sm90 (it installs this model for the
// launch). What it models:
//   - ordering: vector clocks with a component per thread, per warpgroup's wgmma unit and per
//     mbarrier's TMA unit. __syncthreads, __syncwarp, named barriers, mbarrier arrive -> wait,
//     and wgmma_wait order accesses; every shared-memory word remembers its last writer and the
//     readers since, and an access not ordered after a conflicting one is a race. This replaces
//     emulator.h's barrier-epoch check for the launch.
//   - mbarriers: arrival count, transaction bytes (expect_tx up, TMA landings down), a phase
//     completes when both reach zero, try_wait.parity true once the phase of that parity is
//     done (a fresh barrier's parity-1 wait passes at once). A waiting thread blocks until the
//     phase completes (try_wait never returns false here), so a hang is reported as a deadlock
//     with each barrier's state.
//   - TMA: 2-D..4-D boxes, element strides, out-of-bounds zero fill, the 32/64/128-byte swizzle
//     on the shared address bits as the hardware applies it; a load's bytes land at issue but
//     count as written by the barrier's TMA unit, so reading them is ordered only after a wait
//     on the phase they complete. Stores read shared memory at issue (async proxy) and hold it
//     until tma_store_wait.
//   - wgmma: a warpgroup-wide collective; descriptors decoded (canonical layouts, swizzle,
//     alignment), operands read at issue through the async proxy, the result kept aside and the
//     accumulator registers filled with a marker NaN until wgmma_wait retires the group (a
//     marker reaching a store, or an accumulator changed before the wait, is reported); shared
//     memory an in-flight wgmma reads must not be written; wgmma_fence is required after every
//     wait (and at the start) before the next wgmma, and registers a wgmma uses must not change
//     between the last wgmma_fence and it (their contents at the fence are remembered).
//   - async proxy: ordinary stores read next by wgmma or a TMA store need fence_proxy_async in
//     the writing thread; a wgmma reading with another swizzle than the TMA load that wrote the
//     data is reported.
//   - setmaxnreg: warpgroup-wide, 24..256 in steps of 8, inc never lowers, dec never raises, and
//     the warpgroups' sum stays within the 64K-register file (an inc that does not fit waits).
//   - named barriers 1..15: thread counts (multiples of 32, agreeing per use), ids.
// Not modelled: clusters and multicast, L2/global memory ordering between blocks, timing,
// the tensor cores' internal rounding (products are summed in double, rounded to float once per
// instruction); races that only another interleaving than fibers-in-thread-order would show.
#pragma once

#include <deque>
#include <map>
#include <utility>

#include "emulator.h"

#define LLM2VEC_FAST_PTX_SM90_CUH  // the emulated instructions below replace csrc/flash_attn/ptx_sm90.cuh
#define LLM2VEC_FAST_TMA_EMULATED
#include "flash_attn/ptx_sm90.cuh"  // only its plain part: Major, make_smem_desc (and tma_host.h)

#define __grid_constant__

inline uint32_t __float_as_uint(float x) { return emu::float_to_bits(x); }
inline float __uint_as_float(uint32_t x) { return emu::bits_to_float(x); }

namespace emu {

constexpr int kMaxWarpgroups = kMaxWarps / 4;
constexpr int kMaxMbarriers = 64;
constexpr uint32_t kInFlightBits = 0x7fdead00u;  // a quiet NaN; its top half is the bf16 NaN 0x7fde
constexpr uint64_t kTmaMagic = 0x4c32564654414d31ull;

using Clock = std::vector<uint32_t>;

inline void join(Clock& into, const Clock& from) {
  for (size_t i = 0; i < into.size(); ++i) into[i] = std::max(into[i], from[i]);
}

// The bytes an emulated TmaDescriptor holds.
struct PackedTma {
  uint64_t magic;
  const void* base;
  uint64_t dims[l2vf::kTmaMaxRank];
  uint64_t strides[l2vf::kTmaMaxRank];
  uint16_t box[l2vf::kTmaMaxRank];
  uint8_t elem_strides[l2vf::kTmaMaxRank];
  uint8_t rank, elem_bytes, swizzle;

  l2vf::TmaTensorSpec spec() const {
    l2vf::TmaTensorSpec s;
    s.base = base;
    s.rank = rank;
    s.elem_bytes = elem_bytes;
    for (int i = 0; i < rank; ++i) {
      s.dims[i] = dims[i];
      s.strides[i] = strides[i];
      s.box[i] = box[i];
      s.elem_strides[i] = elem_strides[i];
    }
    s.swizzle = static_cast<l2vf::Swizzle>(swizzle);
    return s;
  }
};
static_assert(sizeof(PackedTma) <= sizeof(l2vf::TmaDescriptor), "the emulated tensor map must fit a CUtensorMap");

struct SyncWord {
  int32_t writer = -1;  // clock component of the last write
  uint32_t w_clock = 0;
  int16_t unfenced_writer = -1;                     // thread whose ordinary store is not yet fenced for the async proxy
  int16_t wgmma_readers = 0;                        // in-flight wgmma groups reading the word
  int16_t store_readers = 0;                        // in-flight TMA stores reading it
  int16_t tma_swizzle = -1;                         // swizzle span of the TMA load that wrote it, -1 if none
  std::vector<std::pair<int32_t, uint32_t>> reads;  // (component, clock) since the last write
};

struct MBarrier {
  int index = 0;  // its TMA unit is clock component tma_unit(index)
  uint32_t expected = 0, pending = 0, phase = 0;
  int64_t tx = 0;
  int init_thread = 0;
  uint32_t init_clock = 0;
  bool fenced = false;
  Clock releasing, released;
  std::vector<int> waiting;  // threads blocked in try_wait
  int waiting_parity = 0;
};

struct NamedBarrier {
  uint32_t expected = 0, arrived = 0, generation = 0;
  int waiters = 0;
  Clock releasing;
  std::vector<int> waiting;
};

enum class WgOp { kNone, kFence, kMma, kCommit, kWait, kSetmaxnreg };

inline const char* wg_op_name(WgOp op) {
  switch (op) {
    case WgOp::kFence:
      return "wgmma.fence";
    case WgOp::kMma:
      return "wgmma.mma_async";
    case WgOp::kCommit:
      return "wgmma.commit_group";
    case WgOp::kWait:
      return "wgmma.wait_group";
    case WgOp::kSetmaxnreg:
      return "setmaxnreg";
    default:
      return "none";
  }
}

// One thread's operands of a warpgroup-wide instruction.
struct WgArgs {
  int elem = 0, n = 0, major_a = 0, major_b = 0;
  bool register_a = false, accumulate = false;
  uint64_t desc_a = 0, desc_b = 0;
  float* d = nullptr;
  const uint32_t* a = nullptr;
  int count = 0;  // wait: groups left pending; setmaxnreg: registers
  bool increase = false;
};

struct WgGroup {
  std::vector<uint32_t> words;
  Clock done;
};

struct Warpgroup {
  int arrived = 0;
  uint32_t generation = 0;
  WgOp op = WgOp::kNone;
  const WgArgs* args[128] = {};
  std::vector<uint32_t> open_words;
  std::deque<WgGroup> groups;
  uint32_t committed = 0;  // groups committed so far (their sequence numbers are 1..committed)
  int registers = 0;
  bool waiting_registers = false;
};

struct InFlightRegs {
  float* d;
  int count;
  std::vector<float> result;
  uint32_t group;  // 0: not committed yet
};

struct InFlightA {
  const uint32_t* a;
  uint32_t copy[4];
  uint32_t group;
};

struct Sm90Thread {
  bool fence_needed = true;
  // Registers wgmmas have used (accumulators, A fragments) and their contents at the last wgmma_fence.
  std::vector<std::pair<const uint32_t*, std::vector<uint32_t>>> fenced_regs;
  std::vector<uint32_t> unfenced;
  std::vector<InFlightRegs> accumulators;
  std::vector<InFlightA> a_fragments;
  std::vector<uint32_t> store_open;
  std::deque<std::vector<uint32_t>> store_groups;
};

struct Sm90 : Extension {
  Emulator& e = emulator();
  int threads = 0, warpgroups = 0;
  std::vector<Clock> clocks;  // per component
  std::vector<SyncWord> words;
  std::map<uint32_t, MBarrier> mbarriers;
  NamedBarrier named[16];
  Warpgroup wg[kMaxWarpgroups];
  std::vector<Sm90Thread> ts;
  bool wgmma_seen = false;

  int wg_unit(int g) const { return threads + g; }
  int tma_unit(int index) const { return threads + kMaxWarpgroups + index; }
  int components() const { return threads + kMaxWarpgroups + kMaxMbarriers; }
  Clock& clock() { return clocks[e.tid()]; }
  // Publishes the current thread's clock into `into` and starts its next interval.
  void release(Clock& into) {
    join(into, clock());
    ++clock()[e.tid()];
  }

  // ---- Extension ----
  void on_launch_block() override {
    threads = e.threads;
    warpgroups = threads / 128;
    clocks.assign(components(), Clock(components(), 0));
    for (int c = 0; c < components(); ++c) clocks[c][c] = 1;
    words.assign(e.smem.size() / 4 + 1, SyncWord{});
    mbarriers.clear();
    for (NamedBarrier& b : named) b = NamedBarrier{};
    const int start_regs = std::min(256, (65536 / std::max(threads, 1)) / 8 * 8);
    for (Warpgroup& w : wg) {
      w = Warpgroup{};
      w.registers = start_regs;
    }
    ts.assign(threads, Sm90Thread{});
    wgmma_seen = false;
  }

  std::string who(int component) const {
    if (component < threads) return "thread " + std::to_string(component);
    if (component < threads + kMaxWarpgroups) return "a wgmma of warpgroup " + std::to_string(component - threads);
    return "a TMA load completing on mbarrier #" + std::to_string(component - threads - kMaxWarpgroups);
  }

  // The race check: `actor` (seeing `seen`) accesses `word`, recorded as component `record`.
  void check_order(uint32_t word, bool write, int record, const Clock& seen, const char* what) {
    SyncWord& w = words[word];
    const auto at = [word] { return " at shared byte " + std::to_string(word * 4); };
    if (w.writer >= 0 && w.writer != record && seen[w.writer] < w.w_clock) {
      if (w.writer >= tma_unit(0)) {
        e.fail(std::string(what) + ": reads shared memory that " + who(w.writer) +
               " wrote, before waiting for the mbarrier phase it completes on" + at());
      }
      e.fail(std::string(what) + (write ? ": write-write race with " : ": read after an unsynchronised write by ") +
             who(w.writer) + " (shared memory race)" + at());
    }
    if (write) {
      for (const auto& [reader, c] : w.reads) {
        if (reader == record || seen[reader] >= c) continue;
        if (record >= tma_unit(0)) {
          e.fail(std::string(what) + ": overwrites a stage that " + who(reader) +
                 " read and did not release to the producer (wait on the stage's empty mbarrier first)" + at());
        }
        e.fail(std::string(what) + ": write after an unsynchronised read by " + who(reader) + " (shared memory race)" +
               at());
      }
      w.reads.clear();
      w.writer = record;
      w.w_clock = clocks[record][record];
      return;
    }
    for (auto& entry : w.reads) {
      if (entry.first == record) {
        entry.second = clocks[record][record];
        return;
      }
    }
    w.reads.emplace_back(record, clocks[record][record]);
  }

  void check_not_in_flight(uint32_t word, const char* what) {
    const SyncWord& w = words[word];
    if (w.wgmma_readers == 0 && w.store_readers == 0) return;
    const std::string at = " at shared byte " + std::to_string(word * 4);
    if (w.wgmma_readers > 0) {
      e.fail(std::string(what) + ": writes shared memory an in-flight wgmma reads (before its wgmma_wait)" + at);
    }
    if (w.store_readers > 0) {
      e.fail(std::string(what) + ": writes shared memory a TMA store still reads (before tma_store_wait)" + at);
    }
  }

  void on_access(uint32_t word, bool write, const char* what) override {
    const int t = e.tid();
    if (write) {
      check_not_in_flight(word, what);
      SyncWord& w = words[word];
      w.tma_swizzle = -1;
      if (w.unfenced_writer != t) ts[t].unfenced.push_back(word);
      w.unfenced_writer = static_cast<int16_t>(t);
    }
    check_order(word, write, t, clock(), what);
  }

  void on_barrier(int first, int count) override {
    Clock all(components(), 0);
    for (int t = first; t < first + count; ++t) join(all, clocks[t]);
    for (int t = first; t < first + count; ++t) {
      clocks[t] = all;
      clocks[t][t] = all[t] + 1;
    }
  }

  static bool marker(uint32_t bits) { return (bits & 0x7fffffffu) == kInFlightBits; }
  static bool marker16(uint16_t bits) { return (bits & 0x7fffu) == (kInFlightBits >> 16); }
  // Float words only: a 16-bit half of an ordinary float may hold any bits.
  void on_store(const void* src, size_t bytes, const char* what) override {
    if (!wgmma_seen) return;
    for (size_t i = 0; i + 4 <= bytes; i += 4) {
      uint32_t f;
      std::memcpy(&f, static_cast<const uint8_t*>(src) + i, 4);
      if (marker(f)) {
        e.fail(std::string(what) +
               ": stores a value read from wgmma accumulator registers before wgmma_wait "
               "retired their group (in-flight accumulator read)");
      }
    }
  }

  void on_exit() override {
    Sm90Thread& s = ts[e.tid()];
    if (!s.accumulators.empty()) e.fail("thread exited with wgmma accumulators in flight (wgmma_wait missing)");
    if (!s.store_open.empty() || !s.store_groups.empty())
      e.fail("thread exited with TMA stores not waited for (tma_store_wait missing)");
  }

  std::string deadlock_detail() override {
    std::string out;
    for (const auto& [addr, b] : mbarriers) {
      if (b.waiting.empty()) continue;
      out += "; mbarrier at shared byte " + std::to_string(addr) + ": " + std::to_string(b.waiting.size()) +
             " thread(s) wait for parity " + std::to_string(b.waiting_parity) + ", its phase " +
             std::to_string(b.phase) + " still needs " + std::to_string(b.pending) + " arrivals and " +
             std::to_string(b.tx) + " transaction bytes" +
             (b.tx != 0 ? " (does expect_tx match the bytes its TMA loads deliver?)" : "");
    }
    for (int id = 0; id < 16; ++id) {
      if (named[id].waiters > 0) {
        out += "; named barrier " + std::to_string(id) + ": " + std::to_string(named[id].arrived) + " of " +
               std::to_string(named[id].expected) + " threads arrived";
      }
    }
    for (int g = 0; g < warpgroups; ++g) {
      if (wg[g].arrived > 0) {
        out += "; warpgroup " + std::to_string(g) + ": " + std::to_string(wg[g].arrived) + " of 128 threads at " +
               wg_op_name(wg[g].op) + (wg[g].waiting_registers ? " (waiting for registers other warpgroups hold)" : "");
      }
    }
    return out;
  }

  // ---- mbarriers ----
  MBarrier& barrier(uint32_t bar, const char* what) {
    auto it = mbarriers.find(bar);
    if (it == mbarriers.end()) e.fail(std::string(what) + ": no mbarrier_init at shared byte " + std::to_string(bar));
    MBarrier& b = it->second;
    if (e.tid() != b.init_thread && clock()[b.init_thread] < b.init_clock) {
      e.fail(std::string(what) +
             ": uses an mbarrier before its initialisation was made visible "
             "(mbarrier_init_fence and a barrier after mbarrier_init)");
    }
    return b;
  }

  void mbarrier_init(uint32_t bar, uint32_t arrivals) {
    e.check_smem(bar, 8, 8, "mbarrier.init");
    if (arrivals == 0) e.fail("mbarrier.init: arrival count 0");
    for (const auto& [addr, b] : mbarriers) {
      if (addr == bar && !b.waiting.empty()) e.fail("mbarrier.init: re-initialises an mbarrier that threads wait on");
    }
    MBarrier b;
    b.index = mbarriers.count(bar) ? mbarriers[bar].index : static_cast<int>(mbarriers.size());
    if (b.index >= kMaxMbarriers) e.fail("mbarrier.init: more mbarriers than the emulator tracks");
    b.expected = b.pending = arrivals;
    b.init_thread = e.tid();
    b.init_clock = clock()[e.tid()];
    b.releasing.assign(components(), 0);
    b.released.assign(components(), 0);
    mbarriers[bar] = std::move(b);
    for (uint32_t w = bar / 4; w < bar / 4 + 2; ++w) e.shadow[w].written = true;  // not ordinary data
  }

  void mbarrier_init_fence() {
    for (auto& [addr, b] : mbarriers) {
      if (b.init_thread == e.tid()) b.fenced = true;
    }
  }

  void complete_if_done(MBarrier& b) {
    if (b.pending != 0 || b.tx != 0) return;
    ++b.phase;
    b.pending = b.expected;
    join(b.released, b.releasing);
    std::fill(b.releasing.begin(), b.releasing.end(), 0);
    for (int t : b.waiting) e.fibers[t]->blocked = false;  // they re-check their parity
    b.waiting.clear();
  }

  void arrive(uint32_t bar, int64_t bytes, const char* what) {
    MBarrier& b = barrier(bar, what);
    if (b.pending == 0) e.fail(std::string(what) + ": more arrivals than the mbarrier's count in one phase");
    b.tx += bytes;
    release(b.releasing);
    --b.pending;
    complete_if_done(b);
  }

  void expect_tx(uint32_t bar, uint32_t bytes) {
    MBarrier& b = barrier(bar, "mbarrier.expect_tx");
    b.tx += bytes;
  }

  bool try_wait(uint32_t bar, uint32_t parity) {
    if (parity > 1) e.fail("mbarrier.try_wait.parity: parity must be 0 or 1");
    for (;;) {
      MBarrier& b = barrier(bar, "mbarrier.try_wait.parity");
      if ((b.phase & 1u) != parity) {
        join(clock(), b.released);
        return true;
      }
      if (std::find(b.waiting.begin(), b.waiting.end(), e.tid()) == b.waiting.end()) b.waiting.push_back(e.tid());
      b.waiting_parity = static_cast<int>(parity);
      e.yield_blocked();
    }
  }

  // ---- named barriers ----
  void named_barrier(uint32_t id, uint32_t count, bool wait) {
    const char* what = wait ? "bar.sync" : "bar.arrive";
    if (id == 0 || id > 15)
      e.fail(std::string(what) + ": named barrier id " + std::to_string(id) + " (use 1..15; 0 is __syncthreads)");
    if (count == 0 || count % 32 != 0 || static_cast<int>(count) > threads) {
      e.fail(std::string(what) + ": thread count " + std::to_string(count) +
             " must be a positive multiple of 32 up to the block size");
    }
    NamedBarrier& b = named[id];
    if (b.arrived == 0) {
      b.expected = count;
      b.releasing.assign(components(), 0);
    } else if (b.expected != count) {
      e.fail(std::string(what) + ": threads disagree on named barrier " + std::to_string(id) + "'s thread count (" +
             std::to_string(b.expected) + " vs " + std::to_string(count) + ")");
    }
    release(b.releasing);
    if (wait) b.waiting.push_back(e.tid());
    if (++b.arrived == b.expected) {
      for (int t : b.waiting) {
        join(clocks[t], b.releasing);
        e.fibers[t]->blocked = false;
      }
      b.arrived = 0;
      b.waiting.clear();
      ++b.generation;
      return;
    }
    if (!wait) return;
    const uint32_t generation = b.generation;
    ++b.waiters;
    while (named[id].generation == generation) e.yield_blocked();
    --named[id].waiters;
  }

  // ---- warpgroup-wide instructions ----
  void warpgroup_op(WgOp op, const WgArgs& args) {
    if (threads % 128 != 0) e.fail(std::string(wg_op_name(op)) + ": the block is not a whole number of warpgroups");
    Warpgroup& w = wg[e.tid() / 128];
    if (w.arrived == 0) {
      w.op = op;
    } else if (w.op != op) {
      e.fail(std::string("warpgroup threads meet at different warpgroup-wide instructions (") + wg_op_name(w.op) +
             " and " + wg_op_name(op) + ")");
    }
    w.args[e.tid() % 128] = &args;
    const uint32_t generation = w.generation;
    if (++w.arrived == 128) perform(e.tid() / 128);  // finishes it, or leaves it waiting for registers
    while (w.generation == generation) e.yield_blocked();
  }

  void finish(int g) {
    Warpgroup& w = wg[g];
    w.arrived = 0;
    w.op = WgOp::kNone;
    ++w.generation;
    for (int t = 128 * g; t < 128 * g + 128; ++t) e.fibers[t]->blocked = false;
  }

  void perform(int g) {
    Warpgroup& w = wg[g];
    const int base = 128 * g;
    switch (w.op) {
      case WgOp::kFence:
        for (int t = base; t < base + 128; ++t) {
          ts[t].fence_needed = false;
          for (auto& [regs, contents] : ts[t].fenced_regs) std::copy(regs, regs + contents.size(), contents.begin());
        }
        break;
      case WgOp::kMma:
        mma(g);
        break;
      case WgOp::kCommit:
        commit(g);
        break;
      case WgOp::kWait:
        wait(g, w.args[0]->count);
        break;
      case WgOp::kSetmaxnreg:
        if (!setmaxnreg(g)) return;  // waits for registers; the last dec that frees them performs it
        break;
      default:
        break;
    }
    finish(g);
  }

  bool setmaxnreg(int g) {
    Warpgroup& w = wg[g];
    const WgArgs& a = *w.args[0];
    for (int i = 1; i < 128; ++i) {
      if (w.args[i]->count != a.count || w.args[i]->increase != a.increase) {
        e.fail("setmaxnreg: the warps of a warpgroup ask for different register counts");
      }
    }
    if (a.count < 24 || a.count > 256 || a.count % 8 != 0) e.fail("setmaxnreg: count must be 24..256, a multiple of 8");
    if (a.increase && a.count < w.registers) e.fail("setmaxnreg.inc: asks for fewer registers than the warpgroup has");
    if (!a.increase && a.count > w.registers) e.fail("setmaxnreg.dec: asks for more registers than the warpgroup has");
    int total = 0;
    for (int i = 0; i < warpgroups; ++i) total += 128 * (i == g ? a.count : wg[i].registers);
    if (total > 65536) {
      w.waiting_registers = true;  // the hardware waits until other warpgroups release registers
      return false;
    }
    w.waiting_registers = false;
    w.registers = a.count;
    if (!a.increase) {
      for (int i = 0; i < warpgroups; ++i) {
        if (wg[i].waiting_registers && setmaxnreg(i)) finish(i);
      }
    }
    return true;
  }

  // Byte offset, before swizzling, of element (mn, k) of a 16-deep operand slice (ptx_sm90.cuh's table).
  static uint32_t operand_offset(int mn, int k, bool mn_major, uint32_t span, uint32_t lbo, uint32_t sbo) {
    if (!mn_major) {
      const uint32_t r = mn % 8, i = mn / 8, j = k / 8, c = k % 8;
      return span == 0 ? r * 16 + i * sbo + j * lbo + c * 2 : r * span + i * sbo + j * 16 + c * 2;
    }
    const uint32_t r = k % 8, kj = k / 8, c = mn % 8;
    if (span == 0) return c * 2 + (mn / 8) * sbo + r * 16 + kj * lbo;
    const uint32_t atoms = span / 16;
    return c * 2 + ((mn / 8) % atoms) * 16 + (mn / (8 * atoms)) * lbo + r * span + kj * sbo;
  }

  static uint32_t swizzle(uint32_t addr, uint32_t span) {
    return span == 0 ? addr : addr ^ (((addr >> 7) & (span / 16 - 1)) << 4);
  }

  static uint32_t desc_span(uint64_t desc) {
    static const uint32_t spans[4] = {0, 128, 64, 32};
    return spans[desc >> 62];
  }

  // Reads a rows x 16 operand through `desc` into out[row][k] as floats, checking every word.
  void read_operand(int g, uint64_t desc, int rows, bool mn_major, int elem, std::vector<float>& out,
                    const char* name) {
    const uint32_t start = static_cast<uint32_t>(desc & 0x3fff) << 4;
    const uint32_t lbo = static_cast<uint32_t>((desc >> 16) & 0x3fff) << 4;
    const uint32_t sbo = static_cast<uint32_t>((desc >> 32) & 0x3fff) << 4;
    const uint32_t base_offset = static_cast<uint32_t>((desc >> 49) & 7);
    const uint32_t span = desc_span(desc);
    const std::string what = std::string("wgmma operand ") + name;
    if (((desc >> 14) & 3) || ((desc >> 30) & 3) || ((desc >> 46) & 7) || ((desc >> 52) & 0x3ff)) {
      e.fail(what + ": descriptor has bits set outside its fields");
    }
    if (base_offset != 0) e.fail(what + ": descriptor base offset is not supported by the emulator");
    if (span != 0 && (start % (8 * span)) >= 128) {
      e.fail(what + ": a swizzled matrix must start on a " + std::to_string(8 * span) +
             "-byte pattern boundary plus an in-line offset");
    }
    out.assign(static_cast<size_t>(rows) * 16, 0.f);
    const int unit = wg_unit(g);
    for (int mn = 0; mn < rows; ++mn) {
      for (int k = 0; k < 16; ++k) {
        const uint32_t addr = swizzle(start + operand_offset(mn, k, mn_major, span, lbo, sbo), span);
        e.check_smem(addr, 2, 2, what.c_str());
        const uint32_t word = addr / 4;
        if (!e.shadow[word].written)
          e.fail(what + ": reads never-written shared memory at byte " + std::to_string(addr));
        if (e.shadow[word].pending > 0) e.fail(what + ": reads shared memory with a cp.async in flight");
        SyncWord& sw = words[word];
        if (sw.unfenced_writer >= 0) {
          e.fail(what + ": reads shared memory that thread " + std::to_string(sw.unfenced_writer) +
                 " wrote with ordinary stores without fence_proxy_async (fence.proxy.async missing)");
        }
        if (sw.tma_swizzle >= 0 && static_cast<uint32_t>(sw.tma_swizzle) != span) {
          e.fail(what + ": reads with a " + std::to_string(span) + "-byte swizzle data a TMA load wrote with a " +
                 std::to_string(sw.tma_swizzle) + "-byte swizzle (wrong swizzle)");
        }
        check_order(word, false, unit, clocks[unit], what.c_str());
        if (wg[g].open_words.empty() || wg[g].open_words.back() != word) wg[g].open_words.push_back(word);
        uint16_t v;
        std::memcpy(&v, e.smem.data() + addr, 2);
        out[static_cast<size_t>(mn) * 16 + k] = elem_to_float(v, elem);
      }
    }
  }

  // Whether the registers [regs, regs + words) changed since the thread's last wgmma_fence (false
  // the first time a wgmma uses them; they are remembered from then on).
  static bool written_since_fence(Sm90Thread& s, const void* regs, int words) {
    const auto* r = static_cast<const uint32_t*>(regs);
    for (const auto& [known, contents] : s.fenced_regs) {
      if (known == r && static_cast<int>(contents.size()) == words)
        return !std::equal(contents.begin(), contents.end(), r);
    }
    s.fenced_regs.emplace_back(r, std::vector<uint32_t>(r, r + words));
    return false;
  }

  bool in_flight(const Sm90Thread& s, const float* d) const {
    return std::any_of(s.accumulators.begin(), s.accumulators.end(), [&](const InFlightRegs& r) { return r.d == d; });
  }

  void mma(int g) {
    Warpgroup& w = wg[g];
    const WgArgs& a0 = *w.args[0];
    const int base = 128 * g, n = a0.n;
    for (int i = 0; i < 128; ++i) {
      const WgArgs& a = *w.args[i];
      if (a.elem != a0.elem || a.n != n || a.register_a != a0.register_a || a.desc_b != a0.desc_b ||
          (!a.register_a && a.desc_a != a0.desc_a) || a.major_a != a0.major_a || a.major_b != a0.major_b ||
          a.accumulate != a0.accumulate) {
        e.fail("wgmma.mma_async: the threads of the warpgroup disagree on the instruction or its descriptors");
      }
      Sm90Thread& s = ts[base + i];
      if (s.fence_needed) {
        e.fail(
            "wgmma.mma_async: no wgmma_fence since the warpgroup's registers were last accessed "
            "(wgmma.fence missing before the first wgmma of a batch)");
      }
      if ((!in_flight(s, a.d) && written_since_fence(s, a.d, n / 2)) ||
          (a.register_a && written_since_fence(s, a.a, 4))) {
        e.fail(
            "wgmma.mma_async: its accumulator or A registers were written after the last wgmma_fence "
            "(wgmma.fence missing between register writes and the wgmma)");
      }
    }
    wgmma_seen = true;
    const int unit = wg_unit(g);
    for (int t = base; t < base + 128; ++t) join(clocks[unit], clocks[t]);
    std::vector<float> A, B;
    if (a0.register_a) {
      A.assign(64 * 16, 0.f);
      for (int i = 0; i < 128; ++i) {
        const uint32_t* r = w.args[i]->a;
        const int row = 16 * (i / 32) + (i % 32) / 4, q = i % 4;
        for (int j = 0; j < 4; ++j) {
          const int rr = row + 8 * (j % 2), kk = 2 * q + 8 * (j / 2);
          for (int half = 0; half < 2; ++half) {
            const uint16_t bits = static_cast<uint16_t>(r[j] >> (16 * half));
            if (a0.elem == 1 && marker16(bits)) {
              e.fail(
                  "wgmma.mma_async: its A fragment holds a value read from accumulators before wgmma_wait "
                  "(in-flight accumulator read)");
            }
            A[rr * 16 + kk + half] = elem_to_float(bits, a0.elem);
          }
        }
      }
    } else {
      read_operand(g, a0.desc_a, 64, a0.major_a != 0, a0.elem, A, "A");
    }
    read_operand(g, a0.desc_b, n, a0.major_b != 0, a0.elem, B, "B");
    for (int i = 0; i < 128; ++i) {
      Sm90Thread& s = ts[base + i];
      const WgArgs& a = *w.args[i];
      InFlightRegs* regs = nullptr;
      for (InFlightRegs& r : s.accumulators) {
        if (r.d == a.d) regs = &r;
      }
      if (regs == nullptr) {
        s.accumulators.push_back({a.d, n / 2, std::vector<float>(a.d, a.d + n / 2), 0});
        regs = &s.accumulators.back();
      } else if (regs->count != n / 2) {
        e.fail("wgmma.mma_async: chains onto in-flight accumulators of another shape");
      }
      regs->group = 0;
      const int row = 16 * (i / 32) + (i % 32) / 4, q = i % 4;
      for (int j = 0; j < n / 8; ++j) {
        for (int v = 0; v < 4; ++v) {
          const int rr = row + 8 * (v / 2), col = 8 * j + 2 * q + v % 2;
          double acc = a.accumulate ? regs->result[4 * j + v] : 0.0;
          for (int k = 0; k < 16; ++k) acc += static_cast<double>(A[rr * 16 + k]) * B[col * 16 + k];
          regs->result[4 * j + v] = static_cast<float>(acc);
        }
      }
      float mark;
      std::memcpy(&mark, &kInFlightBits, 4);
      std::fill(a.d, a.d + n / 2, mark);
      if (a0.register_a) {
        InFlightA f{a.a, {a.a[0], a.a[1], a.a[2], a.a[3]}, 0};
        s.a_fragments.push_back(f);
      }
    }
  }

  void commit(int g) {
    Warpgroup& w = wg[g];
    const int unit = wg_unit(g);
    ++w.committed;
    for (uint32_t word : w.open_words) ++words[word].wgmma_readers;
    w.groups.push_back({std::move(w.open_words), clocks[unit]});
    w.open_words.clear();
    ++clocks[unit][unit];
    for (int t = 128 * g; t < 128 * g + 128; ++t) {
      for (InFlightRegs& r : ts[t].accumulators) {
        if (r.group == 0) r.group = w.committed;
      }
      for (InFlightA& f : ts[t].a_fragments) {
        if (f.group == 0) f.group = w.committed;
      }
    }
  }

  void wait(int g, int pending) {
    Warpgroup& w = wg[g];
    for (int i = 1; i < 128; ++i) {
      if (w.args[i]->count != pending)
        e.fail("wgmma.wait_group: the threads of the warpgroup wait for different counts");
    }
    while (static_cast<int>(w.groups.size()) > pending) {
      const uint32_t seq = w.committed - static_cast<uint32_t>(w.groups.size()) + 1;
      WgGroup& group = w.groups.front();
      for (uint32_t word : group.words) --words[word].wgmma_readers;
      for (int t = 128 * g; t < 128 * g + 128; ++t) {
        join(clocks[t], group.done);
        retire_registers(ts[t], seq);
      }
      w.groups.pop_front();
    }
    for (int t = 128 * g; t < 128 * g + 128; ++t) ts[t].fence_needed = true;
  }

  void retire_registers(Sm90Thread& s, uint32_t seq) {
    for (size_t i = 0; i < s.accumulators.size();) {
      InFlightRegs& r = s.accumulators[i];
      if (r.group != seq) {
        ++i;
        continue;
      }
      for (int j = 0; j < r.count; ++j) {
        uint32_t bits;
        std::memcpy(&bits, r.d + j, 4);
        if (bits != kInFlightBits) {
          e.fail("wgmma accumulator registers were written while their wgmma was in flight (before wgmma_wait)");
        }
      }
      std::copy(r.result.begin(), r.result.end(), r.d);
      s.accumulators.erase(s.accumulators.begin() + static_cast<long>(i));
    }
    for (size_t i = 0; i < s.a_fragments.size();) {
      const InFlightA& f = s.a_fragments[i];
      if (f.group != seq) {
        ++i;
        continue;
      }
      if (!std::equal(f.copy, f.copy + 4, f.a)) {
        e.fail("wgmma A fragment registers were written while a wgmma reading them was in flight (before wgmma_wait)");
      }
      s.a_fragments.erase(s.a_fragments.begin() + static_cast<long>(i));
    }
  }

  // ---- TMA ----
  const PackedTma& tensor_map(const l2vf::TmaDescriptor& map, int rank, const char* what) {
    const auto& packed = *reinterpret_cast<const PackedTma*>(&map);
    if (packed.magic != kTmaMagic)
      e.fail(std::string(what) + ": the tensor map was never encoded (encode_tma_descriptor)");
    if (packed.rank != rank) {
      e.fail(std::string(what) + ": a rank-" + std::to_string(packed.rank) + " tensor map used with " +
             std::to_string(rank) + " coordinates");
    }
    return packed;
  }

  void prefetch(const l2vf::TmaDescriptor& map) {
    if (reinterpret_cast<const PackedTma&>(map).magic != kTmaMagic) {
      e.fail("prefetch.tensormap: the tensor map was never encoded (encode_tma_descriptor)");
    }
  }

  // Calls visit(smem byte address, global element pointer or null when out of bounds) for every
  // element of the box at `coords`, in shared-memory order.
  template <class Visit>
  void for_box(const PackedTma& m, uint32_t smem, const int* coords, Visit&& visit) {
    const l2vf::TmaTensorSpec spec = m.spec();
    uint32_t extent[l2vf::kTmaMaxRank] = {1, 1, 1, 1, 1};
    for (int i = 0; i < m.rank; ++i) extent[i] = l2vf::tma_box_extent(spec, i);
    uint32_t idx[l2vf::kTmaMaxRank] = {};
    uint32_t linear = 0;
    for (;;) {
      bool inside = true;
      const char* src = static_cast<const char*>(m.base);
      for (int i = 0; i < m.rank; ++i) {
        const int64_t c =
            static_cast<int64_t>(coords[i]) + static_cast<int64_t>(idx[i]) * (i == 0 ? 1 : m.elem_strides[i]);
        if (c < 0 || c >= static_cast<int64_t>(m.dims[i])) inside = false;
        src += c * static_cast<int64_t>(i == 0 ? m.elem_bytes : m.strides[i]);
      }
      visit(swizzle(smem + linear * m.elem_bytes, m.swizzle), inside ? src : nullptr);
      ++linear;
      int i = 0;
      while (i < m.rank && ++idx[i] == extent[i]) idx[i++] = 0;
      if (i == m.rank) return;
    }
  }

  void tma_load(uint32_t smem, const l2vf::TmaDescriptor& map, uint32_t bar, const int* coords, int rank) {
    const char* what = "cp.async.bulk.tensor (TMA load)";
    const PackedTma& m = tensor_map(map, rank, what);
    const uint32_t bytes = l2vf::tma_box_bytes(m.spec());
    e.check_smem(smem, bytes, 128, what);
    MBarrier& b = barrier(bar, what);
    if (!b.fenced)
      e.fail(std::string(what) + ": completes on an mbarrier whose init was not fenced (mbarrier_init_fence)");
    const int unit = tma_unit(b.index);
    join(clocks[unit], clock());
    ++clocks[unit][unit];
    for_box(m, smem, coords, [&](uint32_t addr, const char* src) {
      uint8_t value[8] = {};
      if (src != nullptr) {
        e.find(src, m.elem_bytes, "TMA load source");
        std::memcpy(value, src, m.elem_bytes);
      }
      for (uint32_t word = addr / 4; word < (addr + m.elem_bytes + 3) / 4; ++word) {
        if (e.shadow[word].pending > 0) e.fail(std::string(what) + ": writes shared memory with a cp.async in flight");
        check_not_in_flight(word, what);
        const SyncWord& before = words[word];
        const bool this_copy = before.writer == unit && before.w_clock == clocks[unit][unit];
        if (before.writer >= tma_unit(0) && !this_copy && before.reads.empty()) {
          e.fail(std::string(what) +
                 ": overwrites a stage whose previous TMA contents nobody has read yet (the "
                 "producer reused a stage its consumers had not released: wait on the stage's empty mbarrier)"
                 " at shared byte " +
                 std::to_string(word * 4));
        }
        check_order(word, true, unit, clock(), what);
        words[word].tma_swizzle = m.swizzle;
        words[word].unfenced_writer = -1;
        e.shadow[word].written = true;
      }
      std::memcpy(e.smem.data() + addr, value, m.elem_bytes);
    });
    b.tx -= bytes;
    join(b.releasing, clocks[unit]);
    complete_if_done(b);
  }

  void tma_store(const l2vf::TmaDescriptor& map, uint32_t smem, const int* coords, int rank) {
    const char* what = "cp.async.bulk.tensor (TMA store)";
    const PackedTma& m = tensor_map(map, rank, what);
    e.check_smem(smem, l2vf::tma_box_bytes(m.spec()), 128, what);
    Sm90Thread& s = ts[e.tid()];
    for_box(m, smem, coords, [&](uint32_t addr, const char* dst) {
      for (uint32_t word = addr / 4; word < (addr + m.elem_bytes + 3) / 4; ++word) {
        if (!e.shadow[word].written)
          e.fail(std::string(what) + ": reads never-written shared memory at byte " + std::to_string(addr));
        if (words[word].unfenced_writer >= 0) {
          e.fail(std::string(what) + ": reads shared memory that thread " +
                 std::to_string(words[word].unfenced_writer) +
                 " wrote with ordinary stores without fence_proxy_async (fence.proxy.async missing)");
        }
        check_order(word, false, e.tid(), clock(), what);
        ++words[word].store_readers;
        s.store_open.push_back(word);
      }
      if (dst == nullptr) return;  // outside the tensor: not written
      on_store(e.smem.data() + addr, m.elem_bytes, what);
      Buffer& buffer = e.find(dst, m.elem_bytes, "TMA store destination");
      if (!buffer.writable) e.fail(std::string(what) + ": store into read-only buffer " + buffer.name);
      const size_t offset = static_cast<size_t>(dst - buffer.base);
      for (size_t w = offset / 4; w < (offset + m.elem_bytes + 3) / 4; ++w) {
        if (buffer.stored[w] && m.elem_bytes >= 4)
          e.fail(std::string(what) + ": second store to one word of " + buffer.name);
        buffer.stored[w] = 1;
      }
      std::memcpy(const_cast<char*>(dst), e.smem.data() + addr, m.elem_bytes);
    });
  }

  void tma_store_commit() {
    Sm90Thread& s = ts[e.tid()];
    s.store_groups.push_back(std::move(s.store_open));
    s.store_open.clear();
  }

  void tma_store_wait(int pending) {
    Sm90Thread& s = ts[e.tid()];
    while (static_cast<int>(s.store_groups.size()) > pending) {
      for (uint32_t word : s.store_groups.front()) --words[word].store_readers;
      s.store_groups.pop_front();
    }
  }

  void fence_proxy_async() {
    Sm90Thread& s = ts[e.tid()];
    for (uint32_t word : s.unfenced) {
      if (words[word].unfenced_writer == e.tid()) words[word].unfenced_writer = -1;
    }
    s.unfenced.clear();
  }
};

inline Sm90& sm90() {
  static Sm90 s;
  return s;
}

// emulator().run with the Hopper model installed for the launch.
inline std::string run_sm90(dim3 grid, int threads, int smem_bytes, std::function<void()> kernel_body) {
  Emulator& e = emulator();
  e.extension = &sm90();
  std::string error = e.run(grid, threads, smem_bytes, std::move(kernel_body));
  e.extension = nullptr;
  return error;
}

}  // namespace emu

// ---- the instructions of csrc/flash_attn/ptx_sm90.cuh ----------------------------------------------

namespace l2vf {

inline std::string encode_tma_descriptor(const TmaTensorSpec& spec, TmaDescriptor* out) {
  const std::string problem = check_tma_spec(spec);
  if (!problem.empty()) return problem;
  emu::PackedTma m{};
  m.magic = emu::kTmaMagic;
  m.base = spec.base;
  for (int i = 0; i < spec.rank; ++i) {
    m.dims[i] = spec.dims[i];
    m.strides[i] = i == 0 ? 0 : spec.strides[i];
    m.box[i] = static_cast<uint16_t>(spec.box[i]);
    m.elem_strides[i] = static_cast<uint8_t>(i == 0 ? 1 : spec.elem_strides[i]);
  }
  m.rank = static_cast<uint8_t>(spec.rank);
  m.elem_bytes = static_cast<uint8_t>(spec.elem_bytes);
  m.swizzle = static_cast<uint8_t>(spec.swizzle);
  std::memset(out, 0, sizeof(*out));
  std::memcpy(out, &m, sizeof(m));
  return "";
}

inline void mbarrier_init(uint32_t bar, uint32_t arrivals) { emu::sm90().mbarrier_init(bar, arrivals); }
inline void mbarrier_init_fence() { emu::sm90().mbarrier_init_fence(); }
inline void mbarrier_arrive(uint32_t bar) { emu::sm90().arrive(bar, 0, "mbarrier.arrive"); }
inline void mbarrier_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  emu::sm90().arrive(bar, bytes, "mbarrier.arrive.expect_tx");
}
inline void mbarrier_expect_tx(uint32_t bar, uint32_t bytes) { emu::sm90().expect_tx(bar, bytes); }
inline bool mbarrier_try_wait(uint32_t bar, uint32_t parity) { return emu::sm90().try_wait(bar, parity); }
inline void mbarrier_wait(uint32_t bar, uint32_t parity) {
  while (!mbarrier_try_wait(bar, parity)) {
  }
}

inline void fence_proxy_async() { emu::sm90().fence_proxy_async(); }

inline void tma_prefetch_descriptor(const TmaDescriptor& map) { emu::sm90().prefetch(map); }
inline void tma_load_2d(uint32_t smem, const TmaDescriptor& map, uint32_t bar, int c0, int c1) {
  const int c[] = {c0, c1};
  emu::sm90().tma_load(smem, map, bar, c, 2);
}
inline void tma_load_3d(uint32_t smem, const TmaDescriptor& map, uint32_t bar, int c0, int c1, int c2) {
  const int c[] = {c0, c1, c2};
  emu::sm90().tma_load(smem, map, bar, c, 3);
}
inline void tma_load_4d(uint32_t smem, const TmaDescriptor& map, uint32_t bar, int c0, int c1, int c2, int c3) {
  const int c[] = {c0, c1, c2, c3};
  emu::sm90().tma_load(smem, map, bar, c, 4);
}
inline void tma_store_2d(const TmaDescriptor& map, uint32_t smem, int c0, int c1) {
  const int c[] = {c0, c1};
  emu::sm90().tma_store(map, smem, c, 2);
}
inline void tma_store_3d(const TmaDescriptor& map, uint32_t smem, int c0, int c1, int c2) {
  const int c[] = {c0, c1, c2};
  emu::sm90().tma_store(map, smem, c, 3);
}
inline void tma_store_4d(const TmaDescriptor& map, uint32_t smem, int c0, int c1, int c2, int c3) {
  const int c[] = {c0, c1, c2, c3};
  emu::sm90().tma_store(map, smem, c, 4);
}
inline void tma_store_commit() { emu::sm90().tma_store_commit(); }
template <int kPending>
inline void tma_store_wait() {
  emu::sm90().tma_store_wait(kPending);
}

inline void wgmma_fence() { emu::sm90().warpgroup_op(emu::WgOp::kFence, emu::WgArgs{}); }
inline void wgmma_commit() { emu::sm90().warpgroup_op(emu::WgOp::kCommit, emu::WgArgs{}); }
template <int kPending>
inline void wgmma_wait() {
  emu::WgArgs a;
  a.count = kPending;
  emu::sm90().warpgroup_op(emu::WgOp::kWait, a);
}
template <class T, int kCount>
inline void wgmma_fence_operands(T (&)[kCount]) {}

constexpr bool wgmma_n_supported(int n) { return n == 64 || n == 96 || n == 128 || n == 176 || n == 192 || n == 256; }

template <class Elem, int N, Major kMajorA, Major kMajorB>
inline void wgmma_ss(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b, bool accumulate) {
  static_assert(wgmma_n_supported(N), "ptx_sm90.cuh has no wgmma for this N");
  emu::WgArgs a;
  a.elem = std::is_same<Elem, Bf16>::value ? 1 : 0;
  a.n = N;
  a.major_a = static_cast<int>(kMajorA);
  a.major_b = static_cast<int>(kMajorB);
  a.desc_a = desc_a;
  a.desc_b = desc_b;
  a.accumulate = accumulate;
  a.d = d;
  emu::sm90().warpgroup_op(emu::WgOp::kMma, a);
}

template <class Elem, int N, Major kMajorB>
inline void wgmma_rs(float (&d)[N / 2], const uint32_t (&a_regs)[4], uint64_t desc_b, bool accumulate) {
  static_assert(wgmma_n_supported(N), "ptx_sm90.cuh has no wgmma for this N");
  emu::WgArgs a;
  a.elem = std::is_same<Elem, Bf16>::value ? 1 : 0;
  a.n = N;
  a.major_b = static_cast<int>(kMajorB);
  a.register_a = true;
  a.a = a_regs;
  a.desc_b = desc_b;
  a.accumulate = accumulate;
  a.d = d;
  emu::sm90().warpgroup_op(emu::WgOp::kMma, a);
}

template <int kRegs>
inline void setmaxnreg_inc() {
  emu::WgArgs a;
  a.count = kRegs;
  a.increase = true;
  emu::sm90().warpgroup_op(emu::WgOp::kSetmaxnreg, a);
}
template <int kRegs>
inline void setmaxnreg_dec() {
  emu::WgArgs a;
  a.count = kRegs;
  emu::sm90().warpgroup_op(emu::WgOp::kSetmaxnreg, a);
}

inline void named_barrier_sync(uint32_t id, uint32_t threads) { emu::sm90().named_barrier(id, threads, true); }
inline void named_barrier_arrive(uint32_t id, uint32_t threads) { emu::sm90().named_barrier(id, threads, false); }

// The lowest lane: the emulator runs every lane of a warp through the same code.
inline bool elect_one() { return emu::emulator().lane() == 0; }

}  // namespace l2vf
