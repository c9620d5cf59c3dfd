// The torch backend's passes over the logits on the CPU, in plain C++ (no torch headers: it compiles in about a
// second and is loaded through ctypes; see native.py, which builds it with -O3 -march=native and falls back to the
// torch ops when it cannot).
//
//   forward   per row: lse, lp = u_y - lse and optionally H, in ONE read of the row: blocks of kBlock logits are
//             read once from memory (their max), then re-read from L1 (exp and the sums), the row's running max and
//             sums rescaled when a block raises the max (online log-sum-exp over blocks, exact per block).
//   backward  per row: one read of the logits and one write of the gradient,
//             d/dz = (g 1[v=y] - p (g + gH (log p + H))) / tau     with g, gH already divided by tau.
//
// u = z / tau is computed in float32 as z * (1 / tau) (a division costs a cycle per logit; the two differ by an ulp,
// and forward and backward here use the same u), the row's sums in float32 inside a block
// and in double across blocks; the per-row finish (log, lse, lp, H) in double. Each row is computed by one thread
// in a fixed order, whatever the thread count: the results are bitwise the same run to run and for any nthreads.
//
// Non-finite values follow the torch path exactly: a NaN in a row makes lse, lp and H NaN; with the entropy a row
// whose max is +-inf is NaN (as u - max is NaN somewhere); without it, logsumexp's rule (+inf -> lse = +inf, all
// -inf -> lse = -inf); -inf logits contribute p = 0 (log p clamped at kLogpFloor, so 0 * log 0 = 0). Rows with
// ids < 0 (not taking part) are never read: lp = H = 0, lse = 0, a gradient row of zeros. An id equal to the row
// length V marks a row whose target lies in another vocabulary shard (grpo_kernels/vocab_parallel.py): the row is
// read as usual, lp = -lse (u_y taken as 0) and the gradient has no 1[v = y] term.
//
// Vectors are GCC/Clang vector extensions of 16 floats: AVX-512 registers where the CPU has them, two AVX2 or four
// SSE/NEON registers elsewhere. exp is a degree-6 polynomial after Cody-Waite range reduction (max relative error
// 7e-8 in float32, as Cephes' expf; exp(0) = 1 exactly, subnormal results kept, exp(-inf) = 0, NaN in -> NaN out).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace {

constexpr int kW = 16;          // floats per vector
constexpr int64_t kBlock = 2048;  // logits per block of the forward: 8 KB of float32, stays in L1 between its passes
// log p is clamped here (NaN kept): exp(-104) rounds to 0 in float32, so every p below it is 0 as it is without the
// clamp, and 0 * log p stays 0 for masked (-inf) logits. (logprobs.py clamps at -1e4: the same results.)
constexpr float kLogpFloor = -104.0f;

typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64)));
typedef uint16_t vh __attribute__((vector_size(32)));
#if defined(__FLT16_MAX__)
typedef _Float16 vf16 __attribute__((vector_size(32)));
#endif

enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

inline vf splat(float x) { return vf{} + x; }

inline vf vmax(vf a, vf b) { return a > b ? a : b; }

// exp(r) = 1 + r (c1 + r (c2 + ... + r c6)) on |r| <= ln(2) / 2, fitted to the relative error: 2e-9 in exact
// arithmetic, 7e-8 evaluated in float32 by Horner's rule (Cephes' expf polynomial: the same, in two more
// instructions); exp(0) = 1 exactly. {c6, c5, c4, c3, c2, c1}:
constexpr float kExpPoly[6] = {0.0013843653723597527f, 0.00837415549904108f, 0.04166800156235695f,
                               0.16666431725025177f, 0.4999999403953552f, 1.0f};

// max(x, kLogpFloor), NaN kept.
inline vf vfloor(vf x) {
#if defined(__AVX512F__)
  return (vf)_mm512_max_ps(_mm512_set1_ps(kLogpFloor), (__m512)x);  // vmaxps returns its 2nd operand on NaN
#else
  return x < splat(kLogpFloor) ? splat(kLogpFloor) : x;  // a NaN compares false and stays
#endif
}

// exp(x) for a vector whose lanes are >= kLogpFloor or NaN (vfloor): n = round(x / ln 2), r = x - n ln 2
// (two-part ln 2), exp(r) by the polynomial above, times 2^n. exp(kLogpFloor) = 0 (below half the smallest
// subnormal); subnormal results are kept; x > 88.73 gives inf (kUpper = false: the caller knows x <= 0, as the
// forward's u - max); NaN gives NaN.
template <bool kUpper>
inline vf vexp(vf x) {
#if defined(__AVX512F__)
  __m512 v = (__m512)x;
  if (kUpper) v = _mm512_min_ps(_mm512_set1_ps(89.0f), v);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), v);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(kExpPoly[0]);
  for (int k = 1; k < 6; ++k) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpPoly[k]));
  const __m512 y = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return (vf)_mm512_scalef_ps(y, n);  // y 2^n, rounded once: subnormals, 0 and inf come out right
#else
  if (kUpper) x = x > splat(89.0f) ? splat(89.0f) : x;
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer (|t| < 2^22)
  vf n = (x * splat(1.44269504088896341f) + magic) - magic;
  vf r = x - n * splat(0.693359375f);
  r = r - n * splat(-2.12194440e-4f);
  vf p = splat(kExpPoly[0]);
  for (int k = 1; k < 6; ++k) p = p * r + splat(kExpPoly[k]);
  const vf y = p * r + splat(1.0f);
  vi ni = __builtin_convertvector(n, vi);
  vi n1 = ni >> 1;  // 2^n as 2^n1 2^n2: both factors normal for n in [-150, 128]
  vi n2 = ni - n1;
  return y * (vf)((n1 + 127) << 23) * (vf)((n2 + 127) << 23);
#endif
}

