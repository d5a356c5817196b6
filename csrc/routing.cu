// Dynamic routing by agreement, forward and backward, on a given u_hat (dynamic_routing) or
// on u and W with u_hat recomputed in every sweep and never stored (capsule_routing).
//
// The algorithm (see docs/cuda-backend.md and the fused-routing design note): iteration r
// needs only V^r = v^0 + ... + v^(r-1) (J*D numbers per sample), since the logits after r
// agreement updates are <u_hat_ij, V^r_j>. Each iteration is therefore one sweep over the
// input capsules i that reduces s^r_j = sum_i c^r_ij u_hat_ij, followed by a small kernel
// that sums the per-chunk partials, adds the bias and squashes.
//
// Kernels (B samples, I input capsules, J outputs of D dims, K = Din, R iterations):
//   routing_sweep_kernel    grid (ceil(B / 8) sample tiles, num_chunks input-capsule chunks),
//                           8 warps; warp w owns sample 8 * blockIdx.x + w. For each input
//                           capsule of the chunk the block stages W[i] in shared memory
//                           (reused by the 8 samples), each warp recomputes u_hat[b, i] into
//                           its shared scratch, forms the logits (lanes over j, serial over
//                           d), the softmax over j (warp shuffles), and accumulates its
//                           sample's partial sum in shared memory. The reverse mode of the
//                           same kernel accumulates sum_i gl_ij u_hat_ij for the backward.
//   routing_squash_kernel   one thread per (b, j): sums the chunk partials in a fixed order
//                           (deterministic, no atomics), adds the bias, squashes.
//   squash_backward_kernel  one thread per (b, j).
//   add_partials_kernel     one thread per (b, j, d): G += sum over chunks.
//   routing_grad_kernel     grid (I, sample groups), 4 warps: the final gradient sweep over
//                           all iterations at once. In the fused form a block owns one input
//                           capsule for the whole batch, so dW[i] is summed over samples in
//                           shared memory and written once: no atomics.
//   bias_grad_kernel        one thread per (j, d).
#include "common.cuh"

