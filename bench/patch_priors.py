"""Patch priors (PaDIS) against whole-image priors with the same network: training cost, and reconstruction quality
per training-set size at equal training compute (issue 13, item 5).

    python bench/patch_priors.py --out out/patch-bench            # the default run: ~5 min of training and cost
                                                                  # on 2 idle CPU cores, plus ~8 min of solving
    python bench/patch_priors.py --out out/pb600 --skip-cost --whole-steps 600  # 6x the training: 25 min, shared
    python bench/patch_priors.py --out /tmp/pb --quick            # tiny end-to-end run (tests/test_patch_bench.py)

(a) Training cost. For each resolution (64 and 128 px) one optimizer step (EDM loss, forward + backward + Adam) of
    the same network (DDPM++, NETWORK below) is timed on a batch of --cost-batch examples of each input it trains on:
    the whole image (the whole-image model), and every patch size of two patch models, each with Patch-Diffusion's
    probabilities ((1-p) 2/5, (1-p) 3/5, p) at real-p 0.5: 'PD' with sizes W/4, W/2, W (Patch-Diffusion's rule, e.g.
    16/32/64 at 64 px) and 'PaDIS' with W/16, W/8, W/4 (PaDIS's fixed 16/32/64 at 256 px, scaled to W). A patch
    model's step cost is the expectation over its size law: images/s = B / sum_p pi_p t_p (examples, i.e. patches,
    per second), pixels/s = B sum_p pi_p p^2 / sum_p pi_p t_p (network-input pixels per second); its peak memory is
    the largest of its sizes' (a run meets all of them). Timing as bench/msm_sampler.py: a warm-up, then
    --cost-rounds interleaved rounds (every item once per round, in an order shuffled anew each round) and the median
    per item. Peak memory: on CUDA torch.cuda.max_memory_allocated of the steps; on CPU the rise of the peak resident
    set (VmHWM, reset by /proc/self/clear_refs just before the steps) over the resident set before the first step,
    each item in a fresh process (so one item's freed-but-kept memory cannot hide another's peak).
(b) Data efficiency, PaDIS's central claim. Random-ellipse phantoms at --resolution 32 (dataset_tool.py phantoms,
    seed 0 for training, seed 1 for --held-out held-out images) and their simulated 8-coil MRI (simulate-mri; the
    priors learn the clean complex coil-combined image as 2 channels with the EDM loss, PaDIS-MRI's setting). For
    every training-set size n in --sizes (train.py --max-size n) a whole-image and a patch prior are trained with the
    same network and optimiser; then reconstruct.py's `dps` solver (the same fixed settings and NFE for every row)
    reconstructs one measurement set per task, made once (--save-measurements) and reused by every row: MRI at R = 4
    (random lines) and 4x super-resolution (sigma_y 0.01). zero-filled A^+ y is the reference line.

    Patch geometry at W px (PaDIS's proportions): pad P = W/4 (PaDIS trains 256 px images on a 384 px canvas: the
    same 1.5 W), training patch sizes W/8, W/4, W/2 with real-p 0.5 (PaDIS's W/16 is below the UNet's divisor of 4
    at 32 px, so the ladder is one octave up), tiles of W/4 at inference (PaDIS: 56 of 256) on a K x K grid with
    K p = W + P, shifted at random by 0..P every call.

    EQUAL TRAINING COMPUTE: both models process the same number of network-input pixels. The whole-image model runs
    S steps of B images, S B W^2 pixels. The patch model crops --patch-muls (p_max / p)^2 patches per image (so every
    one of its steps trains on the same number of pixels whatever the size drawn) from B W^2 / p_max^2 images per
    step, and runs exactly as many steps S: S B W^2 pixels as well, and the same number of optimizer steps. Its kimg
    (which count patches) are the whole model's x W^2 E[mul] / E[mul p^2] (`equal_compute_kimg`; = (W / p_rms)^2
    with one crop per image). The run lengths are set from the patch-size draws the run will make
    (`patch_run_for_pixels`, PatchLaw.step_choice), and the pixel counts actually trained on are in results.json.

Outputs in --out: results.json, results.md (tables with the settings beside them), psnr_vs_n_<task>.png,
ssim_vs_n_<task>.png and training_cost.png; data/, runs/ and recon/ hold the intermediate products. Every train.py /
reconstruct.py call is skipped when its output exists, so a re-run continues where a stopped one ended.
"""

