// The fused low-bit AdamW step for CPU tensors: decode -> AdamW -> encode, one pass per quantization
// block, every tensor of a bucket in one call. Plain C++ (no torch headers, so it builds in a second or
// two), loaded with ctypes by lowbit_adamw/cpu_kernel.py, which documents the arguments.
//
// The arithmetic is lowbit_adamw.step_spec's, operation for operation: IEEE multiply, add, divide and
// square root, each rounded on its own (built with -ffp-contract=off, no -ffast-math), so the results
// are the eager PyTorch path's to the bit. The state format is lowbit_adamw.format's (v4).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace {

constexpr int kMaxBlock = 4096;

struct Consts {  // per call: the step's scalars (fp32, as the other backends use them)
  float decay, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, clip;
  const float* m4_levels;  // 16
  const float* m4_bounds;  // 15
};

struct Tensor {  // per tensor
  void* p;
  const void* g;
  uint8_t* mc; float* ma;
  uint8_t* vc; float* va;
  uint8_t* xc; float* xa;
  float* ema;
  int64_t numel;
  float step_size, inv_bc2_sqrt, grad_mul, ema_mom, one_minus_ema_mom;
  uint32_t sr_key;  // lowbit_adamw.rng: the key of this tensor's stochastic rounding of the weights at this step
  uint32_t v_key, v_offset;  // lowbit_adamw.rng: the dither of v's codes (per-tensor key, per-step Weyl offset)
  uint32_t v_dither;  // 0: no dither, u = 1/2
  int64_t index_base;  // the index of element 0 in the whole parameter (a shard's offset): what the random numbers index
};

inline float load_param(const float* p, int64_t i) { return p[i]; }
inline float load_param(const uint16_t* p, int64_t i) {
  uint32_t bits = uint32_t(p[i]) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline void store_param(float* p, int64_t i, float x) { p[i] = x; }
inline void store_param(uint16_t* p, int64_t i, float x) {  // round to nearest even (NaN stays NaN)
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  p[i] = (x != x) ? uint16_t(0x7FC0) : uint16_t(rounded);  // NaN as torch writes it
}
// lowbit_adamw/rng.py: mix32 and the uniform of element index i under a key.
inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x21F0AAADu;
  x ^= x >> 15;
  x *= 0x735A2D97u;
  return x ^ (x >> 15);
}
inline float uniform(uint32_t key, int64_t i) { return float(mix32(key ^ uint32_t(i)) >> 8) * (1.0f / 16777216.0f); }
inline float dither(uint32_t key, uint32_t offset, int64_t i) {
  return float((mix32(key ^ uint32_t(i)) + offset) >> 8) * (1.0f / 16777216.0f);
}

// functional.stochastic_round_ for bf16: toward zero, then one unit away from zero when u < the fraction of the gap.
inline void store_param_stochastic(uint16_t* p, int64_t i, float x, float u) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  const uint16_t lo = uint16_t(bits >> 16), hi = uint16_t(lo + 1);
  const uint32_t lo_bits = uint32_t(lo) << 16, hi_bits = uint32_t(hi) << 16;
  float lo32, hi32;
  std::memcpy(&lo32, &lo_bits, 4);
  std::memcpy(&hi32, &hi_bits, 4);
  const float gap = std::fabs(hi32 - lo32);
  const float frac = gap > 0.0f ? (std::fabs(x) - std::fabs(lo32)) / gap : 0.0f;
  p[i] = u < frac ? hi : lo;
}
inline void store_param_stochastic(float* p, int64_t i, float x, float) { p[i] = x; }

inline float stored_value(const float*, float x) { return x; }
inline float stored_value(const uint16_t*, float x) {
  uint16_t h;
  store_param(&h, 0, x);
  return load_param(&h, 0);
}

