// The recorder's per-batch reduction on the CPU, for one layer: quadrant
// counts, sums, the near-zero end of every list, and each text's most extreme
// token per list merged into sorted top-k lists with its activation window.
//
// Built on first use by recorder/reduce_cpu.py (g++ -O3 -march=native
// -fopenmp) and called through ctypes, so it needs no Python headers. It is
// compiled with a generated header in front (reduce_cpu.kernel_header(); a
// copy sits beside the built library) that declares ReduceArgs, the one
// argument, from its ctypes.Structure, and the rules of recorder/rules.py:
// N_LISTS, list = quadrant * N_HOOKS + hook, the HOOK_* codes, each
// quadrant's signs, and the key packing that breaks ties. Within a list every
// value has one sign, so the kernel works with |value|; Python applies the
// sign, and computes the stored window bounds (rules.window_bounds).
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

struct Lists {  // one neuron's N_LISTS top-k lists, [N_LISTS, k]; windows [N_LISTS, k, W] indexed by slot
  float* mag;
  int32_t* text;
  int32_t* pos;
  int32_t* slot;  // which window row of the list an entry owns; the k slots are a permutation of 0..k-1
  uint16_t* win_gate;
  uint16_t* win_in;
  int64_t k, W;
};

// rules.example_keys: |value| (m >= 0) first, then the lower text id, as one integer.
inline int64_t example_key(float m, int32_t tid) {
  return (int64_t(bits(m)) << KEY_SHIFT) | (TIE_MASK - int64_t(tid));
}

// Does (m, tid) rank above entry i? Empty entries rank last.
inline bool beats(const Lists& s, int64_t i, float m, int32_t tid) {
  const int32_t other = s.text[i];
  return other < 0 || example_key(m, tid) > example_key(s.mag[i], other);
}

// A position's sign test against a quadrant's sign for it (+1 or -1); strict, as the quadrants are.
template <int SIGN>
inline bool has_sign(float v) {
  return SIGN > 0 ? v > 0 : v < 0;
}

// Offer a text's best token of one list. If it enters, the last entry leaves
// and its window slot is reused, so windows are written once and never moved.
// lg, li: this text's x_gate and x_in of the neuron, a row every `stride` floats.
void offer(const Lists& s, int64_t list, float m, int32_t tid, int32_t pos, const float* lg, const float* li,
           int64_t stride, int64_t length, int64_t before, int64_t after) {
  const int64_t k = s.k, W = s.W, base = list * k;
  if (!beats(s, base + k - 1, m, tid)) return;
  const int32_t slot = s.slot[base + k - 1];
  int64_t i = base + k - 1;
  for (; i > base && beats(s, i - 1, m, tid); --i) {
    s.mag[i] = s.mag[i - 1];
    s.text[i] = s.text[i - 1];
    s.pos[i] = s.pos[i - 1];
    s.slot[i] = s.slot[i - 1];
  }
  // rules.window_bounds; Python stores the bounds, so a drift here shows as shifted windows in test_reducers.
  const int64_t start = std::max<int64_t>(pos - before, 0);
  const int64_t end = std::min<int64_t>(pos + after + 1, length);
  s.mag[i] = m;
  s.text[i] = tid;
  s.pos[i] = pos;
  s.slot[i] = slot;
  uint16_t* wg = s.win_gate + (base + slot) * W;
  uint16_t* wi = s.win_in + (base + slot) * W;
  for (int64_t o = 0; o < W; ++o) {
    const int64_t t = start + o;
    wg[o] = t < end ? to_half(lg[t * stride]) : 0;
    wi[o] = t < end ? to_half(li[t * stride]) : 0;
  }
}

}  // namespace

