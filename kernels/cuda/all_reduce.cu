// The one-shot all-reduce over peer memory (PeerGroup in ops.hpp; the barrier and the staging
// halves in peer.cuh). Block b copies its slice of x into its rank's staging, meets block b of
// every rank, then sums that slice of every rank's staging in rank order, in fp32, into x: the
// same bits on every rank.
#include "kernels/cuda/peer.cuh"

namespace tpe::cuda {
namespace {

constexpr int kPeerThreads = 512;

template <class T, int kV>
__global__ void __launch_bounds__(kPeerThreads)
    peer_all_reduce_kernel(T* x, int64_t count, PeerGroup g) {
  using P = detail::Pack<T, kV>;
  const int b = static_cast<int>(blockIdx.x);
  const uint32_t call = detail::peer_call(g);
  // Whole packs split evenly over the blocks; the last block also takes the elements past them.
  const int64_t packs = count / kV;
  const int64_t per_block = (packs + kPeerBlocks - 1) / kPeerBlocks;
  const int64_t p0 = min(packs, b * per_block), p1 = min(packs, p0 + per_block);
  const int64_t e0 = b == kPeerBlocks - 1 ? packs * kV : count;
  T* mine = detail::peer_staging<T>(g, g.rank, call);
  for (int64_t i = p0 + threadIdx.x; i < p1; i += blockDim.x) {
    reinterpret_cast<P*>(mine)[i] = reinterpret_cast<const P*>(x)[i];
  }
  for (int64_t i = e0 + threadIdx.x; i < count; i += blockDim.x) mine[i] = x[i];
  detail::peer_barrier(g, call);
  for (int64_t i = p0 + threadIdx.x; i < p1; i += blockDim.x) {
    float acc[kV] = {};
    for (int s = 0; s < g.world; ++s) {
      const P v = reinterpret_cast<const P*>(detail::peer_staging<T>(g, s, call))[i];
#pragma unroll
      for (int j = 0; j < kV; ++j) acc[j] += detail::to_float(v.v[j]);
    }
    P out;
#pragma unroll
    for (int j = 0; j < kV; ++j) out.v[j] = detail::from_float<T>(acc[j]);
    reinterpret_cast<P*>(x)[i] = out;
  }
  for (int64_t i = e0 + threadIdx.x; i < count; i += blockDim.x) {
    float acc = 0.0f;
    for (int s = 0; s < g.world; ++s)
      acc += detail::to_float(detail::peer_staging<T>(g, s, call)[i]);
    x[i] = detail::from_float<T>(acc);
  }
  detail::peer_done(g, call);
}

}  // namespace

size_t peer_region_bytes(int64_t capacity) {
  return detail::kPeerStagingOffset + 2 * static_cast<size_t>(capacity);
}

PeerGroup peer_group(void* const* regions, int world, int rank, int64_t capacity,
                     const volatile int* abort) {
  TPE_CUDA_REQUIRE(world >= 2 && world <= kPeerMaxRanks && rank >= 0 && rank < world, "peer_group",
                   "2 to 8 ranks, and a rank among them");
  TPE_CUDA_REQUIRE(capacity > 0 && capacity % 256 == 0, "peer_group",
                   "the staging capacity must be a positive multiple of 256 bytes");
  PeerGroup g{};
  for (int s = 0; s < world; ++s) {
    g.flags[s] = static_cast<uint32_t*>(regions[s]);
    g.staging[s] = static_cast<char*>(regions[s]) + detail::kPeerStagingOffset;
  }
  g.counters = static_cast<uint32_t*>(regions[rank]) + detail::kPeerFlagsWords;
  g.abort = abort;
  g.capacity = capacity;
  g.world = world;
  g.rank = rank;
  return g;
}

void peer_all_reduce(void* x, int64_t count, DType dtype, const PeerGroup& group,
                     cudaStream_t stream) {
  TPE_CUDA_REQUIRE(count >= 0 && count * static_cast<int64_t>(dtype_size(dtype)) <= group.capacity,
                   "peer_all_reduce", "the message is larger than the staging capacity");
  if (count == 0) return;
  detail::dispatch(dtype, "peer_all_reduce", [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int kW = detail::kVecWidth<T>;
    auto launch = [&](auto kernel) {
      kernel<<<kPeerBlocks, kPeerThreads, 0, stream>>>(static_cast<T*>(x), count, group);
      TPE_CUDA_CHECK_LAUNCH();
    };
    if (detail::aligned_to(x, 16)) {
      launch(peer_all_reduce_kernel<T, kW>);
    } else {
      launch(peer_all_reduce_kernel<T, 1>);
    }
  });
}

}  // namespace tpe::cuda
