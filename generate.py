"""Generate images from a network snapshot: one PNG per seed plus a grid, seeds sharded across ranks.

    python generate.py --network runs/00000-phantoms/network-snapshot-000050.pt --outdir out/samples --seeds 0-63
    python generate.py --network RUN_DIR --outdir out/msm --sampler msm --subsets 3     # MSM model, 200 VP levels
    torchrun --standalone --nproc_per_node=2 generate.py --network RUN_DIR --outdir out/samples --seeds 0-49999

Everything about the model (architecture, preconditioning, data shape, labels, measurement operator and mask law)
comes from the snapshot. OUTDIR/settings.json records the options the images depend on: rerunning the same command
may overwrite its images, another command is refused before anything is written (dnnlib.util.check_outdir_settings).
Each seed has its own random stream, so an image depends only on its seed, not on --batch or the number of ranks.

Samplers: `edm` (EDM's Heun/Euler on the image, for models trained on clean data), `msm` (MSM's stochastic
partial-score sampler in measurement space, training/samplers.py; the default for models trained on measurements)
and `ambient` (Ambient Diffusion's sampler: EDM's Heun/Euler where the network sees one mask per seed of its training
law with the extra delta drop; the default for models trained with --loss ambient). A network with a mask input
channel is never given the noisy image there: `edm` is refused for it.
The MSM sampler's VP-200 grid is the reference's 'ddim200' (t = 0, 5, ..., 995), or the section rule a vp200 snapshot
was trained on (samplers.vp_grid_of; --vp-grid overrides); it starts inside the network's training range
(samplers.sigmas_in_training_range: levels above it are dropped, and the log says from where and why). Each batch
shows a bar of network calls with rate and ETA.
For MRI the operator T needs coil maps: those of --maps, or those of training record (seed mod number of records) of
the snapshot's dataset.

MRI output (any sampler): the magnitude of the coil-combined image T^+ z_hat as an 8-bit grayscale PNG with one fixed
scale for every seed, pixel = 255 * magnitude / MRI_DISPLAY_MAX, clipped. Datasets are normalised so that the 99th
percentile of the magnitude of the low-resolution ACS image is 1 (training/mri.py); the full image's 99th percentile
then lies higher (1.48 +- 0.18 for 32x32 phantoms with 4 ACS lines, 1.25 +- 0.16 for 64x64 with 8), which 2 keeps
below white, with headroom for the brightest 1%.
"""

import json
import os

import click
import numpy as np
import PIL.Image
import torch
import tqdm

import dnnlib
from dnnlib import UserError
from torch_utils import distributed as dist
from torch_utils.compiling import compile_network
from torch_utils.misc import SeedGenerators, image_grid, parse_seeds, save_image, to_uint8_images
from training import snapshot as checkpoint
from training.classifier import is_classifier
from training.guidance import CFG_CONVENTIONS, POTENTIALS
from training.loss import AmbientLoss
from training.masks import with_acquired_draw
from training.measurements import MeasurementConfig, aggregate_projection, skip_space_of
from training.mri import coil_map_records
from training.patches import patch_prior, use_seeds
from training.samplers import (
    CountingNetwork,
    ambient_sampler,
    edm_sampler,
    msm_heun_sampler,
    msm_sampler,
    net_ambient_denoiser,
    net_denoiser,
    net_partial_denoiser,
    rho_schedule,
    seed_measurement_randn,
    sigmas_in_training_range,
    vp200_sigmas,
    vp_grid_of,
)

MRI_DISPLAY_MAX = 2.0  # magnitude shown as white in MRI PNGs (module docstring)


def seed_batches(seeds: list[int], max_batch: int, rank: int, world: int) -> list[list[int]]:
    """Split seeds into batches of at most max_batch and deal them to ranks round-robin."""
    num_batches = max(int(np.ceil(len(seeds) / (max_batch * world))), 1) * world
    batches = [b.tolist() for b in np.array_split(np.array(seeds, dtype=np.int64), num_batches)]
    return [b for b in batches[rank::world] if len(b)]


def image_path(outdir: str, seed: int, subdirs: bool) -> str:
    return os.path.join(outdir, f"{seed - seed % 1000:06d}", f"{seed:06d}.png") if subdirs else \
        os.path.join(outdir, f"{seed:06d}.png")