inline double hsum(vf v) {
  double s = 0.0;
  for (int i = 0; i < kW; ++i) s += v[i];
  return s;
}

inline float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < kW; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

// ---------------------------------------------------------------------------------------------------------------
// loads and stores of kW logits (full vectors and a tail of n < kW, padded with `pad`)
// ---------------------------------------------------------------------------------------------------------------
// Non-temporal stores of one vector's bytes (64 or 32) at an address aligned to that size: the gradient is written
// to memory without first reading the line it overwrites (a plain store reads it: 3 passes instead of 2). Where
// the ISA has none, a plain store.
inline void stream64(void* p, const void* v) {
#if defined(__AVX512F__)
  __m512i x;
  std::memcpy(&x, v, 64);
  _mm512_stream_si512(static_cast<__m512i*>(p), x);
#elif defined(__AVX__)
  __m256i x, y;
  std::memcpy(&x, v, 32);
  std::memcpy(&y, static_cast<const char*>(v) + 32, 32);
  _mm256_stream_si256(static_cast<__m256i*>(p), x);
  _mm256_stream_si256(static_cast<__m256i*>(p) + 1, y);
#else
  std::memcpy(p, v, 64);
#endif
}

inline void stream32(void* p, const void* v) {
#if defined(__AVX__)
  __m256i x;
  std::memcpy(&x, v, 32);
  _mm256_stream_si256(static_cast<__m256i*>(p), x);
#else
  std::memcpy(p, v, 32);
#endif
}

inline void store_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

struct F32 {
  using T = float;
  static vf load(const T* p) {
    vf v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  static void store(T* p, vf v) { std::memcpy(p, &v, sizeof v); }
  static void stream(T* p, vf v) { stream64(p, &v); }
};

struct BF16 {
  using T = uint16_t;
  static vf load(const T* p) {  // bfloat16 is the top half of a float32
#if defined(__AVX512F__)
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return (vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);  // GCC 12 splits the generic widening in four
#else
    vh h;
    std::memcpy(&h, p, sizeof h);
    return (vf)(__builtin_convertvector(h, vu) << 16);
#endif
  }
  static vh bits(vf v) {  // round to nearest even; NaN -> 0x7FC0 (as c10::BFloat16)
    vu u = (vu)v;
    u = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    const vu quiet_nan = vu{} + 0x7FC0u;
    u = (v != v) ? quiet_nan : u;
    return __builtin_convertvector(u, vh);
  }
  static void store(T* p, vf v) {
    const vh h = bits(v);
    std::memcpy(p, &h, sizeof h);
  }
  static void stream(T* p, vf v) {
    const vh h = bits(v);
    stream32(p, &h);
  }
};

#if defined(__FLT16_MAX__)
struct F16 {
  using T = _Float16;
  static vf load(const T* p) {
#if defined(__AVX512F__)
    return (vf)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));  // GCC 12 goes lane by lane
#else
    vf16 h;
    std::memcpy(&h, p, sizeof h);
    return __builtin_convertvector(h, vf);
#endif
  }
  static vh bits(vf v) {  // round to nearest even, as c10::Half
#if defined(__AVX512F__)
    return (vh)_mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
    return (vh)__builtin_convertvector(v, vf16);
#endif
  }
  static void store(T* p, vf v) {
    const vh h = bits(v);
    std::memcpy(p, &h, sizeof h);
  }
  static void stream(T* p, vf v) {
    const vh h = bits(v);
    stream32(p, &h);
  }
};
#endif

template <class D>
inline vf load_tail(const typename D::T* p, int64_t n, float pad) {
  typename D::T buf[kW];
  std::memcpy(buf, p, n * sizeof(typename D::T));
  vf v = D::load(buf);
  for (int64_t i = n; i < kW; ++i) v[i] = pad;
  return v;
}

template <class D>
inline void store_tail(typename D::T* p, int64_t n, vf v) {
  typename D::T buf[kW];
  D::store(buf, v);
  std::memcpy(p, buf, n * sizeof(typename D::T));
}

template <class D>
inline float load_one(const typename D::T* p) {
  return load_tail<D>(p, 1, 0.0f)[0];
}

// ---------------------------------------------------------------------------------------------------------------
// rows: [B, T, V] with unit stride along V; row n = (n / T, n % T)
// ---------------------------------------------------------------------------------------------------------------
struct Rows {
  int64_t rows, seq_len, vocab, stride_b, stride_t;  // strides in elements
  int64_t offset(int64_t n) const { return (n / seq_len) * stride_b + (n % seq_len) * stride_t; }
};

// Calls body(row) for every row on nthreads threads (the caller's included), in chunks handed out in order.
template <class F>
void parallel_rows(int64_t rows, int64_t vocab, int nthreads, F body) {
  const int64_t chunk = std::max<int64_t>(1, 16384 / std::max<int64_t>(vocab, 1));  // >= ~16k logits per chunk
  const int64_t chunks = (rows + chunk - 1) / chunk;
  int workers = static_cast<int>(std::min<int64_t>(std::max(nthreads, 1), chunks));
  if (rows * vocab < (1 << 17)) workers = 1;  // a thread costs more than it saves below ~128k logits
  std::atomic<int64_t> next{0};
  auto work = [&] {
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks;) {
      const int64_t end = std::min(rows, (c + 1) * chunk);
      for (int64_t n = c * chunk; n < end; ++n) body(n);
    }
    store_fence();  // non-temporal stores are visible to the other threads once they are joined
  };
  std::vector<std::thread> pool;
  pool.reserve(workers - 1);
  for (int i = 1; i < workers; ++i) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
}

// ---------------------------------------------------------------------------------------------------------------
// forward
// ---------------------------------------------------------------------------------------------------------------
// A row's log-sum-exp state: running max m, s0 = sum exp(u - m), s1 = sum exp(u - m) (u - m), any NaN seen.
struct RowSums {
  double m = -std::numeric_limits<double>::infinity(), s0 = 0.0, s1 = 0.0;
  bool nan = false;

