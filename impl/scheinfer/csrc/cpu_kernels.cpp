// Few-token float32 products for ScheInfer's CPU side (impl/scheinfer/cpu_kernels.py): a linear
// layer, a whole SwiGLU FFN and a decoded token's routed experts, each streaming every weight
// once at the memory bandwidth on as many threads as torch's intra-op count of the calling thread
// (so a lane thread's own count applies; `Pool`): row-major weights in chunks the threads claim
// one after another, transposed ones ([K, N] rows) in ranges of whole rows summed in a fixed
// order. One build serves every x86 host: the kernels exist for AVX-512, AVX2 + FMA and plain SSE
// (any CPU), and the caller picks one by number (`isa`).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <pthread.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <mutex>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

namespace {

namespace generic {
#define VBYTES 16
#include "kernels_isa.h"
#undef VBYTES
}  // namespace generic

#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#define VBYTES 32
#include "kernels_isa.h"
#undef VBYTES
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx2,fma")
namespace avx512 {
#define VBYTES 64
#include "kernels_isa.h"
#undef VBYTES
}  // namespace avx512
#pragma GCC pop_options
#endif

enum Isa : int64_t { GENERIC = 0, AVX2 = 1, AVX512 = 2 };

struct Kernels {
  void (*dot_rows)(const float*, int64_t, int64_t, const float*, int64_t, int64_t, float*, int64_t, int64_t, int64_t,
                   const float*, int64_t);
  void (*axpy_rows)(const float*, int64_t, int64_t, const float*, int64_t, int64_t, float*, int64_t, int64_t);
  void (*swiglu)(const float*, const float*, float*, int64_t);
  double (*read_sum)(const float*, int64_t);
};

bool cpu_supports(int64_t isa) {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (isa == AVX512) return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
  if (isa == AVX2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return isa == GENERIC;
}

const Kernels& kernels(int64_t isa) {
  static const Kernels table[] = {
      {generic::dot_rows, generic::axpy_rows, generic::swiglu, generic::read_sum},
#if defined(__x86_64__)
      {avx2::dot_rows, avx2::axpy_rows, avx2::swiglu, avx2::read_sum},
      {avx512::dot_rows, avx512::axpy_rows, avx512::swiglu, avx512::read_sum},
#endif
  };
  TORCH_CHECK(cpu_supports(isa), "scheinfer kernels: isa=", isa, " is not supported by this CPU");
  return table[isa];
}

constexpr int64_t ROWS = 4;              // rows per dot-product block (kernels_isa.h dot_rows)
constexpr int64_t MIN_THREAD_BYTES = 64 << 10;   // less weight per thread than this runs inline
constexpr int64_t CHUNK_BYTES = 64 << 10;        // weight per claimed chunk (parallel_chunks)

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Helper threads for the kernels' parallel loops. Not OpenMP (at::parallel_for; the extension is
// built without it, so there it would run on the caller's thread alone), whose team barrier waits
// for every thread: on a shared host a helper the OS has not scheduled yet would hold the caller
// for a time slice. Here the caller claims chunks itself, a helper joins a job only if it wakes
// while the job is open, and the caller waits only for helpers that joined: with no core free the
// caller does the work alone, at one thread's speed. Helpers sleep between jobs. One job at a
// time: a second caller meanwhile (another engine lane) runs its loop on its own thread.
// A chunk that throws stops the job (no chunk is claimed after it) and its exception, the first
// if several, is rethrown in the caller once every helper has left the job. A forked child
// starts a fresh pool (the parent's helpers do not exist there; `pthread_atfork`).
class Pool {
 public:
  static Pool& get() {
    Pool* pool = instance_.load(std::memory_order_acquire);
    if (pool != nullptr) return *pool;
    Pool* fresh = new Pool();              // leaked: helpers live to exit
    if (instance_.compare_exchange_strong(pool, fresh, std::memory_order_acq_rel)) return *fresh;
    delete fresh;                          // another thread's won (no helper started yet)
    return *pool;
  }

  // fn(c) for every c in [0, chunks), each once, on up to `threads` threads (the caller's included)
  void run(int64_t chunks, int64_t threads, const std::function<void(int64_t)>& fn) {
    if (threads <= 1 || chunks <= 1 || busy_.exchange(true)) {
      for (int64_t c = 0; c < chunks; ++c) fn(c);
      return;
    }
    std::exception_ptr error;
    {
      struct EndJob {          // however the job ends: no helper left in it, its error taken, the pool free
        Pool& p;
        std::exception_ptr& error;
        bool opened = false;
        ~EndJob() {
          if (opened) {
            std::unique_lock<std::mutex> lock(p.m_);
            p.open_ = false;
            p.done_.wait(lock, [this] { return p.joined_ == 0; });
            p.job_ = nullptr;
            std::swap(error, p.error_);
          }
          p.busy_.store(false);
        }
      } end{*this, error};
      {
        std::lock_guard<std::mutex> g(m_);
        while (static_cast<int64_t>(helpers_.size()) < threads - 1) {
          const int64_t index = helpers_.size();
          try {
            helpers_.emplace_back([this, index] { serve(index); });
          } catch (const std::system_error&) {    // the process's thread limit: run with those there are
            break;
          }
          helpers_.back().detach();
        }
        job_ = &fn, chunks_ = chunks, wanted_ = std::min<int64_t>(threads - 1, helpers_.size()), open_ = true;
        ++generation_;
        next_.store(0);
        end.opened = true;
      }
      wake_.notify_all();
      work(fn, chunks);
    }
    if (error) std::rethrow_exception(error);
  }

  // the child of a fork: the parent's pool (its helpers, possibly a lock a helper held) stays behind
  static void forget_in_child() { instance_.store(nullptr); }

 private:
  // claim and run chunks until none is left; a throwing chunk ends the claiming for every thread
  // and its exception (the job's first) is kept for the caller
  void work(const std::function<void(int64_t)>& fn, int64_t chunks) {
    try {
      for (int64_t c = next_.fetch_add(1); c < chunks; c = next_.fetch_add(1)) fn(c);
    } catch (...) {
      next_.store(chunks);
      std::lock_guard<std::mutex> g(m_);
      if (!error_) error_ = std::current_exception();
    }
  }

  void serve(int64_t index) {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(m_);
    for (;;) {
      wake_.wait(lock, [&] { return generation_ != seen; });
      seen = generation_;
      if (!open_ || index >= wanted_) continue;
      ++joined_;
      const std::function<void(int64_t)>* fn = job_;
      const int64_t chunks = chunks_;
      lock.unlock();
      work(*fn, chunks);
      lock.lock();
      if (--joined_ == 0) done_.notify_all();
    }
  }

  static inline std::atomic<Pool*> instance_{nullptr};

  std::mutex m_;
  std::condition_variable wake_, done_;
  std::vector<std::thread> helpers_;
  const std::function<void(int64_t)>* job_ = nullptr;
  int64_t chunks_ = 0, wanted_ = 0, joined_ = 0;
  uint64_t generation_ = 0;
  bool open_ = false;
  std::exception_ptr error_;
  std::atomic<int64_t> next_{0};
  std::atomic<bool> busy_{false};
};

[[maybe_unused]] const int pool_atfork = pthread_atfork(nullptr, nullptr, &Pool::forget_in_child);

// The calling thread's thread count for the kernels' loops when set above 0 (`set_threads`),
// else torch's intra-op count of the thread: a decode step can run torch's own small operations
// on one thread (their OpenMP workers spin after each parallel region, on the cores these loops'
// helpers need) and these loops on all of them.
thread_local int64_t threads_override = 0;

int64_t set_threads(int64_t threads) {
  TORCH_CHECK(threads >= 0, "scheinfer kernels: set_threads(", threads, "): expected an integer >= 0");
  const int64_t before = threads_override;
  threads_override = threads;
  return before;
}

// fn(u0, u1) over units [0, n) in chunks of about CHUNK_BYTES of weight that the threads claim
// one after another: a thread that the OS holds back (a shared host) leaves its
// chunks to the others instead of keeping them all waiting at the end, as a static split would.
// Each unit is done by one call, so results do not depend on which thread took it.
// A product of T > 2 tokens (compute bound) claims chunks of CHUNK_BYTES * min(T, 16) / 2 bytes:
// about as much work per chunk as the memory-bound decode chunk, and several row blocks per
// chunk, so that each block's weights are prefetched while the one before computes (kernels_isa.h
// dot_rows; a chunk's first block cannot be).
template <class Fn>
void parallel_chunks(int64_t n, int64_t unit_bytes, const Fn& fn, int64_t tokens = 1) {
  unit_bytes = std::max<int64_t>(unit_bytes, 1);
  const int64_t chunk_bytes = tokens <= 2 ? CHUNK_BYTES : CHUNK_BYTES * std::min<int64_t>(tokens, 16) / 2;
  const int64_t per_chunk = std::max<int64_t>(1, chunk_bytes / unit_bytes), chunks = cdiv(n, per_chunk);
  const int64_t workers = std::min(chunks, std::max<int64_t>(1, n * unit_bytes / MIN_THREAD_BYTES));
  const int64_t threads = std::min<int64_t>(workers, threads_override > 0 ? threads_override : at::get_num_threads());
  if (threads == 1) return fn(0, n);    // one call: its blocks prefetched one after another
  Pool::get().run(chunks, threads, [&](int64_t c) { fn(c * per_chunk, std::min(n, (c + 1) * per_chunk)); });
}

void check_float_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, "scheinfer kernels: ", name,
              " must be a float32 CPU tensor; got ", t.scalar_type(), " on ", t.device());
}

