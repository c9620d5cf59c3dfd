// Token log-probs + entropy from logits, forward and backward: the portable (sm_80+) path.
//
//   forward : per row n with y = ids[n] >= 0:  lse, lp = u_y - lse, H = log s - t / s   (one read of the row)
//   backward: d/dz_v = (g 1[v = y] - p_v (g + gH (log p_v + H))) / tau                  (one read, one write)
//
// A team of kTeam threads owns a row: one warp for small vocabularies, one block for large ones (launch.cuh picks).
// Teams walk the rows grid-stride with 64-bit row offsets, so any N fits in any grid. Rows whose id is -1 are never
// read; they produce zeros. Logits are [B, T, V] with unit stride along V and any strides along B and T.
#pragma once

#include "launch.h"
#include "vec.cuh"

namespace grpo_kernels {

// The logits (or a gradient with the same shape): row n = (n / seq_len, n % seq_len), element strides.
template <typename T>
struct RowsView {
  T* data;
  int64_t rows;      // N = B * T
  int64_t seq_len;   // T
  int64_t stride_b;  // elements
  int64_t stride_t;  // elements
  int64_t vocab;     // V

  GK_DEVICE T* row(int64_t n) const { return data + (n / seq_len) * stride_b + (n % seq_len) * stride_t; }
};

// Which rows a thread works on.
template <int kTeam>
struct TeamRows {
  int rank;          // thread's rank in its team
  int64_t first;     // first row of this team
  int64_t step;      // teams in the grid

  GK_DEVICE static TeamRows make() {
    const int teams_per_block = blockDim.x / kTeam;
    return {static_cast<int>(threadIdx.x % kTeam), static_cast<int64_t>(blockIdx.x) * teams_per_block + threadIdx.x / kTeam,
            static_cast<int64_t>(gridDim.x) * teams_per_block};
  }
};

// Vectors each thread keeps in flight: 4 x 16 B per thread.
constexpr int kLoadsInFlight = 4;

// Push L vectors (first element of each in `first`) into st: all L loads are issued before the first use.
template <typename T, int L>
GK_DEVICE void push_vectors(LseState& st, const T* row, const int64_t (&first)[L], float inv_tau) {
  constexpr int K = Vec<T>::kSize;
  float u[L][K];
  GK_UNROLL
  for (int j = 0; j < L; ++j) load_vec(row + first[j], u[j]);
  GK_UNROLL
  for (int j = 0; j < L; ++j) {
    GK_UNROLL
    for (int i = 0; i < K; ++i) u[j][i] *= inv_tau;
    lse_push<K>(st, u[j]);
  }
}

// Calls f(first) for this thread's 16-byte vectors of a row, kLoadsInFlight at a time, then one at a time;
// first[j] is the first element of the j-th vector.
template <typename T, int kTeam, typename F>
GK_DEVICE void for_each_vector_batch(const RowSplit& split, int rank, F&& f) {
  constexpr int K = Vec<T>::kSize;
  int64_t v = rank;
  for (; v + (kLoadsInFlight - 1) * kTeam < split.vecs; v += kLoadsInFlight * kTeam) {
    int64_t first[kLoadsInFlight];
    GK_UNROLL
    for (int j = 0; j < kLoadsInFlight; ++j) first[j] = split.head + (v + j * kTeam) * K;
    f(first);
  }
  for (; v < split.vecs; v += kTeam) {
    const int64_t first[1] = {split.head + v * K};
    f(first);
  }
}

// Online log-sum-exp state of this thread's share of one row (u = z * inv_tau).
template <typename T, int kTeam>
GK_DEVICE LseState row_partial_lse(const T* row, int64_t vocab, float inv_tau, int rank) {
  const RowSplit split = split_row<T>(row, vocab);
  LseState st = lse_empty();
  if (rank < split.head) lse_push(st, to_float(row[rank]) * inv_tau);
  for_each_vector_batch<T, kTeam>(split, rank, [&](const auto& first) { push_vectors(st, row, first, inv_tau); });
  if (split.tail + rank < vocab) lse_push(st, to_float(row[split.tail + rank]) * inv_tau);
  return st;
}

// What the forward writes per row; the fused loss (grpo_loss.cuh) extends it with the per-token epilogue.
struct LogprobsOutputs {
  float* lp;       // [N]
  float* lse;      // [N]
  float* entropy;  // [N] or nullptr

