// Multi-segment attention over a paged KV cache: split-K partial states merged by log-sum-exp.
//
// Layout (element strides are passed explicitly; the last dim of q, K and V is contiguous):
//   q:       [Tq, Hq, D]
//   K, V:    [num_slots, block_size, Hkv, D]   (per-layer views of the store's pool, strided)
//   out:     [Tq, Hq, D] in the input dtype;  lse: [Tq, Hq] float32, natural log.
//
// Work items are the keys one CTA walks through. Two addressing modes:
//   kBlocks (0): item p is token p % block_size of list block b = p / block_size, which lives in
//                slot slots[b] and holds block_start[b + 1] - block_start[b] tokens. Positions
//                past a block's token count are holes and are skipped, so segments ending in
//                partial blocks concatenate without a copy. The token's causal position is its
//                compact index block_start[b] + p % block_size. With slots == block_start ==
//                nullptr the keys are one contiguous run: block b is slot b, always full.
//                A CTA stages its chunk's (slot, start, count) triples in shared memory first,
//                so each key costs one dependent global load (its K/V row), not three.
//   kTokens (1): per KV head h, item p is token position positions[h][p] of the sequence; its
//                block table entry block_table[pos / block_size] names the slot. The causal
//                position is pos itself. (PQ selection: every KV head picks its own tokens.)
// Out-of-range slots or positions are skipped, never read.
//
// Causality (bottom-right aligned, as FlashAttention): query i (of Tq) sees a key at causal
// position t iff t < causal_start or t <= causal_end - Tq + i. causal_start = INT_MAX turns the
// mask off.
//
// Grid of msa_partial: (chunks, Hkv, row tiles). A row is one (query token, query head of the
// KV head's GQA group) pair, so every key a CTA loads serves all ROWS query rows of its group:
// K/V are read once per KV head (per row tile; decode has one tile whenever Tq * Hq / Hkv <= 8).
// Inside a CTA, LANES threads share a key row (each holds VEC channels of it) and the CTA walks
// GROUPS keys at a time, TILE keys per group per step, with an online softmax in fp32 (base 2,
// the scale folded into q). The groups' states are merged in shared memory; a CTA writes
// either the final output (single chunk) or a partial state that msa_merge combines.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace msa {

constexpr int kThreads = 256;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kBlocks = 0;
constexpr int kTokens = 1;

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// Element type: how many fit in 16 bytes and how they convert to and from float.
template <typename T>
struct Elem;

template <>
struct Elem<float> {
  static constexpr int kPer16B = 4;
  __device__ __forceinline__ static void unpack(const uint4& raw, float* f) {
    f[0] = __uint_as_float(raw.x);
    f[1] = __uint_as_float(raw.y);
    f[2] = __uint_as_float(raw.z);
    f[3] = __uint_as_float(raw.w);
  }
  __device__ __forceinline__ static float to_float(float x) { return x; }
  __device__ __forceinline__ static float from_float(float x) { return x; }
};

template <>
struct Elem<__half> {
  static constexpr int kPer16B = 8;
  __device__ __forceinline__ static void unpack(const uint4& raw, float* f) {
    const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 t = __half22float2(h[i]);
      f[2 * i] = t.x;
      f[2 * i + 1] = t.y;
    }
  }
  __device__ __forceinline__ static float to_float(__half x) { return __half2float(x); }
  __device__ __forceinline__ static __half from_float(float x) { return __float2half_rn(x); }
};

template <>
struct Elem<__nv_bfloat16> {
  static constexpr int kPer16B = 8;
  __device__ __forceinline__ static void unpack(const uint4& raw, float* f) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 t = __bfloat1622float2(h[i]);
      f[2 * i] = t.x;
      f[2 * i + 1] = t.y;
    }
  }
  __device__ __forceinline__ static float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ __forceinline__ static __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};

