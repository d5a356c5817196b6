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

// Routing options beyond the shape. prior ([I, J], input dtype) may be null; the softmax runs
// on (prior + agreement) * inv_temperature (the zero logit of leaky routing is not scaled).
struct RoutingOptions {
  bool leaky = false;
  bool detach_inner = false;
  double inv_temperature = 1.0;
};

// ---- the split plan ---------------------------------------------------------------------
// A routing sweep runs on a grid of (sample tiles) x (chunks of input capsules). Each block
// stages the W slices of its chunk in shared memory once and reuses them for every sample of
// its tile; a group of `group` lanes (one per output capsule j) handles one sample at a time
// with u_hat_ij, V_j and the running partial sum in registers. The per-chunk partial sums are
// combined by a fixed-shape tree (fan-in kTreeFanIn) whose nodes are summed, in child order,
// by the last block to arrive at them (an atomic ticket); the root block also adds the bias
// and squashes. Every number below depends on the problem's shape only, never on the device,
// so the order of every floating-point sum, and therefore every result bit, is the same on
// every GPU.
constexpr int kRoutingThreads = 256;         // threads per block of every sweep
constexpr int kTileSamples = 32;             // samples per block (at most; fewer for a small batch)
constexpr int kTreeFanIn = 8;                // children per node of the reduction trees
constexpr int kMaxTreeLevels = 24;           // 8^24 > any int64 leaf count
constexpr int64_t kTargetBlocks = 512;       // blocks a sweep aims for (a shape constant, not per device)
constexpr int64_t kWChunkBytes = 48 * 1024;  // shared memory for the W slices of one chunk
constexpr int64_t kGradStageBytes = 64 * 1024;  // gradient kernel: staged gu of a sample tile

// A reduction tree over `leaves` leaves for each of `keys` independent keys. Level 0 holds the
// leaves; level l (1 <= l <= levels) has nodes[l] = ceil(nodes[l-1] / kTreeFanIn) nodes; level
// `levels` has a single node per key, the root, whose block sums its children and runs the
// epilogue. Buffers of levels 0 .. levels-1 live at buffer_offset[l] of the workspace with
// `stride` elements per node; counters (one per key and node of levels >= 1) at counter_offset[l].
struct ReductionTree {
  int levels = 0;
  int64_t nodes[kMaxTreeLevels + 1] = {};
  int64_t buffer_offset[kMaxTreeLevels + 1] = {};
  int64_t counter_offset[kMaxTreeLevels + 1] = {};
  int64_t stride = 0;        // elements per leaf / node
  int64_t buffer_elems = 0;  // workspace elements, level 0 included
  int64_t counter_elems = 0;
};

inline ReductionTree plan_tree(int64_t leaves, int64_t keys, int64_t stride, int64_t buffer_base,
                               int64_t counter_base) {
  ReductionTree t;
  t.stride = stride;
  t.nodes[0] = leaves;
  t.buffer_offset[0] = buffer_base;
  int64_t buf = buffer_base + leaves * stride, cnt = counter_base;
  while (t.nodes[t.levels] > 1 && t.levels < kMaxTreeLevels) {
    const int l = ++t.levels;
    t.nodes[l] = (t.nodes[l - 1] + kTreeFanIn - 1) / kTreeFanIn;
    t.counter_offset[l] = cnt;
    cnt += keys * t.nodes[l];
    t.buffer_offset[l] = buf;
    if (t.nodes[l] > 1) buf += t.nodes[l] * stride;  // the root writes the outputs instead
  }
  t.buffer_elems = buf - buffer_base;
  t.counter_elems = cnt - counter_base;
  return t;
}

// Which kernel instance runs: specialised when the capsule sizes have a compile-time instance
// (Dout in {8, 16, 32}, J <= 32 and, when u_hat is recomputed, Din in {4, 8, 16}); otherwise
// the generic kernel (runtime sizes, per-lane state in shared memory, J beyond 32 by looping).
inline bool routing_is_specialised(int64_t J, int64_t D, int64_t K, bool recompute) {
  const bool d_ok = D == 8 || D == 16 || D == 32;
  const bool k_ok = !recompute || K == 4 || K == 8 || K == 16;
  return J <= 32 && d_ok && k_ok;
}

// Samples a lane carries at once (RoutingPlan::lane_samples): 2 is built for the specialised
// sizes with Dout <= 16 and float accumulation (float16, bfloat16, float32); everything else
// has 1. The choice changes only the speed: each sample's arithmetic is the same sequence of
// operations, so the results are bitwise equal.
inline int routing_max_lane_samples(int64_t J, int64_t D, int64_t K, bool recompute, int acc_bytes) {
  return routing_is_specialised(J, D, K, recompute) && D <= 16 && acc_bytes == 4 ? 2 : 1;
}

struct RoutingPlan {
  bool specialised = false;
  int lane_samples = 1;     // samples per lane and group pass: 1 or 2 (routing_max_lane_samples)
  int group = 32;           // lanes per sample: 16 (specialised, J <= 16) or 32
  int generic_slots = 1;    // output capsules per lane: 1, or ceil(J / 32) in the generic kernel
  int tile_samples = 0;     // samples per block, a multiple of the groups per block
  int64_t sample_tiles = 0;
  int64_t caps_per_chunk = 0;
  int64_t num_chunks = 0;
  ReductionTree sweep_tree;  // over chunks, one key per sample tile, stride B * J * D
  ReductionTree grad_tree;   // over sample tiles, one key per chunk: dW and dprior partials
  int64_t grad_record = 0;   // elements per input capsule of a grad partial: J*D*K (fused) + J (prior)
  int64_t workspace_elems = 0;  // accumulation-type elements
  int64_t counter_elems = 0;    // unsigned ints, zeroed once per op call
};

