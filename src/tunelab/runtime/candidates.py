"""What the kernel table (choose.py) times: for each shape, one callable per candidate kernel
doing the same products (decoding a block of SmolLM2 or a 7B-sized sibling pair, a training
product forward and backward, an NF4 dequantization), and the cache eviction before each
timed decode call."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from tunelab.runtime.kernels import _OneDNNLinear, onednn_linear, reorder

# Decoding streams weights from memory (SmolLM2's 540 MB in fp32 each token): each decode call
# is timed after reading this many bytes, so no candidate reads weights another left in cache
# (torch's F.linear ran first on the same weights as oneDNN's, which then looked 2x faster
# at 1 row than a joined copy that decoded 6% faster end to end). Read, not written: written
# lines would still be going back to memory while the timed call runs.
EVICT_BYTES = 128 << 20
# Decode shapes timed as whole blocks: SmolLM2's, in groups of siblings (q/k/v, o, gate/up,
# down), BLOCK_LAYERS of them with weights of their own, streamed one after the other as a
# token does (112 MB in fp32: one ~1 ms block timed alone could not tell 5% apart on a busy
# host). Its gate/up pair alone undercounted what joining saves: one call instead of five per
# block at ~15 us each (bf16, 8 rows: the pair chose "packed", 216 tok/s, over "packed+fused",
# 230 tok/s end to end). 7B-sized shapes stay a pair: a whole block is 870 MB in fp32.
BLOCK_LAYERS = 8
DECODE_BLOCKS = {
    (576, 1536): [
        [(576, 576), (576, 192), (576, 192)],
        [(576, 576)],
        [(576, 1536)] * 2,
        [(1536, 576)],
    ]
}


def decode_groups(k: int, n: int) -> list[list[tuple[int, int]]]:
    """The (in, out) products a decode shape times, in groups of siblings sharing an input:
    the block DECODE_BLOCKS names, over BLOCK_LAYERS layers, or a sibling pair."""
    if (k, n) in DECODE_BLOCKS:
        return DECODE_BLOCKS[k, n] * BLOCK_LAYERS
    return [[(k, n), (k, n)]]


def weight_bytes(phase: str, k: int, n: int, dtype: torch.dtype) -> int:
    """Bytes of the weights one shape's calls read (a decode block's over its layers)."""
    if phase != "decode":
        return 2 * k * n * dtype.itemsize
    return sum(i * o for group in decode_groups(k, n) for i, o in group) * dtype.itemsize


def decode_calls(k: int, n: int, rows: int, dtype: torch.dtype, kinds) -> dict:
    """One call per candidate over a block's decode products: groups of siblings that read the
    same input (DECODE_BLOCKS), each product on its own or, "+fused", a group as one."""
    gen = torch.Generator().manual_seed(0)
    groups = []
    for group in decode_groups(k, n):
        x = torch.rand(rows, group[0][0], generator=gen, dtype=torch.float32).to(dtype)
        ws = [torch.rand(o, i, generator=gen, dtype=torch.float32).to(dtype) for i, o in group]
        groups.append((x, ws))

    def each(op, weights):
        return lambda: [op(x, w) for (x, _), ws in zip(groups, weights) for w in ws]

    def fused(joined):
        def call():
            out = []
            for (x, ws), w in zip(groups, joined):
                out += onednn_linear(x, w, None).split([v.shape[0] for v in ws], dim=-1)
            return out

        return call

    plain = [ws for _, ws in groups]
    calls = {"torch": each(F.linear, plain)}
    if "onednn" in kinds:
        onednn = functools.partial(onednn_linear, b=None)
        joined = [torch.cat(ws) for ws in plain]
        calls["onednn"] = each(onednn, plain)
        calls["onednn+fused"] = fused(joined)
        calls["packed"] = each(onednn, [[reorder(w, rows) for w in ws] for ws in plain])
        calls["packed+fused"] = fused([reorder(w, rows) for w in joined])
    return calls


def train_calls(k: int, n: int, rows: int, dtype: torch.dtype, kinds) -> dict:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, k, generator=gen).to(dtype).requires_grad_(True)
    w = torch.randn(n, k, generator=gen).div(k**0.5).to(dtype).requires_grad_(True)
    g = torch.randn(rows, n, generator=gen).to(dtype)

    def run(fn):
        x.grad = w.grad = None
        fn(x, w, None).backward(g)

    calls = {"torch": lambda: run(F.linear)}
    if "onednn" in kinds:
        calls["onednn"] = lambda: run(_OneDNNLinear.apply)
        calls["onednn+mm"] = lambda: run(lambda *a: _OneDNNLinear.apply(*a, False))
    return calls


def dequant_calls(k: int, n: int) -> dict:
    from tunelab.runtime.dequant import BLOCK, dequantize_nf4, pair_table

    gen = torch.Generator().manual_seed(0)
    packed = torch.randint(0, 256, (k * n // 2,), generator=gen, dtype=torch.int32).to(torch.uint8)
    absmax = torch.rand(k * n // BLOCK, generator=gen)
    table = pair_table(torch.linspace(-1, 1, 16))
    out = torch.empty(n, k, dtype=torch.bfloat16)
    return {
        "torch": lambda: dequantize_nf4(packed, absmax, table, 0, out),
        "one-thread": lambda: dequantize_nf4(packed, absmax, table, 0, out, threads=1),
    }


_evicting: list[torch.Tensor] = []


def evict() -> None:
    """Read EVICT_BYTES, so the next call reads its weights from memory, not cache."""
    if not _evicting:
        _evicting.append(torch.ones(EVICT_BYTES // 4))
    _evicting[0].sum()


def release_eviction() -> None:
    """Give back evict()'s buffer (EVICT_BYTES) once the measurement is done."""
    _evicting.clear()