def mri_magnitude_images(image: torch.Tensor) -> np.ndarray:
    """Complex images as 2 channels (N, 2, H, W) -> uint8 (N, H, W, 1) magnitudes on the fixed display scale."""
    magnitude = image.to(torch.float64).square().sum(dim=1, keepdim=True).sqrt()
    pixels = (magnitude * (255 / MRI_DISPLAY_MAX)).round().clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def load_maps_file(path: str, expected_shape: tuple) -> torch.Tensor:
    """--maps: a .npy complex array (C, H, W) of the snapshot's coil count (any, where expected_shape[0] is None) and
    size."""
    try:
        maps = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"--maps {path} could not be read as a .npy array ({e}).") from e
    fits = len(maps.shape) == 3 and all(e is None or e == m for e, m in zip(expected_shape, maps.shape))
    if not np.iscomplexobj(maps) or not fits:
        shown = tuple("C" if e is None else e for e in expected_shape)
        raise UserError(f"--maps {path} must hold complex coil maps of shape {shown}, got "
                        f"{maps.dtype} {tuple(maps.shape)}.")
    with np.errstate(over="ignore"):  # checked after the cast: complex128 values beyond float32 become Inf here
        maps = maps.astype(np.complex64)
    if not np.isfinite(maps).all():
        raise UserError(f"--maps {path} holds NaN or Inf values (as complex64).")
    return torch.from_numpy(maps)


def msm_sigmas(schedule: str, num_steps: int, sigma_min: float, sigma_max: float, rho: float,
               loss_config: dict | None, vp_grid: str | None = None) -> tuple[torch.Tensor, str]:
    """The MSM sampler's decreasing noise levels and a note for the log: the 200 VP levels inside the network's
    training range (samplers.sigmas_in_training_range) by the grid rule vp_grid (None: the snapshot's,
    samplers.vp_grid_of), or EDM's rho schedule without its final 0."""
    if schedule == "vp200":
        rule = vp_grid or vp_grid_of(loss_config)
        sigmas, note = sigmas_in_training_range(vp200_sigmas(rule=rule), loss_config)
        return sigmas, f"{note}, {rule} grid"
    return rho_schedule(num_steps, sigma_min, sigma_max, rho)[:-1], f"rho schedule from sigma {sigma_max:g}"


class MSMSetup:
    """What the MSM and Ambient samplers need from a snapshot: the measurement's mask law and operator family, and
    for MRI the coil maps (--maps, or training record seed mod N per seed) and the measurement shape."""

    def __init__(self, net, config: dict, maps_path: str | None, device, acquired_draw: str | None = None):
        self.net, self.device = net, device
        self.skip_space = skip_space_of(config.get("loss"))
        measurement = MeasurementConfig.from_config(config["measurement"])
        measurement.law = with_acquired_draw(measurement.law, acquired_draw)
        self.measurement = measurement
        resolution = net.img_resolution
        if measurement.operator == "mri":
            num_coils = config["dataset"].get("num_coils")
            if num_coils is None and maps_path is None:
                raise UserError("This MRI snapshot's config records no coil count (dataset.num_coils): pass coil "
                                "maps with --maps FILE.npy (complex (C, H, W)).")
            self.records = (coil_map_records(config["dataset"].get("path"), num_coils, (resolution, resolution))
                            if maps_path is None else None)
            # A snapshot without a coil count (e.g. converted from the MSM reference) takes any count from --maps.
            self.fixed_maps = None if maps_path is None else load_maps_file(maps_path, (num_coils, resolution,
                                                                                        resolution))
            num_coils = num_coils or (None if self.fixed_maps is None else self.fixed_maps.shape[0])
            self.shape, self.dtype = [num_coils, resolution, resolution], torch.complex64
        else:
            self.shape, self.dtype = [net.out_channels, resolution, resolution], torch.float32

    def operator(self, seeds: list[int]):
        if self.measurement.operator != "mri":
            return self.measurement.full_operator()
        if self.fixed_maps is not None:
            maps = self.fixed_maps[None]
        else:
            maps = torch.stack([self.records[seed % len(self.records)]["maps"] for seed in seeds])
        return self.measurement.full_operator(maps.to(self.device))

    def generate(self, seeds, gen, labels, *, num_subsets, variant, sigmas, eta, num_steps, sigma_min, sigma_max,
                 rho, guide=None, target=None) -> torch.Tensor:
        """Images (N, C, H, W) (MRI: the complex image T^+ z_hat as 2 channels) for the seeds of `gen`; `guide` (a
        GuidanceSetup) adds CFG to the partial denoisers and the classifier terms (target classes) to the aggregate."""
        operator = self.operator(seeds)
        latents = seed_measurement_randn(gen, torch.empty([len(seeds), *self.shape], dtype=self.dtype))
        latents = latents.to(self.device)
        partial = net_partial_denoiser(self.net, operator, labels, self.skip_space)
        guidance = None
        if guide is not None and guide.active:
            partial = guide.partial(lambda labels_in: net_partial_denoiser(self.net, operator, labels_in,
                                                                           self.skip_space), labels)
            guidance = guide.correction(target)
        project = aggregate_projection(self.skip_space, operator)
        if variant == "heun":
            z_hat = msm_heun_sampler(partial, latents, self.measurement.law, gen, num_subsets=num_subsets,
                                     num_steps=num_steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho,
                                     guidance=guidance, project=project)
        else:
            z_hat = msm_sampler(partial, latents, self.measurement.law, gen, num_subsets=num_subsets, sigmas=sigmas,
                                variant=variant, eta=eta, guidance=guidance, project=project)
        return operator.pinv(z_hat) if self.measurement.operator == "mri" else z_hat

    def generate_ambient(self, seeds, gen, labels, *, delta, **edm_options) -> torch.Tensor:
        """Images as `generate` returns them, by Ambient's sampler (samplers.ambient_sampler) with the snapshot's
        mask law and extra drop probability delta."""
        operator = self.operator(seeds)
        latents = seed_measurement_randn(gen, torch.empty([len(seeds), *self.shape], dtype=self.dtype))
        z_hat = ambient_sampler(net_ambient_denoiser(self.net, operator, labels), latents.to(self.device),
                                self.measurement.law, delta, gen, **edm_options)
        return operator.pinv(z_hat) if self.measurement.operator == "mri" else z_hat


