// The routing kernels and their launch templates, shared by the translation units that
// instantiate them (routing.cu: one sample per lane; routing_lanes2.cu: two). Included only
// by those two files; everything here has internal linkage.
#pragma once

// Dynamic routing by agreement, forward and backward, on a given u_hat (dynamic_routing) or
// on u and W with u_hat recomputed in every sweep and never stored (capsule_routing).
//
// The algorithm (docs/cuda-backend.md, and the design note on fused routing): iteration r
// needs only V^r = v^0 + ... + v^(r-1) (J*D numbers per sample), since the logits after r
// agreement updates are prior_ij + <u_hat_ij, V^r_j>. Each iteration is one sweep over the
// input capsules that reduces s^r_j = sum_i c^r_ij u_hat_ij; the backward runs reverse sweeps
// that reduce dL/dV^r = sum_i gl^r_ij u_hat_ij, then one gradient sweep.
//
// Tiling (RoutingPlan in capsnet_kernels.h, a function of the shape only): a grid of
// (sample tiles of up to 32 samples) x (chunks of input capsules), 256 threads per block in
// groups of G lanes (G = 16 for J <= 16, else 32), lane j of a group owning output capsule j.
// A block stages the W slices of its chunk in shared memory once (128-bit loads) and every
// group walks its samples of the tile through them one after another, keeping u_hat_ij, V_j
// (and gs_j) and the partial sum of its sample in registers; the softmax over j is a shuffle
// butterfly inside the group. With RoutingPlan::lane_samples = 2 (Config::kS) a group takes
// two samples per pass and each lane keeps both samples' state, so every staged W element it
// reads feeds two products; the results are bitwise those of one sample per lane. Partial sums of the chunks are reduced by a tree of fixed shape
// whose nodes are summed, children in index order, by the last block to arrive (atomic
// ticket); the root block adds the bias and squashes (forward) or accumulates dL/dV and runs
// the squash backward of the previous iteration (reverse). So results do not depend on block
// timing or on the device.
//
// Kernels:
//   routing_forward_sweep_kernel   one per iteration: partial s, tree, bias + squash, V^(r+1)
//   routing_reverse_sweep_kernel   r = R-1 .. 1: partial dL/dV^r, tree, G += .., gs^(r-1)
//   routing_grad_kernel            all iterations at once: grad_u_hat, or du and the tile's
//                                  dW (summed over its samples in registers); dprior; the
//                                  tiles' dW / dprior combined by a tree in tile order
//   routing_bias_grad_kernel       dbias = sum over r and b of gs^r (only with a bias)
// Each comes as compile-time instances for Din in {4, 8, 16}, Dout in {8, 16, 32}, J <= 32
// (G = 16 or 32) and as a generic instance with runtime sizes whose per-lane state lives in
// shared memory and whose lanes loop over J in steps of 32; the instances with Dout <= 16 and
// float accumulation also come with two samples per lane (routing_lanes2.cu).
#include "common.cuh"

