// The recorder's per-batch reduction on the CPU, for one layer: quadrant
// counts, sums, the near-zero end of every list, and each text's most extreme
// token per list merged into sorted top-k lists with its activation window;
// then (distributions()) the histograms, the density and the
// sampled examples, by the bins and hash of rules.py.
//
// Built on first use by recorder/kernel_reducer.py (g++ -O3 -march=native
// -fopenmp) and called through ctypes, so it needs no Python headers. It is
// compiled with a generated header in front (kernel_reducer.kernel_header(); a
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
#include <omp.h>
#include <vector>
#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
// Where the CPU has AVX-512, distributions() makes each of a row's counts one gather and one scatter over the
// block instead of 16 scalar increments.
#if defined(__AVX512F__)
#define GLUSCOPE_SCATTER 1
#else
#define GLUSCOPE_SCATTER 0
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

// rules.value_bin / density_bin, read off a float's bits. A bin holds lo <= v < hi, so for v < 0 the magnitude
// bin is read off |v|'s predecessor float (u - 1). One magnitude bin m either way: the signed bin is MAG + m for
// v >= 0 (-0.0 too) and MAG - 1 - m = MAG + ~m otherwise (NaN too, as rules.py's torch.where(v >= 0, ...)).
inline int32_t below_zero(float v) { return int32_t(!(v >= 0)); }
inline uint32_t bin_bits(float v, int32_t neg) { return (bits(v) & 0x7fffffffu) - uint32_t(neg); }
inline int32_t clamp_bin(int32_t b, int32_t n) { return std::min(std::max(b, 0), n - 1); }
inline int32_t value_mag(uint32_t u) { return clamp_bin(int32_t(u >> 22) - VALUE_SHIFT, VALUE_MAG_BINS); }
inline int32_t density_mag(uint32_t u) {
  return clamp_bin((int32_t(u >> 23) - DENSITY_SHIFT) >> DENSITY_GROUP_SHIFT, DENSITY_MAG_BINS);  // >>: floor
}
inline int32_t signed_offset(int32_t m, int32_t neg) { return m ^ -neg; }  // the signed bin minus MAG

// rules.fmix32: MurmurHash3's finalizer.
inline uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= FMIX_C1;
  h ^= h >> 13;
  h *= FMIX_C2;
  return h ^ (h >> 16);
}

// float16 NaN, as to_half and torch round a float NaN: the window value of a token routed to other experts.
constexpr uint16_t NAN_HALF = 0x7e00;

// One text's values of one neuron of the block, as the lists read them: x_gate, x_in (after the weight
// convention) and act, a row every `stride` floats. An expert's text has values only at its routed positions
// (`routed`, n_routed of them, ascending, BOS excluded) and at BOS if `bos`; its windows show NaN at the tokens
// routed to other experts. routed is null where every position has a value.
struct TextWindows;
struct TextValues {
  const float* g;
  const float* in;
  const float* act;
  int64_t stride, length, before, after;
  const int32_t* routed;
  int64_t n_routed;
  bool bos;
  TextWindows* windows;  // where its entering examples' windows are queued
  int jj;                // the neuron's column in the block
};

// One column's window from start as float16 bits: `valid` values from col (a row every v.stride floats), then 0
// up to W.
void column_window(const TextValues& v, const float* col, int64_t start, int64_t valid, int64_t W, uint16_t* out) {
  for (int64_t o = 0; o < W; ++o) out[o] = o < valid ? to_half(col[(start + o) * v.stride]) : 0;
}

// An entering example's window rows, for writing.
inline void prefetch_window(const uint16_t* gate, const uint16_t* in, int64_t W) {
  for (int64_t byte = 0; byte < W * int64_t(sizeof(uint16_t)); byte += 64) {
    __builtin_prefetch(reinterpret_cast<const char*>(gate) + byte, 1);
    __builtin_prefetch(reinterpret_cast<const char*>(in) + byte, 1);
  }
}

// The windows of one text's entering examples in a block (a thread's), written once all of the text's examples
// have entered (flush()). Their rows are seldom in cache: each is fetched as its example enters and written after
// the others have entered, so that the misses overlap instead of each write waiting for its own. An expert's
// windows are copied from float16 columns of the text, NaN but at its routed tokens, built once per neuron and
// text: looking its routed tokens up in every window cost more than the rest of an entry.
struct TextWindows {
  struct Pending {
    uint16_t* gate;
    uint16_t* in;
    int32_t pos;
    int jj;
  };
  std::vector<Pending> pending;
  std::vector<uint16_t> gate, in;  // an expert's columns, [BLOCK, row]
  int64_t row;
  uint32_t built = 0;  // bit jj: neuron jj's columns hold the current text

  explicit TextWindows(int64_t expert_length)
      : gate(BLOCK * expert_length), in(BLOCK * expert_length), row(expert_length) {
    pending.reserve(BLOCK * (N_LISTS + N_QUADRANTS * (N_INTERVALS + 1)));  // a text's offers in a block
  }

  // Queue the window around pos (rules.window_bounds) for rows wg and wi. An entry's rows are its own until it
  // leaves its list, and a text offers each list one token, so no two queued windows share a row.
  void add(const TextValues& v, int32_t pos, int64_t W, uint16_t* wg, uint16_t* wi) {
    prefetch_window(wg, wi, W);
    pending.push_back({wg, wi, pos, v.jj});
  }

  // Write the queued windows of the text whose column 0 `text` describes, and start the next text.
  void flush(const TextValues& text, int64_t W) {
    for (const Pending& p : pending) {
      TextValues v = text;
      v.g += p.jj;
      v.in += p.jj;
      v.act += p.jj;
      v.jj = p.jj;
      write(v, p.pos, W, p.gate, p.in);
    }
    pending.clear();
    built = 0;
  }

