// Fused per-row work of the cpu backend (see cpu.py): one tile of logits, rows × keys, row-major.
//
// The GEMMs stay in PyTorch; these loops replace the many elementwise passes that plain PyTorch makes
// over a tile with two passes in the forward and one in the backward. Plain C ABI (loaded with ctypes),
// no torch headers, so it builds in seconds. Rows are independent: OpenMP splits them across threads
// and every row is reduced in a fixed order, so results are deterministic.
//
// Conventions shared with cpu.py:
//   raw[i, j] <= kMasked marks a masked entry (mask, bias −inf); keys j >= limit[i] are masked (causal).
//   z = zmul · raw are the logits before SSMax, x = t[i] · z the final logits.
//   mode: 0 softmax, 1 sa, 2 sa_norm.
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

template <typename T>
constexpr T masked_threshold() { return T(-1e29); }

template <typename T>
constexpr T sentinel() { return T(-1e30); }


// exp(a) for −80 <= a <= 88 (the loops pass a <= 0), inlined so that the loops vectorise without a call
// of glibc's vector expf per vector (this made them ~20% faster): a = n·ln2 + r with |r| <= ln2/2, e^r by
// its Taylor polynomial to degree 7 (relative error < 2e-7, about an ulp), 2^n put into the exponent bits.
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
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // −116 <= n <= 127: a normal number
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

inline double exp_nonpositive(double a) { return std::exp(a); }