namespace capsnet {
namespace {

constexpr int kThreads = kRoutingThreads;
constexpr int kTicketBytes = 16;   // the block's reduction ticket, ahead of the shared arrays
constexpr int kBiasColumns = 32;   // bias gradient: output elements per block
constexpr int kBiasParts = kThreads / kBiasColumns;

// Compile-time sizes of a kernel instance: Din (0 = runtime), Dout (0 = runtime: the generic
// instance), lanes per sample, and samples per group pass (RoutingPlan::lane_samples): with
// kS > 1 every lane carries kS samples at once, so each W element it reads from shared memory
// feeds kS products and the kS softmaxes give the scheduler independent work. Each sample's
// arithmetic is the same sequence of operations in every kS, so the results are bitwise equal.
template <int kK_, int kD_, int kG_, int kS_ = 1>
struct Config {
  static constexpr int kK = kK_, kD = kD_, kG = kG_, kS = kS_;
  static constexpr bool kGeneric = kD_ == 0;
  static_assert(kS_ == 1 || kD_ > 0, "the generic instance carries one sample per lane");
};

// Padding (elements) after each staged W row of the specialised kernels: 16 bytes, so the rows
// of lanes j, j+1, ... start in different bank quads and 128-bit reads are conflict free.
template <typename acc> __host__ __device__ constexpr int row_pad() { return 16 / static_cast<int>(sizeof(acc)); }

// Per-lane state records of the generic kernel: uh, V, gs, sum, gu (D each), z, c, gl, gp.
__host__ __device__ constexpr int generic_record(int D) { return 5 * D + 4; }

template <typename scalar_t>
struct RoutingArgs {
  using acc = acc_t<scalar_t>;
  const scalar_t* u_hat = nullptr;  // [B, I, J, D] (given form)
  const scalar_t* u = nullptr;      // [B, I, K] (fused form)
  const scalar_t* W = nullptr;      // [I, J, D, K] (fused form)
  const scalar_t* prior = nullptr;  // [I, J] or null
  const scalar_t* bias = nullptr;   // [J, D] or null
  int64_t B = 0, I = 0;
  int J = 0, D = 0, K = 0;
  int tile_samples = 0, slots = 1;
  int64_t caps_per_chunk = 0;
  bool leaky = false;
  acc inv_temperature = 1;
  // sweeps
  const acc* V_r = nullptr;       // V^r [B, J, D]; null at r = 0 (V^0 = 0)
  acc* V_zero = nullptr;          // forward r = 0: V_all[0], zeroed by the chunk-0 blocks
  acc* s_out = nullptr;           // forward root: s^r
  acc* V_next = nullptr;          // forward root: V^(r+1), or null at the last iteration
  scalar_t* v_out = nullptr;      // forward root: v, at the last iteration
  scalar_t* c_out = nullptr;      // couplings of the last iteration, or null
  const acc* s_r = nullptr;       // reverse: s^r
  const scalar_t* grad_v = nullptr;  // first reverse sweep (or grad without reverse sweeps): gs from dL/dv
  acc* gs_r = nullptr;            // reverse: gs^r (read, or written by chunk 0 when grad_v is given)
  acc* G = nullptr;               // reverse root: dL/dV summed over later iterations
  bool G_first = false;           // G is not yet written (treated as 0)
  const acc* s_prev = nullptr;    // reverse root: s^(r-1)
  acc* gs_prev = nullptr;         // reverse root: gs^(r-1)
  // gradient sweep
  const acc* V_all = nullptr;     // [R, B, J, D]
  acc* gs_all = nullptr;          // [R, B, J, D]
  const acc* s_last = nullptr;    // s^(R-1), with grad_v when no reverse sweep ran
  int R = 1, r_begin = 0;
  bool through_logits = false;    // later iterations' gradient flows through the logits
  scalar_t* grad_u_hat = nullptr;
  scalar_t* du = nullptr;
  scalar_t* dW = nullptr;
  scalar_t* dprior = nullptr;
  int64_t grad_record = 0;
  // reductions
  acc* ws = nullptr;
  unsigned* counters = nullptr;
  ReductionTree tree;
};

// ---- per-lane state ---------------------------------------------------------------------
// Specialised: one output capsule per lane, everything in registers. A lane carrying kS samples
// holds kS of these (one per sample).
template <typename acc, typename Cfg, bool kGeneric = Cfg::kGeneric>
struct LaneState {
  acc uh_[Cfg::kD], V_[Cfg::kD], gs_[Cfg::kD], sum_[Cfg::kD], gu_[Cfg::kD];
  acc z_, c_, gl_, gp_;
  __device__ __forceinline__ void init(acc*, int, int, int, int, int) {}
  __device__ __forceinline__ acc* uh(int) { return uh_; }
  __device__ __forceinline__ acc* V(int) { return V_; }
  __device__ __forceinline__ acc* gs(int) { return gs_; }
  __device__ __forceinline__ acc* sum(int) { return sum_; }
  __device__ __forceinline__ acc* gu(int) { return gu_; }
  __device__ __forceinline__ acc& z(int) { return z_; }
  __device__ __forceinline__ acc& c(int) { return c_; }
  __device__ __forceinline__ acc& gl(int) { return gl_; }
  __device__ __forceinline__ acc& gp(int) { return gp_; }
};

// Generic: `slots` output capsules per lane (j = lane + 32 t), records in shared memory.
template <typename acc, typename Cfg>
struct LaneState<acc, Cfg, true> {
  acc* base;
  int D, step;
  __device__ __forceinline__ void init(acc* scratch, int group, int lane, int slots, int D_, int) {
    base = scratch + (static_cast<int64_t>(group) * slots * 32 + lane) * generic_record(D_);
    D = D_;
    step = 32 * generic_record(D_);
  }
  __device__ __forceinline__ acc* rec(int t) { return base + static_cast<int64_t>(t) * step; }
  __device__ __forceinline__ acc* uh(int t) { return rec(t); }
  __device__ __forceinline__ acc* V(int t) { return rec(t) + D; }
  __device__ __forceinline__ acc* gs(int t) { return rec(t) + 2 * D; }
  __device__ __forceinline__ acc* sum(int t) { return rec(t) + 3 * D; }
  __device__ __forceinline__ acc* gu(int t) { return rec(t) + 4 * D; }
  __device__ __forceinline__ acc& z(int t) { return rec(t)[5 * D]; }
  __device__ __forceinline__ acc& c(int t) { return rec(t)[5 * D + 1]; }
  __device__ __forceinline__ acc& gl(int t) { return rec(t)[5 * D + 2]; }
  __device__ __forceinline__ acc& gp(int t) { return rec(t)[5 * D + 3]; }
};

// Squash backward of one row. With q = |s|^2, n = sqrt(max(q, tiny)), v = s n / (1 + q):
//   gs = n / (1 + q) gv + coef <s, gv> s,  coef = (1 - q) / (n (1 + q)^2)   (q >= tiny)
//                                           coef = -2 n / (1 + q)^2        (q < tiny: clamped)
// gv = gv_acc + gv_in (either may be null). out may alias nothing else.
template <int kD, typename acc, typename scalar_t>
__device__ __forceinline__ void squash_backward_row(const acc* s, const acc* gv_acc, const scalar_t* gv_in, acc* out,
                                                    int D_rt) {
  const int D = kD > 0 ? kD : D_rt;
  acc sq = 0, dot = 0;
#pragma unroll
  for (int d = 0; d < D; ++d) {
    acc gv = 0;
    if (gv_acc != nullptr) gv += gv_acc[d];
    if (gv_in != nullptr) gv += load_as<acc>(gv_in + d);
    const acc x = s[d];
    sq += x * x;
    dot += x * gv;
    out[d] = gv;
  }
  const acc norm = sqrt_acc(max_acc(sq, tiny_normal<acc>()));
  const acc denom = acc(1) + sq;
  const acc h = norm / denom;
  const acc coef = sq >= tiny_normal<acc>() ? (acc(1) - sq) / (norm * denom * denom) : acc(-2) * norm / (denom * denom);
#pragma unroll
  for (int d = 0; d < D; ++d) out[d] = h * out[d] + coef * dot * s[d];
}

// Reads a row of D routing-state values (V, gs: accumulation type, written by these kernels, so
// 16-byte aligned at every row of a specialised size) into registers: 128-bit loads when the
// row length is known and a multiple of the vector, one element at a time otherwise. The
// gradient sweep reads V and gs of every iteration for every (sample, capsule), so this is
// most of its traffic through L1 after the staged W.
template <int kD, typename acc>
__device__ __forceinline__ void load_state_row(const acc* __restrict__ src, acc* dst, int D_rt) {
  if constexpr (kD > 0 && kD % (16 / static_cast<int>(sizeof(acc))) == 0) {
    using vec_t = typename std::conditional<std::is_same<acc, float>::value, float4, double2>::type;
    constexpr int kVec = 16 / static_cast<int>(sizeof(acc));
    const vec_t* v = reinterpret_cast<const vec_t*>(src);
#pragma unroll
    for (int q = 0; q < kD / kVec; ++q) {
      const vec_t x = __ldg(v + q);
      if constexpr (kVec == 4) {
        dst[4 * q] = x.x, dst[4 * q + 1] = x.y, dst[4 * q + 2] = x.z, dst[4 * q + 3] = x.w;
      } else {
        dst[2 * q] = x.x, dst[2 * q + 1] = x.y;
      }
    }
  } else {
    const int D = kD > 0 ? kD : D_rt;
#pragma unroll
    for (int d = 0; d < D; ++d) dst[d] = __ldg(src + d);
  }
}

// Copies the W slices of a chunk ([rows, DK] in global memory, rows = capsules * J) into
// shared memory rows of `row` elements, converting to the accumulation type; 128-bit loads
// for float32 and float64 when the source is 16-byte aligned.
template <typename scalar_t, typename acc>
__device__ __forceinline__ void stage_rows(const scalar_t* __restrict__ src, acc* dst, int rows, int DK, int row) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(scalar_t));
  if constexpr (std::is_same<scalar_t, float>::value || std::is_same<scalar_t, double>::value) {
    using vec_t = typename std::conditional<std::is_same<scalar_t, float>::value, float4, double2>::type;
    if (DK % kVec == 0 && row % kVec == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0) {
      const int per_row = DK / kVec;
      const vec_t* src_v = reinterpret_cast<const vec_t*>(src);
      for (int e = threadIdx.x; e < rows * per_row; e += kThreads) {
        const int r = e / per_row, q = e - r * per_row;
        *reinterpret_cast<vec_t*>(dst + r * row + q * kVec) = src_v[e];
      }
      return;
    }
  }
  for (int e = threadIdx.x; e < rows * DK; e += kThreads) {
    const int r = e / DK, q = e - r * DK;
    dst[r * row + q] = load_as<acc>(src + e);
  }
}

// u_hat_ij of every slot of the lane: recomputed from the staged W rows of capsule ci and
// u[b, i] (fused), or loaded (given).
template <typename scalar_t, typename Cfg, bool kRecompute, typename State>
__device__ __forceinline__ void load_predictions(const RoutingArgs<scalar_t>& a, State& st, const acc_t<scalar_t>* W_s,
                                                 int ci, int64_t b, int64_t i, int lane, int slots, int row) {
  using acc = acc_t<scalar_t>;
  constexpr int G = Cfg::kG;
  const int D = Cfg::kD > 0 ? Cfg::kD : a.D;
  const int K = Cfg::kK > 0 ? Cfg::kK : a.K;
  const int J = a.J;
  if constexpr (kRecompute) {
    const scalar_t* ui = a.u + (b * a.I + i) * K;
    if constexpr (!Cfg::kGeneric) {
      acc ur[Cfg::kK];
#pragma unroll
      for (int k = 0; k < Cfg::kK; ++k) ur[k] = load_as<acc>(ui + k);
      const int j = lane < J ? lane : J - 1;
      const acc* w = W_s + (ci * J + j) * row;
      acc* uh = st.uh(0);
#pragma unroll
      for (int d = 0; d < Cfg::kD; ++d) {
        acc x = 0;
        if constexpr (std::is_same<acc, float>::value && Cfg::kK % 4 == 0) {
#pragma unroll
          for (int k4 = 0; k4 < Cfg::kK / 4; ++k4) {
            const float4 w4 = *reinterpret_cast<const float4*>(w + d * Cfg::kK + 4 * k4);
            x += w4.x * ur[4 * k4];
            x += w4.y * ur[4 * k4 + 1];
            x += w4.z * ur[4 * k4 + 2];
            x += w4.w * ur[4 * k4 + 3];
          }
        } else {
#pragma unroll
          for (int k = 0; k < Cfg::kK; ++k) x += w[d * Cfg::kK + k] * ur[k];
        }
        uh[d] = x;
      }
    } else {
      for (int t = 0; t < slots; ++t) {
        const int j0 = lane + G * t;
        const int j = j0 < J ? j0 : J - 1;
        const acc* w = W_s + (ci * J + j) * row;
        acc* uh = st.uh(t);
        for (int d = 0; d < D; ++d) {
          acc x = 0;
          for (int k = 0; k < K; ++k) x += w[d * K + k] * load_as<acc>(ui + k);
          uh[d] = x;
        }
      }
    }
  } else {
    for (int t = 0; t < slots; ++t) {
      const int j0 = lane + G * t;
      const int j = j0 < J ? j0 : J - 1;
      const scalar_t* src = a.u_hat + ((b * a.I + i) * J + j) * D;
      acc* uh = st.uh(t);
#pragma unroll
      for (int d = 0; d < D; ++d) uh[d] = load_as<acc>(src + d);
    }
  }
}

