// torch binding of the capsnet_ext CUDA kernels: argument checks (TORCH_CHECK), output and
// workspace allocation, and op registration (TORCH_LIBRARY). The kernels themselves live in
// the .cu files, which include no torch headers; this file includes no CUDA kernels.
//
// The op schemas below are mirrored in capsnet_ext/cuda_ops/_schema.py, where the fake
// (meta) implementations and autograd formulas are registered.
//
// Only device-generic torch headers are used (c10::DeviceGuard, c10::Stream::native_handle),
// so this file also compiles against a CPU-only torch, which lacks the c10/cuda headers'
// generated configuration; continuous integration checks it that way.
//
// Order of work in every op (the error paths are pinned by tests/test_cuda_host_checks.py):
//   1. every argument check (TORCH_CHECK) that needs no device: shapes, dtypes, devices,
//      options; then the split plan, whose only device query is the shared-memory limit;
//   2. only then the device guard, contiguous copies, allocations, stream and launches.
// A refused call therefore throws its c10::Error from plain host frames, before any device
// state is touched, with nothing allocated and no device guard to restore while unwinding.
// (On the H200 of 2026-12-04, torch 2.11, a refused capsule_routing_forward killed its process
// with SIGSEGV instead of raising RuntimeError; its device guard was alive during the throw.
// The same checks raise cleanly on a CPU-only torch. The cause is not established: the
// crash-trace step of benchmarks/gpu_check.sh takes the native stack of that reproducer.)
//
// CAPSNET_EXT_HOST_TEST (defined only by tests/test_cuda_host_checks.py): CPU tensors stand
// in for CUDA tensors and no stream is asked for, so that this file, linked with stub
// launchers, runs every check, plan and allocation on a CPU-only torch.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include <cmath>
#include <string>
#include <tuple>

#include "capsnet_kernels.h"

namespace capsnet {
namespace {

using at::Tensor;

#ifdef CAPSNET_EXT_HOST_TEST
constexpr bool kHostTest = true;
#else
constexpr bool kHostTest = false;
#endif

#define CAPSNET_CHECK_STATUS(status)                                                            \
  TORCH_CHECK((status).ok(), "capsnet_ext: CUDA kernel ", (status).kernel, " failed: ",         \
              cuda_error_string((status).cuda_error))

DType dtype_of(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    default:
      TORCH_CHECK(false, "capsnet_ext: ", name, " must be float16, bfloat16, float32 or float64, got ",
                  t.scalar_type());
  }
  // Not reached (TORCH_CHECK(false) throws). Without this return, a torch whose check-failure
  // function were not declared [[noreturn]] would leave the end of a non-void function
  // reachable, which -O3 may compile into a fall-through into whatever code follows.
  return DType::kFloat32;
}

at::ScalarType acc_type(const Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

void check_tensor(const Tensor& t, const char* name, int64_t dim, const char* layout) {
  TORCH_CHECK(t.is_cuda() || (kHostTest && t.is_cpu()), "capsnet_ext: ", name, " must be a CUDA tensor, got device ",
              t.device());
  TORCH_CHECK(t.dim() == dim, "capsnet_ext: ", name, " must have ", dim, " dimensions ", layout, ", got shape ",
              t.sizes());
  TORCH_CHECK(t.numel() > 0, "capsnet_ext: ", name, " must not be empty, got shape ", t.sizes());
  dtype_of(t, name);
}

void check_like(const Tensor& ref, const char* ref_name, const Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), "capsnet_ext: ", name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device(), "; all inputs must be on the same device");
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "capsnet_ext: ", name, " has dtype ", t.scalar_type(), " but ",
              ref_name, " has dtype ", ref.scalar_type(), "; all inputs must have the same dtype");
}

void check_shape(const Tensor& t, const char* name, at::IntArrayRef expected, const char* layout) {
  TORCH_CHECK(t.sizes() == expected, "capsnet_ext: ", name, " must have shape ", layout, " = ", expected, ", got ",
              t.sizes());
}