class GuidanceSetup:
    """--classifier, --guidance, --guidance-scale, --guidance-sigma-range, --cfg-scale, --cfg-convention: the
    guidance terms (training/guidance.py) for a batch's target classes, checked against the model before anything is
    written. Classifier guidance needs a classifier of the model's image size and channels (and class count, for a
    class-conditional model); it may guide an unconditional model, whose classes then come from the classifier.
    Classifier-free guidance needs a class-conditional model."""

    def __init__(self, net, config: dict, classifier_path, kinds, scales, sigma_range, cfg_scale: float,
                 cfg_convention: str, sampler: str, is_mri: bool, device):
        from training.classifier import check_compatible, classifier_logits
        from training.guidance import cfg_coefficient, check_sigma_range
        from training.snapshot import load_classifier

        self.kinds, self.cfg_scale, self.cfg_convention = list(kinds), cfg_scale, cfg_convention
        self.sigma_range = check_sigma_range(parse_sigma_range(sigma_range)) if sigma_range else None
        cfg_coefficient(cfg_scale, cfg_convention)
        if not self.kinds and (scales or classifier_path or (sigma_range and not cfg_scale)):
            given = ("--classifier" if classifier_path else "--guidance-scale" if scales else
                     "--guidance-sigma-range")
            alternative = "" if scales or classifier_path else " or --cfg-scale"
            raise UserError(f"{given} was given without --guidance{alternative}.")
        if len(scales) not in (0, 1, len(self.kinds)):
            raise UserError(f"--guidance-scale was given {len(scales)} times for {len(self.kinds)} --guidance terms; "
                            "give one scale for all or one per term.")
        self.scales = list(scales) * len(self.kinds) if len(scales) == 1 else list(scales) or [1.0] * len(self.kinds)
        if self.kinds and classifier_path is None:
            raise UserError(f"--guidance {self.kinds[0]} needs a noise-aware classifier: give --classifier SNAPSHOT "
                            "(train one with train.py --kind classifier).")
        if cfg_scale and not net.label_dim:
            raise UserError("--cfg-scale needs a class-conditional model (trained with --cond and --label-dropout); "
                            "this snapshot is unconditional.")
        if (self.kinds or cfg_scale) and (is_mri or sampler == "ambient"):
            raise UserError("--guidance and --cfg-scale apply to image models with the edm or msm sampler.")
        self.classifier, self.classifier_classes = None, 0
        if self.kinds:
            classifier, classifier_config = load_classifier(classifier_path, device)
            check_compatible(classifier_config, config, classifier_path)
            self.classifier, self.classifier_classes = classifier_logits(classifier), classifier.label_dim
        # Generated images have classes when the model is conditional or classifier guidance targets them.
        self.num_classes = net.label_dim or (self.classifier_classes if "classifier" in self.kinds else 0)

    @property
    def active(self) -> bool:
        return bool(self.kinds) or self.cfg_scale != 0

    def terms(self, target: torch.Tensor | None) -> list:
        from training.guidance import GuidanceTerm

        return [GuidanceTerm(self.classifier, kind, scale, target=target if kind == "classifier" else None,
                             sigma_range=self.sigma_range) for kind, scale in zip(self.kinds, self.scales)]

    def denoiser(self, make_denoiser, labels, target):
        """The guided full denoiser: CFG of make_denoiser(labels) when --cfg-scale, then the classifier terms."""
        from training.guidance import cfg_denoiser, guided

        base = (cfg_denoiser(make_denoiser, labels, self.cfg_scale, self.cfg_convention, self.sigma_range)
                if self.cfg_scale else make_denoiser(labels))
        return guided(base, self.terms(target))

    def partial(self, make_partial, labels):
        """MSM: the (classifier-free guided) partial denoiser; the classifier terms go in through `correction`."""
        from training.guidance import cfg_partial_denoiser

        if not self.cfg_scale:
            return make_partial(labels)
        return cfg_partial_denoiser(make_partial, labels, self.cfg_scale, self.cfg_convention, self.sigma_range)

    def correction(self, target):
        from training.guidance import correction

        terms = self.terms(target)
        return (lambda z, sigma: correction(terms, z, sigma)) if terms else None


