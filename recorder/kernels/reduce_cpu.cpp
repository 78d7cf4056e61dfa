// The recorder's per-batch reduction on the CPU, for one layer: quadrant
// counts, sums, the near-zero end of every list, and each text's most extreme
// token per list merged into sorted top-k lists with its activation window.
//
// Built on first use by recorder/reduce_cpu.py (g++ -O3 -march=native
// -fopenmp) and called through ctypes, so it needs no Python headers.
// Layouts, list codes and tie rules are those of reduce.py and schema.sql:
// list = quadrant * 4 + hook, hooks POST, IN, GATE, ACT; quadrants ++, +-,
// -+, --. Within a list every value has one sign, so the kernel works with
// |value|; Python applies the sign.
//
// Why this shape: the [B, T, d_mlp] activations are read once, row by row,
// for a block of BLOCK neurons whose accumulators stay in L1; the inner loop
// over the block is branch-free so it vectorises. Blocks are independent, so
// threads never share a list.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>
#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace {

constexpr int NL = 16;
constexpr int BLOCK = 16;  // one 64-byte line of a row of x_gate
constexpr int PREFETCH = 4;  // rows ahead: a block's rows are a page apart, beyond the hardware prefetcher

// float32 bits -> float16 bits, rounding to nearest even (numpy's npy_floatbits_to_halfbits).
inline uint16_t half_bits(uint32_t f) {
  const uint32_t h_sgn = (f & 0x80000000u) >> 16;
  uint32_t f_exp = f & 0x7f800000u;
  if (f_exp >= 0x47800000u) {
    if (f_exp == 0x7f800000u && (f & 0x007fffffu)) return uint16_t(h_sgn | 0x7e00u);  // NaN
    return uint16_t(h_sgn | 0x7c00u);                                                   // inf, overflow
  }
  if (f_exp <= 0x38000000u) {
    if (f_exp < 0x33000000u) return uint16_t(h_sgn);  // underflow to signed zero
    f_exp >>= 23;
    uint32_t sig = 0x00800000u + (f & 0x007fffffu);
    sig >>= (113 - f_exp);
    if ((sig & 0x3fffu) != 0x1000u || (f & 0x7ffu)) sig += 0x1000u;
    return uint16_t(h_sgn + (sig >> 13));
  }
  const uint32_t h_exp = (f_exp - 0x38000000u) >> 13;
  uint32_t sig = f & 0x007fffffu;
  if ((sig & 0x3fffu) != 0x1000u) sig += 0x1000u;
  return uint16_t(h_sgn + (sig >> 13) + h_exp);  // a carry correctly bumps the exponent
}

// float -> float16 bits, rounding to nearest even: one instruction where the
// CPU has F16C (every x86 since 2013), else half_bits. Entering examples
// convert 54 values each, which dominated the cost of filling the lists.
inline uint16_t to_half(float v);

inline uint32_t bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  return u;
}

inline uint16_t to_half(float v) {
#if defined(__F16C__)
  return uint16_t(_cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT));
#else
  return half_bits(bits(v));
#endif
}

struct Lists {  // one neuron's 16 top-k lists, [16, k]; windows [16, k, W] indexed by slot
  float* mag;
  int32_t* text;
  int32_t* pos;
  int32_t* start;
  int32_t* len;
  int32_t* slot;  // which window row of the list an entry owns; the k slots are a permutation of 0..k-1
  uint16_t* win_gate;
  uint16_t* win_in;
  int64_t k, W;
};

// Does (m, tid) rank above entry i? By |value|, then the lower text id; empty entries rank last.
inline bool beats(const Lists& s, int64_t i, float m, int32_t tid) {
  const int32_t other = s.text[i];
  return other < 0 || m > s.mag[i] || (m == s.mag[i] && tid < other);
}

