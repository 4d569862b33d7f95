// The runtime of the CUDA emulation (cuda_emulation.h): fibers, the barrier and warp
// scheduler, launch checks, the runtime API subset, the per-kernel launch counters and
// the race checker. Compiled only in the FASTMAML_CUDA=emulate build, WITHOUT the
// ThreadSanitizer instrumentation that the emulated .cu objects get: the __tsan_* hooks
// those objects call are defined here.
//
// Race check. Every load and store of an instrumented object reaches check() with its
// address and size while a CUDA thread runs. The thread's own stack is private; the
// block's dynamic shared memory has a byte-exact shadow (last writer, last reader(s),
// the barrier interval: an "epoch", unique per block and barrier); static __shared__
// objects (this module's writable segments) and global memory have a map shadow at
// 8-byte granularity with a byte mask. Two accesses to the same bytes by different
// threads of a block in the same epoch, one a write, are a race; for global memory so
// are conflicting accesses from different blocks of the launch (blocks have no order
// without atomics, and the emulated atomics are not instrumented). Accesses wider than
// 8 bytes are checked on their first 8 bytes. The shadow keeps the last writer and the
// last reader(s) of each byte/granule, so a race is found when it is between the current
// access and one of those (the common case; an access pattern that hides a conflicting
// access behind a later non-conflicting one can be missed).
#if defined(FASTMAML_CUDA_EMULATE)

#include "cuda_emulation.h"

#include <cxxabi.h>
#include <link.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include "cuda_emulation_stats.h"