// How a CTA of kThreads threads covers one key row of D channels.
template <typename T, int D>
struct Split {
  static constexpr int kVec = (D / 32 > Elem<T>::kPer16B) ? D / 32 : Elem<T>::kPer16B;  // channels per thread
  static constexpr int kLanes = D / kVec;                                               // threads per key row
  static constexpr int kLoads = kVec / Elem<T>::kPer16B;                                // 16-byte loads per row
  static constexpr int kGroups = kThreads / kLanes;                                     // keys in flight per step
  static_assert(kLanes <= 32 && 32 % kLanes == 0, "a key row must stay inside one warp");
  static_assert(kVec % Elem<T>::kPer16B == 0, "whole 16-byte loads");
};

// Keys per group per step: more when fewer rows keep registers free (loads in flight).
template <int ROWS>
struct Tile {
  static constexpr int kKeys = ROWS >= 8 ? 2 : (ROWS >= 4 ? 4 : 8);
};

// Where work item `item` of KV head `head` lives; valid == false for holes and bad indices.
struct KeyRef {
  long long k_off;
  long long v_off;
  int pos;
  bool valid;
};

// staged: kBlocks' shared (slot, start, count) triples of the CTA's blocks from first_block on,
// or nullptr for one contiguous run.
template <int MODE>
__device__ __forceinline__ KeyRef locate(int item, int num_items, int head, const int* staged, int first_block,
                                         const int* __restrict__ block_table, const int* __restrict__ positions,
                                         long long pos_head_stride, int num_blocks, int num_slots, int block_size,
                                         long long k_slot_stride, long long k_tok_stride, long long k_head_stride,
                                         long long v_slot_stride, long long v_tok_stride, long long v_head_stride) {
  KeyRef ref{0, 0, 0, false};
  if (item >= num_items) return ref;
  int slot, offset;
  if (MODE == kBlocks) {
    const int block = item / block_size;
    offset = item - block * block_size;
    if (staged) {
      const int* entry = staged + 3 * (block - first_block);
      if (offset >= entry[2]) return ref;
      slot = entry[0];
      ref.pos = entry[1] + offset;
    } else {
      slot = block;
      ref.pos = item;
    }
  } else {
    const int pos = positions[head * pos_head_stride + item];
    if (pos < 0 || pos >= num_blocks * block_size) return ref;
    const int block = pos / block_size;
    offset = pos - block * block_size;
    slot = block_table[block];
    ref.pos = pos;
  }
  if (slot < 0 || slot >= num_slots) return ref;
  ref.k_off = slot * k_slot_stride + offset * k_tok_stride + head * k_head_stride;
  ref.v_off = slot * v_slot_stride + offset * v_tok_stride + head * v_head_stride;
  ref.valid = true;
  return ref;
}

}  // namespace msa

