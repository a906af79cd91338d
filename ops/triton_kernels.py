"""Triton kernels of multi-scale deformable attention (forward and backward).

Importing this module imports ``triton`` and defines the kernels; ``ops`` only imports it on
first use of the Triton operator (see ``ops/_triton.py``). Triton reads ``TRITON_INTERPRET``
when a kernel is *defined*, so the variable must be set before this import for the kernels to
run on CPU tensors through Triton's interpreter (how CI executes them). ``INTERPRETED`` records
which kind of kernel this process got.

Layout (all tensors contiguous, offsets computed in int64):
    value       (bs, Lin, heads, C)                       fp32 / fp16 / bf16 / fp64
    shapes      (levels, 2) int64 (H, W);  starts (levels,) int64
    locations   (bs, Lq, heads, levels, points, 2)        fp32 (fp64 with fp64 value)
    weights     (bs, Lq, heads, levels, points)           same dtype as locations
    out         (bs, Lq, heads * C)                       value's dtype

Grid: (cdiv(Lq, BLOCK_Q), heads, bs). Each program owns a [BLOCK_Q, BLOCK_C] tile: BLOCK_Q
queries of one head and the whole channel range (BLOCK_C = next power of two >= C, the tail
masked). The numbers of levels and points are compile-time constants, but their loops are not
unrolled: unrolling all 16 samples x 4 corners made one sm_90 compilation ~40x slower (35k
instead of 3k lines of PTX for the forward), which autotuning multiplies by its configurations.
Level sizes are read from ``shapes`` on the device rather than baked in as constants, so a new
image size neither syncs nor recompiles.

Sampling convention (the PyTorch path's, grid_sample with align_corners=False, zero padding):
pixel x = loc_x * W - 0.5; the four neighbours outside the map, or past the end of ``value``,
read as zero. Coordinates and sums are fp32 (fp64 when ACC_FP64) whatever the value dtype.

The backward keeps the location and weight gradients in registers (the program holds every
channel, so the channel sums need no atomics) and scatters the value gradient with atomic adds
into a zeroed fp32 (fp64) buffer: that part is order-dependent, hence non-deterministic.
"""
import os

import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _configs():
    """Launch configurations to autotune over; the interpreter ignores warps and stages, so one."""
    if INTERPRETED:
        return [triton.Config({"BLOCK_Q": 4}, num_warps=1, num_stages=1)]
    # num_stages is 1: the loads are gathers whose addresses come from the same iteration, which
    # Triton's software pipeliner leaves alone (num_stages=2 compiled to the same PTX).
    return [triton.Config({"BLOCK_Q": q}, num_warps=w, num_stages=1)
            for q, w in ((16, 2), (32, 2), (32, 4), (64, 4), (64, 8), (128, 8))]


# The tuned choice depends on the tile width and the loop sizes; the dtypes of the
# tensor arguments are added to the key by Triton. Lq is left out on purpose: the encoder's
# Lq changes with every image size and would re-tune all the time.
TUNING_KEY = ["BLOCK_C", "LEVELS", "POINTS", "ACC_FP64"]


@triton.jit
def _bilinear_setup(loc_ptr, sample, q_mask, H, W, ACC: tl.constexpr):
    """Pixel corner (x0, y0) and fractions (fx, fy) of BLOCK_Q samples; off-map samples park at (-2, -2).

    A sample touches the map only when x is in [-1, W) and y in [-1, H); outside (NaN included)
    its coordinates are moved to -2 so that all four corners are off the map and every weight
    and gradient is exactly zero, instead of multiplying NaN or huge fractions by zero.
    """
    px = tl.load(loc_ptr + 2 * sample, mask=q_mask, other=-2.0).to(ACC) * W.to(ACC) - 0.5
    py = tl.load(loc_ptr + 2 * sample + 1, mask=q_mask, other=-2.0).to(ACC) * H.to(ACC) - 0.5
    on_map = (px >= -1.0) & (px < W.to(ACC)) & (py >= -1.0) & (py < H.to(ACC))
    px = tl.where(on_map, px, -2.0)
    py = tl.where(on_map, py, -2.0)
    x0f = tl.floor(px)
    y0f = tl.floor(py)
    return x0f.to(tl.int64), y0f.to(tl.int64), px - x0f, py - y0f


