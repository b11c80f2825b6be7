// Gather a scattered list of KV blocks between two pools in one launch.
//
//   dst[dst_slot[i]] = src[src_slot[i]]  for i < n,  each block `block_vecs` 16-byte vectors.
//
// Either pool may be pinned host memory: under unified virtual addressing a pinned host
// allocation's pointer is valid in kernels, so the copy from the host tier reads PCIe
// directly (zero-copy) and needs no staging buffer, one DMA per block, or index_copy_ pass.
// `slots` is [2, n] int64 on the device: source slots, then destination slots.
//
// Grid: (x: CTAs per block, y: blocks, grid-stride beyond gridDim.y). Each thread keeps U
// independent 16-byte loads in flight before storing, so that enough bytes are outstanding to
// cover PCIe latency (a CTA holds kThreads * U * 16 = 32 KiB in flight).

namespace bg {
constexpr int kThreads = 256;
constexpr int U = 8;
}  // namespace bg

extern "C" __global__ void __launch_bounds__(bg::kThreads) gather_blocks(
    const uint4* __restrict__ src, uint4* __restrict__ dst, const long long* __restrict__ slots, int n,
    long long block_vecs, long long src_stride_vecs, long long dst_stride_vecs) {
  const long long step = (long long)gridDim.x * bg::kThreads * bg::U;
  for (long long b = blockIdx.y; b < n; b += gridDim.y) {
    const uint4* s = src + slots[b] * src_stride_vecs;
    uint4* d = dst + slots[n + b] * dst_stride_vecs;
    for (long long i = (long long)blockIdx.x * bg::kThreads * bg::U + threadIdx.x; i < block_vecs; i += step) {
      uint4 v[bg::U];
#pragma unroll
      for (int u = 0; u < bg::U; ++u) {
        const long long j = i + (long long)u * bg::kThreads;
        if (j < block_vecs) v[u] = s[j];
      }
#pragma unroll
      for (int u = 0; u < bg::U; ++u) {
        const long long j = i + (long long)u * bg::kThreads;
        if (j < block_vecs) d[j] = v[u];
      }
    }
  }
}
