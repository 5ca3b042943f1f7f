"""Distribution under torchrun: the process group, a device per rank, DDP or FSDP2, teardown.

tunelab launches nothing itself: torchrun starts one process per device and sets RANK,
WORLD_SIZE and LOCAL_RANK. Gradients are summed across ranks (not averaged), because the loop
divides them by the global target count of the step.
"""

from __future__ import annotations

import atexit
import gc
import inspect
import logging
import os
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist

from tunelab.errors import ConfigError, closest
from tunelab.train.config import compute_precision

log = logging.getLogger("tunelab")
STRATEGIES = ("auto", "ddp", "fsdp", "none")


def torchrun_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) outside it."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def pick_device(name: str, local_rank: int) -> torch.device:
    """The device of this rank: `auto` and `cuda` mean the GPU numbered by LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(f"cuda:{local_rank}" if name == "cuda" else name)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # nccl and broadcast_object_list use the current device
    return device


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor"


def full(t):
    """The whole tensor behind an FSDP shard (a collective: every rank must call it)."""
    return t.full_tensor() if _is_dtensor(t) else t


def shard_like(value: torch.Tensor, param) -> torch.Tensor:
    """A whole tensor cut like `param` (an FSDP shard), or as it is for ordinary parameters."""
    if not _is_dtensor(param):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(param.device), param.device_mesh, param.placements)


def full_state(state, keep: bool = True):
    """A state dict (weights or optimizer) with every FSDP shard gathered, in a fixed order.

    Gathered tensors go to CPU one by one (or are dropped: keep=False on ranks that do not
    write), so a GPU never holds more than one whole tensor."""
    if isinstance(state, dict):
        return {k: full_state(state[k], keep) for k in sorted(state, key=str)}
    if isinstance(state, list):
        return [full_state(v, keep) for v in state]
    if not _is_dtensor(state):
        return state
    whole = state.full_tensor()
    return whole.cpu() if keep else None


def load_weights(module, weights: dict) -> None:
    """Load whole tensors by parameter name, cutting them into shards under FSDP."""
    params = dict(module.named_parameters())
    module.load_state_dict(
        {n: shard_like(w, params[n]) if n in params else w for n, w in weights.items()},
        strict=False,
    )


def shard_optimizer_state(optimizer) -> None:
    """After loading a whole optimizer state, cut each moment like its (sharded) parameter."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.dim() > 0:
                    state[key] = shard_like(value, p)


def no_sync(model):
    """Skip the gradient reduction of a micro-batch that is not the last of its step."""
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        return _fsdp_no_sync(model)
    return nullcontext()


@contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def _sum_hook(state, bucket):
    """DDP comm hook: sum the gradients instead of DDP's default mean over ranks."""
    fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


class Dist:
    """This process's place in the job and the collectives the loop needs (no-ops alone)."""

    def __init__(
        self,
        strategy: str = "none",
        rank: int = 0,
        world: int = 1,
        device: torch.device | None = None,
        precision: str = "fp32",
        owner: bool = True,
    ):
        self.strategy, self.rank, self.world = strategy, rank, world
        self.device, self.precision = device or torch.device("cpu"), precision
        self.owner = owner  # False when the caller initialised the group: the caller ends it
        self.auto_precision: str | None = None  # why precision auto chose what it did
        self._ddp, self._ddp_params = None, ()  # the DDP wrapper and the parameters it covers

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.strategy != "none"

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum across ranks, on this rank's device (nccl takes only CUDA tensors)."""
        if not self.active:
            return x
        y = x.detach().to(self.device, copy=True)
        dist.all_reduce(y)
        return y

    def broadcast(self, obj):
        """Rank 0's value of a picklable object, on every rank."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def shard(self, model):
        """FSDP2: shard each transformer block, then the root (embeddings, norm, head); in place.

        Must run before the optimizer is made: fully_shard replaces the parameters."""
        if self.strategy != "fsdp":
            return model
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        # Weights are gathered in the compute dtype; gradients are reduced in fp32.
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for p in model.parameters():  # a loaded GPT-2 weight may be a transposed view of a file
            if not p.is_contiguous():
                p.data = p.data.contiguous()
        for block in getattr(getattr(model, "transformer", None), "layers", []):
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(1.0)  # sum, like the DDP hook, and as a
                module.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL)
        return model

    def unshard(self, model, rebuild):
        """Under FSDP, the trained weights gathered into `rebuild()` on rank 0 (None elsewhere).

        A collective. Other strategies keep the model as it is: it was never sharded."""
        if self.strategy != "fsdp":
            return model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(model, options=opts)  # whole tensors on rank 0 only
        if not self.is_main:
            return None
        plain = rebuild()
        plain.load_state_dict(weights)
        return plain

    def wrap(self, model):
        """The module to run training forwards on: DDP over the parameters that train now.

        Freezing changes what trains (gradual unfreezing, a resumed stage), and DDP registers
        its parameters once, so the wrapper is rebuilt when the trainable set changes."""
        if self.strategy != "ddp":
            return model
        params = tuple(p for p in model.parameters() if p.requires_grad)
        if self._ddp is not None and len(params) == len(self._ddp_params):
            if all(a is b for a, b in zip(params, self._ddp_params)):
                return self._ddp
        self._drop_ddp()
        from torch.nn.parallel import DistributedDataParallel as DDP

        # Buffers (rotary tables, NF4 codes) are the same on every rank: no per-step broadcast.
        quiet = "forward_sync_buffers" in inspect.signature(DDP).parameters  # torch >= 2.13
        self._ddp = DDP(
            model,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            **{"forward_sync_buffers" if quiet else "broadcast_buffers": False},
            find_unused_parameters=os.environ.get("TUNELAB_FIND_UNUSED", "0") == "1",
        )
        self._ddp.register_comm_hook(None, _sum_hook)
        self._ddp_params = params
        return self._ddp

    def _drop_ddp(self) -> None:
        # An old reducer must be gone before a new one hooks the same parameters, and the
        # wrapper freed before the process group: gloo aborts when it is freed at exit.
        self._ddp, self._ddp_params = None, ()
        gc.collect()

    def close(self, error: BaseException | None = None) -> None:
        """End this run: wait for the other ranks, or on an error abort the group at once.

        A good end keeps the group for the next run in this process (k-fold runs several):
        it is destroyed at exit, since re-initialising one can hang in gloo's rendezvous."""
        if not (self.active and dist.is_initialized()):
            return
        self._drop_ddp()
        if error is None:
            dist.barrier()
            return
        if not self.owner:
            return
        abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
        try:  # abort, not destroy: nccl's destroy waits for collectives the others never join
            abort() if abort else dist.destroy_process_group()
        except Exception:
            pass