namespace capsnet {
namespace {

constexpr int kWarpSize = 32;
constexpr int kSweepThreads = kSweepWarps * kWarpSize;
constexpr int kGradWarps = 4;
constexpr int kGradThreads = kGradWarps * kWarpSize;
constexpr int kElemThreads = 256;
constexpr int64_t kDefaultSmemLimit = 48 * 1024;

// ---- warp-level building blocks ----------------------------------------------------------
// Every helper is executed by all 32 lanes of a warp. Scratch arrays live in shared memory;
// entries indexed by jd (= j * D + d) or j are owned by lane (index % 32) when written.

// uh[jd] = u_hat[b, i, jd]: recomputed from W_s (W[i] staged by the block, transposed to
// [K, JD] so that consecutive lanes read consecutive banks) and u[b, i], or loaded.
// u_s receives u[b, i] (recompute only).
template <typename scalar_t, typename acc, bool kRecompute>
__device__ __forceinline__ void load_prediction(const scalar_t* __restrict__ u_hat, const scalar_t* __restrict__ u,
                                                const acc* W_s, acc* u_s, acc* uh, int64_t bi, int JD, int K,
                                                int lane) {
  if (kRecompute) {
    for (int k = lane; k < K; k += kWarpSize) u_s[k] = load_as<acc>(u + bi * K + k);
    __syncwarp();
    for (int jd = lane; jd < JD; jd += kWarpSize) {
      acc sum = 0;
      for (int k = 0; k < K; ++k) sum += W_s[k * JD + jd] * u_s[k];
      uh[jd] = sum;
    }
  } else {
    for (int jd = lane; jd < JD; jd += kWarpSize) uh[jd] = load_as<acc>(u_hat + bi * JD + jd);
  }
  __syncwarp();
}

// c_s[j] = softmax over j of <uh_j, V_j>; leaky adds a constant zero logit that enters only
// the normalisation. V (J * D) may be in shared or global memory.
template <typename acc>
__device__ __forceinline__ void couplings(const acc* uh, const acc* V, acc* c_s, int J, int D, bool leaky,
                                          int lane) {
  acc m = static_cast<acc>(-INFINITY);
  for (int j = lane; j < J; j += kWarpSize) {
    acc logit = 0;
    for (int d = 0; d < D; ++d) logit += uh[j * D + d] * V[j * D + d];
    c_s[j] = logit;
    m = max_acc(m, logit);
  }
  m = warp_max(m);
  if (leaky) m = max_acc(m, acc(0));
  acc sum = 0;
  for (int j = lane; j < J; j += kWarpSize) {
    const acc e = exp_acc(c_s[j] - m);
    c_s[j] = e;
    sum += e;
  }
  sum = warp_sum(sum);
  if (leaky) sum += exp_acc(-m);
  const acc inv = acc(1) / sum;
  for (int j = lane; j < J; j += kWarpSize) c_s[j] *= inv;
  __syncwarp();
}

// Softmax backward: gc_j = <gs_j, uh_j>, gl_j = c_j (gc_j - sum_k c_k gc_k) into gl_s. The
// sum over k runs over the real outputs only (the leaky logit is a constant).
template <typename acc>
__device__ __forceinline__ void logit_grads(const acc* uh, const acc* gs, const acc* c_s, acc* gl_s, int J, int D,
                                            int lane) {
  acc t = 0;
  for (int j = lane; j < J; j += kWarpSize) {
    acc gc = 0;
    for (int d = 0; d < D; ++d) gc += gs[j * D + d] * uh[j * D + d];
    gl_s[j] = gc;
    t += c_s[j] * gc;
  }
  t = warp_sum(t);
  for (int j = lane; j < J; j += kWarpSize) gl_s[j] = c_s[j] * (gl_s[j] - t);
  __syncwarp();
}

// W[i] ([JD, K] in global memory, read coalesced) into shared memory as [K, JD].
template <typename scalar_t, typename acc>
__device__ __forceinline__ void stage_transposed(const scalar_t* __restrict__ Wi, acc* W_s, int JD, int K, int tid,
                                                 int nthreads) {
  for (int e = tid; e < JD * K; e += nthreads) W_s[(e % K) * JD + e / K] = load_as<acc>(Wi + e);
}

// ---- sweep over the input capsules (forward, and the backward's reverse sweeps) ----------
// Forward:  partial[chunk, b, jd] = sum_{i in chunk} c_ij u_hat_ij          (c from V_r)
// Reverse:  partial[chunk, b, jd] = sum_{i in chunk} gl_ij u_hat_ij   (gl from V_r, gs_r)
template <typename scalar_t, bool kRecompute, bool kReverse>
__global__ void __launch_bounds__(kSweepThreads)
routing_sweep_kernel(const scalar_t* __restrict__ u_hat,      // [B, I, JD] or null (recompute)
                     const scalar_t* __restrict__ u,          // [B, I, K] (recompute)
                     const scalar_t* __restrict__ W,          // [I, JD, K] (recompute)
                     const acc_t<scalar_t>* __restrict__ V_r,   // [B, JD]: V^r
                     const acc_t<scalar_t>* __restrict__ gs_r,  // [B, JD]: dL/ds^r (reverse)
                     scalar_t* __restrict__ c_out,            // [B, I, J] or null
                     acc_t<scalar_t>* __restrict__ partial,   // [num_chunks, B, JD]
                     int64_t B, int64_t I, int J, int D, int K, int64_t caps_per_chunk, bool leaky) {
  using acc = acc_t<scalar_t>;
  CAPSNET_DYNAMIC_SMEM(smem_raw);
  acc* smem = reinterpret_cast<acc*>(smem_raw);
  const int JD = J * D;
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;

  acc* W_s = smem;  // [K, JD] (W[i] transposed), recompute only
  acc* scratch = smem + (kRecompute ? JD * K : 0) + warp * (4 * JD + 2 * J + K);
  acc* uh = scratch;          // [JD]
  acc* V_s = uh + JD;         // [JD]
  acc* gs_s = V_s + JD;       // [JD]
  acc* sum_s = gs_s + JD;     // [JD]
  acc* c_s = sum_s + JD;      // [J]
  acc* gl_s = c_s + J;        // [J]
  acc* u_s = gl_s + J;        // [K]

  const int64_t b = static_cast<int64_t>(blockIdx.x) * kSweepWarps + warp;
  const bool active = b < B;
  const int64_t i_begin = static_cast<int64_t>(blockIdx.y) * caps_per_chunk;
  const int64_t i_end = min(I, i_begin + caps_per_chunk);

  if (active) {
    for (int jd = lane; jd < JD; jd += kWarpSize) {
      V_s[jd] = V_r[b * JD + jd];
      gs_s[jd] = kReverse ? gs_r[b * JD + jd] : acc(0);
      sum_s[jd] = 0;
    }
  }
  __syncwarp();

  for (int64_t i = i_begin; i < i_end; ++i) {
    if (kRecompute) {
      __syncthreads();  // every warp is done with the previous W[i]
      stage_transposed(W + i * JD * K, W_s, JD, K, threadIdx.x, kSweepThreads);
      __syncthreads();
    }
    if (!active) continue;  // after the barriers: the block's warps reach them together
    const int64_t bi = b * I + i;
    load_prediction<scalar_t, acc, kRecompute>(u_hat, u, W_s, u_s, uh, bi, JD, K, lane);
    couplings(uh, V_s, c_s, J, D, leaky, lane);
    if (c_out != nullptr) {
      for (int j = lane; j < J; j += kWarpSize) store_from(c_out + bi * J + j, c_s[j]);
    }
    const acc* weight = c_s;
    if (kReverse) {
      logit_grads(uh, gs_s, c_s, gl_s, J, D, lane);
      weight = gl_s;
    }
    for (int jd = lane; jd < JD; jd += kWarpSize) sum_s[jd] += weight[jd / D] * uh[jd];
    __syncwarp();  // uh, c_s, gl_s are rewritten for the next capsule
  }

  if (active) {
    acc* out = partial + (static_cast<int64_t>(blockIdx.y) * B + b) * JD;
    for (int jd = lane; jd < JD; jd += kWarpSize) out[jd] = sum_s[jd];
  }
}

// s^r = sum over chunks + bias; v^r = squash(s^r); V^(r+1) = V^r + v^r, or the output v at
// the last iteration. One thread per (b, j); chunks summed in a fixed order.
template <typename scalar_t>
__global__ void routing_squash_kernel(const acc_t<scalar_t>* __restrict__ partial,  // [num_chunks, B, JD]
                                      int64_t num_chunks,
                                      const scalar_t* __restrict__ bias,            // [JD] or null
                                      acc_t<scalar_t>* __restrict__ s_r,            // [B, JD] out
                                      const acc_t<scalar_t>* __restrict__ V_r,      // [B, JD]
                                      acc_t<scalar_t>* __restrict__ V_next,         // [B, JD] out, or null
                                      scalar_t* __restrict__ v_out,                 // [B, JD] out, or null
                                      int64_t B, int J, int D) {
  using acc = acc_t<scalar_t>;
  const int64_t JD = static_cast<int64_t>(J) * D;
  const int64_t n = B * J;
  const int64_t chunk_stride = B * JD;
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < n;
       idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t j = idx % J;
    const int64_t base = idx * D;  // (b * J + j) * D
    acc sq = 0;
    for (int d = 0; d < D; ++d) {
      acc s = 0;
      for (int64_t c = 0; c < num_chunks; ++c) s += partial[c * chunk_stride + base + d];
      if (bias != nullptr) s += load_as<acc>(bias + j * D + d);
      s_r[base + d] = s;
      sq += s * s;
    }
    const acc norm = sqrt_acc(max_acc(sq, tiny_normal<acc>()));
    const acc scale = norm / (acc(1) + sq);
    for (int d = 0; d < D; ++d) {
      const acc v = s_r[base + d] * scale;
      if (V_next != nullptr) V_next[base + d] = V_r[base + d] + v;
      if (v_out != nullptr) store_from(v_out + base + d, v);
    }
  }
}

// Squash backward. With q = |s|^2, n = sqrt(max(q, tiny)), v = s n / (1 + q):
//   gs = n / (1 + q) gv + coef <s, gv> s,  coef = (1 - q) / (n (1 + q)^2)   (q >= tiny)
//                                           coef = -2 n / (1 + q)^2        (q < tiny: clamped)
// gv = G (gradient reaching v^r through later iterations' logits) + grad_v (last iteration).
template <typename scalar_t>
__global__ void squash_backward_kernel(const acc_t<scalar_t>* __restrict__ s_r,  // [B, JD]
                                       const scalar_t* __restrict__ grad_v,      // [B, JD] or null
                                       const acc_t<scalar_t>* __restrict__ G,    // [B, JD] or null
                                       acc_t<scalar_t>* __restrict__ gs_r,       // [B, JD] out
                                       int64_t B, int J, int D) {
  using acc = acc_t<scalar_t>;
  const int64_t n = B * J;
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < n;
       idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t base = idx * D;
    acc sq = 0, dot = 0;
    for (int d = 0; d < D; ++d) {
      acc gv = 0;
      if (G != nullptr) gv += G[base + d];
      if (grad_v != nullptr) gv += load_as<acc>(grad_v + base + d);
      const acc s = s_r[base + d];
      sq += s * s;
      dot += s * gv;
    }
    const acc norm = sqrt_acc(max_acc(sq, tiny_normal<acc>()));
    const acc denom = acc(1) + sq;
    const acc h = norm / denom;
    const acc coef = sq >= tiny_normal<acc>() ? (acc(1) - sq) / (norm * denom * denom)
                                              : acc(-2) * norm / (denom * denom);
    for (int d = 0; d < D; ++d) {
      acc gv = 0;
      if (G != nullptr) gv += G[base + d];
      if (grad_v != nullptr) gv += load_as<acc>(grad_v + base + d);
      gs_r[base + d] = h * gv + coef * dot * s_r[base + d];
    }
  }
}

