// Managed-memory allocator for striped aggregate tensors; see managed_storage.h.
//
// Operators live under torch.ops.ms_splatfacto_cuda. They are registered as catch-all kernels
// because the allocator takes no tensor to dispatch on.
#include "managed_storage.h"
#include "mem_location.cuh"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Logging.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <map>
#include <set>
#include <string>

namespace ms_splatfacto::cuda {
namespace {

// Every CUDA call is checked; the message names the call so a failure in the field is traceable.
#define MS_CUDA_CHECK(call)                                                                         \
  do {                                                                                              \
    cudaError_t err_ = (call);                                                                      \
    TORCH_CHECK(err_ == cudaSuccess, "ms_splatfacto_cuda: ", #call, " failed: ",                   \
                cudaGetErrorName(err_), " (", cudaGetErrorString(err_), ")");                       \
  } while (0)

void advise(const void* ptr, size_t bytes, cudaMemoryAdvise advice, int device) {
  MS_CUDA_CHECK(ms_mem_advise(ptr, bytes, advice, device));
}

void prefetch(const void* ptr, size_t bytes, int device, cudaStream_t stream) {
  MS_CUDA_CHECK(ms_mem_prefetch(ptr, bytes, device, stream));
}

// Bytes of one row (the product of the trailing dimensions); a 1-D tensor has one element per row.
int64_t row_bytes_of(at::IntArrayRef shape, at::ScalarType dtype) {
  int64_t bytes = static_cast<int64_t>(c10::elementSize(dtype));
  for (size_t i = 1; i < shape.size(); ++i) {
    TORCH_CHECK(shape[i] >= 0, "ms_splatfacto_cuda: negative size in shape ", shape);
    TORCH_CHECK(shape[i] == 0 || bytes <= INT64_MAX / shape[i], "ms_splatfacto_cuda: shape ", shape, " overflows");
    bytes *= shape[i];
  }
  return bytes;
}

void free_managed(void* ptr) {
  // A deleter must not throw: a failed free is reported and otherwise ignored.
  cudaError_t err = cudaFree(ptr);
  if (err != cudaSuccess) {
    LOG(WARNING) << "ms_splatfacto_cuda: cudaFree of managed memory failed: " << cudaGetErrorString(err);
  }
}

std::vector<int64_t> chunk_bounds(at::IntArrayRef starts, size_t members, int64_t rows) {
  // members + 1 bounds: chunk d is [bounds[d], bounds[d + 1]).
  TORCH_CHECK(starts.size() == members || starts.size() == members + 1, "ms_splatfacto_cuda: ", members,
              " members need ", members, " chunk row starts (or ", members + 1, " bounds), got ", starts.size());
  std::vector<int64_t> bounds(starts.begin(), starts.end());
  if (bounds.size() == members) bounds.push_back(rows);
  TORCH_CHECK(bounds.front() == 0 && bounds.back() == rows, "ms_splatfacto_cuda: chunks must cover rows [0, ", rows,
              "), got bounds ", at::IntArrayRef(bounds));
  for (size_t d = 0; d < members; ++d) {
    TORCH_CHECK(bounds[d] <= bounds[d + 1], "ms_splatfacto_cuda: chunk row starts must not decrease, got ",
                at::IntArrayRef(bounds));
  }
  return bounds;
}

void check_managed_capable(int device) {
  int concurrent = 0;
  MS_CUDA_CHECK(cudaDeviceGetAttribute(&concurrent, cudaDevAttrConcurrentManagedAccess, device));
  TORCH_CHECK(concurrent, "ms_splatfacto_cuda: GPU ", device,
              " lacks concurrent managed access (needed for per-chunk placement); use the plain storage mode");
}

}  // namespace

at::Tensor managed_striped_empty(
    at::IntArrayRef shape,
    at::ScalarType dtype,
    at::IntArrayRef member_device_indices,
    at::IntArrayRef chunk_row_starts) {
  TORCH_CHECK(!shape.empty(), "ms_splatfacto_cuda: a striped tensor needs at least one dimension (its rows)");
  TORCH_CHECK(shape[0] >= 0, "ms_splatfacto_cuda: negative size in shape ", shape);
  const size_t members = member_device_indices.size();
  TORCH_CHECK(members > 0, "ms_splatfacto_cuda: at least one member device is needed");
  int device_count = 0;
  MS_CUDA_CHECK(cudaGetDeviceCount(&device_count));
  for (int64_t d : member_device_indices) {
    TORCH_CHECK(d >= 0 && d < device_count, "ms_splatfacto_cuda: member device cuda:", d, " does not exist (",
                device_count, " visible)");
  }
  const std::vector<int64_t> bounds = chunk_bounds(chunk_row_starts, members, shape[0]);
  const int64_t row_bytes = row_bytes_of(shape, dtype);
  TORCH_CHECK(row_bytes == 0 || shape[0] <= INT64_MAX / row_bytes, "ms_splatfacto_cuda: shape ", shape, " overflows");
  const size_t total_bytes = static_cast<size_t>(shape[0] * row_bytes);

  const auto first = static_cast<c10::DeviceIndex>(member_device_indices[0]);
  const at::Device first_device(at::kCUDA, first);
  const auto options = at::TensorOptions().dtype(dtype).device(first_device);
  if (total_bytes == 0) {
    c10::cuda::CUDAGuard guard(first);
    return at::empty(shape, options);
  }

  // Virtual members may share a GPU: what each GPU must hold is the sum of its members' chunks.
  std::map<int, size_t> bytes_per_gpu;
  for (size_t d = 0; d < members; ++d) {
    bytes_per_gpu[static_cast<int>(member_device_indices[d])] += static_cast<size_t>((bounds[d + 1] - bounds[d]) * row_bytes);
  }
  // Asking for more managed memory than a GPU has free can hang it, so refuse before allocating.
  for (const auto& [gpu, needed] : bytes_per_gpu) {
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(gpu));
    check_managed_capable(gpu);
    size_t free_bytes = 0, total_gpu = 0;
    MS_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_gpu));
    TORCH_CHECK(needed <= free_bytes, "ms_splatfacto_cuda: refusing a managed tensor of shape ", shape, ": its chunks on cuda:",
                gpu, " need ", needed, " bytes but that GPU has only ", free_bytes, " bytes free (of ", total_gpu, ")");
  }

  void* ptr = nullptr;
  {
    c10::cuda::CUDAGuard guard(first);
    MS_CUDA_CHECK(cudaMallocManaged(&ptr, total_bytes, cudaMemAttachGlobal));
  }
  // From here on a failure must not leak the allocation: the tensor owns it before any advice is given.
  at::Tensor result = at::from_blob(ptr, shape, free_managed, options, first_device);
  auto* base = static_cast<char*>(ptr);

  for (int gpu : std::set<int>(member_device_indices.begin(), member_device_indices.end())) {
    advise(base, total_bytes, cudaMemAdviseSetAccessedBy, gpu);
  }
  for (size_t d = 0; d < members; ++d) {
    const size_t offset = static_cast<size_t>(bounds[d] * row_bytes);
    const size_t bytes = static_cast<size_t>((bounds[d + 1] - bounds[d]) * row_bytes);
    if (bytes == 0) continue;
    advise(base + offset, bytes, cudaMemAdviseSetPreferredLocation, static_cast<int>(member_device_indices[d]));
  }
  // Prefetch after all advice so a page shared by two chunks is placed once, by its final owner.
  for (size_t d = 0; d < members; ++d) {
    const size_t offset = static_cast<size_t>(bounds[d] * row_bytes);
    const size_t bytes = static_cast<size_t>((bounds[d + 1] - bounds[d]) * row_bytes);
    if (bytes == 0) continue;
    const auto gpu = static_cast<c10::DeviceIndex>(member_device_indices[d]);
    c10::cuda::CUDAGuard guard(gpu);
    prefetch(base + offset, bytes, gpu, c10::cuda::getCurrentCUDAStream(gpu).stream());
  }
  return result;
}

