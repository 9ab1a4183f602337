"""train.py under torchrun with one rank misbehaving once, for tests/test_training.py:

    python -m torch.distributed.run --standalone --nproc_per_node=2 -m tests.training_worker MODE TRAIN_ARGS...

MODE overflow: rank 1's 3rd loss is multiplied by inf (an fp16 gradient overflow on one rank only), and the run uses
    fp16 autocast with a GradScaler on CPU (train.py itself allows fp16 on CUDA only). Every loss is scaled by 1e-3
    so that no other step overflows at the GradScaler's initial scale.
MODE hang: rank 1 sleeps for 10 minutes in its 3rd loss evaluation (a hung rank).
"""

import os
import sys
import time

import dnnlib
import train
from training.loss import EDMLoss

MISBEHAVING_RANK, AT_CALL = 1, 3


def misbehave_once(mode: str):
    original, calls = EDMLoss.__call__, [0]

    def loss(self, net, batch, generator):
        value = original(self, net, batch, generator) * (1e-3 if mode == "overflow" else 1)
        calls[0] += 1
        if int(os.environ["RANK"]) == MISBEHAVING_RANK and calls[0] == AT_CALL:
            if mode == "overflow":
                return value * float("inf")
            time.sleep(600)
        return value

    EDMLoss.__call__ = loss


def fp16_on_cpu(build_options):
    def build(opts, world_size):
        c = build_options(dnnlib.EasyDict(opts, precision="fp32"), world_size)
        c.precision = "fp16"
        return c

    return build


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    misbehave_once(mode)
    if mode == "overflow":
        train.build_options = fp16_on_cpu(train.build_options)
    sys.argv = ["train.py", *args]
    dnnlib.run_cli(train.main)