// One CTA: KV head blockIdx.y, query rows [blockIdx.z * ROWS, +ROWS), work items
// [blockIdx.x * chunk_items, +chunk_items). Writes out/lse when write_final, else the partial
// state (normalised output and its LSE) at part index part_base + blockIdx.x of
// part_out: [parts, Tq, Hq, D] and part_lse: [parts, Tq, Hq] (float32, contiguous).
// `slots` is the list blocks' slots in kBlocks mode and the block table in kTokens mode.
// Dynamic shared memory (kBlocks with a block list): 3 ints per block a chunk touches, i.e.
// 12 * (chunk_items / block_size + 2) bytes.
template <typename T, int D, int ROWS, int MODE>
__global__ void __launch_bounds__(msa::kThreads)
    msa_partial(const T* __restrict__ q, long long q_tok_stride, long long q_head_stride,
                const T* __restrict__ k_cache, long long k_slot_stride, long long k_tok_stride, long long k_head_stride,
                const T* __restrict__ v_cache, long long v_slot_stride, long long v_tok_stride, long long v_head_stride,
                int num_slots, int block_size, const int* __restrict__ slots, const int* __restrict__ block_start,
                const int* __restrict__ positions, long long pos_head_stride, int num_blocks, int num_items,
                int chunk_items, int num_q_tokens, int num_q_heads, int group_size, int causal_start,
                int causal_end, float scale, T* __restrict__ out, long long out_tok_stride,
                long long out_head_stride, float* __restrict__ lse, float* __restrict__ part_out,
                float* __restrict__ part_lse, int part_base, int write_final) {
  using E = msa::Elem<T>;
  using S = msa::Split<T, D>;
  constexpr int VEC = S::kVec;
  constexpr int LANES = S::kLanes;
  constexpr int GROUPS = S::kGroups;
  constexpr int KEYS = msa::Tile<ROWS>::kKeys;

  const int lane = threadIdx.x % LANES;
  const int group = threadIdx.x / LANES;
  const int head = blockIdx.y;
  const int row0 = blockIdx.z * ROWS;
  const int num_rows = num_q_tokens * group_size;
  const int item_begin = blockIdx.x * chunk_items;
  const int item_end = min(num_items, item_begin + chunk_items);
  const float q_scale = scale * msa::kLog2e;

  // This thread's VEC channels of every row's query, pre-scaled so exp2 yields softmax weights,
  // and each row's causal limit (the last causal position its query sees).
  float qf[ROWS][VEC];
  int limit[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const int row = row0 + r;
    limit[r] = -1;
#pragma unroll
    for (int e = 0; e < VEC; ++e) qf[r][e] = 0.f;
    if (row < num_rows) {
      const int i = row / group_size;
      const int qh = head * group_size + row % group_size;
      limit[r] = causal_end - num_q_tokens + i;
      const T* src = q + i * q_tok_stride + qh * q_head_stride + lane * VEC;
#pragma unroll
      for (int j = 0; j < S::kLoads; ++j) {
        E::unpack(*reinterpret_cast<const uint4*>(src + j * E::kPer16B), &qf[r][j * E::kPer16B]);
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) qf[r][e] *= q_scale;
    }
  }

  // kBlocks: stage the (slot, start, count) of every block this chunk touches.
  extern __shared__ int s_staged[];
  const int first_block = item_begin / block_size;
  const int* staged = nullptr;
  if (MODE == msa::kBlocks && slots != nullptr) {
    const int chunk_blocks = (item_end - 1) / block_size - first_block + 1;
    for (int b = threadIdx.x; b < chunk_blocks; b += msa::kThreads) {
      const int start = block_start[first_block + b];
      s_staged[3 * b] = slots[first_block + b];
      s_staged[3 * b + 1] = start;
      s_staged[3 * b + 2] = block_start[first_block + b + 1] - start;
    }
    __syncthreads();
    staged = s_staged;
  }

  float m[ROWS];
  float l[ROWS];
  float acc[ROWS][VEC];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    m[r] = msa::neg_inf();
    l[r] = 0.f;
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[r][e] = 0.f;
  }

  // The loop bounds are uniform across the CTA, so every lane reaches the shuffles.
  for (int base = item_begin; base < item_end; base += GROUPS * KEYS) {
    uint4 kraw[KEYS][S::kLoads];
    uint4 vraw[KEYS][S::kLoads];
    int pos[KEYS];
    bool valid[KEYS];
#pragma unroll
    for (int u = 0; u < KEYS; ++u) {
      const int item = base + u * GROUPS + group;
      const msa::KeyRef ref = msa::locate<MODE>(
          item < item_end ? item : num_items, num_items, head, staged, first_block, slots, positions,
          pos_head_stride, num_blocks, num_slots, block_size, k_slot_stride, k_tok_stride, k_head_stride,
          v_slot_stride, v_tok_stride, v_head_stride);
      pos[u] = ref.pos;
      valid[u] = ref.valid;
#pragma unroll
      for (int j = 0; j < S::kLoads; ++j) {
        kraw[u][j] = make_uint4(0, 0, 0, 0);
        vraw[u][j] = make_uint4(0, 0, 0, 0);
      }
      if (ref.valid) {
        const T* ksrc = k_cache + ref.k_off + lane * VEC;
        const T* vsrc = v_cache + ref.v_off + lane * VEC;
#pragma unroll
        for (int j = 0; j < S::kLoads; ++j) {
          kraw[u][j] = *reinterpret_cast<const uint4*>(ksrc + j * E::kPer16B);
          vraw[u][j] = *reinterpret_cast<const uint4*>(vsrc + j * E::kPer16B);
        }
      }
    }

    // Scores (log2 units): partial dot products over this lane's channels, summed across LANES.
    float s[KEYS][ROWS];
#pragma unroll
    for (int u = 0; u < KEYS; ++u) {
      float kf[VEC];
#pragma unroll
      for (int j = 0; j < S::kLoads; ++j) E::unpack(kraw[u][j], &kf[j * E::kPer16B]);
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        float dot = 0.f;
#pragma unroll
        for (int e = 0; e < VEC; ++e) dot = fmaf(qf[r][e], kf[e], dot);
        s[u][r] = dot;
      }
    }