 private:
  // The window around pos as float16 bits, 0 past the text's end (Python stores the bounds, so a drift here shows
  // as shifted windows in test_reducers).
  void write(const TextValues& v, int32_t pos, int64_t W, uint16_t* wg, uint16_t* wi) {
    const int64_t start = std::max<int64_t>(pos - v.before, 0);
    const int64_t valid = std::min<int64_t>(pos + v.after + 1, v.length) - start;
    if (!v.routed) {
      column_window(v, v.g, start, valid, W, wg);
      column_window(v, v.in, start, valid, W, wi);
      return;
    }
    const uint16_t* g = gate.data() + v.jj * row;
    const uint16_t* i = in.data() + v.jj * row;
    if (!(built >> v.jj & 1u)) build_columns(v);
    std::memcpy(wg, g + start, valid * sizeof(uint16_t));
    std::memcpy(wi, i + start, valid * sizeof(uint16_t));
    std::fill(wg + valid, wg + W, uint16_t(0));
    std::fill(wi + valid, wi + W, uint16_t(0));
  }

  void build_columns(const TextValues& v) {
    uint16_t* cg = gate.data() + v.jj * row;
    uint16_t* ci = in.data() + v.jj * row;
    built |= 1u << v.jj;
    std::fill(cg, cg + v.length, NAN_HALF);
    std::fill(ci, ci + v.length, NAN_HALF);
    if (v.bos) {
      cg[0] = to_half(v.g[0]);
      ci[0] = to_half(v.in[0]);
    }
    for (int64_t r = 0; r < v.n_routed; ++r) {
      const int64_t t = v.routed[r];
      cg[t] = to_half(v.g[t * v.stride]);
      ci[t] = to_half(v.in[t * v.stride]);
    }
  }
};

struct Samples {  // one neuron's sample lists, [N_QUADRANTS, SAMPLE_SLOTS]; windows by slot, as in Lists
  int64_t* hash;
  int32_t* text;
  int32_t* pos;
  int32_t* slot;
  float* gate;
  float* in;
  float* act;
  uint16_t* win_gate;
  uint16_t* win_in;
  int64_t W;
};

// Does (h, tid) rank above entry i (smaller hash, then lower text id)? Empty entries (hash -1; a candidate's is
// >= 0) rank last. As in beats(), the text is read only on a tie.
inline bool sample_beats(const Samples& s, int64_t i, int64_t h, int32_t tid) {
  const int64_t other = s.hash[i];
  return other < 0 || h < other || (h == other && tid < s.text[i]);
}