namespace fastmaml {
namespace emu {

const ThreadView* g_view = nullptr;

namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kRedzone = 256;
constexpr unsigned kMaxThreads = 1024;
constexpr unsigned kMaxBlockZ = 64;
constexpr unsigned long long kMaxGridX = 2147483647ull;
constexpr unsigned kMaxGridYZ = 65535;
constexpr int kSmemDefault = 48 * 1024;
constexpr int kSmemOptin = 227 * 1024;    // sm_90: 232,448 bytes per block with the opt-in
constexpr size_t kMaxParamBytes = 32764;  // kernel parameters (CUDA 12.1+, sm_70+)

// ---- errors (per host thread, as the CUDA runtime's) -----------------------------------------
thread_local cudaError_t t_last = cudaSuccess;
thread_local std::string t_detail;
thread_local cudaError_t t_detail_code = cudaSuccess;
thread_local int t_device = 0;

cudaError_t set_error(cudaError_t e, const std::string& detail) {
  t_last = e;
  t_detail = detail;
  t_detail_code = e;
  return e;
}

// ---- fibers ----------------------------------------------------------------------------------
enum class State { Runnable, AtBarrier, AtWarp, Done };

struct Fiber {
  ucontext_t ctx;
  char* stack_lo = nullptr;
  char* stack_hi = nullptr;
  ThreadView view{};
  unsigned linear = 0;
  State st = State::Done;
  unsigned wmask = 0;
  uint64_t wval = 0;
  uint64_t wres[32] = {};
  int pred = 0;  // __syncthreads_count/and/or argument
};

struct Launch {
  const LaunchSpec* spec = nullptr;
  void (*body)(void*) = nullptr;
  void* ctx = nullptr;
  unsigned nthreads = 0;
  bool failed = false;
  bool fatal = false;  // the block cannot continue (deadlock, exception)
  cudaError_t code = cudaSuccess;
  std::string error;
  KernelStats* stats = nullptr;
};

// Fiber stacks: one reserved region for 1024 stacks (pages are committed when touched),
// a guard page under each.
char* g_stack_base = nullptr;
char* stack_of(unsigned i) {
  if (g_stack_base == nullptr) {
    void* p = mmap(nullptr, size_t(kMaxThreads) * kStackBytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("CUDA emulation: cannot reserve the fiber stacks");
    g_stack_base = static_cast<char*>(p);
    for (unsigned k = 0; k < kMaxThreads; ++k) mprotect(g_stack_base + size_t(k) * kStackBytes, 4096, PROT_NONE);
  }
  return g_stack_base + size_t(i) * kStackBytes;
}

std::mutex g_launch_lock;  // one launch at a time, process-wide (static __shared__ objects)
std::vector<Fiber> g_fibers;
ucontext_t g_sched;
Fiber* g_cur = nullptr;
Launch* g_launch = nullptr;
std::mt19937_64 g_rng;
bool g_seeded = false;
uint64_t g_seed = 0;
uint32_t g_epoch = 0;
uint32_t g_launch_epoch0 = 0;  // epochs after this one belong to the running launch
unsigned g_block_linear = 0;
int g_bar_count = 0, g_bar_all = 0, g_bar_any = 0;  // the last barrier's reductions
unsigned char* g_arena_base = nullptr;  // redzone | arena | redzone
unsigned char* g_arena = nullptr;
size_t g_arena_size = 0;
size_t g_arena_cap = 0;
__attribute__((tls_model("initial-exec"))) thread_local bool t_checking = false;

// ---- statistics and attributes ----------------------------------------------------------------
std::mutex g_stats_lock;
std::map<std::string, KernelStats> g_stats;
std::map<const void*, int> g_max_dyn_smem;
bool g_race_check = true;

std::string base_name(const char* expr) {
  std::string s;
  for (const char* p = expr; *p; ++p)
    if (*p != '(' && *p != ')' && *p != ' ') s += *p;
  const size_t lt = s.find('<');
  if (lt != std::string::npos) s.resize(lt);
  const size_t colon = s.rfind("::");
  if (colon != std::string::npos) s = s.substr(colon + 2);
  return s;
}

// "kernel<S> : void (*)(float const*, ...)": the launch expression and the instantiation.
std::string variant_name(const LaunchSpec& spec) {
  int status = 0;
  char* d = abi::__cxa_demangle(spec.signature, nullptr, nullptr, &status);
  std::string out = std::string(spec.name) + " : " + (status == 0 && d ? d : spec.signature);
  std::free(d);
  return out;
}

std::string thread_str(const Fiber& f) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "(%u,%u,%u)", f.view.thread_idx.x, f.view.thread_idx.y, f.view.thread_idx.z);
  return buf;
}

std::string block_str() {
  const uint3 b = g_fibers.empty() ? uint3{0, 0, 0} : g_fibers[0].view.block_idx;
  char buf[64];
  std::snprintf(buf, sizeof buf, "block (%u,%u,%u)", b.x, b.y, b.z);
  return buf;
}

void fail(cudaError_t code, const std::string& what, bool fatal = false) {
  Launch& l = *g_launch;
  if (fatal) l.fatal = true;
  if (!l.failed) {
    l.failed = true;
    l.code = code;
    l.error = "emulated kernel " + std::string(l.spec->name) + ", " + block_str() + " of grid (" +
              std::to_string(l.spec->grid.x) + "," + std::to_string(l.spec->grid.y) + "," +
              std::to_string(l.spec->grid.z) + "): " + what + " (emulator seed " + std::to_string(g_seed) + ")";
  }
}

// ---- race checker ------------------------------------------------------------------------------
// One byte's last writer and last reader(s). Epochs are unique per block and barrier
// interval (0: never accessed), so records of an earlier block never match the current one.
struct ByteShadow {
  uint32_t we = 0, re = 0;  // epoch of the last write / read
  uint32_t wb = 0, rb = 0;  // block (linear) of the last writer / reader
  uint16_t wt = 0, rt = 0;  // linear thread of the last writer / reader
  uint8_t rmulti = 0;       // epoch re: read by more than one thread
  uint8_t rother = 0;       // read by a block other than rb in this launch
};
struct GranuleShadow {
  ByteShadow byte[8];
};
std::vector<ByteShadow> g_arena_shadow;  // dynamic shared memory, byte by byte
std::unordered_map<uintptr_t, GranuleShadow> g_map_shadow;
std::vector<std::pair<uintptr_t, uintptr_t>> g_module_rw;  // this module's writable segments
uintptr_t g_fibers_lo = 0, g_fibers_hi = 0, g_ctx_lo = 0, g_ctx_hi = 0;
uintptr_t g_stacks_lo = 0, g_stacks_hi = 0;

int find_module(struct dl_phdr_info* info, size_t, void* data) {
  const uintptr_t probe = reinterpret_cast<uintptr_t>(&g_view);
  std::vector<std::pair<uintptr_t, uintptr_t>> rw;
  bool mine = false;
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const ElfW(Phdr)& ph = info->dlpi_phdr[i];
    if (ph.p_type != PT_LOAD) continue;
    const uintptr_t lo = info->dlpi_addr + ph.p_vaddr, hi = lo + ph.p_memsz;
    if (probe >= lo && probe < hi) mine = true;
    if (ph.p_flags & PF_W) rw.emplace_back(lo, hi);
  }
  if (mine) *static_cast<std::vector<std::pair<uintptr_t, uintptr_t>>*>(data) = rw;
  return mine ? 1 : 0;
}