  // Adds sums b0, b1 taken relative to `ref` (ref <= new_max), the block's max being new_max: rescaled to it.
  void merge(double ref, double new_max, double b0, double b1) {
    if (new_max > m) {
      const double c_new = std::exp(ref - new_max);
      if (m == -std::numeric_limits<double>::infinity()) {  // nothing so far (a first block, or all -inf before)
        s1 = c_new * (b1 + (ref - new_max) * b0);
        s0 = c_new * b0;
      } else {
        const double c_old = std::exp(m - new_max);
        s1 = c_old * (s1 + (m - new_max) * s0) + c_new * (b1 + (ref - new_max) * b0);
        s0 = c_old * s0 + c_new * b0;
      }
      m = new_max;
    } else {
      s1 += b1 + (ref - m) * b0;
      s0 += b0;
    }
  }
};

// The exp-pass over a block in registers: sums of e = exp(floor(u - ref)) and e * floor(u - ref).
template <bool kEntropy>
struct ExpSums {
  vf a0 = vf{}, b0 = vf{}, a1 = vf{}, b1 = vf{};
  inline void add(vf u, vf ref, vf& acc0, vf& acc1) {
    const vf s = vfloor(u - ref);
    const vf e = vexp<false>(s);  // s <= 0 (exact blocks) or s <= kHeadroom (checked after the block)
    acc0 += e;
    if (kEntropy) acc1 += e * s;
  }
  double sum0() const { return hsum(a0 + b0); }
  double sum1() const { return kEntropy ? hsum(a1 + b1) : 0.0; }
};

// Most a block's max may exceed the reference of a one-pass block: exp(64) * kBlock stays far from float32's max.
constexpr float kHeadroom = 64.0f;

// One block, two passes over it: its max (the logits read from memory into buf), then the exp-pass from L1 relative
// to the new running max. Handles every value (NaN, +-inf, a first block).
template <class D, bool kEntropy, bool kTemperature>
void add_block_exact(const typename D::T* z, int64_t len, float inv_tau, RowSums& row) {
  const float inf = std::numeric_limits<float>::infinity();
  vf buf[kBlock / kW];
  const int64_t full = len / kW, tail = len % kW, count = full + (tail ? 1 : 0);
  vf bmax = splat(-inf);
  vi nan_seen = vi{};
  for (int64_t j = 0; j < count; ++j) {
    vf u = j < full ? D::load(z + j * kW) : load_tail<D>(z + j * kW, tail, -inf);
    if (kTemperature) u = u * splat(inv_tau);
    buf[j] = u;
    nan_seen |= (u != u);
    bmax = vmax(bmax, u);
  }
  for (int i = 0; i < kW; ++i) row.nan |= nan_seen[i] != 0;
  const double new_max = std::max<double>(row.m, hmax(bmax));
  if (row.nan || !std::isfinite(new_max)) {  // the row's result is decided by these alone (see finish)
    row.m = std::max(row.m, new_max);
    return;
  }
  const vf ref = splat(static_cast<float>(new_max));
  ExpSums<kEntropy> e;
  int64_t j = 0;
  for (; j + 1 < count; j += 2) {
    e.add(buf[j], ref, e.a0, e.a1);
    e.add(buf[j + 1], ref, e.b0, e.b1);
  }
  if (j < count) e.add(buf[j], ref, e.a0, e.a1);
  row.merge(new_max, new_max, e.sum0(), e.sum1());
}

// One block, one pass: max and exp relative to the running max (finite) together. False (nothing added) when the
// block's max exceeds it by more than kHeadroom or is +inf: the caller then adds the block exactly.
template <class D, bool kEntropy, bool kTemperature>
bool add_block_online(const typename D::T* z, int64_t len, float inv_tau, RowSums& row) {
  const float inf = std::numeric_limits<float>::infinity();
  const int64_t full = len / kW, tail = len % kW;
  const float ref_f = static_cast<float>(row.m);
  const vf ref = splat(ref_f);
  vf bmax0 = splat(-inf), bmax1 = splat(-inf);
  ExpSums<kEntropy> e;
  int64_t j = 0;
  for (; j + 1 < full; j += 2) {
    vf u = D::load(z + j * kW), v = D::load(z + (j + 1) * kW);
    if (kTemperature) {
      u = u * splat(inv_tau);
      v = v * splat(inv_tau);
    }
    bmax0 = vmax(bmax0, u);
    bmax1 = vmax(bmax1, v);
    e.add(u, ref, e.a0, e.a1);
    e.add(v, ref, e.b0, e.b1);
  }
  for (; j < full + (tail ? 1 : 0); ++j) {
    vf u = j < full ? D::load(z + j * kW) : load_tail<D>(z + j * kW, tail, -inf);
    if (kTemperature) u = u * splat(inv_tau);
    bmax0 = vmax(bmax0, u);
    e.add(u, ref, e.a0, e.a1);
  }
  const float block_max = hmax(vmax(bmax0, bmax1));
  if (!(block_max - ref_f <= kHeadroom)) return false;  // +inf (or a far larger max): redo exactly
  const double b0 = e.sum0();
  if (std::isnan(b0)) {  // a NaN logit reached the sums
    row.nan = true;
    return true;
  }
  row.merge(row.m, std::max<double>(row.m, block_max), b0, e.sum1());
  return true;
}