// Offer a text's candidate to the sample list of `size` entries from `base`, as offer() does for top-k lists.
void offer_sample(const Samples& s, int64_t base, int64_t size, int64_t h, int32_t tid, int32_t pos,
                  const TextValues& v) {
  const int64_t last = base + size - 1, W = s.W;
  if (!sample_beats(s, last, h, tid)) return;
  const int32_t slot = s.slot[last];
  const int64_t row = (base - base % SAMPLE_SLOTS) + slot;  // slots count within the quadrant
  int64_t i = last;
  for (; i > base && sample_beats(s, i - 1, h, tid); --i) {
    s.hash[i] = s.hash[i - 1];
    s.text[i] = s.text[i - 1];
    s.pos[i] = s.pos[i - 1];
    s.slot[i] = s.slot[i - 1];
    s.gate[i] = s.gate[i - 1];
    s.in[i] = s.in[i - 1];
    s.act[i] = s.act[i - 1];
  }
  s.hash[i] = h;
  s.text[i] = tid;
  s.pos[i] = pos;
  s.slot[i] = slot;
  s.gate[i] = v.g[pos * v.stride];
  s.in[i] = v.in[pos * v.stride];
  s.act[i] = v.act[pos * v.stride];
  v.windows->add(v, pos, W, s.win_gate + row * W, s.win_in + row * W);
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

// Does (m, tid) rank above entry i? Empty entries (mag -1; an offered m is > 0) rank last. The text is read
// only on a tie: most offers are decided by the magnitudes, one line of the list.
inline bool beats(const Lists& s, int64_t i, float m, int32_t tid) {
  const float other = s.mag[i];
  if (m != other) return m > other;
  return example_key(m, tid) > example_key(other, s.text[i]);
}

// A position's sign test against a quadrant's sign for it (+1 or -1); strict, as the quadrants are.
template <int SIGN>
inline bool has_sign(float v) {
  return SIGN > 0 ? v > 0 : v < 0;
}

// Offer a text's best token of one list. If it enters, the last entry leaves
// and its window slot is reused, so windows are written once and never moved.
void offer(const Lists& s, int64_t list, float m, int32_t tid, int32_t pos, const TextValues& v) {
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
  s.mag[i] = m;
  s.text[i] = tid;
  s.pos[i] = pos;
  s.slot[i] = slot;
  v.windows->add(v, pos, W, s.win_gate + (base + slot) * W, s.win_in + (base + slot) * W);
}

constexpr int PART_HIST = 1, PART_DENSITY = 2, PART_SAMPLING = 4;  // ReduceArgs.parts (kernel_reducer.PARTS)

constexpr int hist_at(int hook) {
  for (int h = 0; h < N_HIST_HOOKS; ++h)
    if (HIST_HOOK[h] == hook) return h;
  return -1;
}
constexpr int HIST_POST_AT = hist_at(HOOK_POST), HIST_IN_AT = hist_at(HOOK_X_IN), HIST_GATE_AT = hist_at(HOOK_X_GATE);

// distributions() computes quadrant codes and list signs by formula; these are the rules it assumes.
constexpr bool formulas_hold() {
  for (int q = 0; q < N_QUADRANTS; ++q) {
    const int gneg = QUADRANT_GATE_SIGN[q] < 0, ineg = QUADRANT_IN_SIGN[q] < 0;
    if (q != 2 * gneg + ineg) return false;
    if (LIST_SIGN[q * N_HOOKS + HOOK_POST] != 1 - 2 * (gneg ^ ineg)) return false;
    if (LIST_SIGN[q * N_HOOKS + HOOK_X_IN] != 1 - 2 * ineg) return false;
    if (LIST_SIGN[q * N_HOOKS + HOOK_X_GATE] != 1 - 2 * gneg) return false;
  }
  return HIST_POST_AT >= 0 && HIST_IN_AT >= 0 && HIST_GATE_AT >= 0;
}
static_assert(formulas_hold(), "rules.py's quadrant codes or list signs changed: update distributions()");

constexpr int HIST_PER_NEURON = N_QUADRANTS * N_HIST_HOOKS * HIST_SLOTS, D = 2 * DENSITY_MAG_BINS;

// Where a block's histograms and density are counted, laid out as the layer's from neuron j0: BlockCounts or
// LayerCounts, by the rows of the call (counts_in_block()).
//
// A block's own counts in 32 bits (what 32-bit gathers and scatters take, and half the size of int64), added to
// the layer's int64 counts at the end of the block, or before they could overflow.
struct BlockCounts {
  using Count = uint32_t;
  // A count grows by at most one per row, so none overflows within this many rows.
  static constexpr int64_t ROWS = std::numeric_limits<Count>::max();
  std::vector<Count> hist_counts, density_counts;
  int64_t rows = 0;  // since the last flush

  explicit BlockCounts(bool used)
      : hist_counts(used ? BLOCK * HIST_PER_NEURON : 0), density_counts(used ? BLOCK * D * D : 0) {}
  Count* hist(const ReduceArgs*, int64_t) { return hist_counts.data(); }
  Count* density(const ReduceArgs*, int64_t) { return density_counts.data(); }
  void before_rows(const ReduceArgs* args, int64_t j0, int w, int64_t more) {
    if (rows + more > ROWS) flush(args, j0, w);
    rows += more;
  }
  void flush(const ReduceArgs* args, int64_t j0, int w) {
    add(args->hist + j0 * HIST_PER_NEURON, hist_counts.data(), w * HIST_PER_NEURON);
    add(args->density + j0 * D * D, density_counts.data(), w * D * D);
    rows = 0;
  }
  static void add(int64_t* __restrict__ layer, Count* __restrict__ block, int64_t size) {
    for (int64_t i = 0; i < size; ++i) layer[i] += block[i];
    std::fill(block, block + size, Count(0));
  }
};

// The layer's int64 counts themselves, for a call of few rows: the flush above walks every count of the block's
// neurons however few rows the call had, and an expert's call has only its routed tokens.
struct LayerCounts {
  using Count = int64_t;
  Count* hist(const ReduceArgs* args, int64_t j0) { return args->hist + j0 * HIST_PER_NEURON; }
  Count* density(const ReduceArgs* args, int64_t j0) { return args->density + j0 * D * D; }
  void before_rows(const ReduceArgs*, int64_t, int, int64_t) {}
};

// From this many rows in a call on, block counts and their flush cost less than increments straight into the
// layer's counts, each of which may reach a line not in cache; below it, the flush dominates.
constexpr int64_t BLOCK_COUNTS_FROM_ROWS = 512;

inline bool counts_in_block(int64_t rows) { return rows >= BLOCK_COUNTS_FROM_ROWS; }

// Counting straight into the layer's counts, a call whose rows make at least as many increments per neuron (a
// histogram slot per hook and a density bin) as a neuron's counts have cache lines reaches most of those lines,
// seldom in cache (an expert's call comes once per batch): fetching the block's counts at its start overlaps the
// misses that its increments would otherwise wait on.
inline bool fetch_layer_counts(int64_t rows) {
  constexpr int64_t lines = (HIST_PER_NEURON + D * D) * int64_t(sizeof(int64_t)) / 64;
  return !counts_in_block(rows) && rows * (N_HIST_HOOKS + 1) >= lines;
}

// Fetch n int64 counts from p for writing.
inline void prefetch_lines(const int64_t* p, int64_t n) {
  for (int64_t i = 0; i < n; i += 64 / int64_t(sizeof(int64_t))) __builtin_prefetch(p + i, 1);
}

// One row's histogram and density counts, a neuron at a time (c < 0: in no quadrant). Consecutive increments go
// to different neurons, so they never wait on each other.
template <class Count>
inline void count_row(Count* __restrict__ hist, Count* __restrict__ density, const int32_t* c_row,
                      const int32_t* h_row, const int32_t* d_row, int w, int32_t parts) {
  for (int jj = 0; jj < w; ++jj) {
    if (c_row[jj] < 0) continue;
    if (parts & PART_HIST) {
      ++hist[h_row[jj]];
      ++hist[h_row[BLOCK + jj]];
      ++hist[h_row[2 * BLOCK + jj]];
    }
    if (parts & PART_DENSITY) ++density[d_row[jj]];
  }
}

// One text's histograms, density and sample candidates for a block of w neurons from j0, from the block's
// x_gate, x_in (after the weight convention) and act, which the main loop left in lg, li and la ([t, BLOCK]).
// `routed`, when not null, lists the n_routed positions (ascending, none 0) the block's neurons saw, and `bos`
// whether BOS has values; else every position 1 .. length-1 is walked.
template <class Counts>
void distributions(const ReduceArgs* args, int64_t b, int64_t j0, int w, int64_t length,
                   const float (&bnd)[N_QUADRANTS][3][BLOCK], const uint32_t (&salt)[BLOCK], const float* lg,
                   const float* li, const float* la, Counts& counts, const int32_t* routed, int64_t n_routed,
                   bool bos, TextWindows* windows) {
  using Count = typename Counts::Count;
  constexpr int NQ = N_QUADRANTS, NC = N_QUADRANTS * N_INTERVALS;
  const int32_t parts = args->parts;
  const int64_t n_rows = routed ? n_routed : length - 1;
  counts.before_rows(args, j0, w, n_rows);
  Count* __restrict__ hist = counts.hist(args, j0);
  Count* __restrict__ density = counts.density(args, j0);
  const int32_t tid = int32_t(args->text_ids[b]);
  const uint32_t text_hash = fmix32(uint32_t(args->seed) ^ uint32_t(tid));
  // Per text, (quadrant, interval) cell and neuron of the block: the smallest hash and its position.
  alignas(64) uint32_t best_hash[NC * BLOCK];
  alignas(64) int32_t best_pos[NC * BLOCK];
  std::fill(best_hash, best_hash + NC * BLOCK, HASH_EMPTY);
  std::fill(best_pos, best_pos + NC * BLOCK, 0);
  // One row of the block at a time: its codes vectorised over the block, then the counts, scattered.
  alignas(64) int32_t c_row[BLOCK], h_row[N_HIST_HOOKS * BLOCK], d_row[BLOCK];
  alignas(64) uint32_t s_row[BLOCK];
#if GLUSCOPE_SCATTER
  static_assert(BLOCK == 16, "a row of the block is one __m512i of int32");
  const __mmask16 lanes = __mmask16((1u << w) - 1);
#endif
  for (int64_t i = 0; i < n_rows; ++i) {
    const int64_t t = routed ? routed[i] : i + 1;
    const float* __restrict__ g_row = lg + t * BLOCK;
    const float* __restrict__ i_row = li + t * BLOCK;
    const float* __restrict__ a_row = la + t * BLOCK;
    const uint32_t th = fmix32(text_hash ^ uint32_t(t));
#pragma omp simd
    for (int jj = 0; jj < BLOCK; ++jj) {
      const float g = g_row[jj], x_in = i_row[jj], post = a_row[jj] * x_in;
      // The quadrant code is 2 * (x_gate < 0) + (x_in < 0), and each list's sign the product of the signs
      // it depends on (formulas_hold() checks both against the header's tables).
      const int32_t gneg = g < 0, ineg = x_in < 0;
      // Nonzero and not NaN (an expert's tokens routed elsewhere are NaN). int, not bool: bools stop GCC vectorising.
      const int32_t member = (int32_t(g > 0) | int32_t(g < 0)) & (int32_t(x_in > 0) | int32_t(x_in < 0));
      const int32_t q = 2 * gneg + ineg;
      const float p = std::fabs(post);
      int32_t interval = 0;
      for (int i = 0; i < 3; ++i) {  // unconditional loads, then selects
        const float pp = bnd[0][i][jj], pn = bnd[1][i][jj], np_ = bnd[2][i][jj], nn = bnd[3][i][jj];
        const float gate_pos = ineg ? pn : pp, gate_neg = ineg ? nn : np_;
        interval += int32_t(p >= (gneg ? gate_neg : gate_pos));
      }
      c_row[jj] = ((q * N_INTERVALS + interval) * BLOCK + jj + 1) * member - 1;  // -1: in no quadrant
      const int32_t s_post = 1 - 2 * (gneg ^ ineg), s_in = 1 - 2 * ineg, s_gate = 1 - 2 * gneg;
      const int32_t base = jj * HIST_PER_NEURON + q * N_HIST_HOOKS * HIST_SLOTS;
      // Each value's bits once, for both its histogram slot and its density bin.
      const int32_t n_post = below_zero(post), n_in = below_zero(x_in), n_gate = below_zero(g);
      const uint32_t u_post = bin_bits(post, n_post), u_in = bin_bits(x_in, n_in), u_gate = bin_bits(g, n_gate);
      h_row[jj] = base + HIST_POST_AT * HIST_SLOTS + s_post * signed_offset(value_mag(u_post), n_post);
      h_row[BLOCK + jj] = base + HIST_IN_AT * HIST_SLOTS + s_in * signed_offset(value_mag(u_in), n_in);
      h_row[2 * BLOCK + jj] = base + HIST_GATE_AT * HIST_SLOTS + s_gate * signed_offset(value_mag(u_gate), n_gate);
      d_row[jj] = (jj * D + DENSITY_MAG_BINS + signed_offset(density_mag(u_gate), n_gate)) * D + DENSITY_MAG_BINS +
                  signed_offset(density_mag(u_in), n_in);
      s_row[jj] = ((th ^ salt[jj]) * GOLDEN) >> 1;
    }
#if GLUSCOPE_SCATTER
    // Every lane's count and cell is its own neuron's, so no two lanes of a scatter share an address.
    const __m512i cv = _mm512_load_si512(c_row), one = _mm512_set1_epi32(1);
    const __mmask16 in = _mm512_mask_cmpge_epi32_mask(lanes, cv, _mm512_setzero_si512());  // c < 0: in no quadrant
    if constexpr (sizeof(Count) == 4) {
      auto increment = [&](Count* table, const int32_t* row) {
        const __m512i at = _mm512_load_si512(row);
        const __m512i v = _mm512_mask_i32gather_epi32(one, in, at, table, sizeof(Count));
        _mm512_mask_i32scatter_epi32(table, in, at, _mm512_add_epi32(v, one), sizeof(Count));
      };
      if (parts & PART_HIST) {
        increment(hist, h_row);
        increment(hist, h_row + BLOCK);
        increment(hist, h_row + 2 * BLOCK);
      }
      if (parts & PART_DENSITY) increment(density, d_row);
    } else {
      count_row(hist, density, c_row, h_row, d_row, w, parts);
    }
    const __m512i sv = _mm512_load_si512(s_row);
    const __m512i bh = _mm512_mask_i32gather_epi32(sv, in, cv, best_hash, 4);
    const __mmask16 enters = _mm512_mask_cmplt_epu32_mask(in, sv, bh);  // strict: the lower position wins a tie
    _mm512_mask_i32scatter_epi32(best_hash, enters, cv, sv, 4);
    _mm512_mask_i32scatter_epi32(best_pos, enters, cv, _mm512_set1_epi32(int32_t(t)), 4);
#else
    count_row(hist, density, c_row, h_row, d_row, w, parts);
    for (int jj = 0; jj < w; ++jj) {
      const int32_t c = c_row[jj];
      if (c < 0) continue;
      if (s_row[jj] < best_hash[c]) {  // strict: the lower position wins a tie
        best_hash[c] = s_row[jj];
        best_pos[c] = int32_t(t);
      }
    }
#endif
  }
  if (!(parts & PART_SAMPLING)) return;
  for (int jj = 0; jj < w; ++jj) {
    const TextValues v{lg + jj, li + jj, la + jj, BLOCK, length, args->before, args->after, routed, n_routed, bos,
                       windows, jj};
    const int64_t at = (j0 + jj) * NQ * SAMPLE_SLOTS;
    const Samples s{args->samp_hash + at, args->samp_text + at, args->samp_pos + at, args->samp_slot + at,
                    args->samp_gate + at, args->samp_in + at, args->samp_act + at,
                    args->samp_win_gate + at * args->window, args->samp_win_in + at * args->window, args->window};
    for (int q = 0; q < NQ; ++q) {
      uint32_t rh = HASH_EMPTY;
      int32_t rp = 0;
      for (int i = 0; i < N_INTERVALS; ++i) {
        const int c = (q * N_INTERVALS + i) * BLOCK + jj;
        if (best_hash[c] == HASH_EMPTY) continue;
        if (best_hash[c] < rh || (best_hash[c] == rh && best_pos[c] < rp)) {
          rh = best_hash[c];
          rp = best_pos[c];
        }
        offer_sample(s, q * SAMPLE_SLOTS + N_RANDOM + i * N_PER_INTERVAL, N_PER_INTERVAL, best_hash[c], tid,
                     best_pos[c], v);
      }
      if (rh != HASH_EMPTY) offer_sample(s, q * SAMPLE_SLOTS, N_RANDOM, rh, tid, rp, v);
    }
  }
}

// An expert's positions (BOS excluded, ascending) per text: text b's are pos[at[b]] .. pos[at[b + 1] - 1]. Found
// once per call for every block, so that a block's walk costs what the expert's rows do, not the whole batch.
struct Routed {
  std::vector<int32_t> pos;
  std::vector<int64_t> at;
};

Routed routed_positions(const ReduceArgs* args) {
  const int64_t B = args->batch, T = args->seq_len;
  Routed r;
  r.at.assign(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 1; t < args->lengths[b]; ++t)
      if (args->row_map[b * T + t] >= 0) r.pos.push_back(int32_t(t));
    r.at[b + 1] = int64_t(r.pos.size());
  }
  return r;
}

