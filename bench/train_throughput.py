"""Training and sampling throughput of the default CPU configuration (README's oracle run), side by side, and which
precision and thread count is fastest on the machine it runs on.

    python bench/train_throughput.py                      # 64x64 grayscale, the README default network
    python bench/train_throughput.py --resolution 32 --steps 20 --threads 1,2

Prints one table: training images/s (forward + backward + Adam step, EDM loss) in fp32 and bf16 autocast, each with
and without channels_last, each with 1 thread and with all cores (on a busy machine one thread is often faster), and
sampling images/s (EDM Heun, 18 steps = 35 network evaluations); then the fastest training configuration. Whether the
CPU has bf16 instructions is printed first: without them bf16 autocast is emulated and usually far slower than fp32.
A configuration stops timing after --max-seconds (its rate is then measured on the steps done). Ratios measured in one
run are the figures to quote; absolute numbers on a shared CPU are noisy.
"""

import os
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torch_utils.misc import SeedGenerators
from training import snapshot as checkpoint
from training.loss import EDMLoss
from training.networks import network_kwargs_for
from training.sampling.denoisers import net_denoiser
from training.sampling.solvers import ODE, noise_start
from training.schedules import rho_schedule
from training.training_loop import cpu_bf16_support


def default_network(resolution: int, channels: int = 1) -> dict:
    """The README's oracle network: DDPM++ with cbase 32, multipliers 1,2,2, 2 blocks, attention at 16."""
    return network_kwargs_for(arch="ddpmpp", precond="edm", img_resolution=resolution, in_channels=channels,
                              out_channels=channels, label_dim=0, cbase=32, cres=[1, 2, 2], num_blocks=2,
                              attn_resolutions=[16], dropout=0.0)


def time_training(net_cfg, batch, steps, precision, channels_last, device, max_seconds):
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

    step()  # warm-up
    t0, done = time.perf_counter(), 0
    while done < steps and (done == 0 or time.perf_counter() - t0 < max_seconds):
        step()
        done += 1
    return batch * done / (time.perf_counter() - t0)


def time_sampling(net_cfg, batch, device, num_steps=18):
    torch.manual_seed(0)
    net = checkpoint.build_network(net_cfg).to(device).eval().requires_grad_(False)
    k = net_cfg["kwargs"]
    gen = SeedGenerators(range(batch), device=device)
    latents = gen.randn([batch, k["in_channels"], k["img_resolution"], k["img_resolution"]])
    warm_up, levels = rho_schedule(2), rho_schedule(num_steps)
    with torch.no_grad():
        ODE()(net_denoiser(net), noise_start(latents, warm_up[0].item()), gen, warm_up)
        t0 = time.perf_counter()
        ODE()(net_denoiser(net), noise_start(latents, levels[0].item()), gen, levels)  # EDM's Heun sampler
    return batch / (time.perf_counter() - t0)


@click.command()
@click.option("--resolution", type=int, default=64, show_default=True)
@click.option("--batch", type=int, default=32, show_default=True)
@click.option("--steps", type=int, default=10, show_default=True, help="Timed optimizer steps per configuration")
@click.option("--threads", type=str, default="1,all", show_default=True,
              help="Thread counts to compare on CPU ('all' = every core this process may use)")
@click.option("--max-seconds", type=float, default=120, show_default=True,
              help="Stop timing a configuration after this long")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
def main(resolution, batch, steps, threads, max_seconds, device):
    device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                          ("cpu" if device == "auto" else device))
    threads_before = torch.get_num_threads()
    all_cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    thread_counts = [1] if device.type == "cuda" else sorted(
        {all_cores if t.strip() == "all" else int(t) for t in threads.split(",")})
    cfg = default_network(resolution)
    n_params = sum(p.numel() for p in checkpoint.build_network(cfg).parameters())
    print(f"network: DDPM++ cbase 32, mult 1,2,2, 2 blocks, {n_params / 1e6:.2f} M params; {resolution}x{resolution}x1;"
          f" batch {batch}; device {device}; all = {all_cores} cores")
    if device.type == "cpu":
        native, cpu = cpu_bf16_support()
        print(f"CPU: {cpu}; bf16 {'native' if native else 'emulated' if native is False else 'support unknown'}")
    rows = []
    for n in thread_counts:
        torch.set_num_threads(n)
        for precision in ("fp32", "bf16"):
            for cl in (False, True):
                name = f"train {precision}{' channels_last' if cl else ''}, {n} thread{'s' if n > 1 else ''}"
                rows.append((name, time_training(cfg, batch, steps, precision, cl, device, max_seconds)))
        rows.append((f"sample EDM Heun 18 steps (35 NFE), {n} thread{'s' if n > 1 else ''}",
                     time_sampling(cfg, batch, device)))
    torch.set_num_threads(threads_before)
    base = rows[0][1]
    print(f"{'what':<48} {'images/s':>10} {'vs first':>8}")
    for name, rate in rows:
        ratio = f"{rate / base:.2f}x" if name.startswith("train") else ""
        print(f"{name:<48} {rate:>10.1f} {ratio:>8}")
    best_name, best_rate = max((row for row in rows if row[0].startswith("train")), key=lambda row: row[1])
    print(f"fastest training here: {best_name.removeprefix('train ')} ({best_rate:.1f} images/s)")


if __name__ == "__main__":
    main()