def parse_sigma_range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError as e:
        raise UserError(f"--guidance-sigma-range must be LO,HI (two noise levels), got {text!r}.") from e
    return lo, hi


def parse_label_list(text: str | None, option: str, num_classes: int) -> list[int] | None:
    if text is None:
        return None
    try:
        labels = [int(v) for v in text.split(",")]
    except ValueError as e:
        raise UserError(f"{option} must be class indices such as 0,1, got {text!r}.") from e
    bad = [v for v in labels if not 0 <= v < num_classes]
    if bad:
        raise UserError(f"{option} {bad[0]} is out of range: the model has {num_classes} classes.")
    return labels


def write_labels_and_class_grids(outdir: str, seed_classes: list, grid_path: str, subdirs: bool):
    """Labelled outputs: `dataset.json` in outdir with EDM's {"labels": [[relative path, class], ...]} (so the folder
    feeds train.py --cond / --kind classifier directly) and a grid of the first 64 images of every class,
    `{grid}-class{k}.png`."""
    labels = [[os.path.relpath(image_path(outdir, seed, subdirs), outdir).replace(os.sep, "/"), int(k)]
              for seed, k in sorted(seed_classes)]
    with open(os.path.join(outdir, "dataset.json"), "w") as f:
        json.dump({"labels": labels}, f)
    stem = grid_path[:-4] if grid_path.endswith(".png") else grid_path
    for k in sorted({k for _, k in seed_classes}):
        members = [seed for seed, c in sorted(seed_classes) if c == k][:64]
        tiles = [np.asarray(PIL.Image.open(image_path(outdir, seed, subdirs))) for seed in members]
        save_image(image_grid(np.stack([a[:, :, None] if a.ndim == 2 else a for a in tiles])), f"{stem}-class{k}.png")


def open_bridge_source(net, guide: GuidanceSetup, source_path: str):
    """--bridge-source: the labelled image dataset, refused unless its images and classes fit the model."""
    from training.dataset import open_dataset

    try:
        dataset = open_dataset(source_path, use_labels=True)
    except UserError as e:
        raise UserError(f"--bridge-source {source_path} must be a labelled image dataset (dataset.json with labels): "
                        f"{str(e).rstrip('.')}.") from e
    shape = [net.out_channels, net.img_resolution, net.img_resolution]
    if list(dataset.image_shape) != shape:
        raise UserError(f"--bridge-source {source_path} holds images of shape {list(dataset.image_shape)}, but the "
                        f"model makes {shape}.")
    num_classes = guide.num_classes or guide.classifier_classes  # an unconditional model carries the labels over
    if dataset.label_dim > num_classes:
        raise UserError(f"--bridge-source {source_path} has labels up to {dataset.label_dim - 1}, outside the "
                        f"model's {num_classes} classes.")
    return dataset


def dual_bridge_images(net, guide: GuidanceSetup, dataset, source_labels, target_labels, outdir: str,
                       max_batch: int, edm_options: dict, subdirs: bool, device, rank: int, world: int) -> list:
    """--bridge-source (MGDM's stage 2, training/bridge.py): every image of the labelled dataset (open_bridge_source)
    whose class is in --source-label is encoded by the probability-flow ODE under its class and decoded under the
    matching --target-label class with the chosen guidance; image i of the dataset is written as image i. Returns
    this rank's (index, target class) pairs."""
    from training.bridge import dual_bridge

    mapping = dict(zip(source_labels, target_labels))
    labels = [int(dataset.get_label(i).argmax()) for i in range(len(dataset))]
    chosen = [i for i in range(len(dataset)) if labels[i] in mapping][rank::world]
    written = []
    for start in tqdm.tqdm(range(0, len(chosen), max_batch), disable=rank != 0, unit="batch"):
        indices = chosen[start:start + max_batch]
        x = torch.stack([dataset[i]["image"] for i in indices]).to(device, torch.float64)
        src = torch.tensor([labels[i] for i in indices], device=device)
        tgt = torch.tensor([mapping[labels[i]] for i in indices], device=device)

        def one_hot(idx):
            return torch.nn.functional.one_hot(idx, net.label_dim).float() if net.label_dim else None

        with torch.no_grad():
            out = dual_bridge(net_denoiser(net, one_hot(src)),
                              guide.denoiser(lambda labels_in: net_denoiser(net, labels_in), one_hot(tgt), tgt), x,
                              num_steps=edm_options["num_steps"], sigma_min=edm_options["sigma_min"],
                              sigma_max=edm_options["sigma_max"], rho=edm_options["rho"])
        for i, k, img in zip(indices, tgt.tolist(), to_uint8_images(out)):
            path = image_path(outdir, i, subdirs)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            save_image(img, path)
            written.append((i, k))
    return written


