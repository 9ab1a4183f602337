"""Process-group set-up for `python script.py` (one process) and `torchrun` (many), on CPU (gloo) or GPU (NCCL).

Everything here is a thin wrapper that also works when torch.distributed is not initialised, so library code can call
`get_rank()` / `all_reduce_()` unconditionally.
"""

import datetime
import importlib
import os
import re
from contextlib import nullcontext

import torch
import torch.distributed as dist

from dnnlib import UserError

# How long a rank waits for the others in a collective before the job fails (seconds). CPU runs get a short default:
# a rank that hangs there should stop the job in minutes, not after torch's 30; GPU jobs keep the long one (NCCL's
# watchdog reports the collective that timed out).
DEFAULT_TIMEOUT_S = {"cpu": 300, "cuda": 1800}
_timeout_s: float = DEFAULT_TIMEOUT_S["cpu"]


class RankTimeoutError(RuntimeError):
    """Some ranks did not reach a meeting point within the process-group timeout; the message names them."""


def init(device: str = "auto", timeout_s: float | None = None) -> torch.device:
    """Initialise the process group if launched by torchrun and return this rank's device.

    `device` is 'auto' (CUDA when present, else CPU), 'cuda' or 'cpu'. Under torchrun, NCCL is used on CUDA and gloo
    on CPU, with the rendezvous torchrun already set up (no fixed port here). `timeout_s` bounds every wait for other
    ranks (default DEFAULT_TIMEOUT_S of the device type).
    """
    global _timeout_s
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but no CUDA device is available (use --device cpu or auto).")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
        if world_size > 1 and "OMP_NUM_THREADS" not in os.environ:
            # torchrun sets OMP_NUM_THREADS=1 itself; this guards plain multi-process launches from oversubscription.
            torch.set_num_threads(1)
    if world_size > 1 and not dist.is_initialized():
        # torch._dynamo, imported for the first time while a process group exists, keeps references to that group, so
        # destroy_process_group() no longer ends gloo's threads; they are then torn down at interpreter exit, the
        # likely source of a rank's rare abort there ("terminate called without an active exception"). It is
        # imported lazily by torch itself (meta-tensor decompositions in the snapshot loader's memory check), so
        # import it here, before the group exists.
        importlib.import_module("torch._dynamo")
        backend = "nccl" if dev.type == "cuda" else "gloo"
        _timeout_s = DEFAULT_TIMEOUT_S[dev.type] if timeout_s is None else timeout_s
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=_timeout_s))
    return dev


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def barrier(where: str = "a barrier"):
    """Wait for every rank. Under gloo a rank that does not arrive within the timeout is named: rank 0 raises
    RankTimeoutError('... rank(s) 1 did not arrive ...') instead of the job stalling with no word of who is missing.
    (NCCL's watchdog reports its own timeouts.)"""
    if not is_initialized():
        return
    if dist.get_backend() != "gloo":
        dist.barrier()
        return
    try:
        dist.monitored_barrier(timeout=datetime.timedelta(seconds=_timeout_s), wait_all_ranks=True)
    except RuntimeError as e:
        missing = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", str(e))
        who = f"rank(s) {missing.group(1)} did not arrive" if missing else f"the wait failed ({e})"
        raise RankTimeoutError(f"Rank {get_rank()} waited {_timeout_s:g} s (the --dist-timeout) at {where}: {who}; "
                               "a rank hung, crashed or is far slower than the others.") from e


def data_parallel(net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`net` wrapped in DistributedDataParallel when several ranks run (gradients are averaged over ranks during the
    backward pass, bucket by bucket), else `net` itself. Attributes of the network stay readable on the wrapper."""
    if not is_initialized():
        return net
    return _DataParallelNetwork(net, device_ids=[device] if device.type == "cuda" else None,
                                forward_sync_buffers=False, gradient_as_bucket_view=True)


def no_sync(net: torch.nn.Module):
    """Context for accumulation rounds: no gradient reduction during this backward pass (DDP), nothing otherwise."""
    return net.no_sync() if isinstance(net, torch.nn.parallel.DistributedDataParallel) else nullcontext()


class _DataParallelNetwork(torch.nn.parallel.DistributedDataParallel):
    def __getattr__(self, name):  # losses read e.g. net.in_channels
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def all_reduce_(tensor: torch.Tensor, op=None) -> torch.Tensor:
    """In-place sum (or `op`) over ranks; a no-op in a single process. Returns the tensor for chaining."""
    if is_initialized():
        dist.all_reduce(tensor, op=op if op is not None else dist.ReduceOp.SUM)
    return tensor


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    if is_initialized():
        dist.broadcast(tensor, src=src)
    return tensor


def broadcast_object(obj, src: int = 0):
    """Send a picklable Python object (built by our own code, never read from a file) from `src` to every rank."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def print0(*args, **kwargs):
    """print() on rank 0 only."""
    if get_rank() == 0:
        print(*args, **kwargs)


def shard(items: list, rank: int | None = None, world_size: int | None = None) -> list:
    """The part of `items` this rank works on: rank r takes items r, r + W, r + 2W, ... (balanced, order kept)."""
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    return items[rank::world_size]


def destroy():
    if is_initialized():
        dist.destroy_process_group()


def all_gather_object(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] (a one-element list in a single process)."""
    if not is_initialized():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out
