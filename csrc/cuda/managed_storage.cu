// Managed memory for persistent aggregate rows; see managed_storage.h.
//
// Operators live under torch.ops.ms_splatfacto_cuda. They are registered as catch-all kernels
// because managed_alloc and managed_prefetch take no tensor to dispatch on.
#include "managed_storage.h"
#include "mem_location.cuh"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Logging.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cstdint>
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

int visible_gpus() {
  int count = 0;
  MS_CUDA_CHECK(cudaGetDeviceCount(&count));
  return count;
}

void check_gpu(int64_t device, const char* role) {
  const int count = visible_gpus();
  TORCH_CHECK(device >= 0 && device < count, "ms_splatfacto_cuda: ", role, " cuda:", device, " does not exist (",
              count, " visible)");
}

// A location is a GPU index or the host (cudaCpuDeviceId).
void check_location(int64_t location) {
  if (location != cudaCpuDeviceId) check_gpu(location, "location");
}

void check_managed_capable(int device) {
  int concurrent = 0;
  MS_CUDA_CHECK(cudaDeviceGetAttribute(&concurrent, cudaDevAttrConcurrentManagedAccess, device));
  TORCH_CHECK(concurrent, "ms_splatfacto_cuda: GPU ", device,
              " lacks concurrent managed access (needed for per-chunk placement); use --pipeline.model.storage plain");
}

void free_managed(void* ptr) {
  // A deleter must not throw: a failed free is reported and otherwise ignored.
  const cudaError_t err = cudaFree(ptr);
  if (err != cudaSuccess) {
    LOG(WARNING) << "ms_splatfacto_cuda: cudaFree of managed memory failed: " << cudaGetErrorString(err);
  }
}

void check_range(const at::Tensor& base, int64_t offset, int64_t size) {
  TORCH_CHECK(offset >= 0 && size >= 0 && offset <= static_cast<int64_t>(base.nbytes()) - size,
              "ms_splatfacto_cuda: bytes [", offset, ", ", offset + size, ") lie outside an allocation of ",
              base.nbytes(), " bytes");
}

}  // namespace

at::Tensor managed_alloc(int64_t nbytes, int64_t alignment, int64_t device_index) {
  TORCH_CHECK(nbytes > 0, "ms_splatfacto_cuda: managed_alloc needs a positive size, got ", nbytes);
  TORCH_CHECK(alignment > 0 && (alignment & (alignment - 1)) == 0,
              "ms_splatfacto_cuda: the alignment must be a power of two, got ", alignment);
  TORCH_CHECK(nbytes <= INT64_MAX - alignment, "ms_splatfacto_cuda: ", nbytes, " bytes overflow");
  check_gpu(device_index, "member");
  const auto device = static_cast<c10::DeviceIndex>(device_index);
  check_managed_capable(device);
  c10::cuda::CUDAGuard guard(device);
  void* raw = nullptr;
  // One alignment more than asked, so the start can be moved onto a page. The slack is never touched,
  // so no memory backs it: managed pages are populated on first touch or prefetch.
  MS_CUDA_CHECK(cudaMallocManaged(&raw, static_cast<size_t>(nbytes + alignment), cudaMemAttachGlobal));
  const auto start = (reinterpret_cast<uintptr_t>(raw) + alignment - 1) & ~static_cast<uintptr_t>(alignment - 1);
  const at::Device target(at::kCUDA, device);
  return at::from_blob(reinterpret_cast<void*>(start), {nbytes}, [raw](void*) { free_managed(raw); },
                       at::TensorOptions().dtype(at::kByte).device(target), target);
}

void managed_advise(const at::Tensor& base, at::IntArrayRef offsets, at::IntArrayRef sizes, at::IntArrayRef locations,
                    at::IntArrayRef accessed_by) {
  TORCH_CHECK(is_managed(base), "ms_splatfacto_cuda: managed_advise needs a managed tensor");
  TORCH_CHECK(offsets.size() == sizes.size() && sizes.size() == locations.size(),
              "ms_splatfacto_cuda: managed_advise needs one offset, size and location per range, got ", offsets.size(),
              ", ", sizes.size(), " and ", locations.size());
  auto* data = static_cast<char*>(base.data_ptr());
  for (int64_t gpu : accessed_by) {
    check_gpu(gpu, "accessing GPU");
    MS_CUDA_CHECK(ms_mem_advise(data, base.nbytes(), cudaMemAdviseSetAccessedBy, static_cast<int>(gpu)));
  }
  for (size_t i = 0; i < offsets.size(); ++i) {
    check_range(base, offsets[i], sizes[i]);
    check_location(locations[i]);
    if (sizes[i] == 0) continue;
    MS_CUDA_CHECK(ms_mem_advise(data + offsets[i], static_cast<size_t>(sizes[i]), cudaMemAdviseSetPreferredLocation,
                                static_cast<int>(locations[i])));
  }
}

