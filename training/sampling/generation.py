"""generate.py's samplers (the `edm`, `msm` and `ambient` entries of training/sampling/methods.py METHODS) and
what they need from a snapshot: the sampler a snapshot gets by default, the measurement process of the MSM and
Ambient samplers (`MSMSetup`), classifier and classifier-free guidance (`GuidanceSetup`), and `Generation`, which
holds them for one run with the solver and its noise levels. Each sampler assembles the package's pieces
(training/sampling/__init__.py): edm the ODE on the (guided) network denoiser; msm the ancestral solver or the ODE
on `MSMAggregate` (or the reference loop); ambient the ODE on the masked denoiser; the dual bridge `dual_bridge`.
Their options are declared here, once; generate.py builds its CLI from them.
"""

import functools

import click
import numpy as np
import torch

from dnnlib import UserError
from training.loss import AmbientLoss
from training.masks import with_acquired_draw
from training.measurements import MeasurementConfig, aggregate_projection, skip_space_of
from training.mri import coil_map_records
from training.sampling.denoisers import (
    MSMAggregate,
    ambient_masks,
    masked_denoiser,
    net_ambient_denoiser,
    net_denoiser,
    net_partial_denoiser,
    real_view,
    subset_count,
)
from training.sampling.guidance import (
    CFG_CONVENTIONS,
    POTENTIALS,
    GuidanceTerm,
    cfg_coefficient,
    cfg_denoiser,
    check_sigma_range,
    correction,
    guided,
)
from training.sampling.solvers import (
    ODE,
    Ancestral,
    dual_bridge,
    msm_reference,
    msm_reference_evaluations,
    noise_start,
    seed_measurement_randn,
)
from training.schedules import rho_schedule, sigmas_in_training_range, vp200_sigmas, vp_grid_of

# K, the subsets (partial estimates) per noise level of MSM, defaulted here only: generate.py draws 3; posterior
# sampling (reconstruct.py, training/sampling/methods.py) 3 on MRI and 2 on images, where the data-consistency step
# acts on the aggregate. An oracle model's law is the full mask, for which K is 1 whatever is given.
DEFAULT_SUBSETS = 3
IMAGE_POSTERIOR_SUBSETS = 2


def posterior_subsets(task: str) -> int:
    return DEFAULT_SUBSETS if task == "mri" else IMAGE_POSTERIOR_SUBSETS


SAMPLERS = ("edm", "msm", "ambient")  # generate.py's entries of METHODS
ACQUIRED_DRAW_OPTION = click.option(
    "--acquired-draw", type=click.Choice(["frequencies", "masks"]), default=None,
    help="MSM model trained on acquired masks: draw each column with its acquired frequency, or one of the acquired "
    "masks  [default: frequencies]")


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
    training range (schedules.sigmas_in_training_range) by the grid rule vp_grid (None: the snapshot's,
    schedules.vp_grid_of), or EDM's rho schedule without its final 0."""
    if schedule == "vp200":
        rule = vp_grid or vp_grid_of(loss_config)
        sigmas, note = sigmas_in_training_range(vp200_sigmas(rule=rule), loss_config)
        return sigmas, f"{note}, {rule} grid"
    return rho_schedule(num_steps, sigma_min, sigma_max, rho)[:-1], f"rho schedule from sigma {sigma_max:g}"


class MSMSetup:
    """What the MSM and Ambient samplers need from a snapshot: the measurement's mask law and operator family, and
    for MRI the coil maps (--maps, or training record seed mod N per seed) and the measurement shape."""

    def __init__(self, net, config: dict, maps_path: str | None, device, acquired_draw: str | None = None):
        self.device = device
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

    def batch(self, seeds: list[int], gen):
        """The full operator T of a batch's seeds and its unit latents in the measurement space, drawn from the seeds'
        streams (after their classes)."""
        if self.measurement.operator != "mri":
            operator = self.measurement.full_operator()
        else:
            maps = (self.fixed_maps[None] if self.fixed_maps is not None
                    else torch.stack([self.records[seed % len(self.records)]["maps"] for seed in seeds]))
            operator = self.measurement.full_operator(maps.to(self.device))
        latents = seed_measurement_randn(gen, torch.empty([len(seeds), *self.shape], dtype=self.dtype))
        return operator, latents.to(self.device)

    def image(self, operator, z_hat: torch.Tensor) -> torch.Tensor:
        """A sampled measurement z_hat as the image generate.py writes (MRI: T^+ z_hat as 2 channels)."""
        return operator.pinv(z_hat) if self.measurement.operator == "mri" else z_hat