// u_hat_ij of the group's kS samples b[0 .. kS-1] (Config::kS). Recomputed by a specialised
// instance, each staged W element is read once for all kS samples; every sample's sum runs
// over k in the order load_predictions uses, so each u_hat is bitwise the one-sample result.
template <typename scalar_t, typename Cfg, bool kRecompute, typename State>
__device__ __forceinline__ void load_group_predictions(const RoutingArgs<scalar_t>& a, State* st,
                                                       const acc_t<scalar_t>* W_s, int ci, const int64_t* b,
                                                       int64_t i, int lane, int slots, int row) {
  using acc = acc_t<scalar_t>;
  constexpr int kS = Cfg::kS;
  if constexpr (kRecompute && !Cfg::kGeneric && kS > 1) {
    acc ur[kS][Cfg::kK];
#pragma unroll
    for (int p = 0; p < kS; ++p) {
      const scalar_t* ui = a.u + (b[p] * a.I + i) * Cfg::kK;
#pragma unroll
      for (int k = 0; k < Cfg::kK; ++k) ur[p][k] = load_as<acc>(ui + k);
    }
    const int j = lane < a.J ? lane : a.J - 1;
    const acc* w = W_s + (ci * a.J + j) * row;
#pragma unroll
    for (int d = 0; d < Cfg::kD; ++d) {
      acc x[kS];
#pragma unroll
      for (int p = 0; p < kS; ++p) x[p] = 0;
      if constexpr (std::is_same<acc, float>::value && Cfg::kK % 4 == 0) {
#pragma unroll
        for (int k4 = 0; k4 < Cfg::kK / 4; ++k4) {
          const float4 w4 = *reinterpret_cast<const float4*>(w + d * Cfg::kK + 4 * k4);
#pragma unroll
          for (int p = 0; p < kS; ++p) {
            x[p] += w4.x * ur[p][4 * k4];
            x[p] += w4.y * ur[p][4 * k4 + 1];
            x[p] += w4.z * ur[p][4 * k4 + 2];
            x[p] += w4.w * ur[p][4 * k4 + 3];
          }
        }
      } else {
#pragma unroll
        for (int k = 0; k < Cfg::kK; ++k) {
          const acc wk = w[d * Cfg::kK + k];
#pragma unroll
          for (int p = 0; p < kS; ++p) x[p] += wk * ur[p][k];
        }
      }
#pragma unroll
      for (int p = 0; p < kS; ++p) st[p].uh(0)[d] = x[p];
    }
  } else {
#pragma unroll
    for (int p = 0; p < kS; ++p) load_predictions<scalar_t, Cfg, kRecompute>(a, st[p], W_s, ci, b[p], i, lane, slots, row);
  }
}

// c_ij = softmax over j of (prior_ij + <u_hat_ij, V_j>) * inv_temperature for every slot;
// leaky routing adds a constant zero logit that enters only the normalisation. V == false:
// V = 0 (the first iteration). All lanes of the group take part.
template <typename scalar_t, typename Cfg, typename State>
__device__ __forceinline__ void couplings(const RoutingArgs<scalar_t>& a, State& st, bool with_V, int64_t i, int lane,
                                          int slots) {
  using acc = acc_t<scalar_t>;
  constexpr int G = Cfg::kG;
  const int D = Cfg::kD > 0 ? Cfg::kD : a.D;
  const int J = a.J;
  acc m = static_cast<acc>(-INFINITY);
  for (int t = 0; t < slots; ++t) {
    const int j = lane + G * t;
    acc z = 0;
    if (with_V) {
      const acc* uh = st.uh(t);
      const acc* V = st.V(t);
#pragma unroll
      for (int d = 0; d < D; ++d) z += uh[d] * V[d];
    }
    if (a.prior != nullptr) z += load_as<acc>(a.prior + i * J + (j < J ? j : J - 1));
    z *= a.inv_temperature;
    if (j >= J) z = static_cast<acc>(-INFINITY);
    st.z(t) = z;
    m = max_acc(m, z);
  }
  m = group_max<G>(m);
  if (a.leaky) m = max_acc(m, acc(0));
  acc total = 0;
  for (int t = 0; t < slots; ++t) {
    const int j = lane + G * t;
    const acc e = j < J ? exp_acc(st.z(t) - m) : acc(0);
    st.c(t) = e;
    total += e;
  }
  total = group_sum<G>(total);
  if (a.leaky) total += exp_acc(-m);
  const acc inv = acc(1) / total;
  for (int t = 0; t < slots; ++t) st.c(t) *= inv;
}

// Softmax backward for every slot: gc_j = <gs_j, u_hat_ij>, gl_j = c_j (gc_j - sum_k c_k gc_k)
// * inv_temperature (the gradient of the unscaled logits; the sum runs over real outputs).
template <typename scalar_t, typename Cfg, typename State>
__device__ __forceinline__ void logit_grads(const RoutingArgs<scalar_t>& a, State& st, int lane, int slots) {
  using acc = acc_t<scalar_t>;
  constexpr int G = Cfg::kG;
  const int D = Cfg::kD > 0 ? Cfg::kD : a.D;
  acc tot = 0;
  for (int t = 0; t < slots; ++t) {
    const acc* uh = st.uh(t);
    const acc* gs = st.gs(t);
    acc gc = 0;
#pragma unroll
    for (int d = 0; d < D; ++d) gc += gs[d] * uh[d];
    if (lane + G * t >= a.J) gc = 0;
    st.gl(t) = gc;
    tot += st.c(t) * gc;
  }
  tot = group_sum<G>(tot);
  for (int t = 0; t < slots; ++t) st.gl(t) = st.c(t) * (st.gl(t) - tot) * a.inv_temperature;
}

// Element e of nodes [first, first + count) of a level buffer (count <= kTreeFanIn), summed in
// child order. The loads are all issued before the first add (a fixed-length, predicated loop),
// so the block that sums a node waits for one round trip to L2 instead of one per child: the
// other blocks of the sweep have finished by then, and this is the sweep's serial tail.
template <typename acc>
__device__ __forceinline__ acc sum_children(const acc* src, int64_t first, int64_t count, int64_t stride, int64_t e) {
  acc part[kTreeFanIn];
#pragma unroll
  for (int ch = 0; ch < kTreeFanIn; ++ch) part[ch] = ch < count ? __ldcg(src + (first + ch) * stride + e) : acc(0);
  acc x = 0;
#pragma unroll
  for (int ch = 0; ch < kTreeFanIn; ++ch) {
    if (ch < count) x += part[ch];
  }
  return x;
}

// Children sums of the n <= kSumBatch elements e, e + step, ...: all their loads are issued
// before any result is used (the callers store between elements, which the compiler may not
// move loads across), so a block summing a node waits for one round trip to L2 per kSumBatch
// elements instead of one per element. Each element's sum is sum_children's.
constexpr int kSumBatch = 4;
template <typename acc>
__device__ __forceinline__ void sum_children_batch(const acc* src, int64_t first, int64_t count, int64_t stride,
                                                   int64_t e, int64_t step, int n, acc* out) {
#pragma unroll
  for (int q = 0; q < kSumBatch; ++q) out[q] = q < n ? sum_children(src, first, count, stride, e + q * step) : acc(0);
}

// How many of e, e + step, ... (at most kSumBatch) lie below hi.
__device__ __forceinline__ int batch_count(int64_t e, int64_t hi, int64_t step) {
  const int64_t left = (hi - e + step - 1) / step;
  return left < kSumBatch ? static_cast<int>(left) : kSumBatch;
}

