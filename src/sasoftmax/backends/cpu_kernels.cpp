// C++ kernels of the cpu backend (see cpu.py), behind a plain C ABI loaded with ctypes: no torch headers, so
// it builds in seconds.
//
// Two kinds of entry. Row kernels (sa_forward_*, sa_backward_*) do the elementwise work of one tile of logits
// (rows × keys, row-major) whose GEMMs cpu.py runs in PyTorch: two passes over each row in the forward, one in
// the backward, OpenMP across rows; calls with a bias function or a bias that needs a gradient take this path.
// Fused entries (sa_fused_forward_*, sa_fused_backward_*) run any other call whole in one parallel region: each
// thread takes a work item (a block of query rows of the query heads of a kv head; in the backward a kv head's
// blocks, or a chunk of them), calls the BLAS gemm that torch itself uses (or, in float32 on AVX-512 CPUs whose
// BLAS runs slower code there, its own: see own::gemm) on its own cache-sized block, and runs the same row loops
// in between. This is how SDPA's CPU kernel works, and it removes a Python round trip and a
// parallel region per tile.
// Every row is reduced in a fixed order and every item writes its own memory, so results are deterministic.
// The fused entries also evaluate a relative positional bias (ALiBi, Kerple, a table per distance; relative_bias.py)
// from its per-head parameters, through per-head tables over the distance, and reduce its parameters' gradients per
// head (a table's per head and offset j − i).
//
// Conventions shared with cpu.py:
//   raw[i, j] <= masked_threshold marks a masked entry (mask, bias −inf); keys j >= limit[i] are masked (causal).
//   NaN is never masked: a NaN logit (from q, k, a bias or SSMax's s) makes its row's output and gradients NaN,
//   as in eager PyTorch. Every test of a logit is written so that NaN takes the allowed branch, and the library
//   is built without -ffinite-math-only (cpu_native.py), which would let the compiler drop such tests.
//   z = zmul · raw are the logits before SSMax, x = t[i] · z the final logits, each product rounded on its own as
//   eager rounds them: (t·zmul)·raw would round t·zmul once per row, an error shared by the row's logits, and such
//   errors do not average out in o or in the gradients (with SSMax, float32: up to 2.4× eager's error in o).
//   mode: 0 softmax, 1 sa, 2 sa_norm.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

template <typename T>
constexpr T masked_threshold() { return T(-1e29); }

template <typename T>
constexpr T sentinel() { return T(-1e30); }

// Whether a logit (or raw q·k) takes part in its row: not masked. True for NaN.
template <typename T>
inline bool unmasked(T r) { return !(r <= masked_threshold<T>()); }


