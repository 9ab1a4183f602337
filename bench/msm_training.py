"""Training throughput of MSM (noiseless and noisy, eta > 0: three network evaluations) and Ambient against plain EDM
training on the same network and batch, for images and for multi-coil MRI.

    python bench/msm_training.py                        # 32x32, batch 16, 8-coil MRI
    python bench/msm_training.py --resolution 64 --steps 10 --device cuda

Prints one table: training images/s (forward + backward + Adam step) and the ratio to EDM, which is the figure to
quote (absolute numbers on a shared CPU are noisy: the cases are timed round-robin `--repeats` times and the best
rate of each is kept). The data are random tensors of the right shapes and mask laws.
"""

import os
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from training import snapshot as checkpoint
from training.data_tools import birdcage_maps
from training.loss import AmbientLoss, EDMLoss, MSMLoss
from training.masks import mask_law_from_config
from training.networks import network_kwargs_for
from training.operators import MultiCoilMRI


def network(resolution: int, in_channels: int, out_channels: int) -> dict:
    return network_kwargs_for(arch="ddpmpp", precond="edm", img_resolution=resolution, in_channels=in_channels,
                              out_channels=out_channels, label_dim=0, cbase=32, cres=[1, 2, 2], num_blocks=2,
                              attn_resolutions=[16], dropout=0.0)


def make_batch(kind: str, batch: int, resolution: int, coils: int, device):
    g = torch.Generator().manual_seed(0)
    shape = (resolution, resolution)
    if kind == "image":
        image = torch.rand(batch, 1, *shape, generator=g) * 2 - 1
        measurement = {"operator": "identity", "mask": {"kind": "box", "p": 0.4}}
        mask = mask_law_from_config(measurement["mask"]).sample(batch, shape, g)
        data = {"y": image * mask, "mask": mask}
    else:
        image = torch.randn(batch, 2, *shape, generator=g) * 0.3
        maps = torch.from_numpy(birdcage_maps(coils, *shape))[None].expand(batch, -1, -1, -1).contiguous()
        measurement = {"operator": "mri", "mask": {"kind": "lines-random", "R": 4, "acs": min(20, resolution // 8)}}
        mask = mask_law_from_config(measurement["mask"]).sample(batch, shape, g)
        data = {"y": MultiCoilMRI(maps).A(image) * mask, "mask": mask, "maps": maps}
    data = {k: v.to(device) for k, v in data.items()}
    return {**data, "image": image.to(device), "label": None}, measurement


def images_per_second(net_cfg, loss_fn, batch_dict, batch, steps, device):
    torch.manual_seed(0)
    net = checkpoint.build_network(net_cfg).to(device).train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    gen = torch.Generator(device).manual_seed(0)

    def step():
        opt.zero_grad(set_to_none=True)
        (loss_fn(net=net, batch=batch_dict, generator=gen).sum() / batch).backward()
        opt.step()

    for _ in range(2):  # warm-up
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0)


@click.command()
@click.option("--resolution", type=int, default=32, show_default=True)
@click.option("--batch", type=int, default=16, show_default=True)
@click.option("--coils", type=int, default=8, show_default=True)
@click.option("--steps", type=int, default=5, show_default=True)
@click.option("--repeats", type=int, default=3, show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
def main(resolution, batch, coils, steps, repeats, device):
    device = torch.device(device)
    print(f"device {device}, torch threads {torch.get_num_threads()}, batch {batch}, {resolution}x{resolution}, "
          f"DDPM++ cbase 32 (1,2,2), {steps} timed steps")
    print(f"{'data':<7} {'loss':<18} {'img/s':>8} {'vs EDM':>7}")
    for kind in ("image", "mri"):
        batch_dict, measurement = make_batch(kind, batch, resolution, coils, device)
        channels = 1 if kind == "image" else 2
        plain = network(resolution, channels, channels)
        cases = [("EDM (clean)", plain, EDMLoss()),
                 ("MSM eta=0", plain, MSMLoss(measurement)),
                 ("MSM eta=0.01", plain, MSMLoss({**measurement, "sigma_y": 0.01}))]
        ambient_net = network(resolution, channels + (kind == "image"), channels)
        cases.append(("Ambient", ambient_net, AmbientLoss(measurement)))
        rates = [0.0] * len(cases)
        for _ in range(repeats):
            for i, (_, net_cfg, loss_fn) in enumerate(cases):
                rates[i] = max(rates[i], images_per_second(net_cfg, loss_fn, batch_dict, batch, steps, device))
        for (name, _, _), rate in zip(cases, rates):
            print(f"{kind:<7} {name:<18} {rate:>8.1f} {rate / rates[0]:>7.2f}")


if __name__ == "__main__":
    main()