void check_u_W(const Tensor& u, const Tensor& W) {
  check_tensor(u, "u", 3, "[B, I, Din]");
  check_tensor(W, "W", 4, "[I, J, Dout, Din]");
  check_like(u, "u", W, "W");
  TORCH_CHECK(W.size(0) == u.size(1) && W.size(3) == u.size(2), "capsnet_ext: expected W of shape [", u.size(1),
              ", J, Dout, ", u.size(2), "] to match u of shape ", u.sizes(), ", got W of shape ", W.sizes());
}

void check_iterations(int64_t iterations) {
  TORCH_CHECK(iterations >= 1 && iterations <= (1 << 20), "capsnet_ext: iterations must be >= 1 and at most 2^20, got ",
              iterations);
}

// The current CUDA stream of t's device as a cudaStream_t (through the device-generic
// guard interface, which the CUDA build of torch implements).
void* stream_of(const Tensor& t) {
  if constexpr (kHostTest) return nullptr;  // the stub launchers take no stream
  return c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(t.device()).native_handle();
}

void check_temperature(double temperature) {
  TORCH_CHECK(temperature > 0.0 && std::isfinite(temperature),
              "capsnet_ext: temperature must be a positive finite number, got ", temperature);
}

// The split plan of a routing problem (a function of the shape only, so results are the same
// on every GPU). The kernels keep the W slices of a chunk (fused form) and, in the generic
// kernel, per-lane state in shared memory; sizes beyond the device's limit are refused with the
// numbers before anything launches.
RoutingPlan plan_for(const Tensor& ref, const RoutingShape& shape, bool recompute, bool prior, int64_t lane_samples) {
  TORCH_CHECK(lane_samples >= 0 && lane_samples <= 2, "capsnet_ext: lane_samples must be 0 (the default), 1 or 2, got ",
              lane_samples);
  const DType dtype = dtype_of(ref, "input");
  TORCH_CHECK(shape.J * shape.D <= (1 << 20) && shape.K <= (1 << 20) && shape.J * shape.D * shape.K <= (1 << 24),
              "capsnet_ext: J * Dout = ", shape.J * shape.D, " and Din = ", shape.K, " must be at most 2^20 (and J * Dout * Din at most 2^24)");
  TORCH_CHECK(shape.I < (int64_t{1} << 40), "capsnet_ext: at most 2^40 input capsules are supported, got ", shape.I);
  // lane_samples is a speed choice (bitwise equal results); sizes without a two-sample instance get one.
  const RoutingPlan plan = plan_routing(shape, recompute, prior, dtype == DType::kFloat64 ? 8 : 4,
                                        lane_samples == 0 ? 1 : static_cast<int>(lane_samples));
  TORCH_CHECK(plan.sample_tiles < (int64_t{1} << 31) && plan.num_chunks <= 65535,
              "capsnet_ext: the routing grid (", plan.sample_tiles, " sample tiles x ", plan.num_chunks,
              " capsule chunks) exceeds the CUDA grid limits");
  const int64_t limit = device_smem_optin(ref.device().index());
  TORCH_CHECK(limit > 0, "capsnet_ext: could not query the shared memory limit of ", ref.device());
  const int64_t need = routing_smem_bytes(dtype, shape, plan, recompute);
  TORCH_CHECK(need <= limit, "capsnet_ext: J = ", shape.J, ", Dout = ", shape.D, (recompute ? ", Din = " : ""),
              (recompute ? std::to_string(shape.K) : std::string()), " needs ", need,
              " bytes of shared memory per block, more than the ", limit, " bytes ", ref.device(),
              " allows; use backend='triton' or 'reference' for capsules this large");
  return plan;
}

// The saved routing state, contiguous and 16-byte aligned: the kernels read its rows with
// 128-bit loads. The forward's own outputs already are; a view passed in by hand is copied.
Tensor aligned_contiguous(const Tensor& t) {
  Tensor c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone();
  return c;
}

bool has_tensor(const c10::optional<Tensor>& t) { return t.has_value() && t->defined(); }