// G[b, jd] += sum over chunks of partial[chunk, b, jd]
template <typename acc>
__global__ void add_partials_kernel(const acc* __restrict__ partial, int64_t num_chunks, acc* __restrict__ G,
                                    int64_t n) {
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < n;
       idx += (int64_t)gridDim.x * blockDim.x) {
    acc sum = G[idx];
    for (int64_t c = 0; c < num_chunks; ++c) sum += partial[c * n + idx];
    G[idx] = sum;
  }
}

// Final gradient sweep, all iterations at once (r from r_begin; r_begin = R - 1 with
// detach_inner, where only the last weighted sum carries gradient):
//   gu_ij = sum_r [ c^r_ij gs^r_j + gl^r_ij V^r_j ]     (gl^r = 0 for r = 0 or detach_inner)
// Given u_hat: grad_u_hat = gu. Fused: du_i = sum_j W_ij^T gu_ij, dW_ij = sum_b gu_ij u_i^T.
template <typename scalar_t, bool kRecompute>
__global__ void __launch_bounds__(kGradThreads)
routing_grad_kernel(const scalar_t* __restrict__ u_hat,        // [B, I, JD] (given)
                    const scalar_t* __restrict__ u,            // [B, I, K] (recompute)
                    const scalar_t* __restrict__ W,            // [I, JD, K] (recompute)
                    const acc_t<scalar_t>* __restrict__ V_all,   // [R, B, JD]
                    const acc_t<scalar_t>* __restrict__ gs_all,  // [R, B, JD]
                    scalar_t* __restrict__ grad_u_hat,         // [B, I, JD] out (given)
                    scalar_t* __restrict__ du,                 // [B, I, K] out (recompute)
                    scalar_t* __restrict__ dW,                 // [I, JD, K] out (recompute)
                    int64_t B, int64_t I, int J, int D, int K, int R, int r_begin,
                    int64_t samples_per_block, bool leaky) {
  using acc = acc_t<scalar_t>;
  CAPSNET_DYNAMIC_SMEM(smem_raw);
  acc* smem = reinterpret_cast<acc*>(smem_raw);
  const int JD = J * D;
  const int JDK = JD * K;
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t i = blockIdx.x;

  acc* W_s = smem;                                           // [K, JD], recompute only
  acc* dW_s = W_s + (kRecompute ? JDK : 0);                  // [kGradWarps, K, JD], recompute only
  acc* scratch = dW_s + (kRecompute ? kGradWarps * JDK : 0) + warp * (2 * JD + 2 * J + K);
  acc* uh = scratch;     // [JD]
  acc* gu = uh + JD;     // [JD]
  acc* c_s = gu + JD;    // [J]
  acc* gl_s = c_s + J;   // [J]
  acc* u_s = gl_s + J;   // [K]

  if (kRecompute) {
    stage_transposed(W + i * JDK, W_s, JD, K, threadIdx.x, kGradThreads);
    for (int e = threadIdx.x; e < kGradWarps * JDK; e += kGradThreads) dW_s[e] = 0;
    __syncthreads();
  }
  acc* dW_w = dW_s + warp * JDK;  // this warp's share of dW[i]

  const int64_t b_begin = static_cast<int64_t>(blockIdx.y) * samples_per_block;
  const int64_t b_end = min(B, b_begin + samples_per_block);
  const int64_t rstride = B * JD;
  for (int64_t b = b_begin + warp; b < b_end; b += kGradWarps) {
    const int64_t bi = b * I + i;
    load_prediction<scalar_t, acc, kRecompute>(u_hat, u, W_s, u_s, uh, bi, JD, K, lane);
    for (int jd = lane; jd < JD; jd += kWarpSize) gu[jd] = 0;
    for (int r = r_begin; r < R; ++r) {
      const acc* V = V_all + r * rstride + b * JD;
      const acc* gs = gs_all + r * rstride + b * JD;
      couplings(uh, V, c_s, J, D, leaky, lane);
      const bool through_logits = r > 0 && r_begin == 0;
      if (through_logits) logit_grads(uh, gs, c_s, gl_s, J, D, lane);
      for (int jd = lane; jd < JD; jd += kWarpSize) {
        const int j = jd / D;
        acc g = c_s[j] * gs[jd];
        if (through_logits) g += gl_s[j] * V[jd];
        gu[jd] += g;
      }
      __syncwarp();  // c_s and gl_s are rewritten by the next iteration
    }
    if (!kRecompute) {
      for (int jd = lane; jd < JD; jd += kWarpSize) store_from(grad_u_hat + bi * JD + jd, gu[jd]);
    } else {
      for (int k = 0; k < K; ++k) {
        acc part = 0;
        for (int jd = lane; jd < JD; jd += kWarpSize) part += W_s[k * JD + jd] * gu[jd];
        part = warp_sum(part);
        if (lane == 0) store_from(du + bi * K + k, part);
      }
      for (int jd = lane; jd < JD; jd += kWarpSize) {
        const acc g = gu[jd];
        for (int k = 0; k < K; ++k) dW_w[k * JD + jd] += g * u_s[k];
      }
    }
    __syncwarp();  // uh, gu, u_s are rewritten for the next sample
  }

  if (kRecompute) {
    __syncthreads();
    for (int e = threadIdx.x; e < JDK; e += kGradThreads) {  // e = jd * K + k, coalesced store
      const int jd = e / K, k = e % K;
      acc sum = 0;
      for (int w = 0; w < kGradWarps; ++w) sum += dW_s[w * JDK + k * JD + jd];
      store_from(dW + i * JDK + e, sum);
    }
  }
}