template <class D, bool kEntropy, bool kTemperature>
void forward_row(const typename D::T* z, int64_t vocab, int64_t target, float tau, float* lp, float* lse,
                 float* entropy) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const float inv_tau = 1.0f / tau;
  RowSums row;
  for (int64_t start = 0; start < vocab; start += kBlock) {
    const int64_t len = std::min(kBlock, vocab - start);
    const bool online = std::isfinite(row.m) && !row.nan;
    if (!online || !add_block_online<D, kEntropy, kTemperature>(z + start, len, inv_tau, row))
      add_block_exact<D, kEntropy, kTemperature>(z + start, len, inv_tau, row);
  }
  // NaN anywhere: NaN. With the entropy a max of +-inf is NaN too (u - max is NaN somewhere, as in the torch path);
  // without it logsumexp's rule: +inf -> +inf, all -inf -> -inf.
  double lse_d;
  if (row.nan || (kEntropy && !std::isfinite(row.m))) {
    lse_d = nan;
  } else if (!std::isfinite(row.m)) {
    lse_d = row.m;
  } else {
    lse_d = row.m + std::log(row.s0);
  }
  const float row_lse = static_cast<float>(lse_d);
  float u_y = target < vocab ? load_one<D>(z + target) : 0.0f;  // target == vocab: owned by another vocabulary shard
  if (kTemperature) u_y = u_y * inv_tau;
  *lse = row_lse;
  *lp = std::isfinite(lse_d) ? static_cast<float>(static_cast<double>(u_y) - lse_d) : u_y - row_lse;
  if (kEntropy) *entropy = std::isfinite(lse_d) ? static_cast<float>(std::log(row.s0) - row.s1 / row.s0) : nan;
}

template <class D, bool kEntropy, bool kTemperature>
void forward(const void* logits, const Rows& r, const int64_t* ids, float tau, float* lp, float* lse, float* entropy,
             int nthreads) {
  const auto* z = static_cast<const typename D::T*>(logits);
  parallel_rows(r.rows, r.vocab, nthreads, [&](int64_t n) {
    if (ids[n] < 0) {
      lp[n] = 0.0f;
      lse[n] = 0.0f;
      if (kEntropy) entropy[n] = 0.0f;
      return;
    }
    forward_row<D, kEntropy, kTemperature>(z + r.offset(n), r.vocab, ids[n], tau, lp + n, lse + n,
                                           kEntropy ? entropy + n : nullptr);
  });
}

// ---------------------------------------------------------------------------------------------------------------
// backward
// ---------------------------------------------------------------------------------------------------------------
template <class D, bool kEntropy, bool kTemperature>
void backward_row(const typename D::T* z, typename D::T* out, int64_t vocab, int64_t target, float tau, float lse,
                  float h, float g, float gh, bool stream) {
  const float inv_tau = 1.0f / tau;
  const vf lse_v = splat(lse), h_v = splat(h), g_v = splat(g), gh_v = splat(gh), neg_g = splat(-g);
  auto grad = [&](vf u) {  // -p (g + gH (log p + H)) for kW logits
    if (kTemperature) u = u * splat(inv_tau);
    const vf s = vfloor(u - lse_v);
    if (kEntropy) return -(((s + h_v) * gh_v + g_v) * vexp<true>(s));
    return vexp<true>(s) * neg_g;
  };
  const bool owns_target = target < vocab;  // target == vocab: the row's target is in another vocabulary shard
  const vf target_z = owns_target ? load_tail<D>(z + target, 1, 0.0f) : splat(0.0f);  // read first: out may be z
  int64_t j = 0;
  if (stream) {  // a partial first vector up to the alignment of a vector's bytes, then non-temporal stores
    constexpr uintptr_t kAlign = kW * sizeof(typename D::T);
    const int64_t head = std::min<int64_t>(
        vocab, ((kAlign - reinterpret_cast<uintptr_t>(out) % kAlign) % kAlign) / sizeof(typename D::T));
    if (head) store_tail<D>(out, head, grad(load_tail<D>(z, head, 0.0f)));
    for (j = head; j + kW <= vocab; j += kW) D::stream(out + j, grad(D::load(z + j)));
  } else {
    for (; j + kW <= vocab; j += kW) D::store(out + j, grad(D::load(z + j)));
  }
  if (j < vocab) store_tail<D>(out + j, vocab - j, grad(load_tail<D>(z + j, vocab - j, 0.0f)));
  // the target's g, added in float32 before the rounding to the logits' dtype: its lane recomputed (lanes are
  // independent: the same value as in the loop) and stored again, after the streamed stores are ordered
  if (stream) store_fence();
  if (!owns_target) return;
  vf w = grad(target_z);
  w[0] += g;
  store_tail<D>(out + target, 1, w);
}

// Gradients at least this large go to memory with non-temporal stores (when not written over the logits): they
// are far larger than the caches, and the next reader finds them in memory either way.
constexpr int64_t kStreamBytes = 16 << 20;