// Arrival of a block at the reduction tree (see ReductionTree). The block's leaf has been
// written (leaf index `leaf` for key `key`, elements [lo, hi) of each node). Returns false in
// blocks that are not the last at some node (they are done); in the block that reaches the
// root it returns true with the root's children: nodes [*first, *first + *count) of the level
// buffer *src. Intermediate nodes are summed here, children in index order.
template <typename acc>
__device__ bool arrive(const ReductionTree& tree, acc* ws, unsigned* counters, unsigned* ticket, int64_t leaf,
                       int64_t key, int64_t lo, int64_t hi, const acc** src, int64_t* first, int64_t* count) {
  int64_t node = leaf;
  *src = ws + tree.buffer_offset[0];
  *first = leaf;
  *count = 1;
  for (int l = 1; l <= tree.levels; ++l) {
    const int64_t parent = node / kTreeFanIn;
    const int64_t begin = parent * kTreeFanIn;
    const int64_t children = min(static_cast<int64_t>(kTreeFanIn), tree.nodes[l - 1] - begin);
    __threadfence();  // this thread's writes of the node are visible device-wide ...
    __syncthreads();  // ... for every thread of the block, before the ticket is taken
    if (threadIdx.x == 0) {
      unsigned* counter = counters + tree.counter_offset[l] + key * tree.nodes[l] + parent;
      const unsigned arrived = atomicAdd(counter, 1u);
      const bool last = arrived == static_cast<unsigned>(children - 1);
      if (last) *counter = 0;  // ready for the next launch on the stream
      *ticket = last ? 1u : 0u;
    }
    __syncthreads();
    const bool last = *ticket != 0;
    __syncthreads();  // everyone has read the ticket before it is rewritten
    if (!last) return false;
    __threadfence();
    const acc* level = ws + tree.buffer_offset[l - 1];
    if (l == tree.levels) {
      *src = level;
      *first = begin;
      *count = children;
      return true;
    }
    acc* out = ws + tree.buffer_offset[l] + parent * tree.stride;
    for (int64_t e = lo + threadIdx.x; e < hi; e += kThreads * kSumBatch) {
      acc x[kSumBatch];
      const int n = batch_count(e, hi, kThreads);
      sum_children_batch(level, begin, children, tree.stride, e, kThreads, n, x);
#pragma unroll
      for (int q = 0; q < kSumBatch; ++q) {
        if (q < n) out[e + q * kThreads] = x[q];
      }
    }
    node = parent;
  }
  __syncthreads();  // single leaf: the block's own writes are the root's input
  return true;
}


// ---- forward and reverse sweeps ----------------------------------------------------------
// Forward:  partial[chunk, b, j, :] = sum_{i in chunk} c_ij u_hat_ij                (c from V^r)
// Reverse:  partial[chunk, b, j, :] = sum_{i in chunk} gl_ij u_hat_ij   (gl from V^r and gs^r)
template <typename scalar_t, typename Cfg, bool kRecompute, bool kReverse>
__device__ __forceinline__ void routing_sweep(const RoutingArgs<scalar_t>& a) {
  using acc = acc_t<scalar_t>;
  constexpr int G = Cfg::kG;
  constexpr int kGroups = kThreads / G;
  const int D = Cfg::kD > 0 ? Cfg::kD : a.D;
  const int K = Cfg::kK > 0 ? Cfg::kK : a.K;
  const int J = a.J;
  const int JD = J * D;
  const int slots = Cfg::kGeneric ? a.slots : 1;
  const int row = D * K + (Cfg::kGeneric ? 0 : row_pad<acc>());
  const int64_t B = a.B;

  CAPSNET_DYNAMIC_SMEM(smem_raw);
  unsigned* ticket = reinterpret_cast<unsigned*>(smem_raw);
  acc* W_s = reinterpret_cast<acc*>(smem_raw + kTicketBytes);
  acc* scratch = W_s + (kRecompute ? a.caps_per_chunk * J * row : 0);

  const int64_t tile = blockIdx.x, chunk = blockIdx.y;
  const int64_t b0 = tile * a.tile_samples;
  const int64_t i0 = chunk * a.caps_per_chunk;
  const int nc = static_cast<int>(min(a.caps_per_chunk, a.I - i0));
  const int group = threadIdx.x / G;
  const int lane = threadIdx.x & (G - 1);
  constexpr int kS = Cfg::kS;
  LaneState<acc, Cfg> st[kS];
#pragma unroll
  for (int p = 0; p < kS; ++p) st[p].init(scratch, group, lane, slots, D, p);

  if (kRecompute) stage_rows(a.W + i0 * J * D * K, W_s, nc * J, D * K, row);
  __syncthreads();

  acc* leaf = a.ws + a.tree.buffer_offset[0] + chunk * a.tree.stride;
  // Each pass of a group takes kS samples of the tile (the same trip count in every lane).
  for (int s = group * kS; s < a.tile_samples; s += kGroups * kS) {
    int64_t b[kS];
    bool active[kS];
#pragma unroll
    for (int p = 0; p < kS; ++p) {
      active[p] = (kS == 1 || s + p < a.tile_samples) && b0 + s + p < B;  // kS = 1: s < tile_samples
      b[p] = active[p] ? b0 + s + p : B - 1;  // inactive samples compute on a real sample, store nothing
      for (int t = 0; t < slots; ++t) {
        const int j0 = lane + G * t;
        const bool valid = active[p] && j0 < J;
        const int64_t base = b[p] * JD + (j0 < J ? j0 : J - 1) * D;
        acc* V = st[p].V(t);
        acc* sum = st[p].sum(t);
        // (Element loads: once per pass, and with 128-bit loads here ptxas gave the float32
        // MNIST forward instance 80 registers and 16 bytes of spills instead of 98 and none.)
#pragma unroll
        for (int d = 0; d < D; ++d) {
          V[d] = a.V_r != nullptr ? __ldg(a.V_r + base + d) : acc(0);
          sum[d] = 0;
        }
        if (!kReverse && a.V_zero != nullptr && chunk == 0 && valid) {
          for (int d = 0; d < D; ++d) a.V_zero[base + d] = 0;
        }
        if (kReverse) {
          acc* gs = st[p].gs(t);
          if (a.grad_v != nullptr) {  // the last iteration: gs from dL/dv, computed by each lane
            squash_backward_row<Cfg::kD>(a.s_r + base, static_cast<const acc*>(nullptr), a.grad_v + base, gs, D);
            if (chunk == 0 && valid) {
              for (int d = 0; d < D; ++d) a.gs_r[base + d] = gs[d];
            }
          } else {
            load_state_row<Cfg::kD>(a.gs_r + base, gs, D);
          }
        }
      }
    }
    for (int ci = 0; ci < nc; ++ci) {
      const int64_t i = i0 + ci;
      load_group_predictions<scalar_t, Cfg, kRecompute>(a, st, W_s, ci, b, i, lane, slots, row);
#pragma unroll
      for (int p = 0; p < kS; ++p) {
        couplings<scalar_t, Cfg>(a, st[p], a.V_r != nullptr, i, lane, slots);
        if (!kReverse && a.c_out != nullptr && active[p]) {
          for (int t = 0; t < slots; ++t) {
            const int j = lane + G * t;
            if (j < J) store_from(a.c_out + (b[p] * a.I + i) * J + j, st[p].c(t));
          }
        }
        if (kReverse) logit_grads<scalar_t, Cfg>(a, st[p], lane, slots);
        for (int t = 0; t < slots; ++t) {
          const acc weight = kReverse ? st[p].gl(t) : st[p].c(t);
          const acc* uh = st[p].uh(t);
          acc* sum = st[p].sum(t);
#pragma unroll
          for (int d = 0; d < D; ++d) sum[d] += weight * uh[d];
        }
      }
    }
#pragma unroll
    for (int p = 0; p < kS; ++p) {
      for (int t = 0; t < slots; ++t) {
        const int j = lane + G * t;
        if (active[p] && j < J) {
          const acc* sum = st[p].sum(t);
          for (int d = 0; d < D; ++d) leaf[b[p] * JD + j * D + d] = sum[d];
        }
      }
    }
  }

  const acc* src;
  int64_t first, count;
  const int64_t hi = min(b0 + a.tile_samples, B);
  if (!arrive(a.tree, a.ws, a.counters, ticket, chunk, tile, b0 * JD, hi * JD, &src, &first, &count)) return;

  // Root of the tile: the chunks' sum, in chunk order.
  for (int s = group; s < a.tile_samples; s += kGroups) {
    const int64_t b = b0 + s;
    if (b >= B) break;
    for (int t = 0; t < slots; ++t) {
      const int j = lane + G * t;
      if (j >= J) break;
      const int64_t base = b * JD + j * D;
      if (!kReverse) {
        acc sq = 0;
        for (int d0 = 0; d0 < D; d0 += kSumBatch) {
          acc x[kSumBatch];
          const int n = batch_count(d0, D, 1);
          sum_children_batch(src, first, count, a.tree.stride, base + d0, 1, n, x);
#pragma unroll
          for (int q = 0; q < kSumBatch; ++q) {
            if (q < n) {
              const int d = d0 + q;
              if (a.bias != nullptr) x[q] += load_as<acc>(a.bias + j * D + d);
              a.s_out[base + d] = x[q];
              sq += x[q] * x[q];
            }
          }
        }
        const acc scale = sqrt_acc(max_acc(sq, tiny_normal<acc>())) / (acc(1) + sq);
        for (int d = 0; d < D; ++d) {
          const acc v = a.s_out[base + d] * scale;
          if (a.V_next != nullptr) a.V_next[base + d] = (a.V_r != nullptr ? a.V_r[base + d] : acc(0)) + v;
          if (a.v_out != nullptr) store_from(a.v_out + base + d, v);
        }
      } else {
        for (int d0 = 0; d0 < D; d0 += kSumBatch) {
          acc x[kSumBatch];
          const int n = batch_count(d0, D, 1);
          sum_children_batch(src, first, count, a.tree.stride, base + d0, 1, n, x);
#pragma unroll
          for (int q = 0; q < kSumBatch; ++q) {
            if (q < n) a.G[base + d0 + q] = (a.G_first ? acc(0) : a.G[base + d0 + q]) + x[q];
          }
        }
        squash_backward_row<0>(a.s_prev + base, a.G + base, static_cast<const scalar_t*>(nullptr),
                               a.gs_prev + base, D);
      }
    }
  }
}