// The rows the call walks: an expert's routed positions, or every position but BOS.
int64_t rows_walked(const ReduceArgs* args, const Routed& routed) {
  if (args->row_map) return int64_t(routed.pos.size());
  int64_t rows = 0;
  for (int64_t b = 0; b < args->batch; ++b) rows += args->lengths[b] - 1;
  return rows;
}

// WEIGHTED (ReduceArgs.weight given): also each neuron's router weight * hook_post per quadrant, as min, max and
// sum, into the unit's slice of its layer's running values (routing.RouterStats), in the pass that already has
// every routed token's hook_post at hand.
template <bool WEIGHTED>
void reduce_update(const ReduceArgs* args) {
  // x_gate and x_in are rows gate_stride and in_stride floats apart (an expert's are column halves of one
  // product, read in place); act's are n apart.
  const float* G = args->x_gate;
  const float* X_IN = args->x_in;
  const float* A = args->act;
  const int64_t GS = args->gate_stride, IS = args->in_stride;
  const float* sign = args->sign;
  const float* weight = args->weight;
  const int64_t B = args->batch, T = args->seq_len, n = args->n, k = args->k, W = args->window;
  const int64_t before = args->before, after = args->after;
  const int64_t* lengths = args->lengths;
  const int64_t* text_ids = args->text_ids;
  // An expert's reducer: its tokens' values are rows of a compact [R, n] input, and row_map[b * T + t] is the
  // row of position t of text b, -1 where the token went to other experts. Null: [B, T, n], every token.
  const int64_t* row_map = args->row_map;
  int64_t* counts = args->counts;
  double* total = args->total;
  float* near = args->near;
  const float* bounds = args->bounds;
  const int32_t parts = args->parts;
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
  const Routed routed = row_map ? routed_positions(args) : Routed{};
  const int64_t rows = rows_walked(args, routed);
  const bool in_block = counts_in_block(rows), fetch_counts = fetch_layer_counts(rows);
#pragma omp parallel num_threads(args->n_threads)
  {
  // This text's x_gate and x_in of the block, contiguous, for the windows of entering examples.
  // act too, for the distributions.
  std::vector<float> local_g(max_length * BLOCK), local_in(max_length * BLOCK), local_a(max_length * BLOCK);
  TextWindows windows(row_map ? max_length : 0);
  BlockCounts block_counts(in_block);
  LayerCounts layer_counts;
#pragma omp for schedule(dynamic, 1)
  for (int64_t blk = 0; blk < n_blocks; ++blk) {
    const int64_t j0 = blk * BLOCK;
    const int w = int(std::min<int64_t>(BLOCK, n - j0));
    if (fetch_counts) {
      if (parts & PART_HIST) prefetch_lines(args->hist + j0 * HIST_PER_NEURON, w * HIST_PER_NEURON);
      if (parts & PART_DENSITY) prefetch_lines(args->density + j0 * D * D, w * D * D);
    }
    alignas(64) int32_t cnt[NQ][BLOCK] = {};
    alignas(64) float nr[NL][BLOCK];
    alignas(64) float sm[NL][BLOCK];
    alignas(64) float bm[NL][BLOCK];
    alignas(64) int32_t bp[NL][BLOCK];
    alignas(64) float sg[BLOCK];
    for (int l = 0; l < NL; ++l) std::fill(nr[l], nr[l] + BLOCK, inf);
    for (int jj = 0; jj < BLOCK; ++jj) sg[jj] = jj < w ? sign[j0 + jj] : 1.0f;
    // WEIGHTED: the running min, max and sum, and per text a float sum (as sm for total: a double accumulator
    // stops GCC vectorising the row loops) added to the running sum after the text.
    alignas(64) float wlo[NQ][BLOCK], whi[NQ][BLOCK], wsm[NQ][BLOCK];
    alignas(64) double wsum[NQ][BLOCK];
    if constexpr (WEIGHTED) {
      for (int q = 0; q < NQ; ++q)
        for (int jj = 0; jj < BLOCK; ++jj) {
          const int64_t at = (j0 + jj) * NQ + q;
          wlo[q][jj] = jj < w ? args->weighted_min[at] : inf;
          whi[q][jj] = jj < w ? args->weighted_max[at] : -inf;
          wsum[q][jj] = jj < w ? args->weighted_sum[at] : 0.0;
        }
    }
    alignas(64) float bnd[NQ][3][BLOCK];
    alignas(64) uint32_t salt[BLOCK];
    const uint32_t layer_salt = fmix32(uint32_t(args->seed) ^ uint32_t(args->layer));
    for (int jj = 0; jj < BLOCK; ++jj) {
      salt[jj] = fmix32(layer_salt ^ uint32_t(args->first_neuron + j0 + jj));
      for (int q = 0; q < NQ; ++q)
        for (int i = 0; i < 3; ++i) bnd[q][i][jj] = jj < w ? bounds[((j0 + jj) * NQ + q) * 3 + i] : 0.0f;
    }
    for (int64_t b = 0; b < B; ++b) {
      const int64_t length = lengths[b];
      const int32_t* text_routed = row_map ? routed.pos.data() + routed.at[b] : nullptr;
      const int64_t n_routed = row_map ? routed.at[b + 1] - routed.at[b] : 0;
      if (row_map && n_routed == 0) continue;  // none of the text's tokens came to this expert: nothing to fold
      std::memset(sm, 0, sizeof sm);
      std::memset(bm, 0, sizeof bm);
      std::memset(bp, 0, sizeof bp);
      if constexpr (WEIGHTED) std::memset(wsm, 0, sizeof wsm);
      const int64_t bos = row_map ? row_map[b * T] : b * T;
      for (int jj = 0; jj < w && bos >= 0; ++jj) {  // BOS is in no statistic but starts early windows
        local_g[jj] = G[bos * GS + j0 + jj];
        local_in[jj] = X_IN[bos * IS + j0 + jj] * sg[jj];
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
// The router-weighted value v of a token in quadrant q (member) into that quadrant's min, max and sum.
#define GLUSCOPE_WEIGH(q, member, v)                                                                     \
  {                                                                                                      \
    const float lo = (member) ? (v) : inf, hi = (member) ? (v) : -inf;                                   \
    wlo[q][jj] = lo < wlo[q][jj] ? lo : wlo[q][jj];                                                      \
    whi[q][jj] = hi > whi[q][jj] ? hi : whi[q][jj];                                                      \
    wsm[q][jj] += (member) ? (v) : 0.0f;                                                                 \
  }
// Is this token in quadrant q? The quadrant's signs come from rules.QUADRANT_SIGNS.
#define GLUSCOPE_MEMBER(q) (has_sign<QUADRANT_GATE_SIGN[q]>(g) & has_sign<QUADRANT_IN_SIGN[q]>(x_in))
// One row of the block: its values, quadrant and the 16 lists (written out per
// list: loops over quadrant and hook here stop GCC vectorising over jj); wt is the row's router weight.
#define GLUSCOPE_ROW(gr, ir, ar, lg, li, la_, tpos, wt)                                                  \
  {                                                                                                      \
    const float g = (gr)[jj], x_in = (ir)[jj] * sg[jj], a = (ar)[jj];                                    \
    (lg)[jj] = g;                                                                                        \
    (li)[jj] = x_in;                                                                                     \
    (la_)[jj] = a;                                                                                       \
    const float post = a * x_in;                                                                         \
    const float abs_post = std::fabs(post), abs_in = std::fabs(x_in);                                    \
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
    if constexpr (WEIGHTED) {                                                                            \
      const float v = post * (wt); /* (act * x_in) * weight, as the tensor code multiplies */            \
      GLUSCOPE_WEIGH(0, q0, v)                                                                           \
      GLUSCOPE_WEIGH(1, q1, v)                                                                           \
      GLUSCOPE_WEIGH(2, q2, v)                                                                           \
      GLUSCOPE_WEIGH(3, q3, v)                                                                           \
    }                                                                                                    \
  }
      int64_t t = row_map ? length : 1;  // an expert's positions are walked below instead
      for (; t + 1 < length; t += 2) {
        const int64_t r = b * T + t;
        const float* __restrict__ gate_row0 = G + r * GS + j0;
        const float* __restrict__ in_row0 = X_IN + r * IS + j0;
        const float* __restrict__ act_row0 = A + r * n + j0;
        const float* __restrict__ gate_row1 = gate_row0 + GS;
        const float* __restrict__ in_row1 = in_row0 + IS;
        const float* __restrict__ act_row1 = act_row0 + n;
        float* __restrict__ lg0 = local_g.data() + t * BLOCK;
        float* __restrict__ li0 = local_in.data() + t * BLOCK;
        float* __restrict__ lg1 = lg0 + BLOCK;
        float* __restrict__ li1 = li0 + BLOCK;
        float* __restrict__ la0 = local_a.data() + t * BLOCK;
        float* __restrict__ la1 = la0 + BLOCK;
        const int32_t t0 = int32_t(t), t1 = int32_t(t + 1);
        const float wt0 = WEIGHTED ? weight[b * T + t] : 0.0f, wt1 = WEIGHTED ? weight[b * T + t + 1] : 0.0f;
        if (t + PREFETCH + 1 < length) {
          __builtin_prefetch(gate_row0 + PREFETCH * GS);
          __builtin_prefetch(in_row0 + PREFETCH * IS);
          __builtin_prefetch(act_row0 + PREFETCH * n);
          __builtin_prefetch(gate_row1 + PREFETCH * GS);
          __builtin_prefetch(in_row1 + PREFETCH * IS);
          __builtin_prefetch(act_row1 + PREFETCH * n);
        }
#pragma omp simd
        for (int jj = 0; jj < w; ++jj) {
          GLUSCOPE_ROW(gate_row0, in_row0, act_row0, lg0, li0, la0, t0, wt0)
          GLUSCOPE_ROW(gate_row1, in_row1, act_row1, lg1, li1, la1, t1, wt1)
        }
      }
      for (; t < length; ++t) {  // the odd last row
        const int64_t r = b * T + t;
        float* __restrict__ lg0 = local_g.data() + t * BLOCK;
        float* __restrict__ li0 = local_in.data() + t * BLOCK;
        float* __restrict__ la0 = local_a.data() + t * BLOCK;
        const int32_t t0 = int32_t(t);
        const float wt0 = WEIGHTED ? weight[r] : 0.0f;
#pragma omp simd
        for (int jj = 0; jj < w; ++jj)
          GLUSCOPE_ROW(G + r * GS + j0, X_IN + r * IS + j0, A + r * n + j0, lg0, li0, la0, t0, wt0)
      }
      for (int64_t i = 0; i < n_routed; ++i) {  // an expert's routed positions, one row each
        const int64_t tr = text_routed[i];
        const int64_t r = row_map[b * T + tr];
        // Rows a page or more apart, in the order the experts module computed them (not the positions'): no
        // hardware prefetcher follows them.
        if (i + PREFETCH < n_routed) {
          const int64_t ahead = row_map[b * T + text_routed[i + PREFETCH]];
          __builtin_prefetch(G + ahead * GS + j0);
          __builtin_prefetch(X_IN + ahead * IS + j0);
          __builtin_prefetch(A + ahead * n + j0);
        }
        float* __restrict__ lg0 = local_g.data() + tr * BLOCK;
        float* __restrict__ li0 = local_in.data() + tr * BLOCK;
        float* __restrict__ la0 = local_a.data() + tr * BLOCK;
        const int32_t t0 = int32_t(tr);
        const float wt0 = WEIGHTED ? weight[r] : 0.0f;
#pragma omp simd
        for (int jj = 0; jj < w; ++jj)
          GLUSCOPE_ROW(G + r * GS + j0, X_IN + r * IS + j0, A + r * n + j0, lg0, li0, la0, t0, wt0)
      }
#undef GLUSCOPE_ROW
#undef GLUSCOPE_MEMBER
#undef GLUSCOPE_WEIGH
#undef GLUSCOPE_QUADRANT
#undef GLUSCOPE_ACC
      if constexpr (WEIGHTED) {
        for (int q = 0; q < NQ; ++q)
          for (int jj = 0; jj < BLOCK; ++jj) wsum[q][jj] += wsm[q][jj];
      }
      const int32_t tid = int32_t(text_ids[b]);
      for (int jj = 0; jj < w; ++jj) {
        const int64_t j = j0 + jj;
        const int64_t at = j * NL * k;
        const Lists s{top_mag + at, top_text + at, top_pos + at, top_slot + at, win_gate + at * W, win_in + at * W,
                      k, W};
        const TextValues v{local_g.data() + jj, local_in.data() + jj, local_a.data() + jj, BLOCK, length, before,
                           after, text_routed, n_routed, bos >= 0, &windows, jj};
        for (int l = 0; l < NL; ++l) {
          total[j * NL + l] += sm[l][jj];
          if (bm[l][jj] > 0)  // 0: no nonzero value of this list in the text
            offer(s, l, bm[l][jj], tid, bp[l][jj], v);
        }
      }
      if (parts && in_block)
        distributions(args, b, j0, w, length, bnd, salt, local_g.data(), local_in.data(), local_a.data(),
                      block_counts, text_routed, n_routed, bos >= 0, &windows);
      else if (parts)
        distributions(args, b, j0, w, length, bnd, salt, local_g.data(), local_in.data(), local_a.data(),
                      layer_counts, text_routed, n_routed, bos >= 0, &windows);
      // After the distributions, whose sampled examples queue windows too.
      windows.flush({local_g.data(), local_in.data(), local_a.data(), BLOCK, length, before, after, text_routed,
                     n_routed, bos >= 0, &windows, 0}, W);
    }
    if (in_block && (parts & (PART_HIST | PART_DENSITY))) block_counts.flush(args, j0, w);
    for (int jj = 0; jj < w; ++jj) {
      const int64_t j = j0 + jj;
      for (int q = 0; q < NQ; ++q) counts[j * NQ + q] += cnt[q][jj];
      for (int l = 0; l < NL; ++l) near[j * NL + l] = std::min(near[j * NL + l], nr[l][jj]);
      if constexpr (WEIGHTED) {
        for (int q = 0; q < NQ; ++q) {
          args->weighted_min[j * NQ + q] = wlo[q][jj];
          args->weighted_max[j * NQ + q] = whi[q][jj];
          args->weighted_sum[j * NQ + q] = wsum[q][jj];
          args->weighted_count[j * NQ + q] += cnt[q][jj];
        }
      }
    }
  }
  }  // omp parallel
}

}  // namespace

