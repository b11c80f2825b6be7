// Gather scattered rows (one token of one KV head: head_dim values) from a pool, in one launch.
//
//   dst[i] = mask[i] ? src[index[i]] : 0   for i < n,  each row `row_vecs` 16-byte vectors.
//
// The sparse read of a decode step: `src` is a layer's rows in the pinned host pool, read in
// place through unified virtual addressing (a pinned host pointer is valid in kernels), so
// only the selected rows cross PCIe and the host never learns which rows they were (no
// device-to-host copy of indices, no sync). `index` and `mask` are device arrays the
// selection produced on the device.
//
// Grid-stride over (row, vector) pairs; each thread keeps U loads in flight before it stores,
// so that enough bytes are outstanding to cover PCIe latency.

namespace gr {
constexpr int kThreads = 256;
constexpr int U = 4;
}  // namespace gr

extern "C" __global__ void __launch_bounds__(gr::kThreads) gather_rows(
    const uint4* __restrict__ src, uint4* __restrict__ dst, const long long* __restrict__ index,
    const unsigned char* __restrict__ mask, long long n, int row_vecs) {
  const long long total = n * row_vecs;
  const long long step = (long long)gridDim.x * gr::kThreads * gr::U;
  for (long long i = (long long)blockIdx.x * gr::kThreads * gr::U + threadIdx.x; i < total; i += step) {
    uint4 v[gr::U];
#pragma unroll
    for (int u = 0; u < gr::U; ++u) {
      const long long j = i + (long long)u * gr::kThreads;
      v[u] = make_uint4(0u, 0u, 0u, 0u);
      if (j < total) {
        const long long row = j / row_vecs;
        if (mask[row]) v[u] = src[index[row] * row_vecs + j % row_vecs];
      }
    }
#pragma unroll
    for (int u = 0; u < gr::U; ++u) {
      const long long j = i + (long long)u * gr::kThreads;
      if (j < total) dst[j] = v[u];
    }
  }
}