// Reductions over a block: max of |x|, max and min of x, NaN propagating like torch.amax / amin. Written
// with GCC/Clang vector types: compilers do not vectorize a NaN-propagating reduction written as a scalar
// loop. Four accumulators a kind: with one, every step waits on the last one's compare and blend (the
// reductions took a third of the step). (A max or min is the same in any order; the only values that
// compare equal but differ are +-0, which the step reads alike.)
#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#elif defined(__AVX__)
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;  // SSE2, NEON: wider vector types would be split piecewise
#endif
constexpr int kLanes = kVecBytes / 4;
typedef float fvec __attribute__((vector_size(kVecBytes)));
typedef int32_t ivec __attribute__((vector_size(kVecBytes)));

inline fvec vmax(fvec acc, fvec y) { return y > acc ? y : acc; }
inline fvec vmin(fvec acc, fvec y) { return y < acc ? y : acc; }

template <bool ABS>
inline fvec load_vec(const float* p) {
  fvec y;
  std::memcpy(&y, p, sizeof(y));
  if (ABS) {
    ivec bits;
    std::memcpy(&bits, &y, sizeof(y));
    bits &= 0x7FFFFFFF;
    std::memcpy(&y, &bits, sizeof(y));
  }
  return y;
}

typedef float f4 __attribute__((vector_size(16)));
typedef int32_t i4 __attribute__((vector_size(16)));
// A vector's lanes reduced in halves down to 4, then one by one (a loop over all lanes cost a quarter more).
template <bool MAX>
inline float fold(fvec v) {
  f4 parts[kLanes / 4];
  std::memcpy(parts, &v, sizeof(v));
  f4 m = parts[0];
  for (int j = 1; j < kLanes / 4; ++j) m = (MAX ? parts[j] > m : parts[j] < m) ? parts[j] : m;
  float a = m[0];
  for (int j = 1; j < 4; ++j) a = (MAX ? m[j] > a : m[j] < a) ? m[j] : a;
  return a;
}
inline int fold_or(ivec v) {
  i4 parts[kLanes / 4];
  std::memcpy(parts, &v, sizeof(v));
  i4 m = parts[0];
  for (int j = 1; j < kLanes / 4; ++j) m |= parts[j];
  return m[0] | m[1] | m[2] | m[3];
}

struct Range {
  float max, min;
};

// max of |x| (ABS) or of x, and with MIN also min of x, over x[0..n).
template <bool ABS, bool MIN>
inline Range block_range(const float* x, int n) {
  static_assert(!(ABS && MIN), "the min is of x itself: one load serves both only without ABS");
  fvec hi[4], lo[4];
  ivec nan = {};
  for (int j = 0; j < 4; ++j) {
    hi[j] = fvec{} + (ABS ? 0.0f : x[0]);  // |x| >= 0 starts from 0
    lo[j] = fvec{} + x[0];
  }
  int i = 0;
  for (; i + 4 * kLanes <= n; i += 4 * kLanes) {
    for (int j = 0; j < 4; ++j) {
      const fvec y = load_vec<ABS>(x + i + j * kLanes);
      hi[j] = vmax(hi[j], y);
      if (MIN) lo[j] = vmin(lo[j], y);
      nan |= y != y;
    }
  }
  for (; i + kLanes <= n; i += kLanes) {
    const fvec y = load_vec<ABS>(x + i);
    hi[0] = vmax(hi[0], y);
    if (MIN) lo[0] = vmin(lo[0], y);
    nan |= y != y;
  }
  fvec h = vmax(vmax(hi[0], hi[1]), vmax(hi[2], hi[3]));
  fvec l = vmin(vmin(lo[0], lo[1]), vmin(lo[2], lo[3]));
  Range r{fold<true>(h), MIN ? fold<false>(l) : 0.0f};
  int any_nan = fold_or(nan);
  for (; i < n; ++i) {
    const float y = ABS ? std::fabs(x[i]) : x[i];
    r.max = y > r.max ? y : r.max;
    if (MIN) r.min = y < r.min ? y : r.min;
    any_nan |= y != y;
  }
  if (any_nan) r.max = r.min = std::numeric_limits<float>::quiet_NaN();
  return r;
}

