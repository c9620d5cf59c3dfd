// Launchers of the fused GRPO loss: token-level forward, forward + gradient (2 passes on sm_90, else 3), and the
// gradient rescale of the 2-pass path's backward.
#include "grpo_kernels/dispatch.cuh"
#include "grpo_kernels/grpo_loss_sm90.cuh"

namespace grpo_kernels {

cudaError_t grpo_loss_forward(const LogitsArg& logits, const int64_t* ids, double temperature, const TokenArgs& tokens,
                              const LossParams& params, const TokenOutputs& out, cudaStream_t stream) {
  return launch_rows(logits, [&](auto tag, auto team, dim3 grid, dim3 block) {
    using T = decltype(tag);
    row_forward_kernel<T, decltype(team)::value, GrpoOutputs><<<grid, block, 0, stream>>>(
        rows_view<const T>(logits), ids, inverse_temperature(temperature), GrpoOutputs{tokens, params, out});
  });
}

namespace {

size_t elem_bytes(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

bool rows_16b_aligned(const LogitsArg& a) {
  const size_t es = elem_bytes(a.dtype);
  const bool base = reinterpret_cast<uintptr_t>(a.data) % 16 == 0;
  const bool stride_b = a.batch <= 1 || (a.stride_b * es) % 16 == 0;
  const bool stride_t = a.seq_len <= 1 || (a.stride_t * es) % 16 == 0;
  return base && stride_b && stride_t && (a.vocab * es) % 16 == 0;
}

// Elements of one CTA's slice for a cluster of `c` CTAs: ceil(V / c) rounded up to whole 16-byte vectors.
int64_t slice_elems_for(int64_t vocab, int c, size_t es) {
  const int64_t k = static_cast<int64_t>(16 / es);
  return ((vocab + c - 1) / c + k - 1) / k * k;
}

}  // namespace

int two_pass_cluster_size(const LogitsArg& logits, const LogitsArg& grad, int device) {
  int major = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess || major < 9) return 0;
  if (!rows_16b_aligned(logits) || !rows_16b_aligned(grad) || logits.rows() == 0) return 0;
  const size_t es = elem_bytes(logits.dtype);
  for (int c = 1; c <= sm90::kMaxCluster; c *= 2) {
    if (static_cast<int64_t>(slice_elems_for(logits.vocab, c, es) * es) <= sm90::kSliceBudgetBytes) return c;
  }
  return 0;  // the row does not fit 8 slices: 3 passes
}

namespace {

template <typename T>
cudaError_t launch_two_pass(const LogitsArg& logits, const LogitsArg& grad, const int64_t* ids, float inv_tau,
                            const GrpoOutputs& outputs, float loss_scale, int cluster, cudaStream_t stream) {
  const int64_t slice = slice_elems_for(logits.vocab, cluster, sizeof(T));
  const size_t smem = static_cast<size_t>(sm90::shared_bytes(slice, sizeof(T)));
  auto kernel = sm90::grpo_loss_two_pass_kernel<T>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;

  cudaLaunchConfig_t config = {};
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = cluster;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  config.blockDim = dim3(sm90::kThreads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = attr;
  config.numAttrs = 1;
  // A persistent grid: as many clusters as can be resident at once, each walking rows.
  config.gridDim = dim3(cluster);
  int max_clusters = 0;
  err = cudaOccupancyMaxActiveClusters(&max_clusters, kernel, &config);
  if (err != cudaSuccess) return err;
  if (max_clusters < 1) return cudaErrorLaunchOutOfResources;
  const int64_t clusters = std::min<int64_t>(logits.rows(), max_clusters);
  config.gridDim = dim3(static_cast<unsigned>(clusters * cluster));
  return cudaLaunchKernelEx(&config, kernel, rows_view<const T>(logits), rows_view<T>(grad), ids, inv_tau, outputs,
                            loss_scale, slice);
}

}  // namespace

cudaError_t grpo_loss_forward_with_grad(const LogitsArg& logits, const int64_t* ids, double temperature,
                                        const TokenArgs& tokens, const LossParams& params, const TokenOutputs& out,
                                        float loss_scale, const LogitsArg& grad, cudaStream_t stream, GradPath* path) {
  *path = GradPath::kThreePass;
  if (logits.rows() == 0) return cudaSuccess;
  int device = 0;
  cudaGetDevice(&device);
  const int cluster = two_pass_cluster_size(logits, grad, device);
  if (cluster > 0) {
    *path = GradPath::kTwoPassCluster;
    return dispatch_dtype(logits.dtype, [&](auto tag) {
      using T = decltype(tag);
      return launch_two_pass<T>(logits, grad, ids, inverse_temperature(temperature), GrpoOutputs{tokens, params, out},
                                loss_scale, cluster, stream);
    });
  }
  cudaError_t err = grpo_loss_forward(logits, ids, temperature, tokens, params, out, stream);
  if (err != cudaSuccess) return err;
  const BackwardArgs args{out.lse, nullptr, out.grad_lp, nullptr, loss_scale};
  return token_logprobs_backward(logits, grad, ids, temperature, args, stream);
}

cudaError_t scale_gradient(const LogitsArg& grad, const float* grad_loss, float loss_scale, cudaStream_t stream) {
  if (grad.rows() == 0) return cudaSuccess;
  return dispatch_dtype(grad.dtype, [&](auto tag) {
    using T = decltype(tag);
    scale_gradient_kernel<T><<<grid_blocks(grad.rows(), 1, 256), 256, 0, stream>>>(rows_view<T>(grad), grad_loss,
                                                                                   loss_scale);
    return cudaGetLastError();
  });
}

}  // namespace grpo_kernels
