// Plain CUDA runtime queries used by the torch binding, kept here so that the binding
// needs no CUDA runtime calls of its own.
#include <cuda_runtime.h>

#include "capsnet_kernels.h"

namespace capsnet {

const char* cuda_error_string(int cuda_error) { return cudaGetErrorString(static_cast<cudaError_t>(cuda_error)); }

int device_sm_count(int device) {
  int value = 0;
  if (cudaDeviceGetAttribute(&value, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) return -1;
  return value;
}

int64_t device_smem_optin(int device) {
  int value = 0;
  if (cudaDeviceGetAttribute(&value, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) return -1;
  return value;
}

}  // namespace capsnet
