// Fused PQ search: ADC scoring of uint8 codes, GQA aggregation and top-k selection.
//
// Inputs, per selection row s (S rows; see "rows" below):
//   codes   [R, N, M] uint8, token n's M codes contiguous, rows `code_stride` bytes apart;
//   tables  [R, Q, M, K] float32 ADC lookup tables (query sub-vector x centroid inner
//           products, kvstore.pq.adc.lookup_tables), any strides with K contiguous;
//   lo, hi  [R] int64 (or null: 0 and N): the candidate tokens of a row are lo <= n < hi
//           (sinks before lo and the recent window from hi on are kept by the caller).
//
// What is computed (kvstore.pq.adc.adc_topk is the torch reference, same definitions):
//   score_q(n) = sum_m tables[r, q, m, codes[r, n, m]]                 (ADC)
//   mode kRaw: value(n) = score_0(n)                                   (one query per row)
//   mode kSum / kMax, with x_q(n) = scale * score_q(n) over the candidates of the row:
//       p_q(n)   = exp(x_q(n) - max_n' x_q(n')) / sum_n' exp(x_q(n') - max_n' x_q(n'))
//       value(n) = sum_q p_q(n)   (kSum)   or   max_q p_q(n)   (kMax)
//   out: the k tokens of largest value (candidates first; when a row has fewer than k
//   candidates the rest are arbitrary non-candidates with value -inf), in no particular order.
//
// Rows: selection row s reads codes row r = s / split and tables [r, s % split] when
// split > 1 (per-query top-k: Q = 1 per selection row), or tables [r, 0..Q) when split == 1.
//
// Launches (grid = chunks x S, kThreads threads, chunks of `chunk` tokens):
//   1. pq_stats (modes kSum/kMax with Q > 1 only): per chunk and query, the max and the
//      sum of exp(x - max) over its candidates -> partial [S, chunks, QMAX] (m, z).
//   2. pq_rank: combines the partials of its row into the softmax normalisers, recomputes
//      value(n), writes the order-preserving uint32 key of value(n) for every candidate and
//      adds the top 11 key bits to the row's histogram. The last CTA of a row to finish
//      (threadfence + counter) radix-selects the row's k-th key from that histogram (and at
//      most two more 11/10-bit digit passes over the row's keys), writes the k indices, and
//      resets the row's histogram and counter to zero for the next launch.
//
// Each CTA stages its row's tables in shared memory as lut[(m * K + c) * QMAX + q], so one
// code lookup yields the scores of all QMAX queries (float4 loads), and reads codes with
// 16-byte streaming loads when VEC (16 % M == 0, 16-byte aligned rows); the tail of a row
// and unaligned rows use byte loads. Codes >= K are invalid input; they are masked to
// c & (K - 1) so that they can never read outside the table (K is a power of two).