// A new gradient buffer is usually fresh memory that faults in page by page on its first write; on Linux with
// transparent huge pages in "madvise" mode, asking for huge pages first makes that one fault per 2 MiB instead of
// per 4 KiB (measured on a 2-core VM: 157 -> 65 ms to first-write 131 MiB). Only the buffer's whole 2 MiB pages
// are advised; nothing else changes (no effect where THP is off or the pages exist already).
void advise_huge_pages(void* p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = 2 << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

template <class D, bool kEntropy, bool kTemperature>
void backward(const void* logits, const Rows& r, void* grad_out, int64_t out_stride_b, int64_t out_stride_t,
              const int64_t* ids, const float* lse, const float* entropy, const float* g, const float* gh, float tau,
              int nthreads) {
  const auto* z = static_cast<const typename D::T*>(logits);
  auto* out = static_cast<typename D::T*>(grad_out);
  const int64_t bytes = r.rows * r.vocab * static_cast<int64_t>(sizeof(typename D::T));
  const bool stream = grad_out != logits && bytes >= kStreamBytes;
  const bool contiguous_out = out_stride_t == r.vocab && (r.rows == r.seq_len || out_stride_b == r.seq_len * r.vocab);
  if (stream && contiguous_out) advise_huge_pages(grad_out, bytes);
  parallel_rows(r.rows, r.vocab, nthreads, [&](int64_t n) {
    typename D::T* o = out + (n / r.seq_len) * out_stride_b + (n % r.seq_len) * out_stride_t;
    if (ids[n] < 0) {
      std::memset(static_cast<void*>(o), 0, r.vocab * sizeof(typename D::T));  // +0.0 in every dtype
      return;
    }
    backward_row<D, kEntropy, kTemperature>(z + r.offset(n), o, r.vocab, ids[n], tau, lse[n],
                                            kEntropy ? entropy[n] : 0.0f, g[n], kEntropy ? gh[n] : 0.0f, stream);
  });
}

template <template <class, bool, bool> class Op, class... Args>
int dispatch(int dtype, bool entropy, bool temperature, Args... args) {
  auto run = [&](auto tag) {
    using D = decltype(tag);
    if (entropy && temperature) Op<D, true, true>::run(args...);
    if (entropy && !temperature) Op<D, true, false>::run(args...);
    if (!entropy && temperature) Op<D, false, true>::run(args...);
    if (!entropy && !temperature) Op<D, false, false>::run(args...);
  };
  switch (dtype) {
    case kFloat32:
      run(F32{});
      return 0;
    case kBFloat16:
      run(BF16{});
      return 0;
#if defined(__FLT16_MAX__)
    case kFloat16:
      run(F16{});
      return 0;
#endif
    default:
      return 1;
  }
}

template <class D, bool E, bool T>
struct Forward {
  template <class... A>
  static void run(A... a) { forward<D, E, T>(a...); }
};

template <class D, bool E, bool T>
struct Backward {
  template <class... A>
  static void run(A... a) { backward<D, E, T>(a...); }
};


// ---------------------------------------------------------------------------------------------------------------
// divergences between a student row z and a teacher row z_r (divergence.py is the reference these match)
// ---------------------------------------------------------------------------------------------------------------
// u = z / tau, u_r = z_r / tau (both as z * (1 / tau), as above), p = softmax(u), q = softmax(u_r).
//
//   forward   per row pair, ONE read of both rows: blocks of kBlock logits of each row are read from memory into L1
//             (their maxima), then exp-summed from L1 relative to the running maxima A, B (both rows' maxima so
//             far): S = sum e, S_r = sum f, S_1 = sum w d with e = exp(u - A), f = exp(u_r - B) and, for
//               reverse_kl  w = e, d = (u - A) - (u_r - B)      KL(p||q) = S_1 / S - log S + log S_r
//               forward_kl  w = f, d = (u_r - B) - (u - A)      KL(q||p) = S_1 / S_r - log S_r + log S
//             (differences taken relative to the maxima, as the torch path: errors scale with the logits' spread,
//             not their offset); when a block raises A or B the row's sums are rescaled, S_1 by its shift too:
//             S_1 <- exp(A - A') (S_1 + ((A - A') - (B - B')) S). lse = A + log S, lse_r = B + log S_r in double,
//             lp = u_y - lse. Sums in float32 over kFlush vectors, then in double.
//   backward  per row, one read of both rows and one write of the student's gradient (c = grad_div / tau,
//             c_lp = grad_lp / tau, log p = (u - hi) - lo with hi + lo the float64 lse split in two floats):
//               reverse_kl  d/dz = (nz(log p - log q) - K) p c - p c_lp + c_lp 1[v = y]
//               forward_kl  d/dz = (p - q) c - p c_lp + c_lp 1[v = y]
//             nz: NaN and -inf -> 0 (p = 0 there), +inf kept (u_r = -inf: K is +inf too, see below).
//
// Conventions (those of divergence.py, which the tests hold these to): a -inf logit has probability 0 and adds 0;
// the KL is +inf when the weighting row has a finite logit where the other row's is -inf (whether or not its
// probability underflowed); a row whose student or teacher has a NaN or +inf logit or only -inf logits has NaN lse
// (that side), NaN KL and divergence, NaN lp (student side); its gradient row is NaN. A reverse-KL row with
// K = +inf has a NaN gradient row where c != 0 and no divergence term (only the lp term) where c = 0. Rows with
// ids < 0 are never read: 0 in every output and a zero gradient row.
// A block's sums go to double every kFlush vectors: a float32 lane that holds a row's dominant term (p_y ~ 1) and
// adds 128 small ones rounds each addition at ulp(1) (measured: lse off by 7e-7 on such a row, where the torch
// path's cascaded sum is off by 1e-10); 8 additions keep it within ~1e-7.
constexpr int64_t kFlush = 8;
typedef double vd __attribute__((vector_size(64)));
typedef float vf8 __attribute__((vector_size(32)));

struct WideSum {
  vd lo = vd{}, hi = vd{};
  void add(vf v) {
    lo += __builtin_convertvector(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7), vd);
    hi += __builtin_convertvector(__builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15), vd);
  }
  double sum() const {
    const vd s = lo + hi;
    double t = 0.0;
    for (int i = 0; i < 8; ++i) t += s[i];
    return t;
  }
};

struct PairRow {
  double m = -std::numeric_limits<double>::infinity(), m_r = m;  // the rows' maxima so far
  float ref = 0.0f, ref_r = 0.0f;  // the references of the sums: the maxima, 0 while a row's maximum is -inf
  double s0 = 0.0, s0_r = 0.0, s1 = 0.0;
  bool bad = false, bad_r = false, infinite = false;
};

