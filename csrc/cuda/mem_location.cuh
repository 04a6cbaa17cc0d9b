// Managed-memory hints for every CUDA version we build with: CUDA 13 replaced the int device of
// cudaMemAdvise / cudaMemPrefetchAsync by a cudaMemLocation. A location is a GPU index, or
// cudaCpuDeviceId (-1) for host memory, where oversubscribed rows live. Callers check the error.
#pragma once

#include <cuda_runtime.h>

#if CUDART_VERSION >= 13000
inline cudaMemLocation ms_mem_location(int location) {
  cudaMemLocation loc{};
  if (location == cudaCpuDeviceId) {
    loc.type = cudaMemLocationTypeHost;
    loc.id = 0;  // ignored for the host
  } else {
    loc.type = cudaMemLocationTypeDevice;
    loc.id = location;
  }
  return loc;
}
#endif

inline cudaError_t ms_mem_advise(const void* ptr, size_t bytes, cudaMemoryAdvise advice, int location) {
#if CUDART_VERSION >= 13000
  return cudaMemAdvise(ptr, bytes, advice, ms_mem_location(location));
#else
  return cudaMemAdvise(ptr, bytes, advice, location);
#endif
}

inline cudaError_t ms_mem_prefetch(const void* ptr, size_t bytes, int location, cudaStream_t stream) {
#if CUDART_VERSION >= 13000
  return cudaMemPrefetchAsync(ptr, bytes, ms_mem_location(location), 0, stream);
#else
  return cudaMemPrefetchAsync(ptr, bytes, location, stream);
#endif
}

// Many ranges to one location in one call where the runtime has a batch call (CUDA 13) and the stream
// is not the legacy default stream (which the batch call refuses); else one call per range.
inline cudaError_t ms_mem_prefetch_batch(void** ptrs, size_t* sizes, size_t count, int location, cudaStream_t stream) {
#if CUDART_VERSION >= 13000
  if (count > 1 && stream != nullptr) {
    cudaMemLocation loc = ms_mem_location(location);
    size_t first = 0;
    return cudaMemPrefetchBatchAsync(ptrs, sizes, count, &loc, &first, 1, 0, stream);
  }
#endif
  for (size_t i = 0; i < count; ++i) {
    const cudaError_t err = ms_mem_prefetch(ptrs[i], sizes[i], location, stream);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}