// exp(a) for −80 <= a <= 88 (the loops pass a <= 0), inlined so that the loops vectorise without a call
// of glibc's vector expf per vector (this made them ~20% faster): a = n·ln2 + r with |r| <= ln2/2, e^r by
// its Taylor polynomial to degree 7 (measured relative error < 8e-8 on [−80, 0], under an ulp), 2^n put into the
// exponent bits.
inline float exp_nonpositive(float a) {
  const float n = std::nearbyint(a * 1.44269504088896341f);
  const float r = (a - n * 0.693145751953125f) - n * 1.428606765330187e-06f;  // ln2 split: exact n·hi
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  // −116 <= n <= 127: a normal number. A NaN a gives NaN r and p; its n is replaced (NaN has no int value).
  const int32_t bits = (static_cast<int32_t>(n > -126.0f ? n : -126.0f) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// The same for float64, to degree 13 (the polynomial's error < 1e-17 on |r| <= ln2/2; measured < 2.3e-16 relative
// on [−80, 0]): glibc's vector exp is declared to the compiler only under -ffast-math, and scalar calls of exp
// ran the loops 3x slower.
inline double exp_nonpositive(double a) {
  const double n = std::nearbyint(a * 1.4426950408889634);
  const double r = (a - n * 6.93147180369123816490e-01) - n * 1.90821492927058770002e-10;  // ln2 = hi + lo
  double p = 1.0 / 6227020800.0;
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  const int64_t bits = (static_cast<int64_t>(n > -1022.0 ? n : -1022.0) + 1023) << 52;
  double scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// exp(a) for a <= 0, and 0 where the logit v is the sentinel; NaN for NaN a or v. The argument is clamped at
// −80 (e^−80 is negligible against the row's largest term, 1), which keeps 2^n of exp_nonpositive a normal
// number.
template <typename T>
inline T safe_exp(T a, T v) {
  const T e = exp_nonpositive(a < T(-80) ? T(-80) : a);
  return unmasked(v) ? e : T(0);
}

// The first j with x[j] == value (value occurs in x): a vectorised test per chunk, then a scalar scan.
template <typename T>
int64_t find(const T* x, int64_t n, T value) {
  constexpr int64_t kChunk = 64;
  for (int64_t j0 = 0; j0 < n; j0 += kChunk) {
    const int64_t end = j0 + kChunk < n ? j0 + kChunk : n;
    int hit = 0;
#pragma omp simd reduction(| : hit)
    for (int64_t j = j0; j < end; ++j) hit |= x[j] == value;
    if (hit) {
      for (int64_t j = j0; j < end; ++j) {
        if (x[j] == value) return j;
      }
    }
  }
  return -1;
}

// Per-row statistics of the forward, saved for the backward; one slot per row of the call.
template <typename T>
struct RowStats {
  T* lse;        // logsumexp of the row (0 for an empty row), rounded to T
  T* low;        // m = min(0, min x)
  T* inv;        // c = 1/(M − m + eps)
  T* lse_lo;     // what lse's rounding lost (computed in double): the backward's p = e^{(x − lse) − lse_lo}. A rounded
                 // logsumexp alone (at its magnitude, ~5–20 with SSMax) moves every p of the row alike, and such
                 // errors add up in dv, dk and ds instead of averaging out (float32: up to 3× eager's error in dv)
  int64_t* amin; // where sa_norm's min term goes (−1: none)
  int64_t* amax; // where its max term goes (−1: none)
};

// Forward of one row of `keys` logits, in place: raw -> unnormalised weights u (e = exp(x − μ); u = e,
// x·e or (x − m)·e); stores the row's statistics at slot i and returns fac (o = fac · u v).
template <typename T, int mode>
T forward_row(T* x, int64_t keys, int64_t lim, T ti, T zmul, T eps, const RowStats<T>& st, int64_t i) {
  // A NaN logit never wins these comparisons; it reaches the row sum below, which makes the row NaN.
  T mu = sentinel<T>(), m = T(0);
  if (mode != 2) {
#pragma omp simd reduction(max : mu)
    for (int64_t j = 0; j < keys; ++j) {
      const T r = x[j];
      const T v = (j < lim && unmasked(r)) ? ti * (zmul * r) : sentinel<T>();
      x[j] = v;
      mu = v > mu ? v : mu;
    }
  } else {
#pragma omp simd reduction(max : mu) reduction(min : m)
    for (int64_t j = 0; j < keys; ++j) {
      const T r = x[j];
      const bool ok = j < lim && unmasked(r);
      const T v = ok ? ti * (zmul * r) : sentinel<T>();
      x[j] = v;
      mu = v > mu ? v : mu;
      // Masked entries as 0 (sentinel · 0 = −0) leave m = min(0, min x) unchanged. A product, not ok ? v : 0:
      // without -ffinite-math-only gcc vectorised that select and the min ~40% slower.
      const T w = v * T(ok);
      m = w < m ? w : m;
    }
  }
  // Where sa_norm's max/min terms go (first key on ties), if there are such terms.
  const int64_t mu_at = (mode == 2 && mu > T(0)) ? find(x, keys, mu) : -1;
  const int64_t m_at = (mode == 2 && m < T(0)) ? find(x, keys, m) : -1;
  const bool empty = !(mu > masked_threshold<T>());
  const T shift = empty ? T(0) : mu;  // an empty row: exp(sentinel) = 0 everywhere
  const T top = mu > T(0) ? mu : T(0);
  const T c = T(1) / (top - m + eps);
  T total = 0;
#pragma omp simd reduction(+ : total)
  for (int64_t j = 0; j < keys; ++j) {
    const T v = x[j];
    const T e = safe_exp(v - shift, v);
    total += e;
    x[j] = mode == 0 ? e : (mode == 1 ? v * e : (v - m) * e);  // masked: finite · 0 = 0
  }
  const bool any = total != T(0);  // NaN (a NaN logit in the row) makes the row NaN
  const double lse = any ? double(shift) + std::log(double(total)) : 0.0;
  st.lse[i] = T(lse);
  st.lse_lo[i] = T(lse - double(T(lse)));
  st.low[i] = m;
  st.inv[i] = c;
  st.amax[i] = mu_at;
  st.amin[i] = m_at;
  return any ? (mode == 2 ? c : T(1)) / total : T(0);
}

// Backward of one row (DESIGN §2): x (raw logits) -> u (the weights that multiply dO in dv; (x − m)p for
// sa_norm, whose dO was scaled by c), g (dO·vᵀ, c-scaled for sa_norm) -> dL/dz = t · dL/dx in place, with
// the min/max terms of sa_norm added at argmin/argmax. Returns Σ_j dL/dx_j · z_j (for SSMax's s). `p` is scratch
// for the row's probabilities (keys entries).
//
// D = Σ_j w_j dW_j is taken from this row's own weights (a first pass), as autograd through eager's ops takes
// it, not as dO·o from the forward's output: o carries the rounding of the forward's 1/ℓ, which scales the whole
// row alike, and D's error then enters every dL/dx_j as −ΔD·p_j, which Σ_j dL/dx_j·z_j (SSMax's ds) sums
// coherently (float32: 2–3× eager's error in ds before).
template <typename T, int mode>
T backward_row(T* x, T* g, T* p, int64_t keys, int64_t lim, T ti, T zmul, const RowStats<T>& st, int64_t i) {
  const T l = st.lse[i], l_lo = st.lse_lo[i], m = st.low[i];
  const int64_t at_max = st.amax[i], at_min = st.amin[i];
  const T z_max = at_max >= 0 ? zmul * x[at_max] : T(0);
  const T z_min = at_min >= 0 ? zmul * x[at_min] : T(0);
  T e_sum = 0, d = 0, zsum = 0;
#pragma omp simd reduction(+ : e_sum, d)
  for (int64_t j = 0; j < keys; ++j) {
    const T r = x[j];
    const bool ok = j < lim && unmasked(r);
    const T v = ok ? ti * (zmul * r) : sentinel<T>();
    const T pj = safe_exp((v - l) - l_lo, v);
    const T u = mode == 0 ? pj : (mode == 1 ? v * pj : (v - m) * pj);
    e_sum += pj * g[j];
    d += u * g[j];
    p[j] = pj;
  }
#pragma omp simd reduction(+ : zsum)
  for (int64_t j = 0; j < keys; ++j) {
    const T r = x[j];
    const bool ok = j < lim && unmasked(r);
    const T z = ok ? zmul * r : T(0);
    const T v = ok ? ti * z : T(0);
    const T pj = p[j];
    const T u = mode == 0 ? pj : (mode == 1 ? v * pj : (v - m) * pj);
    const T gw = g[j];
    const T dx = mode == 0 ? pj * (gw - d) : gw * (pj + u) - d * pj;
    zsum += dx * z;
    x[j] = u;
    g[j] = dx * ti;
  }
  if (mode == 2) {
    const T c = st.inv[i];
    if (at_max >= 0) {
      const T gm = -d * c;
      g[at_max] += gm * ti;
      zsum += gm * z_max;
    }
    if (at_min >= 0) {
      const T gm = d * c - e_sum;  // (D − E)·c, with e_sum = c·E from the c-scaled dw
      g[at_min] += gm * ti;
      zsum += gm * z_min;
    }
  }
  return zsum;
}

// One tile of rows (the tiled path of cpu.py): rows are independent, OpenMP splits them across threads.
template <typename T, int mode>
void forward_tile(T* raw, int64_t rows, int64_t keys, const int64_t* limit, const T* t, T zmul, T eps,
                  RowStats<T> st, T* fac, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t i = 0; i < rows; ++i)
    fac[i] = forward_row<T, mode>(raw + i * keys, keys, limit[i], t[i], zmul, eps, st, i);
}

template <typename T, int mode>
void backward_tile(T* raw, T* dw, int64_t rows, int64_t keys, const int64_t* limit, const T* t, T zmul,
                   RowStats<T> st, T* dsz, int threads) {
#pragma omp parallel num_threads(threads)
  {
    std::vector<T> p(keys);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < rows; ++i) {
      const T zsum = backward_row<T, mode>(raw + i * keys, dw + i * keys, p.data(), keys, limit[i], t[i], zmul, st, i);
      if (dsz != nullptr) dsz[i] = zsum;
    }
  }
}

// ---- The whole call in one parallel region: GEMMs by the BLAS that torch uses. ----

// Fortran BLAS ?gemm (column-major), e.g. MKL's sgemm_/dgemm_ inside libtorch_cpu; cpu_native.py finds it.
template <typename T>
using Blas = void (*)(const char*, const char*, const int*, const int*, const int*, const T*, const T*, const int*,
                      const T*, const int*, const T*, T*, const int*);

// Row-major C (m×n) = alpha·op(A)·op(B) + beta·C, leading dimensions = row strides. Column-major BLAS sees
// the transposes, so it computes Cᵀ = op(B)ᵀ·op(A)ᵀ. Called inside a parallel region, the BLAS runs on the
// calling thread alone.
template <typename T>
void gemm(Blas<T> blas, bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
          const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  const char opa = ta ? 'T' : 'N', opb = tb ? 'T' : 'N';
  // BLAS wants leading dimensions >= 1 even for empty matrices (head dimension 0).
  const int mi = int(m), ni = int(n), ki = int(k);
  const int la = int(std::max<int64_t>(lda, 1)), lb = int(std::max<int64_t>(ldb, 1));
  const int lc = int(std::max<int64_t>(ldc, 1));
  blas(&opb, &opa, &ni, &mi, &ki, &alpha, b, &lb, a, &la, &beta, c, &lc);
}

// Own float32 GEMM for AVX-512 CPUs whose BLAS does not use AVX-512: torch's MKL caps CPUs that are not Intel's
// at AVX2 (on an AMD EPYC with AVX-512 its sgemm ran these shapes at ~105 GFLOP/s on one core, this code at
// 195–245). cpu_native.py chooses it per call (Call::own_gemm), for float32 only.
// A register tile of kRows rows × kVecs 16-float vectors of C accumulates over a run of kDepth steps of k, one
// broadcast element of A and kVecs vectors of B per step; B is row-major (contiguous along n), A may have any
// strides (a transposed A costs nothing), so a transposed B is transposed by the caller once per head (see
// Transposed). Tiles at the edges have fewer rows (a template per count) and a masked last vector. Plain FMAs in
// a fixed order: NaN and ±inf propagate as in any GEMM, and the result does not depend on the thread.
#if defined(__AVX512F__)
#define SA_OWN_GEMM 1
namespace own {
constexpr int kRows = 6, kVecs = 4, kCols = 16 * kVecs;
constexpr int64_t kDepth = 256;  // B's run of kDepth × kCols floats (64 KiB) stays in L2/L1 across a row of tiles

template <int R, int V>
void tile(int64_t k, const float* a, int64_t ras, int64_t cas, const float* b, int64_t ldb, float* c, int64_t ldc,
          float alpha, bool add, __mmask16 last) {
  __m512 acc[R][V];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t kk = 0; kk < k; ++kk) {
    const float* brow = b + kk * ldb;
    __m512 bv[V];
#pragma GCC unroll 4
    for (int v = 0; v < V - 1; ++v) bv[v] = _mm512_loadu_ps(brow + 16 * v);
    bv[V - 1] = _mm512_maskz_loadu_ps(last, brow + 16 * (V - 1));
    const float* acol = a + kk * cas;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 av = _mm512_set1_ps(acol[r * ras]);
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_fmadd_ps(av, bv[v], acc[r][v]);
    }
  }
  const __m512 al = _mm512_set1_ps(alpha);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      const __mmask16 m = v == V - 1 ? last : __mmask16(0xFFFF);
      float* p = c + r * ldc + 16 * v;
      const __m512 x =
          add ? _mm512_fmadd_ps(al, acc[r][v], _mm512_maskz_loadu_ps(m, p)) : _mm512_mul_ps(al, acc[r][v]);
      _mm512_mask_storeu_ps(p, m, x);
    }
}