class GuidanceSetup:
    """--classifier, --guidance, --guidance-scale, --guidance-sigma-range, --cfg-scale, --cfg-convention: the
    guidance terms (training/sampling/guidance.py) for a batch's target classes, checked against the model before
    anything is written. Classifier guidance needs a classifier of the model's image size and channels (and class
    count, for a class-conditional model); it may guide an unconditional model, whose classes then come from the
    classifier. Classifier-free guidance needs a class-conditional model."""

    def __init__(self, net, config: dict, classifier_path, kinds, scales, sigma_range, cfg_scale: float,
                 cfg_convention: str, sampler: str, is_mri: bool, device):
        from training.classifier import check_compatible, classifier_logits
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
        return [GuidanceTerm(self.classifier, kind, scale, target=target if kind == "classifier" else None,
                             sigma_range=self.sigma_range) for kind, scale in zip(self.kinds, self.scales)]

    def base(self, make_denoiser, labels):
        """make_denoiser(labels), a full or a partial denoiser (guidance.cfg_denoiser takes both), classifier-free
        guided when --cfg-scale; the classifier terms (`terms`) are added on the full denoiser or the aggregate."""
        if not self.cfg_scale:
            return make_denoiser(labels)
        return cfg_denoiser(make_denoiser, labels, self.cfg_scale, self.cfg_convention, self.sigma_range)

    def denoiser(self, make_denoiser, labels, target):
        """The guided full denoiser: `base`, then the classifier terms."""
        return guided(self.base(make_denoiser, labels), self.terms(target))


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



# ----------------------------------------------------------------------------
# generate.py's sampler options, declared once: click options in the order the CLI lists them.

GUIDANCE_OPTIONS = (
    click.option("--classifier", "classifier_path", default=None, help="Noise-aware classifier snapshot (--guidance)"),
    click.option("--guidance", "guidance_kinds", type=click.Choice(POTENTIALS), multiple=True,
                 help="Classifier guidance D += sigma^2 s grad G: classifier (log p(class)), entropy, margin (-top-two "
                 "gap), leastconf (-max p); repeat for several terms"),
    click.option("--guidance-scale", "guidance_scales", type=float, multiple=True,
                 help="Scale s of each --guidance term (one for all, or one per term)  [default: 1]"),
    click.option("--guidance-sigma-range", default=None, metavar="LO,HI",
                 help="Apply --guidance (and --cfg-scale) only at noise levels LO <= sigma <= HI"),
    click.option("--cfg-scale", type=float, default=0.0, show_default=True,
                 help="Classifier-free guidance weight w of a model trained with --label-dropout; mgdm: "
                 "D = D_c + w (D_c - D_u), 0 = conditional; edm2: D = D_u + w (D_c - D_u), 1 = conditional"),
    click.option("--cfg-convention", type=click.Choice(CFG_CONVENTIONS), default="mgdm", show_default=True,
                 help="Meaning of --cfg-scale (mgdm w = edm2 w - 1)"),
)
BRIDGE_OPTIONS = (
    click.option("--bridge-source", default=None, metavar="ZIP|DIR",
                 help="Dual bridge (MGDM stage 2): re-synthesise this labelled dataset by probability-flow inversion "
                 "under each image's class and guided decoding (--steps per direction)"),
    click.option("--source-label", default=None, help="Dual bridge: classes to re-synthesise, e.g. 0,1 [default: all]"),
    click.option("--target-label", default=None, help="Dual bridge: their target classes, e.g. 1,0 [default: same]"),
)
EDM_OPTIONS = (
    click.option("--steps", "num_steps", type=click.IntRange(min=1), default=18, show_default=True),
    click.option("--sigma-min", type=click.FloatRange(min=0, min_open=True), default=0.002, show_default=True),
    click.option("--sigma-max", type=click.FloatRange(min=0, min_open=True), default=80.0, show_default=True),
    click.option("--rho", type=click.FloatRange(min=0, min_open=True), default=7.0, show_default=True),
    click.option("--solver", type=click.Choice(["heun", "euler"]), default="heun", show_default=True),
    click.option("--S-churn", "S_churn", type=click.FloatRange(min=0), default=0.0, show_default=True),
    click.option("--S-min", "S_min", type=click.FloatRange(min=0), default=0.0, show_default=True),
    click.option("--S-max", "S_max", type=click.FloatRange(min=0), default=float("inf"), show_default=True),
    click.option("--S-noise", "S_noise", type=float, default=1.0, show_default=True),
)
SAMPLER_OPTIONS = (
    click.option("--sampler", type=click.Choice(SAMPLERS), default=None,
                 help="Sampler [default: ambient for a model trained with --loss ambient, msm for another model "
                 "trained on masked measurements, else edm]"),
    click.option("--subsets", "num_subsets", type=int, default=DEFAULT_SUBSETS, show_default=True,
                 help="MSM: masks (partial estimates) per noise level, K >= 1"),
    click.option("--schedule", type=click.Choice(["vp200", "rho"]), default="vp200", show_default=True,
                 help="MSM noise levels: the reference's 200 VP levels, or EDM's rho schedule (--steps, --sigma-*)"),
    click.option("--vp-grid", type=click.Choice(["ddim", "section"]), default=None,
                 help="Rule of the 200 VP levels: the reference's ddim200 stride (t = 0, 5, ..., 995) or the section "
                 "rule (t = round(i 999 / 199))  [default: the snapshot's; ddim where it records none]"),
    click.option("--variant", type=click.Choice(["batched", "reference", "heun"]), default="batched",
                 show_default=True, help="MSM: K estimates from the start-of-step state in one batched call; the "
                 "reference's sequential write-back; or EDM Heun on the aggregate (rho schedule)"),
    click.option("--eta", type=click.FloatRange(min=0, max=1), default=1.0, show_default=True,
                 help="MSM: DDIM eta of the outer update (1 = ancestral)"),
    click.option("--maps", "maps_path", default=None, help="MRI: coil maps .npy complex (C,H,W) [default: from the "
                 "training records]"),
    ACQUIRED_DRAW_OPTION,
)


