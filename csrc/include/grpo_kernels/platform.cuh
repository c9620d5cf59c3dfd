// Qualifiers that let the per-row math compile both as CUDA and as plain C++ (the host unit tests use g++).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define GK_HOST_DEVICE __host__ __device__ __forceinline__
#define GK_DEVICE __device__ __forceinline__
#define GK_UNROLL _Pragma("unroll")
#else
#define GK_HOST_DEVICE inline
#define GK_UNROLL
#endif

namespace grpo_kernels {

// exp/log in float32: the fast device intrinsics are avoided on purpose (the tests hold every backend to 1e-5
// relative error against float64, and __expf's error grows with |x|).
GK_HOST_DEVICE float exp_f32(float x) { return expf(x); }
GK_HOST_DEVICE float log_f32(float x) { return logf(x); }

// min/max that propagate NaN like torch.minimum/torch.maximum (fminf/fmaxf would drop it).
GK_HOST_DEVICE float nan_min(float a, float b) { return (a < b || a != a) ? a : b; }
GK_HOST_DEVICE float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }

// torch.clamp semantics: NaN passes through.
GK_HOST_DEVICE float clamp_max(float x, float hi) { return x > hi ? hi : x; }
GK_HOST_DEVICE float clamp_range(float x, float lo, float hi) { return x < lo ? lo : (x > hi ? hi : x); }

}  // namespace grpo_kernels