// Whether every gradient of a block is finite: an exponent field not all ones, tested on the stored bits (no
// conversion, no copy; the same answer as |g| <= FLT_MAX on the value, NaN and +-Inf being the all-ones ones).
typedef uint32_t __attribute__((may_alias)) alias_u32;
typedef uint16_t __attribute__((may_alias)) alias_u16;
inline bool all_finite(const float* g, int n) {
  const alias_u32* w = reinterpret_cast<const alias_u32*>(g);
  uint32_t bad = 0;
  for (int i = 0; i < n; ++i) bad |= uint32_t((w[i] & 0x7F800000u) == 0x7F800000u);
  return bad == 0;
}
inline bool all_finite(const uint16_t* g, int n) {
  const alias_u16* w = reinterpret_cast<const alias_u16*>(g);
  uint32_t bad = 0;
  for (int i = 0; i < n; ++i) bad |= uint32_t((w[i] & 0x7F80u) == 0x7F80u);
  return bad == 0;
}

// A block maximum as the magnitude of its scale (lowbit_adamw.format): saturated at FLT_MAX, flushed to 0
// below FLT_MIN so that its reciprocal never overflows; NaN stays NaN.
inline float scale_magnitude(float a) {
  a = a > 3.4028234663852886e38f ? 3.4028234663852886e38f : a;
  return a < 1.1754943508222875e-38f ? 0.0f : a;
}

// Codes of elements start .. start + n - 1 as floats (start is even at 4 bits: blocks hold an even count).
template <int BITS>
inline void load_codes(const uint8_t* codes, int64_t start, int n, float* out) {
  if (BITS == 8) {
    for (int i = 0; i < n; ++i) out[i] = float(codes[start + i]);
    return;
  }
  const uint8_t* in = codes + (start >> 1);
  for (int i = 0; i < (n + 1) / 2; ++i) {
    out[2 * i] = float(in[i] & 15);
    out[2 * i + 1] = float(in[i] >> 4);
  }
}

inline float decode_m8(float c, float a) {
  float y = (c - 127.0f) * (1.0f / 127.0f);
  return y * std::fabs(y) * a;
}

inline float level_a(float c) {  // 8-bit v, map A: fourth-root companding
  float y = c * (1.0f / 255.0f);
  y = y * y;
  return y * y;
}
inline float level_b(float c) { return (c + 255.0f) * (1.0f / 510.0f); }  // 8-bit v, map B: linear on [1/2, 1]
inline float level_v4(float c) { return (c + 1.0f) * (1.0f / 16.0f); }

// v from its code and the block's signed scale (at 8 bits a negative scale selects map B); the top code of
// a saturated block (FLT_MAX) is inf, as the v that saturated it was.
inline float saturated_to_inf(float v) { return v == 3.4028234663852886e38f ? std::numeric_limits<float>::infinity() : v; }
inline float decode_v4(float c, float a) { return saturated_to_inf(level_v4(c) * a); }

// 8-bit v from a block's codes, in place, with the map chosen once for the block (the scale's sign is the
// block's). Inside the step's loop it was a select per element with both maps evaluated; this pass made the
// 8-bit fp32 step ~7% faster on a Zen 5. At 4 bits the level is one add and one multiply, cheaper in the loop.
inline void decode_v8_block(float* __restrict__ x, float a, int n) {
  if (a < 0.0f) {
    const float s = -a;
    for (int i = 0; i < n; ++i) x[i] = saturated_to_inf(level_b(x[i]) * s);
  } else {
    for (int i = 0; i < n; ++i) x[i] = saturated_to_inf(level_a(x[i]) * a);
  }
}