#pragma unroll
    for (int u = 0; u < KEYS; ++u) {
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
#pragma unroll
        for (int offset = LANES / 2; offset > 0; offset /= 2) {
          s[u][r] += __shfl_xor_sync(0xffffffffu, s[u][r], offset);
        }
        const bool masked = pos[u] >= causal_start && pos[u] > limit[r];
        if (!valid[u] || masked) s[u][r] = msa::neg_inf();
      }
    }

    // Online softmax: rescale the running state once per step, then turn scores into weights.
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      float step_max = m[r];
#pragma unroll
      for (int u = 0; u < KEYS; ++u) step_max = fmaxf(step_max, s[u][r]);
      if (step_max == msa::neg_inf()) {
#pragma unroll
        for (int u = 0; u < KEYS; ++u) s[u][r] = 0.f;
        continue;
      }
      const float alpha = exp2f(m[r] - step_max);
      l[r] *= alpha;
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[r][e] *= alpha;
#pragma unroll
      for (int u = 0; u < KEYS; ++u) {
        s[u][r] = exp2f(s[u][r] - step_max);
        l[r] += s[u][r];
      }
      m[r] = step_max;
    }
#pragma unroll
    for (int u = 0; u < KEYS; ++u) {
      float vf[VEC];
#pragma unroll
      for (int j = 0; j < S::kLoads; ++j) E::unpack(vraw[u][j], &vf[j * E::kPer16B]);
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[r][e] = fmaf(s[u][r], vf[e], acc[r][e]);
      }
    }
  }

  // Merge the GROUPS states of each row in shared memory, one row at a time.
  __shared__ float s_m[GROUPS][ROWS];
  __shared__ float s_l[GROUPS][ROWS];
  __shared__ float s_acc[GROUPS][D];
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      s_m[group][r] = m[r];
      s_l[group][r] = l[r];
    }
  }
  __syncthreads();
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const int row = row0 + r;
    if (row >= num_rows) break;  // uniform across the CTA
    float row_max = msa::neg_inf();
#pragma unroll
    for (int g = 0; g < GROUPS; ++g) row_max = fmaxf(row_max, s_m[g][r]);
    const bool empty = row_max == msa::neg_inf();
    const float w = empty ? 0.f : exp2f(m[r] - row_max);
#pragma unroll
    for (int e = 0; e < VEC; ++e) s_acc[group][lane * VEC + e] = acc[r][e] * w;
    __syncthreads();
    const int d = threadIdx.x;
    if (d < D) {
      float total = 0.f;
      float sum = 0.f;
      if (!empty) {
#pragma unroll
        for (int g = 0; g < GROUPS; ++g) {
          total += s_l[g][r] * exp2f(s_m[g][r] - row_max);
          sum += s_acc[g][d];
        }
      }
      const float o = total > 0.f ? sum / total : 0.f;
      const float row_lse = total > 0.f ? (row_max + log2f(total)) * msa::kLn2 : msa::neg_inf();
      const int i = row / group_size;
      const int qh = head * group_size + row % group_size;
      if (write_final) {
        out[i * out_tok_stride + qh * out_head_stride + d] = E::from_float(o);
        if (d == 0) lse[i * num_q_heads + qh] = row_lse;
      } else {
        const long long idx = ((long long)(part_base + blockIdx.x) * num_q_tokens + i) * num_q_heads + qh;
        part_out[idx * D + d] = o;
        if (d == 0) part_lse[idx] = row_lse;
      }
    }
    __syncthreads();  // s_acc is reused by the next row
  }
}

