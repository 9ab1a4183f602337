"""Reconstruct measurements with a learned prior: MSM posterior sampling, DPS, zero-filled and compressed sensing.

    # R = 4 multi-coil MRI from fully sampled held-out slices (measurements simulated, metrics against them):
    python reconstruct.py --network RUN_DIR --data held-out-mri --task mri --first 0 --num 8 --seeds 0-3 \\
        --outdir out/recon-mri
    # acquired undersampled k-space with its masks (no reference, so no metrics):
    python reconstruct.py --network RUN_DIR --data stored-mri --task mri --outdir out/recon-stored
    # images: super-resolution x4, box inpainting, random pixels; baselines only without --network:
    python reconstruct.py --network RUN_DIR --data held-out.zip --task sr --sr-factor 4 --outdir out/recon-sr
    torchrun --standalone --nproc_per_node=2 reconstruct.py ...     # (example, seed) pairs sharded across ranks

The model (architecture, measurement operator, training mask law) comes from the snapshot. Measurements of
example i are simulated with a generator seeded by (--mask-seed, i) (mask, then noise of std --sigma-y), so every
method and every posterior seed sees the same measurement. Posterior samples depend only on their seed (one random
stream per seed), not on --batch or the number of ranks. Methods (training/posterior.py):
  msm          MSM posterior sampling: the MSM sampler with the model's training mask law (the full mask for an
               oracle model trained on clean data) and a data-consistency step of size --dc-step; MRI: on every
               partial k-space estimate (default lambda 2, K 3), images: on the aggregate (default lambda 1.75, K 2);
               outer update --outer (default 'ddnm') with --eta (default 0.85), --steps levels of the VP-200 grid.
  dps          DPS (Chung et al. 2023) with step --dps-step; MSM models are evaluated with the full mask there.
  zero-filled  A^+ y (MRI: zero-filled coil combination; SR: nearest-neighbour upsampling; inpainting: holes 0).
  cs           MRI only: sigpy L1-wavelet (or TV, --cs-reg) SENSE reconstruction with weight --cs-lambda.

Outputs in --outdir: panels/{example:05d}-{seed:06d}.png (measurement, each method, reference, |error| of the first
learned method), reconstructions/{example:05d}-{seed:06d}.npz (each method's image: 2 channels (re, im) for MRI,
[-1, 1] pixels for images), metrics.csv (one row per example x seed x method; the conventions in its header;
zero-filled and cs do not depend on the seed, so their rows repeat across seeds), summary.json (mean and std per
method, over those rows) and the same table printed. Stored measurements have no reference: no metrics, no error map.
Metric conventions: METRIC_CONVENTIONS below.
"""

import csv
import json
import math
import os
from dataclasses import dataclass

import click
import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch
import tqdm

import dnnlib
from dnnlib import UserError
from torch_utils import checkpoint
from torch_utils import distributed as dist
from torch_utils.misc import SeedGenerators, parse_seeds
from training.dataset import ImageFolderDataset
from training.masks import MASK_KINDS, FullMask, PixelMaskLaw, example_generator, mask_law_from_config
from training.metrics import nmse, psnr, reference_max, ssim
from training.mri import MRIDataset
from training.operators import AvgPoolSR, BoxInpainting, Identity, MultiCoilMRI, PixelMask, measure, measurement_randn
from training.posterior import (
    CS_REGULARISERS,
    check_dc_step,
    cs_mri,
    dps_sampler,
    image_denoiser,
    mri_magnitude,
    msm_posterior_sampler,
    respaced_sigmas,
    zero_filled,
)
from training.samplers import OUTER_UPDATES, net_partial_denoiser

TASKS = ("mri", "sr", "box", "pixel")
METHODS = ("msm", "dps", "zero-filled", "cs")
LEARNED_METHODS = ("msm", "dps")
LINE_MASK_KINDS = tuple(kind for kind in MASK_KINDS if kind.startswith("lines"))
METRIC_CONVENTIONS = (
    "MRI: magnitude images |x| of the coil-combined complex image (T^H k for the reference, the method's image for a "
    "reconstruction), no further normalisation; data range = max of the reference magnitude (fastMRI).",
    "Images: pixel values mapped from [-1, 1] to [0, 1] by (x + 1) / 2, reconstructions clipped to [0, 1]; "
    "data range = 1.",
    "PSNR = 10 log10(data_range^2 / MSE) (skimage.metrics.peak_signal_noise_ratio).",
    "SSIM: skimage.metrics.structural_similarity defaults as in fastMRI (7x7 uniform window, K1 0.01, K2 0.03, sample "
    "covariance), channels averaged.",
    "NMSE = ||reference - estimate||^2 / ||reference||^2 (fastMRI).",
)
ERROR_GAIN = 4  # the |error| panel shows 4 |reference - estimate| / data range, so small errors stay visible


