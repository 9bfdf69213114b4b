// The SIMT emulator's runtime: fibers, the per-block scheduler, barriers and warp collectives.
// See simt.h for what it models and what it does not.
#include "simt/simt.h"

#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace simt::detail {
namespace {

enum class State { Ready, AtBarrier, AtWarp, Exited };

struct Fiber {
  void* sp = nullptr;  // saved stack pointer while switched out (x86-64)
#if !defined(__x86_64__)
  ucontext_t ctx;
#endif
  State state = State::Ready;
  dim3 idx;
  unsigned linear = 0;
  char* stack_lo = nullptr;  // usable stack [stack_lo, stack_lo + kStackBytes)
};

struct WarpSlot {
  unsigned arrived = 0, mask = 0;
  const char* what = nullptr;
  CollectiveFn fn = nullptr;
  void* posts[32] = {};
};

constexpr size_t kStackBytes = 64 * 1024;

struct Runtime {
  std::mutex launch_mutex;
  std::vector<Fiber> fibers;
  char* stacks = nullptr;  // one mapping: per fiber a guard page then its stack
  size_t stack_capacity = 0;
  std::vector<std::vector<WarpSlot>> warps;  // per warp, its pending collectives
  std::vector<unsigned> warp_exited;  // per warp, lanes that have finished
  unsigned nthreads = 0, exited = 0, at_barrier = 0;
  unsigned long long phase = 0, block_serial = 0;
  Fiber* current = nullptr;
  void (*thunk)(void*) = nullptr;
  void* ctx = nullptr;
  bool failed = false;
  std::string error;
  std::vector<unsigned char> dyn_storage;  // dynamic shared memory, used from a 128-byte boundary
  unsigned char* dyn_smem = nullptr;
  std::vector<std::pair<void*, unsigned long long>> poisoned;
#if defined(__x86_64__)
  void* sched_sp = nullptr;
#else
  ucontext_t sched_ctx;
#endif
};

Runtime& rt() {
  static Runtime r;
  return r;
}

size_t page_size() { return static_cast<size_t>(sysconf(_SC_PAGESIZE)); }

}  // namespace
}  // namespace simt::detail

// ---- context switch ---------------------------------------------------------------------------
#if defined(__x86_64__)
// fastcon_simt_switch(void** save_sp, void* next_sp): saves the callee-saved registers and the
// SSE/x87 control words on the current stack, stores the stack pointer in *save_sp, and
// resumes the context whose stack pointer is next_sp. A new fiber's stack is prepared so that
// the switch "returns" into fastcon_simt_trampoline with r12 = Fiber*, r13 = entry function.
asm(R"(
  .text
  .p2align 4
  .globl fastcon_simt_switch
  .hidden fastcon_simt_switch
  .type fastcon_simt_switch,@function
fastcon_simt_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size fastcon_simt_switch, .-fastcon_simt_switch

  .p2align 4
  .globl fastcon_simt_trampoline
  .hidden fastcon_simt_trampoline
  .type fastcon_simt_trampoline,@function
fastcon_simt_trampoline:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size fastcon_simt_trampoline, .-fastcon_simt_trampoline
)");
extern "C" void fastcon_simt_switch(void** save_sp, void* next_sp);
extern "C" void fastcon_simt_trampoline();
#endif

