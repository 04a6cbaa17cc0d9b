// A CUDA allocator for torch.cuda.memory.CUDAPluggableAllocator: every CUDA tensor torch allocates
// (op outputs on each member included) becomes managed (unified) memory, preferred on the GPU it is
// allocated for, accessible by every member GPU and prefetched there on the allocating stream.
//
// Built on its own with nvcc into a shared library that needs the CUDA runtime only (no torch), so
// it can be built and installed before torch initialises CUDA, as swapping allocators requires.
// Errors inside ms_managed_malloc are thrown as std::runtime_error, which torch turns into a Python
// RuntimeError; the other exported functions never throw, so ctypes may call them.
#include <cuda_runtime.h>
#include <sys/types.h>

#include <cstdio>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "mem_location.cuh"

namespace {

std::mutex members_mutex;
std::vector<int> member_gpus;  // set by ms_managed_set_members; every one gets SetAccessedBy

std::string cuda_failure(const char* call, cudaError_t err) {
  return std::string("ms_splatfacto managed allocator: ") + call + " failed: " + cudaGetErrorName(err) + " (" +
         cudaGetErrorString(err) + ")";
}

#define MS_TRY(call)                                              \
  do {                                                            \
    cudaError_t err_ = (call);                                    \
    if (err_ != cudaSuccess) return cuda_failure(#call, err_);    \
  } while (0)

// The guard's decision: empty when `bytes` fit in `free_bytes`, else the refusal message. Asking for
// more managed memory than a GPU has free can hang it, so the allocator refuses instead.
std::string refusal(size_t bytes, size_t free_bytes, size_t total_bytes, int device) {
  if (bytes <= free_bytes) return {};
  return "ms_splatfacto managed allocator: refusing " + std::to_string(bytes) + " bytes on cuda:" +
         std::to_string(device) + ", which has only " + std::to_string(free_bytes) + " bytes free (of " +
         std::to_string(total_bytes) + "); use fewer Gaussians per GPU, more GPUs, or the plain storage mode";
}

// Free memory of `device`, leaving the calling thread's current device as it was.
std::string free_memory(int device, size_t* free_bytes, size_t* total_bytes) {
  int previous = 0;
  MS_TRY(cudaGetDevice(&previous));
  MS_TRY(cudaSetDevice(device));
  const cudaError_t err = cudaMemGetInfo(free_bytes, total_bytes);
  MS_TRY(cudaSetDevice(previous));
  if (err != cudaSuccess) return cuda_failure("cudaMemGetInfo", err);
  return {};
}

// Everything but the allocation itself: empty on success, else why `bytes` on `device` are refused.
std::string check(size_t bytes, int device) {
  int count = 0;
  MS_TRY(cudaGetDeviceCount(&count));
  if (device < 0 || device >= count) {
    return "ms_splatfacto managed allocator: cuda:" + std::to_string(device) + " does not exist (" +
           std::to_string(count) + " visible)";
  }
  size_t free_bytes = 0, total_bytes = 0;
  std::string failed = free_memory(device, &free_bytes, &total_bytes);
  return failed.empty() ? refusal(bytes, free_bytes, total_bytes, device) : failed;
}

std::string place(void* ptr, size_t bytes, int device, cudaStream_t stream) {
  std::vector<int> gpus;
  {
    std::lock_guard<std::mutex> lock(members_mutex);
    gpus = member_gpus;
  }
  MS_TRY(ms_mem_advise(ptr, bytes, cudaMemAdviseSetPreferredLocation, device));
  MS_TRY(ms_mem_advise(ptr, bytes, cudaMemAdviseSetAccessedBy, device));
  for (int gpu : gpus) {
    if (gpu != device) MS_TRY(ms_mem_advise(ptr, bytes, cudaMemAdviseSetAccessedBy, gpu));
  }
  MS_TRY(ms_mem_prefetch(ptr, bytes, device, stream));
  return {};
}

void copy_message(const std::string& text, char* out, size_t capacity) {
  if (out == nullptr || capacity == 0) return;
  std::snprintf(out, capacity, "%s", text.c_str());
}

}  // namespace

extern "C" {

// The member GPUs that get cudaMemAdviseSetAccessedBy on every allocation (copied).
void ms_managed_set_members(const int* devices, int count) {
  std::lock_guard<std::mutex> lock(members_mutex);
  member_gpus.assign(devices, devices + (count > 0 ? count : 0));
}

// The allocation function CUDAPluggableAllocator calls (signature fixed by torch).
void* ms_managed_malloc(ssize_t size, int device, cudaStream_t stream) {
  if (size <= 0) return nullptr;
  const auto bytes = static_cast<size_t>(size);
  std::string failed = check(bytes, device);
  if (!failed.empty()) throw std::runtime_error(failed);
  int previous = 0;
  if (cudaGetDevice(&previous) != cudaSuccess) previous = device;
  void* ptr = nullptr;
  cudaSetDevice(device);
  cudaError_t err = cudaMallocManaged(&ptr, bytes, cudaMemAttachGlobal);
  if (err == cudaSuccess) {
    failed = place(ptr, bytes, device, stream);
    if (!failed.empty()) cudaFree(ptr);
  } else {
    failed = cuda_failure("cudaMallocManaged", err);
  }
  cudaSetDevice(previous);
  if (!failed.empty()) throw std::runtime_error(failed);
  return ptr;
}

// The release function CUDAPluggableAllocator calls. cudaFree waits for work using the memory.
void ms_managed_free(void* ptr, ssize_t, int, cudaStream_t) {
  if (ptr == nullptr) return;
  cudaError_t err = cudaFree(ptr);
  if (err != cudaSuccess) std::fprintf(stderr, "%s\n", cuda_failure("cudaFree", err).c_str());
}

// Whether ms_managed_malloc would refuse `bytes` on `device` (the guard and the device checks,
// without allocating): 0 when it would not, else 1 with the reason written to `message`.
int ms_managed_would_refuse(ssize_t bytes, int device, char* message, size_t capacity) {
  const std::string failed = check(bytes > 0 ? static_cast<size_t>(bytes) : 0, device);
  copy_message(failed, message, capacity);
  return failed.empty() ? 0 : 1;
}

// The guard's decision for given free and total memory (testable without a GPU): 0 or 1 as above.
int ms_managed_refusal(size_t bytes, size_t free_bytes, size_t total_bytes, int device, char* message,
                       size_t capacity) {
  const std::string failed = refusal(bytes, free_bytes, total_bytes, device);
  copy_message(failed, message, capacity);
  return failed.empty() ? 0 : 1;
}

}  // extern "C"