extern "C" void gluscope_reduce_update(const ReduceArgs* args) {
  const float* G = args->x_gate;
  const float* X_IN = args->x_in;
  const float* A = args->act;
  const float* sign = args->sign;
  const int64_t B = args->batch, T = args->seq_len, n = args->n, k = args->k, W = args->window;
  const int64_t before = args->before, after = args->after;
  const int64_t* lengths = args->lengths;
  const int64_t* text_ids = args->text_ids;
  int64_t* counts = args->counts;
  double* total = args->total;
  float* near = args->near;
  float* top_mag = args->top_mag;
  int32_t* top_text = args->top_text;
  int32_t* top_pos = args->top_pos;
  int32_t* top_slot = args->top_slot;
  uint16_t* win_gate = args->win_gate;
  uint16_t* win_in = args->win_in;
  constexpr int NL = N_LISTS, NQ = N_QUADRANTS;
  const int64_t n_blocks = (n + BLOCK - 1) / BLOCK;
  const float inf = std::numeric_limits<float>::infinity();
  int64_t max_length = 0;
  for (int64_t b = 0; b < B; ++b) max_length = std::max(max_length, lengths[b]);
#pragma omp parallel num_threads(args->n_threads)
  {
  // This text's x_gate and x_in of the block, contiguous, for the windows of entering examples.
  std::vector<float> local_g(max_length * BLOCK), local_in(max_length * BLOCK);
#pragma omp for schedule(dynamic, 1)
  for (int64_t blk = 0; blk < n_blocks; ++blk) {
    const int64_t j0 = blk * BLOCK;
    const int w = int(std::min<int64_t>(BLOCK, n - j0));
    alignas(64) int32_t cnt[NQ][BLOCK] = {};
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
        local_in[jj] = X_IN[b * T * n + j0 + jj] * sg[jj];
      }
      // Two rows per step: each accumulator is loaded and stored once for both,
      // which halves the L1 traffic that bounds this loop.
#define GLUSCOPE_ACC(l, member, v, tpos)                                                                 \
  {                                                                                                      \
    const float m = (member) ? (v) : 0.0f;                                                               \
    sm[l][jj] += m;                                                                                      \
    const float c = (member) ? (v) : inf;                                                                \
    nr[l][jj] = c < nr[l][jj] ? c : nr[l][jj];                                                           \
    const bool better = m > bm[l][jj]; /* strict: lowest position wins */                                \
    bm[l][jj] = better ? m : bm[l][jj];                                                                  \
    bp[l][jj] = better ? (tpos) : bp[l][jj];                                                             \
  }
static_assert(N_QUADRANTS == 4 && N_HOOKS == 4, "GLUSCOPE_ROW is written out for 4 quadrants of 4 hooks");
#define GLUSCOPE_QUADRANT(q, member, tpos)                                                               \
  GLUSCOPE_ACC(q * N_HOOKS + HOOK_POST, member, abs_post, tpos)                                          \
  GLUSCOPE_ACC(q * N_HOOKS + HOOK_X_IN, member, abs_in, tpos)                                            \
  GLUSCOPE_ACC(q * N_HOOKS + HOOK_X_GATE, member, abs_gate, tpos)                                        \
  GLUSCOPE_ACC(q * N_HOOKS + HOOK_ACT, member, abs_act, tpos)
// Is this token in quadrant q? The quadrant's signs come from rules.QUADRANT_SIGNS.
#define GLUSCOPE_MEMBER(q) (has_sign<QUADRANT_GATE_SIGN[q]>(g) & has_sign<QUADRANT_IN_SIGN[q]>(x_in))
// One row of the block: its values, quadrant and the 16 lists (written out per
// list: loops over quadrant and hook here stop GCC vectorising over jj).
#define GLUSCOPE_ROW(gr, ir, ar, lg, li, tpos)                                                           \
  {                                                                                                      \
    const float g = (gr)[jj], x_in = (ir)[jj] * sg[jj], a = (ar)[jj];                                    \
    (lg)[jj] = g;                                                                                        \
    (li)[jj] = x_in;                                                                                     \
    const float abs_post = std::fabs(a * x_in), abs_in = std::fabs(x_in);                                \
    const float abs_gate = std::fabs(g), abs_act = std::fabs(a);                                         \
    const bool q0 = GLUSCOPE_MEMBER(0), q1 = GLUSCOPE_MEMBER(1);                                         \
    const bool q2 = GLUSCOPE_MEMBER(2), q3 = GLUSCOPE_MEMBER(3);                                         \
    cnt[0][jj] += q0;                                                                                    \
    cnt[1][jj] += q1;                                                                                    \
    cnt[2][jj] += q2;                                                                                    \
    cnt[3][jj] += q3;                                                                                    \
    GLUSCOPE_QUADRANT(0, q0, tpos)                                                                       \
    GLUSCOPE_QUADRANT(1, q1, tpos)                                                                       \
    GLUSCOPE_QUADRANT(2, q2, tpos)                                                                       \
    GLUSCOPE_QUADRANT(3, q3, tpos)                                                                       \
  }
      int64_t t = 1;
      for (; t + 1 < length; t += 2) {
        const int64_t row = (b * T + t) * n + j0;
        const float* __restrict__ gate_row0 = G + row;
        const float* __restrict__ in_row0 = X_IN + row;
        const float* __restrict__ act_row0 = A + row;
        const float* __restrict__ gate_row1 = gate_row0 + n;
        const float* __restrict__ in_row1 = in_row0 + n;
        const float* __restrict__ act_row1 = act_row0 + n;
        float* __restrict__ lg0 = local_g.data() + t * BLOCK;
        float* __restrict__ li0 = local_in.data() + t * BLOCK;
        float* __restrict__ lg1 = lg0 + BLOCK;
        float* __restrict__ li1 = li0 + BLOCK;
        const int32_t t0 = int32_t(t), t1 = int32_t(t + 1);
        if (t + PREFETCH + 1 < length) {
          __builtin_prefetch(gate_row0 + PREFETCH * n);
          __builtin_prefetch(in_row0 + PREFETCH * n);
          __builtin_prefetch(act_row0 + PREFETCH * n);
          __builtin_prefetch(gate_row1 + PREFETCH * n);
          __builtin_prefetch(in_row1 + PREFETCH * n);
          __builtin_prefetch(act_row1 + PREFETCH * n);
        }
#pragma omp simd
        for (int jj = 0; jj < w; ++jj) {
          GLUSCOPE_ROW(gate_row0, in_row0, act_row0, lg0, li0, t0)
          GLUSCOPE_ROW(gate_row1, in_row1, act_row1, lg1, li1, t1)
        }
      }
      for (; t < length; ++t) {  // the odd last row
        const int64_t row = (b * T + t) * n + j0;
        float* __restrict__ lg0 = local_g.data() + t * BLOCK;
        float* __restrict__ li0 = local_in.data() + t * BLOCK;
        const int32_t t0 = int32_t(t);
#pragma omp simd
        for (int jj = 0; jj < w; ++jj) GLUSCOPE_ROW(G + row, X_IN + row, A + row, lg0, li0, t0)
      }
#undef GLUSCOPE_ROW
#undef GLUSCOPE_MEMBER
#undef GLUSCOPE_QUADRANT
#undef GLUSCOPE_ACC
      const int32_t tid = int32_t(text_ids[b]);
      for (int jj = 0; jj < w; ++jj) {
        const int64_t j = j0 + jj;
        const int64_t at = j * NL * k;
        const Lists s{top_mag + at, top_text + at, top_pos + at, top_slot + at, win_gate + at * W, win_in + at * W,
                      k, W};
        for (int l = 0; l < NL; ++l) {
          total[j * NL + l] += sm[l][jj];
          if (bm[l][jj] > 0)  // 0: no nonzero value of this list in the text
            offer(s, l, bm[l][jj], tid, bp[l][jj], local_g.data() + jj, local_in.data() + jj, BLOCK, length,
                  before, after);
        }
      }
    }
    for (int jj = 0; jj < w; ++jj) {
      const int64_t j = j0 + jj;
      for (int q = 0; q < NQ; ++q) counts[j * NQ + q] += cnt[q][jj];
      for (int l = 0; l < NL; ++l) near[j * NL + l] = std::min(near[j * NL + l], nr[l][jj]);
    }
  }
  }  // omp parallel
}
