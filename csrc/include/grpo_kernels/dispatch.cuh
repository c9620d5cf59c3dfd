// Host-side launch helpers shared by csrc/*.cu: dtype dispatch, team choice, grid size, views.
#pragma once

#include <algorithm>
#include <type_traits>

#include "logprobs.cuh"

namespace grpo_kernels {

// One warp per row up to this vocabulary (V / 32 <= 128 elements per lane: a warp keeps enough 16-byte loads in
// flight), one block of kBlockTeam threads per row above it.
constexpr int64_t kWarpRowMaxVocab = 4096;
constexpr int kBlockTeam = 512;

template <int kTeam>
struct TeamShape {
  static constexpr int kThreads = kTeam == 32 ? 256 : kTeam;  // warp teams: 8 rows per block
  static constexpr int kTeamsPerBlock = kThreads / kTeam;
};

// Calls f(T{}) with the element type of `dtype`.
template <typename F>
cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      return f(float{});
    case DType::kFloat16:
      return f(__half{});
    case DType::kBFloat16:
      return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

// Calls f(std::integral_constant<int, kTeam>{}) with the team size for `vocab`.
template <typename F>
cudaError_t dispatch_team(int64_t vocab, F&& f) {
  if (vocab <= kWarpRowMaxVocab) return f(std::integral_constant<int, 32>{});
  return f(std::integral_constant<int, kBlockTeam>{});
}

// Blocks for a grid-stride walk over `rows`: enough for every row, at most one full wave of the device (the teams
// then loop), so N is never limited by the grid size.
inline int grid_blocks(int64_t rows, int teams_per_block, int threads) {
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int64_t wanted = (rows + teams_per_block - 1) / teams_per_block;
  const int64_t wave = static_cast<int64_t>(std::max(sms, 1)) * std::max(2048 / threads, 1);
  return static_cast<int>(std::max<int64_t>(1, std::min(wanted, wave)));
}

template <typename T>
RowsView<T> rows_view(const LogitsArg& a) {
  return {static_cast<T*>(a.data), a.rows(), a.seq_len, a.stride_b, a.stride_t, a.vocab};
}

inline float inverse_temperature(double temperature) { return static_cast<float>(1.0 / temperature); }

// The row kernels' launch: calls launch(T{}, std::integral_constant<int, kTeam>{}, grid, block) with the element
// type, team size and grid for `logits`; nothing for an empty batch.
template <typename F>
cudaError_t launch_rows(const LogitsArg& logits, F&& launch) {
  if (logits.rows() == 0) return cudaSuccess;
  return dispatch_dtype(logits.dtype, [&](auto tag) {
    return dispatch_team(logits.vocab, [&](auto team) {
      using Shape = TeamShape<decltype(team)::value>;
      launch(tag, team, dim3(grid_blocks(logits.rows(), Shape::kTeamsPerBlock, Shape::kThreads)), dim3(Shape::kThreads));
      return cudaGetLastError();
    });
  });
}

}  // namespace grpo_kernels
