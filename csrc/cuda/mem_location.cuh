// Managed-memory hints on one GPU, for every CUDA version we build with: CUDA 13 replaced the int
// device of cudaMemAdvise / cudaMemPrefetchAsync by a cudaMemLocation. Plain CUDA (no torch), so the
// standalone allocator library and the torch extension share it; callers check the returned error.
#pragma once

#include <cuda_runtime.h>

inline cudaError_t ms_mem_advise(const void* ptr, size_t bytes, cudaMemoryAdvise advice, int device) {
#if CUDART_VERSION >= 13000
  cudaMemLocation loc{};
  loc.type = cudaMemLocationTypeDevice;
  loc.id = device;
  return cudaMemAdvise(ptr, bytes, advice, loc);
#else
  return cudaMemAdvise(ptr, bytes, advice, device);
#endif
}

inline cudaError_t ms_mem_prefetch(const void* ptr, size_t bytes, int device, cudaStream_t stream) {
#if CUDART_VERSION >= 13000
  cudaMemLocation loc{};
  loc.type = cudaMemLocationTypeDevice;
  loc.id = device;
  return cudaMemPrefetchAsync(ptr, bytes, loc, 0, stream);
#else
  return cudaMemPrefetchAsync(ptr, bytes, device, stream);
#endif
}
