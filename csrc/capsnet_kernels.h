// Launchers of the capsnet_ext CUDA kernels.
//
// This header is plain C++: no CUDA and no torch types, so the torch binding
// (capsnet_ext_ops.cpp) and the kernels (*.cu, compiled by nvcc without torch headers)
// share it. Tensors cross it as raw pointers to contiguous row-major memory, together
// with their element type; saved routing states and workspaces are in the accumulation
// type (float for float16/bfloat16/float32, double for float64).
//
// Shapes (B samples, I input capsules, J output capsules, D = Dout, K = Din, R iterations):
//   u [B, I, K]   W [I, J, D, K]   u_hat [B, I, J, D]   bias [J, D]   v [B, J, D]
//   c [B, I, J]   s_all, V_all, gs_all [R, B, J, D] (accumulation type)
#pragma once

#include <cstdint>

namespace capsnet {

enum class DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kFloat64 = 3 };

// Result of a launcher: cuda_error is a cudaError_t value (0 = success) and kernel names the
// kernel whose launch failed.
struct Status {
  int cuda_error = 0;
  const char* kernel = "";
  bool ok() const { return cuda_error == 0; }
};

// cudaGetErrorString of a Status's cuda_error.
const char* cuda_error_string(int cuda_error);

// Device queries (plain CUDA runtime calls kept out of the torch binding): multiprocessor
// count and the largest dynamic shared memory a block may opt in to; -1 on error.
int device_sm_count(int device);
int64_t device_smem_optin(int device);

// Problem sizes shared by every routing launcher.
struct RoutingShape {
  int64_t B, I, J, D, K;  // K (= Din) is unused when u_hat is given
  int iterations;
};

// How a routing sweep is split over the GPU: blocks of `samples_per_block` samples (one warp
// each) by `caps_per_chunk` input capsules; the partial sums of each of the `num_chunks`
// chunks are reduced by a second kernel, so the result does not depend on timing.
struct SweepPlan {
  int samples_per_block;
  int64_t caps_per_chunk;
  int64_t num_chunks;
  int64_t workspace_elems;  // accumulation-type elements of the partial-sum workspace
};

constexpr int kSweepWarps = 8;  // warps (= samples) per sweep block

// Chooses the split for `sm_count` multiprocessors: about four blocks per multiprocessor.
inline SweepPlan plan_sweep(int64_t B, int64_t I, int64_t J, int64_t D, int sm_count) {
  SweepPlan p;
  p.samples_per_block = kSweepWarps;
  const int64_t sample_tiles = (B + kSweepWarps - 1) / kSweepWarps;
  const int64_t want_blocks = 4 * static_cast<int64_t>(sm_count > 0 ? sm_count : 1);
  int64_t chunks = (want_blocks + sample_tiles - 1) / sample_tiles;
  if (chunks < 1) chunks = 1;
  if (chunks > I) chunks = I;
  p.caps_per_chunk = (I + chunks - 1) / chunks;
  p.num_chunks = (I + p.caps_per_chunk - 1) / p.caps_per_chunk;
  p.workspace_elems = p.num_chunks * B * J * D;
  return p;
}

// Dynamic shared memory (bytes) the kernels need for these sizes; the binding checks it
// against the device limit before launching.
int64_t sweep_smem_bytes(DType dtype, int64_t J, int64_t D, int64_t K, bool recompute);
int64_t grad_smem_bytes(DType dtype, int64_t J, int64_t D, int64_t K, bool recompute);

// ---- predict: u_hat = W u --------------------------------------------------------------
Status predict_forward(DType dtype, const void* u, const void* W, void* u_hat, int64_t B,
                       int64_t I, int64_t J, int64_t D, int64_t K, void* stream);
// du = sum_jd W^T g (du may be null to skip), dW = sum_b g u^T (dW may be null to skip).
Status predict_backward(DType dtype, const void* grad_u_hat, const void* u, const void* W,
                        void* du, void* dW, int64_t B, int64_t I, int64_t J, int64_t D,
                        int64_t K, void* stream);

// ---- routing forward --------------------------------------------------------------------
// Either u_hat is given (u and W null) or u and W are (u_hat null: capsule_routing, u_hat
// recomputed in every sweep and never stored). Writes v (input dtype), c (input dtype, only
// if non-null), s_all and V_all (accumulation type; V_all[0] = 0). bias may be null.
// workspace holds plan.workspace_elems accumulation-type elements.
Status routing_forward(DType dtype, const RoutingShape& shape, const SweepPlan& plan,
                       const void* u_hat, const void* u, const void* W, const void* bias,
                       bool leaky, void* v, void* c, void* s_all, void* V_all,
                       void* workspace, void* stream);

// ---- routing backward -------------------------------------------------------------------
// grad_v [B, J, D] (input dtype). Writes grad_u_hat (given-u_hat form) or du and dW
// (capsule_routing form), and dbias [J, D] (input dtype, if non-null). gs_all
// ([R, B, J, D]) and G ([B, J, D]) are accumulation-type scratch buffers.
Status routing_backward(DType dtype, const RoutingShape& shape, const SweepPlan& plan,
                        const void* grad_v, const void* u_hat, const void* u, const void* W,
                        const void* s_all, const void* V_all, bool leaky, bool detach_inner,
                        void* grad_u_hat, void* du, void* dW, void* dbias, void* gs_all,
                        void* G, void* workspace, void* stream);

}  // namespace capsnet
