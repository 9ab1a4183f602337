"""Training and sampling throughput of the default CPU configuration (README's oracle run), side by side.

    python bench/train_throughput.py                      # 64x64 grayscale, the README default network
    python bench/train_throughput.py --resolution 32 --steps 20

Prints one table: training images/s (forward + backward + Adam step, EDM loss) in fp32 and bf16 autocast, each with
and without channels_last, and sampling images/s (EDM Heun, 18 steps = 35 network evaluations). Ratios measured in
one run are the figures to quote; absolute numbers on a shared CPU are noisy.
"""

import os
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torch_utils import checkpoint
from torch_utils.misc import SeedGenerators
from training.loss import EDMLoss
from training.networks import network_kwargs_for
from training.samplers import edm_sampler, net_denoiser


def default_network(resolution: int, channels: int = 1) -> dict:
    """The README's oracle network: DDPM++ with cbase 32, multipliers 1,2,2, 2 blocks, attention at 16."""
    return network_kwargs_for(arch="ddpmpp", precond="edm", img_resolution=resolution, in_channels=channels,
                              out_channels=channels, label_dim=0, cbase=32, cres=[1, 2, 2], num_blocks=2,
                              attn_resolutions=[16], dropout=0.0)


def time_training(net_cfg, batch, steps, precision, channels_last, device):
    torch.manual_seed(0)
    net = checkpoint.build_network(net_cfg).to(device).train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net.to(memory_format=fmt)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    loss_fn = EDMLoss()
    gen = torch.Generator(device).manual_seed(0)
    k = net_cfg["kwargs"]
    images = torch.randn(batch, k["in_channels"], k["img_resolution"], k["img_resolution"], device=device)
    images = images.contiguous(memory_format=fmt)
    dtype = {"fp32": None, "bf16": torch.bfloat16}[precision]

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = loss_fn(net, {"image": images, "label": None}, gen)
        (loss.sum() / batch).backward()
        opt.step()

    for _ in range(2):  # warm-up
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - t0)


def time_sampling(net_cfg, batch, device, num_steps=18):
    torch.manual_seed(0)
    net = checkpoint.build_network(net_cfg).to(device).eval().requires_grad_(False)
    k = net_cfg["kwargs"]
    gen = SeedGenerators(range(batch), device=device)
    latents = gen.randn([batch, k["in_channels"], k["img_resolution"], k["img_resolution"]])
    with torch.no_grad():
        edm_sampler(net_denoiser(net), latents, gen, num_steps=2)  # warm-up
        t0 = time.perf_counter()
        edm_sampler(net_denoiser(net), latents, gen, num_steps=num_steps)
    return batch / (time.perf_counter() - t0)


@click.command()
@click.option("--resolution", type=int, default=64, show_default=True)
@click.option("--batch", type=int, default=32, show_default=True)
@click.option("--steps", type=int, default=10, show_default=True, help="Timed optimizer steps per configuration")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
def main(resolution, batch, steps, device):
    device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                          ("cpu" if device == "auto" else device))
    cfg = default_network(resolution)
    n_params = sum(p.numel() for p in checkpoint.build_network(cfg).parameters())
    print(f"network: DDPM++ cbase 32, mult 1,2,2, 2 blocks, {n_params / 1e6:.2f} M params; {resolution}x{resolution}x1;"
          f" batch {batch}; device {device}; torch threads {torch.get_num_threads()}")
    rows = []
    for precision in ("fp32", "bf16"):
        for cl in (False, True):
            rows.append((f"train {precision}{' channels_last' if cl else ''}",
                         time_training(cfg, batch, steps, precision, cl, device)))
    rows.append(("sample EDM Heun 18 steps (35 NFE)", time_sampling(cfg, batch, device)))
    base = rows[0][1]
    print(f"{'what':<36} {'images/s':>10} {'vs fp32':>8}")
    for name, rate in rows:
        ratio = f"{rate / base:.2f}x" if name.startswith("train") else ""
        print(f"{name:<36} {rate:>10.1f} {ratio:>8}")


if __name__ == "__main__":
    main()