template <class D, class DR, bool kReverse>
void pair_block(const typename D::T* z, const typename DR::T* zr, int64_t len, float inv_tau, PairRow& row) {
  const float inf = std::numeric_limits<float>::infinity();
  vf buf[kBlock / kW], buf_r[kBlock / kW];
  const int64_t full = len / kW, tail = len % kW, count = full + (tail ? 1 : 0);
  vf bmax = splat(-inf), bmax_r = splat(-inf);
  vi nan_seen = vi{}, nan_seen_r = vi{};
  for (int64_t j = 0; j < count; ++j) {
    vf u = j < full ? D::load(z + j * kW) : load_tail<D>(z + j * kW, tail, -inf);
    vf ur = j < full ? DR::load(zr + j * kW) : load_tail<DR>(zr + j * kW, tail, -inf);
    u = u * splat(inv_tau);
    ur = ur * splat(inv_tau);
    buf[j] = u;
    buf_r[j] = ur;
    nan_seen |= (u != u);
    nan_seen_r |= (ur != ur);
    bmax = vmax(bmax, u);
    bmax_r = vmax(bmax_r, ur);
  }
  for (int i = 0; i < kW; ++i) {
    row.bad |= nan_seen[i] != 0;
    row.bad_r |= nan_seen_r[i] != 0;
  }
  row.m = std::max<double>(row.m, hmax(bmax));
  row.m_r = std::max<double>(row.m_r, hmax(bmax_r));
  row.bad |= row.m == inf;
  row.bad_r |= row.m_r == inf;
  if (row.bad && row.bad_r) return;  // NaN results (finish); one bad row's sums go on, unused, for the other's lse
  const float a = row.m == -inf ? 0.0f : static_cast<float>(row.m);
  const float b = row.m_r == -inf ? 0.0f : static_cast<float>(row.m_r);
  // rescale the row's sums to the new references (a row's sums are 0 while its maximum is -inf)
  const double shift = static_cast<double>(row.ref) - a, shift_r = static_cast<double>(row.ref_r) - b;
  if (kReverse ? row.s0 > 0.0 : row.s0_r > 0.0) {
    const double c = std::exp(kReverse ? shift : shift_r);
    row.s1 = c * (row.s1 + (kReverse ? shift - shift_r : shift_r - shift) * (kReverse ? row.s0 : row.s0_r));
  } else {
    row.s1 = 0.0;
  }
  if (row.s0 > 0.0) row.s0 *= std::exp(shift);
  if (row.s0_r > 0.0) row.s0_r *= std::exp(shift_r);
  row.ref = a;
  row.ref_r = b;
  const vf av = splat(a), bv = splat(b), ninf = splat(-inf), zero = vf{};
  vf acc0 = vf{}, acc0_r = vf{}, acc1 = vf{};
  WideSum w0, w0_r, w1;
  vi flag = vi{};
  for (int64_t j = 0; j < count; ++j) {
    if (j % kFlush == 0 && j > 0) {  // float32 partial sums of kFlush vectors, then into double
      w0.add(acc0);
      w0_r.add(acc0_r);
      w1.add(acc1);
      acc0 = acc0_r = acc1 = vf{};
    }
    const vf u = buf[j], ur = buf_r[j];
    const vf t = u - av, tr = ur - bv;  // <= 0, -inf for a -inf logit
    const vf e = vexp<false>(vfloor(t)), f = vexp<false>(vfloor(tr));
    acc0 += e;
    acc0_r += f;
    const vi u_ninf = (u == ninf), ur_ninf = (ur == ninf);
    vf d = kReverse ? t - tr : tr - t;
    d = (u_ninf | ur_ninf) ? zero : d;
    flag |= kReverse ? (ur_ninf & ~u_ninf) : (u_ninf & ~ur_ninf);
    acc1 += (kReverse ? e : f) * d;
  }
  for (int i = 0; i < kW; ++i) row.infinite |= flag[i] != 0;
  w0.add(acc0);
  w0_r.add(acc0_r);
  w1.add(acc1);
  row.s0 += w0.sum();
  row.s0_r += w0_r.sum();
  row.s1 += w1.sum();
}

template <class D, class DR, bool kReverse>
void divergence_forward_row(const typename D::T* z, const typename DR::T* zr, int64_t vocab, int64_t target,
                            float tau, float* div, float* lp, double* lse, double* lse_r, float* kl_s, float* kl_t) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  const float inv_tau = 1.0f / tau;
  PairRow row;
  for (int64_t start = 0; start < vocab; start += kBlock)
    pair_block<D, DR, kReverse>(z + start, zr + start, std::min(kBlock, vocab - start), inv_tau, row);
  const bool ok = !row.bad && row.m != -inf, ok_r = !row.bad_r && row.m_r != -inf;
  const double lse_d = ok ? row.ref + std::log(row.s0) : nan;
  const double lse_rd = ok_r ? row.ref_r + std::log(row.s0_r) : nan;
  double kl = nan;
  if (ok && ok_r) {
    if (row.infinite) {
      kl = inf;
    } else if (kReverse) {
      kl = row.s1 / row.s0 - std::log(row.s0) + std::log(row.s0_r);
    } else {
      kl = row.s1 / row.s0_r - std::log(row.s0_r) + std::log(row.s0);
    }
  }
  *lse = lse_d;
  *lse_r = lse_rd;
  *div = static_cast<float>(kl);
  *kl_s = kReverse ? static_cast<float>(kl) : 0.0f;
  *kl_t = kReverse ? 0.0f : static_cast<float>(kl);
  if (lp != nullptr) *lp = static_cast<float>(static_cast<double>(load_one<D>(z + target) * inv_tau) - lse_d);
}

template <class D, class DR, bool kReverse>
void divergence_forward(const void* student, const Rows& rs, const void* teacher, const Rows& rt, const int64_t* ids,
                        float tau, float* div, float* lp, double* lse, double* lse_r, float* kl_s, float* kl_t,
                        int nthreads) {
  const auto* z = static_cast<const typename D::T*>(student);
  const auto* zr = static_cast<const typename DR::T*>(teacher);
  parallel_rows(rs.rows, rs.vocab, nthreads, [&](int64_t n) {
    if (ids[n] < 0) {
      div[n] = kl_s[n] = kl_t[n] = 0.0f;
      lse[n] = lse_r[n] = 0.0;
      if (lp != nullptr) lp[n] = 0.0f;
      return;
    }
    divergence_forward_row<D, DR, kReverse>(z + rs.offset(n), zr + rt.offset(n), rs.vocab, ids[n], tau, div + n,
                                            lp == nullptr ? nullptr : lp + n, lse + n, lse_r + n, kl_s + n,
                                            kl_t + n);
  });
}

