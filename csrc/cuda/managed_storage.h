// Striped storage of an aggregate tensor in CUDA managed (unified) memory.
//
// One cudaMallocManaged allocation holds the whole row-major tensor; the rows [start_d, start_{d+1})
// form member d's chunk, preferred on member d's GPU and prefetched there, while every member GPU may
// access all of it. Members compute on views of their chunk tagged with their own device, so torch's
// device checks and stream selection follow the member, not the allocation.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace ms_splatfacto::cuda {

// A CUDA tensor of `shape` in one managed allocation, tagged with the first member's device.
// `chunk_row_starts` has one start per member (the last chunk ends at shape[0]) or one more entry
// equal to shape[0]. Refuses when a GPU's chunks exceed its free memory.
at::Tensor managed_striped_empty(
    at::IntArrayRef shape,
    at::ScalarType dtype,
    at::IntArrayRef member_device_indices,
    at::IntArrayRef chunk_row_starts);

// Rows [row_start, row_start + row_count) of a contiguous `base`, tagged with cuda:device_index.
// The view holds a reference to `base`, so the allocation lives as long as any view of it.
at::Tensor managed_chunk_view(const at::Tensor& base, int64_t row_start, int64_t row_count, int64_t device_index);

// Whether `t`'s data lies in managed memory.
bool is_managed(const at::Tensor& t);

// [preferred location, last prefetch location] of rows [row_start, row_start + row_count) of `base`:
// a device index, -1 for the host, -2 where the range has no single value.
std::vector<int64_t> managed_range_location(const at::Tensor& base, int64_t row_start, int64_t row_count);

// Devices set to access the whole allocation behind `base` (cudaMemAdviseSetAccessedBy).
std::vector<int64_t> managed_accessed_by(const at::Tensor& base);

}  // namespace ms_splatfacto::cuda
