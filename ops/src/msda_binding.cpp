// Torch binding of the multi-scale deformable attention kernels (msda_kernels.cu).
//
// Checks shapes, devices and dtypes using tensor metadata only (no device-to-host copies,
// so no synchronisation), allocates outputs, and launches on the current stream of the
// value's device. Autograd is wired up in python (ops/ms_deform_attn_cuda.py).

// ATen + torch/python.h instead of torch/extension.h: the binding needs no torch C++ API
// beyond tensors and the pybind11 casters, and skipping it halves the compile time.
#include <ATen/ATen.h>
#include <torch/python.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <vector>

#include "msda_kernels.h"

namespace {

msda::DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return msda::DType::kFloat32;
    case at::kHalf:
      return msda::DType::kFloat16;
    case at::kBFloat16:
      return msda::DType::kBFloat16;
    case at::kDouble:
      return msda::DType::kFloat64;
    default:
      TORCH_CHECK(false, "ms_deform_attn: value dtype must be float32, float16, bfloat16 or float64, got ", t);
  }
}

// Locations and weights travel in float32 (float64 for float64 values); see ms_deform_attn_cuda.py.
at::ScalarType coord_dtype(at::ScalarType value_dtype) {
  return value_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

void check_tensor(const at::Tensor& t, const char* name, const at::Tensor& value) {
  TORCH_CHECK(t.is_cuda(), "ms_deform_attn: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == value.device(), "ms_deform_attn: ", name, " is on ", t.device(), " but value is on ",
              value.device());
  TORCH_CHECK(t.is_contiguous(), "ms_deform_attn: ", name, " must be contiguous");
}

msda::Problem check_inputs(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& starts,
                           const at::Tensor& loc, const at::Tensor& attn) {
  check_tensor(value, "value", value);
  check_tensor(shapes, "spatial_shapes", value);
  check_tensor(starts, "level_start_index", value);
  check_tensor(loc, "sampling_locations", value);
  check_tensor(attn, "attention_weights", value);
  kernel_dtype(value.scalar_type());
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be (bs, Lin, heads, C), got ", value.sizes());
  TORCH_CHECK(loc.dim() == 6 && loc.size(5) == 2,
              "ms_deform_attn: sampling_locations must be (bs, Lq, heads, levels, points, 2), got ", loc.sizes());
  TORCH_CHECK(loc.size(0) == value.size(0) && loc.size(2) == value.size(2),
              "ms_deform_attn: sampling_locations ", loc.sizes(), " do not match value ", value.sizes());
  TORCH_CHECK(attn.sizes() == loc.sizes().slice(0, 5), "ms_deform_attn: attention_weights must be ",
              loc.sizes().slice(0, 5), ", got ", attn.sizes());
  const int64_t levels = loc.size(3);
  TORCH_CHECK(shapes.dim() == 2 && shapes.size(0) == levels && shapes.size(1) == 2,
              "ms_deform_attn: spatial_shapes must be (", levels, ", 2), got ", shapes.sizes());
  TORCH_CHECK(starts.dim() == 1 && starts.size(0) == levels, "ms_deform_attn: level_start_index must be (",
              levels, ",), got ", starts.sizes());
  TORCH_CHECK(shapes.scalar_type() == at::kLong && starts.scalar_type() == at::kLong,
              "ms_deform_attn: spatial_shapes and level_start_index must be int64");
  const at::ScalarType coord = coord_dtype(value.scalar_type());
  TORCH_CHECK(loc.scalar_type() == coord && attn.scalar_type() == coord, "ms_deform_attn: with ",
              value.scalar_type(), " values, sampling_locations and attention_weights must be ", coord, ", got ",
              loc.scalar_type(), " and ", attn.scalar_type());
  // The kernel indexes channels and levels with int; tokens and items are 64-bit.
  TORCH_CHECK(value.size(2) * value.size(3) <= INT32_MAX && levels * loc.size(4) <= INT32_MAX,
              "ms_deform_attn: heads * channels or levels * points too large");

  msda::Problem pr;
  pr.batch = value.size(0);
  pr.len_in = value.size(1);
  pr.len_q = loc.size(1);
  pr.heads = static_cast<int>(value.size(2));
  pr.channels = static_cast<int>(value.size(3));
  pr.levels = static_cast<int>(levels);
  pr.points = static_cast<int>(loc.size(4));
  return pr;
}

// cudaGetLastError returns (and clears) the last error of any earlier runtime call on this
// thread, not just of our launch. Clearing it before the launch means the check right after
// the launch (in the launcher) reports this launch only; an error left by someone else is
// reported as such instead of being blamed on the kernel.
void clear_earlier_error(const char* what) {
  const cudaError_t earlier = cudaGetLastError();
  TORCH_CHECK(earlier == cudaSuccess, "ms_deform_attn ", what, ": a CUDA error from an earlier call was pending: ",
              cudaGetErrorString(earlier));
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "ms_deform_attn ", what, " kernel launch failed: ", cudaGetErrorString(err));
}