template <typename scalar_t, typename Cfg, bool kRecompute>
__global__ void __launch_bounds__(kThreads) routing_forward_sweep_kernel(const RoutingArgs<scalar_t> a) {
  routing_sweep<scalar_t, Cfg, kRecompute, false>(a);
}

template <typename scalar_t, typename Cfg, bool kRecompute>
__global__ void __launch_bounds__(kThreads) routing_reverse_sweep_kernel(const RoutingArgs<scalar_t> a) {
  routing_sweep<scalar_t, Cfg, kRecompute, true>(a);
}

// du[b, i, k] = sum_j sum_d W[i, j, d, k] gu_ij[d] for the group's kS samples: per lane (sums
// over d in order), then over the group (a butterfly). A specialised instance reads each staged
// W row once, 128 bits at a time, for all k and all kS samples; the generic one walks k.
template <typename scalar_t, typename Cfg, typename State>
__device__ __forceinline__ void input_grads(const RoutingArgs<scalar_t>& a, State* st, const acc_t<scalar_t>* W_s,
                                            int ci, const int64_t* b, int64_t i, const bool* active, int lane,
                                            int slots, int row) {
  using acc = acc_t<scalar_t>;
  constexpr int G = Cfg::kG;
  constexpr int kS = Cfg::kS;
  const int J = a.J;
  if constexpr (!Cfg::kGeneric) {
    constexpr int kK = Cfg::kK, kD = Cfg::kD;
    acc part[kS][kK];
#pragma unroll
    for (int p = 0; p < kS; ++p)
#pragma unroll
      for (int k = 0; k < kK; ++k) part[p][k] = 0;
    if (lane < J) {
      const acc* w = W_s + (ci * J + lane) * row;
#pragma unroll
      for (int d = 0; d < kD; ++d) {
        if constexpr (std::is_same<acc, float>::value && kK % 4 == 0) {
#pragma unroll
          for (int k4 = 0; k4 < kK / 4; ++k4) {
            const float4 w4 = *reinterpret_cast<const float4*>(w + d * kK + 4 * k4);
#pragma unroll
            for (int p = 0; p < kS; ++p) {
              const acc g = st[p].gu(0)[d];
              part[p][4 * k4] += w4.x * g;
              part[p][4 * k4 + 1] += w4.y * g;
              part[p][4 * k4 + 2] += w4.z * g;
              part[p][4 * k4 + 3] += w4.w * g;
            }
          }
        } else {
#pragma unroll
          for (int k = 0; k < kK; ++k) {
            const acc wk = w[d * kK + k];
#pragma unroll
            for (int p = 0; p < kS; ++p) part[p][k] += wk * st[p].gu(0)[d];
          }
        }
      }
    }
#pragma unroll
    for (int p = 0; p < kS; ++p) {
#pragma unroll
      for (int k = 0; k < kK; ++k) {
        const acc x = group_sum<G>(part[p][k]);
        if (lane == 0 && active[p]) store_from(a.du + (b[p] * a.I + i) * kK + k, x);
      }
    }
  } else {
    const int D = a.D, K = a.K;
    for (int k = 0; k < K; ++k) {
      acc part = 0;
      for (int t = 0; t < slots; ++t) {
        const int j = lane + G * t;
        if (j < J) {
          const acc* w = W_s + (ci * J + j) * row + k;
          const acc* gu = st[0].gu(t);
          for (int d = 0; d < D; ++d) part += w[d * K] * gu[d];
        }
      }
      part = group_sum<G>(part);
      if (lane == 0 && active[0]) store_from(a.du + (b[0] * a.I + i) * K + k, part);
    }
  }
}