AMBIENT_LOSS = "training.loss.AmbientLoss"


def resolve_sampler(sampler: str | None, config: dict, mask_channels: int) -> str:
    """--sampler default: ambient for a model trained with the Ambient loss, msm for another model trained on
    measurements whose mask law hides something, else edm. Refused: msm or ambient without a measurement process,
    ambient for a model not trained with the Ambient loss (it needs the loss's delta), and edm for a network with
    `mask_channels` > 0 (it would feed the noisy image into the mask channels and write garbage)."""
    measurement = config.get("measurement")
    is_ambient = (config.get("loss") or {}).get("class_name") == AMBIENT_LOSS
    if sampler is None:
        masked = measurement is not None and measurement["mask"]["kind"] != "full"
        return "ambient" if is_ambient else "msm" if masked else "edm"
    if sampler in ("msm", "ambient") and measurement is None:
        raise UserError(f"--sampler {sampler} needs a snapshot trained on measurements, but this snapshot's config "
                        "has no measurement process (use --sampler edm).")
    if sampler == "ambient" and not is_ambient:
        raise UserError("--sampler ambient needs a snapshot trained with --loss ambient (it samples with that loss's "
                        "extra drop probability delta); use --sampler msm.")
    if sampler == "edm" and mask_channels:
        raise UserError(f"--sampler edm would feed the noisy image into this network's mask input channel (it was "
                        f"trained with {'--loss ambient' if is_ambient else '--mask-channel'}); use --sampler "
                        f"{'ambient' if is_ambient else 'msm'}.")
    return sampler


@click.command()
@click.option("--network", "network_path", required=True, help="Network snapshot file or run directory")
@click.option("--outdir", required=True, help="Where to save the images")
@click.option("--seeds", default="0-63", show_default=True, help="Seeds, e.g. 0-63 or 1,5,9-11")
@click.option("--batch", "max_batch", type=click.IntRange(min=1), default=64, show_default=True,
              help="Maximum batch size per rank")
@click.option("--class", "class_idx", type=click.IntRange(min=0), default=None, help="Class label (default: random)")
@click.option("--per-class", type=click.IntRange(min=1), default=None,
              help="N images of every class, seeds FIRST .. FIRST + K N - 1 (FIRST: the first of --seeds), seed "
              "FIRST + i of class i // N; with classes, dataset.json labels and a grid per class are written")
@click.option("--classifier", "classifier_path", default=None, help="Noise-aware classifier snapshot (--guidance)")
@click.option("--guidance", "guidance_kinds", type=click.Choice(POTENTIALS), multiple=True,
              help="Classifier guidance D += sigma^2 s grad G: classifier (log p(class)), entropy, margin (-top-two "
              "gap), leastconf (-max p); repeat for several terms")
@click.option("--guidance-scale", "guidance_scales", type=float, multiple=True,
              help="Scale s of each --guidance term (one for all, or one per term)  [default: 1]")
@click.option("--guidance-sigma-range", default=None, metavar="LO,HI",
              help="Apply --guidance (and --cfg-scale) only at noise levels LO <= sigma <= HI")
@click.option("--cfg-scale", type=float, default=0.0, show_default=True,
              help="Classifier-free guidance weight w of a model trained with --label-dropout; mgdm: "
              "D = D_c + w (D_c - D_u), 0 = conditional; edm2: D = D_u + w (D_c - D_u), 1 = conditional")
@click.option("--cfg-convention", type=click.Choice(CFG_CONVENTIONS), default="mgdm", show_default=True,
              help="Meaning of --cfg-scale (mgdm w = edm2 w - 1)")
@click.option("--bridge-source", default=None, metavar="ZIP|DIR",
              help="Dual bridge (MGDM stage 2): re-synthesise this labelled dataset by probability-flow inversion "
              "under each image's class and guided decoding (--steps per direction)")