// The 4-bit m map's 16-entry tables (levels; bounds, padded) in vector registers: a lookup is one permute at
// 16 lanes (AVX-512) or two and a blend at 8 (AVX2). Narrower vectors (SSE2, NEON) take the scalar loops.
constexpr bool kVectorTables = kLanes >= 8;
struct Table16 {
  fvec part[16 / kLanes > 0 ? 16 / kLanes : 1];
  explicit Table16(const float* values, int count) {
    float padded[16];
    for (int j = 0; j < 16; ++j) padded[j] = j < count ? values[j] : values[count - 1];
    std::memcpy(part, padded, sizeof(part) < sizeof(padded) ? sizeof(part) : sizeof(padded));
  }
  fvec operator[](ivec idx) const {  // idx in 0..15 per lane
    if constexpr (kLanes >= 16) return __builtin_shuffle(part[0], idx);
    else return __builtin_shuffle(part[0], part[kLanes >= 8 ? 1 : 0], idx);
  }
};

// 4-bit m codes of x[0..n) * inv into q: the number of bounds at or below s, by binary search over the 15
// sorted bounds (4 lookups, where counting takes 15 compares). A NaN passes no test and counts 0, as the count.
inline void m4_codes(const float* __restrict__ x, float inv, int n, float* __restrict__ q, const float* bounds) {
  int i = 0;
  if constexpr (kVectorTables) {
    const Table16 table(bounds, 15);
    for (; i + kLanes <= n; i += kLanes) {
      fvec xs;
      std::memcpy(&xs, x + i, sizeof(xs));
      const fvec s = xs * inv;
      ivec lo = {};
      for (int step = 8; step >= 1; step /= 2) lo += (table[lo + (step - 1)] <= s) & step;
      const fvec code = __builtin_convertvector(lo, fvec);
      std::memcpy(q + i, &code, sizeof(code));
    }
  }
  for (; i < n; ++i) {
    const float s = x[i] * inv;
    float c = 0.0f;
    for (int j = 0; j < 15; ++j) c += (s >= bounds[j]) ? 1.0f : 0.0f;
    q[i] = c;
  }
}

// 4-bit m values levels[code] * a for codes[0..n) (fp32 integers) in place.
inline void m4_decode(float* __restrict__ m, float a, int n, const float* levels) {
  int i = 0;
  if constexpr (kVectorTables) {
    const Table16 table(levels, 16);
    for (; i + kLanes <= n; i += kLanes) {
      fvec c;
      std::memcpy(&c, m + i, sizeof(c));
      const fvec y = table[__builtin_convertvector(c, ivec)] * a;
      std::memcpy(m + i, &y, sizeof(y));
    }
  }
  for (; i < n; ++i) m[i] = levels[int(m[i])] * a;
}

// 8-bit m: square-root companding, the sign applied after rounding the magnitude (4 bits: m4_codes).
inline float encode_m8(float x, float inv) {
  const float s = x * inv;
  float q = std::floor(std::sqrt(std::fabs(s)) * 127.0f + 0.5f);
  q = q > 127.0f ? 127.0f : q;
  return std::copysign(q, s) + 127.0f;
}

// v's code, rounded between the levels around s with the dither u (lowbit_adamw.format): 8-bit map A up when
// (u * (l(hi) - l(lo))) * r < (r - l(lo)) * l(hi), l the levels' square roots and r = sqrt(s) (unbiased in
// 1 / sqrt(v)); map B and 4 bits up when (s - low) > u * (high - low) (unbiased in v).
template <int BITS>
inline float encode_v(float x, float inv, bool map_b, float u) {
  const float s = x * inv;
  if (BITS == 4 || map_b) {
    float lo = BITS == 4 ? std::floor(s * 16.0f - 1.0f) : std::floor(s * 510.0f - 255.0f);
    const float top = BITS == 4 ? 14.0f : 254.0f;
    lo = lo < 0.0f ? 0.0f : (lo > top ? top : lo);
    const float low = BITS == 4 ? level_v4(lo) : level_b(lo), high = BITS == 4 ? level_v4(lo + 1.0f) : level_b(lo + 1.0f);
    return lo + (((s - low) > u * (high - low)) ? 1.0f : 0.0f);
  }
  const float r = std::sqrt(s);
  float lo = std::floor(std::sqrt(r) * 255.0f);
  lo = lo > 254.0f ? 254.0f : lo;
  const float ylo = lo * (1.0f / 255.0f), yhi = (lo + 1.0f) * (1.0f / 255.0f);
  const float low = ylo * ylo, high = yhi * yhi;
  float q = lo + (((u * (high - low)) * r < (r - low) * high || s >= 1.0f) ? 1.0f : 0.0f);  // s >= 1: saturated by inf
  if (x > 0.0f && q == 0.0f) q = 1.0f;  // a positive v never decodes to 0
  return q;
}