// dbias[jd] = sum over iterations r >= r_begin and samples of gs^r[b, jd]
template <typename scalar_t>
__global__ void bias_grad_kernel(const acc_t<scalar_t>* __restrict__ gs_all,  // [R, B, JD]
                                 scalar_t* __restrict__ dbias,                // [JD]
                                 int64_t B, int64_t JD, int R, int r_begin) {
  using acc = acc_t<scalar_t>;
  for (int64_t jd = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; jd < JD;
       jd += (int64_t)gridDim.x * blockDim.x) {
    acc sum = 0;
    for (int r = r_begin; r < R; ++r)
      for (int64_t b = 0; b < B; ++b) sum += gs_all[(r * B + b) * JD + jd];
    store_from(dbias + jd, sum);
  }
}

template <typename acc>
int64_t sweep_smem_elems(int64_t J, int64_t D, int64_t K, bool recompute) {
  const int64_t JD = J * D;
  return (recompute ? JD * K : 0) + kSweepWarps * (4 * JD + 2 * J + K);
}

int64_t grad_smem_elems(int64_t J, int64_t D, int64_t K, bool recompute) {
  const int64_t JD = J * D;
  return (recompute ? (1 + kGradWarps) * JD * K : 0) + kGradWarps * (2 * JD + 2 * J + K);
}

