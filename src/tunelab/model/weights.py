"""Weight files read one tensor at a time, so loading holds the weights plus one tensor, no more.

A model is built on the meta device (no memory), then each tensor is read, converted to its
target dtype (or handed to a hook that quantizes its layer) and put in place. safetensors'
own `safe_open` maps a whole file, and every page it has read stays resident until the file is
closed (a 5 GB shard counts 5 GB on top of the weights). Here each tensor gets a private
(copy-on-write) mapping of its own bytes: a tensor stored in the target dtype is used in place,
no copy, its pages read when first touched and, while unchanged, shared with the page cache
(the system may drop and re-read them under memory pressure); a tensor that is converted,
transposed or quantized is copied and its mapping goes with it. Where a file cannot be mapped
its bytes are read into a buffer. The format is a little-endian u64 header length, a JSON
header of {name: {dtype, shape, data_offsets}}, then the data.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import mmap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tunelab.errors import ModelError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 2**20


@dataclass(frozen=True)
class Entry:
    """Where one tensor lies: its file, byte range, dtype and shape."""

    file: Path
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def read_header(path: Path, whole: bool = True) -> dict[str, Entry]:
    """The tensors of a safetensors file, from its header alone; whole=True also checks that
    the file holds all their bytes (a truncated download fails here, not mid-load)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < n <= _MAX_HEADER:
                raise ModelError(f"{path}: not a safetensors file (bad header length)")
            meta = json.loads(f.read(n))
        size = path.stat().st_size
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{path}: cannot read safetensors header ({e})") from None
    entries = {}
    for name, info in meta.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        if whole and 8 + n + end > size:
            raise ModelError(f"{path}: {name} ends past the end of the file; it may be truncated")
        if info["dtype"] not in DTYPES:
            raise ModelError(f"{path}: {name} has dtype {info['dtype']}, which tunelab cannot read")
        entries[name] = Entry(
            path, 8 + n + start, end - start, DTYPES[info["dtype"]], tuple(info["shape"])
        )
    return entries


def hf_entries(path: Path, whole: bool = True) -> dict[str, Entry]:
    """Every tensor of a model directory: one model.safetensors or a sharded index."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise ModelError(f"{index}: not a safetensors index ({e})") from None
        entries = {}
        for shard in shards:
            if not (path / shard).exists():
                raise ModelError(f"{index}: names {shard}, which is not in {path}")
            entries.update(read_header(path / shard, whole))
        return entries
    if (path / "model.safetensors").exists():
        return read_header(path / "model.safetensors", whole)
    raise ModelError(f"{path}: no model.safetensors or sharded index (weights not present)")


def read_tensors(
    entries: dict[str, Entry], mapped: bool = True
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) in file order, each over a private mapping of its bytes (mapped=False:
    read into a buffer of its own)."""
    by_file: dict[Path, list[tuple[str, Entry]]] = {}
    for name, e in entries.items():
        by_file.setdefault(e.file, []).append((name, e))
    for file, items in by_file.items():
        with open(file, "rb", buffering=0) as f:
            for name, e in sorted(items, key=lambda item: item[1].offset):
                tensor = _mapped(f, e) if mapped else None
                yield name, _read(f, e) if tensor is None else tensor


def _mapped(f, e: Entry) -> torch.Tensor | None:
    """The tensor over a private mapping of its own bytes (None where that cannot be done);
    the mapping lives as long as the tensor or a view of it."""
    start = e.offset - e.offset % mmap.ALLOCATIONGRANULARITY
    delta = e.offset - start
    if e.nbytes == 0 or delta % e.dtype.itemsize:  # an unaligned tensor cannot be viewed as dtype
        return None
    try:
        m = mmap.mmap(f.fileno(), delta + e.nbytes, access=mmap.ACCESS_COPY, offset=start)
    except (OSError, ValueError):  # a file system without mmap, or a file shorter than its header
        return None
    raw = torch.frombuffer(m, dtype=torch.uint8, count=e.nbytes, offset=delta)
    return raw.view(e.dtype).reshape(e.shape)