namespace pqs {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kTopBits = 11;
constexpr int kTopBins = 1 << kTopBits;
constexpr unsigned int kFull = 0xffffffffu;

enum Mode : int { kRaw = 0, kSum = 1, kMax = 2 };

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// Monotone map float -> uint32 (a < b  <=>  key(a) < key(b)); every finite value maps above 0,
// and key 0 marks a non-candidate.
__device__ __forceinline__ unsigned int order_key(float f) {
  const unsigned int u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float key_value(unsigned int key) {
  if (key == 0u) return neg_inf();
  return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

// --------------------------------------------------------------------------------- scanning
struct Row {
  const unsigned char* codes;  // this row's first token
  const float* tables;         // tables[r, q0, 0, 0]
  long long t_stride_q, t_stride_m;
  long long lo, hi;            // candidates
  long long n;                 // tokens of the row (N)
};

__device__ __forceinline__ Row make_row(const unsigned char* codes, long long code_stride, const float* tables,
                                        long long t_stride_r, long long t_stride_q, long long t_stride_m,
                                        const long long* lo, const long long* hi, int split, long long N) {
  const int s = blockIdx.y;
  const int r = s / split;
  Row row;
  row.codes = codes + (long long)r * code_stride;
  row.tables = tables + (long long)r * t_stride_r + (long long)(s % split) * t_stride_q;
  row.t_stride_q = t_stride_q;
  row.t_stride_m = t_stride_m;
  row.lo = lo ? max(lo[r], 0ll) : 0ll;
  row.hi = max(hi ? min(hi[r], N) : N, row.lo);
  row.n = N;
  return row;
}

// lut[(m * K + c) * QMAX + q] = tables[q, m, c] for q < Q, 0 for the padding queries.
template <int QMAX>
__device__ __forceinline__ void load_lut(float* lut, const Row& row, int Q, int M, int K) {
  const int total = QMAX * M * K;
  for (int i = threadIdx.x; i < total; i += kThreads) {  // c fastest: coalesced global reads
    const int c = i % K, m = (i / K) % M, q = i / (K * M);
    lut[(m * K + c) * QMAX + q] = q < Q ? row.tables[q * row.t_stride_q + m * row.t_stride_m + c] : 0.f;
  }
  __syncthreads();
}

template <int M, int QMAX>
__device__ __forceinline__ void add_code(const float* lut, int K, int m, unsigned int code, float (&s)[QMAX]) {
  const float* e = lut + (m * K + (int)(code & (unsigned int)(K - 1))) * QMAX;
  if constexpr (QMAX % 4 == 0) {
#pragma unroll
    for (int j = 0; j < QMAX / 4; ++j) {
      const float4 v = reinterpret_cast<const float4*>(e)[j];
      s[4 * j] += v.x; s[4 * j + 1] += v.y; s[4 * j + 2] += v.z; s[4 * j + 3] += v.w;
    }
  } else {
#pragma unroll
    for (int q = 0; q < QMAX; ++q) s[q] += e[q];
  }
}

// Calls f(n, scores) for every candidate n of [begin, end) of this CTA's chunk.
template <int M, int QMAX, bool VEC, class F>
__device__ __forceinline__ void scan_chunk(const Row& row, const float* lut, int K, long long begin, long long end, F&& f) {
  begin = max(begin, row.lo);
  end = min(end, row.hi);
  if (begin >= end) return;
  long long scalar_from = begin;
  if constexpr (VEC) {
    constexpr int TPV = 16 / M;  // tokens per 16-byte vector
    const long long vb = begin / TPV;
    const long long ve = min((end + TPV - 1) / TPV, row.n / TPV);  // whole vectors inside the row
    const uint4* vp = reinterpret_cast<const uint4*>(row.codes);
    for (long long v = vb + threadIdx.x; v < ve; v += kThreads) {
      const uint4 raw = __ldcs(vp + v);
      const unsigned int w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
      for (int j = 0; j < TPV; ++j) {
        float s[QMAX];
#pragma unroll
        for (int q = 0; q < QMAX; ++q) s[q] = 0.f;
#pragma unroll
        for (int m = 0; m < M; ++m) {
          const int b = j * M + m;
          add_code<M, QMAX>(lut, K, m, (w[b >> 2] >> ((b & 3) * 8)) & 0xffu, s);
        }
        const long long n = v * TPV + j;
        if (n >= begin && n < end) f(n, s);
      }
    }
    scalar_from = max(begin, ve * TPV);
  }
  for (long long n = scalar_from + threadIdx.x; n < end; n += kThreads) {
    float s[QMAX];
#pragma unroll
    for (int q = 0; q < QMAX; ++q) s[q] = 0.f;
#pragma unroll
    for (int m = 0; m < M; ++m) add_code<M, QMAX>(lut, K, m, row.codes[n * M + m], s);
    f(n, s);
  }
}

// Online softmax state (max, sum of exp(x - max)); z == 0 means empty.
__device__ __forceinline__ void combine(float& m, float& z, float m2, float z2) {
  if (z2 == 0.f) return;
  if (z == 0.f) { m = m2; z = z2; return; }
  const float mx = fmaxf(m, m2);
  z = z * expf(m - mx) + z2 * expf(m2 - mx);
  m = mx;
}

// Adds one value x to an online softmax state.
__device__ __forceinline__ void push(float& m, float& z, float x) {
  if (x > m) {
    z = z * expf(m - x) + 1.f;
    m = x;
  } else {
    z += expf(x - m);
  }
}

// ------------------------------------------------------------------------ kernel 1: stats
template <int M, int QMAX, bool VEC>
__device__ void stats_impl(const unsigned char* codes, long long code_stride, const float* tables,
                           long long t_stride_r, long long t_stride_q, long long t_stride_m,
                           const long long* lo, const long long* hi, int Q, int K, long long N,
                           long long chunk, float scale, float* partial) {
  extern __shared__ __align__(16) float lut[];
  __shared__ float red_m[kWarps][QMAX], red_z[kWarps][QMAX];
  const Row row = make_row(codes, code_stride, tables, t_stride_r, t_stride_q, t_stride_m, lo, hi, 1, N);
  load_lut<QMAX>(lut, row, Q, M, K);
  float tm[QMAX], tz[QMAX];
#pragma unroll
  for (int q = 0; q < QMAX; ++q) { tm[q] = neg_inf(); tz[q] = 0.f; }
  const long long begin = (long long)blockIdx.x * chunk;
  scan_chunk<M, QMAX, VEC>(row, lut, K, begin, begin + chunk, [&](long long, const float (&s)[QMAX]) {
#pragma unroll
    for (int q = 0; q < QMAX; ++q) push(tm[q], tz[q], scale * s[q]);
  });
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int q = 0; q < QMAX; ++q) {
    for (int o = 16; o > 0; o >>= 1) {
      const float m2 = __shfl_xor_sync(kFull, tm[q], o), z2 = __shfl_xor_sync(kFull, tz[q], o);
      combine(tm[q], tz[q], m2, z2);
    }
    if (lane == 0) { red_m[warp][q] = tm[q]; red_z[warp][q] = tz[q]; }
  }
  __syncthreads();
  if (threadIdx.x < Q) {
    const int q = threadIdx.x;
    float m = neg_inf(), z = 0.f;
    for (int w = 0; w < kWarps; ++w) combine(m, z, red_m[w][q], red_z[w][q]);
    float* out = partial + (((long long)blockIdx.y * gridDim.x + blockIdx.x) * QMAX + q) * 2;
    out[0] = m;
    out[1] = z;
  }
}

// --------------------------------------------------------------- kernel 2: rank + select
// Sum over the threads after this one (thread order) of v; every thread must call it.
__device__ __forceinline__ unsigned int sum_after(unsigned int v, unsigned int* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  unsigned int x = v;  // becomes the sum over lanes >= lane of this warp
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const unsigned int y = __shfl_down_sync(kFull, x, o);
    if (lane + o < 32) x += y;
  }
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  unsigned int after = x - v;
  for (int w = warp + 1; w < kWarps; ++w) after += scratch[w];
  __syncthreads();
  return after;
}

struct Pick {
  unsigned int bin, above, count;
};

// The bin holding the need-th largest key: bins above it hold `above` < need keys, with it >= need.
__device__ __forceinline__ Pick find_bin(const unsigned int* hist, int nbins, unsigned int need, unsigned int* scratch,
                                         Pick* shared_pick) {
  const int per = nbins / kThreads;
  const int base = threadIdx.x * per;
  unsigned int mine = 0;
  for (int i = 0; i < per; ++i) mine += hist[base + i];
  unsigned int cum = sum_after(mine, scratch);
  for (int i = per - 1; i >= 0; --i) {
    const unsigned int h = hist[base + i];
    if (cum < need && cum + h >= need) *shared_pick = Pick{(unsigned int)(base + i), cum, h};
    cum += h;
  }
  __syncthreads();
  const Pick p = *shared_pick;
  __syncthreads();
  return p;
}

// Calls f(n, key) for every token n < N of a row's keys (key 0 outside [lo, hi)).
template <class F>
__device__ __forceinline__ void for_each_key(const unsigned int* keys, long long npad, long long N, long long lo,
                                             long long hi, F&& f) {
  constexpr int U = 4;
  const uint4* kv = reinterpret_cast<const uint4*>(keys);
  const long long nvec = npad / 4;
  for (long long base = threadIdx.x; base < nvec; base += (long long)kThreads * U) {
    uint4 v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const long long i = base + (long long)u * kThreads;
      v[u] = i < nvec ? __ldcg(kv + i) : make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const long long n0 = (base + (long long)u * kThreads) * 4;
      const unsigned int w[4] = {v[u].x, v[u].y, v[u].z, v[u].w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const long long n = n0 + j;
        if (n < N) f(n, (n >= lo && n < hi) ? w[j] : 0u);
      }
    }
  }
}