using Tile = void (*)(int64_t, const float*, int64_t, int64_t, const float*, int64_t, float*, int64_t, float, bool,
                      __mmask16);
template <int... R>
constexpr Tile kTiles[kRows][kVecs] = {{&tile<R, 1>, &tile<R, 2>, &tile<R, 3>, &tile<R, 4>}...};

// Row-major C (m×n, ldc) = alpha·A·B, plus C where `add`; A's (i, kk) at a[i·ras + kk·cas]; B row-major (k×n,
// ldb).
inline void gemm(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t ras, int64_t cas,
                 const float* b, int64_t ldb, bool add, float* c, int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {
    if (!add)
      for (int64_t i = 0; i < m; ++i) std::fill(c + i * ldc, c + i * ldc + n, 0.0f);
    return;
  }
  for (int64_t k0 = 0; k0 < k; k0 += kDepth) {
    const int64_t kc = std::min(kDepth, k - k0);
    for (int64_t j0 = 0; j0 < n; j0 += kCols) {
      const int64_t nc = std::min<int64_t>(kCols, n - j0);
      const int vecs = int((nc + 15) / 16), rest = int(nc % 16);
      const __mmask16 last = rest ? __mmask16((1u << rest) - 1) : __mmask16(0xFFFF);
      for (int64_t i0 = 0; i0 < m; i0 += kRows) {
        const int rows = int(std::min<int64_t>(kRows, m - i0));
        kTiles<1, 2, 3, 4, 5, 6>[rows - 1][vecs - 1](kc, a + i0 * ras + k0 * cas, ras, cas, b + k0 * ldb + j0, ldb,
                                                     c + i0 * ldc + j0, ldc, alpha, add || k0 > 0, last);
      }
    }
  }
}
}  // namespace own
#endif