# ----------------------------------------------------------------------------
# The model, the data and the task.


@dataclass
class Model:
    net: torch.nn.Module
    kind: str  # 'mri' (2-channel complex images, k-space measurements) or 'image'
    mask_law: object  # the training mask law; FullMask for a model trained on clean data (an oracle)


def load_model(network_path: str | None, device) -> Model | None:
    if network_path is None:
        return None
    net, config = checkpoint.load_snapshot(network_path, device=device)
    measurement = config.get("measurement")
    dataset_kind = (config.get("dataset") or {}).get("kind")
    if measurement is not None:
        kind = "mri" if measurement["operator"] == "mri" else "image"
        law = mask_law_from_config(measurement["mask"])
    else:
        kind = "mri" if dataset_kind == "mri" else "image"
        law = FullMask()
    return Model(net=net, kind=kind, mask_law=law)


def open_data(path: str):
    """MRI records (a folder with an MRI dataset.json) or an image zip / folder."""
    meta_path = os.path.join(path, "dataset.json")
    if os.path.isdir(path) and os.path.isfile(meta_path):
        try:
            with open(meta_path) as f:
                if json.load(f).get("kind") == "mri":
                    return MRIDataset(path)
        except (json.JSONDecodeError, AttributeError):
            pass  # not an MRI index: an image folder's dataset.json (labels), read as such below
    if not os.path.exists(path):
        raise UserError(f"--data {path} does not exist.")
    return ImageFolderDataset(path)


@dataclass
class TaskOptions:
    task: str
    sigma_y: float
    mask_seed: int
    mri_law: object = None  # line mask law of the MRI task
    sr_factor: int = 4
    box_size: int = 0
    pixel_p: float = 0.5


@dataclass
class Example:
    """One measured example: y (1, ...) the measurement, mask (1, ...) its mask (MRI lines or dust pixels; None
    where the operator holds it), maps (1, C, H, W) for MRI, reference image (1, C, H, W) or None (stored data)."""

    index: int
    y: torch.Tensor
    mask: torch.Tensor | None
    maps: torch.Tensor | None
    reference: torch.Tensor | None


def measure_example(record: dict, opts: TaskOptions) -> Example:
    """Simulate (or read, for stored MRI records) the measurement of one record; deterministic in
    (--mask-seed, index)."""
    index = int(record["index"])
    g = example_generator(opts.mask_seed, index)
    if opts.task == "mri":
        maps = record["maps"][None]
        if "mask" in record:  # stored undersampled k-space: measured as acquired
            return Example(index, record["kspace"][None], record["mask"][None], maps, None)
        kspace = record["kspace"][None]
        mask = opts.mri_law.sample(1, tuple(kspace.shape[-2:]), g)
        noise = opts.sigma_y * measurement_randn(kspace, g) if opts.sigma_y > 0 else 0
        return Example(index, (kspace + noise) * mask, mask, maps, record["image"][None])
    image = record["image"][None]
    mask = PixelMaskLaw(opts.pixel_p).sample(1, tuple(image.shape[-2:]), g) if opts.task == "pixel" else None
    y = measure(task_operator(opts, image.shape[-1], mask), image, sigma_y=opts.sigma_y, generator=g)
    return Example(index, y, mask, None, image)


def task_operator(opts: TaskOptions, resolution: int, mask: torch.Tensor | None = None, maps=None, device="cpu"):
    """The operator A of a batch: MRI T = F S (its line mask M is applied separately), or the image operator (which
    holds its mask)."""
    if opts.task == "mri":
        return MultiCoilMRI(maps)
    if opts.task == "sr":
        return AvgPoolSR(opts.sr_factor)
    if opts.task == "box":
        return BoxInpainting(resolution, opts.box_size, device=device)
    return PixelMask(mask)


def stack(examples: list[Example], field: str, device):
    values = [getattr(e, field) for e in examples]
    return None if values[0] is None else torch.cat(values).to(device)


# ----------------------------------------------------------------------------
# Methods on a batch of (example, seed) pairs.


@dataclass
class SamplerOptions:
    num_subsets: int
    sigmas: torch.Tensor
    dc_step: float
    eta: float
    outer: str
    dps_step: float