// exp(a) for a <= 0, and 0 where the logit v is the sentinel. The argument is clamped at −80 (e^−80 is
// negligible against the row's largest term, 1), which also keeps glibc's vector exp (float64) off its
// slow scalar path for underflowing lanes.
template <typename T>
inline T safe_exp(T a, T v) {
  const T e = exp_nonpositive(a > T(-80) ? a : T(-80));
  return v > masked_threshold<T>() ? e : T(0);
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

// Forward: raw -> unnormalised weights u (e = exp(x − μ); u = e, x·e or (x − m)·e) in place, and per row
// lse (0 for an empty row), m, c = 1/(M − m + eps), fac (o = fac · u v), argmin/argmax (−1 when the
// min/max term of sa_norm is absent).
template <typename T, int mode>
void forward(T* raw, int64_t rows, int64_t keys, const int64_t* limit, const T* t, T zmul, T eps,
             T* lse, T* low, T* inv, T* fac, int64_t* amin, int64_t* amax, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t i = 0; i < rows; ++i) {
    T* x = raw + i * keys;
    const int64_t lim = limit[i];
    const T mul = t[i] * zmul;
    T mu = sentinel<T>(), m = T(0);
    if (mode != 2) {
#pragma omp simd reduction(max : mu)
      for (int64_t j = 0; j < keys; ++j) {
        const T r = x[j];
        const T v = (j < lim && r > masked_threshold<T>()) ? mul * r : sentinel<T>();
        x[j] = v;
        mu = v > mu ? v : mu;
      }
    } else {
#pragma omp simd reduction(max : mu) reduction(min : m)
      for (int64_t j = 0; j < keys; ++j) {
        const T r = x[j];
        const bool ok = j < lim && r > masked_threshold<T>();
        const T v = ok ? mul * r : sentinel<T>();
        x[j] = v;
        mu = v > mu ? v : mu;
        const T w = ok ? v : T(0);  // masked entries as 0 leave m = min(0, min x) unchanged
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
    const bool any = total > T(0);
    lse[i] = any ? shift + std::log(total) : T(0);
    low[i] = m;
    inv[i] = c;
    fac[i] = any ? (mode == 2 ? c : T(1)) / total : T(0);
    amax[i] = mu_at;
    amin[i] = m_at;
  }
}

// Backward (DESIGN §2): raw -> u (the weights that multiply dO in dv; (x − m)p for sa_norm, whose dO
// was scaled by c), dw (dO·vᵀ, c-scaled for sa_norm) -> dL/dz = t · dL/dx in place, with the min/max
// terms of sa_norm added at argmin/argmax; dsz[i] = Σ_j dL/dx_ij · z_ij (for SSMax's s) if dsz != null.
template <typename T, int mode>
void backward(T* raw, T* dw, int64_t rows, int64_t keys, const int64_t* limit, const T* t, T zmul,
              const T* lse, const T* low, const T* inv, const T* delta, const int64_t* amin, const int64_t* amax,
              T* dsz, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t i = 0; i < rows; ++i) {
    T* x = raw + i * keys;
    T* g = dw + i * keys;
    const int64_t lim = limit[i];
    const T ti = t[i], mul = t[i] * zmul, l = lse[i], m = low[i], d = delta[i];
    const int64_t at_max = amax[i], at_min = amin[i];
    const T z_max = at_max >= 0 ? zmul * x[at_max] : T(0);
    const T z_min = at_min >= 0 ? zmul * x[at_min] : T(0);
    T e_sum = 0, zsum = 0;
#pragma omp simd reduction(+ : e_sum, zsum)
    for (int64_t j = 0; j < keys; ++j) {
      const T r = x[j];
      const bool ok = j < lim && r > masked_threshold<T>();
      const T z = ok ? zmul * r : T(0);
      const T v = ok ? mul * r : sentinel<T>();
      const T p = safe_exp(v - l, v);
      const T u = mode == 0 ? p : (mode == 1 ? v * p : (v - m) * p);
      const T gw = g[j];
      e_sum += p * gw;
      const T dx = mode == 0 ? p * (gw - d) : gw * (p + u) - d * p;
      zsum += dx * z;
      x[j] = u;
      g[j] = dx * ti;
    }
    if (mode == 2) {
      const T c = inv[i];
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
    if (dsz != nullptr) dsz[i] = zsum;
  }
}

// The normalizer as a template argument: a runtime choice inside the loops kept them from vectorizing well.
template <typename T>
void forward_any(T* raw, int64_t rows, int64_t keys, const int64_t* limit, const T* t, T zmul, int mode, T eps,
                 T* lse, T* low, T* inv, T* fac, int64_t* amin, int64_t* amax, int threads) {
  auto run = mode == 0 ? forward<T, 0> : (mode == 1 ? forward<T, 1> : forward<T, 2>);
  run(raw, rows, keys, limit, t, zmul, eps, lse, low, inv, fac, amin, amax, threads);
}

template <typename T>
void backward_any(T* raw, T* dw, int64_t rows, int64_t keys, const int64_t* limit, const T* t, T zmul, int mode,
                  const T* lse, const T* low, const T* inv, const T* delta, const int64_t* amin,
                  const int64_t* amax, T* dsz, int threads) {
  auto run = mode == 0 ? backward<T, 0> : (mode == 1 ? backward<T, 1> : backward<T, 2>);
  run(raw, dw, rows, keys, limit, t, zmul, lse, low, inv, delta, amin, amax, dsz, threads);
}

}  // namespace

extern "C" {

void sa_forward_f32(float* raw, int64_t rows, int64_t keys, const int64_t* limit, const float* t, float zmul,
                    int mode, float eps, float* lse, float* low, float* inv, float* fac, int64_t* amin,
                    int64_t* amax, int threads) {
  forward_any<float>(raw, rows, keys, limit, t, zmul, mode, eps, lse, low, inv, fac, amin, amax, threads);
}

void sa_forward_f64(double* raw, int64_t rows, int64_t keys, const int64_t* limit, const double* t, double zmul,
                    int mode, double eps, double* lse, double* low, double* inv, double* fac, int64_t* amin,
                    int64_t* amax, int threads) {
  forward_any<double>(raw, rows, keys, limit, t, zmul, mode, eps, lse, low, inv, fac, amin, amax, threads);
}

void sa_backward_f32(float* raw, float* dw, int64_t rows, int64_t keys, const int64_t* limit, const float* t,
                     float zmul, int mode, const float* lse, const float* low, const float* inv, const float* delta,
                     const int64_t* amin, const int64_t* amax, float* dsz, int threads) {
  backward_any<float>(raw, dw, rows, keys, limit, t, zmul, mode, lse, low, inv, delta, amin, amax, dsz, threads);
}

void sa_backward_f64(double* raw, double* dw, int64_t rows, int64_t keys, const int64_t* limit, const double* t,
                     double zmul, int mode, const double* lse, const double* low, const double* inv,
                     const double* delta, const int64_t* amin, const int64_t* amax, double* dsz, int threads) {
  backward_any<double>(raw, dw, rows, keys, limit, t, zmul, mode, lse, low, inv, delta, amin, amax, dsz, threads);
}

}  // extern "C"
