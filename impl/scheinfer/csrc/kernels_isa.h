// The few-token float32 kernels of cpu_kernels.cpp for one vector width. Included once per
// instruction set, inside `namespace KERNEL_NS` under a `#pragma GCC target`, with VBYTES the
// vector width in bytes (GCC vector extensions: the same code becomes SSE, AVX2 or AVX-512).
//
// Every kernel reads each weight element once, in long contiguous runs, and keeps the
// activations (a few tokens) in registers or L1: a one-token product is memory bound, so what
// matters is streaming the weights at the DRAM bandwidth, not the arithmetic.

typedef float vf __attribute__((vector_size(VBYTES)));
typedef int32_t vi __attribute__((vector_size(VBYTES)));
constexpr int64_t L = VBYTES / 4;    // floats per vector

static inline vf vload(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
static inline void vstore(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
static inline vf vsplat(float a) { return vf{} + a; }

static inline float hsum(vf v) {             // pairwise: log2(L) dependent adds
  float a[L];
  std::memcpy(a, &v, sizeof v);
  for (int64_t w = L / 2; w >= 1; w /= 2)
    for (int64_t i = 0; i < w; ++i) a[i] += a[i + w];
  return a[0];
}

// exp(x) to about 2 ulp: x = n ln2 + r, |r| <= ln2/2, exp(r) by a degree-6 polynomial (Cephes
// expf's coefficients), 2^n through the exponent bits; capped at exp(88), 0 below -87.3.
static inline vf vexp(vf x) {
  x = x < vsplat(88.0f) ? x : vsplat(88.0f);
  const vi tiny = x < vsplat(-87.3365447505531f);
  vf fx = x * vsplat(1.44269504088896341f);
  vi n = __builtin_convertvector(fx + (fx < vsplat(0.0f) ? vsplat(-0.5f) : vsplat(0.5f)), vi);  // round
  const vf nf = __builtin_convertvector(n, vf);
  vf r = x - nf * vsplat(0.693359375f);
  r = r - nf * vsplat(-2.12194440e-4f);
  vf p = vsplat(1.9875691500E-4f);
  p = p * r + vsplat(1.3981999507E-3f);
  p = p * r + vsplat(8.3334519073E-3f);
  p = p * r + vsplat(4.1665795894E-2f);
  p = p * r + vsplat(1.6666665459E-1f);
  p = p * r + vsplat(5.0000001201E-1f);
  p = p * r * r + r + vsplat(1.0f);
  vi bits = (n + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof scale);
  const vf y = p * scale;
  return tiny ? vsplat(0.0f) : y;
}

// h[f] = silu(g[f]) * u[f] = g / (1 + exp(-g)) * u for f < n
static void swiglu(const float* g, const float* u, float* h, int64_t n) {
  int64_t f = 0;
  for (; f + L <= n; f += L) {
    const vf gv = vload(g + f);
    vstore(h + f, gv / (vsplat(1.0f) + vexp(-gv)) * vload(u + f));
  }
  for (; f < n; ++f) h[f] = g[f] / (1.0f + std::exp(-g[f])) * u[f];
}

// Lane i of fold<G>(a, b): the sum of two lanes G apart in block i / (2G) of a (i / G even) or
// of b (i / G odd), each block of 2G lanes folded into G lanes.
template <int G>
static inline vf fold(vf a, vf b) {
  vi lo, hi;
  for (int i = 0; i < L; ++i) {
    lo[i] = ((i / G) % 2 ? L : 0) + i / (2 * G) * 2 * G + i % G;
    hi[i] = lo[i] + G;
  }
  return __builtin_shuffle(a, b, lo) + __builtin_shuffle(a, b, hi);
}

// 2G vectors folded level by level into one: lane i the sum of every lane of v[bitrev(i)]
template <int G>
static inline vf fold_levels(vf* v) {
  for (int j = 0; j < G; ++j) v[j] = fold<G>(v[2 * j], v[2 * j + 1]);
  if constexpr (G == 1)
    return v[0];
  else
    return fold_levels<G / 2>(v);
}

static constexpr int bitrev(int j) {     // j's log2(L) bits reversed
  int r = 0;
  for (int b = 1; b < L; b *= 2, j /= 2) r = 2 * r + j % 2;
  return r;
}

// y[t * ldy + r] = sum_k x[t * ldx + k] w[r * ldw + k] for R rows and T tokens. When the R x T
// accumulators fill whole vectors of L sums, they are reduced L at a time by `fold_levels` (L - 1
// vector adds per L sums instead of a horizontal sum each: at K = 512 that reduction is a third
// of a 4 x 4 block's time).
// `npf` rows from `pf` (row stride ldpf) are prefetched along the way (the next rows' block).
template <int R, int T>
static inline void dot_block(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t K,
                             float* y, int64_t ldy, const float* pf = nullptr, int64_t npf = 0, int64_t ldpf = 0) {
  vf acc[T][R];
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) acc[t][r] = vf{};
  int64_t k = 0;
  for (; k + L <= K; k += L) {
    for (int64_t p = 0; p < npf; ++p) __builtin_prefetch(pf + p * ldpf + k);
    vf xv[T];
    for (int t = 0; t < T; ++t) xv[t] = vload(x + t * ldx + k);
    for (int r = 0; r < R; ++r) {
      const vf wv = vload(w + r * ldw + k);
      for (int t = 0; t < T; ++t) acc[t][r] += wv * xv[t];
    }
  }
  if constexpr (L >= R && L % R == 0 && (R * T) % L == 0) {
    for (int t0 = 0; t0 < T; t0 += L / R) {          // L / R tokens' R rows per reduction
      vf v[L];
      for (int j = 0; j < L; ++j) v[bitrev(j)] = acc[t0 + j / R][j % R];
      float s[L];
      const vf sums = fold_levels<L / 2>(v);
      std::memcpy(s, &sums, sizeof sums);
      for (int j = 0; j < L; ++j) {
        const int t = t0 + j / R, r = j % R;
        for (int64_t kk = k; kk < K; ++kk) s[j] += x[t * ldx + kk] * w[r * ldw + kk];
        y[t * ldy + r] = s[j];
      }
    }
  } else {
    for (int t = 0; t < T; ++t)
      for (int r = 0; r < R; ++r) {
        float s = hsum(acc[t][r]);
        for (int64_t kk = k; kk < K; ++kk) s += x[t * ldx + kk] * w[r * ldw + kk];
        y[t * ldy + r] = s;
      }
  }
}

// y[t * ldy] = x[t, :] . w[:] for one row w and T (1 or 2) tokens: U independent accumulators per
// token so the FMA latency is hidden, the row read once, front to back
template <int T>
static inline void dot_row(const float* x, int64_t ldx, const float* w, int64_t K, float* y, int64_t ldy) {
  constexpr int U = 4;
  vf acc[T][U];
  for (int t = 0; t < T; ++t)
    for (int u = 0; u < U; ++u) acc[t][u] = vf{};
  int64_t k = 0;
  for (; k + U * L <= K; k += U * L)
    for (int u = 0; u < U; ++u) {
      const vf wv = vload(w + k + u * L);
      for (int t = 0; t < T; ++t) acc[t][u] += wv * vload(x + t * ldx + k + u * L);
    }
  for (; k + L <= K; k += L) {
    const vf wv = vload(w + k);
    for (int t = 0; t < T; ++t) acc[t][0] += wv * vload(x + t * ldx + k);
  }
  for (int t = 0; t < T; ++t) {
    float s = hsum((acc[t][0] + acc[t][1]) + (acc[t][2] + acc[t][3]));
    for (int64_t kk = k; kk < K; ++kk) s += x[t * ldx + kk] * w[kk];
    y[t * ldy] = s;
  }
}

// Tokens per dot-product block: 4 rows x TOKENS accumulators fill the vector registers (32 with
// AVX-512, 16 below it) with room for the rows' and the tokens' loads.
constexpr int TOKENS = VBYTES == 64 ? 4 : 2;

// y[t, n] = x[t, :] . w[n, :] for rows n in [n0, n1), every token t < T (row-major weight rows);
// `after` (row stride ld_after, or null): the rows the caller reads next, prefetched with the last
// block.
// One or two tokens (decoding, memory bound): row after row, so consecutive rows are one
// sequential stream through memory, which the hardware prefetchers follow best. More tokens
// (compute bound): 4 rows at a time, the tokens TOKENS at a time, so a row block is read from
// memory once and from L1 / L2 once per token block, each weight load serving several tokens.
static void dot_rows(const float* x, int64_t T, int64_t ldx, const float* w, int64_t ldw, int64_t K,
                     float* y, int64_t ldy, int64_t n0, int64_t n1, const float* after, int64_t ld_after) {
  if (T <= 0) return;
  if (T <= 2) {
    for (int64_t n = n0; n < n1; ++n) {
      if (T == 2)
        dot_row<2>(x, ldx, w + n * ldw, K, y + n, ldy);
      else
        dot_row<1>(x, ldx, w + n * ldw, K, y + n, ldy);
    }
    return;
  }
  // Each token block also prefetches its share of the next row block (one share per token
  // block, in turn): the next block's weights arrive from memory while this block computes,
  // rather than in a stall at the start of the next one (the hardware prefetchers run ahead only
  // of the stream being read, and every token block after the first reads from cache).
  const int64_t rest = T % TOKENS;        // tokens after the full blocks: one pass if 3, else by 2 and 1
  const int64_t blocks_t = T / TOKENS + (TOKENS > 3 && rest == 3 ? 1 : rest / 2 + rest % 2);
  const int64_t share = (4 + blocks_t - 1) / blocks_t;
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    const float* wn = w + n * ldw;
    int64_t next = std::min<int64_t>(4, std::max<int64_t>(n1 - n - 4, 0)), ldpf = ldw;
    const float* pf = wn + 4 * ldw;
    if (next == 0 && after != nullptr) pf = after, ldpf = ld_after, next = 4;
    int64_t t = 0, b = 0;
    auto pf_rows = [&](int64_t blk) { return std::max<int64_t>(0, std::min(next, (blk + 1) * share) - blk * share); };
    auto pf_from = [&](int64_t blk) { return pf + blk * share * ldpf; };
    for (; t + TOKENS <= T; t += TOKENS, ++b)
      dot_block<4, TOKENS>(x + t * ldx, ldx, wn, ldw, K, y + t * ldy + n, ldy, pf_from(b), pf_rows(b), ldpf);
    if (TOKENS > 3 && T - t == 3) {                  // three last tokens in one pass over the rows
      dot_block<4, 3>(x + t * ldx, ldx, wn, ldw, K, y + t * ldy + n, ldy, pf_from(b), pf_rows(b), ldpf);
      t = T;
    }
    for (; t + 2 <= T; t += 2, ++b)
      dot_block<4, 2>(x + t * ldx, ldx, wn, ldw, K, y + t * ldy + n, ldy, pf_from(b), pf_rows(b), ldpf);
    if (t < T) dot_block<4, 1>(x + t * ldx, ldx, wn, ldw, K, y + t * ldy + n, ldy, pf_from(b), pf_rows(b), ldpf);
  }
  for (; n < n1; ++n)
    for (int64_t t = 0; t < T; ++t) dot_block<1, 1>(x + t * ldx, ldx, w + n * ldw, ldw, K, y + t * ldy + n, ldy);
}

