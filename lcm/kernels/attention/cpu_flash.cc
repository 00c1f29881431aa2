// FlashAttention forward for the CPU, an XLA FFI custom call (lcm.kernels.attention.cpu).
//
// The same algorithm as lcm.ops.attention.chunked_attention (Dao et al. 2022: query tiles x key blocks, online
// softmax, fully masked blocks skipped) with what XLA's CPU backend cannot do in a fused loop: each (batch, KV
// head, query tile) is one task on XLA's intra-op thread pool, and the score tile stays in cache between the
// Q.K^T micro-kernel, the softmax pass (max, exp, sum in one sweep over a row) and the P.V micro-kernel. GQA
// without repeating keys: the rows of a tile are the (query, group) pairs of one KV head.
//
// Visibility (lcm.ops.masks.visibility_mask): query slot q sees key slot s iff s <= q, s < kv_length and, with a
// window, q - s < window or s < sinks; with left padding (kv_start[b], lcm.ops.masks.left_padding), a
// query at q >= kv_start[b] sees no key below kv_start[b] (padding queries see only padding keys, which the causal
// rule already gives). A row that sees no key gets zeros.
//
// Layouts (float32): q [B, T, H, D], k and v one layer's heads-first cache [B, K, S, D], out [B, T, H, D].
// AVX2 + FMA intrinsics; built with -march=native on first use.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include <immintrin.h>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// 8 float lanes (AVX2 + FMA)
typedef __m256 f8;

inline f8 load8(const float* p) { return _mm256_loadu_ps(p); }
inline void store8(float* p, f8 v) { _mm256_storeu_ps(p, v); }
inline f8 splat8(float x) { return _mm256_set1_ps(x); }
inline f8 fma8(f8 a, f8 b, f8 c) { return _mm256_fmadd_ps(a, b, c); }

