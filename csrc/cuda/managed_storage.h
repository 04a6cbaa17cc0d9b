// Managed (unified) memory for the persistent rows of aggregate tensors (parameters, optimizer
// moments, statistics). The Python side (ms_splatfacto/backend/cuda_storage.py, managed_plan.py)
// plans where every byte goes; these operators only carry the plan out:
//   managed_alloc    one cudaMallocManaged allocation, its start aligned (chunk starts fall on pages);
//   managed_advise   the preferred location of each chunk's pages (a GPU, or the host when the GPU is
//                    full) and access by every member GPU;
//   managed_prefetch many page ranges to one location in one call, on that device's current stream;
//   managed_view     a typed tensor over part of an allocation, tagged with the member that owns it.
// Nothing here replaces torch's allocator: transients stay on its caching allocator, and its
// statistics (torch.cuda.max_memory_allocated, ...) keep working.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace ms_splatfacto::cuda {

// A uint8 tensor of `nbytes` in managed memory tagged with cuda:device_index, whose data pointer is a
// multiple of `alignment` (a power of two). The deleter frees the allocation with cudaFree.
at::Tensor managed_alloc(int64_t nbytes, int64_t alignment, int64_t device_index);

// Byte ranges [offsets[i], offsets[i] + sizes[i]) of managed `base` preferred at locations[i] (a GPU
// index, or -1 for the host); every GPU in `accessed_by` may access all of `base`.
void managed_advise(const at::Tensor& base, at::IntArrayRef offsets, at::IntArrayRef sizes, at::IntArrayRef locations,
                    at::IntArrayRef accessed_by);

// Prefetch the managed byte ranges [addresses[i], addresses[i] + sizes[i]) to `location` (a GPU
// index, or -1 for the host), on the current stream of that GPU (of the current GPU for the host).
void managed_prefetch(at::IntArrayRef addresses, at::IntArrayRef sizes, int64_t location);

// `shape` of `dtype` starting `byte_offset` bytes into `base`, tagged with cuda:device_index; the
// view keeps `base` alive. Only managed memory may be tagged with another device than its own.
at::Tensor managed_view(const at::Tensor& base, int64_t byte_offset, at::IntArrayRef shape, at::ScalarType dtype,
                        int64_t device_index);

// Whether `t`'s data lies in managed memory.
bool is_managed(const at::Tensor& t);

// [preferred location, last prefetch location] of `t`'s bytes: a GPU index, -1 for the host, -2 where
// the bytes have no single value.
std::vector<int64_t> managed_location(const at::Tensor& t);

// GPUs set to access `t`'s bytes (cudaMemAdviseSetAccessedBy).
std::vector<int64_t> managed_accessed_by(const at::Tensor& t);

}  // namespace ms_splatfacto::cuda
