// Launchers for the multi-scale deformable attention kernels (msda_kernels.cu).
//
// Plain C++ interface (raw device pointers, a stream, an error code) so that the .cu file
// needs no torch headers and compiles with nvcc alone; msda_binding.cpp adapts tensors.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace msda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// Problem sizes. All tensors are dense and contiguous:
//   value        (batch, len_in, heads, channels)          of `dtype`
//   shapes       (levels, 2) int64, (H, W) of each level
//   starts       (levels,)   int64, first token of each level in len_in
//   loc          (batch, len_q, heads, levels, points, 2)  normalised (x, y)
//   attn         (batch, len_q, heads, levels, points)
//   out          (batch, len_q, heads * channels)          of `dtype`
// loc and attn (and their gradients) are float, or double when dtype is kFloat64.
struct Problem {
  int64_t batch;
  int64_t len_in;
  int64_t len_q;
  int heads;
  int channels;
  int levels;
  int points;
};

// out = sum over levels and points of attn * bilinear(value, loc), zero padding,
// pixel = loc * size - 0.5 (grid_sample with align_corners=False).
cudaError_t forward(DType dtype, const Problem& problem, const void* value, const int64_t* shapes,
                    const int64_t* starts, const void* loc, const void* attn, void* out,
                    cudaStream_t stream);

// Gradients of `forward` given grad_out (batch, len_q, heads * channels) of `dtype`.
//   grad_value_acc: (batch, len_in, heads, channels) float (double for kFloat64), must be
//                   zeroed by the caller; contributions are atomically added. May be null
//                   when the value gradient is not wanted.
//   grad_loc, grad_attn: shaped like loc and attn; fully overwritten (need no zeroing).
cudaError_t backward(DType dtype, const Problem& problem, const void* value, const int64_t* shapes,
                     const int64_t* starts, const void* loc, const void* attn, const void* grad_out,
                     void* grad_value_acc, void* grad_loc, void* grad_attn, cudaStream_t stream);

}  // namespace msda