// Offer a text's best token of one list. If it enters, the last entry leaves
// and its window slot is reused, so windows are written once and never moved.
// lg, lx: this text's x_gate and x_in of the neuron, a row every `stride` floats.
void offer(const Lists& s, int64_t list, float m, int32_t tid, int32_t pos, const float* lg, const float* lx,
           int64_t stride, int64_t length, int64_t before, int64_t after) {
  const int64_t k = s.k, W = s.W, base = list * k;
  if (!beats(s, base + k - 1, m, tid)) return;
  const int32_t slot = s.slot[base + k - 1];
  int64_t i = base + k - 1;
  for (; i > base && beats(s, i - 1, m, tid); --i) {
    s.mag[i] = s.mag[i - 1];
    s.text[i] = s.text[i - 1];
    s.pos[i] = s.pos[i - 1];
    s.start[i] = s.start[i - 1];
    s.len[i] = s.len[i - 1];
    s.slot[i] = s.slot[i - 1];
  }
  const int64_t start = std::max<int64_t>(pos - before, 0);
  const int64_t end = std::min<int64_t>(pos + after + 1, length);
  s.mag[i] = m;
  s.text[i] = tid;
  s.pos[i] = pos;
  s.start[i] = int32_t(start);
  s.len[i] = int32_t(end - start);
  s.slot[i] = slot;
  uint16_t* wg = s.win_gate + (base + slot) * W;
  uint16_t* wi = s.win_in + (base + slot) * W;
  for (int64_t o = 0; o < W; ++o) {
    const int64_t t = start + o;
    wg[o] = t < end ? to_half(lg[t * stride]) : 0;
    wi[o] = t < end ? to_half(lx[t * stride]) : 0;
  }
}

}  // namespace