int64_t acc_size(DType dtype) { return dtype == DType::kFloat64 ? 8 : 4; }

// Kernels needing more than the default 48 KiB of dynamic shared memory must opt in.
template <typename Kernel>
Status allow_smem(Kernel kernel, int64_t bytes, const char* name) {
  if (bytes > kDefaultSmemLimit) {
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
    if (err != cudaSuccess) return Status{static_cast<int>(err), name};
  }
  return Status{};
}

int64_t grad_samples_per_block(int64_t B, bool recompute) {
  if (recompute) return B;  // one block holds the whole batch: dW[i] without atomics
  int64_t per_block = 8 * kGradWarps;
  const int64_t groups = (B + per_block - 1) / per_block;
  if (groups > 65535) per_block = (B + 65534) / 65535;
  return per_block;
}

template <typename scalar_t, bool kRecompute>
Status forward_impl(const RoutingShape& sh, const SweepPlan& plan, const void* u_hat, const void* u, const void* W,
                    const void* bias, bool leaky, void* v, void* c, void* s_all, void* V_all, void* workspace,
                    cudaStream_t stream) {
  using acc = acc_t<scalar_t>;
  const int J = static_cast<int>(sh.J), D = static_cast<int>(sh.D), K = static_cast<int>(sh.K);
  const int64_t B = sh.B, I = sh.I, JD = sh.J * sh.D;
  const int R = sh.iterations;
  auto* s_all_p = static_cast<acc*>(s_all);
  auto* V_all_p = static_cast<acc*>(V_all);
  auto* ws = static_cast<acc*>(workspace);

  cudaError_t err = cudaMemsetAsync(V_all_p, 0, sizeof(acc) * B * JD, stream);  // V^0 = 0
  if (err != cudaSuccess) return Status{static_cast<int>(err), "cudaMemsetAsync(V_all[0])"};

  const int64_t smem = sweep_smem_elems<acc>(sh.J, sh.D, sh.K, kRecompute) * sizeof(acc);
  auto sweep = routing_sweep_kernel<scalar_t, kRecompute, false>;
  CAPSNET_RETURN_IF_ERROR(allow_smem(sweep, smem, "routing_sweep_kernel (shared memory opt-in)"));
  const dim3 grid(static_cast<unsigned>((B + kSweepWarps - 1) / kSweepWarps), static_cast<unsigned>(plan.num_chunks));
  for (int r = 0; r < R; ++r) {
    const bool last = r == R - 1;
    acc* V_r = V_all_p + r * B * JD;
    CAPSNET_LAUNCH(sweep, grid, kSweepThreads, smem, stream)(
        static_cast<const scalar_t*>(u_hat), static_cast<const scalar_t*>(u), static_cast<const scalar_t*>(W), V_r,
        nullptr, last ? static_cast<scalar_t*>(c) : nullptr, ws, B, I, J, D, K, plan.caps_per_chunk, leaky);
    CAPSNET_CHECK_LAUNCH("routing_sweep_kernel");
    CAPSNET_LAUNCH(routing_squash_kernel<scalar_t>, grid_for(B * J, kElemThreads), kElemThreads, 0, stream)(
        ws, plan.num_chunks, static_cast<const scalar_t*>(bias), s_all_p + r * B * JD, V_r,
        last ? nullptr : V_r + B * JD, last ? static_cast<scalar_t*>(v) : nullptr, B, J, D);
    CAPSNET_CHECK_LAUNCH("routing_squash_kernel");
  }
  return Status{};
}