// Checks an optional [J, Dout] bias or [I, J] prior against the reference input (device, dtype, shape).
void check_bias(const c10::optional<Tensor>& bias, const Tensor& ref, const char* ref_name, const RoutingShape& shape) {
  if (!has_tensor(bias)) return;
  check_tensor(*bias, "bias", 2, "[J, Dout]");
  check_like(ref, ref_name, *bias, "bias");
  check_shape(*bias, "bias", {shape.J, shape.D}, "[J, Dout]");
}

void check_prior(const c10::optional<Tensor>& prior, const Tensor& ref, const char* ref_name, const RoutingShape& shape) {
  if (!has_tensor(prior)) return;
  check_tensor(*prior, "prior", 2, "[I, J]");
  check_like(ref, ref_name, *prior, "prior");
  check_shape(*prior, "prior", {shape.I, shape.J}, "[I, J]");
}

Tensor contiguous_or_undefined(const c10::optional<Tensor>& t) { return has_tensor(t) ? t->contiguous() : Tensor(); }

// ---- predict ----------------------------------------------------------------------------

Tensor predict_op(const Tensor& u_in, const Tensor& W_in) {
  check_u_W(u_in, W_in);
  // Every check has passed: from here on the device is used.
  const c10::DeviceGuard guard(u_in.device());
  const Tensor u = u_in.contiguous(), W = W_in.contiguous();
  const int64_t B = u.size(0), I = u.size(1), K = u.size(2), J = W.size(1), D = W.size(2);
  Tensor u_hat = at::empty({B, I, J, D}, u.options());
  const Status st = predict_forward(dtype_of(u, "u"), u.data_ptr(), W.data_ptr(), u_hat.data_ptr(), B, I, J, D, K,
                                    stream_of(u));
  CAPSNET_CHECK_STATUS(st);
  return u_hat;
}

std::tuple<Tensor, Tensor> predict_backward_op(const Tensor& grad_in, const Tensor& u_in, const Tensor& W_in) {
  check_u_W(u_in, W_in);
  check_tensor(grad_in, "grad_u_hat", 4, "[B, I, J, Dout]");
  check_like(u_in, "u", grad_in, "grad_u_hat");
  const int64_t B = u_in.size(0), I = u_in.size(1), K = u_in.size(2), J = W_in.size(1), D = W_in.size(2);
  check_shape(grad_in, "grad_u_hat", {B, I, J, D}, "[B, I, J, Dout]");
  // Every check has passed: from here on the device is used.
  const c10::DeviceGuard guard(u_in.device());
  const Tensor g = grad_in.contiguous(), u = u_in.contiguous(), W = W_in.contiguous();
  Tensor du = at::empty(u.sizes(), u.options()), dW = at::empty(W.sizes(), W.options());
  const Status st = predict_backward(dtype_of(u, "u"), g.data_ptr(), u.data_ptr(), W.data_ptr(), du.data_ptr(),
                                     dW.data_ptr(), B, I, J, D, K, stream_of(u));
  CAPSNET_CHECK_STATUS(st);
  return {du, dW};
}

// ---- routing ------------------------------------------------------------------------------