# ----------------------------------------------------------------------------
# One run of generate.py's sampler.


class Generation:
    """The sampler of one generate.py run and what it needs, resolved and checked before anything is written: the
    network (a CountingNetwork), its snapshot config, the options `o` (the parsed CLI options), the sampler
    (`resolve_sampler`), the guidance (`GuidanceSetup`), for msm / ambient the measurement process (`MSMSetup`) with
    Ambient's extra drop delta or MSM's K (`subset_count`, the one check of --subsets), and the solver with its noise
    levels: `solver` (training/sampling/solvers.py; None for MSM's reference loop) on `sigmas`, and `calls`, the
    network calls of a batch as the solver counts them (the progress bar's total)."""

    def __init__(self, net, config: dict, o, device):
        self.net, self.o = net, o
        self.sampler = resolve_sampler(o.sampler, config, net.in_channels - net.out_channels)
        self.is_mri = config.get("dataset", {}).get("kind") == "mri"
        self.guide = GuidanceSetup(net, config, o.classifier_path, o.guidance_kinds, o.guidance_scales,
                                   o.guidance_sigma_range, o.cfg_scale, o.cfg_convention, self.sampler, self.is_mri,
                                   device)
        if o.maps_path is not None and not (self.is_mri and self.sampler in ("msm", "ambient")):
            raise UserError("--maps applies only to the msm and ambient samplers of an MRI model.")
        self.shape = [net.out_channels, net.img_resolution, net.img_resolution]
        # EDM's grid, clipped to the network's noise range: the edm and ambient samplers', and msm heun's.
        sigma_min, sigma_max = max(o.sigma_min, net.sigma_min), min(o.sigma_max, net.sigma_max)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.sigmas = rho_schedule(o.num_steps, sigma_min, sigma_max, o.rho)
        self.solver = ODE(o.solver, o.S_churn, o.S_min, o.S_max, o.S_noise)
        self.device, self.msm = device, None
        if self.sampler in ("msm", "ambient"):
            self.msm = MSMSetup(net, config, o.maps_path, device, o.acquired_draw)
        if self.sampler == "ambient":
            self.delta = AmbientLoss(**{k: v for k, v in config["loss"].items() if k != "class_name"}).delta  # checked
        if self.sampler == "msm":
            self.num_subsets = subset_count(o.num_subsets, self.msm.measurement.law)
            if o.variant == "heun":  # EDM's Heun on the aggregate, without churn
                self.solver = ODE("heun")
            else:
                self.sigmas, self.schedule_note = msm_sigmas(o.schedule, o.num_steps, sigma_min, sigma_max, o.rho,
                                                             config.get("loss"), o.vp_grid)
                self.solver = Ancestral(o.eta) if o.variant == "batched" else None
        self.calls = (msm_reference_evaluations(self.sigmas, self.num_subsets, self.msm.measurement.law)
                      if self.solver is None else self.solver.evaluations(self.sigmas))

    def describe(self, settings: str) -> str:
        """The sampler's settings (its entry's `sample_settings`) and the guidance, for the log."""
        guide, o = self.guide, self.o
        if guide.active:
            settings += (f", guidance {' + '.join(f'{s:g} {k}' for k, s in zip(guide.kinds, guide.scales)) or 'none'}, "
                         f"cfg {o.cfg_scale:g} ({o.cfg_convention})")
        return settings

    def latents(self, gen, seeds: list[int]):
        """EDM's initial noise, drawn before the batch's classes (each seed's stream: noise, then class)."""
        return gen.randn([len(seeds), *self.shape]).to(self.device) if self.sampler == "edm" else None

    def ode(self, denoiser, latents, gen, callback=None) -> torch.Tensor:
        """The ODE solver from unit latents scaled to the first level; a complex (k-space) state is stepped as its real
        (re, im) view. The callback (MSMAggregate.remember) is for real states only: on k-space nothing guides or
        conditions the aggregate (guidance is refused for MRI), so its own last estimate is the one the solver used."""
        x = noise_start(latents, self.sigmas[0].item())
        if not x.is_complex():
            return self.solver(denoiser, x, gen, self.sigmas, callback=callback)
        out = self.solver(real_view(denoiser), torch.view_as_real(x), gen, self.sigmas)
        return torch.view_as_complex(out.contiguous())