def run_learned(method: str, model: Model, opts: TaskOptions, sampler: SamplerOptions, examples: list[Example],
                seeds: list[int], device) -> torch.Tensor:
    """One posterior sample per (example, seed) -> images (B, C, H, W): 2 channels (re, im) for MRI."""
    y, mask, maps = stack(examples, "y", device), stack(examples, "mask", device), stack(examples, "maps", device)
    net, resolution = model.net, model.net.img_resolution
    gen = SeedGenerators(seeds, device=device)
    operator = task_operator(opts, resolution, mask, maps, device)
    common = dict(sigmas=sampler.sigmas, eta=sampler.eta, outer=sampler.outer)
    if method == "dps":
        latents = gen.randn([len(seeds), net.out_channels, resolution, resolution], dtype=torch.float64)
        return dps_sampler(image_denoiser(net), latents, gen, operator, y, mask if opts.task == "mri" else None,
                           step_size=sampler.dps_step, **common)
    common.update(num_subsets=sampler.num_subsets, dc_step=sampler.dc_step)
    with torch.no_grad():
        if opts.task == "mri":
            # Measurement-space state: complex k-space with N(0, 1) real and imaginary parts (MSM.md section 1).
            latents = torch.view_as_complex(gen.randn([*y.shape, 2], dtype=torch.float64))
            z_hat = msm_posterior_sampler(net_partial_denoiser(net, operator), latents, model.mask_law, gen, y,
                                          placement="partial", mask=mask, **common)
            return operator.pinv(z_hat.to(torch.complex64))
        latents = gen.randn([len(seeds), net.out_channels, resolution, resolution], dtype=torch.float64)
        return msm_posterior_sampler(net_partial_denoiser(net, Identity()), latents, model.mask_law, gen, y,
                                     placement="aggregate", operator=operator, **common)


def run_baseline(method: str, opts: TaskOptions, example: Example, cs_options: dict) -> torch.Tensor:
    """A deterministic reconstruction of one example -> image (1, C, H, W) on the CPU."""
    if method == "cs":
        return cs_mri(example.y[0], example.maps[0], example.mask[0], **cs_options)[None]
    operator = task_operator(opts, example.y.shape[-1] * (opts.sr_factor if opts.task == "sr" else 1), example.mask,
                             example.maps)
    return zero_filled(operator, example.y)


# ----------------------------------------------------------------------------
# Metrics and pictures.


def display_images(images: torch.Tensor, task: str) -> torch.Tensor:
    """Images as the metrics see them: MRI magnitudes (N, 1, H, W), natural images in [0, 1]."""
    images = images.detach().to("cpu", torch.float64)
    return mri_magnitude(images) if task == "mri" else ((images + 1) / 2).clamp(0, 1)


def metric_rows(reference: torch.Tensor, estimate: torch.Tensor, task: str) -> dict:
    data_range = reference_max(reference) if task == "mri" else 1.0
    return {"psnr": psnr(reference, estimate, data_range).item(), "ssim": ssim(reference, estimate, data_range).item(),
            "nmse": nmse(reference, estimate).item()}


def tile(image: torch.Tensor, scale: float, label: str, zoom: int) -> np.ndarray:
    """(C, H, W) float -> uint8 RGB tile (zoom H + 12, zoom W, 3) with `label` in a strip above."""
    pixels = (image / scale).clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    pixels = np.repeat(np.repeat(pixels, zoom, axis=0), zoom, axis=1)
    pixels = np.repeat(pixels, 3, axis=2) if pixels.shape[2] == 1 else pixels
    strip = PIL.Image.new("RGB", (pixels.shape[1], 12))
    PIL.ImageDraw.Draw(strip).text((2, 0), label, fill=(255, 255, 255))
    return np.concatenate([np.asarray(strip), pixels], axis=0)


def save_panel(path: str, measurement: torch.Tensor, results: dict, reference: torch.Tensor | None, task: str):
    """Measurement, each method, reference and |error| of the first learned method (or the first method), in a row.
    MRI tiles are scaled by the reference maximum (the zero-filled maximum without a reference)."""
    scale = float(reference_max(reference)) if task == "mri" and reference is not None else \
        float(measurement.max()) if task == "mri" else 1.0
    scale = scale if scale > 0 else 1.0
    zoom = max(1, math.ceil(96 / measurement.shape[-1]))
    tiles = [tile(measurement[0], scale, "measurement", zoom)]
    tiles += [tile(image[0], scale, name, zoom) for name, image in results.items()]
    if reference is not None:
        tiles.append(tile(reference[0], scale, "reference", zoom))
        shown = next((m for m in results if m in LEARNED_METHODS), next(iter(results)))
        error = (reference - results[shown]).abs().mean(dim=1, keepdim=True) * ERROR_GAIN
        tiles.append(tile(error[0], scale, f"|err| x{ERROR_GAIN} {shown}", zoom))
    PIL.Image.fromarray(np.concatenate(tiles, axis=1)).save(path)