at::Tensor managed_chunk_view(const at::Tensor& base, int64_t row_start, int64_t row_count, int64_t device_index) {
  TORCH_CHECK(base.is_cuda(), "ms_splatfacto_cuda: managed_chunk_view needs a CUDA tensor, got ", base.device());
  TORCH_CHECK(base.dim() >= 1, "ms_splatfacto_cuda: managed_chunk_view needs a tensor with rows");
  TORCH_CHECK(base.is_contiguous(), "ms_splatfacto_cuda: managed_chunk_view needs a contiguous tensor");
  TORCH_CHECK(row_start >= 0 && row_count >= 0 && row_start + row_count <= base.size(0),
              "ms_splatfacto_cuda: rows [", row_start, ", ", row_start + row_count, ") are outside a tensor of ",
              base.size(0), " rows");
  int device_count = 0;
  MS_CUDA_CHECK(cudaGetDeviceCount(&device_count));
  TORCH_CHECK(device_index >= 0 && device_index < device_count, "ms_splatfacto_cuda: device cuda:", device_index,
              " does not exist (", device_count, " visible)");
  // Re-tagging ordinary device memory would lie about where it lives; only managed memory may move tag.
  TORCH_CHECK(device_index == base.device().index() || base.numel() == 0 || is_managed(base),
              "ms_splatfacto_cuda: only a managed tensor may be viewed from another device (base on ",
              base.device(), ", view asked for cuda:", device_index, ")");

  std::vector<int64_t> sizes = base.sizes().vec();
  sizes[0] = row_count;
  const int64_t row_elems = base.size(0) == 0 ? 0 : base.numel() / base.size(0);
  void* data = static_cast<char*>(base.data_ptr()) + row_start * row_elems * static_cast<int64_t>(base.element_size());
  const at::Device device(at::kCUDA, static_cast<c10::DeviceIndex>(device_index));
  return at::from_blob(data, sizes, [keep = base](void*) {}, base.options().device(device), device);
}

