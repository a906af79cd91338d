// Multi-scale deformable attention: forward and backward CUDA kernels.
//
// Only CUDA headers are included so this file compiles in seconds with nvcc alone; the torch
// binding lives in msda_binding.cpp and calls the launchers declared in msda_kernels.h.
//
// Work decomposition
//   One "item" is a (batch, query, head) triple; items are numbered with the head fastest, so
//   item i owns loc[i, :, :, :], attn[i, :, :] and out[i, 0:channels] of the flattened tensors.
//   A group of G lanes (G a power of two <= 32, aligned inside a warp) handles one item. Lane k
//   of the group owns channels [k*VEC, k*VEC+VEC) (then + G*VEC, ... when channels > G*VEC):
//   VEC consecutive channels are read as one 16/8/4/2-byte load (e.g. 8 bf16 or 4 float), so
//   the G lanes read one corner's channel slice of a token as a single coalesced segment.
//   The per-sample work (coordinates, corner weights, bounds) is computed redundantly by the
//   G lanes of the group: it is a handful of instructions, cheaper than sharing it.
//
// Backward without per-sample serialisation
//   d(attn) and d(loc) of a sample are sums over channels, and the group holds all channels of
//   the item, so each lane forms its partial sums in registers and the group reduces them with
//   log2(G) register shuffles; lane 0 then stores the three numbers with plain writes (every
//   sample belongs to exactly one group, so no atomics and no zero-initialised buffer). Only
//   d(value) is a true scatter (many queries sample the same pixel): it is accumulated with
//   atomicAdd into a float (double for double) buffer, vectorised to float2/float4 atomics on
//   sm_90, one atomic per 2/4 channels per corner, and no other temporary memory is used.
//
// Precision
//   Values are widened to float (double for double) as they are loaded; every product and sum
//   is in that type; the output is rounded once to the value dtype. The value gradient is
//   accumulated in float because summing many bf16/fp16 contributions in a half type loses
//   most of the mantissa. Pixel coordinates are split into cell and fraction with an exact
//   product residual (split_coord), so the fraction is accurate to ~1e-7 of a pixel even where
//   loc * W is large.

#include <cstdint>
#include <cstring>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "msda_kernels.h"

// float2/float4 atomicAdd exist on sm_90+ (declared by the CUDA 12.x/13.x runtime headers).
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && \
    (__CUDACC_VER_MAJOR__ > 12 || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 4))
#define MSDA_VECTOR_ATOMICS 1
#else
#define MSDA_VECTOR_ATOMICS 0
#endif

namespace msda {
namespace {

constexpr int kBlockThreads = 256;
constexpr int kMaxLoadBytes = 16;  // widest single global load per lane

// ---------------------------------------------------------------------------------------------
// Types and conversions

template <typename T>
struct AccumOf {
  using type = float;
};
template <>
struct AccumOf<double> {
  using type = double;
};

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int Bytes>
struct RawOf;
template <>
struct RawOf<2> {
  using type = unsigned short;
};
template <>
struct RawOf<4> {
  using type = unsigned int;
};
template <>
struct RawOf<8> {
  using type = uint2;
};
template <>
struct RawOf<16> {
  using type = uint4;
};

__device__ __forceinline__ float widen(float x) { return x; }
__device__ __forceinline__ double widen(double x) { return x; }
__device__ __forceinline__ float widen(__half x) { return __half2float(x); }
__device__ __forceinline__ float widen(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T narrow(typename AccumOf<T>::type x);
template <>
__device__ __forceinline__ float narrow<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ double narrow<double>(double x) {
  return x;
}
template <>
__device__ __forceinline__ __half narrow<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 narrow<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// N consecutive elements at p (aligned to N * sizeof(T)) through the read-only data path,
// widened to the accumulation type. Inputs are never written while a kernel runs.
template <typename T, int N>
__device__ __forceinline__ void load_widened(const T* p, typename AccumOf<T>::type (&dst)[N]) {
  using Raw = typename RawOf<sizeof(T) * N>::type;
  const Raw raw = __ldg(reinterpret_cast<const Raw*>(p));
  Pack<T, N> pack;
  memcpy(&pack, &raw, sizeof(pack));
#pragma unroll
  for (int j = 0; j < N; ++j) dst[j] = widen(pack.v[j]);
}

template <typename T, int N>
__device__ __forceinline__ void store_narrowed(T* p, const typename AccumOf<T>::type (&src)[N]) {
  Pack<T, N> pack;
#pragma unroll
  for (int j = 0; j < N; ++j) pack.v[j] = narrow<T>(src[j]);
  *reinterpret_cast<Pack<T, N>*>(p) = pack;
}

// dst[0:N] += v[0:N] atomically; dst is aligned to min(N, 4) floats.
template <int N>
__device__ __forceinline__ void atomic_add_pack(float* dst, const float (&v)[N]) {
#if MSDA_VECTOR_ATOMICS
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int j = 0; j < N; j += 4)
      atomicAdd(reinterpret_cast<float4*>(dst + j), make_float4(v[j], v[j + 1], v[j + 2], v[j + 3]));
  } else if constexpr (N % 2 == 0) {
#pragma unroll
    for (int j = 0; j < N; j += 2) atomicAdd(reinterpret_cast<float2*>(dst + j), make_float2(v[j], v[j + 1]));
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) atomicAdd(dst + j, v[j]);
  }
#else
#pragma unroll
  for (int j = 0; j < N; ++j) atomicAdd(dst + j, v[j]);
#endif
}

