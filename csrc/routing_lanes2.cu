// The routing kernels with two samples per lane (RoutingPlan::lane_samples = 2), in their own
// translation unit so that they compile beside routing.cu. Float accumulation only.
#include "routing_impl.cuh"

namespace capsnet {

Status routing_forward_lanes2(DType dtype, const RoutingShape& shape, const RoutingPlan& plan,
                              const RoutingOptions& options, const void* u_hat, const void* u, const void* W,
                              const void* bias, const void* prior, void* v, void* c, void* s_all, void* V_all,
                              void* workspace, unsigned* counters, void* stream) {
  return forward_entry<2>(dtype, shape, plan, options, u_hat, u, W, bias, prior, v, c, s_all, V_all, workspace,
                          counters, stream);
}

Status routing_backward_lanes2(DType dtype, const RoutingShape& shape, const RoutingPlan& plan,
                               const RoutingOptions& options, const void* grad_v, const void* u_hat, const void* u,
                               const void* W, const void* prior, const void* s_all, const void* V_all,
                               void* grad_u_hat, void* du, void* dW, void* dbias, void* dprior, void* gs_all,
                               void* G, void* workspace, unsigned* counters, void* stream) {
  return backward_entry<2>(dtype, shape, plan, options, grad_v, u_hat, u, W, prior, s_all, V_all, grad_u_hat, du,
                           dW, dbias, dprior, gs_all, G, workspace, counters, stream);
}

}  // namespace capsnet