// Merge S partial states per (query token, query head): CTA blockIdx.x = i * Hq + h.
//   parts: [S, Tq, Hq, D] (any strides, D contiguous), part_lse: [S, Tq, Hq] (any strides),
//   out:   [Tq, Hq, D] (strided, D contiguous), lse: [Tq, Hq] contiguous float32.
// A part whose LSE is -inf contributes nothing (its output is never read); when every part is
// -inf the row's output is 0 and its LSE -inf.
template <typename TIn, typename TOut>
__global__ void msa_merge(const TIn* __restrict__ parts, long long p_part_stride, long long p_tok_stride,
                          long long p_head_stride, const float* __restrict__ part_lse, long long l_part_stride,
                          long long l_tok_stride, long long l_head_stride, int num_parts, int num_q_heads,
                          int head_dim, TOut* __restrict__ out, long long o_tok_stride, long long o_head_stride,
                          float* __restrict__ lse) {
  const int i = blockIdx.x / num_q_heads;
  const int h = blockIdx.x % num_q_heads;
  const float* row_lse = part_lse + i * l_tok_stride + h * l_head_stride;
  const TIn* row_parts = parts + i * p_tok_stride + h * p_head_stride;
  TOut* row_out = out + i * o_tok_stride + h * o_head_stride;

  float row_max = msa::neg_inf();
  for (int c = 0; c < num_parts; ++c) row_max = fmaxf(row_max, row_lse[c * l_part_stride]);
  const bool empty = row_max == msa::neg_inf();
  float total = 0.f;
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float sum = 0.f;
    total = 0.f;
    if (!empty) {
      for (int c = 0; c < num_parts; ++c) {
        const float part = row_lse[c * l_part_stride];
        if (part == msa::neg_inf()) continue;
        const float w = expf(part - row_max);
        total += w;
        sum = fmaf(w, msa::Elem<TIn>::to_float(row_parts[c * p_part_stride + d]), sum);
      }
    }
    row_out[d] = msa::Elem<TOut>::from_float(empty ? 0.f : sum / total);
  }
  if (threadIdx.x == 0) lse[i * num_q_heads + h] = empty ? msa::neg_inf() : row_max + logf(total);
}

// Under NVRTC (kvstore/attn/cuda.py) only the instantiations a call names are compiled; an
// offline nvcc build (CI: nvcc -std=c++17 -arch=sm_90 -cubin) compiles and checks all of them.
#ifndef __CUDACC_RTC__
#define MSA_PARTIAL(T, D, ROWS)                                                                              \
  template __global__ void msa_partial<T, D, ROWS, msa::kBlocks>(                                           \
      const T*, long long, long long, const T*, long long, long long, long long, const T*, long long,        \
      long long, long long, int, int, const int*, const int*, const int*, long long, int, int, int, int, int, \
      int, int, int, float, T*, long long, long long, float*, float*, float*, int, int);                     \
  template __global__ void msa_partial<T, D, ROWS, msa::kTokens>(                                           \
      const T*, long long, long long, const T*, long long, long long, long long, const T*, long long,        \
      long long, long long, int, int, const int*, const int*, const int*, long long, int, int, int, int, int, \
      int, int, int, float, T*, long long, long long, float*, float*, float*, int, int);
#define MSA_PARTIAL_ROWS(T, D) MSA_PARTIAL(T, D, 1) MSA_PARTIAL(T, D, 2) MSA_PARTIAL(T, D, 4) MSA_PARTIAL(T, D, 8)
#define MSA_PARTIAL_DIMS(T) MSA_PARTIAL_ROWS(T, 64) MSA_PARTIAL_ROWS(T, 128) MSA_PARTIAL_ROWS(T, 256)
MSA_PARTIAL_DIMS(float)
MSA_PARTIAL_DIMS(__half)
MSA_PARTIAL_DIMS(__nv_bfloat16)
#define MSA_MERGE(TIn, TOut)                                                                                  \
  template __global__ void msa_merge<TIn, TOut>(const TIn*, long long, long long, long long, const float*, \
                                                long long, long long, long long, int, int, int, TOut*,      \
                                                long long, long long, float*);
MSA_MERGE(float, float)
MSA_MERGE(float, __half)
MSA_MERGE(float, __nv_bfloat16)
MSA_MERGE(__half, __half)
MSA_MERGE(__nv_bfloat16, __nv_bfloat16)
#endif
