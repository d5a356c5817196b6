// Dynamic routing by agreement: the public launchers (capsnet_kernels.h). The kernels, their
// design and the launch templates are in routing_impl.cuh; this file instantiates the
// one-sample-per-lane instances, routing_lanes2.cu the two-sample ones.
#include "routing_impl.cuh"

namespace capsnet {

int64_t routing_smem_bytes(DType dtype, const RoutingShape& shape, const RoutingPlan& plan, bool recompute) {
  const SmemBytes s = smem_bytes(acc_size(dtype), shape, plan, recompute);
  return s.sweep > s.grad ? s.sweep : s.grad;
}

Status routing_forward(DType dtype, const RoutingShape& shape, const RoutingPlan& plan, const RoutingOptions& options,
                       const void* u_hat, const void* u, const void* W, const void* bias, const void* prior, void* v,
                       void* c, void* s_all, void* V_all, void* workspace, unsigned* counters, void* stream) {
  CAPSNET_CHECK_PENDING("routing_forward");
  if (plan.lane_samples == 2)
    return routing_forward_lanes2(dtype, shape, plan, options, u_hat, u, W, bias, prior, v, c, s_all, V_all,
                                  workspace, counters, stream);
  return forward_entry<1>(dtype, shape, plan, options, u_hat, u, W, bias, prior, v, c, s_all, V_all, workspace,
                          counters, stream);
}

Status routing_backward(DType dtype, const RoutingShape& shape, const RoutingPlan& plan, const RoutingOptions& options,
                        const void* grad_v, const void* u_hat, const void* u, const void* W, const void* prior,
                        const void* s_all, const void* V_all, void* grad_u_hat, void* du, void* dW, void* dbias,
                        void* dprior, void* gs_all, void* G, void* workspace, unsigned* counters, void* stream) {
  CAPSNET_CHECK_PENDING("routing_backward");
  if (plan.lane_samples == 2)
    return routing_backward_lanes2(dtype, shape, plan, options, grad_v, u_hat, u, W, prior, s_all, V_all,
                                   grad_u_hat, du, dW, dbias, dprior, gs_all, G, workspace, counters, stream);
  return backward_entry<1>(dtype, shape, plan, options, grad_v, u_hat, u, W, prior, s_all, V_all, grad_u_hat, du,
                           dW, dbias, dprior, gs_all, G, workspace, counters, stream);
}

}  // namespace capsnet
