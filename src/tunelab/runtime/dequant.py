"""NF4 dequantization, the kernel under QLoRA's base layers (adapt/quantize.py): here, below
the adapters, so the per-machine table (choose.py) can time it like the linear kernels."""

from __future__ import annotations

import threading

import torch

BLOCK = 64  # weights per absmax
# Weights per step. 1M against 256K: 15-22% faster from 1.6M to 58.7M weights on 2 EPYC vCPUs
# (fewer, longer passes share out better over the threads) with the buffers below kept.
CHUNK = 1 << 20
_kept = threading.local()  # each thread's buffers, by name, kept between calls


def kept_buffer(name: str, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat buffer of n elements, this thread's `name`, kept between calls and grown when
    short: made anew at each call, a big temporary is mapped and page-faulted every time (a
    1M-weight chunk's 6 MB of codes and pairs: 1.6M weights in 3.9 against 0.7 ms; a 7B layer's
    117 MB weight: +50 ms of a 160 ms forward). Made outside inference_mode even under it (an
    evaluation before training), so training can write it again."""
    bufs = _kept.__dict__
    buf = bufs.get(name)
    if buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != device:
        bufs[name] = buf = None  # the old one goes before the new one is made
        with torch.inference_mode(False):
            bufs[name] = buf = torch.empty(n, dtype=dtype, device=device)
    return buf[:n]


def release_kept() -> None:
    """Drop this thread's kept buffers (after training, before a save that needs the memory)."""
    _kept.__dict__.clear()


def pair_table(code: torch.Tensor) -> torch.Tensor:
    """Each byte's (high, low) pair of float32 code values as one int64: 256 entries."""
    pairs = torch.stack((code.repeat_interleave(16), code.repeat(16)), -1)
    return pairs.float().contiguous().view(torch.int64).flatten()


def dequantize_nf4(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    table: torch.Tensor,
    first: int,
    out: torch.Tensor,
    threads: int | None = None,
) -> torch.Tensor:
    """Weights first .. first + out.numel() of a packed NF4 tensor (two codes per byte, one
    float32 absmax per BLOCK), written into out (any float dtype); returns out.

    One gather per byte gives both values; scaled in float32 and rounded once into out, equal
    to bitsandbytes' values. With more than one thread the gather goes by rows of a block's
    bytes, which torch shares out over its threads (index_select runs on one: 1.2-1.5x faster
    with two threads than the old serial gather at its best, on GPT-2 large and Mistral-7B
    layers, 2 AMD EPYC vCPUs), with one thread by index_select, faster there. A chunk at a time
    through buffers kept between calls (kept_buffer): fresh tensors cost more in page faults
    than the gather itself (133 against 26 ms for a 58M-weight matrix on 2 CPUs, made per
    chunk). threads: torch's thread count for the work (None: as it is); choose.py measures
    per machine whether one thread does it faster."""
    if threads and threads != torch.get_num_threads():
        from tunelab.runtime import threads as using

        with using(threads):
            return dequantize_nf4(packed, absmax, table, first, out, threads)
    flat, serial = out.view(-1), torch.get_num_threads() == 1
    n = min(CHUNK, flat.numel() + BLOCK) // 2 + BLOCK
    codes = kept_buffer("nf4-codes", n, torch.int32 if serial else torch.int64, out.device)
    pairs = kept_buffer("nf4-pairs", n, torch.int64, out.device)
    rows = table.expand(n // (BLOCK // 2), len(table))  # the table once per block's bytes
    for lo in range(first, first + flat.numel(), CHUNK):
        hi = min(lo + CHUNK, first + flat.numel())
        at = lo - lo % BLOCK  # the chunk's first block: a slice need not start on one
        m = -(-(hi - at) // BLOCK) * BLOCK // 2  # bytes of the whole blocks it touches
        codes[:m].copy_(packed[at // 2 : at // 2 + m])
        if serial:
            torch.index_select(table, 0, codes[:m], out=pairs[:m])
        else:
            by_block = (-1, BLOCK // 2)
            torch.gather(
                rows[: m * 2 // BLOCK], 1, codes[:m].view(by_block), out=pairs[:m].view(by_block)
            )
        blocks = pairs[:m].view(torch.float32).view(-1, BLOCK)
        # scaled in place, then rounded into out: a product into out's dtype would make a
        # float32 temporary per chunk (4 MB at 1M weights) and the allocator churn with it
        blocks.mul_(absmax[at // BLOCK : at // BLOCK + len(blocks), None])
        flat[lo - first : hi - first] = blocks.view(-1)[lo - at : hi - at]
    return out