// Products y_i [T_i, N] = x_i [T_i, K_i] wt_i [K_i, N] of weights stored transposed (wt_i's rows
// contiguous, row stride ldw): each wt_i cut into K_SPLITS ranges of whole rows that the threads
// claim, each range into its own partial [T_i, N], the partials then added in range order. So
// every thread streams whole rows (a split of the columns between threads reads each row's
// memory from both), and the sums do not depend on the thread count.
struct TransposedProduct {
  const float* x;
  int64_t T, ldx;
  const float* wt;
  int64_t ldw, K;
  float* y;
};
constexpr int64_t K_SPLITS = 8;

void transposed_products(const Kernels& k, const std::vector<TransposedProduct>& items, int64_t N) {
  std::vector<int64_t> offset(items.size() + 1, 0);
  int64_t max_K = 0, max_T = 0;
  for (size_t i = 0; i < items.size(); ++i) {
    offset[i + 1] = offset[i] + K_SPLITS * items[i].T * N;
    max_K = std::max(max_K, items[i].K);
    max_T = std::max(max_T, items[i].T);
  }
  at::Tensor scratch = at::empty({offset.back()}, at::kFloat);      // each range's partial, overwritten by axpy_rows
  float* partial = scratch.data_ptr<float>();
  parallel_chunks(static_cast<int64_t>(items.size()) * K_SPLITS, cdiv(max_K, K_SPLITS) * N * 4, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const TransposedProduct& it = items[u / K_SPLITS];
      const int64_t r = u % K_SPLITS, k0 = r * it.K / K_SPLITS, k1 = (r + 1) * it.K / K_SPLITS;
      k.axpy_rows(it.x + k0, it.T, it.ldx, it.wt + k0 * it.ldw, it.ldw, k1 - k0,
                  partial + offset[u / K_SPLITS] + r * it.T * N, N, N);
    }
  }, max_T);
  for (size_t i = 0; i < items.size(); ++i) {
    const float* p = partial + offset[i];
    const int64_t TN = items[i].T * N;
    float* y = items[i].y;
    std::memcpy(y, p, TN * sizeof(float));
    for (int64_t r = 1; r < K_SPLITS; ++r)
      for (int64_t j = 0; j < TN; ++j) y[j] += p[r * TN + j];
  }
}