// Radix select of the k largest keys of one row by one CTA; resets the row's histogram.
__device__ void select_row(const unsigned int* keys, long long npad, long long N, long long lo, long long hi,
                           unsigned int* ghist, int k, long long* out_idx, float* out_val, unsigned int* hist) {
  __shared__ unsigned int scratch[kWarps];
  __shared__ Pick pick;
  __shared__ unsigned int taken, ties;
  for (int b = threadIdx.x; b < kTopBins; b += kThreads) {
    hist[b] = __ldcg(ghist + b);
    ghist[b] = 0u;
  }
  __syncthreads();
  if (threadIdx.x == 0) hist[0] += (unsigned int)(N - (hi - lo));  // non-candidates: key 0
  __syncthreads();
  unsigned int prefix = 0u, mask = 0u, need = (unsigned int)k;
  const int shifts[3] = {21, 10, 0};
  const int bits[3] = {11, 11, 10};
  for (int pass = 0; pass < 3; ++pass) {
    const int nbins = 1 << bits[pass], shift = shifts[pass];
    if (pass > 0) {
      for (int b = threadIdx.x; b < nbins; b += kThreads) hist[b] = 0u;
      __syncthreads();
      for_each_key(keys, npad, N, lo, hi, [&](long long, unsigned int key) {
        if ((key & mask) == prefix) atomicAdd(hist + ((key >> shift) & (unsigned int)(nbins - 1)), 1u);
      });
      __syncthreads();
    }
    const Pick p = find_bin(hist, nbins, need, scratch, &pick);
    need -= p.above;
    prefix |= p.bin << shift;
    mask |= (unsigned int)(nbins - 1) << shift;
    if (p.count == need) break;  // the whole bin is taken: no finer digit needed
  }
  if (threadIdx.x == 0) { taken = 0u; ties = 0u; }
  __syncthreads();
  for_each_key(keys, npad, N, lo, hi, [&](long long n, unsigned int key) {
    const unsigned int km = key & mask;
    bool take = km > prefix;
    if (km == prefix) take = atomicAdd(&ties, 1u) < need;
    if (take) {
      const unsigned int at = atomicAdd(&taken, 1u);
      out_idx[at] = n;
      out_val[at] = key_value(key);
    }
  });
}