def _read(f, e: Entry) -> torch.Tensor:
    raw = torch.empty(e.nbytes, dtype=torch.uint8)
    view, done = memoryview(raw.numpy()), 0
    f.seek(e.offset)
    while done < e.nbytes:  # one read() returns at most ~2 GiB on Linux
        got = f.readinto(view[done:])
        if not got:
            raise ModelError(f"{e.file}: ends inside a tensor; the file may be truncated")
        done += got
    return raw.view(e.dtype).reshape(e.shape)


def materialize(
    model: nn.Module,
    tensors: Iterator[tuple[str, torch.Tensor]],
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    on_linear: Callable[[str, nn.Linear], nn.Module] | None = None,
) -> None:
    """Fill a meta-device model with tensors as they come, each cast to dtype on device.

    on_linear(name, linear) is called once a block's nn.Linear has all its tensors and may
    return a replacement (e.g. its NF4-quantized form), so no float copy of all of them exists.
    """
    for name, tensor in tensors:
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        target = dtype if tensor.is_floating_point() else tensor.dtype
        if tensor.dtype != target or tensor.device != torch.device(device):
            # a cast copies anyway: the copy is contiguous, whatever view it was read through
            tensor = tensor.to(device=device, dtype=target, memory_format=torch.contiguous_format)
        if leaf in module._parameters:
            old = module._parameters[leaf]
            module._parameters[leaf] = nn.Parameter(tensor, requires_grad=old.requires_grad)
        else:
            module._buffers[leaf] = tensor
        del tensor
        complete = not any(p.is_meta for p in module.parameters(recurse=False))
        if on_linear and isinstance(module, nn.Linear) and complete and ".layers." in owner:
            parent, _, child = owner.rpartition(".")
            setattr(model.get_submodule(parent), child, on_linear(owner, module))
            del module
            release_freed()


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def release_freed() -> None:
    """Hand freed heap pages back to the system (glibc's malloc_trim).

    Quantizing on read frees each layer's float weight while keeping its small 4-bit form, so
    the heap becomes a sieve of free holes that glibc keeps: measured 320 MB retained for 37 MB
    kept on a 130 MB model. Trimming after each layer keeps the peak at the weights."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


# A shard is held whole while it is written (its header needs every tensor's size), so small
# shards keep saving a 7B model within a few hundred MB over the model itself.
SHARD_BYTES = 512 * 2**20


def write_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    """One safetensors file, each tensor's bytes written straight from its own memory
    (safetensors' save_file first copies the whole file's contents into one bytes object)."""
    header: dict = {"__metadata__": {k: str(v) for k, v in metadata.items()}} if metadata else {}
    offset = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        header[name] = {
            "dtype": DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for t in tensors.values():
            if t.numel():
                flat = t.detach().to("cpu").contiguous()
                # the bytes seen through ctypes, not numpy: .numpy() would mark the storage
                # unresizable for good, and FSDP frees its parameters' storage by resizing it
                n = flat.numel() * flat.element_size()
                f.write(memoryview((ctypes.c_char * n).from_address(flat.data_ptr())).cast("B"))


def write_shards(
    tensors: Iterator[tuple[str, torch.Tensor]],
    directory: Path,
    max_bytes: int | None = None,
    metadata: dict | None = None,
) -> None:
    """Write tensors as they come into safetensors shards of at most max_bytes (512 MiB), with
    HF's index when there is more than one, so saving holds one shard at most, never the model."""
    max_bytes = max_bytes or SHARD_BYTES
    shard: dict[str, torch.Tensor] = {}
    size, files, weight_map = 0, [], {}

    def flush():
        nonlocal shard, size
        if shard:
            files.append(directory / f"model-{len(files) + 1:05d}.safetensors")
            write_file(shard, files[-1], metadata)
            weight_map.update(dict.fromkeys(shard, files[-1].name))
        shard, size = {}, 0
        release_freed()

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_bytes:
            flush()
        shard[name] = tensor.detach().contiguous()
        size += nbytes
    flush()
    if len(files) <= 1:
        if files:
            files[0].rename(directory / "model.safetensors")
        else:
            write_file({}, directory / "model.safetensors", metadata)
        return
    total = sum(f.stat().st_size for f in files)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