@click.option("--source-label", default=None, help="Dual bridge: classes to re-synthesise, e.g. 0,1 [default: all]")
@click.option("--target-label", default=None, help="Dual bridge: their target classes, e.g. 1,0 [default: same]")
@click.option("--steps", "num_steps", type=click.IntRange(min=1), default=18, show_default=True)
@click.option("--sigma-min", type=click.FloatRange(min=0, min_open=True), default=0.002, show_default=True)
@click.option("--sigma-max", type=click.FloatRange(min=0, min_open=True), default=80.0, show_default=True)
@click.option("--rho", type=click.FloatRange(min=0, min_open=True), default=7.0, show_default=True)
@click.option("--solver", type=click.Choice(["heun", "euler"]), default="heun", show_default=True)
@click.option("--S-churn", "S_churn", type=click.FloatRange(min=0), default=0.0, show_default=True)
@click.option("--S-min", "S_min", type=click.FloatRange(min=0), default=0.0, show_default=True)
@click.option("--S-max", "S_max", type=click.FloatRange(min=0), default=float("inf"), show_default=True)
@click.option("--S-noise", "S_noise", type=float, default=1.0, show_default=True)
@click.option("--sampler", type=click.Choice(["edm", "msm", "ambient"]), default=None,
              help="Sampler [default: ambient for a model trained with --loss ambient, msm for another model trained "
              "on masked measurements, else edm]")
@click.option("--subsets", "num_subsets", type=int, default=3, show_default=True,
              help="MSM: masks (partial estimates) per noise level, K >= 1")
@click.option("--schedule", type=click.Choice(["vp200", "rho"]), default="vp200", show_default=True,
              help="MSM noise levels: the reference's 200 VP levels, or EDM's rho schedule (--steps, --sigma-*)")
@click.option("--vp-grid", type=click.Choice(["ddim", "section"]), default=None,
              help="Rule of the 200 VP levels: the reference's ddim200 stride (t = 0, 5, ..., 995) or the section "
              "rule (t = round(i 999 / 199))  [default: the snapshot's; ddim where it records none]")
@click.option("--variant", type=click.Choice(["batched", "reference", "heun"]), default="batched",
              show_default=True, help="MSM: K estimates from the start-of-step state in one batched call; the "
              "reference's sequential write-back; or EDM Heun on the aggregate (rho schedule)")
@click.option("--eta", type=click.FloatRange(min=0, max=1), default=1.0, show_default=True,
              help="MSM: DDIM eta of the outer update (1 = ancestral)")
@click.option("--maps", "maps_path", default=None, help="MRI: coil maps .npy complex (C,H,W) [default: from the "
              "training records]")
@click.option("--acquired-draw", type=click.Choice(["frequencies", "masks"]), default=None,
              help="MSM model trained on acquired masks: draw each column with its acquired frequency, or one of the "
              "acquired masks  [default: frequencies]")
@click.option("--subdirs", is_flag=True, help="Save images in subdirectories of 1000")
@click.option("--grid", "grid_path", default=None, help="Grid image of the first 64 seeds [default: OUTDIR-grid.png]")
@click.option("--patch-size", type=click.IntRange(min=1), default=None,
              help="Patch prior: tile size [default: the largest training size whose tile grid can shift]")
@click.option("--patch-batch", type=click.IntRange(min=1), default=None,
              help="Patch prior: tiles per network call  [default: 256]")
@click.option("--assembly", type=click.Choice(["tile", "overlap"]), default=None,
              help="Patch prior: non-overlapping tiles on a grid shifted at random per call, or a fixed grid of "
              "stride p/2 averaged  [default: tile]")
@click.option("--compile", "compile_net", is_flag=True,
              help="torch.compile the network (pays off for many seeds; the first batch includes the compilation)")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True)