_ours = {"group": False}  # whether tunelab initialised the default group (so it may abort it)


def _teardown() -> None:
    # Wrappers and meshes holding the group go first: gloo aborts the process if they are
    # freed during interpreter shutdown, after the group.
    gc.collect()
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:
        pass  # an aborted group: the error that aborted it is what the user needs to see


def setup(strategy: str = "auto", device: str = "auto", precision: str = "fp32") -> Dist:
    """A Dist for this process; under torchrun it initialises the process group (or uses the
    caller's)."""
    if strategy not in STRATEGIES:
        raise ConfigError(
            f"dist={strategy!r}{closest(strategy, STRATEGIES)}: expected {', '.join(STRATEGIES)}"
        )
    rank, world, local_rank = torchrun_env()
    started = not dist.is_initialized()
    if not started:  # the group, however it was started, says who we are
        rank, world = dist.get_rank(), dist.get_world_size()
    if strategy == "none" and world > 1:
        raise ConfigError(
            f"dist=none under torchrun with WORLD_SIZE={world}: every rank would train alone and "
            "write the same run directory; use --dist ddp or fsdp, or run without torchrun"
        )
    if strategy == "auto":
        strategy = "ddp" if world > 1 else "none"
    if strategy != "none" and started and "MASTER_ADDR" not in os.environ:
        # Not under torchrun: a recipe or a resumed run that says ddp/fsdp runs alone.
        log.info("dist=%s: not launched by torchrun, training in one process", strategy)
        strategy = "none"
    dev = pick_device(device, local_rank)
    if strategy == "fsdp" and dev.type != "cuda":
        log.warning("FSDP on %s runs over gloo: right but slow; it is meant for CUDA", dev.type)
    if strategy != "none" and started:
        backend = "nccl" if dev.type == "cuda" else "gloo"
        extra = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend, rank=rank, world_size=world, **extra)
        _ours["group"] = True
        atexit.register(_teardown)
    return Dist(strategy, rank, world, dev, precision, owner=_ours["group"])


@contextmanager
def launch(cfg):
    """A Dist from a TrainConfig for the body of a run; a failing rank ends the whole job.

    The error is logged with its rank and recorded for torchrun's summary, the group aborted,
    and the error re-raised so the process exits non-zero and torchrun stops the other ranks.
    precision auto becomes its choice for this rank's device here (cfg.precision is set to it,
    so config.yaml records it; Dist.auto_precision says why)."""
    from tunelab.runtime.precision import resolve_precision

    d = setup(getattr(cfg, "dist", "auto"), cfg.device)
    cfg.precision, d.auto_precision = resolve_precision(cfg.precision, d.device)
    d.precision = compute_precision(cfg)  # FSDP gathers weights in it (mixed-precision policy)
    try:
        yield d
    except BaseException as e:
        if d.active:
            log.error("rank %d of %d failed: %s: %s", d.rank, d.world, type(e).__name__, e)
            _record(e)
        d.close(error=e)
        raise
    d.close()


def _record(error: BaseException) -> None:
    """Write the error where torchrun looks for a worker's root cause (when it set one)."""
    if not os.environ.get("TORCHELASTIC_ERROR_FILE") or not isinstance(error, Exception):
        return
    try:
        from torch.distributed.elastic.multiprocessing.errors import get_error_handler

        get_error_handler().record_exception(error)
    except Exception:
        pass  # the log line above already says what went wrong