inline float safe_inverse(float a) { return a > 0.0f ? 1.0f / a : 0.0f; }

template <int BITS>
inline void store_codes(uint8_t* codes, int64_t start, int n, const float* q) {
  if (BITS == 8) {
    for (int i = 0; i < n; ++i) codes[start + i] = uint8_t(int(q[i]));
    return;
  }
  // start is even (blocks hold an even number of elements); an odd n leaves a 0 high nibble.
  uint8_t* out = codes + (start >> 1);
  for (int i = 0; i < n / 2; ++i) out[i] = uint8_t(int(q[2 * i]) | (int(q[2 * i + 1]) << 4));
  if (n & 1) out[n / 2] = uint8_t(int(q[n - 1]));
}

// Codes code(i) for i < n written out: at 8 bits straight into the bytes, at 4 bits through q to be packed.
template <int BITS, typename Code>
inline void emit_codes(uint8_t* codes, int64_t start, int n, float* __restrict__ q, Code code) {
  if constexpr (BITS == 8) {
    uint8_t* __restrict__ out = codes + start;
    for (int i = 0; i < n; ++i) out[i] = uint8_t(int(code(i)));
  } else {
    for (int i = 0; i < n; ++i) q[i] = code(i);
    store_codes<BITS>(codes, start, n, q);
  }
}

template <int BITS>
inline void encode_block(float* x, int n, bool is_signed, uint8_t* codes, float* absmax_out, int64_t start, const Consts& k,
                         float* q, const Tensor& t) {
  // m at 4 bits: max |m| and the side it sits on; v: max and min (map B's test) in the same pass
  const Range range = is_signed ? (BITS == 4 ? block_range<false, true>(x, n) : block_range<true, false>(x, n))
                                : block_range<false, BITS == 8>(x, n);
  const float largest = is_signed && BITS == 4 ? (-range.min > range.max ? -range.min : range.max) : range.max;
  const float a = scale_magnitude(largest);
  float scale = a;
  if (is_signed) {
    float inv = safe_inverse(a);
    if (BITS == 4 && -range.min > range.max) {  // the block's largest |m| is negative
      scale = -a;
      inv = a > 0.0f ? 1.0f / scale : 0.0f;
    }
    const float* __restrict__ xs = x;
    if constexpr (BITS == 4) {
      m4_codes(xs, inv, n, q, k.m4_bounds);
      store_codes<BITS>(codes, start, n, q);
    } else {
      emit_codes<BITS>(codes, start, n, q, [&](int i) { return encode_m8(xs[i], inv); });
    }
  } else {
    const float inv = safe_inverse(a);
    const bool map_b = BITS == 8 && a > 0.0f && range.min * inv >= 0.5f;  // min of x * inv, as the spec's
    if (map_b) scale = -a;
    // The tensor's fields in locals, and one loop per map: with the map test or a field read inside the
    // loop (q might alias them), GCC kept a scalar copy of it on the hot path (5x slower at 8 bits).
    const uint32_t key = t.v_key, offset = t.v_offset;
    const int64_t base = t.index_base + start;
    const float* __restrict__ xs = x;
    if (!t.v_dither && map_b)
      emit_codes<BITS>(codes, start, n, q, [&](int i) { return encode_v<BITS>(xs[i], inv, true, 0.5f); });
    else if (!t.v_dither)
      emit_codes<BITS>(codes, start, n, q, [&](int i) { return encode_v<BITS>(xs[i], inv, false, 0.5f); });
    else if (map_b)
      emit_codes<BITS>(codes, start, n, q, [&](int i) { return encode_v<BITS>(xs[i], inv, true, dither(key, offset, base + i)); });
    else
      emit_codes<BITS>(codes, start, n, q, [&](int i) { return encode_v<BITS>(xs[i], inv, false, dither(key, offset, base + i)); });
  }
  *absmax_out = scale;
}