// ---- the gradient sweep -------------------------------------------------------------------
// For every (b, i), all iterations r >= r_begin at once:
//   gu_ij = sum_r [ c^r_ij gs^r_j + gl^r_ij V^r_j ]   (the gl term for r > 0 without detach_inner)
//   gprior_ij = sum_r gl^r_ij                          (with a prior)
// Given u_hat: grad_u_hat = gu. Fused: du_i = sum_j W_ij^T gu_ij (a shuffle sum over the
// group), and the tile's dW_i = sum_b gu_ij u_i^T, summed in registers over the tile's samples
// from gu staged in shared memory; the tiles' dW (and dprior) partials go through a tree in
// tile order.
template <typename scalar_t, typename Cfg, bool kRecompute>
__global__ void __launch_bounds__(kThreads) routing_grad_kernel(const RoutingArgs<scalar_t> a) {
  using acc = acc_t<scalar_t>;
  constexpr int G = Cfg::kG;
  constexpr int kGroups = kThreads / G;
  const int D = Cfg::kD > 0 ? Cfg::kD : a.D;
  const int K = Cfg::kK > 0 ? Cfg::kK : a.K;
  const int J = a.J;
  const int JD = J * D;
  const int JDK = kRecompute ? JD * K : 0;
  const int slots = Cfg::kGeneric ? a.slots : 1;
  const int row = D * K + (Cfg::kGeneric ? 0 : row_pad<acc>());
  const int64_t B = a.B;
  const int TB = a.tile_samples;
  const bool has_prior = a.prior != nullptr;

  CAPSNET_DYNAMIC_SMEM(smem_raw);
  unsigned* ticket = reinterpret_cast<unsigned*>(smem_raw);
  acc* W_s = reinterpret_cast<acc*>(smem_raw + kTicketBytes);
  acc* gu_s = W_s + (kRecompute ? a.caps_per_chunk * J * row : 0);  // [TB, JD] (fused)
  acc* u_s = gu_s + (kRecompute ? TB * JD : 0);                       // [TB, K] (fused)
  acc* gp_s = u_s + (kRecompute ? TB * K : 0);                        // [TB, J] (prior)
  acc* scratch = gp_s + (has_prior ? TB * J : 0);

  const int64_t tile = blockIdx.x, chunk = blockIdx.y;
  const int64_t b0 = tile * TB;
  const int64_t i0 = chunk * a.caps_per_chunk;
  const int nc = static_cast<int>(min(a.caps_per_chunk, a.I - i0));
  const int group = threadIdx.x / G;
  const int lane = threadIdx.x & (G - 1);
  constexpr int kS = Cfg::kS;
  LaneState<acc, Cfg> st[kS];
#pragma unroll
  for (int p = 0; p < kS; ++p) st[p].init(scratch, group, lane, slots, D, p);
  const int64_t RS = B * JD;  // stride between iterations of V_all / gs_all

  if (kRecompute) stage_rows(a.W + i0 * J * D * K, W_s, nc * J, D * K, row);
  __syncthreads();

  acc* leaf = a.ws + a.tree.buffer_offset[0] + tile * a.tree.stride + chunk * a.caps_per_chunk * a.grad_record;
  for (int ci = 0; ci < nc; ++ci) {
    const int64_t i = i0 + ci;
    // Each pass of a group takes kS samples of the tile (the same trip count in every lane).
    for (int s = group * kS; s < TB; s += kGroups * kS) {
      int64_t b[kS];
      bool active[kS], staged[kS];
#pragma unroll
      for (int p = 0; p < kS; ++p) {
        staged[p] = kS == 1 || s + p < TB;  // rows of the tile's staging arrays (kS = 1: s < TB)
        active[p] = staged[p] && b0 + s + p < B;
        b[p] = active[p] ? b0 + s + p : B - 1;
      }
      load_group_predictions<scalar_t, Cfg, kRecompute>(a, st, W_s, ci, b, i, lane, slots, row);
#pragma unroll
      for (int p = 0; p < kS; ++p) {
        for (int t = 0; t < slots; ++t) {
          acc* gu = st[p].gu(t);
#pragma unroll
          for (int d = 0; d < D; ++d) gu[d] = 0;
          st[p].gp(t) = 0;
        }
      }
      for (int r = a.r_begin; r < a.R; ++r) {
#pragma unroll
        for (int p = 0; p < kS; ++p) {
          for (int t = 0; t < slots; ++t) {
            const int j0 = lane + G * t;
            const int64_t base = b[p] * JD + (j0 < J ? j0 : J - 1) * D;
            acc* V = st[p].V(t);
            acc* gs = st[p].gs(t);
            if (r > 0) {
              load_state_row<Cfg::kD>(a.V_all + r * RS + base, V, D);
            } else {
#pragma unroll
              for (int d = 0; d < D; ++d) V[d] = 0;
            }
            if (a.grad_v != nullptr && r == a.R - 1) {  // no reverse sweep ran: gs^(R-1) from dL/dv
              squash_backward_row<Cfg::kD>(a.s_last + base, static_cast<const acc*>(nullptr), a.grad_v + base, gs, D);
              if (chunk == 0 && ci == 0 && active[p] && j0 < J) {
                for (int d = 0; d < D; ++d) a.gs_all[r * RS + base + d] = gs[d];
              }
            } else {
              load_state_row<Cfg::kD>(a.gs_all + r * RS + base, gs, D);
            }
          }
          couplings<scalar_t, Cfg>(a, st[p], r > 0, i, lane, slots);
          const bool logit_term = a.through_logits && r > 0;
          if (logit_term || has_prior) logit_grads<scalar_t, Cfg>(a, st[p], lane, slots);
          for (int t = 0; t < slots; ++t) {
            const acc c = st[p].c(t);
            const acc gl = logit_term ? st[p].gl(t) : acc(0);
            if (has_prior) st[p].gp(t) += st[p].gl(t);
            const acc* V = st[p].V(t);
            const acc* gs = st[p].gs(t);
            acc* gu = st[p].gu(t);
#pragma unroll
            for (int d = 0; d < D; ++d) gu[d] += c * gs[d] + gl * V[d];
          }
        }
      }
      if constexpr (!kRecompute) {
#pragma unroll
        for (int p = 0; p < kS; ++p) {
          for (int t = 0; t < slots; ++t) {
            const int j = lane + G * t;
            if (active[p] && j < J) {
              const acc* gu = st[p].gu(t);
              for (int d = 0; d < D; ++d) store_from(a.grad_u_hat + ((b[p] * a.I + i) * J + j) * D + d, gu[d]);
            }
          }
        }
      } else {
        input_grads<scalar_t, Cfg>(a, st, W_s, ci, b, i, active, lane, slots, row);
#pragma unroll
        for (int p = 0; p < kS; ++p) {
          if (!staged[p]) continue;
          for (int t = 0; t < slots; ++t) {
            const int j = lane + G * t;
            if (j < J) {
              const acc* gu = st[p].gu(t);
              for (int d = 0; d < D; ++d) gu_s[(s + p) * JD + j * D + d] = active[p] ? gu[d] : acc(0);
            }
          }
          for (int k = lane; k < K; k += G)
            u_s[(s + p) * K + k] = active[p] ? load_as<acc>(a.u + (b[p] * a.I + i) * K + k) : acc(0);
        }
      }
      if (has_prior) {
#pragma unroll
        for (int p = 0; p < kS; ++p) {
          if (!staged[p]) continue;
          for (int t = 0; t < slots; ++t) {
            const int j = lane + G * t;
            if (j < J) gp_s[(s + p) * J + j] = active[p] ? st[p].gp(t) : acc(0);
          }
        }
      }
    }
    if (a.grad_record > 0) {
      __syncthreads();
      // The tile's partial dW_i and dprior_i, each element summed over the samples in order.
      acc* rec = leaf + ci * a.grad_record;
      for (int e = threadIdx.x; e < JDK; e += kThreads) {
        const int jd = e / K, k = e - jd * K;
        acc x = 0;
        for (int s = 0; s < TB; ++s) x += gu_s[s * JD + jd] * u_s[s * K + k];
        rec[e] = x;
      }
      if (has_prior) {
        for (int j = threadIdx.x; j < J; j += kThreads) {
          acc x = 0;
          for (int s = 0; s < TB; ++s) x += gp_s[s * J + j];
          rec[JDK + j] = x;
        }
      }
      __syncthreads();  // gu_s, u_s, gp_s are rewritten for the next capsule
    }
  }
  if (a.grad_record == 0) return;

  const acc* src;
  int64_t first, count;
  const int64_t lo = chunk * a.caps_per_chunk * a.grad_record;
  if (!arrive(a.tree, a.ws, a.counters, ticket, tile, chunk, lo, lo + nc * a.grad_record, &src, &first, &count)) return;
  // The block's records, capsule after capsule: element f is (capsule f / grad_record, entry
  // f % grad_record) at lo + f of the level buffer.
  const int64_t total = nc * a.grad_record;
  for (int64_t f = threadIdx.x; f < total; f += kThreads * kSumBatch) {
    acc x[kSumBatch];
    const int n = batch_count(f, total, kThreads);
    sum_children_batch(src, first, count, a.tree.stride, lo + f, kThreads, n, x);
#pragma unroll
    for (int q = 0; q < kSumBatch; ++q) {
      if (q < n) {
        const int64_t g = f + q * kThreads;
        const int64_t ci = g / a.grad_record, e = g - ci * a.grad_record;
        const int64_t i = i0 + ci;
        if (e < JDK) store_from(a.dW + i * JDK + e, x[q]);
        else store_from(a.dprior + i * J + (e - JDK), x[q]);
      }
    }
  }
}