template <int N>
__device__ __forceinline__ void atomic_add_pack(double* dst, const double (&v)[N]) {
#pragma unroll
  for (int j = 0; j < N; ++j) atomicAdd(dst + j, v[j]);
}

// Sum over the lanes of one aligned group of `group` lanes; every lane gets the total.
template <typename A>
__device__ __forceinline__ A group_sum(A v, unsigned mask, int group) {
  for (int offset = group >> 1; offset > 0; offset >>= 1) v += __shfl_xor_sync(mask, v, offset);
  return v;
}

// ---------------------------------------------------------------------------------------------
// Sampling geometry

// Splits the pixel coordinate loc * size - 0.5 into cell = floor(.) and frac in [0, 1].
// In float the rounded product loc * size carries an error of up to half an ulp of the
// product (4e-6 px at 167 px), which shows at a 1e-5 tolerance; the fused multiply-add
// recovers that residual exactly and it is added back to the (small) fraction. The _rn
// intrinsics keep the compiler from contracting these steps into a different rounding.
__device__ __forceinline__ void split_coord(float loc, int size, float& cell, float& frac) {
  const float s = static_cast<float>(size);
  const float product = __fmul_rn(loc, s);
  const float residual = __fmaf_rn(loc, s, -product);  // loc * s == product + residual exactly
  const float shifted = __fsub_rn(product, 0.5f);
  float c = floorf(shifted);
  float f = __fadd_rn(__fsub_rn(shifted, c), residual);
  if (f < 0.f) {  // the residual pushed the point below an integer
    c -= 1.f;
    f += 1.f;
  } else if (f >= 1.f) {
    c += 1.f;
    f -= 1.f;
  }
  cell = c;
  frac = f;
}

__device__ __forceinline__ void split_coord(double loc, int size, double& cell, double& frac) {
  const double x = loc * static_cast<double>(size) - 0.5;
  cell = floor(x);
  frac = x - cell;
}

// The four pixels around a sample, in the order (x0,y0), (x0+1,y0), (x0,y0+1), (x0+1,y0+1).
template <typename A>
struct Footprint {
  int index[4];    // token index inside the level, y * W + x (only meaningful where inside[k])
  bool inside[4];  // corner lies on the map; outside corners read as zero (zero padding)
  A weight[4];     // bilinear weights
  A fx, fy;        // position inside the cell, in [0, 1]
};

// Tokens of `value` from a level's start to the end of the row (len_in - start), or 0 when the
// start lies outside [0, len_in]. A corner whose token index is >= this is treated as outside
// the map, so level shapes or start indices that do not fit `value` can never read or write
// out of bounds (the host raises on them when it can check without a device sync).
__device__ __forceinline__ int64_t tokens_after(int64_t start, int64_t len_in) {
  return (start >= 0 && start <= len_in) ? len_in - start : 0;
}

