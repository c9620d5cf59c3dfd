// Hopper (sm_90) fused forward + gradient in 2 passes over memory: read the logits once, write the gradient once.
//
// The 3-pass schedule (forward reads z; backward reads z again and writes dz) re-reads the logits because the
// gradient needs the row's log-sum-exp, known only after the whole row was seen. Here a row stays on chip between
// the two: a thread-block cluster of C CTAs splits the row, each CTA bulk-copies its slice into shared memory
// (cp.async.bulk, completing on mbarriers), reduces it to a partial (max, sum exp, sum exp * u), publishes the
// partial, and after a cluster barrier every CTA merges the C partials through distributed shared memory (in rank
// order: the same bits in every CTA), evaluates the token's epilogue (g_t), and writes the gradient of its slice from
// shared memory. Byte counts and the choice of C are in docs/cuda.md.
//
// Restrictions (the launcher falls back to 3 passes otherwise): token-level ratio (g_t must be known per token),
// rows 16-byte aligned with V * sizeof(T) a multiple of 16 (bulk-copy alignment), a row that fits C <= 8 slices of
// kSliceBudgetBytes. The entropy gets no gradient in this path (it would need a second term per element that the
// forward does not know the coefficient of); the Python side refuses a backward through the entropy.
#pragma once

#include <cooperative_groups.h>

#include "grpo_loss.cuh"

namespace grpo_kernels {
namespace sm90 {

constexpr int kThreads = 256;
constexpr int kStages = 4;      // a slice lands in 4 chunks, each on its own mbarrier: the reduction starts early
constexpr int kMaxCluster = 8;  // the portable cluster size
// Bytes of one CTA's slice: three CTAs per SM fit the 228 KiB of an H100/H200 SM (each CTA also takes 1 KiB of
// reserved shared memory, its mbarriers and partials): 3 * (76288 + 1024 + 256) = 232704 <= 233472.
constexpr int64_t kSliceBudgetBytes = 76288;

// One CTA's partial of a row, published to the cluster.
struct Partial {
  LseState st;
  float u_target;  // u_y, valid in the CTA whose slice holds y
};

// Dynamic shared memory: [slice | kStages mbarriers | Partial x 2 (by row parity)].
GK_HOST_DEVICE int64_t slice_bytes_padded(int64_t slice_elems, int64_t elem_bytes) {
  return (slice_elems * elem_bytes + 127) / 128 * 128;
}
GK_HOST_DEVICE int64_t shared_bytes(int64_t slice_elems, int64_t elem_bytes) {
  return slice_bytes_padded(slice_elems, elem_bytes) + kStages * 8 + 2 * sizeof(Partial);
}

#if defined(__CUDACC__)
namespace detail {

GK_DEVICE uint32_t smem_addr(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

GK_DEVICE void mbarrier_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}

GK_DEVICE void fence_mbarrier_init() { asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory"); }

// Generic-proxy accesses of shared memory before async-proxy (bulk copy) writes to it.
GK_DEVICE void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

GK_DEVICE void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
}

GK_DEVICE void mbarrier_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done = 0;
  while (!done) {
    asm volatile(
        "{\n\t.reg .pred p;\n\t"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n\t"
        "selp.u32 %0, 1, 0, p;\n\t}"
        : "=r"(done)
        : "r"(smem_addr(bar)), "r"(parity)
        : "memory");
  }
}

// Global -> this CTA's shared memory, `bytes` (multiple of 16, both addresses 16-byte aligned), completing on `bar`.
GK_DEVICE void bulk_load(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(smem_addr(dst)),
      "l"(src), "r"(bytes), "r"(smem_addr(bar))
      : "memory");
}

template <typename T>
GK_DEVICE void load_shared_vec(const T* p, float (&out)[Vec<T>::kSize]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const T* elems = reinterpret_cast<const T*>(&raw);
  GK_UNROLL
  for (int i = 0; i < Vec<T>::kSize; ++i) out[i] = to_float(elems[i]);
}

}  // namespace detail