namespace simt::detail {
namespace {

[[noreturn]] void fiber_main(Fiber* f);

void switch_to_scheduler(Fiber* f) {
  Runtime& r = rt();
#if defined(__x86_64__)
  fastcon_simt_switch(&f->sp, r.sched_sp);
#else
  swapcontext(&f->ctx, &r.sched_ctx);
#endif
}

void switch_to_fiber(Fiber* f) {
  Runtime& r = rt();
  r.current = f;
  g_thread_idx = f->idx;
  g_linear_tid = f->linear;
#if defined(__x86_64__)
  fastcon_simt_switch(&r.sched_sp, f->sp);
#else
  swapcontext(&r.sched_ctx, &f->ctx);
#endif
}

#if !defined(__x86_64__)
void ucontext_entry(unsigned hi, unsigned lo) {
  fiber_main(reinterpret_cast<Fiber*>((static_cast<uintptr_t>(hi) << 32) | lo));
}
#endif

// Puts a fresh frame on fiber f's stack so that switching to it starts the kernel.
void prepare(Fiber* f) {
  char* top = f->stack_lo + kStackBytes;
#if defined(__x86_64__)
  uint32_t mxcsr = 0;
  uint16_t fpucw = 0;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  // 8 quadwords popped by the switch: control words, r15, r14, r13, r12, rbx, rbp, return
  // address; rsp is 16-byte aligned after they are popped, as the trampoline's call needs.
  auto* sp = reinterpret_cast<uint64_t*>(top - 64);
  sp[0] = static_cast<uint64_t>(mxcsr) | (static_cast<uint64_t>(fpucw) << 32);
  sp[1] = 0;                                          // r15
  sp[2] = 0;                                          // r14
  sp[3] = reinterpret_cast<uint64_t>(&fiber_main);    // r13: entry
  sp[4] = reinterpret_cast<uint64_t>(f);              // r12: argument
  sp[5] = 0;                                          // rbx
  sp[6] = 0;                                          // rbp
  sp[7] = reinterpret_cast<uint64_t>(&fastcon_simt_trampoline);
  f->sp = sp;
#else
  getcontext(&f->ctx);
  f->ctx.uc_stack.ss_sp = f->stack_lo;
  f->ctx.uc_stack.ss_size = kStackBytes;
  f->ctx.uc_link = nullptr;
  const auto p = reinterpret_cast<uintptr_t>(f);
  makecontext(&f->ctx, reinterpret_cast<void (*)()>(&ucontext_entry), 2, static_cast<unsigned>(p >> 32),
              static_cast<unsigned>(p & 0xffffffffu));
#endif
}

[[noreturn]] void fail_in_fiber(const std::string& msg) {
  Runtime& r = rt();
  if (!r.failed) {
    r.failed = true;
    r.error = "SIMT emulator: " + msg;
  }
  Fiber* f = r.current;
  for (;;) switch_to_scheduler(f);  // the scheduler abandons this block; never resumed
}

void on_exit(Fiber* f) {
  Runtime& r = rt();
  f->state = State::Exited;
  ++r.exited;
  const unsigned warp = f->linear >> 5, bit = 1u << (f->linear & 31);
  r.warp_exited[warp] |= bit;
  for (const WarpSlot& s : r.warps[warp])
    if (s.arrived && (s.mask & bit)) {
      char buf[200];
      std::snprintf(buf, sizeof buf, "lane %u of warp %u exited while lanes 0x%08x waited for it at %s (mask 0x%08x)",
                    f->linear & 31, warp, s.arrived, s.what, s.mask);
      fail_in_fiber(buf);
    }
}

[[noreturn]] void fiber_main(Fiber* f) {
  Runtime& r = rt();
  r.thunk(r.ctx);
  on_exit(f);
  for (;;) switch_to_scheduler(f);
}

void ensure_fibers(unsigned n) {
  Runtime& r = rt();
  const size_t page = page_size(), per = kStackBytes + page;
  if (n > r.stack_capacity) {
    if (r.stacks) munmap(r.stacks, r.stack_capacity * per);
    void* m = mmap(nullptr, n * per, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) throw std::runtime_error("SIMT emulator: cannot map fiber stacks");
    r.stacks = static_cast<char*>(m);
    for (unsigned i = 0; i < n; ++i) mprotect(r.stacks + i * per, page, PROT_NONE);  // overflow guard
    r.stack_capacity = n;
  }
  r.fibers.resize(n);
  for (unsigned i = 0; i < n; ++i) r.fibers[i].stack_lo = r.stacks + i * per + page;
}

std::string deadlock_report() {
  Runtime& r = rt();
  std::string msg = "deadlock: no thread can run (";
  msg += std::to_string(r.at_barrier) + " at __syncthreads, " + std::to_string(r.exited) + " exited";
  for (size_t w = 0; w < r.warps.size(); ++w)
    for (const WarpSlot& s : r.warps[w]) {
      if (!s.arrived) continue;
      char buf[160];
      std::snprintf(buf, sizeof buf, "; warp %zu: lanes 0x%08x wait at %s for lanes 0x%08x", w, s.arrived, s.what,
                    s.mask & ~s.arrived);
      msg += buf;
    }
  return msg + ")";
}

// Runs one block to completion; returns false (with r.error set) on a detected error.
bool run_block() {
  Runtime& r = rt();
  const unsigned n = r.nthreads;
  for (unsigned i = 0; i < n; ++i) {
    Fiber& f = r.fibers[i];
    f.state = State::Ready;
    f.linear = i;
    f.idx = dim3(i % g_block_dim.x, (i / g_block_dim.x) % g_block_dim.y, i / (g_block_dim.x * g_block_dim.y));
    prepare(&f);
  }
  for (auto& slots : r.warps) slots.clear();
  for (auto& e : r.warp_exited) e = 0;
  r.exited = r.at_barrier = 0;
  r.phase = 0;
  ++r.block_serial;
  for (;;) {
    bool any_ready = true;
    while (any_ready) {
      any_ready = false;
      for (unsigned k = 0; k < n; ++k) {
        const unsigned i = (r.phase & 1) ? n - 1 - k : k;
        if (r.fibers[i].state != State::Ready) continue;
        switch_to_fiber(&r.fibers[i]);
        if (r.failed) return false;
        any_ready = true;
      }
    }
    if (r.exited == n) return true;
    if (r.at_barrier && r.at_barrier + r.exited == n) {
      if (r.exited) {
        r.error = "SIMT emulator: __syncthreads reached by " + std::to_string(r.at_barrier) + " of " +
                  std::to_string(n) + " threads; the others exited (undefined behaviour on a GPU)";
        return false;
      }
      for (auto& f : r.fibers)
        if (f.state == State::AtBarrier) f.state = State::Ready;
      r.at_barrier = 0;
      ++r.phase;
      continue;
    }
    r.error = "SIMT emulator: " + deadlock_report();
    return false;
  }
}

}  // namespace

void syncthreads() {
  Runtime& r = rt();
  Fiber* f = r.current;
  if (!f) throw std::runtime_error("__syncthreads called outside a kernel");
  f->state = State::AtBarrier;
  ++r.at_barrier;
  switch_to_scheduler(f);
}

void collective(unsigned mask, const char* what, void* post, CollectiveFn fn) {
  Runtime& r = rt();
  Fiber* f = r.current;
  if (!f) throw std::runtime_error(std::string(what) + " called outside a kernel");
  const unsigned lane = f->linear & 31, warp = f->linear >> 5;
  const unsigned first = warp * 32, count = r.nthreads - first < 32 ? r.nthreads - first : 32;
  const unsigned exists = count == 32 ? 0xffffffffu : ((1u << count) - 1);
  char buf[240];
  if (!(mask >> lane & 1u)) {
    std::snprintf(buf, sizeof buf, "%s: lane %u of warp %u calls it with mask 0x%08x, which leaves it out", what,
                  lane, warp, mask);
    fail_in_fiber(buf);
  }
  if (mask & ~exists) {
    std::snprintf(buf, sizeof buf, "%s: mask 0x%08x names lanes that do not exist (warp %u has lanes 0x%08x)", what,
                  mask, warp, exists);
    fail_in_fiber(buf);
  }
  if (mask & r.warp_exited[warp]) {
    std::snprintf(buf, sizeof buf, "%s: mask 0x%08x names lanes 0x%08x of warp %u that have exited", what, mask,
                  mask & r.warp_exited[warp], warp);
    fail_in_fiber(buf);
  }
  // Lanes of one warp may run independent collectives on disjoint masks; a pending one whose
  // mask overlaps this one without being equal to it means the warp diverged.
  auto& slots = r.warps[warp];
  WarpSlot* s = nullptr;
  for (auto& pending : slots) {
    if (!pending.arrived) continue;
    if (pending.mask == mask && std::strcmp(pending.what, what) == 0) {
      s = &pending;
    } else if (pending.mask & mask) {
      std::snprintf(buf, sizeof buf,
                    "warp %u diverged: lanes 0x%08x wait at %s (mask 0x%08x), lane %u calls %s (mask 0x%08x)", warp,
                    pending.arrived, pending.what, pending.mask, lane, what, mask);
      fail_in_fiber(buf);
    }
  }
  if (!s) {
    for (auto& free_slot : slots)
      if (!free_slot.arrived) s = &free_slot;
    if (!s) s = &slots.emplace_back();
    s->mask = mask;
    s->what = what;
    s->fn = fn;
  }
  s->posts[lane] = post;
  s->arrived |= 1u << lane;
  if (s->arrived != s->mask) {
    f->state = State::AtWarp;
    switch_to_scheduler(f);
    return;  // released by the last lane, which has already computed our result
  }
  void* posts[32];
  std::memcpy(posts, s->posts, sizeof posts);
  *s = WarpSlot{};
  fn(posts, mask);
  for (unsigned l = 0; l < 32; ++l)
    if ((mask >> l & 1u) && l != lane) r.fibers[first + l].state = State::Ready;
}

void fail_shfl_source(int lane, int src, unsigned mask) {
  char buf[160];
  std::snprintf(buf, sizeof buf, "lane %d shuffles from lane %d, which is not in the mask 0x%08x (undefined on a GPU)",
                lane, src, mask);
  fail_in_fiber(buf);
}

void vote_fn(void* const* posts, unsigned mask) {
  unsigned ballot = 0;
  for (int l = 0; l < 32; ++l)
    if ((mask >> l & 1u) && static_cast<VotePost*>(posts[l])->pred) ballot |= 1u << l;
  for (int l = 0; l < 32; ++l)
    if (mask >> l & 1u) static_cast<VotePost*>(posts[l])->result = ballot;
}

void* dynamic_shared_memory() { return rt().dyn_smem; }

void poison_shared(void* p, size_t bytes) {
  Runtime& r = rt();
  for (auto& entry : r.poisoned)
    if (entry.first == p) {
      if (entry.second != r.block_serial) {
        entry.second = r.block_serial;
        std::memset(p, 0xff, bytes);
      }
      return;
    }
  r.poisoned.emplace_back(p, r.block_serial);
  std::memset(p, 0xff, bytes);
}

}  // namespace simt::detail