void report_race(const char* space, uintptr_t where, size_t n, bool write, bool other_wrote, unsigned other_tid,
                 unsigned other_block) {
  ++g_launch->stats->races;
  char buf[400];
  const char* did = other_wrote ? "wrote" : "read";
  if (other_block != g_block_linear) {
    std::snprintf(buf, sizeof buf,
                  "%s-memory race: thread %s %s %zu byte(s) at %#lx, which thread %u of block #%u (linear) %s "
                  "in the same launch",
                  space, thread_str(*g_cur).c_str(), write ? "writes" : "reads", n,
                  static_cast<unsigned long>(where), other_tid, other_block, did);
  } else {
    std::snprintf(buf, sizeof buf,
                  "%s-memory race: thread %s %s %zu byte(s) at %s%#lx, which thread %u (linear index) %s since "
                  "the last __syncthreads()",
                  space, thread_str(*g_cur).c_str(), write ? "writes" : "reads", n,
                  std::strcmp(space, "shared") == 0 ? "dynamic shared offset " : "", static_cast<unsigned long>(where),
                  other_tid, did);
  }
  fail(cudaErrorLaunchFailure, buf);
}

// Checks one access against the bytes' records and updates them. global: accesses of
// other blocks of the launch conflict too (shared memory is per block).
void check_bytes(ByteShadow* sh, unsigned n, bool write, bool global, const char* space, uintptr_t where,
                 size_t size) {
  const uint32_t e = g_epoch, b = g_block_linear;
  const uint16_t t = static_cast<uint16_t>(g_cur->linear);
  auto conflict = [&](uint32_t ep, uint32_t blk, uint16_t tid) {
    if (ep == 0) return false;
    if (ep == e) return tid != t;
    return global && blk != b && ep > g_launch_epoch0;
  };
  for (unsigned i = 0; i < n; ++i) {
    ByteShadow& r = sh[i];
    if (conflict(r.we, r.wb, r.wt)) return report_race(space, where, size, write, true, r.wt, r.wb);
    if (write) {
      const bool rr = r.re == e ? (r.rmulti || r.rt != t) : (conflict(r.re, r.rb, r.rt) ||
                                                              (global && r.rother && r.re > g_launch_epoch0));
      if (rr) return report_race(space, where, size, true, false, r.rt, r.rb);
      r.we = e;
      r.wb = b;
      r.wt = t;
    } else if (r.re == e) {
      if (r.rt != t) r.rmulti = 1;
    } else {
      r.rother = global && r.re > g_launch_epoch0 && r.rb != b ? 1 : (r.rb == b ? r.rother : 0);
      r.re = e;
      r.rb = b;
      r.rt = t;
      r.rmulti = 0;
    }
  }
}

void check_arena(size_t off, size_t n, bool write) {
  const size_t m = std::min(n, g_arena_size - off);
  check_bytes(&g_arena_shadow[off], unsigned(m), write, false, "shared", off, n);
}

void check_map(uintptr_t a, size_t n, bool write, bool global) {
  const char* space = global ? "global" : "static shared";
  const uintptr_t end = a + (n > 16 ? 16 : n);
  for (uintptr_t p = a; p < end;) {
    const uintptr_t key = p >> 3;
    const uintptr_t gend = std::min<uintptr_t>(end, (key + 1) << 3);
    GranuleShadow& g = g_map_shadow[key];
    check_bytes(&g.byte[p & 7], unsigned(gend - p), write, global, space, a, n);
    p = gend;
  }
}

inline bool in(uintptr_t a, uintptr_t lo, uintptr_t hi) { return a >= lo && a < hi; }

void check(const void* p, size_t n, bool write) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (in(a, reinterpret_cast<uintptr_t>(g_cur->stack_lo), reinterpret_cast<uintptr_t>(g_cur->stack_hi))) return;
  if (a == reinterpret_cast<uintptr_t>(&g_view) || in(a, g_fibers_lo, g_fibers_hi) || in(a, g_ctx_lo, g_ctx_hi))
    return;  // the emulator's own state and the kernel's parameter block
  KernelStats& s = *g_launch->stats;
  const uintptr_t ar = reinterpret_cast<uintptr_t>(g_arena);
  if (g_arena != nullptr && in(a, ar - kRedzone, ar + g_arena_size + kRedzone)) {
    ++s.shared_accesses;
    if (a < ar || a + n > ar + g_arena_size) {
      char buf[200];
      std::snprintf(buf, sizeof buf,
                    "thread %s %s %zu byte(s) at dynamic shared offset %ld, outside the %zu bytes of the launch",
                    thread_str(*g_cur).c_str(), write ? "writes" : "reads", n, long(a) - long(ar), g_arena_size);
      fail(cudaErrorIllegalAddress, buf);
      return;
    }
    check_arena(a - ar, n, write);
    return;
  }
  if (in(a, g_stacks_lo, g_stacks_hi)) {
    fail(cudaErrorIllegalAddress, "thread " + thread_str(*g_cur) + " accesses another thread's local memory");
    return;
  }
  for (const auto& r : g_module_rw) {
    if (in(a, r.first, r.second)) {
      ++s.shared_accesses;
      check_map(a, n, write, false);
      return;
    }
  }
  ++s.global_accesses;
  check_map(a, n, write, true);
}