bool is_managed(const at::Tensor& t) {
  if (!t.is_cuda() || t.data_ptr() == nullptr) return false;
  cudaPointerAttributes attr{};
  MS_CUDA_CHECK(cudaPointerGetAttributes(&attr, t.data_ptr()));
  return attr.type == cudaMemoryTypeManaged;
}

std::vector<int64_t> managed_range_location(const at::Tensor& base, int64_t row_start, int64_t row_count) {
  TORCH_CHECK(is_managed(base), "ms_splatfacto_cuda: managed_range_location needs a managed tensor");
  TORCH_CHECK(base.is_contiguous() && base.dim() >= 1 && row_start >= 0 && row_count > 0 &&
                  row_start + row_count <= base.size(0),
              "ms_splatfacto_cuda: managed_range_location needs a non-empty row range of a contiguous tensor");
  const int64_t row_bytes = base.numel() / base.size(0) * static_cast<int64_t>(base.element_size());
  const char* ptr = static_cast<const char*>(base.data_ptr()) + row_start * row_bytes;
  const size_t bytes = static_cast<size_t>(row_count * row_bytes);
  int preferred = 0, last_prefetch = 0;
  MS_CUDA_CHECK(cudaMemRangeGetAttribute(&preferred, sizeof(preferred), cudaMemRangeAttributePreferredLocation, ptr, bytes));
  MS_CUDA_CHECK(cudaMemRangeGetAttribute(&last_prefetch, sizeof(last_prefetch), cudaMemRangeAttributeLastPrefetchLocation,
                                         ptr, bytes));
  return {preferred, last_prefetch};
}

std::vector<int64_t> managed_accessed_by(const at::Tensor& base) {
  TORCH_CHECK(is_managed(base), "ms_splatfacto_cuda: managed_accessed_by needs a managed tensor");
  int device_count = 0;
  MS_CUDA_CHECK(cudaGetDeviceCount(&device_count));
  std::vector<int> devices(static_cast<size_t>(device_count) + 1, cudaInvalidDeviceId);  // +1: the host, -1
  MS_CUDA_CHECK(cudaMemRangeGetAttribute(devices.data(), devices.size() * sizeof(int), cudaMemRangeAttributeAccessedBy,
                                         base.data_ptr(), base.nbytes()));
  std::vector<int64_t> result;
  for (int d : devices) {
    if (d != cudaInvalidDeviceId) result.push_back(d);
  }
  return result;
}

}  // namespace ms_splatfacto::cuda

TORCH_LIBRARY_FRAGMENT(ms_splatfacto_cuda, m) {
  m.def("managed_striped_empty(int[] shape, ScalarType dtype, int[] member_device_indices, int[] chunk_row_starts) -> Tensor",
        &ms_splatfacto::cuda::managed_striped_empty);
  m.def("managed_chunk_view(Tensor base, int row_start, int row_count, int device_index) -> Tensor",
        &ms_splatfacto::cuda::managed_chunk_view);
  m.def("is_managed(Tensor t) -> bool", &ms_splatfacto::cuda::is_managed);
  m.def("managed_range_location(Tensor base, int row_start, int row_count) -> int[]",
        &ms_splatfacto::cuda::managed_range_location);
  m.def("managed_accessed_by(Tensor base) -> int[]", &ms_splatfacto::cuda::managed_accessed_by);
}