// The plan of a problem: a function of the shape and of the options that change what the
// kernels reduce (recompute: capsule_routing; prior: dprior), never of the device.
// lane_samples asks for that many samples per lane (a speed choice with bitwise equal results);
// sizes without such an instance get 1.
inline RoutingPlan plan_routing(const RoutingShape& s, bool recompute, bool prior, int acc_bytes,
                                int lane_samples = 1) {
  RoutingPlan p;
  p.specialised = routing_is_specialised(s.J, s.D, s.K, recompute);
  p.lane_samples = lane_samples == 2 && routing_max_lane_samples(s.J, s.D, s.K, recompute, acc_bytes) >= 2 ? 2 : 1;
  p.group = (p.specialised && s.J <= 16) ? 16 : 32;
  p.generic_slots = p.specialised ? 1 : static_cast<int>((s.J + 31) / 32);
  const int groups = kRoutingThreads / p.group;
  const int64_t want = s.B < kTileSamples ? s.B : kTileSamples;
  p.tile_samples = static_cast<int>(((want + groups - 1) / groups) * groups);
  // The gradient kernel stages the tile's gu_ij (and u_i, dprior terms) per capsule in shared
  // memory: large capsules get smaller tiles (at least one sample per group).
  const int64_t stage_per_sample = ((recompute ? s.J * s.D + s.K : 0) + (prior ? s.J : 0)) * acc_bytes;
  while (p.tile_samples > groups && p.tile_samples * stage_per_sample > kGradStageBytes) p.tile_samples -= groups;
  p.sample_tiles = (s.B + p.tile_samples - 1) / p.tile_samples;
  // Chunks: about kTargetBlocks blocks in all, and the W slices of a chunk within kWChunkBytes.
  int64_t caps = (s.I * p.sample_tiles + kTargetBlocks - 1) / kTargetBlocks;
  if (recompute) {
    const int64_t pad = p.specialised ? 16 / acc_bytes : 0;
    const int64_t per_cap = s.J * (s.D * s.K + pad) * acc_bytes;
    const int64_t fit = kWChunkBytes / per_cap;
    if (caps > fit) caps = fit;
  }
  if (caps < 1) caps = 1;
  if (caps > s.I) caps = s.I;
  p.caps_per_chunk = caps;
  p.num_chunks = (s.I + caps - 1) / caps;
  const int64_t JD = s.J * s.D;
  p.sweep_tree = plan_tree(p.num_chunks, p.sample_tiles, s.B * JD, 0, 0);
  p.grad_record = (recompute ? JD * s.K : 0) + (prior ? s.J : 0);
  p.grad_tree = plan_tree(p.sample_tiles, p.num_chunks, p.num_chunks * caps * p.grad_record,
                          p.sweep_tree.buffer_elems, p.sweep_tree.counter_elems);
  const bool grad_reduces = p.grad_record > 0;
  p.workspace_elems = p.sweep_tree.buffer_elems + (grad_reduces ? p.grad_tree.buffer_elems : 0);
  p.counter_elems = p.sweep_tree.counter_elems + (grad_reduces ? p.grad_tree.counter_elems : 0);
  if (p.workspace_elems < 1) p.workspace_elems = 1;
  if (p.counter_elems < 1) p.counter_elems = 1;
  return p;
}

// Dynamic shared memory (bytes) of the larger of the sweep and gradient kernels for a plan;
// the binding checks it against the device limit before launching anything.
int64_t routing_smem_bytes(DType dtype, const RoutingShape& shape, const RoutingPlan& plan, bool recompute);

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
// if non-null), s_all and V_all (accumulation type; V_all[0] = 0). bias and prior may be
// null. workspace holds plan.workspace_elems accumulation-type elements and counters
// plan.counter_elems unsigned ints (zeroed here). Launches: one memset, one sweep per iteration.
Status routing_forward(DType dtype, const RoutingShape& shape, const RoutingPlan& plan,
                       const RoutingOptions& options, const void* u_hat, const void* u, const void* W,
                       const void* bias, const void* prior, void* v, void* c, void* s_all, void* V_all,
                       void* workspace, unsigned* counters, void* stream);

// ---- routing backward -------------------------------------------------------------------
// grad_v [B, J, D] (input dtype). Writes grad_u_hat (given-u_hat form) or du and dW
// (capsule_routing form), dbias [J, D] (only if non-null) and dprior [I, J] (only if prior
// is non-null). gs_all ([R, B, J, D]) and G ([B, J, D]) are accumulation-type scratch.
// Launches: one memset, R - 1 reverse sweeps (none with detach_inner), the gradient sweep,
// and the bias gradient when dbias is non-null.
Status routing_backward(DType dtype, const RoutingShape& shape, const RoutingPlan& plan,
                        const RoutingOptions& options, const void* grad_v, const void* u_hat, const void* u,
                        const void* W, const void* prior, const void* s_all, const void* V_all,
                        void* grad_u_hat, void* du, void* dW, void* dbias, void* dprior, void* gs_all, void* G,
                        void* workspace, unsigned* counters, void* stream);

}  // namespace capsnet