import argparse
import json
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time

import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.msm_sampler import timed  # noqa: E402 (the same wall-clock rule as the sampler benchmark)
from dnnlib import atomic_write  # noqa: E402
from torch_utils.plot import line_plot  # noqa: E402
from training import snapshot as checkpoint  # noqa: E402
from training.loss import EDMLoss  # noqa: E402
from training.networks import network_kwargs_for  # noqa: E402
from training.patches import CanvasGeometry, PatchLaw, WithPositions, crop_batch  # noqa: E402

# The network of every model in both parts: (arch, cbase, cres, blocks, attention resolutions).
NETWORK = dict(arch="ddpmpp", cbase=16, cres=[1, 2, 2], blocks=1, attn=[])
REAL_P = 0.5
TASKS = ("mri", "sr")
MODELS = ("whole", "patch")
TASK_OPTIONS = {"mri": ["--task", "mri", "--accel", "4"], "sr": ["--task", "sr", "--sr-factor", "4"]}
TASK_NAMES = {"mri": "MRI R = 4 (8 coils, random lines)", "sr": "4x super-resolution (sigma_y 0.01)"}

DEFAULT = dict(cost_resolutions=[64, 128], cost_batch=8, cost_rounds=5, cost_steps=2, resolution=32,
               sizes=[16, 64, 256, 2000], held_out=8, whole_steps=100, batch=16, solver_steps=300, lr=2e-3)
# solver_steps: 300 of DDPM's levels (279 inside the training range). At 20 (18 NFE) DPS had not converged with either
# prior, the patch one least: on 4 MRI test images (n = 64, 600 steps) patch 10.5 dB / SSIM 0.06 at 18 NFE, 14.8 / 0.43
# at 93 and 19.7 / 0.75 at 279 NFE; the whole-image prior 15.7 / 0.57 (8 images), 20.8 / 0.81 and 27.6 / 0.91.
QUICK = dict(cost_resolutions=[32], cost_batch=2, cost_rounds=1, cost_steps=1, resolution=32, sizes=[16],
             held_out=2, whole_steps=2, batch=4, solver_steps=2, lr=2e-3)


# ----------------------------------------------------------------------------------------------------------------------
# Patch laws and the equal-compute rule.