def generation_calls(g: Generation) -> int:
    """Network calls of a batch of any sampler (edm, msm, ambient), as its solver counts them."""
    return g.calls


def edm_settings(g: Generation) -> str:
    return f"edm {g.o.solver}, {g.o.num_steps} steps"


def msm_settings(g: Generation) -> str:
    o = g.o
    return (f"msm {o.variant}, K = {o.num_subsets}, "
            + (f"{o.num_steps} Heun steps" if o.variant == "heun" else f"{g.schedule_note}, eta = {o.eta}"))


def ambient_settings(g: Generation) -> str:
    survival = g.msm.measurement.law.observed_fraction(tuple(g.msm.shape[-2:])) * (1 - g.delta)
    return (f"ambient: edm {g.o.solver}, {g.o.num_steps} steps, one mask per seed of the training law with extra drop "
            f"{g.delta:g} (mean survival {survival:.3f})")


def sample_edm(g: Generation, seeds, gen, labels, target, latents) -> torch.Tensor:
    """EDM's Heun/Euler (ODE) on the (guided) network denoiser."""
    return g.ode(g.guide.denoiser(lambda labels_in: net_denoiser(g.net, labels_in), labels, target), latents, gen)


def sample_msm(g: Generation, seeds, gen, labels, target, latents) -> torch.Tensor:
    """MSM's sampler in the measurement space: the ancestral solver (batched) or the ODE (heun) on the aggregate of
    the (classifier-free guided) partial denoisers with the classifier terms, or the reference write-back loop. The
    aggregate's 'previous' fallback is the estimate the solver used (its callback)."""
    msm, o = g.msm, g.o
    operator, latents = msm.batch(seeds, gen)
    partial = g.guide.base(lambda labels_in: net_partial_denoiser(g.net, operator, labels_in, msm.skip_space), labels)
    terms = g.guide.terms(target)
    project = aggregate_projection(msm.skip_space, operator)
    if o.variant == "reference":
        z_hat = msm_reference(partial, noise_start(latents, g.sigmas[0].item(), "single"), gen, g.sigmas,
                              msm.measurement.law, g.num_subsets, eta=o.eta, project=project,
                              guidance=functools.partial(correction, terms) if terms else None)
        return msm.image(operator, z_hat)
    aggregate = MSMAggregate(partial, msm.measurement.law, gen, g.num_subsets, project=project)
    denoiser = guided(aggregate, terms)
    if o.variant == "heun":
        return msm.image(operator, g.ode(denoiser, latents, gen, callback=aggregate.remember))
    x = noise_start(latents, g.sigmas[0].item(), "single")
    return msm.image(operator, g.solver(denoiser, x, gen, g.sigmas, callback=aggregate.remember))


def sample_ambient(g: Generation, seeds, gen, labels, target, latents) -> torch.Tensor:
    """Ambient's sampler: the ODE on the masked network at one mask per seed (`ambient_masks`)."""
    msm = g.msm
    operator, latents = msm.batch(seeds, gen)
    masks = ambient_masks(msm.measurement.law, g.delta, tuple(latents.shape[-2:]), gen).to(latents.device)
    denoiser = masked_denoiser(net_ambient_denoiser(g.net, operator, labels), masks)
    return msm.image(operator, g.ode(denoiser, latents, gen))


def bridge_images(g: Generation, x: torch.Tensor, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """--bridge-source (MGDM's stage 2, solvers.dual_bridge: encode and decode by the ODE): images x (float64) encoded
    under their classes `source` and decoded under the classes `target` with the chosen guidance."""
    net = g.net

    def one_hot(idx):
        return torch.nn.functional.one_hot(idx, net.label_dim).float() if net.label_dim else None

    return dual_bridge(net_denoiser(net, one_hot(source)),
                       g.guide.denoiser(lambda labels_in: net_denoiser(net, labels_in), one_hot(target), target), x,
                       num_steps=g.o.num_steps, sigma_min=g.sigma_min, sigma_max=g.sigma_max, rho=g.o.rho)