template <int M, int QMAX, bool VEC>
__device__ void rank_impl(const unsigned char* codes, long long code_stride, const float* tables,
                          long long t_stride_r, long long t_stride_q, long long t_stride_m,
                          const long long* lo, const long long* hi, int split, int Q, int K, long long N,
                          long long chunk, float scale, int mode, const float* partial, unsigned int* keys,
                          long long npad, unsigned int* hist, unsigned int* counters, int k, long long* out_idx,
                          float* out_val) {
  extern __shared__ __align__(16) float lut[];
  __shared__ unsigned int s_hist[kTopBins];
  __shared__ float s_max[QMAX], s_inv[QMAX];
  __shared__ bool s_last;
  const int s = blockIdx.y;
  const Row row = make_row(codes, code_stride, tables, t_stride_r, t_stride_q, t_stride_m, lo, hi, split, N);
  for (int b = threadIdx.x; b < kTopBins; b += kThreads) s_hist[b] = 0u;
  if (mode != kRaw && threadIdx.x < 32 * Q) {  // warp q folds the chunk partials of query q
    const int q = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float m = neg_inf(), z = 0.f;
    for (int c = lane; c < gridDim.x; c += 32) {
      const float* p = partial + (((long long)s * gridDim.x + c) * QMAX + q) * 2;
      combine(m, z, p[0], p[1]);
    }
    for (int o = 16; o > 0; o >>= 1) {
      const float m2 = __shfl_xor_sync(kFull, m, o), z2 = __shfl_xor_sync(kFull, z, o);
      combine(m, z, m2, z2);
    }
    if (lane == 0) {  // an empty row (z == 0) gives every token probability 0, as the reference
      s_max[q] = z > 0.f ? m : 0.f;
      s_inv[q] = z > 0.f ? 1.f / z : 0.f;
    }
  }
  load_lut<QMAX>(lut, row, Q, M, K);  // ends with __syncthreads()
  unsigned int* row_keys = keys + (long long)s * npad;
  const long long begin = (long long)blockIdx.x * chunk;
  scan_chunk<M, QMAX, VEC>(row, lut, K, begin, begin + chunk, [&](long long n, const float (&sc)[QMAX]) {
    float value = sc[0];
    if (mode != kRaw) {
      value = 0.f;
#pragma unroll
      for (int q = 0; q < QMAX; ++q) {
        if (q < Q) {
          const float p = expf(scale * sc[q] - s_max[q]) * s_inv[q];
          value = mode == kSum ? value + p : fmaxf(value, p);
        }
      }
    }
    const unsigned int key = order_key(value);
    row_keys[n] = key;
    atomicAdd(s_hist + (key >> (32 - kTopBits)), 1u);
  });
  __syncthreads();
  unsigned int* row_hist = hist + (long long)s * kTopBins;
  for (int b = threadIdx.x; b < kTopBins; b += kThreads)
    if (s_hist[b]) atomicAdd(row_hist + b, s_hist[b]);
  __threadfence();  // keys and histogram visible device-wide before this CTA is counted
  __syncthreads();
  if (threadIdx.x == 0) s_last = atomicAdd(counters + s, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  select_row(row_keys, npad, N, row.lo, row.hi, row_hist, k, out_idx + (long long)s * k, out_val + (long long)s * k,
             s_hist);
  if (threadIdx.x == 0) counters[s] = 0u;
}

}  // namespace pqs