// Row-major C (m×n) = alpha·op(A)·op(B) + beta·C (beta 0 or 1) through the BLAS, or the own kernels where `own`
// (float32 only): they take op(B) row-major, so a transposed B comes pre-transposed (tb false) there.
template <typename T>
void mul(Blas<T> blas, bool own, bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
         int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
#ifdef SA_OWN_GEMM
  if constexpr (std::is_same_v<T, float>) {
    if (own) {
      own::gemm(m, n, k, alpha, a, ta ? 1 : lda, ta ? lda : 1, b, ldb, beta != 0.0f, c, ldc);
      return;
    }
  }
#else
  (void)own;  // built without AVX-512: sa_own_gemm_f32() says so, and cpu_native.py never asks for it
#endif
  gemm<T>(blas, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// x (rows × cols, row-major) -> y (cols × rows, row stride ldy): k and v of a head for the own GEMM, whose B is
// row-major.
template <typename T>
void transpose(const T* x, int64_t rows, int64_t cols, T* y, int64_t ldy) {
  constexpr int64_t kBlock = 16;
  for (int64_t i0 = 0; i0 < rows; i0 += kBlock) {
    const int64_t i1 = std::min(rows, i0 + kBlock);
    for (int64_t j = 0; j < cols; ++j)
      for (int64_t i = i0; i < i1; ++i) y[j * ldy + i] = x[i * cols + j];
  }
}

// Row stride of a transposed copy of S rows: S plus 16 floats, so that its rows are not a multiple of 4 KiB
// apart. With S a multiple of 1024 they were, so the GEMM's run of B rows all fell into the same few L1 sets and
// missed L1: z = q kᵀ at S = 2048 (8192) ran at 210 (199) GFLOP/s with rows S apart, 246 (240) with S + 16.
inline int64_t transposed_stride(int64_t s) { return s + 16; }

// A thread's transposed copy (cols × S, row stride transposed_stride(S)) of a head's k or v (S × cols) for the
// own GEMM, kept while the thread's work items stay on that head (its query blocks); null with the BLAS, which
// transposes itself.
template <typename T>
struct Transposed {
  std::vector<T> data_;
  const T* of = nullptr;
  const T* get(bool own, const T* x, int64_t rows, int64_t cols) {
    if (!own) return nullptr;
    if (of != x) {
      data_.resize(cols * transposed_stride(rows));
      transpose(x, rows, cols, data_.data(), transposed_stride(rows));
      of = x;
    }
    return data_.data();
  }
};

// Shapes and options of a call: q (B, Hq, L, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv), all contiguous; a bool
// mask and an additive bias (no gradient), each broadcastable to (B, Hq, L, S) and given by element strides
// (strides[0:4] the mask's, strides[4:8] the bias's; 0 = broadcast), or null; ssmax (Hq) or null.
template <typename T>
struct Call {
  int64_t b, hq, hkv, l, s, d, dv, causal;
  int64_t rows;      // queries per head in a block
  int64_t chunks;    // backward: chunks of a work item's query blocks (see fused_backward)
  int64_t together;  // query heads of one kv head that a work item takes together (divides Hq/Hkv)
  int64_t own_gemm;  // 1: the own float32 GEMM (see mul), 0: the BLAS
  const T *q, *k, *v;
  const uint8_t* mask;
  const T* bias;
  const int64_t* strides;
  const T* ssmax;
  T scale, eps;
  Blas<T> blas;
  int threads;
  // A relative bias f_h(|i − j|) (see Relative below), or null tables: rel_bias[h·rel_width + j − pos_i + S − 1]
  // is f_h/scale for query position pos_i (= i + S − L) and key j; rel_d1, rel_d2 the same layout of ∂f/∂r1,
  // ∂f/∂r2 (backward). rel_masks: some entry is −inf (an overflow, a table's entry), so logits must be checked for
  // masking. rel_table: the bias is a table per distance, whose backward sums dL/dz per offset instead.
  const T *rel_bias = nullptr, *rel_d1 = nullptr, *rel_d2 = nullptr;
  int64_t rel_width = 0;
  bool rel_masks = false, rel_table = false;

  int64_t offset() const { return s - l; }  // causal: query i sees keys j <= i + S − L
  // Keys that a block of queries [r0, r1) may see: a prefix of this length.
  int64_t block_keys(int64_t r1) const {
    if (!causal) return s;
    const int64_t n = r1 - 1 + offset() + 1;
    return n < 0 ? 0 : (n > s ? s : n);
  }
  // Row r of query head h: its slot in the per-row arrays; its q row.
  int64_t slot(int64_t bi, int64_t h, int64_t r) const { return (bi * hq + h) * l + r; }
  const T* qrow(int64_t bi, int64_t h, int64_t r) const { return q + slot(bi, h, r) * d; }
  const T* khead(int64_t bi, int64_t h) const { return k + (bi * hkv + h / (hq / hkv)) * s * d; }
  const T* vhead(int64_t bi, int64_t h) const { return v + (bi * hkv + h / (hq / hkv)) * s * dv; }
  bool own() const { return own_gemm != 0; }
  // Where key 0 of query row i of head h is in a relative-bias table (key j at [j]).
  const T* rel_row(const T* table, int64_t h, int64_t i) const {
    return table + h * rel_width + (s - 1) - (i + offset());
  }
};

// A relative positional bias f_h(d) of the distance d = |pos_i − j| (relative_bias.py), by kind: 1 ALiBi
// −r1·d; 2 Kerple log −r1·ln(1 + r2·d); 3 Kerple power −r1·d^r2 (0 at d = 0); 4 a table, r1 (Hq, n) row-major,
// f_h(d) = r1[h, min(d, n − 1)]. f depends on j − pos_i alone, so it is tabulated once per call and head over the
// L + S − 1 offsets a call has (evaluated in double): a row's entries are then one contiguous run of its head's
// table, added by a vectorised pass. `bias` holds f/scale (it is added to the raw logits q·k, which the row loops
// multiply by scale); with `grads`, `d1` and `d2` hold ∂f/∂r1 and ∂f/∂r2 (d2 stays empty for ALiBi), which the
// backward reduces against dL/dz per row. A table needs neither: ∂f(d)/∂r1[h, e] is 1 where min(d, n − 1) = e,
// so its backward sums dL/dz per offset (fused_backward) and cpu_native.py folds offsets into table entries.
template <typename T>
struct Relative {
  static constexpr int kTable = 4;
  std::vector<T> bias, d1, d2;
  int64_t width = 0;
  bool masks = false;  // some entry is −inf (d^r2 overflowed, a table's): logits must be checked for masked entries
  bool table = false;

  // n: the table's width (kind 4; ignored otherwise).
  Relative(int kind, const T* r1, const T* r2, int64_t n, int64_t hq, int64_t l, int64_t s, T scale, bool grads) {
    if (kind == 0) return;
    width = l + s - 1;
    table = kind == kTable;
    bias.resize(hq * width);
    if (grads && !table) d1.resize(hq * width);
    if (grads && kind != 1 && !table) d2.resize(hq * width);
    const int64_t far = l > s ? l : s;  // distances 0 .. far − 1 occur
    std::vector<double> f(far), g1(far), g2(far);
    for (int64_t h = 0; h < hq; ++h) {
      const double a = table ? 0.0 : double(r1[h]), b = kind != 1 && !table ? double(r2[h]) : 0.0;
      for (int64_t d = 0; d < far; ++d) {
        const double x = double(d);
        if (table) {
          f[d] = double(r1[h * n + (d < n - 1 ? d : n - 1)]);
        } else if (kind == 1) {
          f[d] = -a * x;
          g1[d] = -x;
        } else if (kind == 2) {
          const double lg = std::log1p(b * x);
          f[d] = -a * lg;
          g1[d] = -lg;
          g2[d] = -a * x / (1.0 + b * x);
        } else {
          const double lg = d > 0 ? std::log(x) : 0.0, pw = d > 0 ? std::exp(b * lg) : 0.0;
          f[d] = -a * pw;
          g1[d] = -pw;
          g2[d] = -a * pw * lg;
        }
      }
      for (int64_t e = 0; e < width; ++e) {
        const int64_t off = e - (s - 1), d = off < 0 ? -off : off;
        const T entry = T(f[d] / double(scale));
        bias[h * width + e] = entry;
        masks = masks || entry <= masked_threshold<T>();
        if (!d1.empty()) d1[h * width + e] = T(g1[d]);
        if (!d2.empty()) d2[h * width + e] = T(g2[d]);
      }
    }
  }

  template <typename C>
  void attach(C& c) const {
    c.rel_bias = bias.empty() ? nullptr : bias.data();
    c.rel_d1 = d1.empty() ? nullptr : d1.data();
    c.rel_d2 = d2.empty() ? nullptr : d2.data();
    c.rel_width = width;
    c.rel_masks = masks;
    c.rel_table = table;
  }
};

// The logits of queries [r0, r1) of `heads` query heads from h0 (which share a kv head), stacked head after head
// (row g·n + i), against their first `keys` keys into `z`, masked entries set to the sentinel; per row the causal
// limit and SSMax's t (t = s_h·ln n, n the allowed keys). The heads' rows are gathered into `qbuf` unless they
// are one run in q already; returns where the stacked rows are. `kt`: the kv head's k transposed, (D, S) with row
// stride transposed_stride(S), for the own GEMM (null with the BLAS).
template <typename T>
const T* block_logits(const Call<T>& c, int64_t bi, int64_t h0, int64_t heads, int64_t r0, int64_t r1, int64_t keys,
                      const T* kt, T* qbuf, T* z, int64_t* limit, T* t, T* log_n) {
  const int64_t n = r1 - r0;
  const T* a = c.qrow(bi, h0, r0);
  if (heads > 1 && n != c.l) {
    for (int64_t g = 0; g < heads; ++g) std::memcpy(qbuf + g * n * c.d, c.qrow(bi, h0 + g, r0), n * c.d * sizeof(T));
    a = qbuf;
  }
  if (c.own())
    mul<T>(c.blas, true, false, false, heads * n, keys, c.d, T(1), a, c.d, kt, transposed_stride(c.s), T(0), z,
           keys);
  else
    mul<T>(c.blas, false, false, true, heads * n, keys, c.d, T(1), a, c.d, c.khead(bi, h0), c.d, T(0), z, keys);
  for (int64_t row = 0; row < heads * n; ++row) {
    const int64_t h = h0 + row / n, i = r0 + row % n;
    int64_t lim = keys;
    if (c.causal) {
      const int64_t e = i + c.offset() + 1;
      lim = e < 0 ? 0 : (e > keys ? keys : e);
    }
    T* x = z + row * keys;
    if (c.bias != nullptr) {  // z = scale·(raw + bias/scale); −inf stays −inf, which the row loops read as masked
      const T* brow = c.bias + bi * c.strides[4] + h * c.strides[5] + i * c.strides[6];
      const int64_t bs = c.strides[7];
      const T inv_scale = T(1) / c.scale;
      for (int64_t j = 0; j < lim; ++j) x[j] += brow[j * bs] * inv_scale;
    }
    if (c.rel_bias != nullptr) {  // the same with f_h/scale read from the head's table: entry j at base[j]
      const T* base = c.rel_row(c.rel_bias, h, i);
#pragma omp simd
      for (int64_t j = 0; j < lim; ++j) x[j] += base[j];
    }
    int64_t allowed = lim;
    // Set masked entries to the sentinel; count the allowed ones.
    if (c.mask != nullptr || c.bias != nullptr || c.rel_masks) {
      const uint8_t* mrow = c.mask + bi * c.strides[0] + h * c.strides[1] + i * c.strides[2];
      const int64_t ms = c.strides[3];
      allowed = 0;
      for (int64_t j = 0; j < lim; ++j) {
        const bool ok = (c.mask == nullptr || mrow[j * ms] != 0) && unmasked(x[j]);
        allowed += ok;
        x[j] = ok ? x[j] : sentinel<T>();
      }
    }
    limit[row] = lim;
    log_n[row] = std::log(T(allowed > 1 ? allowed : 1));
    t[row] = c.ssmax != nullptr ? c.ssmax[h] * log_n[row] : T(1);
  }
  return a;
}

// Forward: out (B, Hq, L, Dv) and the row statistics (slot (bi·Hq + h)·L + row). Work items are (`together` query
// heads of one kv head, query block), largest (latest causal) blocks first: the heads of a group share one pass
// over k and v, which is what decoding (few rows) is bound by. Each item writes its own rows, so the result does
// not depend on the schedule.
template <typename T, int mode>
void fused_forward(const Call<T>& c, T* out, RowStats<T> st) {
  const int64_t g = c.together, groups = c.hq / g, blocks = (c.l + c.rows - 1) / c.rows;
  const int64_t items = c.b * groups * blocks, stack = g * c.rows;  // stack: rows of a block, all its heads
#pragma omp parallel num_threads(c.threads)
  {
    std::vector<T> z(stack * c.s), qbuf(stack * c.d), obuf(stack * c.dv), t(stack), log_n(stack);
    std::vector<int64_t> limit(stack);
    Transposed<T> kt;  // kept across the blocks of a kv head that this thread takes one after the other
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t blk = blocks - 1 - item % blocks, bi = item / blocks / groups, h0 = item / blocks % groups * g;
      const int64_t r0 = blk * c.rows, r1 = r0 + c.rows < c.l ? r0 + c.rows : c.l, n = r1 - r0;
      const int64_t keys = c.block_keys(r1);
      if (keys == 0) continue;  // every row empty: out and the statistics stay 0 (arg −1)
      block_logits(c, bi, h0, g, r0, r1, keys, kt.get(c.own(), c.khead(bi, h0), c.s, c.d), qbuf.data(), z.data(),
                   limit.data(), t.data(), log_n.data());
      T* fac = log_n.data();  // reused: log n is not needed any more
      for (int64_t row = 0; row < g * n; ++row) {
        const int64_t at = c.slot(bi, h0 + row / n, r0 + row % n);
        fac[row] = forward_row<T, mode>(z.data() + row * keys, keys, limit[row], t[row], c.scale, c.eps, st, at);
      }
      mul<T>(c.blas, c.own(), false, false, g * n, c.dv, keys, T(1), z.data(), keys, c.vhead(bi, h0), c.dv, T(0),
             obuf.data(), c.dv);
      for (int64_t row = 0; row < g * n; ++row) {
        T* o = out + c.slot(bi, h0 + row / n, r0 + row % n) * c.dv;
        for (int64_t j = 0; j < c.dv; ++j) o[j] = obuf[row * c.dv + j] * fac[row];
      }
    }
  }
}

// Block boundaries of `chunks` runs of query blocks with about equal work (keys per block summed): causal blocks
// further down see more keys, so equal counts of blocks would not balance the threads.
template <typename T>
std::vector<int64_t> chunk_bounds(const Call<T>& c, int64_t blocks) {
  std::vector<int64_t> cost(blocks + 1, 0), bounds(c.chunks + 1, blocks);
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t r1 = (blk + 1) * c.rows < c.l ? (blk + 1) * c.rows : c.l;
    cost[blk + 1] = cost[blk] + c.block_keys(r1);
  }
  bounds[0] = 0;
  for (int64_t ch = 1; ch < c.chunks; ++ch) {
    const int64_t target = cost[blocks] * ch / c.chunks;
    bounds[ch] = std::lower_bound(cost.begin(), cost.end(), target) - cost.begin();
  }
  return bounds;
}