// y[t, m] = sum_f h[t, f] wt[f, m] for m < M, every token t < T: the weight stored transposed
// ([F, M] rows), read row by row; y is overwritten (zeroed, then accumulated in place), so it
// may start as any scratch memory.
static void axpy_rows(const float* h, int64_t T, int64_t ldh, const float* wt, int64_t ldw, int64_t F,
                      float* y, int64_t ldy, int64_t M) {
  for (int64_t t = 0; t < T; ++t) std::memset(y + t * ldy, 0, M * sizeof(float));
  for (int64_t f = 0; f < F; ++f) {
    const float* wf = wt + f * ldw;
    for (int64_t t = 0; t < T; ++t) {
      const float a = h[t * ldh + f];
      const vf av = vsplat(a);
      float* yt = y + t * ldy;
      int64_t m = 0;
      for (; m + L <= M; m += L) vstore(yt + m, vload(yt + m) + av * vload(wf + m));
      for (; m < M; ++m) yt[m] += a * wf[m];
    }
  }
}

// sum of p[0 .. n): a read-only stream (eight independent accumulators), the DRAM read
// bandwidth probe
static double read_sum(const float* p, int64_t n) {
  vf acc[8] = {};
  int64_t i = 0;
  for (; i + 8 * L <= n; i += 8 * L)
    for (int j = 0; j < 8; ++j) acc[j] += vload(p + i + j * L);
  double s = 0.0;
  for (int j = 0; j < 8; ++j) s += hsum(acc[j]);
  for (; i < n; ++i) s += p[i];
  return s;
}