def main(network_path, outdir, seeds, max_batch, class_idx, per_class, classifier_path, guidance_kinds,
         guidance_scales, guidance_sigma_range, cfg_scale, cfg_convention, bridge_source, source_label, target_label,
         num_steps, sigma_min, sigma_max, rho, solver, S_churn, S_min, S_max, S_noise, sampler, num_subsets, schedule,
         vp_grid, variant, eta, maps_path, acquired_draw, subdirs, grid_path, patch_size, patch_batch, assembly,
         compile_net, device):
    if num_subsets < 1:
        raise UserError(f"--subsets must be an integer >= 1, got {num_subsets}.")
    # What the outputs depend on, recorded in OUTDIR/settings.json: a rerun may overwrite its own outputs only.
    recorded = {k: v for k, v in locals().items() if k not in ("outdir", "max_batch", "compile_net", "device")}
    recorded.update(network_path=os.path.abspath(checkpoint.resolve_snapshot_path(network_path)),
                    grid_path=os.path.abspath(grid_path or os.path.normpath(outdir) + "-grid.png"),
                    **{k: os.path.abspath(v) for k, v in (("classifier_path", classifier_path),
                                                          ("bridge_source", bridge_source), ("maps_path", maps_path))
                       if v is not None})
    seeds = parse_seeds(seeds)
    grid_path = grid_path or os.path.normpath(outdir) + "-grid.png"
    dnnlib.check_outdir(outdir)
    dnnlib.check_outdir_settings(outdir, recorded)
    dnnlib.check_outdir(os.path.dirname(os.path.abspath(grid_path)), "--grid folder")
    device = dist.init(device)
    rank, world = dist.get_rank(), dist.get_world_size()
    net, config = checkpoint.load_snapshot(network_path, device=device)
    if is_classifier(config):
        raise UserError(f"--network {network_path} is a classifier snapshot; generate.py needs a diffusion model "
                        "(a classifier goes to --classifier).")
    if compile_net:  # the samplers call the compiled network; its attributes read through to the module
        net = compile_network(net, device.type)
    net = patch_prior(net, config, patch_size, patch_batch, assembly)  # a patch prior as a whole-image network
    if bridge_source is not None and config.get("patches"):
        raise UserError("--bridge-source inverts the probability-flow ODE, which needs a deterministic denoiser; a "
                        "patch prior's whole-image denoiser draws a random grid shift and pad-ring noise per call.")
    net = CountingNetwork(net)  # ticks the per-batch progress bar once per network call
    sampler = resolve_sampler(sampler, config, net.in_channels - net.out_channels)
    is_mri = config.get("dataset", {}).get("kind") == "mri"
    guide = GuidanceSetup(net, config, classifier_path, guidance_kinds, guidance_scales, guidance_sigma_range,
                          cfg_scale, cfg_convention, sampler, is_mri, device)
    num_classes = guide.num_classes
    if class_idx is not None and class_idx >= num_classes:
        raise UserError(f"--class {class_idx} is out of range: the model has {num_classes} classes.")
    if per_class is not None and not num_classes:
        raise UserError("--per-class needs classes: a class-conditional model or --guidance classifier with a "
                        "--classifier.")
    seed_class = None
    if per_class is not None:
        seeds = [seeds[0] + i for i in range(num_classes * per_class)]
        seed_class = {seed: i // per_class for i, seed in enumerate(seeds)}
    elif class_idx is not None:
        seed_class = {seed: class_idx for seed in seeds}
    if bridge_source is None and (source_label or target_label):
        raise UserError("--source-label and --target-label apply to --bridge-source only.")
    if bridge_source is not None:
        if sampler != "edm":
            raise UserError("--bridge-source needs a model trained on clean images (the edm sampler's denoiser).")
        bridge_classes = num_classes or guide.classifier_classes
        if not bridge_classes:
            raise UserError("--bridge-source needs classes: a class-conditional model or a --classifier with "
                            "--guidance.")
        source_labels = (parse_label_list(source_label, "--source-label", bridge_classes)
                         or list(range(bridge_classes)))
        target_labels = parse_label_list(target_label, "--target-label", bridge_classes) or source_labels
        if len(source_labels) != len(target_labels):
            raise UserError(f"--source-label and --target-label must list as many classes, got "
                            f"{len(source_labels)} and {len(target_labels)}.")
    if maps_path is not None and not (is_mri and sampler in ("msm", "ambient")):
        raise UserError("--maps applies only to the msm and ambient samplers of an MRI model.")
    sigma_min, sigma_max = max(sigma_min, net.sigma_min), min(sigma_max, net.sigma_max)
    shape = [net.out_channels, net.img_resolution, net.img_resolution]
    edm_options = dict(num_steps=num_steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, solver=solver,
                       S_churn=S_churn, S_min=S_min, S_max=S_max, S_noise=S_noise)
    if sampler in ("msm", "ambient"):
        msm = MSMSetup(net, config, maps_path, device, acquired_draw)
    if sampler == "ambient":
        delta = AmbientLoss(**{k: v for k, v in config["loss"].items() if k != "class_name"}).delta  # checked
        survival = msm.measurement.law.observed_fraction(tuple(msm.shape[-2:])) * (1 - delta)
        settings = (f"ambient: edm {solver}, {num_steps} steps, one mask per seed of the training law with extra drop "
                    f"{delta:g} (mean survival {survival:.3f})")
        calls = 2 * num_steps - 1 if solver == "heun" else num_steps
    elif sampler == "msm":
        sigmas, schedule_note = msm_sigmas(schedule, num_steps, sigma_min, sigma_max, rho, config.get("loss"),
                                           vp_grid)
        settings = (f"msm {variant}, K = {num_subsets}, "
                    + (f"{num_steps} Heun steps" if variant == "heun" else f"{schedule_note}, eta = {eta}"))
        calls = (2 * num_steps - 1 if variant == "heun" else
                 len(sigmas) * (num_subsets if variant == "reference" else 1))
    else:
        settings = f"edm {solver}, {num_steps} steps"
        calls = 2 * num_steps - 1 if solver == "heun" else num_steps
    if guide.active:
        settings += (f", guidance {' + '.join(f'{s:g} {k}' for k, s in zip(guide.kinds, guide.scales)) or 'none'}, "
                     f"cfg {cfg_scale:g} ({cfg_convention})")
    bridge_dataset = None if bridge_source is None else open_bridge_source(net, guide, bridge_source)
    if rank == 0:  # everything is checked: record the settings before the first output
        dnnlib.write_outdir_settings(outdir, recorded)
    if bridge_source is not None:
        dist.print0(f"Dual bridge of {bridge_source} through {checkpoint.resolve_snapshot_path(network_path)} "
                    f"({num_steps} Heun steps each way; {settings}) on {world} rank(s) to {outdir}")
        written = dual_bridge_images(net, guide, bridge_dataset, source_labels, target_labels, outdir, max_batch,
                                     edm_options, subdirs, device, rank, world)
        written = [pair for part in dist.all_gather_object(written) for pair in part]
        if rank == 0:
            write_labels_and_class_grids(outdir, written, grid_path, subdirs)
            print(f"Wrote {len(written)} re-synthesised images with dataset.json labels to {outdir}")
        dist.destroy()
        return
    if config.get("patches"):
        settings += f"; {net.describe()}"
    dist.print0(f"Generating {len(seeds)} images from {checkpoint.resolve_snapshot_path(network_path)} "
                f"({settings}) on {world} rank(s) to {outdir}")

    batches = seed_batches(seeds, max_batch, rank, world)
    seed_classes = []  # (seed, class) of this rank's images
    for b, batch_seeds in enumerate(tqdm.tqdm(batches, disable=rank != 0, unit="batch")):
        net.bar = tqdm.tqdm(total=calls, disable=rank != 0, unit="call", leave=False,
                            desc=f"batch {b + 1}/{len(batches)}")
        gen = SeedGenerators(batch_seeds, device=device)
        use_seeds(net, batch_seeds, device)
        latents = gen.randn([len(batch_seeds), *shape]).to(device) if sampler == "edm" else None
        labels, idx = None, None
        if num_classes:
            idx = (torch.tensor([seed_class[seed] for seed in batch_seeds]) if seed_class is not None
                   else gen.randint(0, num_classes, [len(batch_seeds), 1])[:, 0]).to(device)
            labels = torch.nn.functional.one_hot(idx, net.label_dim).float() if net.label_dim else None
            seed_classes.extend(zip(batch_seeds, idx.tolist()))
        with torch.no_grad():
            if sampler == "msm":
                images = msm.generate(batch_seeds, gen, labels, num_subsets=num_subsets, variant=variant,
                                      sigmas=sigmas, eta=eta, num_steps=num_steps, sigma_min=sigma_min,
                                      sigma_max=sigma_max, rho=rho, guide=guide, target=idx)
            elif sampler == "ambient":
                images = msm.generate_ambient(batch_seeds, gen, labels, delta=delta, **edm_options)
            else:
                denoiser = (guide.denoiser(lambda labels_in: net_denoiser(net, labels_in), labels, idx)
                            if guide.active else net_denoiser(net, labels))
                images = edm_sampler(denoiser, latents, gen, **edm_options)
        net.bar.close()
        pixels = mri_magnitude_images(images) if is_mri else to_uint8_images(images)
        for seed, img in zip(batch_seeds, pixels):
            path = image_path(outdir, seed, subdirs)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            save_image(img, path)

    dist.barrier()
    seed_classes = [pair for part in dist.all_gather_object(seed_classes) for pair in part]
    if rank == 0:
        if seed_classes:
            write_labels_and_class_grids(outdir, seed_classes, grid_path, subdirs)
        first = [np.asarray(PIL.Image.open(image_path(outdir, s, subdirs))) for s in seeds[:64]]
        first = np.stack([a[:, :, None] if a.ndim == 2 else a for a in first])
        save_image(image_grid(first), grid_path)
        print(f"Wrote {len(seeds)} images to {outdir} and a grid to {grid_path}")
    dist.destroy()


if __name__ == "__main__":
    dnnlib.run_cli(main)