// ---- scheduler ------------------------------------------------------------------------------------
void fiber_main(unsigned hi, unsigned lo) {
  Fiber* f = reinterpret_cast<Fiber*>((uintptr_t(hi) << 32) | uintptr_t(lo));
  try {
    g_launch->body(g_launch->ctx);
  } catch (const std::exception& ex) {
    fail(cudaErrorLaunchFailure, "thread " + thread_str(*f) + " raised: " + ex.what(), true);
  } catch (...) {
    fail(cudaErrorLaunchFailure, "thread " + thread_str(*f) + " raised an exception", true);
  }
  f->st = State::Done;
  // returning resumes g_sched (uc_link)
}

void resume(Fiber& f) {
  g_cur = &f;
  g_view = &f.view;
  t_checking = g_race_check;
  swapcontext(&g_sched, &f.ctx);
  t_checking = false;
  g_cur = nullptr;
}

void yield_to_scheduler() {
  Fiber* f = g_cur;
  t_checking = false;
  swapcontext(&f->ctx, &g_sched);
}

// Releases every warp collective whose lanes have all arrived; true when one was released.
bool resolve_warps(unsigned n) {
  bool progress = false;
  for (unsigned w = 0; w * 32 < n; ++w) {
    const unsigned base = w * 32, lanes = std::min(32u, n - base);
    for (unsigned i = 0; i < lanes; ++i) {
      Fiber& f = g_fibers[base + i];
      if (f.st != State::AtWarp) continue;
      const unsigned m = f.wmask;
      bool ready = true;
      for (unsigned j = 0; j < 32 && ready; ++j) {
        if (!((m >> j) & 1u)) continue;
        ready = j < lanes && g_fibers[base + j].st == State::AtWarp && g_fibers[base + j].wmask == m;
      }
      if (!ready) continue;
      uint64_t vals[32] = {};
      for (unsigned j = 0; j < lanes; ++j) vals[j] = g_fibers[base + j].wval;
      for (unsigned j = 0; j < lanes; ++j) {
        Fiber& g = g_fibers[base + j];
        if (!((m >> j) & 1u)) continue;
        std::memcpy(g.wres, vals, sizeof vals);
        g.st = State::Runnable;
      }
      ++g_launch->stats->warp_ops;
      progress = true;
    }
  }
  return progress;
}

std::string list_threads(State st, unsigned n) {
  std::string out;
  int shown = 0, total = 0;
  for (unsigned i = 0; i < n; ++i) {
    if (g_fibers[i].st != st) continue;
    ++total;
    if (shown < 8) {
      out += (shown ? ", " : "") + thread_str(g_fibers[i]);
      ++shown;
    }
  }
  if (total > shown) out += ", ... (" + std::to_string(total) + " in all)";
  return out;
}

void run_block(const LaunchSpec& spec, uint3 bidx, unsigned nthreads) {
  ++g_epoch;
  g_block_linear = bidx.x + spec.grid.x * (bidx.y + spec.grid.y * bidx.z);
  if (g_arena != nullptr) std::memset(g_arena, 0xff, g_arena_size);  // shared memory starts as garbage (NaN)
  for (unsigned i = 0; i < nthreads; ++i) {
    Fiber& f = g_fibers[i];
    f.linear = i;
    f.view.thread_idx = uint3{i % spec.block.x, (i / spec.block.x) % spec.block.y, i / (spec.block.x * spec.block.y)};
    f.view.block_idx = bidx;
    f.view.block_dim = spec.block;
    f.view.grid_dim = spec.grid;
    f.view.lane = int(i % 32);
    f.st = State::Runnable;
    f.stack_lo = stack_of(i) + 4096;
    f.stack_hi = stack_of(i) + kStackBytes;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack_lo;
    f.ctx.uc_stack.ss_size = kStackBytes - 4096;
    f.ctx.uc_link = &g_sched;
    const uintptr_t self = reinterpret_cast<uintptr_t>(&f);
    makecontext(&f.ctx, reinterpret_cast<void (*)()>(&fiber_main), 2, unsigned(self >> 32), unsigned(self));
  }
  std::vector<unsigned> order(nthreads);
  for (;;) {
    order.clear();
    for (unsigned i = 0; i < nthreads; ++i)
      if (g_fibers[i].st == State::Runnable) order.push_back(i);
    std::shuffle(order.begin(), order.end(), g_rng);
    for (unsigned i : order) {
      resume(g_fibers[i]);
      if (g_launch->fatal) return;
    }
    if (resolve_warps(nthreads)) continue;
    unsigned at_bar = 0, done = 0, at_warp = 0;
    for (unsigned i = 0; i < nthreads; ++i) {
      at_bar += g_fibers[i].st == State::AtBarrier;
      done += g_fibers[i].st == State::Done;
      at_warp += g_fibers[i].st == State::AtWarp;
    }
    if (done == nthreads) return;
    if (at_bar == nthreads) {  // the barrier: every thread of the block is there
      g_bar_count = 0;
      g_bar_all = 1;
      g_bar_any = 0;
      for (unsigned i = 0; i < nthreads; ++i) {
        g_bar_count += g_fibers[i].pred != 0;
        g_bar_all &= g_fibers[i].pred != 0;
        g_bar_any |= g_fibers[i].pred != 0;
        g_fibers[i].st = State::Runnable;
      }
      ++g_epoch;
      ++g_launch->stats->barriers;
      continue;
    }
    std::string why;
    if (at_bar > 0 && at_warp == 0) {
      why = "__syncthreads() reached by only part of the block: " + std::to_string(at_bar) + " of " +
            std::to_string(nthreads) + " threads wait at it (" + list_threads(State::AtBarrier, nthreads) +
            "); " + std::to_string(done) + " exited without reaching it (" + list_threads(State::Done, nthreads) +
            ")";
    } else {
      why = "warp collective never completes: " + std::to_string(at_warp) + " thread(s) wait at a __*_sync (" +
            list_threads(State::AtWarp, nthreads) + ") for lanes of their mask that exited or wait elsewhere (" +
            std::to_string(at_bar) + " at __syncthreads, " + std::to_string(done) + " exited)";
    }
    fail(cudaErrorLaunchFailure, why, true);
    return;
  }
}