// dbias[jd] = sum over iterations r >= r_begin and samples b of gs^r[b, jd]: a block per 32
// output elements, 8 parts of the batch each (b = part, part + 8, ...), parts summed in order.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) routing_bias_grad_kernel(const acc_t<scalar_t>* __restrict__ gs_all,
                                                                     scalar_t* __restrict__ dbias, int64_t B,
                                                                     int64_t JD, int R, int r_begin) {
  using acc = acc_t<scalar_t>;
  CAPSNET_DYNAMIC_SMEM(smem_raw);
  acc* parts = reinterpret_cast<acc*>(smem_raw);
  const int col = threadIdx.x % kBiasColumns, part = threadIdx.x / kBiasColumns;
  const int64_t jd = static_cast<int64_t>(blockIdx.x) * kBiasColumns + col;
  acc x = 0;
  if (jd < JD) {
    for (int r = r_begin; r < R; ++r)
      for (int64_t b = part; b < B; b += kBiasParts) x += gs_all[(r * B + b) * JD + jd];
  }
  parts[part * kBiasColumns + col] = x;
  __syncthreads();
  if (part == 0 && jd < JD) {
    acc total = 0;
    for (int p = 0; p < kBiasParts; ++p) total += parts[p * kBiasColumns + col];
    store_from(dbias + jd, total);
  }
}

// ---- host side ------------------------------------------------------------------------------

int64_t acc_size(DType dtype) { return dtype == DType::kFloat64 ? 8 : 4; }

struct SmemBytes {
  int64_t sweep, grad;
};

SmemBytes smem_bytes(int64_t acc_bytes, const RoutingShape& sh, const RoutingPlan& p, bool recompute) {
  const int64_t JD = sh.J * sh.D;
  const int64_t row = sh.D * sh.K + (p.specialised ? 16 / acc_bytes : 0);
  const int64_t w = recompute ? p.caps_per_chunk * sh.J * row : 0;
  const int64_t generic = p.specialised ? 0 : (kThreads / p.group) * p.generic_slots * 32 * generic_record(sh.D);
  const bool prior = p.grad_record > (recompute ? JD * sh.K : 0);
  const int64_t grad_extra = (recompute ? p.tile_samples * (JD + sh.K) : 0) + (prior ? p.tile_samples * sh.J : 0);
  return {kTicketBytes + (w + generic) * acc_bytes, kTicketBytes + (w + grad_extra + generic) * acc_bytes};
}

// Kernels needing more than the default 48 KiB of dynamic shared memory must opt in.
constexpr int64_t kDefaultSmemLimit = 48 * 1024;
template <typename Kernel>
Status allow_smem(Kernel kernel, int64_t bytes, const char* name) {
  if (bytes > kDefaultSmemLimit) {
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
    if (err != cudaSuccess) return Status{static_cast<int>(err), name};
  }
  return Status{};
}

// Calls f(Config<...>{}) for the plan's kernel instance. Instances with kS = 2 samples per lane
// exist for the specialised sizes with Dout <= 16 (RoutingPlan::lane_samples), and live in
// their own translation unit (routing_lanes2.cu) so that the two halves compile in parallel.
template <int kD, int kG, bool kRecompute, int kS, typename F>
Status with_din(int64_t K, F&& f) {
  if constexpr (!kRecompute) {
    return f(Config<0, kD, kG, kS>{});
  } else {
    switch (K) {
      case 4: return f(Config<4, kD, kG, kS>{});
      case 8: return f(Config<8, kD, kG, kS>{});
      case 16: return f(Config<16, kD, kG, kS>{});
    }
    return Status{static_cast<int>(cudaErrorInvalidValue), "routing kernel selection (Din)"};
  }
}

template <int kG, bool kRecompute, int kS, typename F>
Status with_dout(int64_t D, int64_t K, F&& f) {
  switch (D) {
    case 8: return with_din<8, kG, kRecompute, kS>(K, f);
    case 16: return with_din<16, kG, kRecompute, kS>(K, f);
    case 32:
      if constexpr (kS == 1) return with_din<32, kG, kRecompute, kS>(K, f);
      break;
  }
  return Status{static_cast<int>(cudaErrorInvalidValue), "routing kernel selection (Dout)"};
}

template <bool kRecompute, int kS, typename F>
Status with_config(const RoutingShape& sh, const RoutingPlan& p, F&& f) {
  if (p.lane_samples != kS) return Status{static_cast<int>(cudaErrorInvalidValue), "routing kernel selection (lane samples)"};
  if constexpr (kS == 1) {
    if (!p.specialised) return f(Config<0, 0, 32>{});
  } else {
    if (!p.specialised) return Status{static_cast<int>(cudaErrorInvalidValue), "routing kernel selection (generic)"};
  }
  if (p.group == 16) return with_dout<16, kRecompute, kS>(sh.D, sh.K, f);
  return with_dout<32, kRecompute, kS>(sh.D, sh.K, f);
}

template <typename scalar_t>
RoutingArgs<scalar_t> common_args(const RoutingShape& sh, const RoutingPlan& p, const RoutingOptions& o,
                                  const void* u_hat, const void* u, const void* W, const void* prior, void* ws,
                                  unsigned* counters) {
  RoutingArgs<scalar_t> a;
  a.u_hat = static_cast<const scalar_t*>(u_hat);
  a.u = static_cast<const scalar_t*>(u);
  a.W = static_cast<const scalar_t*>(W);
  a.prior = static_cast<const scalar_t*>(prior);
  a.B = sh.B;
  a.I = sh.I;
  a.J = static_cast<int>(sh.J);
  a.D = static_cast<int>(sh.D);
  a.K = static_cast<int>(sh.K);
  a.tile_samples = p.tile_samples;
  a.slots = p.generic_slots;
  a.caps_per_chunk = p.caps_per_chunk;
  a.leaky = o.leaky;
  a.inv_temperature = static_cast<acc_t<scalar_t>>(o.inv_temperature);
  a.R = sh.iterations;
  a.ws = static_cast<acc_t<scalar_t>*>(ws);
  a.counters = counters;
  return a;
}

template <typename scalar_t, bool kRecompute, int kS>
Status forward_impl(const RoutingShape& sh, const RoutingPlan& p, const RoutingOptions& o, const void* u_hat,
                    const void* u, const void* W, const void* bias, const void* prior, void* v, void* c, void* s_all,
                    void* V_all, void* ws, unsigned* counters, cudaStream_t stream) {
  using acc = acc_t<scalar_t>;
  const int64_t BJD = sh.B * sh.J * sh.D;
  const int R = sh.iterations;
  auto* s_all_p = static_cast<acc*>(s_all);
  auto* V_all_p = static_cast<acc*>(V_all);
  const SmemBytes smem = smem_bytes(sizeof(acc), sh, p, kRecompute);
  const dim3 grid(static_cast<unsigned>(p.sample_tiles), static_cast<unsigned>(p.num_chunks));

  cudaError_t err = cudaMemsetAsync(counters, 0, sizeof(unsigned) * p.counter_elems, stream);
  if (err != cudaSuccess) return Status{static_cast<int>(err), "cudaMemsetAsync(reduction counters)"};
  return with_config<kRecompute, kS>(sh, p, [&](auto cfg) -> Status {
    using Cfg = decltype(cfg);
    auto kernel = routing_forward_sweep_kernel<scalar_t, Cfg, kRecompute>;
    CAPSNET_RETURN_IF_ERROR(allow_smem(kernel, smem.sweep, "routing_forward_sweep_kernel (shared memory opt-in)"));
    for (int r = 0; r < R; ++r) {
      const bool last = r == R - 1;
      RoutingArgs<scalar_t> a = common_args<scalar_t>(sh, p, o, u_hat, u, W, prior, ws, counters);
      a.bias = static_cast<const scalar_t*>(bias);
      a.V_r = r > 0 ? V_all_p + r * BJD : nullptr;
      a.V_zero = r == 0 ? V_all_p : nullptr;
      a.s_out = s_all_p + r * BJD;
      a.V_next = last ? nullptr : V_all_p + (r + 1) * BJD;
      a.v_out = last ? static_cast<scalar_t*>(v) : nullptr;
      a.c_out = last ? static_cast<scalar_t*>(c) : nullptr;
      a.tree = p.sweep_tree;
      CAPSNET_LAUNCH(kernel, grid, kThreads, smem.sweep, stream)(a);
      CAPSNET_CHECK_LAUNCH("routing_forward_sweep_kernel");
    }
    return Status{};
  });
}