// Backward: dq (B, Hq, L, D); partial dk (B, Hq/together, chunks, S, D) and dv (B, Hq/together, chunks, S, Dv),
// one per group of `together` query heads of a kv head and chunk of their query blocks; and ds (B, Hq, chunks) =
// Σ_rows ln n · Σ_j dL/dx·z (null: not wanted); with a relative bias, dr (2, B, Hq, chunks) its parameters'
// gradients, or for a table dr (B, Hq, chunks, L + S − 1) the sums of dL/dz per offset j − pos_i + S − 1
// (null: not wanted). cpu.py sums the partials of a kv head in a fixed order. Work items
// are (group, chunk): the group's heads share each block (stacked rows, one pass over k and v, and dk, dv summed
// over the heads by the GEMMs themselves), and each item accumulates its dk, dv privately (transposed, (D, S):
// that GEMM runs faster), so no two threads write the same memory and the result does not depend on the schedule.
// Adds Σ_j dL/dz_j·∂f/∂r1 and Σ_j dL/dz_j·∂f/∂r2 of one row (dz: dL/dz after backward_row, 0 at masked keys) to
// acc[0], acc[1]: dL/dbias = dL/dz, as z = scale·q·k + bias.
template <typename T>
void relative_grads(const Call<T>& c, const T* dz, int64_t h, int64_t i, int64_t lim, double* acc) {
  const T* a = c.rel_row(c.rel_d1, h, i);
  T s1 = 0, s2 = 0;
  if (c.rel_d2 == nullptr) {
#pragma omp simd reduction(+ : s1)
    for (int64_t j = 0; j < lim; ++j) s1 += dz[j] * a[j];
  } else {
    const T* b = c.rel_row(c.rel_d2, h, i);
#pragma omp simd reduction(+ : s1, s2)
    for (int64_t j = 0; j < lim; ++j) {
      s1 += dz[j] * a[j];
      s2 += dz[j] * b[j];
    }
  }
  acc[0] += s1;
  acc[1] += s2;
}