void ensure_seeded() {
  if (g_seeded) return;
  const char* env = std::getenv("FASTMAML_EMU_SEED");
  g_seed = env && *env ? std::strtoull(env, nullptr, 10) : std::random_device{}();
  g_rng.seed(g_seed);
  g_seeded = true;
}

cudaError_t refuse(KernelStats& s, const LaunchSpec& spec, cudaError_t code, const std::string& why) {
  ++s.refused;
  return set_error(code, "emulated launch of " + std::string(spec.name) + " refused (as on an sm_90 device): " + why);
}

}  // namespace

void run_launch(const LaunchSpec& spec, void (*body)(void*), void* ctx) {
  std::lock_guard<std::mutex> lock(g_launch_lock);
  KernelStats* sp;
  {
    std::lock_guard<std::mutex> sl(g_stats_lock);
    const std::string name = base_name(spec.name);
    sp = &g_stats[name];
    sp->name = name;
  }
  KernelStats& s = *sp;
  const dim3 g = spec.grid, b = spec.block;
  const unsigned long long nthreads = 1ull * b.x * b.y * b.z;
  auto d3 = [](dim3 v) {
    return "(" + std::to_string(v.x) + "," + std::to_string(v.y) + "," + std::to_string(v.z) + ")";
  };
  if (b.x == 0 || b.y == 0 || b.z == 0 || nthreads > kMaxThreads || b.x > kMaxThreads || b.y > kMaxThreads ||
      b.z > kMaxBlockZ) {
    refuse(s, spec, cudaErrorInvalidConfiguration,
           "block " + d3(b) + " (at most 1024 threads per block, block.z <= 64, none zero)");
    return;
  }
  if (g.x == 0 || g.y == 0 || g.z == 0 || g.x > kMaxGridX || g.y > kMaxGridYZ || g.z > kMaxGridYZ) {
    refuse(s, spec, cudaErrorInvalidConfiguration, "grid " + d3(g) + " (gridDim.x < 2^31, gridDim.y/z <= 65535)");
    return;
  }
  const auto opt = g_max_dyn_smem.find(spec.fn);
  const int smem_limit = opt == g_max_dyn_smem.end() ? kSmemDefault : opt->second;
  if (spec.smem > size_t(smem_limit)) {
    refuse(s, spec, cudaErrorInvalidValue,
           std::to_string(spec.smem) + " bytes of dynamic shared memory, the kernel's limit is " +
               std::to_string(smem_limit) +
               (opt == g_max_dyn_smem.end() ? " (no cudaFuncAttributeMaxDynamicSharedMemorySize opt-in)" : ""));
    return;
  }
  if (spec.param_bytes > kMaxParamBytes) {
    refuse(s, spec, cudaErrorInvalidValue, std::to_string(spec.param_bytes) + " bytes of kernel parameters");
    return;
  }
  ensure_seeded();
  if (g_module_rw.empty()) dl_iterate_phdr(&find_module, &g_module_rw);
  if (g_fibers.size() < kMaxThreads) g_fibers.resize(kMaxThreads);
  g_fibers_lo = reinterpret_cast<uintptr_t>(g_fibers.data());
  g_fibers_hi = g_fibers_lo + g_fibers.size() * sizeof(Fiber);
  g_ctx_lo = reinterpret_cast<uintptr_t>(ctx);
  g_ctx_hi = g_ctx_lo + spec.param_bytes + 64;
  stack_of(0);
  g_stacks_lo = reinterpret_cast<uintptr_t>(g_stack_base);
  g_stacks_hi = g_stacks_lo + size_t(kMaxThreads) * kStackBytes;
  if (spec.smem > g_arena_cap) {
    std::free(g_arena_base);
    g_arena_cap = spec.smem;
    g_arena_base = static_cast<unsigned char*>(std::aligned_alloc(256, g_arena_cap + 2 * kRedzone));
    g_arena_shadow.assign(g_arena_cap, ByteShadow{});
  }
  g_arena = spec.smem > 0 ? g_arena_base + kRedzone : nullptr;
  g_arena_size = spec.smem;
  g_map_shadow.clear();
  g_launch_epoch0 = g_epoch;

  Launch l;
  l.spec = &spec;
  l.body = body;
  l.ctx = ctx;
  l.nthreads = unsigned(nthreads);
  l.stats = &s;
  g_launch = &l;
  ++s.launches;
  ++s.variants[variant_name(spec)];
  std::vector<uint3> blocks;
  blocks.reserve(size_t(g.x) * g.y * g.z);
  for (unsigned z = 0; z < g.z; ++z)
    for (unsigned y = 0; y < g.y; ++y)
      for (unsigned x = 0; x < g.x; ++x) blocks.push_back(uint3{x, y, z});
  std::shuffle(blocks.begin(), blocks.end(), g_rng);  // no kernel may rely on block order
  for (const uint3& bi : blocks) {
    run_block(spec, bi, unsigned(nthreads));
    ++s.blocks;
    s.threads += nthreads;
    if (l.fatal) break;
  }
  g_launch = nullptr;
  g_view = nullptr;
  g_map_shadow.clear();
  if (l.failed) {
    ++s.failed;
    set_error(l.code, l.error);
  }
}