namespace nvcuda::wmma::detail {
void check_pointer(const void* p, unsigned ldm, size_t elem_size, const char* what) {
  char buf[200];
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) {
    std::snprintf(buf, sizeof buf, "%s: pointer %p is not 256-bit aligned", what, p);
    ::simt::fail(buf);
  }
  if ((ldm * elem_size) % 16 != 0) {
    std::snprintf(buf, sizeof buf, "%s: ldm %u is not a multiple of 16 bytes", what, ldm);
    ::simt::fail(buf);
  }
}

void check_same(void* const* posts, unsigned, const char* what) {
  const auto* p0 = static_cast<LoadPost*>(posts[0]);
  for (int l = 1; l < 32; ++l) {
    const auto* p = static_cast<LoadPost*>(posts[l]);
    if (p->ptr != p0->ptr || p->ldm != p0->ldm || p->col_major != p0->col_major) {
      char buf[200];
      std::snprintf(buf, sizeof buf, "%s: lanes 0 and %d pass different pointers, strides or layouts", what, l);
      ::simt::fail(buf);
    }
  }
}
}  // namespace nvcuda::wmma::detail

namespace simt {

void fail(const char* msg) {
  if (!detail::rt().current) throw std::runtime_error(std::string("SIMT emulator: ") + msg);
  detail::fail_in_fiber(msg);
}

namespace {
std::atomic<int64_t> g_launches{0};
}  // namespace

int64_t launch_count() { return g_launches.load(); }

void run(dim3 grid, dim3 block, size_t dynamic_smem, void (*thunk)(void*), void* ctx) {
  using namespace detail;
  Runtime& r = rt();
  std::lock_guard<std::mutex> lock(r.launch_mutex);
  g_launches.fetch_add(1);  // every launch counts, also one the checks below refuse
  const unsigned long long n = 1ull * block.x * block.y * block.z;
  if (n == 0 || n > 1024 || block.z > 64)
    throw std::invalid_argument("SIMT emulator: invalid block size (" + std::to_string(n) + " threads)");
  if (1ull * grid.x * grid.y * grid.z == 0 || grid.y > 65535 || grid.z > 65535)
    throw std::invalid_argument("SIMT emulator: invalid grid size");
  if (r.current) throw std::runtime_error("SIMT emulator: kernel launched from inside a kernel");
  r.nthreads = static_cast<unsigned>(n);
  ensure_fibers(r.nthreads);
  r.warps.assign((r.nthreads + 31) / 32, {});
  r.warp_exited.assign(r.warps.size(), 0);
  r.dyn_storage.assign(dynamic_smem + 128, 0xff);
  const auto base = reinterpret_cast<uintptr_t>(r.dyn_storage.data());
  r.dyn_smem = r.dyn_storage.data() + ((128 - base % 128) % 128);
  r.thunk = thunk;
  r.ctx = ctx;
  r.failed = false;
  r.error.clear();
  g_block_dim = block;
  g_grid_dim = grid;
  bool ok = true;
  for (unsigned z = 0; ok && z < grid.z; ++z)
    for (unsigned y = 0; ok && y < grid.y; ++y)
      for (unsigned x = 0; ok && x < grid.x; ++x) {
        g_block_idx = dim3(x, y, z);
        if (dynamic_smem) std::memset(r.dyn_smem, 0xff, dynamic_smem);
        ok = run_block();
      }
  r.current = nullptr;
  g_thread_idx = dim3(0, 0, 0);
  if (!ok) throw std::runtime_error(r.error);
}

}  // namespace simt