template <typename scalar_t, bool kRecompute>
Status backward_impl(const RoutingShape& sh, const SweepPlan& plan, const void* grad_v, const void* u_hat,
                     const void* u, const void* W, const void* s_all, const void* V_all, bool leaky,
                     bool detach_inner, void* grad_u_hat, void* du, void* dW, void* dbias, void* gs_all, void* G,
                     void* workspace, cudaStream_t stream) {
  using acc = acc_t<scalar_t>;
  const int J = static_cast<int>(sh.J), D = static_cast<int>(sh.D), K = static_cast<int>(sh.K);
  const int64_t B = sh.B, I = sh.I, JD = sh.J * sh.D;
  const int R = sh.iterations;
  const int r_begin = detach_inner ? R - 1 : 0;
  const auto* s_all_p = static_cast<const acc*>(s_all);
  const auto* V_all_p = static_cast<const acc*>(V_all);
  auto* gs_all_p = static_cast<acc*>(gs_all);
  auto* G_p = static_cast<acc*>(G);
  auto* ws = static_cast<acc*>(workspace);

  const bool through_logits = !detach_inner && R > 1;
  if (through_logits) {
    cudaError_t err = cudaMemsetAsync(G_p, 0, sizeof(acc) * B * JD, stream);
    if (err != cudaSuccess) return Status{static_cast<int>(err), "cudaMemsetAsync(G)"};
  }
  const int64_t sweep_smem = sweep_smem_elems<acc>(sh.J, sh.D, sh.K, kRecompute) * sizeof(acc);
  auto sweep = routing_sweep_kernel<scalar_t, kRecompute, true>;
  if (through_logits) {
    CAPSNET_RETURN_IF_ERROR(allow_smem(sweep, sweep_smem, "routing_sweep_kernel (shared memory opt-in)"));
  }
  const dim3 sweep_grid(static_cast<unsigned>((B + kSweepWarps - 1) / kSweepWarps),
                        static_cast<unsigned>(plan.num_chunks));

  // Reverse sweeps: r = R-1 .. r_begin. G holds dL/dV^(r+1) summed over later iterations.
  for (int r = R - 1; r >= r_begin; --r) {
    acc* gs_r = gs_all_p + r * B * JD;
    CAPSNET_LAUNCH(squash_backward_kernel<scalar_t>, grid_for(B * J, kElemThreads), kElemThreads, 0, stream)(
        s_all_p + r * B * JD, r == R - 1 ? static_cast<const scalar_t*>(grad_v) : nullptr,
        r < R - 1 ? G_p : nullptr, gs_r, B, J, D);
    CAPSNET_CHECK_LAUNCH("squash_backward_kernel");
    if (through_logits && r > 0) {  // V^0 = 0 passes nothing on
      CAPSNET_LAUNCH(sweep, sweep_grid, kSweepThreads, sweep_smem, stream)(
          static_cast<const scalar_t*>(u_hat), static_cast<const scalar_t*>(u), static_cast<const scalar_t*>(W),
          V_all_p + r * B * JD, gs_r, nullptr, ws, B, I, J, D, K, plan.caps_per_chunk, leaky);
      CAPSNET_CHECK_LAUNCH("routing_sweep_kernel (reverse)");
      CAPSNET_LAUNCH(add_partials_kernel<acc>, grid_for(B * JD, kElemThreads), kElemThreads, 0, stream)(ws, plan.num_chunks,
                                                                                         G_p, B * JD);
      CAPSNET_CHECK_LAUNCH("add_partials_kernel");
    }
  }

  // Final gradient sweep.
  const int64_t grad_smem = grad_smem_elems(sh.J, sh.D, sh.K, kRecompute) * sizeof(acc);
  auto grad = routing_grad_kernel<scalar_t, kRecompute>;
  CAPSNET_RETURN_IF_ERROR(allow_smem(grad, grad_smem, "routing_grad_kernel (shared memory opt-in)"));
  const int64_t per_block = grad_samples_per_block(B, kRecompute);
  const dim3 grad_grid(static_cast<unsigned>(I), static_cast<unsigned>((B + per_block - 1) / per_block));
  CAPSNET_LAUNCH(grad, grad_grid, kGradThreads, grad_smem, stream)(
      static_cast<const scalar_t*>(u_hat), static_cast<const scalar_t*>(u), static_cast<const scalar_t*>(W), V_all_p,
      gs_all_p, static_cast<scalar_t*>(grad_u_hat), static_cast<scalar_t*>(du), static_cast<scalar_t*>(dW), B, I, J, D,
      K, R, r_begin, per_block, leaky);
  CAPSNET_CHECK_LAUNCH("routing_grad_kernel");

  if (dbias != nullptr) {
    CAPSNET_LAUNCH(bias_grad_kernel<scalar_t>, grid_for(JD, kElemThreads), kElemThreads, 0, stream)(
        gs_all_p, static_cast<scalar_t*>(dbias), B, JD, R, r_begin);
    CAPSNET_CHECK_LAUNCH("bias_grad_kernel");
  }
  return Status{};
}

}  // namespace