// y[t, :] = w x[t, :] over rows of w (w[n, :] contiguous) or, w stored transposed (w[:, n]
// contiguous), over its rows of the reduction dimension: x [T, K] contiguous, y [T, N]
void product(const Kernels& k, const float* x, int64_t T, const at::Tensor& w, float* y) {
  const int64_t N = w.size(0), K = w.size(1);
  const float* wp = w.data_ptr<float>();
  if (w.stride(1) == 1) {
    parallel_chunks(cdiv(N, ROWS), ROWS * K * 4, [&](int64_t u0, int64_t u1) {
      k.dot_rows(x, T, K, wp, w.stride(0), K, y, N, u0 * ROWS, std::min(N, u1 * ROWS), nullptr, 0);
    }, T);
  } else {
    TORCH_CHECK(w.stride(0) == 1, "scheinfer kernels: a weight needs rows or columns contiguous; got strides ",
                w.strides());
    transposed_products(k, {{x, T, K, wp, w.stride(1), K, y}}, N);
  }
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b, int64_t isa) {
  const Kernels& k = kernels(isa);
  check_float_cpu(x, "x");
  check_float_cpu(w, "w");
  TORCH_CHECK(w.dim() == 2 && x.dim() >= 1 && x.size(-1) == w.size(1), "scheinfer linear: x ", x.sizes(),
              " and w ", w.sizes(), " do not match");
  const at::Tensor xc = x.contiguous();
  const int64_t K = w.size(1), T = K ? xc.numel() / K : 0;
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = w.size(0);
  at::Tensor y = at::empty(sizes, x.options());
  if (T) product(k, xc.data_ptr<float>(), T, w, y.data_ptr<float>());
  if (b.has_value()) y.add_(*b);
  return y;
}