template <typename scalar_t, bool kRecompute, int kS>
Status backward_impl(const RoutingShape& sh, const RoutingPlan& p, const RoutingOptions& o, const void* grad_v,
                     const void* u_hat, const void* u, const void* W, const void* prior, const void* s_all,
                     const void* V_all, void* grad_u_hat, void* du, void* dW, void* dbias, void* dprior,
                     void* gs_all, void* G, void* ws, unsigned* counters, cudaStream_t stream) {
  using acc = acc_t<scalar_t>;
  const int64_t BJD = sh.B * sh.J * sh.D;
  const int R = sh.iterations;
  const bool through_logits = !o.detach_inner && R > 1;
  const auto* s_all_p = static_cast<const acc*>(s_all);
  const auto* V_all_p = static_cast<const acc*>(V_all);
  auto* gs_all_p = static_cast<acc*>(gs_all);
  auto* G_p = static_cast<acc*>(G);
  const SmemBytes smem = smem_bytes(sizeof(acc), sh, p, kRecompute);
  const dim3 grid(static_cast<unsigned>(p.sample_tiles), static_cast<unsigned>(p.num_chunks));

  cudaError_t err = cudaMemsetAsync(counters, 0, sizeof(unsigned) * p.counter_elems, stream);
  if (err != cudaSuccess) return Status{static_cast<int>(err), "cudaMemsetAsync(reduction counters)"};
  CAPSNET_RETURN_IF_ERROR((with_config<kRecompute, kS>(sh, p, [&](auto cfg) -> Status {
    using Cfg = decltype(cfg);
    if (through_logits) {
      auto reverse = routing_reverse_sweep_kernel<scalar_t, Cfg, kRecompute>;
      CAPSNET_RETURN_IF_ERROR(allow_smem(reverse, smem.sweep, "routing_reverse_sweep_kernel (shared memory opt-in)"));
      // Reverse sweeps r = R-1 .. 1 (V^0 = 0 passes nothing on); G collects dL/dV^r.
      for (int r = R - 1; r >= 1; --r) {
        RoutingArgs<scalar_t> a = common_args<scalar_t>(sh, p, o, u_hat, u, W, prior, ws, counters);
        a.V_r = V_all_p + r * BJD;
        a.s_r = s_all_p + r * BJD;
        a.grad_v = r == R - 1 ? static_cast<const scalar_t*>(grad_v) : nullptr;
        a.gs_r = gs_all_p + r * BJD;
        a.G = G_p;
        a.G_first = r == R - 1;
        a.s_prev = s_all_p + (r - 1) * BJD;
        a.gs_prev = gs_all_p + (r - 1) * BJD;
        a.tree = p.sweep_tree;
        CAPSNET_LAUNCH(reverse, grid, kThreads, smem.sweep, stream)(a);
        CAPSNET_CHECK_LAUNCH("routing_reverse_sweep_kernel");
      }
    }
    auto grad = routing_grad_kernel<scalar_t, Cfg, kRecompute>;
    CAPSNET_RETURN_IF_ERROR(allow_smem(grad, smem.grad, "routing_grad_kernel (shared memory opt-in)"));
    RoutingArgs<scalar_t> a = common_args<scalar_t>(sh, p, o, u_hat, u, W, prior, ws, counters);
    a.V_all = V_all_p;
    a.gs_all = gs_all_p;
    a.s_last = s_all_p + (R - 1) * BJD;
    a.grad_v = through_logits ? nullptr : static_cast<const scalar_t*>(grad_v);
    a.r_begin = o.detach_inner ? R - 1 : 0;
    a.through_logits = through_logits;
    a.grad_u_hat = static_cast<scalar_t*>(grad_u_hat);
    a.du = static_cast<scalar_t*>(du);
    a.dW = static_cast<scalar_t*>(dW);
    a.dprior = static_cast<scalar_t*>(dprior);
    a.grad_record = p.grad_record;
    a.tree = p.grad_tree;
    CAPSNET_LAUNCH(grad, grid, kThreads, smem.grad, stream)(a);
    CAPSNET_CHECK_LAUNCH("routing_grad_kernel");
    return Status{};
  })));

  if (dbias != nullptr) {
    const int64_t JD = sh.J * sh.D;
    const unsigned blocks = static_cast<unsigned>((JD + kBiasColumns - 1) / kBiasColumns);
    CAPSNET_LAUNCH(routing_bias_grad_kernel<scalar_t>, blocks, kThreads, kThreads * sizeof(acc), stream)(
        gs_all_p, static_cast<scalar_t*>(dbias), sh.B, JD, R, o.detach_inner ? R - 1 : 0);
    CAPSNET_CHECK_LAUNCH("routing_bias_grad_kernel");
  }
  return Status{};
}

// The launchers of one lane-samples choice: routing.cu instantiates kS = 1 (every plan's
// default, and the only choice of the generic kernel and of float64), routing_lanes2.cu kS = 2.
template <int kS>
Status forward_entry(DType dtype, const RoutingShape& shape, const RoutingPlan& plan, const RoutingOptions& options,
                     const void* u_hat, const void* u, const void* W, const void* bias, const void* prior, void* v,
                     void* c, void* s_all, void* V_all, void* workspace, unsigned* counters, void* stream) {
  return dispatch_dtype(dtype, [&](auto* tag) -> Status {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    if constexpr (kS > 1 && !std::is_same<acc_t<scalar_t>, float>::value) {
      return Status{static_cast<int>(cudaErrorInvalidValue), "routing kernel selection (lane samples, float64)"};
    } else {
      const auto st = static_cast<cudaStream_t>(stream);
      if (u_hat == nullptr)
        return forward_impl<scalar_t, true, kS>(shape, plan, options, u_hat, u, W, bias, prior, v, c, s_all, V_all,
                                                workspace, counters, st);
      return forward_impl<scalar_t, false, kS>(shape, plan, options, u_hat, u, W, bias, prior, v, c, s_all, V_all,
                                               workspace, counters, st);
    }
  });
}

template <int kS>
Status backward_entry(DType dtype, const RoutingShape& shape, const RoutingPlan& plan, const RoutingOptions& options,
                      const void* grad_v, const void* u_hat, const void* u, const void* W, const void* prior,
                      const void* s_all, const void* V_all, void* grad_u_hat, void* du, void* dW, void* dbias,
                      void* dprior, void* gs_all, void* G, void* workspace, unsigned* counters, void* stream) {
  return dispatch_dtype(dtype, [&](auto* tag) -> Status {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    if constexpr (kS > 1 && !std::is_same<acc_t<scalar_t>, float>::value) {
      return Status{static_cast<int>(cudaErrorInvalidValue), "routing kernel selection (lane samples, float64)"};
    } else {
      const auto st = static_cast<cudaStream_t>(stream);
      if (u_hat == nullptr)
        return backward_impl<scalar_t, true, kS>(shape, plan, options, grad_v, u_hat, u, W, prior, s_all, V_all,
                                                 grad_u_hat, du, dW, dbias, dprior, gs_all, G, workspace, counters, st);
      return backward_impl<scalar_t, false, kS>(shape, plan, options, grad_v, u_hat, u, W, prior, s_all, V_all,
                                                grad_u_hat, du, dW, dbias, dprior, gs_all, G, workspace, counters, st);
    }
  });
}

}  // namespace

// Defined in routing_lanes2.cu: forward_entry<2> and backward_entry<2>.
Status routing_forward_lanes2(DType dtype, const RoutingShape& shape, const RoutingPlan& plan,
                              const RoutingOptions& options, const void* u_hat, const void* u, const void* W,
                              const void* bias, const void* prior, void* v, void* c, void* s_all, void* V_all,
                              void* workspace, unsigned* counters, void* stream);
Status routing_backward_lanes2(DType dtype, const RoutingShape& shape, const RoutingPlan& plan,
                               const RoutingOptions& options, const void* grad_v, const void* u_hat, const void* u,
                               const void* W, const void* prior, const void* s_all, const void* V_all,
                               void* grad_u_hat, void* du, void* dW, void* dbias, void* dprior, void* gs_all,
                               void* G, void* workspace, unsigned* counters, void* stream);

}  // namespace capsnet