// exp on 8 lanes: Cephes' expf (Cody-Waite reduction, degree-5 polynomial, ~1 ulp); exactly 0 below -87.3
// (-inf included), so masked scores give probability 0.
inline f8 exp8(f8 x) {
  const f8 lo = splat8(-87.33654f);
  const f8 xc = _mm256_min_ps(_mm256_max_ps(x, lo), splat8(88.3762626647949f));
  const f8 n = _mm256_round_ps(_mm256_mul_ps(xc, splat8(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  f8 r = fma8(n, splat8(-0.693359375f), xc);
  r = fma8(n, splat8(2.12194440e-4f), r);
  f8 p = splat8(1.9875691500e-4f);
  p = fma8(p, r, splat8(1.3981999507e-3f));
  p = fma8(p, r, splat8(8.3334519073e-3f));
  p = fma8(p, r, splat8(4.1665795894e-2f));
  p = fma8(p, r, splat8(1.6666665459e-1f));
  p = fma8(p, r, splat8(5.0000001201e-1f));
  const f8 y = fma8(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, splat8(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const f8 out = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
  return _mm256_and_ps(out, _mm256_cmp_ps(x, lo, _CMP_GE_OQ));
}

inline float hmax8(f8 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}
inline float hsum8(f8 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

struct Problem {
  const float* q;
  const int32_t* kv_start;  // [B]: the first slot of each row's prompt (left padding; all 0 without)
  const float* k;  // one layer's heads-first cache: [B, K, S, D]
  const float* v;
  float* out;
  int64_t batch, q_len, heads, kv_heads, cap, dim, group;
  int64_t q_offset, kv_length, window, sinks;  // window < 0: none
  int64_t q_tile, kv_block;
  float scale;
  // key splits per query tile (split-K, for decode steps: too few tiles to keep every thread busy); with more than
  // one, each split leaves its row max, row sum and unnormalised output in `partial`, combined at the end
  int64_t splits = 1, split_keys = 0;
  float* partial = nullptr;
  int64_t tile_rows() const { return std::min(q_tile, q_len) * group; }
};

constexpr int64_t kRows = 6;  // rows per micro-kernel call: 12 accumulators, enough to hide FMA latency

// The micro-kernels take the head dim and key block as template constants where they are known (DIM, KB > 0):
// the six rows' operands are then immediate offsets from one pointer, and the loop keeps its counters in registers
// (with runtime strides GCC spilled them: 4-8% slower at 4k, BENCHMARKS.md). 0 means "read it from the argument".

// S[R, KB] = Q[R, D] . Kt[D, KB]; R a multiple of kRows, KB of 16. Each call keeps a 6 x 16 block in registers.
template <int64_t DIM, int64_t KB>
void scores_tile_t(const float* q, const float* kt, float* s, int64_t rows, int64_t kb_arg, int64_t dim_arg) {
  const int64_t kb = KB ? KB : kb_arg, dim = DIM ? DIM : dim_arg;
  for (int64_t r = 0; r < rows; r += kRows) {
    const float* q0 = q + r * dim;
    for (int64_t c = 0; c < kb; c += 16) {
      f8 a[kRows][2];
      for (int i = 0; i < kRows; ++i) a[i][0] = a[i][1] = _mm256_setzero_ps();
      const float* kp = kt + c;
      for (int64_t d = 0; d < dim; ++d, kp += kb) {
        const f8 k0 = load8(kp), k1 = load8(kp + 8);
#pragma GCC unroll 6
        for (int i = 0; i < kRows; ++i) {
          const f8 x = splat8(q0[i * dim + d]);
          a[i][0] = fma8(x, k0, a[i][0]);
          a[i][1] = fma8(x, k1, a[i][1]);
        }
      }
#pragma GCC unroll 6
      for (int i = 0; i < kRows; ++i) {
        store8(s + (r + i) * kb + c, a[i][0]);
        store8(s + (r + i) * kb + c + 8, a[i][1]);
      }
    }
  }
}

// O[R, D] += P[R, KB] . V[KB, D]; R a multiple of kRows, D of 16.
template <int64_t DIM, int64_t KB>
void pv_tile_t(const float* p, const float* v, float* o, int64_t rows, int64_t kb_arg, int64_t dim_arg) {
  const int64_t kb = KB ? KB : kb_arg, dim = DIM ? DIM : dim_arg;
  for (int64_t r = 0; r < rows; r += kRows) {
    const float* p0 = p + r * kb;
    for (int64_t c = 0; c < dim; c += 16) {
      float* o0 = o + r * dim + c;
      f8 a[kRows][2];
#pragma GCC unroll 6
      for (int i = 0; i < kRows; ++i) {
        a[i][0] = load8(o0 + i * dim);
        a[i][1] = load8(o0 + i * dim + 8);
      }
      const float* vp = v + c;
      for (int64_t s = 0; s < kb; ++s, vp += dim) {
        const f8 v0 = load8(vp), v1 = load8(vp + 8);
#pragma GCC unroll 6
        for (int i = 0; i < kRows; ++i) {
          const f8 x = splat8(p0[i * kb + s]);
          a[i][0] = fma8(x, v0, a[i][0]);
          a[i][1] = fma8(x, v1, a[i][1]);
        }
      }
#pragma GCC unroll 6
      for (int i = 0; i < kRows; ++i) {
        store8(o0 + i * dim, a[i][0]);
        store8(o0 + i * dim + 8, a[i][1]);
      }
    }
  }
}

// specialised for the default key block and the usual head dims (SmolLM2 64, Llama 128), generic otherwise
void scores_tile(const float* q, const float* kt, float* s, int64_t rows, int64_t kb, int64_t dim) {
  if (kb == 64 && dim == 64) return scores_tile_t<64, 64>(q, kt, s, rows, kb, dim);
  if (kb == 64 && dim == 128) return scores_tile_t<128, 64>(q, kt, s, rows, kb, dim);
  scores_tile_t<0, 0>(q, kt, s, rows, kb, dim);
}

void pv_tile(const float* p, const float* v, float* o, int64_t rows, int64_t kb, int64_t dim) {
  if (kb == 64 && dim == 64) return pv_tile_t<64, 64>(p, v, o, rows, kb, dim);
  if (kb == 64 && dim == 128) return pv_tile_t<128, 64>(p, v, o, rows, kb, dim);
  pv_tile_t<0, 0>(p, v, o, rows, kb, dim);
}

inline int64_t padded_rows(int64_t rows) { return (rows + kRows - 1) / kRows * kRows; }

struct Scratch {
  std::vector<float> q, kt, s, o, m, l, block_max, sub, correction;
  Scratch(const Problem& p) {
    const int64_t rows = padded_rows(p.tile_rows());
    q.resize(rows * p.dim);
    kt.resize(p.dim * p.kv_block);
    s.resize(rows * p.kv_block);
    o.resize(rows * p.dim);
    // per-row statistics are read 8 rows at a time: padded to a multiple of 8
    const int64_t rows8 = (rows + 7) / 8 * 8;
    for (auto* v : {&m, &l, &block_max, &sub, &correction}) v->resize(rows8);
  }
};

// dst[c * ld_dst + r] = src[r * ld_src + c] for an 8 x 8 block
inline void transpose8x8(const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
  f8 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = load8(src + i * ld_src);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    store8(dst + i * ld_dst, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    store8(dst + (i + 4) * ld_dst, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}

// The partial results of one split: tile_rows() row maxima, tile_rows() row sums, tile_rows() x dim outputs.
inline float* partial_slot(const Problem& p, int64_t b, int64_t kv, int64_t tile, int64_t split) {
  const int64_t tiles = (p.q_len + p.q_tile - 1) / p.q_tile;
  const int64_t index = ((b * p.kv_heads + kv) * tiles + tile) * p.splits + split;
  return p.partial + index * p.tile_rows() * (p.dim + 2);
}

// One (batch row, KV head, query tile, key split): rows r = t * group + g for query t of the tile and head
// kv * group + g; the split covers keys [split * split_keys, (split + 1) * split_keys).
void run_tile(const Problem& p, Scratch& w, int64_t b, int64_t kv, int64_t tile, int64_t split) {
  const int64_t t0 = tile * p.q_tile, nt = std::min(p.q_tile, p.q_len - t0);
  // rows [used, rows) pad the tile to whole micro-kernel calls: zero queries whose probabilities are set to 0
  const int64_t used = nt * p.group, rows = padded_rows(used), dim = p.dim, kb = p.kv_block;
  std::fill(w.q.begin(), w.q.end(), 0.0f);
  for (int64_t t = 0; t < nt; ++t)
    for (int64_t g = 0; g < p.group; ++g) {
      const float* src = p.q + ((b * p.q_len + t0 + t) * p.heads + kv * p.group + g) * dim;
      float* dst = w.q.data() + (t * p.group + g) * dim;
      for (int64_t d = 0; d < dim; ++d) dst[d] = src[d] * p.scale;
    }
  std::fill(w.o.begin(), w.o.end(), 0.0f);
  std::fill(w.m.begin(), w.m.end(), -INFINITY);
  std::fill(w.l.begin(), w.l.end(), 0.0f);
  std::fill(w.block_max.begin(), w.block_max.end(), -INFINITY);

  const int64_t first_q = p.q_offset + t0, last_q = first_q + nt - 1;
  const int64_t end = std::min({last_q + 1, p.kv_length, p.cap});  // keys [0, end) may be visible
  const float* kbase = p.k + (b * p.kv_heads + kv) * p.cap * dim;
  const float* vbase = p.v + (b * p.kv_heads + kv) * p.cap * dim;
  int64_t win_lo = 0;  // with a window, keys in [sinks, first_q - window + 1) are invisible to every row
  if (p.window >= 0) win_lo = std::max<int64_t>(0, first_q - p.window + 1);
  // left padding: a row at slot >= pad sees no key below pad; when every row of the tile is a prompt row, blocks
  // that end at or below pad are skipped
  const int64_t pad = p.kv_start[b];
  const int64_t pad_lo = first_q >= pad ? pad : 0;

  const int64_t key_lo = split * p.split_keys;  // a multiple of kb
  const int64_t key_hi = p.splits == 1 ? end : std::min(end, key_lo + p.split_keys);
  for (int64_t start = key_lo; start < key_hi; start += kb) {
    const int64_t n = std::min(kb, end - start);
    if (p.window >= 0 && start + n <= win_lo && start >= p.sinks) continue;  // between the sinks and the window
    if (start + n <= pad_lo) continue;  // left padding, for every row
    // the keys of this block that every row sees need no mask
    bool all_visible = n == kb && start + n - 1 <= first_q && (start >= pad || last_q < pad);
    if (p.window >= 0) all_visible = all_visible && (last_q - start < p.window || start + n <= p.sinks);
    const int64_t whole = n / 8 * 8;  // Kt[d, s] = K[start + s, d]: 8 x 8 blocks, then the ragged tail
    for (int64_t s = 0; s < whole; s += 8)
      for (int64_t d = 0; d < dim; d += 8) transpose8x8(kbase + (start + s) * dim + d, dim, w.kt.data() + d * kb + s, kb);
    for (int64_t d = 0; d < dim; ++d)
      for (int64_t s = whole; s < kb; ++s) w.kt[d * kb + s] = s < n ? kbase[(start + s) * dim + d] : 0.0f;
    scores_tile(w.q.data(), w.kt.data(), w.s.data(), rows, kb, dim);
    // mask: row r (query slot qs) sees block keys [0, hi) and, with a window, not [sinks, lo) (block-relative)
    for (int64_t r = 0; r < rows; ++r) {
      float* srow = w.s.data() + r * kb;
      if (r >= used) {
        std::fill(srow, srow + kb, -INFINITY);
        continue;
      }
      if (all_visible) continue;
      const int64_t qs = first_q + r / p.group;
      const int64_t hi = std::clamp<int64_t>(std::min(qs + 1, p.kv_length) - start, 0, kb);
      std::fill(srow + std::min(hi, n), srow + kb, -INFINITY);
      if (qs >= pad && pad > start) std::fill(srow, srow + std::min(pad - start, kb), -INFINITY);
      if (p.window >= 0) {
        const int64_t lo = std::clamp<int64_t>(qs - p.window + 1 - start, 0, kb);
        const int64_t sink_end = std::clamp<int64_t>(p.sinks - start, 0, kb);
        if (sink_end < lo) std::fill(srow + sink_end, srow + lo, -INFINITY);
      }
    }
    // online softmax (Dao et al. 2022): new row maxima, then rescale factors for all rows at once, then
    // exp and row sums in one sweep per row while the tile is in cache
    for (int64_t r = 0; r < rows; ++r) {
      const float* srow = w.s.data() + r * kb;
      f8 mx = splat8(-INFINITY);
      for (int64_t s = 0; s < kb; s += 8) mx = _mm256_max_ps(load8(srow + s), mx);
      w.block_max[r] = hmax8(mx);
    }
    const f8 neg_inf = splat8(-INFINITY);
    for (int64_t r = 0; r < rows; r += 8) {
      const f8 old = load8(w.m.data() + r);
      const f8 nm = _mm256_max_ps(old, load8(w.block_max.data() + r));
      // a row that has seen no key yet keeps max -inf: subtracting 0 instead gives exp(-inf) = 0, not NaN
      const f8 sub = _mm256_blendv_ps(nm, _mm256_setzero_ps(), _mm256_cmp_ps(nm, neg_inf, _CMP_EQ_OQ));
      store8(w.m.data() + r, nm);
      store8(w.sub.data() + r, sub);
      store8(w.correction.data() + r, exp8(_mm256_sub_ps(old, sub)));
    }
    for (int64_t r = 0; r < rows; ++r) {
      float* srow = w.s.data() + r * kb;
      const f8 sub = splat8(w.sub[r]);
      f8 sum = _mm256_setzero_ps();
      for (int64_t s = 0; s < kb; s += 8) {
        const f8 e = exp8(_mm256_sub_ps(load8(srow + s), sub));
        store8(srow + s, e);
        sum = _mm256_add_ps(sum, e);
      }
      const float correction = w.correction[r];
      w.l[r] = w.l[r] * correction + hsum8(sum);
      if (correction != 1.0f) {
        float* orow = w.o.data() + r * dim;
        const f8 c = splat8(correction);
        for (int64_t d = 0; d < dim; d += 8) store8(orow + d, _mm256_mul_ps(load8(orow + d), c));
      }
    }
    const float* vblk = vbase + start * dim;
    if (n == kb) {
      pv_tile(w.s.data(), vblk, w.o.data(), rows, kb, dim);
    } else {  // a partial last block: copy its values and pad with zero rows (their probabilities are 0)
      std::vector<float> vpad(kb * dim, 0.0f);
      std::memcpy(vpad.data(), vblk, n * dim * sizeof(float));
      pv_tile(w.s.data(), vpad.data(), w.o.data(), rows, kb, dim);
    }
  }
  if (p.splits > 1) {  // row max, row sum, unnormalised output: combined by combine_splits
    float* slot = partial_slot(p, b, kv, tile, split);
    const int64_t tr = p.tile_rows();
    std::copy(w.m.begin(), w.m.begin() + tr, slot);
    std::copy(w.l.begin(), w.l.begin() + tr, slot + tr);
    std::copy(w.o.begin(), w.o.begin() + tr * dim, slot + 2 * tr);
    return;
  }
  for (int64_t t = 0; t < nt; ++t)
    for (int64_t g = 0; g < p.group; ++g) {
      const int64_t r = t * p.group + g;
      float* dst = p.out + ((b * p.q_len + t0 + t) * p.heads + kv * p.group + g) * dim;
      const float inv = w.l[r] > 0.0f ? 1.0f / w.l[r] : 0.0f;
      for (int64_t d = 0; d < dim; ++d) dst[d] = w.o[r * dim + d] * inv;
    }
}

// The splits of one (batch row, KV head, query tile) merged as in FlashDecoding: m = max_s m_s,
// l = sum_s l_s exp(m_s - m), out = sum_s o_s exp(m_s - m) / l. A split that saw no key has l_s = 0 and is skipped.
void combine_splits(const Problem& p, int64_t b, int64_t kv, int64_t tile) {
  const int64_t t0 = tile * p.q_tile, nt = std::min(p.q_tile, p.q_len - t0), tr = p.tile_rows(), dim = p.dim;
  std::vector<float> acc(dim);
  for (int64_t t = 0; t < nt; ++t)
    for (int64_t g = 0; g < p.group; ++g) {
      const int64_t r = t * p.group + g;
      float m = -INFINITY;
      for (int64_t s = 0; s < p.splits; ++s) {
        const float* slot = partial_slot(p, b, kv, tile, s);
        if (slot[tr + r] > 0.0f) m = std::max(m, slot[r]);
      }
      float l = 0.0f;
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t s = 0; s < p.splits; ++s) {
        const float* slot = partial_slot(p, b, kv, tile, s);
        if (!(slot[tr + r] > 0.0f)) continue;
        const float c = std::exp(slot[r] - m);
        l += slot[tr + r] * c;
        const float* o = slot + 2 * tr + r * dim;
        for (int64_t d = 0; d < dim; ++d) acc[d] += o[d] * c;
      }
      float* dst = p.out + ((b * p.q_len + t0 + t) * p.heads + kv * p.group + g) * dim;
      const float inv = l > 0.0f ? 1.0f / l : 0.0f;
      for (int64_t d = 0; d < dim; ++d) dst[d] = acc[d] * inv;
    }
}

struct Shared {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> active{0};
};

ffi::Error FlashForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                        ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> q_offset,
                        ffi::Buffer<ffi::S32> kv_length, ffi::Buffer<ffi::S32> kv_start,
                        ffi::ResultBuffer<ffi::F32> out, int64_t window, int64_t sinks, int64_t q_tile,
                        int64_t long_q_tile, int64_t long_keys, int64_t kv_block, int64_t min_split_keys,
                        float scale) {
  const auto qd = q.dimensions(), kd = k.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || v.dimensions().size() != 4)
    return ffi::Error::InvalidArgument("q must be [B,T,H,D], k and v [B,K,S,D]");
  Problem p;
  p.batch = qd[0]; p.q_len = qd[1]; p.heads = qd[2]; p.dim = qd[3];
  p.kv_heads = kd[1]; p.cap = kd[2];
  p.group = p.heads / p.kv_heads;
  if (kv_start.dimensions().size() != 1 || kv_start.dimensions()[0] != p.batch)
    return ffi::Error::InvalidArgument("kv_start must be [B]");
  p.q = q.typed_data();
  p.kv_start = kv_start.typed_data();
  p.k = k.typed_data();
  p.v = v.typed_data();
  p.out = out->typed_data();
  p.q_offset = q_offset.typed_data()[0];
  p.kv_length = std::min<int64_t>(kv_length.typed_data()[0], p.cap);
  p.window = window; p.sinks = sinks;
  p.kv_block = kv_block; p.scale = scale;
  if (p.dim % 16 || kv_block % 16 || kv_block <= 0 || q_tile <= 0 || long_q_tile <= 0)
    return ffi::Error::InvalidArgument("head_dim and kv_block must be positive multiples of 16, the q tiles positive");

  // Every query tile reads the keys and values it sees once: a call that sees many keys (a late chunk of a long
  // prefill) takes longer tiles, which read them fewer times (BENCHMARKS.md: -16% over a 16k prefill, a tie at 8k).
  const int64_t keys = std::min({p.q_offset + p.q_len, p.kv_length, p.cap});
  p.q_tile = long_keys > 0 && keys >= long_keys ? long_q_tile : q_tile;
  const int64_t tiles = (p.q_len + p.q_tile - 1) / p.q_tile;
  const int64_t threads = std::max<int64_t>(pool.num_threads(), 1);
  // Split-K when there are fewer tiles than threads to keep busy (a decode step has one tile per KV head): the
  // visible keys are cut into whole key blocks, at least min_split_keys each, so that every thread gets ~4 items.
  std::vector<float> partial;
  const int64_t base_items = p.batch * p.kv_heads * tiles;
  if (base_items < 2 * threads && keys > 0 && min_split_keys > 0) {
    const int64_t want = (4 * threads + base_items - 1) / base_items;
    const int64_t blocks = (keys + kv_block - 1) / kv_block;
    const int64_t min_blocks = (min_split_keys + kv_block - 1) / kv_block;
    const int64_t splits = std::max<int64_t>(1, std::min(want, blocks / min_blocks));
    if (splits > 1) {
      p.split_keys = (blocks + splits - 1) / splits * kv_block;
      p.splits = (keys + p.split_keys - 1) / p.split_keys;
      partial.resize(base_items * p.splits * p.tile_rows() * (p.dim + 2));
      p.partial = partial.data();
    }
  }
  const int64_t items = base_items * p.splits;
  auto shared = std::make_shared<Shared>();
  // items in order of decreasing work (later query tiles see more keys), pulled from one counter by every thread
  auto work = [p, items, tiles, shared]() {
    shared->active.fetch_add(1);
    Scratch w(p);
    for (int64_t i = shared->next.fetch_add(1); i < items; i = shared->next.fetch_add(1)) {
      const int64_t split = i % p.splits, j = i / p.splits;
      const int64_t tile = tiles - 1 - j / (p.batch * p.kv_heads);
      const int64_t rest = j % (p.batch * p.kv_heads);
      run_tile(p, w, rest / p.kv_heads, rest % p.kv_heads, tile, split);
    }
    shared->active.fetch_sub(1);
  };
  const int64_t helpers = std::min<int64_t>(threads - 1, items - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule(decltype(work)(work));
  work();
  // a helper that starts late finds no item left; wait only for those still working
  while (shared->active.load() > 0) std::this_thread::yield();
  if (p.splits > 1)
    for (int64_t b = 0; b < p.batch; ++b)
      for (int64_t kv = 0; kv < p.kv_heads; ++kv)
        for (int64_t tile = 0; tile < tiles; ++tile) combine_splits(p, b, kv, tile);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LcmCpuFlashForward, FlashForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("window")
                                  .Attr<int64_t>("sinks")
                                  .Attr<int64_t>("q_tile")
                                  .Attr<int64_t>("long_q_tile")
                                  .Attr<int64_t>("long_keys")
                                  .Attr<int64_t>("kv_block")
                                  .Attr<int64_t>("min_split_keys")
                                  .Attr<float>("scale"));