// A table's share of one row: dL/dz_j (0 at masked keys) added to the entry of its offset, acc[j − pos_i + S − 1]
// (acc: the head's rel_width sums). A row's offsets are one contiguous run, so this is a vectorised add.
template <typename T>
void table_grads(const Call<T>& c, const T* dz, int64_t i, int64_t lim, double* acc) {
  double* a = acc + (c.s - 1) - (i + c.offset());
#pragma omp simd
  for (int64_t j = 0; j < lim; ++j) a[j] += double(dz[j]);
}

template <typename T, int mode>
void fused_backward(const Call<T>& c, const T* dout, RowStats<T> st, T* dq, T* dk, T* dv, T* ds,
                    T* dr) {
  const int64_t g = c.together, groups = c.hq / g, blocks = (c.l + c.rows - 1) / c.rows;
  const int64_t items = c.b * groups * c.chunks, stack = g * c.rows;  // stack: rows of a block, all its heads
  const std::vector<int64_t> bounds = chunk_bounds(c, blocks);
#pragma omp parallel num_threads(c.threads)
  {
    std::vector<T> z(stack * c.s), dw(stack * c.s), dob(stack * c.dv), qbuf(stack * c.d), dqbuf(stack * c.d);
    std::vector<T> dkt(c.d * c.s), dvt(c.dv * c.s), t(stack), log_n(stack), prow(c.s);
    std::vector<double> ds_head(g);  // SSMax's ∂L/∂s of each head: a sum over every row, so in double
    // The relative bias's ∂L/∂r1, ∂L/∂r2 of each head, summed over rows; for a table, ∂L/∂z summed per offset.
    const int64_t per_head = dr == nullptr ? 0 : (c.rel_table ? c.rel_width : 2);
    std::vector<double> dr_head(per_head * g);
    std::vector<int64_t> limit(stack);
    Transposed<T> kt_buf, vt_buf;
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t chunk = item % c.chunks, bi = item / c.chunks / groups, h0 = item / c.chunks % groups * g;
      const T* kt = kt_buf.get(c.own(), c.khead(bi, h0), c.s, c.d);
      const T* vt = vt_buf.get(c.own(), c.vhead(bi, h0), c.s, c.dv);
      std::fill(dkt.begin(), dkt.end(), T(0));
      std::fill(dvt.begin(), dvt.end(), T(0));
      std::fill(ds_head.begin(), ds_head.end(), 0.0);
      std::fill(dr_head.begin(), dr_head.end(), 0.0);
      for (int64_t blk = bounds[chunk]; blk < bounds[chunk + 1]; ++blk) {
        const int64_t r0 = blk * c.rows, r1 = r0 + c.rows < c.l ? r0 + c.rows : c.l, n = r1 - r0;
        const int64_t keys = c.block_keys(r1);
        if (keys == 0) continue;  // dq stays 0
        const T* qs = block_logits(c, bi, h0, g, r0, r1, keys, kt, qbuf.data(), z.data(), limit.data(), t.data(),
                                   log_n.data());
        auto slot = [&](int64_t row) { return c.slot(bi, h0 + row / n, r0 + row % n); };
        // dO' = c·dO for sa_norm: dW' = c·dW, and wᵀdO = ((x − m)p)ᵀ dO'
        for (int64_t row = 0; row < g * n; ++row) {
          const int64_t at = slot(row);
          const T f = mode == 2 ? st.inv[at] : T(1);
          for (int64_t j = 0; j < c.dv; ++j) dob[row * c.dv + j] = f * dout[at * c.dv + j];
        }
        if (c.own())
          mul<T>(c.blas, true, false, false, g * n, keys, c.dv, T(1), dob.data(), c.dv, vt, transposed_stride(c.s),
                 T(0), dw.data(), keys);
        else
          mul<T>(c.blas, false, false, true, g * n, keys, c.dv, T(1), dob.data(), c.dv, c.vhead(bi, h0), c.dv, T(0),
                 dw.data(), keys);
        for (int64_t row = 0; row < g * n; ++row) {
          const T zsum = backward_row<T, mode>(z.data() + row * keys, dw.data() + row * keys, prow.data(), keys,
                                               limit[row], t[row], c.scale, st, slot(row));
          ds_head[row / n] += double(zsum) * double(log_n[row]);
          if (dr != nullptr && c.rel_table)
            table_grads(c, dw.data() + row * keys, r0 + row % n, limit[row], &dr_head[per_head * (row / n)]);
          else if (dr != nullptr)
            relative_grads(c, dw.data() + row * keys, h0 + row / n, r0 + row % n, limit[row], &dr_head[2 * (row / n)]);
        }
        // dvᵀ += dO'ᵀ u;  dq = scale·dz k;  dkᵀ += scale·qᵀ dz (sums over the stacked heads' rows)
        mul<T>(c.blas, c.own(), true, false, c.dv, keys, g * n, T(1), dob.data(), c.dv, z.data(), keys, T(1),
               dvt.data(), c.s);
        mul<T>(c.blas, c.own(), false, false, g * n, c.d, keys, c.scale, dw.data(), keys, c.khead(bi, h0), c.d,
               T(0), dqbuf.data(), c.d);
        for (int64_t row = 0; row < g * n; ++row)
          std::memcpy(dq + slot(row) * c.d, dqbuf.data() + row * c.d, c.d * sizeof(T));
        mul<T>(c.blas, c.own(), true, false, c.d, keys, g * n, c.scale, qs, c.d, dw.data(), keys, T(1), dkt.data(),
               c.s);
      }
      T* dkp = dk + item * c.s * c.d;
      T* dvp = dv + item * c.s * c.dv;
      for (int64_t j = 0; j < c.s; ++j) {
        for (int64_t e = 0; e < c.d; ++e) dkp[j * c.d + e] = dkt[e * c.s + j];
        for (int64_t e = 0; e < c.dv; ++e) dvp[j * c.dv + e] = dvt[e * c.s + j];
      }
      if (ds != nullptr)
        for (int64_t hi = 0; hi < g; ++hi) ds[((bi * c.hq + h0 + hi) * c.chunks) + chunk] = T(ds_head[hi]);
      if (dr != nullptr && c.rel_table) {  // dr (B, Hq, chunks, rel_width)
        for (int64_t hi = 0; hi < g; ++hi) {
          T* to = dr + ((bi * c.hq + h0 + hi) * c.chunks + chunk) * c.rel_width;
          for (int64_t e = 0; e < c.rel_width; ++e) to[e] = T(dr_head[per_head * hi + e]);
        }
      } else if (dr != nullptr) {  // dr (2, B, Hq, chunks)
        for (int64_t hi = 0; hi < g; ++hi) {
          const int64_t at = (bi * c.hq + h0 + hi) * c.chunks + chunk;
          dr[at] = T(dr_head[2 * hi]);
          dr[c.b * c.hq * c.chunks + at] = T(dr_head[2 * hi + 1]);
        }
      }
    }
  }
}