extern "C" void gluscope_reduce_update(const ReduceArgs* args) {
  if (args->weight)
    reduce_update<true>(args);
  else
    reduce_update<false>(args);
}

// Running tops merged straight from a weight-stage product: once a top is
// full few entries beat its last key, so one vectorised compare per 16
// entries finds them and each enters by insertion. (Finding them first and
// merging with torch's sort, scatter and topk cost several times the scan.) A top is `top` keys sorted in decreasing
// order, with an id (and, for related, a signed value) per key; an entry
// enters when its key beats the last one strictly, so of equal keys the one
// offered first stays first. Ids grow along rows and columns and across
// calls, so that is the lower id. Empty places hold -inf.
namespace {

struct Top {
  float* key;
  int64_t* id;
  float* val;  // nullptr: the key is the value
};

inline void enter(const Top& t, int64_t top, int64_t slot, float key, int64_t id, float val) {
  float* k = t.key + slot * top;
  int64_t* ids = t.id + slot * top;
  float* v = t.val ? t.val + slot * top : nullptr;
  int64_t j = top - 1;
  for (; j > 0 && key > k[j - 1]; --j) {
    k[j] = k[j - 1];
    ids[j] = ids[j - 1];
    if (v) v[j] = v[j - 1];
  }
  k[j] = key;
  ids[j] = id;
  if (v) v[j] = val;
}

// keep(j) for each j in [c0, c1), skipping runs of 16 where beats(j) holds for none: the test vectorises, and
// keep tests again before it enters anything.
template <class Beats, class Keep>
inline void scan(int64_t c0, int64_t c1, Beats beats, Keep keep) {
  constexpr int64_t LANES = 16;
  int64_t c = c0;
  for (; c + LANES <= c1; c += LANES) {
    int any = 0;
#pragma omp simd reduction(| : any)
    for (int64_t j = c; j < c + LANES; ++j) any |= int(beats(j));
    if (!any) continue;
    for (int64_t j = c; j < c + LANES; ++j) keep(j);
  }
  for (; c < c1; ++c) keep(c);
}

}  // namespace