template <class D, class DR, bool kReverse>
void divergence_backward_row(const typename D::T* z, const typename DR::T* zr, typename D::T* out, int64_t vocab,
                             int64_t target, float tau, double lse, double lse_r, float k, float c, float c_lp,
                             bool stream) {
  const float inf = std::numeric_limits<float>::infinity();
  if (!std::isfinite(k) && !std::isnan(k) && kReverse && c != 0.0f) {  // K = +inf moves with the logits: NaN
    const vf nan = splat(std::numeric_limits<float>::quiet_NaN());
    int64_t j = 0;
    for (; j + kW <= vocab; j += kW) D::store(out + j, nan);
    if (j < vocab) store_tail<D>(out + j, vocab - j, nan);
    return;
  }
  // a reverse-KL row with K = +inf and c = 0 gets no divergence term at all (0 * inf would be NaN)
  const bool with_div = !(kReverse && std::isinf(k));
  const float inv_tau = 1.0f / tau;
  const float hi = static_cast<float>(lse), lo = static_cast<float>(lse - static_cast<double>(hi));
  const float hi_r = static_cast<float>(lse_r), lo_r = static_cast<float>(lse_r - static_cast<double>(hi_r));
  const vf hi_v = splat(hi), lo_v = splat(lo), hi_rv = splat(hi_r), lo_rv = splat(lo_r);
  const vf k_v = splat(k), c_v = splat(c), clp_v = splat(c_lp), ninf = splat(-inf), zero = vf{};
  auto grad = [&](vf u, vf ur) {
    u = u * splat(inv_tau);
    ur = ur * splat(inv_tau);
    const vf log_p = (u - hi_v) - lo_v, log_q = (ur - hi_rv) - lo_rv;
    const vf p = vexp<true>(vfloor(log_p));
    vf g = zero;
    if (kReverse) {
      if (with_div) {
        vf d = log_p - log_q;
        d = ((d != d) | (d == ninf)) ? zero : d;
        g = ((d - k_v) * p) * c_v;
      }
    } else {
      const vf q = vexp<true>(vfloor(log_q));
      g = (p - q) * c_v;
    }
    return g - p * clp_v;
  };
  const vf target_u = load_tail<D>(z + target, 1, 0.0f), target_ur = load_tail<DR>(zr + target, 1, 0.0f);
  int64_t j = 0;
  if (stream) {
    constexpr uintptr_t kAlign = kW * sizeof(typename D::T);
    const int64_t head = std::min<int64_t>(
        vocab, ((kAlign - reinterpret_cast<uintptr_t>(out) % kAlign) % kAlign) / sizeof(typename D::T));
    if (head) store_tail<D>(out, head, grad(load_tail<D>(z, head, 0.0f), load_tail<DR>(zr, head, 0.0f)));
    for (j = head; j + kW <= vocab; j += kW) D::stream(out + j, grad(D::load(z + j), DR::load(zr + j)));
  } else {
    for (; j + kW <= vocab; j += kW) D::store(out + j, grad(D::load(z + j), DR::load(zr + j)));
  }
  if (j < vocab)
    store_tail<D>(out + j, vocab - j, grad(load_tail<D>(z + j, vocab - j, 0.0f), load_tail<DR>(zr + j, vocab - j, 0.0f)));
  if (c_lp != 0.0f) {  // + c_lp at the target, in float32 before the rounding (its lane recomputed and stored again)
    if (stream) store_fence();
    vf w = grad(target_u, target_ur);
    w[0] += c_lp;
    store_tail<D>(out + target, 1, w);
  }
}

template <class D, class DR, bool kReverse>
void divergence_backward(const void* student, const Rows& rs, const void* teacher, const Rows& rt, void* grad_out,
                         int64_t out_stride_b, int64_t out_stride_t, const int64_t* ids, const double* lse,
                         const double* lse_r, const float* k, const float* c, const float* c_lp, float tau,
                         int nthreads) {
  const auto* z = static_cast<const typename D::T*>(student);
  const auto* zr = static_cast<const typename DR::T*>(teacher);
  auto* out = static_cast<typename D::T*>(grad_out);
  const int64_t bytes = rs.rows * rs.vocab * static_cast<int64_t>(sizeof(typename D::T));
  const bool stream = grad_out != student && bytes >= kStreamBytes;
  const bool contiguous_out =
      out_stride_t == rs.vocab && (rs.rows == rs.seq_len || out_stride_b == rs.seq_len * rs.vocab);
  if (stream && contiguous_out) advise_huge_pages(grad_out, bytes);
  parallel_rows(rs.rows, rs.vocab, nthreads, [&](int64_t n) {
    typename D::T* o = out + (n / rs.seq_len) * out_stride_b + (n % rs.seq_len) * out_stride_t;
    if (ids[n] < 0) {
      std::memset(static_cast<void*>(o), 0, rs.vocab * sizeof(typename D::T));
      return;
    }
    divergence_backward_row<D, DR, kReverse>(z + rs.offset(n), zr + rt.offset(n), o, rs.vocab, ids[n], tau, lse[n],
                                             lse_r[n], k[n], c[n], c_lp == nullptr ? 0.0f : c_lp[n], stream);
  });
}

