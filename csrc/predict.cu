// predict: prediction vectors u_hat[b, i, j, :] = W[i, j] @ u[b, i] and their gradients.
//
// This is the unfused path (capsule_routing never stores u_hat). Each output element is a
// dot product of length Din (8 in CapsNet), too short for tensor-core tiles to pay off, and
// the op is bound by writing u_hat: one thread per output element, reading W from L2.
#include "common.cuh"

namespace capsnet {
namespace {

constexpr int kThreads = 256;

// u_hat[b, i, jd] = sum_k W[i, jd, k] u[b, i, k]; jd = j * D + d runs over JD = J * D.
template <typename scalar_t>
__global__ void predict_forward_kernel(const scalar_t* __restrict__ u,  // [B, I, K]
                                       const scalar_t* __restrict__ W,  // [I, JD, K]
                                       scalar_t* __restrict__ u_hat,    // [B, I, JD]
                                       int64_t B, int64_t I, int64_t JD, int64_t K) {
  using acc = acc_t<scalar_t>;
  const int64_t n = B * I * JD;
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < n;
       idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t jd = idx % JD;
    const int64_t bi = idx / JD;  // b * I + i
    const int64_t i = bi % I;
    const scalar_t* w = W + (i * JD + jd) * K;
    const scalar_t* x = u + bi * K;
    acc sum = 0;
    for (int64_t k = 0; k < K; ++k) sum += load_as<acc>(w + k) * load_as<acc>(x + k);
    store_from(u_hat + idx, sum);
  }
}

// du[b, i, k] = sum_jd W[i, jd, k] g[b, i, jd]
template <typename scalar_t>
__global__ void predict_grad_u_kernel(const scalar_t* __restrict__ g,  // [B, I, JD]
                                      const scalar_t* __restrict__ W,  // [I, JD, K]
                                      scalar_t* __restrict__ du,       // [B, I, K]
                                      int64_t B, int64_t I, int64_t JD, int64_t K) {
  using acc = acc_t<scalar_t>;
  const int64_t n = B * I * K;
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < n;
       idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t k = idx % K;
    const int64_t bi = idx / K;
    const int64_t i = bi % I;
    const scalar_t* grow = g + bi * JD;
    const scalar_t* wcol = W + i * JD * K + k;
    acc sum = 0;
    for (int64_t jd = 0; jd < JD; ++jd) sum += load_as<acc>(wcol + jd * K) * load_as<acc>(grow + jd);
    store_from(du + idx, sum);
  }
}

// dW[i, jd, k] = sum_b g[b, i, jd] u[b, i, k]: one thread owns one element of dW and sums
// over the batch itself, so there are no atomics and the result is deterministic.
template <typename scalar_t>
__global__ void predict_grad_W_kernel(const scalar_t* __restrict__ g,  // [B, I, JD]
                                      const scalar_t* __restrict__ u,  // [B, I, K]
                                      scalar_t* __restrict__ dW,       // [I, JD, K]
                                      int64_t B, int64_t I, int64_t JD, int64_t K) {
  using acc = acc_t<scalar_t>;
  const int64_t n = I * JD * K;
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < n;
       idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t k = idx % K;
    const int64_t ijd = idx / K;  // i * JD + jd
    const int64_t jd = ijd % JD;
    const int64_t i = ijd / JD;
    acc sum = 0;
    for (int64_t b = 0; b < B; ++b) {
      const int64_t bi = b * I + i;
      sum += load_as<acc>(g + bi * JD + jd) * load_as<acc>(u + bi * K + k);
    }
    store_from(dW + idx, sum);
  }
}

}  // namespace

Status predict_forward(DType dtype, const void* u, const void* W, void* u_hat, int64_t B,
                       int64_t I, int64_t J, int64_t D, int64_t K, void* stream) {
  return dispatch_dtype(dtype, [&](auto* tag) -> Status {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    const int64_t JD = J * D;
    CAPSNET_LAUNCH(predict_forward_kernel<scalar_t>, grid_for(B * I * JD, kThreads), kThreads, 0, (cudaStream_t)stream)(
        static_cast<const scalar_t*>(u), static_cast<const scalar_t*>(W), static_cast<scalar_t*>(u_hat), B, I,
        JD, K);
    CAPSNET_CHECK_LAUNCH("predict_forward_kernel");
    return Status{};
  });
}

Status predict_backward(DType dtype, const void* grad_u_hat, const void* u, const void* W,
                        void* du, void* dW, int64_t B, int64_t I, int64_t J, int64_t D,
                        int64_t K, void* stream) {
  return dispatch_dtype(dtype, [&](auto* tag) -> Status {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    const int64_t JD = J * D;
    const auto* g = static_cast<const scalar_t*>(grad_u_hat);
    if (du != nullptr) {
      CAPSNET_LAUNCH(predict_grad_u_kernel<scalar_t>, grid_for(B * I * K, kThreads), kThreads, 0, (cudaStream_t)stream)(
          g, static_cast<const scalar_t*>(W), static_cast<scalar_t*>(du), B, I, JD, K);
      CAPSNET_CHECK_LAUNCH("predict_grad_u_kernel");
    }
    if (dW != nullptr) {
      CAPSNET_LAUNCH(predict_grad_W_kernel<scalar_t>, grid_for(I * JD * K, kThreads), kThreads, 0, (cudaStream_t)stream)(
          g, static_cast<const scalar_t*>(u), static_cast<scalar_t*>(dW), B, I, JD, K);
      CAPSNET_CHECK_LAUNCH("predict_grad_W_kernel");
    }
    return Status{};
  });
}

}  // namespace capsnet