extern "C" int gluscope_reduce_update(
    const float* G, const float* X, const float* A, const float* sign, int64_t B, int64_t T, int64_t n,
    const int64_t* lengths, const int64_t* text_ids, int64_t before, int64_t after, int64_t k, int64_t W,
    int64_t* counts, double* vsum, float* near, float* top_mag, int32_t* top_text, int32_t* top_pos,
    int32_t* win_start, int32_t* win_len, int32_t* top_slot, uint16_t* win_gate, uint16_t* win_in,
    int n_threads) {
  const int64_t n_blocks = (n + BLOCK - 1) / BLOCK;
  const float inf = std::numeric_limits<float>::infinity();
  int64_t max_length = 0;
  for (int64_t b = 0; b < B; ++b) max_length = std::max(max_length, lengths[b]);
#pragma omp parallel num_threads(n_threads)
  {
  // This text's x_gate and x_in of the block, contiguous, for the windows of entering examples.
  std::vector<float> local_g(max_length * BLOCK), local_x(max_length * BLOCK);
#pragma omp for schedule(dynamic, 1)
  for (int64_t blk = 0; blk < n_blocks; ++blk) {
    const int64_t j0 = blk * BLOCK;
    const int w = int(std::min<int64_t>(BLOCK, n - j0));
    alignas(64) int32_t cnt[4][BLOCK] = {};
    alignas(64) float nr[NL][BLOCK];
    alignas(64) float sm[NL][BLOCK];
    alignas(64) float bm[NL][BLOCK];
    alignas(64) int32_t bp[NL][BLOCK];
    alignas(64) float sg[BLOCK];
    for (int l = 0; l < NL; ++l) std::fill(nr[l], nr[l] + BLOCK, inf);
    for (int jj = 0; jj < BLOCK; ++jj) sg[jj] = jj < w ? sign[j0 + jj] : 1.0f;
    for (int64_t b = 0; b < B; ++b) {
      const int64_t length = lengths[b];
      std::memset(sm, 0, sizeof sm);
      std::memset(bm, 0, sizeof bm);
      std::memset(bp, 0, sizeof bp);
      for (int jj = 0; jj < w; ++jj) {  // BOS is in no statistic but starts early windows
        local_g[jj] = G[b * T * n + j0 + jj];
        local_x[jj] = X[b * T * n + j0 + jj] * sg[jj];
      }
      // Two rows per step: each accumulator is loaded and stored once for both,
      // which halves the L1 traffic that bounds this loop.
#define GLUSCOPE_ACC(l, in, v, tpos)                                            \
  {                                                                             \
    const float m = (in) ? (v) : 0.0f;                                          \
    sm[l][jj] += m;                                                             \
    const float c = (in) ? (v) : inf;                                           \
    nr[l][jj] = c < nr[l][jj] ? c : nr[l][jj];                                  \
    const bool better = m > bm[l][jj]; /* strict: lowest position wins */      \
    bm[l][jj] = better ? m : bm[l][jj];                                         \
    bp[l][jj] = better ? (tpos) : bp[l][jj];                                    \
  }
#define GLUSCOPE_QUADRANT(q, in, tpos)                                                          \
  GLUSCOPE_ACC(q * 4 + 0, in, ap, tpos) GLUSCOPE_ACC(q * 4 + 1, in, ax, tpos)                   \
  GLUSCOPE_ACC(q * 4 + 2, in, ag, tpos) GLUSCOPE_ACC(q * 4 + 3, in, aa, tpos)
// One row of the block: its values, quadrant and the 16 lists (written out per
// list: loops over quadrant and hook here stop GCC vectorising over jj).
#define GLUSCOPE_ROW(gr, xr, ar, lg, lx, tpos)                                         \
  {                                                                                    \
    const float g = (gr)[jj], x = (xr)[jj] * sg[jj], a = (ar)[jj];                     \
    (lg)[jj] = g;                                                                      \
    (lx)[jj] = x;                                                                      \
    const float ap = std::fabs(a * x), ax = std::fabs(x), ag = std::fabs(g), aa = std::fabs(a); \
    const bool pp = (g > 0) & (x > 0), pn = (g > 0) & (x < 0);                         \
    const bool np = (g < 0) & (x > 0), nn = (g < 0) & (x < 0);                         \
    cnt[0][jj] += pp;                                                                  \
    cnt[1][jj] += pn;                                                                  \
    cnt[2][jj] += np;                                                                  \
    cnt[3][jj] += nn;                                                                  \
    GLUSCOPE_QUADRANT(0, pp, tpos)                                                     \
    GLUSCOPE_QUADRANT(1, pn, tpos)                                                     \
    GLUSCOPE_QUADRANT(2, np, tpos)                                                     \
    GLUSCOPE_QUADRANT(3, nn, tpos)                                                     \
  }
      int64_t t = 1;
      for (; t + 1 < length; t += 2) {
        const int64_t row = (b * T + t) * n + j0;
        const float* __restrict__ g0 = G + row;
        const float* __restrict__ x0 = X + row;
        const float* __restrict__ a0 = A + row;
        const float* __restrict__ g1 = g0 + n;
        const float* __restrict__ x1 = x0 + n;
        const float* __restrict__ a1 = a0 + n;
        float* __restrict__ lg0 = local_g.data() + t * BLOCK;
        float* __restrict__ lx0 = local_x.data() + t * BLOCK;
        float* __restrict__ lg1 = lg0 + BLOCK;
        float* __restrict__ lx1 = lx0 + BLOCK;
        const int32_t t0 = int32_t(t), t1 = int32_t(t + 1);
        if (t + PREFETCH + 1 < length) {
          __builtin_prefetch(g0 + PREFETCH * n);
          __builtin_prefetch(x0 + PREFETCH * n);
          __builtin_prefetch(a0 + PREFETCH * n);
          __builtin_prefetch(g1 + PREFETCH * n);
          __builtin_prefetch(x1 + PREFETCH * n);
          __builtin_prefetch(a1 + PREFETCH * n);
        }
#pragma omp simd
        for (int jj = 0; jj < w; ++jj) {
          GLUSCOPE_ROW(g0, x0, a0, lg0, lx0, t0)
          GLUSCOPE_ROW(g1, x1, a1, lg1, lx1, t1)
        }
      }
      for (; t < length; ++t) {  // the odd last row
        const int64_t row = (b * T + t) * n + j0;
        float* __restrict__ lg0 = local_g.data() + t * BLOCK;
        float* __restrict__ lx0 = local_x.data() + t * BLOCK;
        const int32_t t0 = int32_t(t);
#pragma omp simd
        for (int jj = 0; jj < w; ++jj) GLUSCOPE_ROW(G + row, X + row, A + row, lg0, lx0, t0)
      }
#undef GLUSCOPE_ROW
#undef GLUSCOPE_QUADRANT
#undef GLUSCOPE_ACC
      const int32_t tid = int32_t(text_ids[b]);
      for (int jj = 0; jj < w; ++jj) {
        const int64_t j = j0 + jj;
        const int64_t at = j * NL * k;
        const Lists s{top_mag + at, top_text + at, top_pos + at, win_start + at, win_len + at, top_slot + at,
                      win_gate + at * W, win_in + at * W, k, W};
        for (int l = 0; l < NL; ++l) {
          vsum[j * NL + l] += sm[l][jj];
          if (bm[l][jj] > 0)  // 0: no nonzero value of this list in the text
            offer(s, l, bm[l][jj], tid, bp[l][jj], local_g.data() + jj, local_x.data() + jj, BLOCK, length,
                  before, after);
        }
      }
    }
    for (int jj = 0; jj < w; ++jj) {
      const int64_t j = j0 + jj;
      for (int q = 0; q < 4; ++q) counts[j * 4 + q] += cnt[q][jj];
      for (int l = 0; l < NL; ++l) near[j * NL + l] = std::min(near[j * NL + l], nr[l][jj]);
    }
  }
  }  // omp parallel
  return 0;
}
