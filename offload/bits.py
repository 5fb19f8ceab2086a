"""bf16 as bits, for the numba kernels of `offload.kernels`: loads, stores and rounding, plus a prefetch.

bf16 is handled as its 16-bit pattern (`uint16`): a bf16 value is the high half of an fp32, and fp32 ->
bf16 rounds to nearest even with NaN mapped to 0x7FC0, bit-identical to `torch.Tensor.to(torch.bfloat16)`.
`load_f32(a, i, j)` / `store_f32(a, i, j, x)` read and write a float32 or bf16-bits array as float32, so
one kernel source serves both; `put_bits(o, j, b)` stores fp32 bits, rounded when `o` holds bf16.
`prefetch(addr)` is a software prefetch of one cache line (the gather's rows are random, so the hardware
prefetcher cannot know the next one). All are inlined into the kernels that call them.
"""

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

__all__ = ["ABS_MASK", "EXP_MASK", "u32_as_f32", "f32_as_u32", "bits_to_bf16", "load_f32", "store_f32", "prefetch",
           "put_bits"]

EXP_MASK = np.uint32(0x7F800000)  # fp32 exponent bits: above them (abs) is NaN
ABS_MASK = np.uint32(0x7FFFFFFF)  # fp32 bits without the sign


@intrinsic
def u32_as_f32(typingctx, x):
    if x != types.uint32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


@intrinsic
def f32_as_u32(typingctx, x):
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@njit
def bits_to_bf16(b):
    """fp32 bits (uint32) -> bf16 bits (uint16), round to nearest even, NaN -> 0x7FC0 (as torch)."""
    rounded = (b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    return np.uint16(0x7FC0) if (b & ABS_MASK) > EXP_MASK else np.uint16(rounded)


def load_f32(a, i, j):  # a[i, j] as float32 (a: float32 or bf16-as-uint16)
    pass


def store_f32(a, i, j, x):  # a[i, j] = x (float32), rounding to bf16 when a is uint16
    pass


@overload(load_f32)
def _load_impl(a, i, j):
    if a.dtype == types.float32:
        return lambda a, i, j: a[i, j]
    if a.dtype == types.uint16:
        return lambda a, i, j: u32_as_f32(np.uint32(np.uint32(a[i, j]) << np.uint32(16)))
    return None


@overload(store_f32)
def _store_impl(a, i, j, x):
    if a.dtype == types.float32:

        def st_f32(a, i, j, x):
            a[i, j] = x

        return st_f32
    if a.dtype == types.uint16:

        def st_bf16(a, i, j, x):
            a[i, j] = bits_to_bf16(f32_as_u32(x))

        return st_bf16
    return None


@intrinsic
def prefetch(typingctx, addr):
    """Software prefetch (read, keep in all cache levels) of the cache line at integer address `addr`."""
    if addr not in (types.int64, types.uint64):
        return None

    def codegen(context, builder, sig, args):
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                            "llvm.prefetch.p0")
        builder.call(fn, [builder.inttoptr(args[0], i8p), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return types.none(addr), codegen


def put_bits(o, j, b):  # o[j] = b (uint32 bits of an fp32), rounded to bf16 bits when o is uint16
    pass


@overload(put_bits)
def _put_bits_impl(o, j, b):
    if o.dtype == types.uint16:

        def put_bf16(o, j, b):
            o[j] = bits_to_bf16(b)

        return put_bf16
    if o.dtype == types.uint32:

        def put_u32(o, j, b):
            o[j] = b

        return put_u32
    return None