// SwiGLU FFNs down (silu(gate x) * up x), each of its own T_i tokens x_i [T_i, M]: gate_i / up_i
// [F_i, M] with contiguous rows, down_i [M, F_i] either way (rows contiguous, or stored [F_i, M]
// as the engine keeps it). Two parallel regions for all of them: the gate / up rows of every FFN
// (in chunks, the SwiGLU of each chunk's own rows with it), then down: in chunks of output rows
// for the downs with contiguous rows, by `transposed_products` for the others.
std::vector<at::Tensor> ffn_many(const std::vector<at::Tensor>& xs, const std::vector<at::Tensor>& gates,
                                 const std::vector<at::Tensor>& ups, const std::vector<at::Tensor>& downs,
                                 int64_t isa) {
  const Kernels& k = kernels(isa);
  const size_t n = xs.size();
  TORCH_CHECK(gates.size() == n && ups.size() == n && downs.size() == n, "scheinfer ffn: ", n, " x, ",
              gates.size(), " gate, ", ups.size(), " up and ", downs.size(), " down tensors; expected as many of each");
  std::vector<at::Tensor> out(n);
  if (n == 0) return out;
  const int64_t M = xs[0].size(-1);
  struct Item { const float *x, *gate, *up, *down; int64_t T, F, ldg, ldu, ldd; bool rows; float *g, *u, *h, *y; };
  std::vector<Item> items(n);
  std::vector<at::Tensor> keep;                          // contiguous inputs and buffers, alive to the end
  std::vector<int64_t> first_unit(n + 1, 0);             // gate / up row blocks of item i: [first_unit[i], first_unit[i + 1])
  int64_t max_F = 0, max_T = 0;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor &x = xs[i], &gate = gates[i], &up = ups[i], &down = downs[i];
    for (auto& [t, name] : {std::pair{&x, "x"}, {&gate, "gate"}, {&up, "up"}, {&down, "down"}}) check_float_cpu(*t, name);
    TORCH_CHECK(x.dim() == 2 && x.size(1) == M && gate.dim() == 2 && gate.sizes() == up.sizes() && down.dim() == 2 &&
                    gate.size(1) == M && down.size(0) == M && down.size(1) == gate.size(0) && gate.stride(1) == 1 &&
                    up.stride(1) == 1 && (down.stride(1) == 1 || down.stride(0) == 1),
                "scheinfer ffn: x ", x.sizes(), ", gate ", gate.sizes(), ", up ", up.sizes(), ", down ", down.sizes(),
                " (strides ", down.strides(), "); expected [T, M], [F, M], [F, M] (rows contiguous), [M, F] with rows",
                " or columns contiguous");
    const int64_t T = x.size(0), F = gate.size(0);
    const bool rows = down.stride(1) == 1;
    keep.push_back(x.contiguous());
    at::Tensor buf = at::empty({3, T, F}, x.options());
    keep.push_back(buf);
    out[i] = at::empty({T, M}, x.options());
    float* g = buf.data_ptr<float>();
    items[i] = {keep[2 * i].data_ptr<float>(), gate.data_ptr<float>(), up.data_ptr<float>(), down.data_ptr<float>(),
                T, F, gate.stride(0), up.stride(0), rows ? down.stride(0) : down.stride(1), rows, g, g + T * F,
                g + 2 * T * F, out[i].data_ptr<float>()};
    first_unit[i + 1] = first_unit[i] + (T ? cdiv(F, ROWS) : 0);
    max_F = std::max(max_F, F);
    max_T = std::max(max_T, T);
  }
  parallel_chunks(first_unit[n], 2 * ROWS * M * 4, [&](int64_t u0, int64_t u1) {
    for (size_t i = std::upper_bound(first_unit.begin(), first_unit.end(), u0) - first_unit.begin() - 1;
         i < n && first_unit[i] < u1; ++i) {
      const Item& it = items[i];
      const int64_t f0 = std::max(u0 - first_unit[i], int64_t(0)) * ROWS, f1 = std::min(it.F, (u1 - first_unit[i]) * ROWS);
      if (it.T == 0 || f0 >= f1) continue;
      k.dot_rows(it.x, it.T, M, it.gate, it.ldg, M, it.g, it.F, f0, f1, it.up + f0 * it.ldu, it.ldu);  // then up's rows
      k.dot_rows(it.x, it.T, M, it.up, it.ldu, M, it.u, it.F, f0, f1, nullptr, 0);
      for (int64_t t = 0; t < it.T; ++t) k.swiglu(it.g + t * it.F + f0, it.u + t * it.F + f0, it.h + t * it.F + f0, f1 - f0);
    }
  }, max_T);
  // down: output row blocks of the items with rows contiguous, in chunks; the transposed ones
  // by `transposed_products`
  std::vector<const Item*> row_items;
  std::vector<TransposedProduct> transposed;
  for (const Item& it : items) {
    if (it.T == 0) continue;
    if (it.rows)
      row_items.push_back(&it);
    else
      transposed.push_back({it.h, it.T, it.F, it.down, it.ldd, it.F, it.y});
  }
  const int64_t blocks = cdiv(M, ROWS);                 // output row blocks per item
  if (!row_items.empty())
    parallel_chunks(static_cast<int64_t>(row_items.size()) * blocks, ROWS * max_F * 4, [&](int64_t u0, int64_t u1) {
      for (int64_t u = u0; u < u1;) {                    // runs of one item's blocks
        const int64_t i = u / blocks, end = std::min(u1, (i + 1) * blocks);
        const Item& it = *row_items[i];
        k.dot_rows(it.h, it.T, it.F, it.down, it.ldd, it.F, it.y, M, (u - i * blocks) * ROWS,
                   std::min(M, (end - i * blocks) * ROWS), nullptr, 0);
        u = end;
      }
    }, max_T);
  if (!transposed.empty()) transposed_products(k, transposed, M);
  return out;
}