  GK_DEVICE void write(int64_t n, bool valid, float lp_n, float lse_n, float entropy_n) const {
    lp[n] = valid ? lp_n : 0.f;
    lse[n] = valid ? lse_n : 0.f;
    if (entropy != nullptr) entropy[n] = valid ? entropy_n : 0.f;
  }
};

// Forward over all rows. `Outputs::write(n, valid, lp, lse, H)` runs once per row, in the team's rank-0 thread.
template <typename T, int kTeam, typename Outputs>
__global__ void __launch_bounds__(kTeam == 32 ? 256 : kTeam, kTeam == 32 ? 1 : 2) row_forward_kernel(RowsView<const T> logits,
                                                                                 const int64_t* __restrict__ ids,  // [N]
                                                                                 float inv_tau, Outputs outputs) {
  __shared__ LseState scratch[kTeam / 32 + 1];
  const TeamRows<kTeam> team = TeamRows<kTeam>::make();
  for (int64_t n = team.first; n < logits.rows; n += team.step) {
    const int64_t y = ids[n];
    if (y < 0) {  // not taking part: never read
      if (team.rank == 0) outputs.write(n, false, 0.f, 0.f, 0.f);
      continue;
    }
    const T* row = logits.row(n);
    const LseState st = team_merge<kTeam>(row_partial_lse<T, kTeam>(row, logits.vocab, inv_tau, team.rank), scratch);
    if (team.rank == 0) {
      const float lse = lse_value(st);
      outputs.write(n, true, to_float(row[y]) * inv_tau - lse, lse, lse_entropy(st));
    }
  }
}

// Per-row scalars of the backward, already divided by tau: a = g / tau, b = gH / tau.
struct BackwardRow {
  float lse, entropy, a, b;
};

GK_DEVICE BackwardRow backward_row(const BackwardArgs& args, int64_t n, float inv_tau) {
  const bool with_entropy = args.grad_entropy != nullptr;
  return {args.lse[n], with_entropy ? args.entropy[n] : 0.f, args.grad_lp[n] * args.grad_scale * inv_tau,
          with_entropy ? args.grad_entropy[n] * inv_tau : 0.f};
}

// The gradient of element v of a row from its logit z (0 for a row that does not take part).
struct RowGrad {
  BackwardRow r;
  int64_t y;
  float inv_tau;
  bool valid;

  GK_DEVICE float operator()(float z, int64_t v) const {
    return valid ? logit_grad(z * inv_tau, v == y, r.lse, r.entropy, r.a, r.b) : 0.f;
  }
};

// L vectors of one row: all loads first (none for a row that does not take part), then the gradient stores.
template <typename T, int L>
GK_DEVICE void grad_vectors(const T* row, T* out, const int64_t (&first)[L], const RowGrad& grad_at) {
  constexpr int K = Vec<T>::kSize;
  float z[L][K];
  GK_UNROLL
  for (int j = 0; j < L; ++j) {
    if (grad_at.valid) {
      load_vec(row + first[j], z[j]);
    } else {
      GK_UNROLL
      for (int i = 0; i < K; ++i) z[j][i] = 0.f;
    }
  }
  GK_UNROLL
  for (int j = 0; j < L; ++j) {
    GK_UNROLL
    for (int i = 0; i < K; ++i) z[j][i] = grad_at(z[j][i], first[j] + i);
    store_vec(out + first[j], z[j]);
  }
}

// Write the gradient of one row (zeros when it does not take part). `out` may be `row` itself (in place): each
// element is read by the thread that then overwrites it.
template <typename T, int kTeam>
GK_DEVICE void write_row_grad(const T* row, T* out, int64_t vocab, const RowGrad& grad_at, int rank) {
  auto scalar = [&](int64_t v) { out[v] = from_float<T>(grad_at(grad_at.valid ? to_float(row[v]) : 0.f, v)); };
  if (reinterpret_cast<uintptr_t>(row) % 16 != reinterpret_cast<uintptr_t>(out) % 16) {
    for (int64_t v = rank; v < vocab; v += kTeam) scalar(v);  // `out` aligned unlike the logits: no vectors
    return;
  }
  const RowSplit split = split_row<T>(row, vocab);
  if (rank < split.head) scalar(rank);
  for_each_vector_batch<T, kTeam>(split, rank, [&](const auto& first) { grad_vectors(row, out, first, grad_at); });
  if (split.tail + rank < vocab) scalar(split.tail + rank);
}

template <typename T, int kTeam>
__global__ void __launch_bounds__(kTeam == 32 ? 256 : kTeam) row_backward_kernel(RowsView<const T> logits,
                                                                                  RowsView<T> grad,  // may alias
                                                                                  const int64_t* __restrict__ ids,
                                                                                  float inv_tau, BackwardArgs args) {
  const TeamRows<kTeam> team = TeamRows<kTeam>::make();
  for (int64_t n = team.first; n < logits.rows; n += team.step) {
    const int64_t y = ids[n];
    const bool valid = y >= 0;
    const RowGrad grad_at{valid ? backward_row(args, n, inv_tau) : BackwardRow{0.f, 0.f, 0.f, 0.f}, y, inv_tau, valid};
    write_row_grad<T, kTeam>(logits.row(n), grad.row(n), logits.vocab, grad_at, team.rank);
  }
}

}  // namespace grpo_kernels