// token_tops.TokenNeurons: column c's top of the largest entries (top0,
// ids first_id + r) and of the smallest (top1, keyed by -P). Each thread owns
// a stripe of columns, so no two threads touch one top; the last key of each
// top is mirrored into a contiguous array so that the test vectorises.
extern "C" void gluscope_column_tops(const float* P, int64_t R, int64_t C, int64_t ld, int64_t first_id,
                                     float* key0, int64_t* id0, float* key1, int64_t* id1, int64_t top,
                                     int32_t n_threads) {
  const Top t0{key0, id0, nullptr}, t1{key1, id1, nullptr};
#pragma omp parallel num_threads(n_threads)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t c0 = C * t / nt, c1 = C * (t + 1) / nt;
    std::vector<float> hi(c1 - c0), lo(c1 - c0);  // enter top0 above hi, top1 below lo
    for (int64_t c = c0; c < c1; ++c) {
      hi[c - c0] = key0[c * top + top - 1];
      lo[c - c0] = -key1[c * top + top - 1];
    }
    const float* h = hi.data() - c0;  // not restrict: entering a top writes through hi and lo
    const float* l = lo.data() - c0;
    for (int64_t r = 0; r < R; ++r) {
      const float* __restrict__ row = P + r * ld;
      scan(c0, c1, [&](int64_t c) { return (row[c] > h[c]) | (row[c] < l[c]); }, [&](int64_t c) {
        if (row[c] > h[c]) {
          enter(t0, top, c, row[c], first_id + r, 0.0f);
          hi[c - c0] = key0[c * top + top - 1];
        }
        if (row[c] < l[c]) {
          enter(t1, top, c, -row[c], first_id + r, 0.0f);
          lo[c - c0] = -key1[c * top + top - 1];
        }
      });
    }
  }
}