template <int M, int QMAX, bool VEC>
__global__ void __launch_bounds__(pqs::kThreads) pq_stats(
    const unsigned char* __restrict__ codes, long long code_stride, const float* __restrict__ tables,
    long long t_stride_r, long long t_stride_q, long long t_stride_m, const long long* __restrict__ lo,
    const long long* __restrict__ hi, int Q, int K, long long N, long long chunk, float scale,
    float* __restrict__ partial) {
  pqs::stats_impl<M, QMAX, VEC>(codes, code_stride, tables, t_stride_r, t_stride_q, t_stride_m, lo, hi, Q, K, N,
                                chunk, scale, partial);
}

template <int M, int QMAX, bool VEC>
__global__ void __launch_bounds__(pqs::kThreads) pq_rank(
    const unsigned char* __restrict__ codes, long long code_stride, const float* __restrict__ tables,
    long long t_stride_r, long long t_stride_q, long long t_stride_m, const long long* __restrict__ lo,
    const long long* __restrict__ hi, int split, int Q, int K, long long N, long long chunk, float scale, int mode,
    const float* __restrict__ partial, unsigned int* keys, long long npad, unsigned int* hist,
    unsigned int* counters, int k, long long* __restrict__ out_idx, float* __restrict__ out_val) {
  pqs::rank_impl<M, QMAX, VEC>(codes, code_stride, tables, t_stride_r, t_stride_q, t_stride_m, lo, hi, split, Q, K,
                               N, chunk, scale, mode, partial, keys, npad, hist, counters, k, out_idx, out_val);
}

// Instantiations nvcc builds for the compile check (NVRTC builds the ones asked for by name).
template __global__ void pq_stats<4, 4, true>(const unsigned char*, long long, const float*, long long, long long,
                                              long long, const long long*, const long long*, int, int, long long,
                                              long long, float, float*);
template __global__ void pq_rank<4, 4, true>(const unsigned char*, long long, const float*, long long, long long,
                                             long long, const long long*, const long long*, int, int, int, long long,
                                             long long, float, int, const float*, unsigned int*, long long,
                                             unsigned int*, unsigned int*, int, long long*, float*);
template __global__ void pq_rank<2, 1, false>(const unsigned char*, long long, const float*, long long, long long,
                                              long long, const long long*, const long long*, int, int, int, long long,
                                              long long, float, int, const float*, unsigned int*, long long,
                                              unsigned int*, unsigned int*, int, long long*, float*);