void managed_prefetch(at::IntArrayRef addresses, at::IntArrayRef sizes, int64_t location) {
  TORCH_CHECK(addresses.size() == sizes.size(), "ms_splatfacto_cuda: managed_prefetch needs one size per address, got ",
              addresses.size(), " and ", sizes.size());
  check_location(location);
  std::vector<void*> ptrs;
  std::vector<size_t> bytes;
  for (size_t i = 0; i < addresses.size(); ++i) {
    TORCH_CHECK(addresses[i] > 0 && sizes[i] >= 0, "ms_splatfacto_cuda: bad prefetch range ", addresses[i], " + ",
                sizes[i]);
    if (sizes[i] == 0) continue;
    ptrs.push_back(reinterpret_cast<void*>(static_cast<uintptr_t>(addresses[i])));
    bytes.push_back(static_cast<size_t>(sizes[i]));
  }
  if (ptrs.empty()) return;
  const c10::cuda::CUDAStream stream = location == cudaCpuDeviceId
                                           ? c10::cuda::getCurrentCUDAStream()
                                           : c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(location));
  c10::cuda::CUDAGuard guard(stream.device_index());
  MS_CUDA_CHECK(ms_mem_prefetch_batch(ptrs.data(), bytes.data(), ptrs.size(), static_cast<int>(location), stream.stream()));
}

at::Tensor managed_view(const at::Tensor& base, int64_t byte_offset, at::IntArrayRef shape, at::ScalarType dtype,
                        int64_t device_index) {
  TORCH_CHECK(base.is_cuda() && base.is_contiguous(), "ms_splatfacto_cuda: managed_view needs a contiguous CUDA tensor");
  int64_t numel = 1;
  for (int64_t s : shape) {
    TORCH_CHECK(s >= 0 && (s == 0 || numel <= INT64_MAX / s), "ms_splatfacto_cuda: bad view shape ", shape);
    numel *= s;
  }
  const auto item = static_cast<int64_t>(c10::elementSize(dtype));
  TORCH_CHECK(numel <= INT64_MAX / item, "ms_splatfacto_cuda: view shape ", shape, " overflows");
  TORCH_CHECK(byte_offset % item == 0, "ms_splatfacto_cuda: byte offset ", byte_offset, " is not a multiple of ", item);
  check_range(base, byte_offset, numel * item);
  check_gpu(device_index, "view");
  // Re-tagging ordinary device memory would lie about where it lives; only managed memory may move tag.
  TORCH_CHECK(device_index == base.device().index() || numel == 0 || is_managed(base),
              "ms_splatfacto_cuda: only a managed tensor may be viewed from another device (base on ", base.device(),
              ", view asked for cuda:", device_index, ")");
  const at::Device device(at::kCUDA, static_cast<c10::DeviceIndex>(device_index));
  void* data = static_cast<char*>(base.data_ptr()) + byte_offset;
  return at::from_blob(data, shape, [keep = base](void*) {}, at::TensorOptions().dtype(dtype).device(device), device);
}

bool is_managed(const at::Tensor& t) {
  if (!t.is_cuda() || t.data_ptr() == nullptr) return false;
  cudaPointerAttributes attr{};
  MS_CUDA_CHECK(cudaPointerGetAttributes(&attr, t.data_ptr()));
  return attr.type == cudaMemoryTypeManaged;
}

std::vector<int64_t> managed_location(const at::Tensor& t) {
  TORCH_CHECK(is_managed(t) && t.is_contiguous() && t.nbytes() > 0,
              "ms_splatfacto_cuda: managed_location needs a non-empty contiguous managed tensor");
  int preferred = 0, last_prefetch = 0;
  MS_CUDA_CHECK(cudaMemRangeGetAttribute(&preferred, sizeof(preferred), cudaMemRangeAttributePreferredLocation,
                                         t.data_ptr(), t.nbytes()));
  MS_CUDA_CHECK(cudaMemRangeGetAttribute(&last_prefetch, sizeof(last_prefetch),
                                         cudaMemRangeAttributeLastPrefetchLocation, t.data_ptr(), t.nbytes()));
  return {preferred, last_prefetch};
}

std::vector<int64_t> managed_accessed_by(const at::Tensor& t) {
  TORCH_CHECK(is_managed(t) && t.nbytes() > 0, "ms_splatfacto_cuda: managed_accessed_by needs a non-empty managed tensor");
  std::vector<int> devices(static_cast<size_t>(visible_gpus()) + 1, cudaInvalidDeviceId);  // +1: the host
  MS_CUDA_CHECK(cudaMemRangeGetAttribute(devices.data(), devices.size() * sizeof(int), cudaMemRangeAttributeAccessedBy,
                                         t.data_ptr(), t.nbytes()));
  std::vector<int64_t> result;
  for (int d : devices) {
    if (d != cudaInvalidDeviceId) result.push_back(d);
  }
  return result;
}

}  // namespace ms_splatfacto::cuda

TORCH_LIBRARY_FRAGMENT(ms_splatfacto_cuda, m) {
  m.def("managed_alloc(int nbytes, int alignment, int device_index) -> Tensor", &ms_splatfacto::cuda::managed_alloc);
  m.def("managed_advise(Tensor base, int[] offsets, int[] sizes, int[] locations, int[] accessed_by) -> ()",
        &ms_splatfacto::cuda::managed_advise);
  m.def("managed_prefetch(int[] addresses, int[] sizes, int location) -> ()", &ms_splatfacto::cuda::managed_prefetch);
  m.def("managed_view(Tensor base, int byte_offset, int[] shape, ScalarType dtype, int device_index) -> Tensor",
        &ms_splatfacto::cuda::managed_view);
  m.def("is_managed(Tensor t) -> bool", &ms_splatfacto::cuda::is_managed);
  m.def("managed_location(Tensor t) -> int[]", &ms_splatfacto::cuda::managed_location);
  m.def("managed_accessed_by(Tensor t) -> int[]", &ms_splatfacto::cuda::managed_accessed_by);
}