// Shared by both forms: checks the options, plans, then (and only then) takes the device,
// allocates outputs and saved states and runs the forward.
// Given form: u_hat_in defined, u_in/W_in undefined. Fused form: the other way round. The
// tensors are the caller's (possibly non-contiguous) inputs, already checked by the caller.
std::tuple<Tensor, Tensor, Tensor, Tensor> routing_forward_common(const Tensor& u_hat_in, const Tensor& u_in,
                                                                  const Tensor& W_in, const Tensor& ref,
                                                                  const char* ref_name,
                                                                  const c10::optional<Tensor>& bias_in,
                                                                  const c10::optional<Tensor>& prior_in,
                                                                  const RoutingShape& shape, bool leaky,
                                                                  bool return_coupling, double temperature,
                                                                  int64_t lane_samples) {
  check_bias(bias_in, ref, ref_name, shape);
  check_prior(prior_in, ref, ref_name, shape);
  check_temperature(temperature);
  const bool recompute = !u_hat_in.defined();
  const RoutingPlan plan = plan_for(ref, shape, recompute, has_tensor(prior_in), lane_samples);
  // Every check has passed: from here on the device is used.
  const c10::DeviceGuard guard(ref.device());
  const Tensor u_hat = recompute ? Tensor() : u_hat_in.contiguous();
  const Tensor u = recompute ? u_in.contiguous() : Tensor(), W = recompute ? W_in.contiguous() : Tensor();
  const Tensor bias = contiguous_or_undefined(bias_in), prior = contiguous_or_undefined(prior_in);
  const auto acc_opts = ref.options().dtype(acc_type(ref));
  const int64_t R = shape.iterations;
  Tensor v = at::empty({shape.B, shape.J, shape.D}, ref.options());
  Tensor c = return_coupling ? at::empty({shape.B, shape.I, shape.J}, ref.options()) : at::empty({0}, ref.options());
  Tensor s_all = at::empty({R, shape.B, shape.J, shape.D}, acc_opts);
  Tensor V_all = at::empty({R, shape.B, shape.J, shape.D}, acc_opts);
  Tensor workspace = at::empty({plan.workspace_elems}, acc_opts);
  Tensor counters = at::empty({plan.counter_elems}, ref.options().dtype(at::kInt));
  RoutingOptions options;
  options.leaky = leaky;
  options.inv_temperature = 1.0 / temperature;
  const Status st = routing_forward(dtype_of(ref, "input"), shape, plan, options,
                                    recompute ? nullptr : u_hat.data_ptr(), recompute ? u.data_ptr() : nullptr,
                                    recompute ? W.data_ptr() : nullptr, bias.defined() ? bias.data_ptr() : nullptr,
                                    prior.defined() ? prior.data_ptr() : nullptr, v.data_ptr(),
                                    return_coupling ? c.data_ptr() : nullptr, s_all.data_ptr(), V_all.data_ptr(),
                                    workspace.data_ptr(), static_cast<unsigned*>(counters.data_ptr()), stream_of(ref));
  CAPSNET_CHECK_STATUS(st);
  return {v, c, s_all, V_all};
}

void check_saved(const Tensor& ref, const Tensor& grad_v, const Tensor& s_all, const Tensor& V_all,
                 const RoutingShape& shape) {
  check_tensor(grad_v, "grad_v", 3, "[B, J, Dout]");
  check_like(ref, "input", grad_v, "grad_v");
  check_shape(grad_v, "grad_v", {shape.B, shape.J, shape.D}, "[B, J, Dout]");
  for (const auto& [t, name] : {std::pair<const Tensor&, const char*>{s_all, "s_all"}, {V_all, "V_all"}}) {
    check_tensor(t, name, 4, "[iterations, B, J, Dout]");
    TORCH_CHECK(t.scalar_type() == acc_type(ref) && t.device() == ref.device(), "capsnet_ext: ", name,
                " must be a ", acc_type(ref), " tensor on ", ref.device(), " (the saved routing state), got ",
                t.scalar_type(), " on ", t.device());
    check_shape(t, name, {shape.iterations, shape.B, shape.J, shape.D}, "[iterations, B, J, Dout]");
  }
}