at::Tensor ffn(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& up, const at::Tensor& down,
               int64_t isa) {
  return ffn_many({x}, {gate}, {up}, {down}, isa)[0];
}

// The routed experts of one decoded token x [1, M]: y = sum_k weights[k] ffn_{ids[k]}(x), the
// terms added in ascending expert order, over a layer's stacked experts gate_up [E, 2F, M] (each
// expert's gate rows, then its up rows) and down [E, M, F]. Each thread streams one contiguous
// block of every chosen expert's gate, up and down rows.
at::Tensor moe_token(const at::Tensor& x, const at::Tensor& gate_up, const at::Tensor& down, const at::Tensor& ids,
                     const at::Tensor& weights, int64_t isa) {
  const Kernels& k = kernels(isa);
  for (auto& [t, name] : {std::pair{&x, "x"}, {&gate_up, "gate_up"}, {&down, "down"}}) check_float_cpu(*t, name);
  const int64_t E = gate_up.size(0), F = gate_up.size(1) / 2, M = gate_up.size(2), K = ids.numel();
  TORCH_CHECK(x.numel() == M && gate_up.dim() == 3 && down.dim() == 3 && down.size(0) == E && down.size(1) == M &&
                  down.size(2) == F && gate_up.stride(2) == 1 && gate_up.stride(1) == M && down.stride(2) == 1 &&
                  weights.numel() == K,
              "scheinfer moe_token: x ", x.sizes(), ", gate_up ", gate_up.sizes(), ", down ", down.sizes(), ", ids ",
              ids.sizes(), ", weights ", weights.sizes(), "; expected [1, M], [E, 2F, M] and [E, M, F] with ",
              "contiguous rows, K ids and K weights");
  TORCH_CHECK(ids.device().is_cpu() && weights.device().is_cpu(), "scheinfer moe_token: ids and weights must be on the CPU");
  const at::Tensor ids_c = ids.scalar_type() == at::kLong && ids.is_contiguous() ? ids : ids.to(at::kLong).contiguous();
  const at::Tensor w_c = weights.scalar_type() == at::kFloat && weights.is_contiguous() ? weights
                                                                                          : weights.to(at::kFloat).contiguous();
  std::vector<std::pair<int64_t, float>> chosen(K);
  for (int64_t j = 0; j < K; ++j) {
    chosen[j] = {ids_c.data_ptr<int64_t>()[j], w_c.data_ptr<float>()[j]};
    TORCH_CHECK(0 <= chosen[j].first && chosen[j].first < E, "scheinfer moe_token: expert id ", chosen[j].first,
                " outside 0..", E - 1);
  }
  std::sort(chosen.begin(), chosen.end(), [](auto& a, auto& b) { return a.first < b.first; });
  const at::Tensor xc = x.contiguous();
  const float* xp = xc.data_ptr<float>();
  at::Tensor gu = at::empty({K, 2, F}, x.options()), h = at::empty({K, F}, x.options()),
             parts = at::empty({K, M}, x.options()), y = at::empty({1, M}, x.options());
  float *g = gu.data_ptr<float>(), *hp = h.data_ptr<float>(), *pp = parts.data_ptr<float>(), *yp = y.data_ptr<float>();
  const float* gup = gate_up.data_ptr<float>();
  const float* dp = down.data_ptr<float>();
  const int64_t units = cdiv(F, ROWS);      // per expert
  parallel_chunks(K * units, 2 * ROWS * M * 4, [&](int64_t u0, int64_t u1) {
    for (int64_t j = u0 / units; j < K && j * units < u1; ++j) {
      const int64_t f0 = std::max(u0 - j * units, int64_t(0)) * ROWS, f1 = std::min(F, (u1 - j * units) * ROWS);
      const float* w = gup + chosen[j].first * gate_up.stride(0);
      float *gj = g + j * 2 * F, *uj = gj + F;
      k.dot_rows(xp, 1, M, w, M, M, gj, F, f0, f1, nullptr, 0);
      k.dot_rows(xp, 1, M, w + F * M, M, M, uj, F, f0, f1, nullptr, 0);
      k.swiglu(gj + f0, uj + f0, hp + j * F + f0, f1 - f0);
    }
  });
  parallel_chunks(cdiv(M, ROWS), K * ROWS * F * 4, [&](int64_t u0, int64_t u1) {
    const int64_t m0 = u0 * ROWS, m1 = std::min(M, u1 * ROWS);
    for (int64_t j = 0; j < K; ++j)
      k.dot_rows(hp + j * F, 1, F, dp + chosen[j].first * down.stride(0), down.stride(1), F, pp + j * M, M, m0, m1,
                   nullptr, 0);
    for (int64_t m = m0; m < m1; ++m) {
      float acc = 0.0f;
      for (int64_t j = 0; j < K; ++j) acc += chosen[j].second * pp[j * M + m];
      yp[m] = acc;
    }
  });
  return y;
}