// Fills f for a normalised location on an h x w level that has `room` tokens of value from its
// start (tokens_after). Returns false when no corner is on the map (the sample contributes
// nothing and has zero gradient) - this also rejects NaN and inf.
template <typename A>
__device__ __forceinline__ bool make_footprint(A loc_x, A loc_y, int h, int w, int64_t room, Footprint<A>& f) {
  A cx, cy;
  split_coord(loc_x, w, cx, f.fx);
  split_coord(loc_y, h, cy, f.fy);
  if (!(cx >= A(-1) && cx < A(w) && cy >= A(-1) && cy < A(h))) return false;
  const int x0 = static_cast<int>(cx);  // safe: the range check bounds cx, cy
  const int y0 = static_cast<int>(cy);
  const int x1 = x0 + 1;
  const int y1 = y0 + 1;
  const bool x0_in = x0 >= 0, x1_in = x1 < w, y0_in = y0 >= 0, y1_in = y1 < h;
  const A gx = A(1) - f.fx;
  const A gy = A(1) - f.fy;
  f.weight[0] = gx * gy;
  f.weight[1] = f.fx * gy;
  f.weight[2] = gx * f.fy;
  f.weight[3] = f.fx * f.fy;
  f.inside[0] = x0_in && y0_in;
  f.inside[1] = x1_in && y0_in;
  f.inside[2] = x0_in && y1_in;
  f.inside[3] = x1_in && y1_in;
  f.index[0] = y0 * w + x0;
  f.index[1] = y0 * w + x1;
  f.index[2] = y1 * w + x0;
  f.index[3] = y1 * w + x1;
#pragma unroll
  for (int k = 0; k < 4; ++k) f.inside[k] = f.inside[k] && f.index[k] < room;
  return true;
}

// ---------------------------------------------------------------------------------------------
// Kernels

