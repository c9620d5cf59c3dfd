// Device-side building blocks shared by the kernels: 16-byte vector loads/stores with float32 conversion, the
// split of a row into an unaligned head, a 16-byte-aligned body and a tail, and team (warp/block) reductions of the
// online log-sum-exp state.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "row_math.cuh"

namespace grpo_kernels {

// ---------------------------------------------------------------------------------------------------------------
// dtype <-> float32
// ---------------------------------------------------------------------------------------------------------------
GK_DEVICE float to_float(float x) { return x; }
GK_DEVICE float to_float(__half x) { return __half2float(x); }
GK_DEVICE float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
GK_DEVICE T from_float(float x);
template <>
GK_DEVICE float from_float<float>(float x) { return x; }
template <>
GK_DEVICE __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
GK_DEVICE __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// One 16-byte access: 8 bf16/fp16 or 4 fp32 elements.
template <typename T>
struct Vec {
  static constexpr int kSize = 16 / sizeof(T);
};

// Logits are streamed once per pass (5 GB at N=16384, V=151936: nothing to keep in a 50 MB L2), so loads and
// stores carry the evict-first hint (ld.global.cs / st.global.cs).
template <typename T>
GK_DEVICE void load_vec(const T* p, float (&out)[Vec<T>::kSize]) {
  const uint4 raw = __ldcs(reinterpret_cast<const uint4*>(p));
  const T* elems = reinterpret_cast<const T*>(&raw);
  GK_UNROLL
  for (int i = 0; i < Vec<T>::kSize; ++i) out[i] = to_float(elems[i]);
}

template <typename T>
GK_DEVICE void store_vec(T* p, const float (&in)[Vec<T>::kSize]) {
  uint4 raw;
  T* elems = reinterpret_cast<T*>(&raw);
  GK_UNROLL
  for (int i = 0; i < Vec<T>::kSize; ++i) elems[i] = from_float<T>(in[i]);
  __stcs(reinterpret_cast<uint4*>(p), raw);
}

// ---------------------------------------------------------------------------------------------------------------
// Row split: [0, head) scalar, [head, head + vecs * K) 16-byte vectors, the rest scalar.
// Rows start anywhere (B and T strides are free), so the head peels elements up to the first 16-byte boundary.
// ---------------------------------------------------------------------------------------------------------------
struct RowSplit {
  int64_t head;  // elements before the first aligned vector (< K)
  int64_t vecs;  // aligned 16-byte vectors
  int64_t tail;  // first element after the vectors
};

template <typename T>
GK_DEVICE RowSplit split_row(const void* row, int64_t vocab) {
  constexpr int K = Vec<T>::kSize;
  const int64_t misaligned = static_cast<int64_t>(reinterpret_cast<uintptr_t>(row) % 16) / sizeof(T);
  const int64_t head = misaligned == 0 ? 0 : (K - misaligned < vocab ? K - misaligned : vocab);
  const int64_t vecs = (vocab - head) / K;
  return {head, vecs, head + vecs * K};
}

// ---------------------------------------------------------------------------------------------------------------
// Team reductions. Merges are commutative bit for bit (max, and a + b), so the xor butterfly leaves the same
// state in every lane, and a fixed team size gives the same bits on every run.
// ---------------------------------------------------------------------------------------------------------------
GK_DEVICE LseState warp_merge(LseState st) {
  GK_UNROLL
  for (int offset = 16; offset > 0; offset >>= 1) {
    LseState other;
    other.m = __shfl_xor_sync(0xffffffffu, st.m, offset);
    other.s = __shfl_xor_sync(0xffffffffu, st.s, offset);
    other.t = __shfl_xor_sync(0xffffffffu, st.t, offset);
    st = lse_merge(st, other);
  }
  return st;
}

// Block-wide merge; every thread gets the result. `scratch` holds kThreads / 32 + 1 states; the trailing
// __syncthreads makes it reusable by the next call.
template <int kThreads>
GK_DEVICE LseState block_merge(LseState st, LseState* scratch) {
  constexpr int kWarps = kThreads / 32;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  st = warp_merge(st);
  if (lane == 0) scratch[warp] = st;
  __syncthreads();
  if (warp == 0) {
    LseState part = lane < kWarps ? scratch[lane] : lse_empty();
    part = warp_merge(part);
    if (lane == 0) scratch[kWarps] = part;
  }
  __syncthreads();
  const LseState total = scratch[kWarps];
  __syncthreads();
  return total;
}

template <int kTeam>
GK_DEVICE LseState team_merge(LseState st, LseState* scratch) {
  if constexpr (kTeam == 32) {
    return warp_merge(st);
  } else {
    return block_merge<kTeam>(st, scratch);
  }
}

}  // namespace grpo_kernels