@triton.jit
def _corner_offsets(x, y, q_mask, H, W, start, len_in, token_stride, head_base, channel, c_mask):
    """Element offsets [BLOCK_Q, BLOCK_C] of pixel (x, y) of one level and where it may be read."""
    token = start + y * W + x
    inside = q_mask & (x >= 0) & (x < W) & (y >= 0) & (y < H) & (token < len_in)
    offsets = head_base + token[:, None] * token_stride + channel[None, :]
    return offsets, inside[:, None] & c_mask[None, :]


@triton.jit
def _load_corners(value_ptr, x0, y0, q_mask, H, W, start, len_in, token_stride, head_base, channel, c_mask,
                  ACC: tl.constexpr):
    """The four neighbours (x0, y0), (x0+1, y0), (x0, y0+1), (x0+1, y0+1), each [BLOCK_Q, BLOCK_C] in ACC."""
    off00, in00 = _corner_offsets(x0, y0, q_mask, H, W, start, len_in, token_stride, head_base, channel, c_mask)
    off10, in10 = _corner_offsets(x0 + 1, y0, q_mask, H, W, start, len_in, token_stride, head_base, channel,
                                  c_mask)
    off01, in01 = _corner_offsets(x0, y0 + 1, q_mask, H, W, start, len_in, token_stride, head_base, channel,
                                  c_mask)
    off11, in11 = _corner_offsets(x0 + 1, y0 + 1, q_mask, H, W, start, len_in, token_stride, head_base,
                                  channel, c_mask)
    return (tl.load(value_ptr + off00, mask=in00, other=0.0).to(ACC),
            tl.load(value_ptr + off10, mask=in10, other=0.0).to(ACC),
            tl.load(value_ptr + off01, mask=in01, other=0.0).to(ACC),
            tl.load(value_ptr + off11, mask=in11, other=0.0).to(ACC))


@triton.autotune(configs=_configs(), key=TUNING_KEY)
@triton.jit
def msda_forward_kernel(value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, out_ptr,
                        len_in, len_q, heads, channels,
                        LEVELS: tl.constexpr, POINTS: tl.constexpr, BLOCK_C: tl.constexpr,
                        ACC_FP64: tl.constexpr, BLOCK_Q: tl.constexpr):
    """out[b, q, h*C + c] = sum over levels, points of weight * bilinear sample of value[b, :, h, c]."""
    ACC: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    b = tl.program_id(2).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    q = tl.program_id(0).to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    channel = tl.arange(0, BLOCK_C)
    q_mask = q < len_q
    c_mask = channel < channels
    token_stride = heads * channels
    head_base = b * len_in * token_stride + h * channels
    row = (b * len_q + q) * heads + h  # (b, q, h) flattened: index into weights / LEVELS*POINTS

    acc = tl.zeros([BLOCK_Q, BLOCK_C], dtype=ACC)
    for lvl in tl.range(0, LEVELS):
        H = tl.load(shapes_ptr + 2 * lvl)
        W = tl.load(shapes_ptr + 2 * lvl + 1)
        start = tl.load(starts_ptr + lvl)
        for p in tl.range(0, POINTS):
            sample = row * (LEVELS * POINTS) + lvl * POINTS + p
            x0, y0, fx, fy = _bilinear_setup(loc_ptr, sample, q_mask, H, W, ACC)
            weight = tl.load(attn_ptr + sample, mask=q_mask, other=0.0).to(ACC)
            v00, v10, v01, v11 = _load_corners(value_ptr, x0, y0, q_mask, H, W, start, len_in, token_stride,
                                               head_base, channel, c_mask, ACC)
            gx = 1.0 - fx
            gy = 1.0 - fy
            sampled = (gx * gy)[:, None] * v00 + (fx * gy)[:, None] * v10 \
                + (gx * fy)[:, None] * v01 + (fx * fy)[:, None] * v11
            acc += weight[:, None] * sampled

    out_offsets = row[:, None] * channels + channel[None, :]
    tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=q_mask[:, None] & c_mask[None, :])