template <typename T, int VEC>
__global__ void __launch_bounds__(kBlockThreads)
    msda_forward_kernel(const T* __restrict__ value, const int64_t* __restrict__ shapes,
                        const int64_t* __restrict__ starts, const typename AccumOf<T>::type* __restrict__ loc,
                        const typename AccumOf<T>::type* __restrict__ attn, T* __restrict__ out,
                        const Problem pr, const int64_t items, const int group_log2) {
  using A = typename AccumOf<T>::type;
  const int group = 1 << group_log2;
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t item = thread >> group_log2;
  if (item >= items) return;  // whole groups leave together: no shuffles in this kernel anyway
  const int lane = static_cast<int>(thread & (group - 1));

  const int head = static_cast<int>(item % pr.heads);
  const int64_t batch = item / (pr.len_q * pr.heads);
  const int64_t token_stride = static_cast<int64_t>(pr.heads) * pr.channels;
  const T* value_bh = value + batch * pr.len_in * token_stride + static_cast<int64_t>(head) * pr.channels;
  const int samples = pr.levels * pr.points;
  const A* loc_i = loc + item * samples * 2;
  const A* attn_i = attn + item * samples;
  T* out_i = out + item * pr.channels;

  for (int c0 = lane * VEC; c0 < pr.channels; c0 += group * VEC) {
    A acc[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc[j] = A(0);

    for (int l = 0; l < pr.levels; ++l) {
      const int h = static_cast<int>(shapes[2 * l]);
      const int w = static_cast<int>(shapes[2 * l + 1]);
      const int64_t start = starts[l];
      const int64_t room = tokens_after(start, pr.len_in);
      const T* level = value_bh + start * token_stride + c0;
      for (int p = 0; p < pr.points; ++p) {
        const int s = l * pr.points + p;
        Footprint<A> f;
        if (!make_footprint(loc_i[2 * s], loc_i[2 * s + 1], h, w, room, f)) continue;
        const A a = attn_i[s];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (!f.inside[k]) continue;
          A v[VEC];
          load_widened<T, VEC>(level + f.index[k] * token_stride, v);
          const A coeff = a * f.weight[k];
#pragma unroll
          for (int j = 0; j < VEC; ++j) acc[j] += coeff * v[j];
        }
      }
    }
    store_narrowed<T, VEC>(out_i + c0, acc);
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kBlockThreads)
    msda_backward_kernel(const T* __restrict__ value, const int64_t* __restrict__ shapes,
                         const int64_t* __restrict__ starts, const typename AccumOf<T>::type* __restrict__ loc,
                         const typename AccumOf<T>::type* __restrict__ attn, const T* __restrict__ grad_out,
                         typename AccumOf<T>::type* __restrict__ grad_value,
                         typename AccumOf<T>::type* __restrict__ grad_loc,
                         typename AccumOf<T>::type* __restrict__ grad_attn, const Problem pr, const int64_t items,
                         const int group_log2) {
  using A = typename AccumOf<T>::type;
  const int group = 1 << group_log2;
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t item = thread >> group_log2;
  // Groups are aligned and leave as a whole, so the shuffles below only ever name lanes of
  // groups that are still running.
  if (item >= items) return;
  const int lane = static_cast<int>(thread & (group - 1));
  const unsigned warp_lane = threadIdx.x & 31u;
  const unsigned mask =
      group == 32 ? 0xffffffffu : (((1u << group) - 1u) << (warp_lane & ~static_cast<unsigned>(group - 1)));

  const int head = static_cast<int>(item % pr.heads);
  const int64_t batch = item / (pr.len_q * pr.heads);
  const int64_t token_stride = static_cast<int64_t>(pr.heads) * pr.channels;
  const int64_t bh_offset = batch * pr.len_in * token_stride + static_cast<int64_t>(head) * pr.channels;
  const int samples = pr.levels * pr.points;
  const A* loc_i = loc + item * samples * 2;
  const A* attn_i = attn + item * samples;
  A* grad_loc_i = grad_loc + item * samples * 2;
  A* grad_attn_i = grad_attn + item * samples;
  const T* grad_out_i = grad_out + item * pr.channels;

  const int chunk_width = group * VEC;
  const int chunks = (pr.channels + chunk_width - 1) / chunk_width;  // same for every lane of the group
  for (int chunk = 0; chunk < chunks; ++chunk) {
    const int c0 = chunk * chunk_width + lane * VEC;
    // Lanes past the last channel (odd channel counts) still take part in the reductions.
    const bool active = c0 < pr.channels;
    A g[VEC];
    if (active) {
      load_widened<T, VEC>(grad_out_i + c0, g);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) g[j] = A(0);
    }

    for (int l = 0; l < pr.levels; ++l) {
      const int h = static_cast<int>(shapes[2 * l]);
      const int w = static_cast<int>(shapes[2 * l + 1]);
      const int64_t start = starts[l];
      const int64_t room = tokens_after(start, pr.len_in);
      const int64_t level_offset = bh_offset + start * token_stride + c0;
      for (int p = 0; p < pr.points; ++p) {
        const int s = l * pr.points + p;
        Footprint<A> f;
        const bool hit = make_footprint(loc_i[2 * s], loc_i[2 * s + 1], h, w, room, f);  // uniform in the group
        const A a = attn_i[s];
        A d_attn = A(0), d_fx = A(0), d_fy = A(0);
        if (hit) {
          if (active) {
            A v[4][VEC];
#pragma unroll
            for (int k = 0; k < 4; ++k) {
              if (f.inside[k]) {
                load_widened<T, VEC>(value + level_offset + f.index[k] * token_stride, v[k]);
              } else {
#pragma unroll
                for (int j = 0; j < VEC; ++j) v[k][j] = A(0);
              }
            }
            const A gx = A(1) - f.fx;
            const A gy = A(1) - f.fy;
#pragma unroll
            for (int j = 0; j < VEC; ++j) {
              const A sampled =
                  f.weight[0] * v[0][j] + f.weight[1] * v[1][j] + f.weight[2] * v[2][j] + f.weight[3] * v[3][j];
              d_attn += g[j] * sampled;
              d_fx += g[j] * (gy * (v[1][j] - v[0][j]) + f.fy * (v[3][j] - v[2][j]));
              d_fy += g[j] * (gx * (v[2][j] - v[0][j]) + f.fx * (v[3][j] - v[1][j]));
            }
            if (grad_value != nullptr) {
#pragma unroll
              for (int k = 0; k < 4; ++k) {
                if (!f.inside[k]) continue;
                const A coeff = a * f.weight[k];
                A contrib[VEC];
#pragma unroll
                for (int j = 0; j < VEC; ++j) contrib[j] = coeff * g[j];
                atomic_add_pack<VEC>(grad_value + level_offset + f.index[k] * token_stride, contrib);
              }
            }
          }
          d_attn = group_sum(d_attn, mask, group);
          d_fx = group_sum(d_fx, mask, group);
          d_fy = group_sum(d_fy, mask, group);
        }
        if (lane == 0) {
          // frac_x = loc_x * W - 0.5 - cell, so d frac_x / d loc_x = W (likewise H for y).
          const A d_loc_x = a * static_cast<A>(w) * d_fx;
          const A d_loc_y = a * static_cast<A>(h) * d_fy;
          if (chunk == 0) {
            grad_attn_i[s] = d_attn;
            grad_loc_i[2 * s] = d_loc_x;
            grad_loc_i[2 * s + 1] = d_loc_y;
          } else {  // more channels than one pass covers: this lane owns the sums, no race
            grad_attn_i[s] += d_attn;
            grad_loc_i[2 * s] += d_loc_x;
            grad_loc_i[2 * s + 1] += d_loc_y;
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Launch configuration

bool aligned(const void* p, int bytes) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Widest channel vector (in elements) that divides the channel count and that every pointer
// the kernel reads or writes in channel packs is aligned to. Row offsets are multiples of
// `channels`, hence of the vector, so base alignment is all that needs checking.
template <typename T>
int pick_vec(int channels, const void* a, const void* b, const void* accum) {
  using A = typename AccumOf<T>::type;
  for (int vec = kMaxLoadBytes / static_cast<int>(sizeof(T)); vec > 1; vec /= 2) {
    const int accum_bytes = static_cast<int>(sizeof(A)) * (vec < 4 ? vec : 4);
    if (channels % vec == 0 && aligned(a, vec * sizeof(T)) && aligned(b, vec * sizeof(T)) &&
        aligned(accum, sizeof(A) == 8 ? 8 : accum_bytes))
      return vec;
  }
  return 1;
}

// Lanes per item: enough to cover the channels in one pass, a power of two, at most a warp.
int pick_group_log2(int channels, int vec) {
  const int lanes_needed = (channels + vec - 1) / vec;
  int log2 = 0;
  while (log2 < 5 && (1 << log2) < lanes_needed) ++log2;
  return log2;
}

bool grid_for(int64_t items, int group_log2, dim3& grid) {
  const int64_t threads = items << group_log2;
  const int64_t blocks = (threads + kBlockThreads - 1) / kBlockThreads;
  if (blocks > 0x7fffffffLL) return false;
  grid = dim3(static_cast<unsigned>(blocks));
  return true;
}

template <typename T, int VEC>
cudaError_t launch_forward(const Problem& pr, const void* value, const int64_t* shapes, const int64_t* starts,
                           const void* loc, const void* attn, void* out, cudaStream_t stream) {
  using A = typename AccumOf<T>::type;
  const int64_t items = pr.batch * pr.len_q * pr.heads;
  const int group_log2 = pick_group_log2(pr.channels, VEC);
  dim3 grid;
  if (!grid_for(items, group_log2, grid)) return cudaErrorInvalidConfiguration;
  msda_forward_kernel<T, VEC><<<grid, kBlockThreads, 0, stream>>>(
      static_cast<const T*>(value), shapes, starts, static_cast<const A*>(loc), static_cast<const A*>(attn),
      static_cast<T*>(out), pr, items, group_log2);
  return cudaGetLastError();
}

template <typename T, int VEC>
cudaError_t launch_backward(const Problem& pr, const void* value, const int64_t* shapes, const int64_t* starts,
                            const void* loc, const void* attn, const void* grad_out, void* grad_value,
                            void* grad_loc, void* grad_attn, cudaStream_t stream) {
  using A = typename AccumOf<T>::type;
  const int64_t items = pr.batch * pr.len_q * pr.heads;
  const int group_log2 = pick_group_log2(pr.channels, VEC);
  dim3 grid;
  if (!grid_for(items, group_log2, grid)) return cudaErrorInvalidConfiguration;
  msda_backward_kernel<T, VEC><<<grid, kBlockThreads, 0, stream>>>(
      static_cast<const T*>(value), shapes, starts, static_cast<const A*>(loc), static_cast<const A*>(attn),
      static_cast<const T*>(grad_out), static_cast<A*>(grad_value), static_cast<A*>(grad_loc),
      static_cast<A*>(grad_attn), pr, items, group_log2);
  return cudaGetLastError();
}

bool empty(const Problem& pr) { return pr.batch == 0 || pr.len_q == 0 || pr.heads == 0 || pr.channels == 0; }

template <typename T>
cudaError_t forward_typed(const Problem& pr, const void* value, const int64_t* shapes, const int64_t* starts,
                          const void* loc, const void* attn, void* out, cudaStream_t stream) {
  if (empty(pr)) return cudaSuccess;
  // `if constexpr` keeps packs wider than 16 bytes from being instantiated for wide types.
  switch (pick_vec<T>(pr.channels, value, out, nullptr)) {
    case 8:
      if constexpr (sizeof(T) * 8 <= kMaxLoadBytes)
        return launch_forward<T, 8>(pr, value, shapes, starts, loc, attn, out, stream);
      break;
    case 4:
      if constexpr (sizeof(T) * 4 <= kMaxLoadBytes)
        return launch_forward<T, 4>(pr, value, shapes, starts, loc, attn, out, stream);
      break;
    case 2:
      return launch_forward<T, 2>(pr, value, shapes, starts, loc, attn, out, stream);
    default:
      return launch_forward<T, 1>(pr, value, shapes, starts, loc, attn, out, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t backward_typed(const Problem& pr, const void* value, const int64_t* shapes, const int64_t* starts,
                           const void* loc, const void* attn, const void* grad_out, void* grad_value,
                           void* grad_loc, void* grad_attn, cudaStream_t stream) {
  if (empty(pr)) return cudaSuccess;
  switch (pick_vec<T>(pr.channels, value, grad_out, grad_value)) {
    case 8:
      if constexpr (sizeof(T) * 8 <= kMaxLoadBytes)
        return launch_backward<T, 8>(pr, value, shapes, starts, loc, attn, grad_out, grad_value, grad_loc,
                                     grad_attn, stream);
      break;
    case 4:
      if constexpr (sizeof(T) * 4 <= kMaxLoadBytes)
        return launch_backward<T, 4>(pr, value, shapes, starts, loc, attn, grad_out, grad_value, grad_loc,
                                     grad_attn, stream);
      break;
    case 2:
      return launch_backward<T, 2>(pr, value, shapes, starts, loc, attn, grad_out, grad_value, grad_loc,
                                   grad_attn, stream);
    default:
      return launch_backward<T, 1>(pr, value, shapes, starts, loc, attn, grad_out, grad_value, grad_loc,
                                   grad_attn, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t forward(DType dtype, const Problem& problem, const void* value, const int64_t* shapes,
                    const int64_t* starts, const void* loc, const void* attn, void* out, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return forward_typed<float>(problem, value, shapes, starts, loc, attn, out, stream);
    case DType::kFloat16:
      return forward_typed<__half>(problem, value, shapes, starts, loc, attn, out, stream);
    case DType::kBFloat16:
      return forward_typed<__nv_bfloat16>(problem, value, shapes, starts, loc, attn, out, stream);
    case DType::kFloat64:
      return forward_typed<double>(problem, value, shapes, starts, loc, attn, out, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t backward(DType dtype, const Problem& problem, const void* value, const int64_t* shapes,
                     const int64_t* starts, const void* loc, const void* attn, const void* grad_out,
                     void* grad_value_acc, void* grad_loc, void* grad_attn, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return backward_typed<float>(problem, value, shapes, starts, loc, attn, grad_out, grad_value_acc, grad_loc,
                                   grad_attn, stream);
    case DType::kFloat16:
      return backward_typed<__half>(problem, value, shapes, starts, loc, attn, grad_out, grad_value_acc,
                                    grad_loc, grad_attn, stream);
    case DType::kBFloat16:
      return backward_typed<__nv_bfloat16>(problem, value, shapes, starts, loc, attn, grad_out, grad_value_acc,
                                           grad_loc, grad_attn, stream);
    case DType::kFloat64:
      return backward_typed<double>(problem, value, shapes, starts, loc, attn, grad_out, grad_value_acc,
                                    grad_loc, grad_attn, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace msda