// value (bs, Lin, heads, C); shapes (levels, 2) int64; starts (levels,) int64;
// loc (bs, Lq, heads, levels, points, 2) and attn (bs, Lq, heads, levels, points) in float32
// (float64 for float64 values). Returns (bs, Lq, heads * C) in value's dtype.
at::Tensor msda_forward(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& starts,
                        const at::Tensor& loc, const at::Tensor& attn) {
  const msda::Problem pr = check_inputs(value, shapes, starts, loc, attn);
  const c10::cuda::CUDAGuard guard(value.device());
  at::Tensor out = at::empty({pr.batch, pr.len_q, static_cast<int64_t>(pr.heads) * pr.channels}, value.options());
  clear_earlier_error("forward");
  check_launch(msda::forward(kernel_dtype(value.scalar_type()), pr, value.data_ptr(), shapes.data_ptr<int64_t>(),
                             starts.data_ptr<int64_t>(), loc.data_ptr(), attn.data_ptr(), out.data_ptr(),
                             c10::cuda::getCurrentCUDAStream()),
               "forward");
  return out;
}

// Same inputs plus grad_out (bs, Lq, heads * C) in value's dtype. Returns
// [grad_value (like value, undefined when !need_grad_value), grad_loc (like loc), grad_attn (like attn)].
std::vector<at::Tensor> msda_backward(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& starts,
                                      const at::Tensor& loc, const at::Tensor& attn, const at::Tensor& grad_out,
                                      bool need_grad_value) {
  const msda::Problem pr = check_inputs(value, shapes, starts, loc, attn);
  check_tensor(grad_out, "grad_output", value);
  TORCH_CHECK(grad_out.scalar_type() == value.scalar_type(), "ms_deform_attn: grad_output must be ",
              value.scalar_type(), ", got ", grad_out.scalar_type());
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(0) == pr.batch && grad_out.size(1) == pr.len_q &&
                  grad_out.size(2) == static_cast<int64_t>(pr.heads) * pr.channels,
              "ms_deform_attn: grad_output must be (bs, Lq, heads * C), got ", grad_out.sizes());
  const c10::cuda::CUDAGuard guard(value.device());

  // Scatter target in float (double for double): see the precision note in msda_kernels.cu.
  const at::ScalarType accum = coord_dtype(value.scalar_type());
  at::Tensor grad_value_acc;
  if (need_grad_value) grad_value_acc = at::zeros(value.sizes(), value.options().dtype(accum));
  // The kernel writes every location and weight gradient. With no channels (heads * C = 0) but
  // some samples, no kernel runs and those gradients are the empty sum over channels: zero.
  const bool kernel_runs = pr.batch > 0 && pr.len_q > 0 && pr.heads > 0 && pr.channels > 0;
  at::Tensor grad_loc = kernel_runs ? at::empty_like(loc) : at::zeros_like(loc);
  at::Tensor grad_attn = kernel_runs ? at::empty_like(attn) : at::zeros_like(attn);
  // Scattering the value gradient with atomicAdd makes its rounding depend on thread order.
  // torch's alert warns or raises under torch.use_deterministic_algorithms(True), as for its
  // own atomic kernels (index_add_, grid_sampler backward, ...).
  if (need_grad_value && kernel_runs) at::globalContext().alertNotDeterministic("ms_deform_attn_backward_cuda");
  clear_earlier_error("backward");
  check_launch(msda::backward(kernel_dtype(value.scalar_type()), pr, value.data_ptr(), shapes.data_ptr<int64_t>(),
                              starts.data_ptr<int64_t>(), loc.data_ptr(), attn.data_ptr(), grad_out.data_ptr(),
                              need_grad_value ? grad_value_acc.data_ptr() : nullptr, grad_loc.data_ptr(),
                              grad_attn.data_ptr(), c10::cuda::getCurrentCUDAStream()),
               "backward");
  at::Tensor grad_value;
  if (need_grad_value) grad_value = grad_value_acc.scalar_type() == value.scalar_type()
                                        ? grad_value_acc
                                        : grad_value_acc.to(value.scalar_type());
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Multi-scale deformable attention CUDA kernels (see ops/ms_deform_attn_cuda.py for autograd)";
  m.def("forward", &msda_forward, "MSDA forward: (value, spatial_shapes, level_start_index, loc, attn) -> out");
  m.def("backward", &msda_backward,
        "MSDA backward: (value, spatial_shapes, level_start_index, loc, attn, grad_out, need_grad_value) -> "
        "[grad_value, grad_loc, grad_attn]");
}