// grid = (clusters * C), cluster = (C, 1, 1); cluster k walks rows k, k + clusters, ...
// `slice_elems` (a multiple of 16 bytes) is each CTA's share of a row; CTA r owns [r * slice_elems, ...).
template <typename T>
__global__ void __launch_bounds__(kThreads) grpo_loss_two_pass_kernel(RowsView<const T> logits,
                                                                      RowsView<T> grad,  // may alias the logits
                                                                      const int64_t* __restrict__ ids,  // [N]
                                                                      float inv_tau, GrpoOutputs outputs,
                                                                      float loss_scale, int64_t slice_elems) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  constexpr int K = Vec<T>::kSize;
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ LseState scratch[kThreads / 32 + 1];

  cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  const int cluster_size = static_cast<int>(cluster.num_blocks());
  T* slice = reinterpret_cast<T*>(smem);
  uint64_t* bars = reinterpret_cast<uint64_t*>(smem + slice_bytes_padded(slice_elems, sizeof(T)));
  Partial* partials = reinterpret_cast<Partial*>(bars + kStages);

  const int64_t vocab = logits.vocab;
  const int64_t begin = rank * slice_elems;
  const int64_t count = begin < vocab ? (vocab - begin < slice_elems ? vocab - begin : slice_elems) : 0;
  const int64_t count_vecs = count / K;                                 // count is a multiple of K
  const int64_t stage_vecs = (slice_elems / K + kStages - 1) / kStages;  // vectors per stage (last may be short)

  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) detail::mbarrier_init(&bars[s], 1);
    detail::fence_mbarrier_init();
  }
  __syncthreads();

  uint32_t parity = 0;
  int buffer = 0;
  for (int64_t n = blockIdx.x / cluster_size; n < logits.rows; n += gridDim.x / cluster_size) {
    const int64_t y = ids[n];  // the same in every CTA of the cluster: the branch below is cluster-uniform
    T* grad_row = grad.row(n) + begin;
    if (y < 0) {  // not taking part: never read, zero gradient
      float zeros[K] = {};
      for (int64_t i = threadIdx.x; i < count_vecs; i += kThreads) store_vec(grad_row + i * K, zeros);
      if (rank == 0 && threadIdx.x == 0) outputs.write(n, false, 0.f, 0.f, 0.f);
      continue;
    }
    const T* row = logits.row(n) + begin;

    // 1. bulk-copy the slice in kStages chunks
    if (threadIdx.x == 0) {
      detail::fence_proxy_async();  // the previous row's reads of `slice` come before these writes
      for (int s = 0; s < kStages; ++s) {
        const int64_t first = s * stage_vecs, last = (s + 1) * stage_vecs < count_vecs ? (s + 1) * stage_vecs : count_vecs;
        const uint32_t bytes = first < last ? static_cast<uint32_t>((last - first) * 16) : 0u;
        detail::mbarrier_arrive_expect_tx(&bars[s], bytes);
        if (bytes != 0) detail::bulk_load(slice + first * K, row + first * K, bytes, &bars[s]);
      }
    }

    // 2. reduce the slice, stage by stage as the chunks land
    LseState st = lse_empty();
    for (int s = 0; s < kStages; ++s) {
      detail::mbarrier_wait(&bars[s], parity);
      const int64_t last = (s + 1) * stage_vecs < count_vecs ? (s + 1) * stage_vecs : count_vecs;
      for (int64_t i = s * stage_vecs + threadIdx.x; i < last; i += kThreads) {
        float u[K];
        detail::load_shared_vec(slice + i * K, u);
        GK_UNROLL
        for (int j = 0; j < K; ++j) u[j] *= inv_tau;
        lse_push<K>(st, u);
      }
    }
    parity ^= 1u;
    st = block_merge<kThreads>(st, scratch);
    if (threadIdx.x == 0) {
      const bool owns_target = y >= begin && y < begin + count;
      partials[buffer] = {st, owns_target ? to_float(slice[y - begin]) * inv_tau : 0.f};
    }

    // 3. publish the partials; every CTA merges all of them in rank order
    cluster.sync();
    LseState total = lse_empty();
    for (int r = 0; r < cluster_size; ++r) total = lse_merge(total, cluster.map_shared_rank(&partials[buffer], r)->st);
    const int owner = static_cast<int>(y / slice_elems);
    const float u_target = cluster.map_shared_rank(&partials[buffer], owner)->u_target;
    const float lse = lse_value(total), entropy = lse_entropy(total);
    const float g = outputs.epilogue(n, true, u_target - lse, lse, entropy, rank == 0 && threadIdx.x == 0);

    // 4. gradient of the slice, from shared memory (the only global traffic left: the write)
    // no entropy term (b = 0), so H is not needed either: 0 keeps a non-finite H from reaching 0 * H
    const RowGrad grad_at{{lse, 0.f, g * loss_scale * inv_tau, 0.f}, y - begin, inv_tau, true};
    for (int64_t i = threadIdx.x; i < count_vecs; i += kThreads) {
      float z[K];
      detail::load_shared_vec(slice + i * K, z);
      GK_UNROLL
      for (int j = 0; j < K; ++j) z[j] = grad_at(z[j], i * K + j);
      store_vec(grad_row + i * K, z);
    }
    buffer ^= 1;   // peers may still read this row's partial until they pass the next cluster barrier
    __syncthreads();  // every thread is done with `slice` before thread 0 issues the next row's copies
  }
  cluster.sync();  // no CTA exits while a peer may still read its partials
#endif
}
#endif  // __CUDACC__

}  // namespace sm90
}  // namespace grpo_kernels