void syncthreads() {
  g_cur->st = State::AtBarrier;
  g_cur->pred = 0;
  yield_to_scheduler();
}

int syncthreads_reduce(int op, int pred) {
  // the scheduler reduces pred over the block at the release; op selects the result
  Fiber* f = g_cur;
  f->st = State::AtBarrier;
  f->pred = pred != 0;
  yield_to_scheduler();
  // read at once: the next barrier cannot be released before this thread reaches it
  return op == 0 ? g_bar_count : (op == 1 ? g_bar_all : g_bar_any);
}

const uint64_t* warp_collective(unsigned mask, uint64_t value) {
  Fiber* f = g_cur;
  if (!((mask >> f->view.lane) & 1u)) {
    fail(cudaErrorLaunchFailure, "thread " + thread_str(*f) + " calls a warp collective with a mask (" +
                                     std::to_string(mask) + ") that does not contain its own lane");
  }
  f->wmask = mask;
  f->wval = value;
  f->st = State::AtWarp;
  yield_to_scheduler();
  return f->wres;
}

unsigned active_mask() {
  const unsigned base = g_cur->linear / 32 * 32;
  unsigned m = 0;
  for (unsigned j = 0; j < 32 && base + j < g_launch->nthreads; ++j)
    if (g_fibers[base + j].st != State::Done) m |= 1u << j;
  return m;
}

unsigned char* dynamic_shared() { return g_arena; }

cudaError_t func_set_attribute(const void* fn, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || value > kSmemOptin)
      return set_error(cudaErrorInvalidValue, "cudaFuncSetAttribute: " + std::to_string(value) +
                                                  " bytes of dynamic shared memory exceed the 232448 of sm_90");
    std::lock_guard<std::mutex> lock(g_launch_lock);
    g_max_dyn_smem[fn] = value;
    return cudaSuccess;
  }
  if (attr == cudaFuncAttributePreferredSharedMemoryCarveout) return cudaSuccess;
  return set_error(cudaErrorInvalidValue, "cudaFuncSetAttribute: attribute not emulated");
}

cudaError_t func_get_attributes(cudaFuncAttributes* attr, const void* fn) {
  std::lock_guard<std::mutex> lock(g_launch_lock);
  *attr = cudaFuncAttributes{};
  attr->maxThreadsPerBlock = int(kMaxThreads);
  attr->ptxVersion = attr->binaryVersion = 90;  // the emulated device is an sm_90
  const auto it = g_max_dyn_smem.find(fn);
  attr->maxDynamicSharedSizeBytes = it == g_max_dyn_smem.end() ? kSmemDefault : it->second;
  return cudaSuccess;
}

#define FM_ATOMIC(T, NAME, EXPR)       \
  T NAME(T* p, T v) {                  \
    const T old = *p;                  \
    *p = (EXPR);                       \
    return old;                        \
  }
