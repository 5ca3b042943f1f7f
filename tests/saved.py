"""Bytes autograd saves for backward, measured with saved-tensor hooks (tests of memory)."""

import torch


def saved_bytes(model, forward) -> int:
    """Bytes autograd saves while forward() runs, the model's parameters left out."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in params:
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(seen.values())