def summarise(rows: list[dict], methods: list[str]) -> dict:
    summary = {}
    for method in methods:
        values = [r for r in rows if r["method"] == method]
        if values:
            summary[method] = {"count": len(values)}
            for key in ("psnr", "ssim", "nmse"):
                column = np.array([r[key] for r in values], dtype=np.float64)
                summary[method][f"{key}_mean"] = float(column.mean())
                summary[method][f"{key}_std"] = float(column.std())
    return summary


def format_table(summary: dict) -> str:
    lines = [f"{'method':<12} {'n':>4} {'PSNR (dB)':>16} {'SSIM':>16} {'NMSE':>20}"]
    for method, s in summary.items():
        lines.append(f"{method:<12} {s['count']:>4} {s['psnr_mean']:>8.2f} +- {s['psnr_std']:<5.2f} "
                     f"{s['ssim_mean']:>8.4f} +- {s['ssim_std']:<6.4f} {s['nmse_mean']:>9.5f} +- {s['nmse_std']:<8.5f}")
    return "\n".join(lines)


def write_metrics(outdir: str, rows: list[dict], summary: dict, options: dict):
    with open(os.path.join(outdir, "metrics.csv"), "w", newline="") as f:
        f.write("".join(f"# {line}\n" for line in METRIC_CONVENTIONS))
        f.write("# zero-filled and cs do not depend on the seed: their rows repeat across seeds.\n")
        writer = csv.DictWriter(f, fieldnames=["example", "seed", "method", "psnr", "ssim", "nmse"])
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(outdir, "summary.json"), "w") as f:
        json.dump({"conventions": METRIC_CONVENTIONS, "options": options, "methods": summary}, f, indent=2)


# ----------------------------------------------------------------------------
# Options.


def parse_methods(methods: str | None, task: str, model: Model | None) -> list[str]:
    baselines = ["zero-filled", "cs"] if task == "mri" else ["zero-filled"]
    if methods is None:
        return (["msm"] if model is not None else []) + baselines
    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    for m in chosen:
        if m not in METHODS:
            raise UserError(f"--methods: unknown method {m!r}; expected a comma list of {', '.join(METHODS)}.")
        if m in LEARNED_METHODS and model is None:
            raise UserError(f"--methods {m} needs a model: pass --network.")
        if m == "cs" and task != "mri":
            raise UserError(f"--methods cs is the MRI compressed-sensing baseline; it does not apply to --task {task}.")
    if not chosen:
        raise UserError("--methods is empty; expected a comma list of " + ", ".join(METHODS) + ".")
    return list(dict.fromkeys(chosen))


def check_compatibility(task: str, model: Model | None, data, network_path: str | None, data_path: str):
    data_kind = data.describe()["kind"]
    if (task == "mri") != (data_kind == "mri"):
        raise UserError(f"--task {task} needs {'MRI records' if task == 'mri' else 'an image dataset'}, but --data "
                        f"{data_path} holds {'MRI records' if data_kind == 'mri' else 'images'}.")
    if model is None:
        return
    if (task == "mri") != (model.kind == "mri"):
        raise UserError(f"--task {task} does not fit the model {network_path}, which was trained on "
                        f"{'multi-coil MRI' if model.kind == 'mri' else 'images'}.")
    net = model.net
    if task == "mri":
        expected, found = [2, net.img_resolution, net.img_resolution], [2, *data.shape]
    else:
        expected, found = [net.out_channels, net.img_resolution, net.img_resolution], list(data.image_shape)
    if expected != found:
        raise UserError(f"--data {data_path} has images of shape {found} (C, H, W), but the model {network_path} "
                        f"was trained on {expected}.")


def select_indices(indices: str | None, first: int, num: int | None, size: int) -> list[int]:
    chosen = parse_seeds(indices) if indices is not None else list(range(first, size if num is None else first + num))
    if not chosen or max(chosen) >= size:
        raise UserError(f"The examples to reconstruct ({'--indices ' + indices if indices else f'--first {first} '}"
                        f"{'' if indices or num is None else f'--num {num}'}) must lie in 0..{size - 1}.")
    return chosen