def pd_sizes(resolution: int) -> list[int]:
    """Patch-Diffusion's rule: W/4, W/2, W."""
    return [resolution // 4, resolution // 2, resolution]


def padis_sizes(resolution: int) -> list[int]:
    """PaDIS's fixed 16, 32, 64 at 256 px, scaled to W: W/16, W/8, W/4."""
    return [resolution // 16, resolution // 8, resolution // 4]


def bench_sizes(resolution: int) -> list[int]:
    """Part (b)'s training sizes: W/8, W/4, W/2 (module docstring)."""
    return [resolution // 8, resolution // 4, resolution // 2]


def constant_pixel_muls(sizes: list[int]) -> list[int]:
    """Crops per image (p_max / p)^2, so a step trains on batch x p_max^2 pixels whatever the size drawn."""
    largest = max(sizes)
    if any(largest % p for p in sizes):
        raise ValueError(f"patch sizes {sizes} must all divide the largest for constant pixels per step")
    return [(largest // p) ** 2 for p in sizes]


def equal_compute_kimg(whole_kimg: float, resolution: int, law: PatchLaw) -> float:
    """The patch model's kimg (counting patches) that processes, in expectation, as many network-input pixels as
    `whole_kimg` of whole W x W images: whole_kimg x W^2 E[mul] / E[mul p^2] (expectations over the size law)."""
    mean_mul = sum(q * m for q, m in zip(law.probs, law.muls))
    mean_pixels = sum(q * m * p * p for q, p, m in zip(law.probs, law.sizes, law.muls))
    return whole_kimg * resolution**2 * mean_mul / mean_pixels


def patch_run_for_pixels(law: PatchLaw, seed: int, batch: int, target_pixels: int) -> dict:
    """The shortest patch run (steps of `batch` images, the sizes train.py will draw for this seed) that processes
    at least `target_pixels` network-input pixels: {'steps', 'nimg' (patches, what train.py's kimg count), 'pixels',
    'duration' (--duration in Mimg that stops train.py after exactly these steps)}."""
    steps = nimg = pixels = 0
    while pixels < target_pixels:
        size, mul = law.step_choice(seed, steps)
        steps += 1
        nimg += batch * mul
        pixels += batch * mul * size * size
    return {"steps": steps, "nimg": nimg, "pixels": pixels, "duration": nimg / 1e6}


# ----------------------------------------------------------------------------------------------------------------------
# (a) Training cost.


def cost_network(resolution: int, positions: bool) -> torch.nn.Module:
    cfg = network_kwargs_for(arch=NETWORK["arch"], precond="edm", cbase=NETWORK["cbase"], cres=NETWORK["cres"],
                             dropout=0.0, img_resolution=resolution, in_channels=1, out_channels=1, label_dim=0,
                             num_blocks=NETWORK["blocks"], attn_resolutions=NETWORK["attn"],
                             **({"position_channels": 2} if positions else {}))
    torch.manual_seed(0)
    return checkpoint.build_network(cfg)


def cost_configs(resolution: int) -> dict:
    """name -> (patch sizes, probabilities); None for the whole-image model."""
    configs = {"whole": None}
    for name, sizes in (("PD", pd_sizes(resolution)), ("PaDIS", padis_sizes(resolution))):
        if min(sizes) >= 4:  # the UNet's divisor (3 levels)
            configs[f"{name} {'/'.join(map(str, sizes))}"] = (sizes, PatchLaw.from_options(sizes, None, REAL_P,
                                                                                          None).probs)
    return configs


class CostItem:
    """One optimizer step of the EDM loss on `batch` examples of side `size` at `resolution` (size None: whole
    images, no positions)."""

    def __init__(self, resolution: int, size: int | None, batch: int, device):
        self.resolution, self.size, self.batch, self.device = resolution, size, batch, device
        self.net = cost_network(resolution, positions=size is not None).to(device).train()
        self.opt = torch.optim.Adam(self.net.parameters(), lr=1e-4)
        self.gen = torch.Generator(device).manual_seed(0)
        self.images = torch.rand(batch, 1, resolution, resolution, generator=self.gen, device=device) * 2 - 1
        self.geometry = CanvasGeometry(resolution, resolution // 4, "xy", -1.0)
        self.loss = EDMLoss()

    @property
    def pixels(self) -> int:
        return (self.size or self.resolution) ** 2

    def step(self):
        self.opt.zero_grad(set_to_none=True)
        net, batch = self.net, {"image": self.images}
        if self.size is not None:
            batch, positions = crop_batch(batch, self.geometry, self.size, 1, self.gen)
            net = WithPositions(self.net, positions)
        (self.loss(net, batch, self.gen).sum() / self.batch).backward()
        self.opt.step()


def memory_probe(resolution: int, size: int | None, batch: int, steps: int, device) -> float:
    """Peak memory (MiB) of `steps` training steps above the footprint before them (module docstring)."""
    item = CostItem(resolution, size, batch, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = _reset_peak_rss()
    for _ in range(steps):
        item.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    return (_peak_rss() - before) / 2**10


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return None


def _reset_peak_rss() -> int:
    """Reset the peak resident set to the current one where Linux allows it (clear_refs 5), so the peak measured
    next is that of the steps alone and not of the imports and set-up before them; returns the current RSS (KiB),
    or ru_maxrss where the reset is unavailable (then the figure is a lower bound)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _proc_status_kib("VmRSS")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _peak_rss() -> int:
    peak = _proc_status_kib("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def measure_memory(resolution: int, size: int | None, batch: int, steps: int, device) -> float:
    if device.type == "cuda":
        return memory_probe(resolution, size, batch, steps, device)
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-probe", f"{resolution},{size or 0},{batch},{steps}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe {cmd} failed:\n{proc.stderr[-3000:]}")
    return float(proc.stdout.strip().splitlines()[-1])


def training_cost(settings: dict, device, log) -> dict:
    items = {}
    for resolution in settings["cost_resolutions"]:
        sizes = {None} | {p for cfg in cost_configs(resolution).values() if cfg for p in cfg[0]}
        for size in sorted(sizes, key=lambda s: s or 0):
            items[resolution, size] = CostItem(resolution, size, settings["cost_batch"], device)
    log(f"(a) training cost: {len(items)} items, {settings['cost_rounds']} interleaved rounds of "
        f"{settings['cost_steps']} step(s) each, batch {settings['cost_batch']}")
    for item in items.values():  # warm-up: allocator and one-time costs
        item.step()
    times = {key: [] for key in items}
    for r in range(settings["cost_rounds"]):
        order = list(items)
        random.Random(r).shuffle(order)
        for key in order:
            item = items[key]
            times[key].append(timed(lambda it=item: [it.step() for _ in range(settings["cost_steps"])], device)
                              / settings["cost_steps"])
    memory = {key: measure_memory(*key, settings["cost_batch"], 2, device) for key in items}
    per_item = {f"{res}/{size or 'whole'}": {"seconds_per_step": statistics.median(times[res, size]),
                                             "seconds_per_step_range": [min(times[res, size]), max(times[res, size])],
                                             "peak_mib": memory[res, size]} for res, size in items}
    batch, rows = settings["cost_batch"], []
    for resolution in settings["cost_resolutions"]:
        for name, cfg in cost_configs(resolution).items():
            sizes, probs = cfg if cfg else ([None], [1.0])
            step = sum(q * statistics.median(times[resolution, s]) for s, q in zip(sizes, probs))
            pixels = sum(q * (s or resolution) ** 2 for s, q in zip(sizes, probs))
            rows.append({"resolution": resolution, "model": name, "sizes": [s or resolution for s in sizes],
                         "probs": probs, "seconds_per_step": step, "images_per_s": batch / step,
                         "pixels_per_s": batch * pixels / step,
                         "whole_image_equivalents_per_s": batch * pixels / step / resolution**2,
                         "peak_mib": max(memory[resolution, s] for s, q in zip(sizes, probs) if q > 0)})
    return {"items": per_item, "rows": rows}


# ----------------------------------------------------------------------------------------------------------------------
# (b) Data efficiency.


class Runner:
    """Runs the CLIs as subprocesses, logging every command; a failure stops the benchmark with its output."""

    def __init__(self, out: str, log):
        self.out, self.log, self.commands = out, log, []

    def __call__(self, script: str, *args: str) -> str:
        cmd = [sys.executable, os.path.join(ROOT, script), *args]
        self.commands.append(" ".join(cmd[1:]))
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n"
                               f"{proc.stderr[-4000:]}")
        self.log(f"  {script} {' '.join(args[:4])} ... ({time.perf_counter() - start:.1f} s)")
        return proc.stdout


def make_data(settings: dict, data: str, run) -> dict:
    W, n_train = settings["resolution"], max(settings["sizes"])
    paths = {"train": os.path.join(data, "phantoms-train.zip"), "held": os.path.join(data, "phantoms-heldout.zip"),
             "mri-train": os.path.join(data, "mri-train"), "mri-held": os.path.join(data, "mri-heldout")}
    if not os.path.exists(paths["train"]):
        run("dataset_tool.py", "phantoms", "--dest", paths["train"], "--num", str(n_train), "--resolution", str(W),
            "--seed", "0")
    if not os.path.exists(paths["held"]):
        run("dataset_tool.py", "phantoms", "--dest", paths["held"], "--num", str(settings["held_out"]),
            "--resolution", str(W), "--seed", "1")
    for src, dest, seed in ((paths["train"], paths["mri-train"], "0"), (paths["held"], paths["mri-held"], "1")):
        if not os.path.exists(dest):
            run("dataset_tool.py", "simulate-mri", "--source", src, "--dest", dest, "--seed", seed)
    return paths


def train_options(settings: dict, model: str) -> tuple[list[str], dict]:
    """train.py options of one model and its accounting (steps, kimg, pixels) under the equal-compute rule."""
    W, batch = settings["resolution"], settings["batch"]
    common = ["--arch", NETWORK["arch"], "--cbase", str(NETWORK["cbase"]), "--cres",
              ",".join(map(str, NETWORK["cres"])), "--blocks", str(NETWORK["blocks"]), "--attn",
              ",".join(map(str, NETWORK["attn"])), "--lr",
              str(settings["lr"]), "--lr-rampup", "0", "--dropout", "0", "--seed", "0", "--workers", "0",
              "--device", "cpu", "--tick", "1000000", "--snap", "1", "--dump", "1000000"]
    target = settings["whole_steps"] * batch * W * W
    if model == "whole":
        nimg = settings["whole_steps"] * batch
        return common + ["--batch", str(batch), "--duration", repr(nimg / 1e6)], {
            "batch": batch, "steps": settings["whole_steps"], "kimg": nimg / 1000, "pixels": target}
    sizes = bench_sizes(W)
    muls = constant_pixel_muls(sizes)
    patch_batch = batch * W * W // max(sizes) ** 2
    law = PatchLaw.from_options(sizes, None, REAL_P, muls)
    plan = patch_run_for_pixels(law, 0, patch_batch, target)
    options = common + ["--batch", str(patch_batch), "--duration", repr(plan["duration"]),
                        "--patch-sizes", ",".join(map(str, sizes)), "--real-p", str(REAL_P),
                        "--patch-muls", ",".join(map(str, muls)), "--pad-width", str(W // 4)]
    return options, {"batch": patch_batch, "steps": plan["steps"], "kimg": plan["nimg"] / 1000,
                     "pixels": plan["pixels"], "sizes": sizes, "probs": law.probs, "muls": muls, "pad_width": W // 4,
                     "expected_kimg_rule": equal_compute_kimg(settings["whole_steps"] * batch / 1000, W, law)}


def train(settings: dict, paths: dict, runs: str, task: str, model: str, n: int, run) -> tuple[str, dict]:
    options, accounting = train_options(settings, model)
    outdir = os.path.join(runs, f"{task}-{model}-n{n}")
    snapshots = sorted(f for f in os.listdir(outdir) if f.startswith("network-snapshot")) if os.path.isdir(
        outdir) else []
    rundir = None
    if snapshots:
        rundir = outdir
    else:
        if os.path.isdir(outdir):
            shutil.rmtree(outdir)  # a run stopped before its snapshot: start it again
        data = paths["mri-train"] if task == "mri" else paths["train"]
        start = time.perf_counter()
        run("train.py", "--outdir", os.path.join(runs, "tmp"), "--data", data, "--max-size", str(n), *options)
        accounting["train_seconds"] = time.perf_counter() - start
        made = sorted(os.listdir(os.path.join(runs, "tmp")))[-1]
        shutil.move(os.path.join(runs, "tmp", made), outdir)
        rundir = outdir
    with open(os.path.join(rundir, "log.txt")) as f:
        done = [line for line in f if line.startswith("Done:")]
    trained_kimg = float(done[-1].split()[1])
    if abs(trained_kimg - accounting["kimg"]) > 1e-3:
        raise RuntimeError(f"{rundir} trained {trained_kimg} kimg, the equal-compute plan said {accounting['kimg']}")
    accounting["trained_kimg"] = trained_kimg
    return rundir, accounting


def reconstruct(settings: dict, measurements: str, outdir: str, rundir: str | None, model: str, run) -> dict:
    if not os.path.exists(os.path.join(outdir, "summary.json")):
        if rundir is None:
            args = ["--methods", "zero-filled"]
        else:
            args = ["--network", rundir, "--methods", "dps", "--dps-steps", str(settings["solver_steps"])]
            if model == "patch":
                args += ["--patch-size", str(settings["resolution"] // 4)]
        run("reconstruct.py", "--measurements", measurements, "--outdir", outdir, "--device", "cpu", *args)
    with open(os.path.join(outdir, "summary.json")) as f:
        methods = json.load(f)["methods"]
    return next(iter(methods.values()))


def data_efficiency(settings: dict, out: str, run, log) -> dict:
    data, runs, recon = (os.path.join(out, d) for d in ("data", "runs", "recon"))
    for d in (data, runs, recon):
        os.makedirs(d, exist_ok=True)
    paths = make_data(settings, data, run)
    results = {"baseline": {}, "rows": []}
    measurements = {}
    for task in TASKS:
        measurements[task] = os.path.join(data, f"measurements-{task}")
        outdir = os.path.join(recon, f"{task}-zero-filled")
        if not os.path.exists(measurements[task]):
            if os.path.isdir(outdir):
                shutil.rmtree(outdir)
            source = paths["mri-held"] if task == "mri" else paths["held"]
            run("reconstruct.py", "--data", source, *TASK_OPTIONS[task], "--methods", "zero-filled", "--outdir",
                outdir, "--save-measurements", measurements[task], "--device", "cpu")
        results["baseline"][task] = reconstruct(settings, measurements[task], outdir, None, "zero-filled", run)
    for task in TASKS:
        for n in settings["sizes"]:
            for model in MODELS:
                log(f"(b) {task}, {model} prior, {n} training images")
                rundir, accounting = train(settings, paths, runs, task, model, n, run)
                folder = os.path.join(recon, f"{task}-{model}-n{n}-dps{settings['solver_steps']}")
                metrics = reconstruct(settings, measurements[task], folder, rundir, model, run)
                results["rows"].append({"task": task, "model": model, "n": n, "run": os.path.relpath(rundir, out),
                                        **accounting, **{k: v for k, v in metrics.items()}})
    return results


# ----------------------------------------------------------------------------------------------------------------------
# Report.


def bar_plot(path: str, title: str, groups: list[str], bars: dict, unit: str):
    """Grouped bars: one group per entry of `groups`, one bar per name in `bars` (name -> value per group)."""
    width, height, left, top, bottom = 900, 440, 70, 50, 90
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44)]
    img = PIL.Image.new("RGB", (width, height), "white")
    draw = PIL.ImageDraw.Draw(img)
    font = PIL.ImageFont.load_default(size=13)
    top_value = max(v for values in bars.values() for v in values) * 1.1 or 1.0
    plot_h, y0 = height - top - bottom, height - bottom
    for k in range(6):
        v = top_value * k / 5
        y = y0 - plot_h * k / 5
        draw.line([(left, y), (width - 20, y)], fill=(225, 225, 225))
        draw.text((left - 6, y), f"{v:.3g}", fill="black", font=font, anchor="rm")
    group_w = (width - 20 - left) / len(groups)
    bar_w = group_w * 0.8 / len(bars)
    for gi, group in enumerate(groups):
        gx = left + gi * group_w + group_w * 0.1
        draw.text((gx + group_w * 0.4, y0 + 8), group, fill="black", font=font, anchor="mt")
        for bi, values in enumerate(bars.values()):
            x = gx + bi * bar_w
            draw.rectangle([x, y0 - values[gi] / top_value * plot_h, x + bar_w - 3, y0], fill=colours[bi % 3])
            draw.text((x + bar_w / 2, y0 - values[gi] / top_value * plot_h - 3), f"{values[gi]:.3g}", fill="black",
                      font=font, anchor="mb")
    for bi, name in enumerate(bars):
        x = left + bi * 260
        draw.rectangle([x, height - 28, x + 12, height - 16], fill=colours[bi % 3])
        draw.text((x + 18, height - 22), name, fill="black", font=font, anchor="lm")
    draw.text((width / 2, 8), f"{title} ({unit})", fill="black", font=PIL.ImageFont.load_default(size=15), anchor="mt")
    with atomic_write(path) as f:
        img.save(f, format="PNG")


def write_report(out: str, report: dict):
    settings, cost, eff = report["settings"], report["training_cost"], report["data_efficiency"]
    lines = ["# Patch priors (PaDIS) vs whole-image priors", "",
             f"Command: `{report['command']}`  ", f"Machine: {report['machine']}  ",
             f"Network (every model): DDPM++ cbase {NETWORK['cbase']}, channel multipliers "
             f"{','.join(map(str, NETWORK['cres']))}, {NETWORK['blocks']} block(s) per resolution, no attention; "
             "patch models take 2 more input channels (x, y).", "",
             "## (a) Training cost", "",
             f"One optimizer step (EDM loss, forward + backward + Adam) on {settings['cost_batch']} examples; median "
             f"over {settings['cost_rounds']} interleaved rounds of {settings['cost_steps']} step(s). A patch model's "
             "figures are expectations over its size law (probabilities ((1-p) 2/5, (1-p) 3/5, p), real-p 0.5); "
             "images/s counts examples (patches), pixels/s network-input pixels, 'whole-image eq./s' = pixels/s / W^2; "
             "peak memory is the largest over its sizes "
             + ("(CUDA max_memory_allocated)." if "cuda" in report["machine"] else
                "(CPU: rise of the peak resident set over the resident set before the first step, fresh process "
                "per size)."), "",
             "| W | model | sizes (probs) | ms/step | images/s | Mpixels/s | whole-image eq./s | peak MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in cost["rows"]:
        probs = ", ".join(f"{q:.2f}" for q in r["probs"])
        lines.append(f"| {r['resolution']} | {r['model']} | {'/'.join(map(str, r['sizes']))} ({probs}) | "
                     f"{r['seconds_per_step'] * 1000:.1f} | {r['images_per_s']:.1f} | {r['pixels_per_s'] / 1e6:.3f} | "
                     f"{r['whole_image_equivalents_per_s']:.1f} | {r['peak_mib']:.0f} |")
    lines += ["", "Per input size (median ms per step [range over rounds], peak MiB): " + "; ".join(
        f"{k} {v['seconds_per_step'] * 1000:.1f} [{v['seconds_per_step_range'][0] * 1000:.1f}-"
        f"{v['seconds_per_step_range'][1] * 1000:.1f}], {v['peak_mib']:.0f}" for k, v in cost["items"].items()), ""]
    lines += _efficiency_lines(settings, eff) if eff["rows"] else ["## (b) Data efficiency: left out", ""]
    lines += ["Plots: " + ", ".join(report["plots"]), "", f"Total wall time: {report['seconds']:.0f} s", ""]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines))


def _efficiency_lines(settings: dict, eff: dict) -> list[str]:
    lines = []
    W = settings["resolution"]
    patch = next((r for r in eff["rows"] if r["model"] == "patch"), None)
    whole = next((r for r in eff["rows"] if r["model"] == "whole"), None)
    lines += ["## (b) Data efficiency at equal training compute", "",
              f"{W} px random-ellipse phantoms (train seed 0; n images: train.py --max-size n, a fixed random subset) "
              "and "
              f"their simulated 8-coil MRI; {settings['held_out']} held-out images (seed 1); one measurement set per "
              "task, reused by every row.  ",
              f"Training (both models): {settings['whole_steps']} optimizer steps, lr {settings['lr']} constant "
              "(no ramp-up), dropout 0, EMA half-life ramp-up 0.05 (train.py's default), seed 0.  "]
    if whole and patch:
        lines += [f"Whole-image model: batch {whole['batch']} images of {W}^2 px, {whole['kimg']:g} kimg, "
                  f"{whole['pixels']:,} pixels.  ",
                  f"Patch model: pad {patch['pad_width']} (canvas {W + 2 * patch['pad_width']}), sizes "
                  f"{'/'.join(map(str, patch['sizes']))} with probabilities "
                  f"{', '.join(f'{q:.2f}' for q in patch['probs'])} (real-p {REAL_P}), {patch['muls']} crops per "
                  f"image, batch {patch['batch']} images, {patch['kimg']:g} kimg of patches "
                  f"(rule W^2 E[mul] / E[mul p^2] x whole kimg = {patch['expected_kimg_rule']:g}), "
                  f"{patch['pixels']:,} pixels; inference tiles {W // 4} px, K = {(W + W // 4) // (W // 4)}, "
                  "random shift per call.  "]
    nfe = next((r["nfe_mean"] for r in eff["rows"]), float("nan"))
    lines += [f"Solver (every row): reconstruct.py dps, --dps-steps {settings['solver_steps']} (the levels of DDPM's "
              f"grid within the model's training range: {nfe:g} NFE), step zeta 1.0, from noise.", ""]
    for task in TASKS if eff["rows"] else ():
        base = eff["baseline"][task]
        lines += [f"### {TASK_NAMES[task]}", "",
                  f"zero-filled A^+ y: PSNR {base['psnr_mean']:.2f} +- {base['psnr_std']:.2f} dB, SSIM "
                  f"{base['ssim_mean']:.4f}", "",
                  "| n train | whole PSNR | patch PSNR | whole SSIM | patch SSIM | whole train s | patch train s |",
                  "|---|---|---|---|---|---|---|"]
        for n in settings["sizes"]:
            row = {r["model"]: r for r in eff["rows"] if r["task"] == task and r["n"] == n}
            if len(row) < 2:
                continue
            w, p = row["whole"], row["patch"]
            lines.append(f"| {n} | {w['psnr_mean']:.2f} +- {w['psnr_std']:.2f} | {p['psnr_mean']:.2f} +- "
                         f"{p['psnr_std']:.2f} | {w['ssim_mean']:.4f} | {p['ssim_mean']:.4f} | "
                         f"{w.get('train_seconds', float('nan')):.0f} | {p.get('train_seconds', float('nan')):.0f} |")
        lines.append("")
    return lines


def make_plots(out: str, report: dict) -> list[str]:
    plots, eff, cost = [], report["data_efficiency"], report["training_cost"]
    for task in TASKS if eff["rows"] else ():
        for metric, unit in (("psnr", "PSNR (dB)"), ("ssim", "SSIM")):
            series = {f"{model} prior": [(r["n"], r[f"{metric}_mean"]) for r in eff["rows"]
                                         if r["task"] == task and r["model"] == model] for model in MODELS}
            series = {k: v for k, v in series.items() if v}
            if not series:
                continue
            name = f"{metric}_vs_n_{task}.png"
            line_plot(os.path.join(out, name), f"{TASK_NAMES[task]}: {metric.upper()} at equal training compute",
                      "training images (log)", unit, series,
                      hlines={"zero-filled": eff["baseline"][task][f"{metric}_mean"]}, log_x=True)
            plots.append(name)
    if not cost["rows"]:  # --skip-cost
        return plots
    groups = [f"{r['resolution']} px {r['model']}" for r in cost["rows"]]
    bar_plot(os.path.join(out, "training_speed.png"), "Training throughput (patch models: expectation over sizes)",
             groups, {"examples (patches)/s": [r["images_per_s"] for r in cost["rows"]],
                      "whole-image equivalents/s": [r["whole_image_equivalents_per_s"] for r in cost["rows"]]},
             "per second")
    bar_plot(os.path.join(out, "training_memory.png"), "Peak training memory (patch models: largest size)", groups,
             {"peak": [r["peak_mib"] for r in cost["rows"]]}, "MiB")
    plots += ["training_speed.png", "training_memory.png"]
    return plots


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="output folder (created; reused to continue a stopped run)")
    parser.add_argument("--quick", action="store_true", help="tiny everything (an end-to-end check, < 2 minutes)")
    parser.add_argument("--skip-cost", action="store_true", help="leave out part (a)")
    parser.add_argument("--skip-data-efficiency", action="store_true", help="leave out part (b)")
    parser.add_argument("--whole-steps", type=int, help="part (b)'s training budget: optimizer steps of both models "
                        f"[default: {DEFAULT['whole_steps']}; --quick {QUICK['whole_steps']}]")
    parser.add_argument("--solver-steps", type=int, help="part (b)'s DPS levels of DDPM's 1000-level grid (those "
                        f"inside the training range run) [default: {DEFAULT['solver_steps']}; --quick "
                        f"{QUICK['solver_steps']}]")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="part (a)'s device")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)  # internal: RES,SIZE,BATCH,STEPS in a fresh process
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.memory_probe:
        res, size, batch, steps = (int(v) for v in args.memory_probe.split(","))
        print(memory_probe(res, size or None, batch, steps, device))
        return
    if not args.out:
        parser.error("--out is required")
    settings = dict(QUICK if args.quick else DEFAULT)
    if args.whole_steps is not None:
        if args.whole_steps < 1:
            parser.error(f"--whole-steps must be a positive number of optimizer steps, got {args.whole_steps}")
        settings["whole_steps"] = args.whole_steps
    if args.solver_steps is not None:
        if args.solver_steps < 2:
            parser.error(f"--solver-steps must be at least 2 levels, got {args.solver_steps}")
        settings["solver_steps"] = args.solver_steps
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - start:7.1f} s] {msg}", flush=True)

    run = Runner(args.out, log)
    report = {"command": " ".join(["python", "bench/patch_priors.py", *(argv if argv is not None else sys.argv[1:])]),
              "machine": f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, "
                         f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs",
              "settings": settings, "network": NETWORK}
    report["training_cost"] = {"rows": [], "items": {}} if args.skip_cost else training_cost(settings, device, log)
    report["data_efficiency"] = {"baseline": {}, "rows": []} if args.skip_data_efficiency else data_efficiency(
        settings, args.out, run, log)
    report["commands"] = run.commands
    report["seconds"] = time.perf_counter() - start
    report["plots"] = make_plots(args.out, report)
    write_report(args.out, report)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(args.out, "results.md")) as f:
        print(f.read())


if __name__ == "__main__":
    main()
