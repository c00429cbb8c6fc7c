"""Rounding a float32 result into a bfloat16 buffer: to nearest, or stochastically, the same on every path.

Stochastic rounding adds 16 random bits below a float32's bfloat16 part and truncates, so the expected
stored value equals the float32 one: updates far below half a bfloat16 ulp still move the buffer on
average (torchao's ``bf16_stochastic_round``). The bits are not drawn from a generator but computed from a
counter, so every path (per-tensor, foreach, the C and Triton kernels) rounds an element the same way,
and a run resumed from a checkpoint rounds exactly as the uninterrupted run:

    stream(seed, step, array)  = seed*S_SEED + step*S_STEP + array*S_ARRAY      (mod 2^32)
    key(stream, tensor)        = fmix32(stream + tensor*S_TENSOR)               (mod 2^32)
    bits(key, i)               = mix32((lo32(i) + key) xor hi32(i)*S_HIGH)      (mod 2^32)
    mix32(h)                   = m xor (m >> 16), m = h*MIX                      (mod 2^32)

``seed`` is the param group's ``rounding_seed`` (saved in the state dict with the group), ``step`` the
parameter's step count, ``array`` the buffer's position in ``["param", "grad", *state keys]``, ``tensor``
the parameter's position among all the optimizer's parameters and ``i`` the element's offset in memory;
``fmix32`` is MurmurHash3's finaliser (multipliers ``FMIX_1``, ``FMIX_2``). NaN is stored as the canonical
bfloat16 NaN (``BF16_NAN``).

**Two arrays share one draw.** The stochastically rounded arrays of a step, in array order, are taken in
pairs (``pairs``): the first of a pair (its *leader*) rounds with the high 16 bits of ``bits(key, i)``, the
second with the low 16 bits of the same ``bits``, where ``key`` is the leader's; an array left without a
partner uses the high 16 bits of its own. The randomness is in the key (a full hash of seed, step, array
and tensor, so uniform and independent between steps); ``mix32`` is a bijection of 32-bit words, so for
every element the pair's 32 bits are uniform too, and the two halves independent of each other. The
element-wise work is one multiply per element per *two* arrays (it was two multiplies per array, with
``fmix32`` per element): on a CPU the hash, not memory, bounded the bfloat16-state step.

The constants below are the only spelling of the hash: the C and Triton emitters print them into their
sources from here, and ``fmix32``/``random_bits`` serve both Python ints and int64 tensors.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

M32 = 0xFFFFFFFF
S_SEED, S_STEP, S_TENSOR, S_ARRAY, S_HIGH = 0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F, 0x165667B1
FMIX_1, FMIX_2 = 0x85EBCA6B, 0xC2B2AE35
MIX = 0x7FEB352D
BF16_NAN = 0x7FC0

#: Elements rounded stochastically at a time on the eager paths (bounds the rounding's temporaries:
#: ~40 bytes of int64 per element).
SR_CHUNK = 1 << 16


def fmix32(h):
    """MurmurHash3's 32-bit finaliser of a Python int or an int64 tensor (values in [0, 2^32))."""
    h = h ^ (h >> 16)
    h = (h * FMIX_1) & M32
    h = h ^ (h >> 13)
    h = (h * FMIX_2) & M32
    return h ^ (h >> 16)


def mix32(h):
    """The element-wise mixer (a bijection of 32-bit words) of a Python int or an int64 tensor."""
    h = (h * MIX) & M32
    return h ^ (h >> 16)


def pairs(stochastic: Sequence[bool]) -> dict:
    """``{array: (leader, high)}`` for the stochastically rounded arrays: which array's key gives its bits,
    and whether it takes their high 16 bits (a leader, or an array without a partner) or the low 16."""
    arrays = [a for a, on in enumerate(stochastic) if on]
    out = {}
    for n in range(0, len(arrays), 2):
        lead = arrays[n]
        out[lead] = (lead, True)
        if n + 1 < len(arrays):
            out[arrays[n + 1]] = (lead, False)
    return out