// Shared by both backward forms: checks, plans, then (and only then) takes the device,
// allocates gradients and scratch and runs the backward.
// Returns (grad_u_hat or du, dW or undefined, grad_bias ([0] without bias), grad_prior ([0] without prior)).
std::tuple<Tensor, Tensor, Tensor, Tensor> routing_backward_common(
    const Tensor& grad_v_in, const Tensor& u_hat_in, const Tensor& u_in, const Tensor& W_in, const Tensor& ref,
    const char* ref_name, const c10::optional<Tensor>& prior_in, const Tensor& s_all_in, const Tensor& V_all_in,
    const RoutingShape& shape, bool leaky, bool detach_inner, bool has_bias, double temperature,
    int64_t lane_samples) {
  check_saved(ref, grad_v_in, s_all_in, V_all_in, shape);
  check_prior(prior_in, ref, ref_name, shape);
  check_temperature(temperature);
  const bool recompute = !u_hat_in.defined();
  const RoutingPlan plan = plan_for(ref, shape, recompute, has_tensor(prior_in), lane_samples);
  // Every check has passed: from here on the device is used.
  const c10::DeviceGuard guard(ref.device());
  const Tensor grad_v = grad_v_in.contiguous(), s_all = aligned_contiguous(s_all_in), V_all = aligned_contiguous(V_all_in);
  const Tensor prior = contiguous_or_undefined(prior_in);
  const Tensor u_hat = recompute ? Tensor() : u_hat_in.contiguous();
  const Tensor u = recompute ? u_in.contiguous() : Tensor(), W = recompute ? W_in.contiguous() : Tensor();
  const auto acc_opts = ref.options().dtype(acc_type(ref));
  Tensor first = recompute ? at::empty(u.sizes(), u.options()) : at::empty(u_hat.sizes(), u_hat.options());
  Tensor dW = recompute ? at::empty(W.sizes(), W.options()) : Tensor();
  Tensor grad_bias = has_bias ? at::empty({shape.J, shape.D}, ref.options()) : at::empty({0}, ref.options());
  Tensor grad_prior = prior.defined() ? at::empty({shape.I, shape.J}, ref.options()) : at::empty({0}, ref.options());
  Tensor gs_all = at::empty({shape.iterations, shape.B, shape.J, shape.D}, acc_opts);
  Tensor G = at::empty({shape.B, shape.J, shape.D}, acc_opts);
  Tensor workspace = at::empty({plan.workspace_elems}, acc_opts);
  Tensor counters = at::empty({plan.counter_elems}, ref.options().dtype(at::kInt));
  RoutingOptions options;
  options.leaky = leaky;
  options.detach_inner = detach_inner;
  options.inv_temperature = 1.0 / temperature;
  const Status st = routing_backward(
      dtype_of(ref, "input"), shape, plan, options, grad_v.data_ptr(), recompute ? nullptr : u_hat.data_ptr(),
      recompute ? u.data_ptr() : nullptr, recompute ? W.data_ptr() : nullptr,
      prior.defined() ? prior.data_ptr() : nullptr, s_all.data_ptr(), V_all.data_ptr(),
      recompute ? nullptr : first.data_ptr(), recompute ? first.data_ptr() : nullptr,
      recompute ? dW.data_ptr() : nullptr, has_bias ? grad_bias.data_ptr() : nullptr,
      prior.defined() ? grad_prior.data_ptr() : nullptr, gs_all.data_ptr(), G.data_ptr(), workspace.data_ptr(),
      static_cast<unsigned*>(counters.data_ptr()), stream_of(ref));
  CAPSNET_CHECK_STATUS(st);
  return {first, dW, grad_bias, grad_prior};
}

RoutingShape given_shape(const Tensor& u_hat, int64_t iterations) {
  return RoutingShape{u_hat.size(0), u_hat.size(1), u_hat.size(2), u_hat.size(3), 1, static_cast<int>(iterations)};
}