@triton.autotune(configs=_configs(), key=TUNING_KEY, reset_to_zero=["grad_value_ptr"])
@triton.jit
def msda_backward_kernel(value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, grad_out_ptr,
                         grad_value_ptr, grad_loc_ptr, grad_attn_ptr,
                         len_in, len_q, heads, channels,
                         LEVELS: tl.constexpr, POINTS: tl.constexpr, BLOCK_C: tl.constexpr,
                         ACC_FP64: tl.constexpr, NEED_VALUE: tl.constexpr, BLOCK_Q: tl.constexpr):
    """Gradients of the forward: weights and locations stored per sample, value scattered atomically.

    With g = grad_out tile and v00..v11 the four corners (each [BLOCK_Q, C]):
        grad_weight = sum_c g * sample
        grad_loc_x  = weight * W * sum_c g * ((1 - fy)(v10 - v00) + fy (v11 - v01))
        grad_loc_y  = weight * H * sum_c g * ((1 - fx)(v01 - v00) + fx (v11 - v10))
        grad_value[corner] += weight * wx * wy * g
    """
    ACC: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    b = tl.program_id(2).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    q = tl.program_id(0).to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    channel = tl.arange(0, BLOCK_C)
    q_mask = q < len_q
    c_mask = channel < channels
    token_stride = heads * channels
    head_base = b * len_in * token_stride + h * channels
    row = (b * len_q + q) * heads + h
    tile_mask = q_mask[:, None] & c_mask[None, :]
    g = tl.load(grad_out_ptr + row[:, None] * channels + channel[None, :], mask=tile_mask, other=0.0).to(ACC)

    for lvl in tl.range(0, LEVELS):
        H = tl.load(shapes_ptr + 2 * lvl)
        W = tl.load(shapes_ptr + 2 * lvl + 1)
        start = tl.load(starts_ptr + lvl)
        for p in tl.range(0, POINTS):
            sample = row * (LEVELS * POINTS) + lvl * POINTS + p
            x0, y0, fx, fy = _bilinear_setup(loc_ptr, sample, q_mask, H, W, ACC)
            weight = tl.load(attn_ptr + sample, mask=q_mask, other=0.0).to(ACC)
            off00, in00 = _corner_offsets(x0, y0, q_mask, H, W, start, len_in, token_stride, head_base,
                                          channel, c_mask)
            off10, in10 = _corner_offsets(x0 + 1, y0, q_mask, H, W, start, len_in, token_stride, head_base,
                                          channel, c_mask)
            off01, in01 = _corner_offsets(x0, y0 + 1, q_mask, H, W, start, len_in, token_stride, head_base,
                                          channel, c_mask)
            off11, in11 = _corner_offsets(x0 + 1, y0 + 1, q_mask, H, W, start, len_in, token_stride,
                                          head_base, channel, c_mask)
            v00 = tl.load(value_ptr + off00, mask=in00, other=0.0).to(ACC)
            v10 = tl.load(value_ptr + off10, mask=in10, other=0.0).to(ACC)
            v01 = tl.load(value_ptr + off01, mask=in01, other=0.0).to(ACC)
            v11 = tl.load(value_ptr + off11, mask=in11, other=0.0).to(ACC)
            gx = 1.0 - fx
            gy = 1.0 - fy
            sampled = (gx * gy)[:, None] * v00 + (fx * gy)[:, None] * v10 \
                + (gx * fy)[:, None] * v01 + (fx * fy)[:, None] * v11
            tl.store(grad_attn_ptr + sample, tl.sum(g * sampled, axis=1).to(grad_attn_ptr.dtype.element_ty),
                     mask=q_mask)
            d_x = gy[:, None] * (v10 - v00) + fy[:, None] * (v11 - v01)
            d_y = gx[:, None] * (v01 - v00) + fx[:, None] * (v11 - v10)
            grad_x = weight * W.to(ACC) * tl.sum(g * d_x, axis=1)
            grad_y = weight * H.to(ACC) * tl.sum(g * d_y, axis=1)
            tl.store(grad_loc_ptr + 2 * sample, grad_x.to(grad_loc_ptr.dtype.element_ty), mask=q_mask)
            tl.store(grad_loc_ptr + 2 * sample + 1, grad_y.to(grad_loc_ptr.dtype.element_ty), mask=q_mask)
            if NEED_VALUE:  # relaxed: only the final sums matter, no ordering between the adds
                gw = weight[:, None] * g
                tl.atomic_add(grad_value_ptr + off00, gw * (gx * gy)[:, None], mask=in00, sem="relaxed")
                tl.atomic_add(grad_value_ptr + off10, gw * (fx * gy)[:, None], mask=in10, sem="relaxed")
                tl.atomic_add(grad_value_ptr + off01, gw * (gx * fy)[:, None], mask=in01, sem="relaxed")
                tl.atomic_add(grad_value_ptr + off11, gw * (fx * fy)[:, None], mask=in11, sem="relaxed")