int64_t sweep_smem_bytes(DType dtype, int64_t J, int64_t D, int64_t K, bool recompute) {
  return sweep_smem_elems<float>(J, D, K, recompute) * acc_size(dtype);
}

int64_t grad_smem_bytes(DType dtype, int64_t J, int64_t D, int64_t K, bool recompute) {
  return grad_smem_elems(J, D, K, recompute) * acc_size(dtype);
}

Status routing_forward(DType dtype, const RoutingShape& shape, const SweepPlan& plan, const void* u_hat,
                       const void* u, const void* W, const void* bias, bool leaky, void* v, void* c, void* s_all,
                       void* V_all, void* workspace, void* stream) {
  return dispatch_dtype(dtype, [&](auto* tag) -> Status {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    if (u_hat == nullptr)
      return forward_impl<scalar_t, true>(shape, plan, u_hat, u, W, bias, leaky, v, c, s_all, V_all, workspace,
                                          static_cast<cudaStream_t>(stream));
    return forward_impl<scalar_t, false>(shape, plan, u_hat, u, W, bias, leaky, v, c, s_all, V_all, workspace,
                                         static_cast<cudaStream_t>(stream));
  });
}

Status routing_backward(DType dtype, const RoutingShape& shape, const SweepPlan& plan, const void* grad_v,
                        const void* u_hat, const void* u, const void* W, const void* s_all, const void* V_all,
                        bool leaky, bool detach_inner, void* grad_u_hat, void* du, void* dW, void* dbias,
                        void* gs_all, void* G, void* workspace, void* stream) {
  return dispatch_dtype(dtype, [&](auto* tag) -> Status {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    if (u_hat == nullptr)
      return backward_impl<scalar_t, true>(shape, plan, grad_v, u_hat, u, W, s_all, V_all, leaky, detach_inner,
                                           grad_u_hat, du, dW, dbias, gs_all, G, workspace,
                                           static_cast<cudaStream_t>(stream));
    return backward_impl<scalar_t, false>(shape, plan, grad_v, u_hat, u, W, s_all, V_all, leaky, detach_inner,
                                          grad_u_hat, du, dW, dbias, gs_all, G, workspace,
                                          static_cast<cudaStream_t>(stream));
  });
}

}  // namespace capsnet