RoutingShape fused_shape(const Tensor& u, const Tensor& W, int64_t iterations) {
  return RoutingShape{u.size(0), u.size(1), W.size(1), W.size(2), u.size(2), static_cast<int>(iterations)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> routing_forward_op(const Tensor& u_hat, const c10::optional<Tensor>& bias,
                                                              const c10::optional<Tensor>& prior, int64_t iterations,
                                                              bool leaky, bool detach_inner, bool return_coupling,
                                                              double temperature, int64_t lane_samples) {
  (void)detach_inner;  // changes only the backward
  check_tensor(u_hat, "u_hat", 4, "[B, I, J, Dout]");
  check_iterations(iterations);
  return routing_forward_common(u_hat, Tensor(), Tensor(), u_hat, "u_hat", bias, prior,
                                given_shape(u_hat, iterations), leaky, return_coupling, temperature, lane_samples);
}

std::tuple<Tensor, Tensor, Tensor> routing_backward_op(const Tensor& grad_v, const Tensor& u_hat,
                                                       const c10::optional<Tensor>& prior, const Tensor& s_all,
                                                       const Tensor& V_all, int64_t iterations, bool leaky,
                                                       bool detach_inner, bool has_bias, double temperature,
                                                       int64_t lane_samples) {
  check_tensor(u_hat, "u_hat", 4, "[B, I, J, Dout]");
  check_iterations(iterations);
  auto [grad_u_hat, unused, grad_bias, grad_prior] =
      routing_backward_common(grad_v, u_hat, Tensor(), Tensor(), u_hat, "u_hat", prior, s_all, V_all,
                              given_shape(u_hat, iterations), leaky, detach_inner, has_bias, temperature,
                              lane_samples);
  (void)unused;
  return {grad_u_hat, grad_bias, grad_prior};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> capsule_routing_forward_op(const Tensor& u, const Tensor& W,
                                                                      const c10::optional<Tensor>& bias,
                                                                      const c10::optional<Tensor>& prior,
                                                                      int64_t iterations, bool leaky,
                                                                      bool detach_inner, bool return_coupling,
                                                                      double temperature, int64_t lane_samples) {
  (void)detach_inner;  // changes only the backward
  check_u_W(u, W);
  check_iterations(iterations);
  return routing_forward_common(Tensor(), u, W, u, "u", bias, prior, fused_shape(u, W, iterations), leaky,
                                return_coupling, temperature, lane_samples);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> capsule_routing_backward_op(
    const Tensor& grad_v, const Tensor& u, const Tensor& W, const c10::optional<Tensor>& prior, const Tensor& s_all,
    const Tensor& V_all, int64_t iterations, bool leaky, bool detach_inner, bool has_bias, double temperature,
    int64_t lane_samples) {
  check_u_W(u, W);
  check_iterations(iterations);
  return routing_backward_common(grad_v, Tensor(), u, W, u, "u", prior, s_all, V_all, fused_shape(u, W, iterations),
                                 leaky, detach_inner, has_bias, temperature, lane_samples);
}

}  // namespace
}  // namespace capsnet

TORCH_LIBRARY(capsnet_ext, m) {
  m.def("predict(Tensor u, Tensor W) -> Tensor");
  m.def("predict_backward(Tensor grad_u_hat, Tensor u, Tensor W) -> (Tensor, Tensor)");
  m.def("routing_forward(Tensor u_hat, Tensor? bias, Tensor? prior, int iterations, bool leaky, bool detach_inner, bool return_coupling, float temperature, int lane_samples=0) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("routing_backward(Tensor grad_v, Tensor u_hat, Tensor? prior, Tensor s_all, Tensor V_all, int iterations, bool leaky, bool detach_inner, bool has_bias, float temperature, int lane_samples=0) -> (Tensor, Tensor, Tensor)");
  m.def("capsule_routing_forward(Tensor u, Tensor W, Tensor? bias, Tensor? prior, int iterations, bool leaky, bool detach_inner, bool return_coupling, float temperature, int lane_samples=0) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("capsule_routing_backward(Tensor grad_v, Tensor u, Tensor W, Tensor? prior, Tensor s_all, Tensor V_all, int iterations, bool leaky, bool detach_inner, bool has_bias, float temperature, int lane_samples=0) -> (Tensor, Tensor, Tensor, Tensor)");
}

#define CAPSNET_REGISTER_KERNELS(m)                                           \
  m.impl("predict", &capsnet::predict_op);                                    \
  m.impl("predict_backward", &capsnet::predict_backward_op);                  \
  m.impl("routing_forward", &capsnet::routing_forward_op);                    \
  m.impl("routing_backward", &capsnet::routing_backward_op);                  \
  m.impl("capsule_routing_forward", &capsnet::capsule_routing_forward_op);    \
  m.impl("capsule_routing_backward", &capsnet::capsule_routing_backward_op)

TORCH_LIBRARY_IMPL(capsnet_ext, CUDA, m) { CAPSNET_REGISTER_KERNELS(m); }

#ifdef CAPSNET_EXT_HOST_TEST
// The test build also serves CPU tensors, so that a call takes the path the GPU tests take
// (the Python autograd registration, then a redispatch to the kernel) on a CPU-only torch.
TORCH_LIBRARY_IMPL(capsnet_ext, CPU, m) { CAPSNET_REGISTER_KERNELS(m); }
#endif
