"""Device functions the Triton kernels here share: tile ordering, small integers to floats, the output store.

``store_rounded`` rounds a float32 tile to bfloat16 half-to-even with integer arithmetic before
casting. On the GPU the cast alone already does that; Triton's CPU interpreter truncates instead
(numpy has no bfloat16), and the CI tests the kernels in the interpreter, so the explicit rounding
keeps both on one arithmetic at the cost of three integer ops per output element.
"""
import triton
import triton.language as tl


@triton.jit
def tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped ordering: GROUP_M row tiles share their weight column tiles while these sit in L2."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def round_to_bf16_grid(y):
    """float32 -> the nearest bfloat16 value (ties to even), still float32; NaN and Inf pass."""
    bits = y.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -0x10000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def cast_rounded(y, dtype: tl.constexpr):
    """float32 ``y`` -> ``dtype``, rounded to nearest even on every backend."""
    if dtype == tl.bfloat16:
        y = round_to_bf16_grid(y)
    return y.to(dtype)


@triton.jit
def store_rounded(ptrs, y, mask):
    """Store the float32 tile ``y`` in the pointer's dtype, rounded to nearest even."""
    tl.store(ptrs, cast_rounded(y, ptrs.dtype.element_ty), mask=mask)


@triton.jit
def byte_to_f32(c):
    """An int32 in [0, 255] -> the same value in float32 without an int-to-float conversion
    (quarter rate on the SMs): OR it into the mantissa of 2^23 and subtract 2^23."""
    return (c | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def dot_acc(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b`` on the tensor cores; ``UPCAST`` (set only under the interpreter, whose ``dot``
    multiplies bfloat16 tiles as raw integers) widens to float32 first: bfloat16 products are
    exact in float32, so this is the same float32-accumulated sum."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


def rows_2d(x):
    """``[..., K]`` -> ``[M, K]`` with unit stride along K (a view when possible): what the kernels index."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def as_bytes(t):
    """FP8 tensors travel to the kernels as their bytes: the interpreter cannot hand float8 to numpy."""
    import torch

    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t
