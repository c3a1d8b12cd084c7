// Device side of the one-shot all-reduce over peer memory (PeerGroup in ops.hpp), shared by the
// plain all-reduce (all_reduce.cu) and the one fused with the norm reading it (norm.cu). Both
// launch kPeerBlocks blocks; block b of every rank owns the same part of the message and meets
// block b of the other ranks at a barrier of its own, so the call counters (per block, in device
// memory) stay equal across ranks whichever kernel a call uses.
#pragma once

#include <cuda/atomic>

#include "kernels/cuda/device.hpp"

namespace tpe::cuda::detail {

// A rank's region: flags [kPeerBlocks][kPeerMaxRanks], its call counters [kPeerBlocks], then at
// kPeerStagingOffset the two halves of staging.
inline constexpr size_t kPeerFlagsWords = size_t{kPeerBlocks} * kPeerMaxRanks;
inline constexpr size_t kPeerStagingOffset = 4096;
static_assert((kPeerFlagsWords + kPeerBlocks) * sizeof(uint32_t) <= kPeerStagingOffset);

// This block's call number: its calls so far, plus one.
__device__ __forceinline__ uint32_t peer_call(const PeerGroup& g) {
  return g.counters[blockIdx.x] + 1;
}

// Rank `rank`'s staging for this call: the halves alternate by the call's parity, so a rank
// rewrites a half only two calls later, after every rank has passed the call between (a rank
// that signalled that call had finished this one: its kernels run in stream order).
template <class T>
__device__ __forceinline__ T* peer_staging(const PeerGroup& g, int rank, uint32_t call) {
  return static_cast<T*>(g.staging[rank]) +
         (call & 1u) * (g.capacity / static_cast<int64_t>(sizeof(T)));
}

// After the block has copied its part of the message into its staging: tells every rank so (a
// release store of the call's number into that rank's flags[b][own rank]) and waits until every
// rank has told it the same (acquire loads of its own flags[b][*]; counts only grow, as a rank
// may already be a call ahead). A host that gives up waiting sets *abort.
__device__ __forceinline__ void peer_barrier(const PeerGroup& g, uint32_t call) {
  using Flag = ::cuda::atomic_ref<uint32_t, ::cuda::thread_scope_system>;
  __syncthreads();  // the block's copy, before the release stores that publish it
  if (threadIdx.x < static_cast<unsigned>(g.world)) {
    const auto s = static_cast<int>(threadIdx.x);
    const size_t slot = size_t{blockIdx.x} * kPeerMaxRanks;
    Flag(g.flags[s][slot + g.rank]).store(call, ::cuda::memory_order_release);
    Flag own(g.flags[g.rank][slot + s]);
    for (unsigned spins = 1;; ++spins) {
      if (static_cast<int32_t>(own.load(::cuda::memory_order_acquire) - call) >= 0) break;
      if (spins % 1024 == 0 && *g.abort != 0) break;
    }
  }
  __syncthreads();  // every rank's part is in place
}

// The block's call is over (every thread read the count before the barrier).
__device__ __forceinline__ void peer_done(const PeerGroup& g, uint32_t call) {
  if (threadIdx.x == 0) g.counters[blockIdx.x] = call;
}

}  // namespace tpe::cuda::detail