def mri_mask_law(model: Model | None, kind: str | None, accel: float | None, acs: int | None, width: int):
    """The task's line law: flags given, else the model's training law where it is a line law, else lines-random
    with R = 4 and 8% of the columns as ACS (fastMRI's 4x setting)."""
    law = model.mask_law if model is not None and model.mask_law.kind in LINE_MASK_KINDS else None
    config = law.to_config() if law is not None else {"kind": "lines-random", "R": 4, "acs": round(0.08 * width)}
    config.update({k: v for k, v in (("kind", kind), ("R", accel), ("acs", acs)) if v is not None})
    law = mask_law_from_config(config)
    law.observed_fraction((width, width))  # rejects ACS wider than the image before anything is written
    return law


@click.command()
@click.option("--network", "network_path", default=None, help="Network snapshot or run directory (omit: baselines)")
@click.option("--data", "data_path", required=True, help="Clean references (image zip/folder, MRI records) or "
              "stored undersampled MRI records")
@click.option("--task", type=click.Choice(TASKS), required=True)
@click.option("--outdir", required=True, help="Where to write panels, metrics and the summary")
@click.option("--methods", default=None, help="Comma list of msm, dps, zero-filled, cs [default: msm + baselines]")
@click.option("--indices", default=None, help="Examples to reconstruct, e.g. 0-7 or 1,5,9 (overrides --first/--num)")
@click.option("--first", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--num", type=click.IntRange(min=1), default=None, help="Number of examples [default: all from --first]")
@click.option("--seeds", default="0", show_default=True, help="Posterior sample seeds, e.g. 0-3")
@click.option("--batch", "max_batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="(example, seed) pairs per sampler call")
@click.option("--mask-kind", type=click.Choice(LINE_MASK_KINDS), default=None, help="MRI line law [default: model's]")
@click.option("--accel", type=click.FloatRange(min=1), default=None, help="MRI acceleration R [default: model's or 4]")
@click.option("--acs", type=click.IntRange(min=0), default=None, help="MRI centre lines [default: model's or 8%]")
@click.option("--mask-seed", type=int, default=1, show_default=True, help="Seed of the simulated masks and noise")
@click.option("--sr-factor", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--box-size", type=click.IntRange(min=1), default=None, help="Side of the centred hole [default: res/2]")
@click.option("--pixel-p", type=float, default=0.5, show_default=True, help="Pixel drop probability")
@click.option("--sigma-y", type=float, default=0.01, show_default=True, help="Measurement noise std")
@click.option("--subsets", "num_subsets", type=click.IntRange(min=1), default=None, help="K [default: 3 MRI, 2 images]")
@click.option("--steps", "num_steps", type=int, default=200, show_default=True, help="Levels of the VP-200 grid")
@click.option("--dc-step", type=float, default=None, help="Data-consistency lambda [default: 2 MRI, 1.75 images]")
@click.option("--eta", type=click.FloatRange(min=0, max=1), default=0.85, show_default=True)
@click.option("--outer", type=click.Choice(OUTER_UPDATES), default="ddnm", show_default=True)
@click.option("--dps-step", type=float, default=1.0, show_default=True, help="DPS step zeta")
@click.option("--cs-reg", type=click.Choice(CS_REGULARISERS), default="l1-wavelet", show_default=True)
@click.option("--cs-lambda", type=float, default=1e-3, show_default=True, help="CS regularisation weight")
@click.option("--cs-iters", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True)
def main(network_path, data_path, task, outdir, methods, indices, first, num, seeds, max_batch, mask_kind, accel, acs,
         mask_seed, sr_factor, box_size, pixel_p, sigma_y, num_subsets, num_steps, dc_step, eta, outer, dps_step,
         cs_reg, cs_lambda, cs_iters, device):
    options = {k: v for k, v in locals().items() if k != "device"}
    device = dist.init(device)
    rank, world = dist.get_rank(), dist.get_world_size()

    # Validate everything before writing anything.
    dc_step = dc_step if dc_step is not None else (2.0 if task == "mri" else 1.75)
    check_dc_step(dc_step)
    if not sigma_y >= 0:
        raise UserError(f"--sigma-y must be >= 0, got {sigma_y}.")
    if not 0 <= pixel_p < 1:
        raise UserError(f"--pixel-p must be in [0, 1), got {pixel_p}.")
    if not (dps_step > 0 and cs_lambda > 0):
        raise UserError(f"--dps-step and --cs-lambda must be > 0, got {dps_step} and {cs_lambda}.")
    sigmas = respaced_sigmas(num_steps)
    seeds = parse_seeds(seeds)
    model = load_model(network_path, device)
    data = open_data(data_path)
    check_compatibility(task, model, data, network_path, data_path)
    methods = parse_methods(methods, task, model)
    resolution = data.shape[-1] if task == "mri" else data.resolution
    opts = TaskOptions(task=task, sigma_y=sigma_y, mask_seed=mask_seed, sr_factor=sr_factor,
                       box_size=box_size if box_size is not None else resolution // 2, pixel_p=pixel_p)
    if task == "mri":
        opts.mri_law = mri_mask_law(model, mask_kind, accel, acs, resolution)
    if task == "sr" and resolution % sr_factor:
        raise UserError(f"--sr-factor {sr_factor} does not divide the image size {resolution}.")
    if task == "box" and opts.box_size > resolution:
        raise UserError(f"--box-size {opts.box_size} exceeds the image size {resolution}.")
    sampler = SamplerOptions(num_subsets=num_subsets or (3 if task == "mri" else 2), sigmas=sigmas.to(device),
                             dc_step=dc_step, eta=eta, outer=outer, dps_step=dps_step)
    # Every rank reads every selected record: a bad record (e.g. stored k-space without its mask) stops all ranks
    # before anything is written. Held-out sets are small, so they are kept in memory.
    examples = {i: measure_example(data[i], opts) for i in select_indices(indices, first, num, len(data))}
    stored = any(e.reference is None for e in examples.values())
    cs_options = dict(regulariser=cs_reg, lamda=cs_lambda, max_iter=cs_iters)

    if rank == 0:
        for sub in ("panels", "reconstructions"):
            os.makedirs(os.path.join(outdir, sub), exist_ok=True)
    dist.barrier()
    pairs = dist.shard([(i, s) for i in examples for s in seeds])
    batches = [pairs[k : k + max_batch] for k in range(0, len(pairs), max_batch)]
    dist.print0(f"Reconstructing {len(examples)} example(s) x {len(seeds)} seed(s) with {', '.join(methods)} "
                f"({task}) on {world} rank(s) to {outdir}")
    baselines, rows = {}, []
    for batch in tqdm.tqdm(batches, disable=rank != 0, unit="batch"):
        batch_examples = [examples[i] for i, _ in batch]
        learned = {m: run_learned(m, model, opts, sampler, batch_examples, [s for _, s in batch], device).cpu()
                   for m in methods if m in LEARNED_METHODS}
        for j, (i, seed) in enumerate(batch):
            example = examples[i]
            results = {}
            for m in methods:
                if m in LEARNED_METHODS:
                    results[m] = learned[m][j : j + 1]
                else:
                    if (i, m) not in baselines:
                        baselines[(i, m)] = run_baseline(m, opts, example, cs_options)
                    results[m] = baselines[(i, m)]
            measurement = display_images(run_baseline("zero-filled", opts, example, cs_options), task)
            reference = display_images(example.reference, task) if example.reference is not None else None
            shown = {m: display_images(image, task) for m, image in results.items()}
            name = f"{i:05d}-{seed:06d}"
            save_panel(os.path.join(outdir, "panels", f"{name}.png"), measurement, shown, reference, task)
            np.savez(os.path.join(outdir, "reconstructions", f"{name}.npz"),
                     **{m: image[0].numpy().astype(np.float32) for m, image in results.items()})
            if reference is not None:
                rows += [{"example": i, "seed": seed, "method": m, **metric_rows(reference, shown[m], task)}
                         for m in methods]

    rows = [r for part in dist.all_gather_object(rows) for r in part]
    if rank == 0:
        if stored:
            with open(os.path.join(outdir, "summary.json"), "w") as f:
                json.dump({"options": options, "methods": None,
                           "note": "stored measurements have no reference: no metrics"}, f, indent=2)
            print(f"Wrote panels and reconstructions to {outdir} (stored measurements: no reference, no metrics)")
        else:
            order = {m: k for k, m in enumerate(methods)}
            rows.sort(key=lambda r: (r["example"], r["seed"], order[r["method"]]))
            summary = summarise(rows, methods)
            write_metrics(outdir, rows, summary, options)
            print(format_table(summary))
            print(f"Wrote panels, reconstructions, metrics.csv and summary.json to {outdir}")
    dist.destroy()


if __name__ == "__main__":
    dnnlib.run_cli(main)