// The sum of a float32 buffer read once by every thread's share (the read bandwidth probe)
double read_sum(const at::Tensor& buf, int64_t isa) {
  const Kernels& k = kernels(isa);
  check_float_cpu(buf, "buf");
  TORCH_CHECK(buf.is_contiguous(), "scheinfer read_sum: the buffer must be contiguous");
  const float* p = buf.data_ptr<float>();
  const int64_t n = buf.numel(), chunk = 1 << 14;
  std::vector<double> parts(cdiv(n, chunk), 0.0);
  parallel_chunks(cdiv(n, chunk), chunk * 4, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) parts[c] = k.read_sum(p + c * chunk, std::min(chunk, n - c * chunk));
  });
  double s = 0.0;
  for (double v : parts) s += v;
  return s;
}

}  // namespace

TORCH_LIBRARY(scheinfer, m) {
  m.def("linear(Tensor x, Tensor w, Tensor? b, int isa) -> Tensor");
  m.def("ffn(Tensor x, Tensor gate, Tensor up, Tensor down, int isa) -> Tensor");
  m.def("ffn_many(Tensor[] x, Tensor[] gate, Tensor[] up, Tensor[] down, int isa) -> Tensor[]");
  m.def("moe_token(Tensor x, Tensor gate_up, Tensor down, Tensor ids, Tensor weights, int isa) -> Tensor");
  m.def("read_sum(Tensor buf, int isa) -> float");
  m.def("cpu_supports(int isa) -> bool", &cpu_supports);
  m.def("set_threads(int threads) -> int", &set_threads);
}

TORCH_LIBRARY_IMPL(scheinfer, CPU, m) {
  m.impl("linear", &linear);
  m.impl("ffn", &ffn);
  m.impl("ffn_many", &ffn_many);
  m.impl("moe_token", &moe_token);
  m.impl("read_sum", &read_sum);
}