// Calls f(D{}, DR{}) for the two dtype codes; 1 when either is not compiled in.
template <class F>
int dispatch_pair(int dtype, int dtype_r, F f) {
  auto second = [&](auto d) {
    switch (dtype_r) {
      case kFloat32:
        f(d, F32{});
        return 0;
      case kBFloat16:
        f(d, BF16{});
        return 0;
#if defined(__FLT16_MAX__)
      case kFloat16:
        f(d, F16{});
        return 0;
#endif
      default:
        return 1;
    }
  };
  switch (dtype) {
    case kFloat32:
      return second(F32{});
    case kBFloat16:
      return second(BF16{});
#if defined(__FLT16_MAX__)
    case kFloat16:
      return second(F16{});
#endif
    default:
      return 1;
  }
}

enum Kind : int { kReverseKL = 0, kForwardKL = 1 };

}  // namespace

extern "C" {

// Bit i set: dtype i is compiled in (0 float32, 1 bfloat16, 2 float16).
int grpo_cpu_dtypes() {
#if defined(__FLT16_MAX__)
  return 0b111;
#else
  return 0b011;
#endif
}

// lp, lse [N] and entropy [N] (nullptr: not computed) of logits [B, T, V] (strides in elements, unit along V).
// Returns 0, or 1 for a dtype that is not compiled in.
int grpo_cpu_token_logprobs_forward(const void* logits, int dtype, int64_t batch, int64_t seq_len, int64_t vocab,
                                    int64_t stride_b, int64_t stride_t, const int64_t* ids, float temperature,
                                    float* lp, float* lse, float* entropy, int nthreads) {
  const Rows r{batch * seq_len, seq_len, vocab, stride_b, stride_t};
  return dispatch<Forward>(dtype, entropy != nullptr, temperature != 1.0f, logits, r, ids, temperature, lp, lse,
                           entropy, nthreads);
}

// grad_out [B, T, V] (its own strides; may be the logits themselves) from lse, entropy, g = grad_lp / tau and
// gh = grad_entropy / tau [N] (gh nullptr: no entropy term), zero on rows with ids < 0.
int grpo_cpu_token_logprobs_backward(const void* logits, int dtype, int64_t batch, int64_t seq_len, int64_t vocab,
                                     int64_t stride_b, int64_t stride_t, void* grad_out, int64_t out_stride_b,
                                     int64_t out_stride_t, const int64_t* ids, const float* lse, const float* entropy,
                                     const float* g, const float* gh, float temperature, int nthreads) {
  const Rows r{batch * seq_len, seq_len, vocab, stride_b, stride_t};
  return dispatch<Backward>(dtype, gh != nullptr, temperature != 1.0f, logits, r, grad_out, out_stride_b,
                            out_stride_t, ids, lse, entropy, g, gh, temperature, nthreads);
}

// Divergence kind (0 reverse_kl, 1 forward_kl) of student [B, T, V] against teacher [B, T, V] (own strides, unit
// along V, their own dtypes): div, kl_student, kl_teacher [N] float32, lse, lse_ref [N] float64, lp [N] (nullptr:
// not computed). Returns 0, 1 for a dtype that is not compiled in, 2 for an unknown kind.
int grpo_cpu_divergence_forward(const void* student, int dtype, int64_t s_stride_b, int64_t s_stride_t,
                                const void* teacher, int dtype_r, int64_t t_stride_b, int64_t t_stride_t,
                                int64_t batch, int64_t seq_len, int64_t vocab, const int64_t* ids, int kind,
                                float temperature, float* div, float* lp, double* lse, double* lse_ref,
                                float* kl_student, float* kl_teacher, int nthreads) {
  if (kind != kReverseKL && kind != kForwardKL) return 2;
  const Rows rs{batch * seq_len, seq_len, vocab, s_stride_b, s_stride_t};
  const Rows rt{batch * seq_len, seq_len, vocab, t_stride_b, t_stride_t};
  return dispatch_pair(dtype, dtype_r, [&](auto d, auto dr) {
    using D = decltype(d);
    using DR = decltype(dr);
    auto run = kind == kReverseKL ? divergence_forward<D, DR, true> : divergence_forward<D, DR, false>;
    run(student, rs, teacher, rt, ids, temperature, div, lp, lse, lse_ref, kl_student, kl_teacher, nthreads);
  });
}

// The student's gradient into grad_out [B, T, V] (the student's dtype, its own strides; may be the student itself)
// from lse, lse_ref [N] float64, k [N] (kl_student for reverse_kl, unused for forward_kl), c = grad_div / tau and
// c_lp = grad_lp / tau [N] float32 (0 on rows with ids < 0; c_lp nullptr: no lp term). Returns as the forward.
int grpo_cpu_divergence_backward(const void* student, int dtype, int64_t s_stride_b, int64_t s_stride_t,
                                 const void* teacher, int dtype_r, int64_t t_stride_b, int64_t t_stride_t,
                                 int64_t batch, int64_t seq_len, int64_t vocab, void* grad_out, int64_t out_stride_b,
                                 int64_t out_stride_t, const int64_t* ids, const double* lse, const double* lse_ref,
                                 const float* k, const float* c, const float* c_lp, int kind, float temperature,
                                 int nthreads) {
  if (kind != kReverseKL && kind != kForwardKL) return 2;
  const Rows rs{batch * seq_len, seq_len, vocab, s_stride_b, s_stride_t};
  const Rows rt{batch * seq_len, seq_len, vocab, t_stride_b, t_stride_t};
  return dispatch_pair(dtype, dtype_r, [&](auto d, auto dr) {
    using D = decltype(d);
    using DR = decltype(dr);
    auto run = kind == kReverseKL ? divergence_backward<D, DR, true> : divergence_backward<D, DR, false>;
    run(student, rs, teacher, rt, grad_out, out_stride_b, out_stride_t, ids, lse, lse_ref, k, c, c_lp, temperature,
        nthreads);
  });
}

}  // extern "C"