FM_ATOMIC(float, atomic_add, old + v)
FM_ATOMIC(double, atomic_add, old + v)
FM_ATOMIC(int, atomic_add, old + v)
FM_ATOMIC(unsigned, atomic_add, old + v)
FM_ATOMIC(unsigned long long, atomic_add, old + v)
FM_ATOMIC(int, atomic_max, old > v ? old : v)
FM_ATOMIC(int, atomic_min, old < v ? old : v)
FM_ATOMIC(int, atomic_exch, v)
#undef FM_ATOMIC
// (one launch runs at a time and its threads never preempt each other: a plain
// read-modify-write is atomic here)
int atomic_cas(int* p, int c, int v) {
  const int old = *p;
  if (old == c) *p = v;
  return old;
}
unsigned long long atomic_cas(unsigned long long* p, unsigned long long c, unsigned long long v) {
  const unsigned long long old = *p;
  if (old == c) *p = v;
  return old;
}

// ---- statistics -----------------------------------------------------------------------------------
std::vector<KernelStats> stats_snapshot() {
  std::lock_guard<std::mutex> lock(g_stats_lock);
  std::vector<KernelStats> out;
  for (const auto& kv : g_stats) out.push_back(kv.second);
  return out;
}
void reset_stats() {
  std::lock_guard<std::mutex> l1(g_launch_lock);
  std::lock_guard<std::mutex> l2(g_stats_lock);
  g_stats.clear();
}
void set_race_check(bool on) {
  std::lock_guard<std::mutex> lock(g_launch_lock);
  g_race_check = on;
}
bool race_check_enabled() { return g_race_check; }
void set_seed(uint64_t seed) {
  std::lock_guard<std::mutex> lock(g_launch_lock);
  g_seed = seed;
  g_rng.seed(seed);
  g_seeded = true;
}
uint64_t current_seed() {
  std::lock_guard<std::mutex> lock(g_launch_lock);
  ensure_seeded();
  return g_seed;
}

}  // namespace emu
}  // namespace fastmaml

// ---- runtime API ------------------------------------------------------------------------------------
using fastmaml::emu::set_error;
using fastmaml::emu::t_detail;
using fastmaml::emu::t_detail_code;
using fastmaml::emu::t_device;
using fastmaml::emu::t_last;

namespace {
std::mutex g_alloc_lock;
std::map<void*, size_t> g_allocs;

const char* error_name(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorInvalidResourceHandle: return "cudaErrorInvalidResourceHandle";
    case cudaErrorIllegalAddress: return "cudaErrorIllegalAddress";
    case cudaErrorLaunchOutOfResources: return "cudaErrorLaunchOutOfResources";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    case cudaErrorNoKernelImageForDevice: return "cudaErrorNoKernelImageForDevice";
  }
  return "cudaErrorUnknown";
}
}  // namespace

cudaError_t cudaGetLastError() {
  const cudaError_t e = t_last;
  t_last = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError() { return t_last; }
const char* cudaGetErrorName(cudaError_t e) { return error_name(e); }
const char* cudaGetErrorString(cudaError_t e) {
  // the emulator's detail (kernel, block, threads) for the error it set last
  if (e == t_detail_code && e != cudaSuccess && !t_detail.empty()) return t_detail.c_str();
  return error_name(e);
}
cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}
cudaError_t cudaGetDevice(int* device) {
  *device = t_device;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int device) {
  if (device != 0) return set_error(cudaErrorInvalidDevice, "the emulation has one device (0)");
  t_device = device;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return set_error(cudaErrorInvalidDevice, "the emulation has one device (0)");
  switch (attr) {  // an H100 SXM (sm_90)
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; break;
    case cudaDevAttrMaxBlockDimX: *value = 1024; break;
    case cudaDevAttrMaxBlockDimY: *value = 1024; break;
    case cudaDevAttrMaxBlockDimZ: *value = 64; break;
    case cudaDevAttrMaxGridDimX: *value = 2147483647; break;
    case cudaDevAttrMaxGridDimY: *value = 65535; break;
    case cudaDevAttrMaxGridDimZ: *value = 65535; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = 48 * 1024; break;
    case cudaDevAttrWarpSize: *value = 32; break;
    case cudaDevAttrMultiProcessorCount: *value = 132; break;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; break;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = 228 * 1024; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = 227 * 1024; break;
    default: return set_error(cudaErrorInvalidValue, "cudaDeviceGetAttribute: attribute not emulated");
  }
  return cudaSuccess;
}
cudaError_t cudaRuntimeGetVersion(int* version) {
  *version = 0;  // no CUDA runtime: the emulation
  return cudaSuccess;
}
cudaError_t cudaDriverGetVersion(int* version) {
  *version = 0;
  return cudaSuccess;
}
namespace fastmaml {
namespace emu {
namespace {
struct ApiCounters {
  std::atomic<uint64_t> mallocs{0}, frees{0}, memcpy_sync{0}, memcpy_d2h{0}, memsets{0}, stream_syncs{0},
      device_syncs{0};
};
ApiCounters g_api;
}  // namespace

ApiStats api_snapshot() {
  ApiStats s;
  s.mallocs = g_api.mallocs.load();
  s.frees = g_api.frees.load();
  s.memcpy_sync = g_api.memcpy_sync.load();
  s.memcpy_device_to_host = g_api.memcpy_d2h.load();
  s.memsets = g_api.memsets.load();
  s.stream_syncs = g_api.stream_syncs.load();
  s.device_syncs = g_api.device_syncs.load();
  return s;
}

void reset_api_stats() {
  for (std::atomic<uint64_t>* c : {&g_api.mallocs, &g_api.frees, &g_api.memcpy_sync, &g_api.memcpy_d2h,
                                   &g_api.memsets, &g_api.stream_syncs, &g_api.device_syncs})
    c->store(0);
}
}  // namespace emu
}  // namespace fastmaml