// related.related_neurons: from one [R, C] block of cosines, by |P|, each row
// r's top (rows: ids row_first + c) and each column c's top (cols: ids
// col_first + r), signed values kept beside the keys. Two passes, so that each
// thread owns its tops: columns split among threads, then rows.
extern "C" void gluscope_abs_tops(const float* P, int64_t R, int64_t C, int64_t ld, float* row_key,
                                  int64_t* row_id, float* row_val, int64_t row_first, float* col_key,
                                  int64_t* col_id, float* col_val, int64_t col_first, int64_t top,
                                  int32_t n_threads) {
  const Top rows{row_key, row_id, row_val}, cols{col_key, col_id, col_val};
#pragma omp parallel num_threads(n_threads)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t c0 = C * t / nt, c1 = C * (t + 1) / nt;
    std::vector<float> worst(c1 - c0);
    for (int64_t c = c0; c < c1; ++c) worst[c - c0] = col_key[c * top + top - 1];
    const float* w = worst.data() - c0;
    for (int64_t r = 0; r < R; ++r) {
      const float* __restrict__ row = P + r * ld;
      scan(c0, c1, [&](int64_t c) { return std::fabs(row[c]) > w[c]; }, [&](int64_t c) {
        if (std::fabs(row[c]) > w[c]) {
          enter(cols, top, c, std::fabs(row[c]), col_first + r, row[c]);
          worst[c - c0] = col_key[c * top + top - 1];
        }
      });
    }
#pragma omp barrier
    const int64_t r0 = R * t / nt, r1 = R * (t + 1) / nt;
    for (int64_t r = r0; r < r1; ++r) {
      const float* __restrict__ row = P + r * ld;
      float bar = row_key[r * top + top - 1];
      scan(0, C, [&](int64_t c) { return std::fabs(row[c]) > bar; }, [&](int64_t c) {
        if (std::fabs(row[c]) > bar) {
          enter(rows, top, r, std::fabs(row[c]), row_first + c, row[c]);
          bar = row_key[r * top + top - 1];
        }
      });
    }
  }
}