// One quantization block: returns 1 if it was skipped for a non-finite gradient.
template <typename P, int BITS, bool AMSGRAD, bool EMA, bool SR>
int block_step(const Tensor& t, int64_t b, int block, const Consts& k, bool maximize, bool clip, bool skip_nonfinite) {
  const int64_t start = b * block;
  const int n = int(t.numel - start < block ? t.numel - start : block);
  // Locals and restrict: the compiler must not reload the tensor's fields through the stores.
  P* __restrict__ p = static_cast<P*>(t.p) + start;
  const P* __restrict__ g = static_cast<const P*>(t.g) + start;
  float* __restrict__ ema_out = EMA ? t.ema + start : nullptr;
  alignas(64) float m[kMaxBlock + 1], v[kMaxBlock + 1], vh[kMaxBlock + 1], q[kMaxBlock + 1];
  if (skip_nonfinite && !all_finite(g, n)) return 1;
  load_codes<BITS>(t.mc, start, n, m);
  load_codes<BITS>(t.vc, start, n, v);
  if (AMSGRAD) load_codes<BITS>(t.xc, start, n, vh);
  const float ma = t.ma[b], va = t.va[b], xa = AMSGRAD ? t.xa[b] : 0.0f;
  if (BITS == 8) {  // v and vh hold values from here on at 8 bits
    decode_v8_block(v, va, n);
    if (AMSGRAD) decode_v8_block(vh, xa, n);
  }
  const float clip_value = k.clip, sign = maximize ? -1.0f : 1.0f, grad_mul = t.grad_mul;
  const float beta1 = k.beta1, one_minus_beta1 = k.one_minus_beta1, beta2 = k.beta2, one_minus_beta2 = k.one_minus_beta2;
  const float eps = k.eps, decay = k.decay, step_size = t.step_size, inv_bc2_sqrt = t.inv_bc2_sqrt;
  const float ema_mom = t.ema_mom, one_minus_ema_mom = t.one_minus_ema_mom;
  if (BITS == 4) m4_decode(m, ma, n, k.m4_levels);  // m holds values from here on at 4 bits
  for (int i = 0; i < n; ++i) {
    float gi = load_param(g, i) * grad_mul;
    if (clip) gi = gi < -clip_value ? -clip_value : (gi > clip_value ? clip_value : gi);
    gi = gi * sign;  // -x is x * -1 exactly (NaN included, up to its sign bit, which nothing reads)
    const float old_m = BITS == 8 ? decode_m8(m[i], ma) : m[i];
    float mi = old_m * beta1 + gi * one_minus_beta1;
    float vi = (BITS == 8 ? v[i] : decode_v4(v[i], va)) * beta2 + (gi * gi) * one_minus_beta2;
    float hi = vi;
    if (AMSGRAD) {
      float xi = BITS == 8 ? vh[i] : decode_v4(vh[i], xa);
      hi = (vi > xi || vi != vi) ? vi : xi;  // torch.maximum propagates NaN
    }
    float denom = std::sqrt(hi) * inv_bc2_sqrt + eps;
    float pi = load_param(p, i) * decay - step_size * (mi / denom);
    if (SR) {
      store_param_stochastic(p, i, pi, uniform(t.sr_key, t.index_base + start + i));
      if (EMA) ema_out[i] = ema_out[i] * ema_mom + load_param(p, i) * one_minus_ema_mom;
    } else {
      if (EMA) ema_out[i] = ema_out[i] * ema_mom + stored_value(p, pi) * one_minus_ema_mom;
      store_param(p, i, pi);
    }
    m[i] = mi;
    v[i] = vi;
    if (AMSGRAD) vh[i] = hi;
  }
  encode_block<BITS>(m, n, true, t.mc, t.ma + b, start, k, q, t);
  encode_block<BITS>(v, n, false, t.vc, t.va + b, start, k, q, t);
  if (AMSGRAD) encode_block<BITS>(vh, n, false, t.xc, t.xa + b, start, k, q, t);
  return 0;
}