cudaError_t cudaMalloc(void** ptr, size_t bytes) {
  ++fastmaml::emu::g_api.mallocs;
  void* p = std::aligned_alloc(256, (bytes + 255) / 256 * 256 + 256);
  if (p == nullptr) return set_error(cudaErrorMemoryAllocation, "cudaMalloc: out of host memory");
  std::memset(p, 0xff, bytes);  // fresh device memory is garbage, not zeros
  std::lock_guard<std::mutex> lock(g_alloc_lock);
  g_allocs[p] = bytes;
  *ptr = p;
  return cudaSuccess;
}
cudaError_t cudaFree(void* ptr) {
  ++fastmaml::emu::g_api.frees;
  if (ptr == nullptr) return cudaSuccess;
  std::lock_guard<std::mutex> lock(g_alloc_lock);
  auto it = g_allocs.find(ptr);
  if (it == g_allocs.end()) return set_error(cudaErrorInvalidValue, "cudaFree: not a pointer from cudaMalloc");
  g_allocs.erase(it);
  std::free(ptr);
  return cudaSuccess;
}
cudaError_t cudaMallocAsync(void** ptr, size_t bytes, cudaStream_t) { return cudaMalloc(ptr, bytes); }
cudaError_t cudaFreeAsync(void* ptr, cudaStream_t) { return cudaFree(ptr); }
cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t) {
  ++fastmaml::emu::g_api.memsets;
  std::memset(ptr, value, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t) {
  if (kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDefault) ++fastmaml::emu::g_api.memcpy_d2h;
  std::memmove(dst, src, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemset(void* ptr, int value, size_t bytes) { return cudaMemsetAsync(ptr, value, bytes, nullptr); }
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
  ++fastmaml::emu::g_api.memcpy_sync;
  return cudaMemcpyAsync(dst, src, bytes, kind, nullptr);
}
cudaError_t cudaStreamSynchronize(cudaStream_t) {
  ++fastmaml::emu::g_api.stream_syncs;
  return cudaSuccess;
}
cudaError_t cudaDeviceSynchronize() {
  ++fastmaml::emu::g_api.device_syncs;
  return cudaSuccess;
}

// ---- ThreadSanitizer instrumentation hooks (the race check) -----------------------------------------
#define FM_TSAN_RW(N)                                                                                   \
  extern "C" void __tsan_read##N(void* p) {                                                            \
    if (fastmaml::emu::t_checking) fastmaml::emu::check(p, N, false);                                  \
  }                                                                                                     \
  extern "C" void __tsan_write##N(void* p) {                                                           \
    if (fastmaml::emu::t_checking) fastmaml::emu::check(p, N, true);                                   \
  }                                                                                                     \
  extern "C" void __tsan_unaligned_read##N(void* p) {                                                  \
    if (fastmaml::emu::t_checking) fastmaml::emu::check(p, N, false);                                  \
  }                                                                                                     \
  extern "C" void __tsan_unaligned_write##N(void* p) {                                                 \
    if (fastmaml::emu::t_checking) fastmaml::emu::check(p, N, true);                                   \
  }
FM_TSAN_RW(1)
FM_TSAN_RW(2)
FM_TSAN_RW(4)
FM_TSAN_RW(8)
FM_TSAN_RW(16)
#undef FM_TSAN_RW
extern "C" void __tsan_read_range(void* p, unsigned long n) {
  if (fastmaml::emu::t_checking) fastmaml::emu::check(p, n, false);
}
extern "C" void __tsan_write_range(void* p, unsigned long n) {
  if (fastmaml::emu::t_checking) fastmaml::emu::check(p, n, true);
}
extern "C" void __tsan_init() {}
extern "C" void __tsan_func_entry(void*) {}
extern "C" void __tsan_func_exit() {}
extern "C" void __tsan_vptr_update(void**, void*) {}
extern "C" void __tsan_vptr_read(void**) {}

#endif  // FASTMAML_CUDA_EMULATE