// Calls f with the normalizer as a compile-time constant (std::integral_constant): a runtime choice inside the
// loops kept them from vectorizing well.
template <typename F>
void by_mode(int mode, F&& f) {
  if (mode == 0) f(std::integral_constant<int, 0>{});
  else if (mode == 1) f(std::integral_constant<int, 1>{});
  else f(std::integral_constant<int, 2>{});
}

template <typename T>
Call<T> make_call(const int64_t* dims, const T* q, const T* k, const T* v, const uint8_t* mask, const T* bias,
                  const int64_t* strides, const T* ssmax, T scale, T eps, void* blas, int threads) {
  return Call<T>{dims[0], dims[1], dims[2], dims[3], dims[4], dims[5], dims[6], dims[7],
                 dims[8], dims[9], dims[10], dims[11], q, k, v, mask, bias, strides, ssmax, scale, eps,
                 reinterpret_cast<Blas<T>>(blas), threads};
}

}  // namespace

// C ABI, one set per dtype (f32, f64). The tile entries serve cpu.py's tiled path (bias tensors and functions);
// the fused entries run a whole call. Per-row arrays are contiguous, one slot per row. The relative bias: rel_kind
// (0 none, else as in Relative), its parameters r1, r2 (null unless Kerple) and rel_n, the width of a table r1
// (kind 4, r1 (Hq, rel_n) row-major; 1 for the other kinds).
#define SA_ENTRIES(T, S)                                                                                               \
  void sa_forward_##S(T* raw, int64_t rows, int64_t keys, const int64_t* limit, const T* t, T zmul, int mode,          \
                      T eps, T* lse, T* low, T* inv, T* lse_lo, T* fac, int64_t* amin, int64_t* amax,                  \
                      int threads) {                                                                                   \
    const RowStats<T> st{lse, low, inv, lse_lo, amin, amax};                                                           \
    by_mode(mode, [&](auto m) {                                                                                        \
      forward_tile<T, decltype(m)::value>(raw, rows, keys, limit, t, zmul, eps, st, fac, threads);                     \
    });                                                                                                                \
  }                                                                                                                    \
  void sa_backward_##S(T* raw, T* dw, int64_t rows, int64_t keys, const int64_t* limit, const T* t, T zmul,            \
                       int mode, T* lse, T* low, T* inv, T* lse_lo, int64_t* amin, int64_t* amax, T* dsz,              \
                       int threads) {                                                                                  \
    const RowStats<T> st{lse, low, inv, lse_lo, amin, amax};                                                           \
    by_mode(mode, [&](auto m) {                                                                                        \
      backward_tile<T, decltype(m)::value>(raw, dw, rows, keys, limit, t, zmul, st, dsz, threads);                     \
    });                                                                                                                \
  }                                                                                                                    \
  void sa_fused_forward_##S(const int64_t* dims, const T* q, const T* k, const T* v, const uint8_t* mask,              \
                            const T* bias, const int64_t* strides, const T* ssmax, T scale, T eps, int mode,           \
                            void* blas, int threads, T* out, T* lse, T* low, T* inv, T* lse_lo, int64_t* amin,         \
                            int64_t* amax, int rel_kind, const T* r1, const T* r2, int64_t rel_n) {                    \
    Call<T> c = make_call<T>(dims, q, k, v, mask, bias, strides, ssmax, scale, eps, blas, threads);                    \
    const Relative<T> rel(rel_kind, r1, r2, rel_n, c.hq, c.l, c.s, scale, false);                                      \
    rel.attach(c);                                                                                                     \
    const RowStats<T> st{lse, low, inv, lse_lo, amin, amax};                                                           \
    by_mode(mode, [&](auto m) { fused_forward<T, decltype(m)::value>(c, out, st); });                                  \
  }                                                                                                                    \
  void sa_fused_backward_##S(const int64_t* dims, const T* q, const T* k, const T* v, const uint8_t* mask,             \
                             const T* bias, const int64_t* strides, const T* ssmax, T scale, T eps, int mode,          \
                             void* blas, int threads, const T* dout, T* lse, T* low, T* inv, T* lse_lo,                \
                             int64_t* amin, int64_t* amax, T* dq, T* dk, T* dv, T* ds, int rel_kind,                   \
                             const T* r1, const T* r2, int64_t rel_n, T* dr) {                                         \
    Call<T> c = make_call<T>(dims, q, k, v, mask, bias, strides, ssmax, scale, eps, blas, threads);                    \
    const Relative<T> rel(rel_kind, r1, r2, rel_n, c.hq, c.l, c.s, scale, dr != nullptr);                              \
    rel.attach(c);                                                                                                     \
    const RowStats<T> st{lse, low, inv, lse_lo, amin, amax};                                                           \
    by_mode(mode, [&](auto m) {                                                                                        \
      fused_backward<T, decltype(m)::value>(c, dout, st, dq, dk, dv, ds, dr);                                          \
    });                                                                                                                \
  }

extern "C" {
SA_ENTRIES(float, f32)
SA_ENTRIES(double, f64)

// Whether the fused float32 entries can take a null BLAS pointer and run their own GEMM (built with AVX-512).
int sa_own_gemm_f32() {
#ifdef SA_OWN_GEMM
  return 1;
#else
  return 0;
#endif
}
}  // extern "C"