template <typename P, int BITS, bool AMSGRAD, bool EMA, bool SR>
void run(const Tensor* tensors, int64_t num_tensors, const int64_t* block_start, int block, const Consts& k, bool maximize,
         bool clip, bool skip_nonfinite, int32_t* bad_blocks, int threads) {
  const int64_t total = block_start[num_tensors];
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t gb = 0; gb < total; ++gb) {
    int64_t lo = 0, hi = num_tensors;  // the tensor that owns global block gb: block_start[lo] <= gb < block_start[lo + 1]
    while (hi - lo > 1) {
      int64_t mid = (lo + hi) / 2;
      if (block_start[mid] <= gb) lo = mid; else hi = mid;
    }
    if (block_step<P, BITS, AMSGRAD, EMA, SR>(tensors[lo], gb - block_start[lo], block, k, maximize, clip, skip_nonfinite)) {
#pragma omp atomic
      bad_blocks[lo] += 1;
    }
  }
}

template <typename P, int BITS, bool SR>
void dispatch_flags(const Tensor* t, int64_t nt, const int64_t* bs, int block, const Consts& k, bool amsgrad, bool maximize,
                    bool clip, bool ema, bool skip, int32_t* bad, int threads) {
  if (amsgrad && ema) run<P, BITS, true, true, SR>(t, nt, bs, block, k, maximize, clip, skip, bad, threads);
  else if (amsgrad) run<P, BITS, true, false, SR>(t, nt, bs, block, k, maximize, clip, skip, bad, threads);
  else if (ema) run<P, BITS, false, true, SR>(t, nt, bs, block, k, maximize, clip, skip, bad, threads);
  else run<P, BITS, false, false, SR>(t, nt, bs, block, k, maximize, clip, skip, bad, threads);
}

}  // namespace

extern "C" int lowbit_cpu_step(const void* tensors, int64_t num_tensors, const int64_t* block_start, int block, int bits,
                               int param_is_bf16, const float* scalars, const float* m4_levels, const float* m4_bounds,
                               int amsgrad, int maximize, int clip, int ema, int skip_nonfinite, int stochastic,
                               int32_t* bad_blocks, int threads) {
  if (block > kMaxBlock || block % 2 || (bits != 8 && bits != 4) || (stochastic && !param_is_bf16)) return 1;
  const Consts k{scalars[0], scalars[1], scalars[2], scalars[3], scalars[4], scalars[5], scalars[6], m4_levels, m4_bounds};
  const Tensor* t = static_cast<const Tensor*>(tensors);
#define LOWBIT_DISPATCH(P, B, S) dispatch_flags<P, B, S>(t, num_tensors, block_start, block, k, amsgrad, maximize, clip, ema, skip_nonfinite, bad_blocks, threads)
  if (!param_is_bf16) {
    if (bits == 8) LOWBIT_DISPATCH(float, 8, false);
    else LOWBIT_DISPATCH(float, 4, false);
  } else if (stochastic) {
    if (bits == 8) LOWBIT_DISPATCH(uint16_t, 8, true);
    else LOWBIT_DISPATCH(uint16_t, 4, true);
  } else {
    if (bits == 8) LOWBIT_DISPATCH(uint16_t, 8, false);
    else LOWBIT_DISPATCH(uint16_t, 4, false);
  }
#undef LOWBIT_DISPATCH
  return 0;
}

extern "C" int lowbit_tensor_struct_size() { return int(sizeof(Tensor)); }