def stream(seed: int, step: int, array: int) -> int:
    return (int(seed) * S_SEED + int(step) * S_STEP + int(array) * S_ARRAY) & M32


def tensor_key(stream_value: int, tensor: int) -> int:
    return fmix32((stream_value + int(tensor) * S_TENSOR) & M32)


def random_bits(key: int, offsets: Tensor) -> Tensor:
    """32 random bits (int64 tensor) for the elements at memory ``offsets`` (int64)."""
    lo, hi = offsets & M32, offsets >> 32
    return mix32(((lo + key) & M32) ^ ((hi * S_HIGH) & M32))


def is_dense(t: Tensor) -> bool:
    """Whether ``t`` covers its memory without gaps or overlaps, in any dimension order (contiguous,
    channels_last, ...; an empty tensor is not)."""
    span = 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()) if s > 1)
    return all(st >= 0 for st in t.stride()) and span == t.numel()


def memory_offsets(t: Tensor) -> Tensor:
    """Each element's offset in memory (from the tensor's first element), in the tensor's shape; for a
    tensor that is not dense (a strided view with gaps), its logical flat index instead."""
    n = t.numel()
    flat = torch.arange(max(n, 1), device=t.device, dtype=torch.int64)
    if is_dense(t):
        return flat.as_strided(t.shape, t.stride())
    return flat[:n].view(t.shape)


def to_bf16(src: Tensor, key: int = None, offsets: Tensor = None, high: bool = True) -> Tensor:
    """``src`` rounded to bfloat16: stochastically with ``key`` and the high (``high``) or low 16 of the
    random bits (see the module docstring), else to nearest."""
    if key is None:
        return src.to(torch.bfloat16)
    bits = src.float().view(torch.int32).to(torch.int64) & M32
    r = random_bits(key, offsets)
    r = r >> 16 if high else r & 0xFFFF
    high = ((bits + r) >> 16) & 0xFFFF
    high = torch.where(src != src, torch.full_like(high, BF16_NAN), high)
    return ((high ^ 0x8000) - 0x8000).to(torch.int16).view(torch.bfloat16)


def write_back(dst: Tensor, src: Tensor, key: Optional[int], high: bool = True) -> None:
    """Store ``src`` (a result in the compute dtype) into ``dst``: rounded stochastically with ``key`` (a
    ``tensor_key``; bfloat16 ``dst`` only) and the high or low half of the bits (``high``), else by
    ``copy_`` (round to nearest). Contiguous tensors are rounded ``SR_CHUNK`` elements at a time."""
    if key is None:
        dst.copy_(src)
    elif dst.is_contiguous() and src.is_contiguous():
        d, s = dst.view(-1), src.view(-1)
        for lo in range(0, d.numel(), SR_CHUNK):
            hi = min(lo + SR_CHUNK, d.numel())
            offsets = torch.arange(lo, hi, device=d.device, dtype=torch.int64)
            d[lo:hi].copy_(to_bf16(s[lo:hi], key, offsets, high))
    else:
        dst.copy_(to_bf16(src, key, memory_offsets(dst), high))


def write_back_arrays(arrays: Sequence[Tensor], results: Sequence[Tensor], stochastic: Sequence[bool],
                      seed: int, step: int, tensor: int) -> None:
    """Store one parameter's results (``results[a]``, computed in the compute dtype) into its arrays
    (``param``, ``grad``, the state buffers; the gradient is only read and never stored), rounding array
    ``a`` stochastically where ``stochastic[a]`` says, with the bits of (seed, step, its leader, tensor)
    (``pairs``)."""
    paired = pairs(stochastic)
    for a, (dst, src) in enumerate(zip(arrays, results)):
        if dst is src or a == 1:
            continue
        if a in paired:
            lead, high = paired[a]
            write_back(dst, src, tensor_key(stream(seed, step, lead), tensor), high)
        else:
            write_back(dst, src, None)
