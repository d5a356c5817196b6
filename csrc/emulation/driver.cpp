// Test driver for the host emulation of the kernels (see cuda_emulation.h): reads a problem
// from a directory (meta.txt with "key value" lines, inputs as raw arrays), runs the real
// launchers, writes every output as a raw array. Used by tests/test_cuda.py.
//   predict:  u.bin W.bin grad_u_hat.bin -> u_hat.bin du.bin dW.bin
//   routing:  (u.bin W.bin | u_hat.bin) [bias.bin] [prior.bin] grad_v.bin (meta lane_samples: the
//             plan's request, default 1)
//             -> v.bin [c.bin] s_all.bin V_all.bin (du.bin dW.bin | grad_u_hat.bin) [dbias.bin]
//                [dprior.bin], and launches.txt: "forward N\nbackward M\n" (kernel launches
//                and memsets of each launcher)
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "capsnet_kernels.h"
#include "emulation/cuda_emulation.h"

using capsnet::DType;

namespace {

std::map<std::string, std::string> meta;
std::string dir;

int64_t num(const char* key) { return std::stoll(meta.at(key)); }

template <typename T>
std::vector<T> read(const std::string& name, size_t n) {
  std::vector<T> data(n);
  std::ifstream f(dir + "/" + name, std::ios::binary);
  if (!f.read(reinterpret_cast<char*>(data.data()), n * sizeof(T))) {
    std::fprintf(stderr, "cannot read %zu values from %s\n", n, name.c_str());
    std::exit(2);
  }
  return data;
}

template <typename T>
void write(const std::string& name, const std::vector<T>& data) {
  std::ofstream f(dir + "/" + name, std::ios::binary);
  f.write(reinterpret_cast<const char*>(data.data()), data.size() * sizeof(T));
}

template <typename T>
std::vector<T> poisoned(size_t n) {
  return std::vector<T>(n, std::nan(""));  // unwritten outputs show up as NaN
}

void check(const capsnet::Status& st) {
  if (!st.ok()) {
    std::fprintf(stderr, "launch failed in %s (error %d)\n", st.kernel, st.cuda_error);
    std::exit(3);
  }
}

template <typename T, typename Acc>
void run() {
  const int64_t B = num("B"), I = num("I"), J = num("J"), D = num("D"), K = num("K");
  const DType dtype = sizeof(T) == 8 ? DType::kFloat64 : DType::kFloat32;
  if (meta.at("op") == "predict") {
    auto u = read<T>("u.bin", B * I * K), W = read<T>("W.bin", I * J * D * K);
    auto g = read<T>("grad_u_hat.bin", B * I * J * D);
    auto u_hat = poisoned<T>(B * I * J * D), du = poisoned<T>(B * I * K), dW = poisoned<T>(I * J * D * K);
    check(capsnet::predict_forward(dtype, u.data(), W.data(), u_hat.data(), B, I, J, D, K, nullptr));
    check(capsnet::predict_backward(dtype, g.data(), u.data(), W.data(), du.data(), dW.data(), B, I, J, D, K,
                                    nullptr));
    write("u_hat.bin", u_hat), write("du.bin", du), write("dW.bin", dW);
    return;
  }
  const int R = static_cast<int>(num("R"));
  const bool fused = num("fused") != 0;
  const bool has_bias = num("bias") != 0, has_prior = num("prior") != 0, want_c = num("return_coupling") != 0;
  capsnet::RoutingOptions options;
  options.leaky = num("leaky") != 0;
  options.detach_inner = num("detach_inner") != 0;
  options.inv_temperature = 1.0 / std::stod(meta.at("temperature"));
  const capsnet::RoutingShape shape{B, I, J, D, fused ? K : 1, R};
  const int lane_samples = meta.count("lane_samples") ? static_cast<int>(num("lane_samples")) : 1;
  capsnet::RoutingPlan plan = capsnet::plan_routing(shape, fused, has_prior, sizeof(Acc), lane_samples);
  std::vector<T> u, W, u_hat, bias, prior;
  if (fused) {
    u = read<T>("u.bin", B * I * K), W = read<T>("W.bin", I * J * D * K);
  } else {
    u_hat = read<T>("u_hat.bin", B * I * J * D);
  }
  if (has_bias) bias = read<T>("bias.bin", J * D);
  if (has_prior) prior = read<T>("prior.bin", I * J);
  auto grad_v = read<T>("grad_v.bin", B * J * D);
  auto v = poisoned<T>(B * J * D), c = poisoned<T>(want_c ? B * I * J : 0);
  auto s_all = poisoned<Acc>(R * B * J * D), V_all = poisoned<Acc>(R * B * J * D);
  auto ws = poisoned<Acc>(plan.workspace_elems);
  std::vector<unsigned> counters(plan.counter_elems, 0xdeadbeefu);  // the launchers zero them
  if (meta.count("inject")) {
    // Error reporting: "pending" leaves an error from earlier work pending before the call,
    // "grid" breaks the plan so that the first sweep's launch fails. Writes the Status's
    // kernel name and whether an error is still pending afterwards (it must not be cleared).
    if (meta.at("inject") == "pending") capsnet_emu::last_error() = cudaErrorInvalidValue;
    else plan.num_chunks = 0;
    const capsnet::Status st = capsnet::routing_forward(
        dtype, shape, plan, options, fused ? nullptr : u_hat.data(), fused ? u.data() : nullptr,
        fused ? W.data() : nullptr, nullptr, nullptr, v.data(), nullptr, s_all.data(), V_all.data(), ws.data(),
        counters.data(), nullptr);
    std::ofstream(dir + "/error.txt") << st.cuda_error << "\n" << st.kernel << "\n"
                                      << (cudaPeekAtLastError() != cudaSuccess) << "\n";
    capsnet_emu::last_error() = cudaSuccess;
    return;
  }
  long launches = capsnet_emu::launch_count();
  check(capsnet::routing_forward(dtype, shape, plan, options, fused ? nullptr : u_hat.data(),
                                 fused ? u.data() : nullptr, fused ? W.data() : nullptr,
                                 has_bias ? bias.data() : nullptr, has_prior ? prior.data() : nullptr, v.data(),
                                 want_c ? c.data() : nullptr, s_all.data(), V_all.data(), ws.data(), counters.data(),
                                 nullptr));
  const long forward_launches = capsnet_emu::launch_count() - launches;
  write("v.bin", v), write("s_all.bin", s_all), write("V_all.bin", V_all);
  if (want_c) write("c.bin", c);
  auto gs_all = poisoned<Acc>(R * B * J * D), G = poisoned<Acc>(B * J * D);
  auto dbias = poisoned<T>(J * D), dprior = poisoned<T>(I * J);
  ws = poisoned<Acc>(plan.workspace_elems);
  std::fill(counters.begin(), counters.end(), 0xdeadbeefu);
  launches = capsnet_emu::launch_count();
  std::vector<T> du, dW, gu;
  if (fused) {
    du = poisoned<T>(B * I * K), dW = poisoned<T>(I * J * D * K);
  } else {
    gu = poisoned<T>(B * I * J * D);
  }
  check(capsnet::routing_backward(dtype, shape, plan, options, grad_v.data(), fused ? nullptr : u_hat.data(),
                                  fused ? u.data() : nullptr, fused ? W.data() : nullptr,
                                  has_prior ? prior.data() : nullptr, s_all.data(), V_all.data(),
                                  fused ? nullptr : gu.data(), fused ? du.data() : nullptr,
                                  fused ? dW.data() : nullptr, has_bias ? dbias.data() : nullptr,
                                  has_prior ? dprior.data() : nullptr, gs_all.data(), G.data(), ws.data(),
                                  counters.data(), nullptr));
  const long backward_launches = capsnet_emu::launch_count() - launches;
  if (fused) {
    write("du.bin", du), write("dW.bin", dW);
  } else {
    write("grad_u_hat.bin", gu);
  }
  if (has_bias) write("dbias.bin", dbias);
  if (has_prior) write("dprior.bin", dprior);
  std::ofstream(dir + "/launches.txt") << "forward " << forward_launches << "\nbackward " << backward_launches
                                       << "\nspecialised " << plan.specialised << "\ngroup " << plan.group
                                       << "\nchunks " << plan.num_chunks << "\ntiles " << plan.sample_tiles
                                       << "\ntree_levels " << plan.sweep_tree.levels
                                       << "\nlane_samples " << plan.lane_samples << "\n";
}

}  // namespace

const char* capsnet::cuda_error_string(int) { return "emulation"; }

// Runs every problem directory given, in one process (the tests batch their cases).
int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s <problem directory>...\n", argv[0]);
    return 2;
  }
  for (int arg = 1; arg < argc; ++arg) {
    dir = argv[arg];
    meta.clear();
    std::ifstream f(dir + "/meta.txt");
    for (std::string key, value; f >> key >> value;) meta[key] = value;
    if (meta.at("dtype") == "float64") run<double, double>();
    else run<float, float>();
  }
  return 0;
}
