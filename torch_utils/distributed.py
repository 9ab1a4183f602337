"""Process-group set-up for `python script.py` (one process) and `torchrun` (many), on CPU (gloo) or GPU (NCCL).

Everything here is a thin wrapper that also works when torch.distributed is not initialised, so library code can call
`get_rank()` / `all_reduce_()` unconditionally.
"""

import datetime
import os

import torch
import torch.distributed as dist


def init(device: str = "auto") -> torch.device:
    """Initialise the process group if launched by torchrun and return this rank's device.

    `device` is 'auto' (CUDA when present, else CPU), 'cuda' or 'cpu'. Under torchrun, NCCL is used on CUDA and gloo
    on CPU, with the rendezvous torchrun already set up (no fixed port here).
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but no CUDA device is available.")
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
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return dev


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def barrier():
    if is_initialized():
        dist.barrier()


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
