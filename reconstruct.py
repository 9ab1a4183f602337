"""Reconstruct measurements with a learned prior: MSM posterior sampling, DPS, zero-filled and compressed sensing.

    # R = 4 multi-coil MRI from fully sampled held-out slices (measurements simulated, metrics against them):
    python reconstruct.py --network RUN_DIR --data held-out-mri --task mri --first 0 --num 8 --seeds 0-3 \\
        --outdir out/recon-mri --save-measurements out/mri-r4
    # the same measurements for another model (or a later run): no --data, no task options needed
    python reconstruct.py --network ORACLE_RUN_DIR --measurements out/mri-r4 --outdir out/recon-oracle
    # acquired undersampled k-space with its masks (no reference, so no metrics):
    python reconstruct.py --network RUN_DIR --data stored-mri --task mri --outdir out/recon-stored
    # images: super-resolution x4, box inpainting, random pixels; baselines only without --network:
    python reconstruct.py --network RUN_DIR --data held-out.zip --task sr --sr-factor 4 --outdir out/recon-sr
    torchrun --standalone --nproc_per_node=2 reconstruct.py ...     # (example, seed) pairs sharded across ranks

Measurements. The measurement of example i is a function of the data, i, --mask-seed and the task options only
(--task, --sigma-y, and --mask-kind/--accel/--acs, --sr-factor, --box-size or --pixel-p), never of the model, so
every method and every prior sees the same measurements: a generator seeded by (--mask-seed, i) draws the mask, then
the noise of std --sigma-y. MRI masks default to lines-random, R = 4, with the default ACS of every tool,
min(20, W // 8) centre lines (training/masks.py `default_acs`). Stored undersampled MRI records are used as acquired.
--save-measurements DIR writes the measured examples (y, mask, coil maps, reference, index) with the task options
and a content hash (sha256 over the options and every array); --measurements DIR reuses them (task options given
beside it must agree with the stored ones). The hash is written into metrics.csv and summary.json either way, so
two result tables come from the same measurements exactly when their hashes agree.

Posterior samples depend only on their seed (one random stream per seed), not on --batch or the number of ranks.

Methods (training/posterior.py) are the entries of the table METHODS: name -> Method(run, tasks, needs_model,
seeded, settings, network_calls). `run(run, examples, seeds)` reconstructs one (example, seed) pair per row and
returns the images; `tasks` says which measurement operators it handles; `seeded` False marks a deterministic method
(computed once per example, its rows repeated across seeds); `settings` are written beside its rows in summary.json;
`network_calls` is the number of batched network calls of one run (the progress bar's total). A new method is one
function and one entry; nothing else in the script changes.
  msm          MSM posterior sampling: the MSM sampler with the model's training mask law (the full mask for an
               oracle model trained on clean data, one network call per level) and a data-consistency step of size
               --dc-step; MRI: on every partial k-space estimate (default lambda 2, K 3), images: on the aggregate
               (default lambda 1.75, K 2); outer update --outer (default 'ddnm') with --eta (default 0.85), --steps
               levels of the VP-200 grid (the snapshot's rule, the reference's ddim200 unless it trained on the
               section rule; --vp-grid). --sample-accel R: an MRI line-law model's masks at another R while
               sampling (the reference code samples with denser masks than it trains with; measured worse here).
               --msm-solver heun: EDM's deterministic Heun sampler instead (--steps levels of its rho grid, 2 --steps
               - 1 evaluations of the K-subset aggregate, the same data-consistency step at each; on MRI lambda 2
               oscillates below 25 steps, so give --dc-step 1 there). Measured worse than the default sampler.
  dps          DPS (Chung et al. 2023) as published: ancestral steps on --dps-steps levels of DDPM's 1000-step grid
               (default all), step zeta --dps-step (default 1.0). Its prior, and the family's below, is the network
               as a full image denoiser, or for an MSM model MSM's aggregate denoiser: K = --subsets partial
               estimates under the model's training law per evaluation (training/samplers.py
               `msm_aggregate_denoiser`); summary.json records which ('denoiser').
  zero-filled  A^+ y (MRI: zero-filled coil combination; SR: nearest-neighbour upsampling; inpainting: holes 0).
  cs-tv        MRI only: sigpy total-variation SENSE reconstruction (--cs-tv-lambda 1e-3, --cs-tv-iters 1000 PDHG).
  cs-l1        MRI only: sigpy L1-wavelet SENSE reconstruction (--cs-l1-lambda 1e-3, --cs-l1-iters 500).
               Both defaults are converged (training/posterior.py CS_DEFAULTS, bench/cs_convergence.py); the lambda
               and iterations used are written beside the rows.
  ald          Annealed Langevin (Jalal et al. 2021 / SEED_METHODS.md 2) on the geometric ladder --sigma-max,
               --sigma-min, --levels: --steps-each steps of alpha_i = eps (sigma_i / sigma_L)^2 (--eps, default
               NCSNv2's criterion), --noise-boost, --sigma-offset, --init; data term --ald-dc annealed
               (A^H (y - A x) / (sigma_y^2 + sigma_i^2) times --dc-boost) or normalized (--dc-norm-weight).
  pc-jalal, pc-dps, pc-projection, dds
               Song et al.'s predictor-corrector (Euler-Maruyama, then --corrector-steps Langevin steps with --snr)
               on the same ladder, with the conditioning term named (training/conditioning.py; --pc-dps-step,
               --dds-gamma, --cg-iters); --start-fraction or --start-sigma warm-starts from A^+ y (FBP for CT).
               pc-projection needs an exact A^+ (not CT). The family's prior is DPS's (the full or the MSM
               aggregate denoiser); each returns its last iterate (--final-denoise: its Tweedie estimate).
  padis        PaDIS's DPS-Langevin solver (SEED_METHODS.md 4.4) on EDM's rho = 7 schedule (--padis-steps,
               --padis-sigma-max, --padis-sigma-min; PaDIS's README: 100, 10, 0.003): --inner-steps iterations per
               level of a DPS step --padis-zeta (README: 0.3) on ||y - A D(x)|| then a Langevin step of
               alpha = --alpha-factor sigma^2, no noise at the last level; starts from A^+ y (FBP for CT) without
               noise as PaDIS's code (--padis-init noise: sigma_max z, as its paper). Prior as DPS's.
  fbp          CT only: filtered back-projection (ramp filter), the classical CT baseline.
CT (--task ct, training/ct.py): parallel-beam projections of the image at --views angles over --angular-range
degrees (less than 180: limited angle), noise std 5% of mean |A x| by default (seed 003; --rel-noise, or --sigma-y).
--snr-db 10,20,30 measures the same examples at each SNR (NOISE_CONVENTION) and tabulates every method per SNR.
The learned methods start their grids inside the model's training range (training/samplers.py
`sigmas_in_training_range`; the log says where and why).

Progress: a bar per method run (network calls, or sigpy's iterations for CS) with rate and ETA, and one line per
finished (example, seed) pair with its metrics.

Outputs in --outdir: panels/{example:05d}-{seed:06d}.png (measurement, each method, reference, |error| of the first
learned method), reconstructions/{example:05d}-{seed:06d}.npz (each method's image: 2 channels (re, im) for MRI,
[-1, 1] pixels for images), metrics.csv (one row per example x seed x method with PSNR, SSIM, NMSE, network
evaluations and seconds per example; the conventions and the measurement hash in its header), summary.json (mean and
std per method over those rows, each method's settings, the measurement set) and the same table printed. Stored
measurements have no reference: no metrics, no error map. settings.json records the options the outputs depend on
(dnnlib.util.check_outdir_settings): rerunning the same command may overwrite them, another one is refused before
anything is written, so no --outdir mixes two runs' results.
MRI metrics follow --metric-convention (training/metrics.py; written into metrics.csv): sense (default, the SENSE-
combined magnitude per image), fastmri (fastMRI's evaluate.py: root-sum-of-squares magnitudes, centre crop to 320,
data range = the volume's maximum; rows per slice, and volumes.csv with PSNR / SSIM / NMSE per volume, the volumes
being the source files that dataset.json records) or msm (the MSM paper's per-image min-max normalised magnitudes).
"""

import csv
import json
import math
import os
import sys
import time
from collections.abc import Callable
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
from torch_utils.compiling import compile_network
from torch_utils.misc import SeedGenerators, parse_seeds
from training.classifier import is_classifier
from training.conditioning import dds, dps, jalal, jalal_normalized, projection
from training.ct import fbp
from training.masks import (
    FullMask,
    mask_law_from_config,
    with_acquired_draw,
)
from training.measurements import aggregate_projection, skip_space_of
from training.metrics import (
    CONVENTION_TEXT,
    CONVENTIONS,
    convention_row,
    fastmri_volume_metrics,
    nmse,
    psnr,
    reference_max,
    rss_images,
    ssim,
)
from training.operators import (
    Identity,
    mri_magnitude,
)
from training.patches import patch_prior, use_seeds
from training.posterior import (
    CS_DEFAULTS,
    DPS_ZETA,
    check_dc_step,
    cs_mri,
    ddpm_sigmas,
    dps_sampler,
    image_denoiser,
    msm_posterior_sampler,
    respaced_sigmas,
    zero_filled,
)
from training.samplers import (
    EDM_SIGMA_MAX,
    OUTER_UPDATES,
    CountingNetwork,
    msm_aggregate_denoiser,
    net_partial_denoiser,
    sigmas_in_training_range,
    training_sigma_max,
    vp_grid_of,
)
from training.sde import (
    ALD_INITS,
    PADIS_INITS,
    ald_initial_state,
    ald_step_sizes,
    annealed_langevin,
    auto_eps,
    check_padis_options,
    geometric_ladder,
    noise_start,
    padis_dps_langevin,
    padis_initial_state,
    padis_sigmas,
    predictor_corrector,
    warm_start,
)
from training.tasks import (
    ACS_HELP,
    IMAGE_OPERATOR_TASKS,
    LINE_MASK_KINDS,
    NOISE_CONVENTION,
    TASKS,
    Example,
    MeasurementSet,
    TaskOptions,
    check_against_stored,
    check_data_kind,
    first_estimate,
    load_measurements,
    measure_example,
    open_data,
    parse_snr_list,
    resolve_task_options,
    save_measurements,
    select_indices,
    selection_given,
    task_operator,
)

METRIC_CONVENTIONS = (
    "MRI: magnitude images |x| of the coil-combined complex image (T^H k for the reference, the method's image for a "
    "reconstruction), no further normalisation; data range = max of the reference magnitude (fastMRI).",
    "Images: pixel values mapped from [-1, 1] to [0, 1] by (x + 1) / 2, reconstructions clipped to [0, 1]; "
    "data range = 1.",
    "PSNR = 10 log10(data_range^2 / MSE) (skimage.metrics.peak_signal_noise_ratio).",
    "SSIM: skimage.metrics.structural_similarity defaults as in fastMRI (7x7 uniform window, K1 0.01, K2 0.03, sample "
    "covariance), channels averaged.",
    "NMSE = ||reference - estimate||^2 / ||reference||^2 (fastMRI).",
    "nfe: network evaluations per example (images through the network; DPS's also run backward); seconds: wall time "
    "per example (a batch's time over its pairs).",
)
ERROR_GAIN = 4  # the |error| panel shows 4 |reference - estimate| / data range, so small errors stay visible


# ----------------------------------------------------------------------------
# The model.


@dataclass
class Model:
    net: CountingNetwork  # all its denoisers are built on it, so its count is the run's NFE
    kind: str  # 'mri' (2-channel complex images, k-space measurements) or 'image'
    mask_law: object  # the training mask law; FullMask for a model trained on clean data (an oracle)
    loss_config: dict | None  # the snapshot's loss (its noise-level distribution bounds the sampling grids)


def load_model(network_path: str | None, device, patch_size=None, patch_batch=None, assembly=None,
               compile_net: bool = False) -> Model | None:
    """The --network snapshot; a patch prior becomes its stitched whole-image network (training/patches.py), so
    every method drives it as any other network. compile_net: every method calls the torch.compile'd network."""
    if network_path is None:
        if patch_size is not None or patch_batch is not None or assembly is not None:
            raise UserError("--patch-size, --patch-batch and --assembly apply to a patch prior given with --network.")
        if compile_net:
            raise UserError("--compile applies to a network given with --network.")
        return None
    net, config = checkpoint.load_snapshot(network_path, device=device)
    if is_classifier(config):
        raise UserError(f"--network {network_path} is a classifier snapshot; reconstruct.py needs a diffusion model.")
    measurement = config.get("measurement")
    dataset_kind = (config.get("dataset") or {}).get("kind")
    if measurement is not None:
        kind = "mri" if measurement["operator"] == "mri" else "image"
        law = mask_law_from_config(measurement["mask"])
    else:
        kind = "mri" if dataset_kind == "mri" else "image"
        law = FullMask()
    if compile_net:
        net = compile_network(net, torch.device(device).type)
    net = patch_prior(net, config, patch_size, patch_batch, assembly)
    return Model(net=CountingNetwork(net), kind=kind, mask_law=law, loss_config=config.get("loss"))


# ----------------------------------------------------------------------------
# Methods: the table METHODS (module docstring).


@dataclass(frozen=True)
class FamilyOptions:
    """The options of the ALD / predictor-corrector family (training/sde.py, training/conditioning.py)."""

    sigma_max: float = 50.0
    sigma_min: float = 0.01
    levels: int = 100
    steps_each: int = 3
    eps: float | None = None  # None: NCSNv2's criterion (sde.auto_eps)
    noise_boost: float = 1.0
    dc_boost: float = 1.0
    sigma_offset: int = 0
    ald_dc: str = "annealed"
    dc_norm_weight: float = 5.0
    init: str = "noise"
    final_denoise: bool = False
    snr: float = 0.16
    corrector_steps: int = 1
    start_fraction: float | None = None
    start_sigma: float | None = None
    pc_dps_step: float = 1.0
    dds_gamma: float = 1.0
    cg_iters: int = 5

    def check(self):
        """One sentence for each inconsistent option, before anything is written."""
        geometric_ladder(self.sigma_max, self.sigma_min, self.levels)
        if not self.steps_each >= 1:
            raise UserError(f"--steps-each must be >= 1, got {self.steps_each}.")
        if not 0 <= self.sigma_offset < self.levels:
            raise UserError(f"--sigma-offset must be in 0..{self.levels - 1} (levels of the ALD ladder to skip), got "
                            f"{self.sigma_offset}.")
        if self.corrector_steps < 0:
            raise UserError(f"--corrector-steps must be >= 0, got {self.corrector_steps}.")
        if self.start_fraction is not None and not 0 <= self.start_fraction < 1:
            raise UserError(f"--start-fraction must be in [0, 1), got {self.start_fraction}.")
        if self.start_fraction is not None and self.start_sigma is not None:
            raise UserError("Give either --start-sigma or --start-fraction, not both.")
        if self.start_sigma is not None and not self.sigma_min <= self.start_sigma:
            raise UserError(f"--start-sigma must be >= --sigma-min {self.sigma_min}, got {self.start_sigma}.")
        for flag, value in (("--eps", self.eps if self.eps is not None else 1.0), ("--snr", self.snr),
                            ("--pc-dps-step", self.pc_dps_step), ("--dds-gamma", self.dds_gamma),
                            ("--dc-norm-weight", self.dc_norm_weight)):
            if not value > 0:
                raise UserError(f"{flag} must be > 0, got {value}.")
        for flag, value in (("--noise-boost", self.noise_boost), ("--dc-boost", self.dc_boost)):
            if not value >= 0:
                raise UserError(f"{flag} must be >= 0, got {value}.")
        if self.cg_iters < 1:
            raise UserError(f"--cg-iters must be >= 1, got {self.cg_iters}.")


@dataclass(frozen=True)
class PadisOptions:
    """The options of PaDIS's solver (training/sde.py `padis_dps_langevin`); defaults from PaDIS's README."""

    steps: int = 100
    sigma_max: float = 10.0
    sigma_min: float = 0.003
    inner_steps: int = 10
    alpha_factor: float = 0.5
    zeta: float = 0.3  # PaDIS's README; gains over A^+ y with an exact prior: tests/test_padis_solver.py
    init: str = "adjoint"

    def check(self):
        padis_sigmas(self.steps, self.sigma_min, self.sigma_max)
        check_padis_options(self.zeta, self.inner_steps, self.alpha_factor)
        if self.init not in PADIS_INITS:
            raise UserError(f"--padis-init must be one of {', '.join(PADIS_INITS)}, got {self.init!r}.")


@dataclass
class MethodOptions:
    msm_steps: int
    num_subsets: int
    dc_step: float
    eta: float
    outer: str
    dps_steps: int
    dps_step: float
    cs: dict  # regulariser -> {'lamda': ..., 'max_iter': ...}
    family: FamilyOptions = FamilyOptions()
    padis: PadisOptions = PadisOptions()
    sample_accel: float | None = None  # R of the MSM model's line masks at sampling; None: the training law's
    acquired_draw: str | None = None  # acquired-mask models: 'frequencies' or 'masks' (masks.AcquiredMaskLaw)
    msm_solver: str = "ancestral"  # 'ancestral' (msm_sampler on the VP-200 levels) or 'heun' (EDM's rho grid, ODE)
    vp_grid: str | None = None  # rule of the VP-200 levels ('ddim' / 'section'); None: the snapshot's (vp_grid_of)


@dataclass
class Run:
    """What a method needs: the model (None for baselines), the task, the options, where to compute, and whether
    this process shows progress."""

    model: Model | None
    task: TaskOptions
    options: MethodOptions
    device: torch.device
    show_progress: bool = False


def stack(examples: list[Example], field: str, device):
    values = [getattr(e, field) for e in examples]
    return None if values[0] is None else torch.cat(values).to(device)


def sampling_law(run: Run):
    """The mask law an MSM model's partial estimates are drawn from: its training law, or with --sample-accel the
    same line law at another acceleration R (the MSM reference code samples MRI with denser masks than it trains
    with; MSM.md section 5). A partial denoiser then sees more lines than any training input had, an extrapolation
    that costs here: the quickstart's MSM model (R = 4, 30 kimg) on 8 validation slices gives 21.56 dB at R = 4,
    19.24 at R = 2 and 8.51 at R = 1 (bench/msm_vs_oracle.py's validation set). An option, not the default."""
    law, accel = with_acquired_draw(run.model.mask_law, run.options.acquired_draw), run.options.sample_accel
    if accel is None or law.kind == "full":
        return law
    return mask_law_from_config({**law.to_config(), "R": accel})


def msm_grid_rule(run: Run) -> str:
    """The rule of the VP-200 levels the MSM posterior sampler runs on: --vp-grid, else the snapshot's
    (training/samplers.py `vp_grid_of`: the reference's ddim200 where it records none)."""
    return run.options.vp_grid or vp_grid_of(run.model.loss_config)


def msm_sigmas(run: Run) -> tuple[torch.Tensor, str]:
    return sigmas_in_training_range(respaced_sigmas(run.options.msm_steps, msm_grid_rule(run)),
                                    run.model.loss_config)


HEUN_SIGMA_MIN, HEUN_RHO = 0.002, 7.0  # EDM's rho grid (Karras et al. 2022, Table 1)


def msm_heun_grid(run: Run) -> dict:
    """--msm-solver heun: EDM's rho grid of --steps Heun steps from the top of the model's training range (at most
    EDM's 80) to 0.002; 2 --steps - 1 aggregate evaluations (the last step, to sigma 0, is an Euler step)."""
    top, _ = training_sigma_max(run.model.loss_config)
    return dict(num_steps=run.options.msm_steps, sigma_min=HEUN_SIGMA_MIN, sigma_max=min(EDM_SIGMA_MAX, top),
                rho=HEUN_RHO)


def msm_network_calls(run: Run) -> int:
    """Batched network calls of one MSM posterior run (each evaluates the K subsets together)."""
    if run.options.msm_solver == "heun":
        return 2 * run.options.msm_steps - 1
    return len(msm_sigmas(run)[0])


def dps_levels(run: Run) -> tuple[torch.Tensor, str]:
    return sigmas_in_training_range(ddpm_sigmas(run.options.dps_steps), run.model.loss_config)


def run_msm(run: Run, examples: list[Example], seeds: list[int]) -> torch.Tensor:
    """One MSM posterior sample per (example, seed) -> images (B, C, H, W): 2 channels (re, im) for MRI."""
    device, net, o = run.device, run.model.net, run.options
    y, mask, maps = stack(examples, "y", device), stack(examples, "mask", device), stack(examples, "maps", device)
    resolution = net.img_resolution
    gen = SeedGenerators(seeds, device=device)
    operator = task_operator(run.task, resolution, mask, maps, device)
    if o.msm_solver == "heun":
        common = dict(solver="heun", num_subsets=o.num_subsets, dc_step=o.dc_step, **msm_heun_grid(run))
    else:
        common = dict(sigmas=msm_sigmas(run)[0].to(device), eta=o.eta, outer=o.outer, num_subsets=o.num_subsets,
                      dc_step=o.dc_step)
    with torch.no_grad():
        if run.task.task == "mri":
            # Measurement-space state: complex k-space with N(0, 1) real and imaginary parts (MSM.md section 1).
            latents = torch.view_as_complex(gen.randn([*y.shape, 2], dtype=torch.float64))
            skip_space = skip_space_of(run.model.loss_config)
            z_hat = msm_posterior_sampler(net_partial_denoiser(net, operator, skip_space=skip_space), latents,
                                          sampling_law(run), gen, y, placement="partial", mask=mask,
                                          project=aggregate_projection(skip_space, operator), **common)
            return operator.pinv(z_hat.to(torch.complex64))
        latents = gen.randn([len(seeds), net.out_channels, resolution, resolution], dtype=torch.float64)
        return msm_posterior_sampler(net_partial_denoiser(net, Identity()), latents, sampling_law(run), gen, y,
                                     placement="aggregate", operator=operator, **common)


def prior_denoiser(run: Run, operator, gen: SeedGenerators):
    """The prior as the image denoiser D(x, sigma) of DPS and the ALD / predictor-corrector family: the network
    itself for a model trained on clean data (one network call per evaluation); for an MSM model, MSM's aggregate of
    K = --subsets partial estimates under its training law (training/samplers.py `msm_aggregate_denoiser`: one
    batched call on K copies of the batch), in the model's measurement space (MRI: the task's T = F S; images: T = I).
    """
    net, law = run.model.net, sampling_law(run)
    if law.kind == "full":
        return image_denoiser(net)
    measurement_operator = operator if run.model.kind == "mri" else Identity()
    partial = net_partial_denoiser(net, measurement_operator, skip_space=skip_space_of(run.model.loss_config))
    return msm_aggregate_denoiser(partial, measurement_operator, law, gen, run.options.num_subsets)


def prior_denoiser_settings(run: Run) -> dict:
    if run.model.mask_law.kind == "full":
        return {"denoiser": "full"}
    return {"denoiser": "msm-aggregate", "K": run.options.num_subsets, "mask_law": sampling_law(run).to_config()}


def run_dps(run: Run, examples: list[Example], seeds: list[int]) -> torch.Tensor:
    device, net = run.device, run.model.net
    y, mask, maps = stack(examples, "y", device), stack(examples, "mask", device), stack(examples, "maps", device)
    resolution = net.img_resolution
    gen = SeedGenerators(seeds, device=device)
    operator = task_operator(run.task, resolution, mask, maps, device)
    latents = gen.randn([len(seeds), net.out_channels, resolution, resolution], dtype=torch.float64)
    return dps_sampler(prior_denoiser(run, operator, gen), latents, gen, operator, y,
                       mask if run.task.task == "mri" else None,
                       sigmas=dps_levels(run)[0].to(device), step_size=run.options.dps_step)


def family_levels(run: Run) -> tuple[torch.Tensor, str]:
    f = run.options.family
    return sigmas_in_training_range(geometric_ladder(f.sigma_max, f.sigma_min, f.levels), run.model.loss_config)


def family_conditioning(name: str, f: FamilyOptions, operator, y, mask, sigma_y):
    if name == "ald" and f.ald_dc == "normalized":
        return jalal_normalized(operator, y, mask, weight=f.dc_norm_weight)
    if name in ("ald", "pc-jalal"):
        return jalal(operator, y, mask, sigma_y=sigma_y, scale=f.dc_boost)
    if name == "pc-dps":
        return dps(operator, y, mask, zeta=f.pc_dps_step)
    if name == "pc-projection":
        return projection(operator, y, mask)
    return dds(operator, y, mask, gamma=f.dds_gamma, cg_iters=f.cg_iters)


def family_method(name: str):
    """ALD (annealed Langevin on the --sigma-max/--sigma-min/--levels ladder, Jalal's data term) or the
    predictor-corrector sampler on the same ladder with the conditioning term the name says; the prior is
    `prior_denoiser`'s, as for DPS."""

    def run_family(run: Run, examples: list[Example], seeds: list[int]) -> torch.Tensor:
        device, net, f = run.device, run.model.net, run.options.family
        y, mask, maps = stack(examples, "y", device), stack(examples, "mask", device), stack(examples, "maps", device)
        sigma_y = stack(examples, "sigma_y", device)
        sigma_y = 0.0 if sigma_y is None else sigma_y.to(torch.float64).reshape(-1, 1, 1, 1)
        resolution = net.img_resolution
        operator = task_operator(run.task, resolution, mask, maps, device)
        mask = mask if run.task.task == "mri" else None  # the image operators hold their masks
        gen = SeedGenerators(seeds, device=device)
        denoiser = prior_denoiser(run, operator, gen)
        conditioning = family_conditioning(name, f, operator, y, mask, sigma_y)
        sigmas = family_levels(run)[0].to(device)
        shape = (len(seeds), net.out_channels, resolution, resolution)
        with torch.no_grad():
            estimate = first_estimate(run.task.task, operator, y).to(torch.float64)
            if name == "ald":
                alphas = ald_step_sizes(sigmas, f.eps if f.eps is not None else auto_eps(sigmas, f.steps_each))
                x = ald_initial_state(f.init, shape, gen, sigmas[min(f.sigma_offset, len(sigmas) - 1)].item(),
                                      estimate)
                return annealed_langevin(denoiser, x, gen, sigmas, alphas, f.steps_each, noise_boost=f.noise_boost,
                                         sigma_offset=min(f.sigma_offset, len(sigmas) - 1), conditioning=conditioning,
                                         final_denoise=f.final_denoise)
            if f.start_fraction is not None or f.start_sigma is not None:
                x, sigmas = warm_start(estimate, sigmas, gen, fraction=f.start_fraction, start_sigma=f.start_sigma)
            else:
                x = noise_start(gen.randn(shape, dtype=torch.float64), sigmas[0].item())
            return predictor_corrector(denoiser, x, gen, sigmas, corrector_steps=f.corrector_steps, snr=f.snr,
                                       conditioning=conditioning, final_denoise=f.final_denoise)

    return run_family


def family_network_calls(name: str, run: Run) -> int:
    f, levels = run.options.family, len(family_levels(run)[0])
    if name == "ald":
        return (levels - min(f.sigma_offset, levels - 1)) * f.steps_each + f.final_denoise
    if f.start_fraction is not None:
        levels -= min(math.ceil(f.start_fraction * levels), levels - 1)
    if f.start_sigma is not None:
        levels = int((family_levels(run)[0] <= f.start_sigma).sum())
    return (levels - 1) * (1 + f.corrector_steps) + f.final_denoise


def family_settings(name: str, run: Run) -> dict:
    f, (sigmas, note) = run.options.family, family_levels(run)
    settings = {"levels": len(sigmas), "sigma_max": sigmas[0].item(), "sigma_min": sigmas[-1].item(),
                "final_denoise": f.final_denoise, "schedule": note, **prior_denoiser_settings(run)}
    if name == "ald":
        eps = f.eps if f.eps is not None else auto_eps(sigmas, f.steps_each) if len(sigmas) > 1 else None
        settings.update(steps_each=f.steps_each, eps=eps, eps_rule="given" if f.eps is not None else "NCSNv2",
                        noise_boost=f.noise_boost, sigma_offset=f.sigma_offset, dc=f.ald_dc, init=f.init,
                        **({"dc_norm_weight": f.dc_norm_weight} if f.ald_dc == "normalized" else
                           {"dc_boost": f.dc_boost}))
        return settings
    settings.update(corrector_steps=f.corrector_steps, snr=f.snr, start_fraction=f.start_fraction,
                    start_sigma=f.start_sigma)
    settings.update({"pc-jalal": {"dc_boost": f.dc_boost}, "pc-dps": {"zeta": f.pc_dps_step}, "pc-projection": {},
                     "dds": {"gamma": f.dds_gamma, "cg_iters": f.cg_iters}}[name])
    return settings


def padis_levels(run: Run) -> tuple[torch.Tensor, str]:
    p = run.options.padis
    return sigmas_in_training_range(padis_sigmas(p.steps, p.sigma_min, p.sigma_max), run.model.loss_config)


def run_padis(run: Run, examples: list[Example], seeds: list[int]) -> torch.Tensor:
    device, net, p = run.device, run.model.net, run.options.padis
    y, mask, maps = stack(examples, "y", device), stack(examples, "mask", device), stack(examples, "maps", device)
    operator = task_operator(run.task, net.img_resolution, mask, maps, device)
    gen = SeedGenerators(seeds, device=device)
    sigmas = padis_levels(run)[0].to(device)
    with torch.no_grad():
        x = padis_initial_state(p.init, first_estimate(run.task.task, operator, y), gen, sigmas[0].item())
        return padis_dps_langevin(prior_denoiser(run, operator, gen), x, gen, sigmas, operator, y,
                                  mask if run.task.task == "mri" else None, zeta=p.zeta, inner_steps=p.inner_steps,
                                  alpha_factor=p.alpha_factor)


def padis_settings(run: Run) -> dict:
    p, (sigmas, note) = run.options.padis, padis_levels(run)
    return {"levels": len(sigmas), "sigma_max": sigmas[0].item(), "sigma_min": sigmas[-1].item(), "rho": 7,
            "inner_steps": p.inner_steps, "alpha_factor": p.alpha_factor, "zeta": p.zeta, "init": p.init,
            "schedule": note, **prior_denoiser_settings(run)}


def run_fbp(run: Run, examples: list[Example], seeds: list[int]) -> torch.Tensor:
    # Images always have their reference, which gives the CT image size.
    return torch.cat([fbp(task_operator(run.task, e.reference.shape[-1]), e.y.to(torch.float64)) for e in examples])


def run_zero_filled(run: Run, examples: list[Example], seeds: list[int]) -> torch.Tensor:
    # Only box inpainting's operator needs the image size, and images always have their reference.
    return torch.cat([zero_filled(task_operator(run.task, (e.reference if e.reference is not None else e.y).shape[-1],
                                                e.mask, e.maps), e.y) for e in examples])


def cs_method(regulariser: str):
    def run_cs(run: Run, examples: list[Example], seeds: list[int]) -> torch.Tensor:
        # sigpy's per-iteration bar only where a terminal redraws it (in a log it is thousands of lines).
        show = run.show_progress and sys.stderr.isatty()
        return torch.stack([cs_mri(e.y[0], e.maps[0], e.mask[0], regulariser, show_pbar=show,
                                   **run.options.cs[regulariser]) for e in examples])

    return run_cs


@dataclass(frozen=True)
class Method:
    run: Callable  # (Run, examples, seeds) -> images (B, C, H, W), one per (example, seed) pair
    tasks: tuple  # the tasks (measurement operators) it handles
    needs_model: bool  # a learned prior: needs --network
    seeded: bool  # a posterior sample per seed; False: deterministic, computed once per example
    settings: Callable  # (Run) -> the settings written beside its rows in summary.json
    network_calls: Callable | None = None  # (Run) -> batched network calls per run (the progress bar's total)


def msm_settings(run: Run) -> dict:
    o, (sigmas, note) = run.options, msm_sigmas(run)
    settings = {"K": 1 if run.model.mask_law.kind == "full" else o.num_subsets, "dc_step": o.dc_step, "eta": o.eta,
                "outer": o.outer, "levels": len(sigmas), "sigma_max": sigmas[0].item(), "schedule": note,
                "vp_grid": msm_grid_rule(run), "skip_space": skip_space_of(run.model.loss_config)}
    if o.msm_solver == "heun":
        grid = msm_heun_grid(run)
        settings = {"K": settings["K"], "dc_step": o.dc_step, "solver": "heun", "steps": grid["num_steps"],
                    "sigma_max": grid["sigma_max"], "schedule": f"EDM rho {grid['rho']:g} grid, {grid['num_steps']} "
                    f"Heun steps from sigma {grid['sigma_max']:.3g} to {grid['sigma_min']:g}, no churn",
                    "skip_space": settings["skip_space"]}
    if o.sample_accel is not None and run.model.mask_law.kind != "full":
        settings["sample_R"] = o.sample_accel
    if run.model.mask_law.kind == "acquired":
        settings["acquired_draw"] = sampling_law(run).draw
    return settings


def dps_settings(run: Run) -> dict:
    sigmas, note = dps_levels(run)
    return {"zeta": run.options.dps_step, "levels": len(sigmas), "sigma_max": sigmas[0].item(), "schedule": note,
            **prior_denoiser_settings(run)}


METHODS = {
    "msm": Method(run_msm, IMAGE_OPERATOR_TASKS, needs_model=True, seeded=True, settings=msm_settings,
                  network_calls=msm_network_calls),
    "dps": Method(run_dps, TASKS, needs_model=True, seeded=True, settings=dps_settings,
                  network_calls=lambda run: len(dps_levels(run)[0])),
    **{name: Method(family_method(name), tasks, needs_model=True, seeded=True,
                    settings=lambda run, name=name: family_settings(name, run),
                    network_calls=lambda run, name=name: family_network_calls(name, run))
       for name, tasks in (("ald", TASKS), ("pc-jalal", TASKS), ("pc-dps", TASKS),
                           ("pc-projection", IMAGE_OPERATOR_TASKS), ("dds", TASKS))},
    "padis": Method(run_padis, TASKS, needs_model=True, seeded=True, settings=padis_settings,
                    network_calls=lambda run: len(padis_levels(run)[0]) * run.options.padis.inner_steps),
    "zero-filled": Method(run_zero_filled, IMAGE_OPERATOR_TASKS, needs_model=False, seeded=False,
                          settings=lambda run: {}),
    "fbp": Method(run_fbp, ("ct",), needs_model=False, seeded=False, settings=lambda run: {"filter": "ramp"}),
    "cs-tv": Method(cs_method("tv"), ("mri",), needs_model=False, seeded=False,
                    settings=lambda run: dict(run.options.cs["tv"])),
    "cs-l1": Method(cs_method("l1-wavelet"), ("mri",), needs_model=False, seeded=False,
                    settings=lambda run: dict(run.options.cs["l1-wavelet"])),
}


def run_method(name: str, run: Run, examples: list[Example], seeds: list[int], label: str):
    """Run one method on a batch with a progress bar -> (images on the CPU, network evaluations per example,
    seconds per example)."""
    method, net = METHODS[name], run.model.net if run.model is not None else None
    total = method.network_calls(run) if method.network_calls is not None else None
    bar = tqdm.tqdm(total=total, desc=f"{name} {label}", unit="call", leave=False,
                    disable=not (run.show_progress and total is not None))
    start_images = net.images if net is not None else 0
    if net is not None:
        net.bar = bar
        use_seeds(net, seeds, run.device)  # a patch prior's grid shifts: one stream per seed, fresh per method run
    start = time.perf_counter()
    try:
        images = method.run(run, examples, seeds).detach().cpu()
    finally:
        bar.close()
        if net is not None:
            net.bar = None
    seconds = (time.perf_counter() - start) / len(seeds)
    nfe = ((net.images - start_images) / len(seeds)) if net is not None and method.needs_model else 0
    return images, nfe, seconds


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


def volume_rows(examples: dict, volumes: dict, outdir: str, seeds: list[int], methods: list[str]) -> list[dict]:
    """fastMRI's per-volume metrics of every (volume, seed, method), from the saved reconstructions."""
    rows = []
    for volume in sorted(set(volumes.values())):
        members = sorted(i for i in examples if volumes[i] == volume)
        reference = torch.cat([rss_images(examples[i].reference, examples[i].maps) for i in members])
        for seed in seeds:
            for m in methods:
                estimate = torch.cat([rss_images(torch.from_numpy(np.load(os.path.join(
                    outdir, "reconstructions", f"{i:05d}-{seed:06d}.npz"))[m])[None], examples[i].maps)
                    for i in members])
                rows.append({"volume": volume, "slices": len(members), "seed": seed, "method": m,
                             **fastmri_volume_metrics(reference[:, 0], estimate[:, 0])})
    return rows


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
        shown = next((m for m in results if METHODS[m].needs_model), next(iter(results)))
        error = (reference - results[shown]).abs().mean(dim=1, keepdim=True) * ERROR_GAIN
        tiles.append(tile(error[0], scale, f"|err| x{ERROR_GAIN} {shown}", zoom))
    PIL.Image.fromarray(np.concatenate(tiles, axis=1)).save(path)


SUMMARY_KEYS = ("psnr", "ssim", "nmse", "nfe", "seconds")


def summarise(rows: list[dict], methods: list[str]) -> dict:
    summary = {}
    for method in methods:
        values = [r for r in rows if r["method"] == method]
        if values:
            summary[method] = {"count": len(values)}
            for key in SUMMARY_KEYS:
                column = np.array([r[key] for r in values], dtype=np.float64)
                summary[method][f"{key}_mean"] = float(column.mean())
                summary[method][f"{key}_std"] = float(column.std())
    return summary


def format_table(summary: dict) -> str:
    width = max([12, *(len(m) for m in summary)])
    lines = [f"{'method':<{width}} {'n':>4} {'PSNR (dB)':>16} {'SSIM':>16} {'NMSE':>20} {'NFE':>6} {'s/example':>10}"]
    for method, s in summary.items():
        lines.append(f"{method:<{width}} {s['count']:>4} {s['psnr_mean']:>8.2f} +- {s['psnr_std']:<5.2f} "
                     f"{s['ssim_mean']:>8.4f} +- {s['ssim_std']:<6.4f} {s['nmse_mean']:>9.5f} +- {s['nmse_std']:<8.5f}"
                     f" {s['nfe_mean']:>6.0f} {s['seconds_mean']:>10.2f}")
    return "\n".join(lines)


def write_metrics(outdir: str, rows: list[dict], summary: dict, report: dict):
    with open(os.path.join(outdir, "metrics.csv"), "w", newline="") as f:
        f.write("".join(f"# {line}\n" for line in METRIC_CONVENTIONS))
        if report.get("metric_convention"):
            f.write(f"# {report['metric_convention']}\n")
        f.write("# Deterministic methods (zero-filled, cs-*) do not depend on the seed: their rows repeat across "
                "seeds.\n")
        f.write(f"# {NOISE_CONVENTION}\n")
        for measurements in report.get("snr_sweep", {"": report["measurements"]}).values():
            f.write(f"# measurements: sha256 {measurements['hash']} ({len(measurements['indices'])} examples, task "
                    f"{json.dumps(measurements['task'], sort_keys=True)})\n")
        for method, settings in report["settings"].items():
            f.write(f"# {method}: {json.dumps(settings, sort_keys=True)}\n")
        sweep = ["snr_db"] if "snr_sweep" in report else []
        writer = csv.DictWriter(f, fieldnames=["example", "seed", "method", *sweep, *SUMMARY_KEYS])
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(outdir, "summary.json"), "w") as f:
        json.dump({"conventions": METRIC_CONVENTIONS, **report, "methods": summary}, f, indent=2)


def example_line(index: int, seed: int, results: dict) -> str:
    parts = [f"{m} {r['psnr']:.2f} dB SSIM {r['ssim']:.4f} ({r['seconds']:.1f} s"
             + (f", {r['nfe']:.0f} NFE)" if r["nfe"] else ")") for m, r in results.items()]
    return f"example {index} seed {seed}: " + " | ".join(parts)


# ----------------------------------------------------------------------------
# Options.


def parse_methods(methods: str | None, task: str, model: Model | None) -> list[str]:
    applicable = [m for m, method in METHODS.items() if task in method.tasks]
    if methods is None:
        learned = "msm" if "msm" in applicable else "pc-jalal"  # MSM's image data consistency needs A^+ (not CT)
        return ([learned] if model is not None else []) + [m for m in applicable if not METHODS[m].needs_model]
    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    if not chosen:
        raise UserError("--methods is empty; expected a comma list of " + ", ".join(METHODS) + ".")
    for m in chosen:
        if m not in METHODS:
            raise UserError(f"--methods: unknown method {m!r}; expected a comma list of {', '.join(METHODS)}.")
        if METHODS[m].needs_model and model is None:
            raise UserError(f"--methods {m} needs a model: pass --network.")
        if task not in METHODS[m].tasks:
            raise UserError(f"--methods {m} applies to --task {', '.join(METHODS[m].tasks)}, not to --task {task}.")
    return list(dict.fromkeys(chosen))


def check_model(task: str, model: Model | None, measurements: MeasurementSet, network_path: str | None, source: str):
    if model is None:
        return
    if (task == "mri") != (model.kind == "mri"):
        raise UserError(f"--task {task} does not fit the model {network_path}, which was trained on "
                        f"{'multi-coil MRI' if model.kind == 'mri' else 'images'}.")
    net = model.net
    example = next(iter(measurements.examples.values()))
    if task == "mri":
        expected, found = [2, net.img_resolution, net.img_resolution], [2, *example.maps.shape[-2:]]
    else:
        expected, found = [net.out_channels, net.img_resolution, net.img_resolution], list(example.reference.shape[1:])
    if expected != found:
        raise UserError(f"The measurements of {source} have images of shape {found} (C, H, W), but the model "
                        f"{network_path} was trained on {expected}.")


@click.command()
@click.option("--network", "network_path", default=None, help="Network snapshot or run directory (omit: baselines)")
@click.option("--data", "data_path", default=None, help="Clean references (image zip/folder, MRI records) or "
              "stored undersampled MRI records (not with --measurements)")
@click.option("--measurements", "measurements_path", default=None,
              help="Reuse the measurement set written by --save-measurements (instead of --data)")
@click.option("--save-measurements", "save_path", default=None, help="Write the measurements to this new folder")
@click.option("--task", type=click.Choice(TASKS), default=None, help="The inverse problem [required with --data]")
@click.option("--outdir", required=True, help="Where to write panels, metrics and the summary")
@click.option("--methods", default=None, help=f"Comma list of {', '.join(METHODS)} [default: msm with --network, "
              "plus the task's baselines]")
@click.option("--indices", default=None, help="Examples to reconstruct, e.g. 0-7 or 1,5,9 (overrides --first/--num)")
@click.option("--first", type=click.IntRange(min=0), default=None, help="First example [default: 0]")
@click.option("--num", type=click.IntRange(min=1), default=None, help="Number of examples [default: all from --first]")
@click.option("--seeds", default="0", show_default=True, help="Posterior sample seeds, e.g. 0-3")
@click.option("--batch", "max_batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="(example, seed) pairs per sampler call")
@click.option("--mask-kind", type=click.Choice(LINE_MASK_KINDS), default=None,
              help="Task option, MRI line law [default: lines-random]")
@click.option("--accel", type=click.FloatRange(min=1), default=None, help="Task option, MRI acceleration R "
              "[default: 4]")
@click.option("--acs", type=click.IntRange(min=0), default=None, help=f"Task option, MRI centre lines [default: "
              f"{ACS_HELP}]")
@click.option("--center-fraction", type=click.FloatRange(min=0, max=1), default=None,
              help="Task option, fastmri mask kinds: fraction of the columns at the centre [default: 0.08]")
@click.option("--mask-seed", type=int, default=None, help="Task option, seed of the simulated masks and noise "
              "[default: 1]")
@click.option("--sr-factor", type=click.IntRange(min=1), default=None, help="Task option [default: 4]")
@click.option("--box-size", type=click.IntRange(min=1), default=None, help="Task option, side of the centred hole "
              "[default: res/2]")
@click.option("--pixel-p", type=float, default=None, help="Task option, pixel drop probability [default: 0.5]")
@click.option("--sigma-y", type=float, default=None, help="Task option, measurement noise std [default: 0.01; ct: "
              "--rel-noise 0.05]")
@click.option("--rel-noise", type=float, default=None, help="Task option, noise std relative to mean |A x| (CT: 0.05)")
@click.option("--snr-db", default=None, help="Task option, comma list of measurement SNRs in dB: the same examples "
              "measured at each, tabulated per SNR")
@click.option("--views", type=int, default=None, help="Task option, CT projection angles [default: 20]")
@click.option("--angular-range", type=float, default=None, help="Task option, CT degrees covered [default: 180; "
              "less: limited angle]")
@click.option("--sigma-max", type=float, default=FamilyOptions.sigma_max, show_default=True,
              help="ALD/PC: top of the geometric ladder (levels above the model's training range are dropped)")
@click.option("--sigma-min", type=float, default=FamilyOptions.sigma_min, show_default=True,
              help="ALD/PC: bottom of the ladder")
@click.option("--levels", type=int, default=FamilyOptions.levels, show_default=True, help="ALD/PC: ladder levels")
@click.option("--steps-each", type=int, default=FamilyOptions.steps_each, show_default=True,
              help="ALD: Langevin steps per level")
@click.option("--eps", type=float, default=None, help="ALD: step at the last level [default: NCSNv2's criterion]")
@click.option("--noise-boost", type=float, default=FamilyOptions.noise_boost, show_default=True,
              help="ALD: noise power (1: correct temperature; 0.5: the reference's complex noise)")
@click.option("--dc-boost", type=float, default=FamilyOptions.dc_boost, show_default=True,
              help="ALD (annealed) and pc-jalal: weight of the likelihood term")
@click.option("--sigma-offset", type=int, default=FamilyOptions.sigma_offset, show_default=True,
              help="ALD: highest levels skipped")
@click.option("--ald-dc", type=click.Choice(("annealed", "normalized")), default=FamilyOptions.ald_dc,
              show_default=True, help="ALD data term: A^H (y - A x) / (sigma_y^2 + sigma^2), or Jalal's code's")
@click.option("--dc-norm-weight", type=float, default=FamilyOptions.dc_norm_weight, show_default=True,
              help="ALD normalized: data step / score norm")
@click.option("--init", type=click.Choice(ALD_INITS), default=FamilyOptions.init, show_default=True,
              help="ALD start (adjoint: A^+ y, FBP for CT)")
@click.option("--final-denoise", is_flag=True, help="ALD/PC: return the Tweedie estimate of the last iterate")
@click.option("--snr", type=float, default=FamilyOptions.snr, show_default=True,
              help="PC: corrector signal-to-noise ratio (Song et al.)")
@click.option("--corrector-steps", type=int, default=FamilyOptions.corrector_steps, show_default=True,
              help="PC: Langevin corrector steps per level")
@click.option("--start-fraction", type=float, default=None,
              help="PC: warm start from A^+ y (FBP for CT) this fraction down the ladder [default: from noise]")
@click.option("--start-sigma", type=float, default=None,
              help="PC: warm start from A^+ y (FBP for CT) at the first level <= this sigma")
@click.option("--pc-dps-step", type=float, default=FamilyOptions.pc_dps_step, show_default=True,
              help="pc-dps: zeta of the score term -zeta grad ||y - A x0_hat||")
@click.option("--dds-gamma", type=float, default=FamilyOptions.dds_gamma, show_default=True, help="dds: gamma")
@click.option("--cg-iters", type=int, default=FamilyOptions.cg_iters, show_default=True, help="dds: CG iterations")
@click.option("--padis-steps", type=int, default=PadisOptions.steps, show_default=True,
              help="padis: levels of EDM's rho = 7 schedule (those above the model's training range are dropped)")
@click.option("--padis-sigma-max", type=float, default=PadisOptions.sigma_max, show_default=True,
              help="padis: top of the schedule")
@click.option("--padis-sigma-min", type=float, default=PadisOptions.sigma_min, show_default=True,
              help="padis: bottom of the schedule")
@click.option("--inner-steps", type=int, default=PadisOptions.inner_steps, show_default=True,
              help="padis: DPS + Langevin iterations per level")
@click.option("--alpha-factor", type=float, default=PadisOptions.alpha_factor, show_default=True,
              help="padis: Langevin step alpha = this x sigma^2 (x <- x + alpha/2 score + sqrt(alpha) z)")
@click.option("--padis-zeta", type=float, default=PadisOptions.zeta, show_default=True,
              help="padis: DPS step zeta on the unsquared ||y - A D(x)||")
@click.option("--padis-init", type=click.Choice(PADIS_INITS), default=PadisOptions.init, show_default=True,
              help="padis start: A^+ y (FBP for CT) without noise (PaDIS's code), or sigma_max noise (its paper)")
@click.option("--subsets", "num_subsets", type=click.IntRange(min=1), default=None,
              help="MSM: K, also of an MSM prior's aggregate denoiser in dps and the ald / pc / dds family "
                   "[default: 3 MRI, 2 images; 1 for an oracle model]")
@click.option("--steps", "num_steps", type=click.IntRange(min=1, max=200), default=200, show_default=True,
              help="MSM: levels of the VP-200 grid (those above the model's training range are dropped)")
@click.option("--dc-step", type=float, default=None, help="MSM: data-consistency lambda [default: 2 MRI, 1.75 "
              "images]")
@click.option("--sample-accel", type=click.FloatRange(min=1), default=None,
              help="MSM model on MRI lines: acceleration R of the masks its partial estimates use at sampling "
                   "[default: the training law's]")
@click.option("--acquired-draw", type=click.Choice(["frequencies", "masks"]), default=None,
              help="MSM model trained on acquired masks: draw each column with its acquired frequency, or one of the "
              "acquired masks  [default: frequencies]")
@click.option("--msm-solver", type=click.Choice(["ancestral", "heun"]), default="ancestral", show_default=True,
              help="MSM: the MSM sampler on --steps VP-200 levels, or EDM's Heun ODE sampler on --steps levels of "
                   "its rho grid (2 --steps - 1 evaluations, each of K subsets)")
@click.option("--vp-grid", type=click.Choice(["ddim", "section"]), default=None,
              help="MSM: rule of the VP-200 grid, the reference's ddim200 stride (t = 0, 5, ..., 995) or the section "
                   "rule (t = round(i 999 / 199))  [default: the snapshot's; ddim where it records none]")
@click.option("--eta", type=click.FloatRange(min=0, max=1), default=0.85, show_default=True, help="MSM: outer eta")
@click.option("--outer", type=click.Choice(OUTER_UPDATES), default="ddnm", show_default=True,
              help="MSM: outer update")
@click.option("--dps-steps", type=click.IntRange(min=2, max=1000), default=1000, show_default=True,
              help="DPS: levels of DDPM's 1000-step grid (those above the model's training range are dropped)")
@click.option("--dps-step", type=float, default=DPS_ZETA, show_default=True, help="DPS: step zeta")
@click.option("--cs-tv-lambda", type=float, default=None, help="cs-tv weight [default: "
              f"{CS_DEFAULTS['tv']['lamda']}]")
@click.option("--cs-tv-iters", type=click.IntRange(min=1), default=None, help="cs-tv PDHG iterations [default: "
              f"{CS_DEFAULTS['tv']['max_iter']}]")
@click.option("--cs-l1-lambda", type=float, default=None, help="cs-l1 weight [default: "
              f"{CS_DEFAULTS['l1-wavelet']['lamda']}]")
@click.option("--cs-l1-iters", type=click.IntRange(min=1), default=None, help="cs-l1 iterations [default: "
              f"{CS_DEFAULTS['l1-wavelet']['max_iter']}]")
@click.option("--patch-size", type=click.IntRange(min=1), default=None,
              help="Patch prior: tile size [default: the largest training size whose tile grid can shift]")
@click.option("--patch-batch", type=click.IntRange(min=1), default=None,
              help="Patch prior: tiles per network call  [default: 256]")
@click.option("--assembly", type=click.Choice(["tile", "overlap"]), default=None,
              help="Patch prior: non-overlapping tiles on a grid shifted at random per call, or a fixed grid of "
              "stride p/2 averaged  [default: tile]")
@click.option("--compile", "compile_net", is_flag=True,
              help="torch.compile the network (pays off for many examples; the first batch includes the compilation)")
@click.option("--metric-convention", type=click.Choice(CONVENTIONS), default="sense", show_default=True,
              help="MRI metrics: SENSE-combined magnitude, fastMRI's (RSS, crop, per volume) or the MSM paper's "
              "(min-max normalised)")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True)
def main(network_path, data_path, measurements_path, save_path, task, outdir, methods, indices, first, num, seeds,
         max_batch, mask_kind, accel, acs, center_fraction, mask_seed, sr_factor, box_size, pixel_p, sigma_y, rel_noise,
         snr_db, views,
         angular_range, sigma_max, sigma_min, levels, steps_each, eps, noise_boost, dc_boost, sigma_offset, ald_dc,
         dc_norm_weight, init, final_denoise, snr, corrector_steps, start_fraction, start_sigma, pc_dps_step, dds_gamma,
         cg_iters, padis_steps, padis_sigma_max, padis_sigma_min, inner_steps, alpha_factor, padis_zeta, padis_init,
         num_subsets, num_steps, dc_step, sample_accel, acquired_draw, msm_solver, vp_grid, eta, outer, dps_steps,
         dps_step, cs_tv_lambda, cs_tv_iters, cs_l1_lambda, cs_l1_iters, patch_size, patch_batch, assembly,
         compile_net, metric_convention, device):
    options = {k: v for k, v in locals().items() if k != "device"}
    # What the outputs depend on, recorded in OUTDIR/settings.json: a rerun may overwrite its own outputs only.
    paths = {"network_path": network_path and checkpoint.resolve_snapshot_path(network_path), "data_path": data_path,
             "measurements_path": measurements_path}
    recorded = {**{k: v for k, v in options.items() if k not in ("outdir", "max_batch", "compile_net", "save_path")},
                **{k: os.path.abspath(v) for k, v in paths.items() if v is not None}}
    dnnlib.check_outdir(outdir)
    dnnlib.check_outdir_settings(outdir, recorded)
    device = dist.init(device)
    rank, world = dist.get_rank(), dist.get_world_size()

    # Validate everything before writing anything.
    given = {name: value for name, value in (("sigma_y", sigma_y), ("mask_seed", mask_seed), ("kind", mask_kind),
                                             ("R", accel), ("acs", acs), ("center_fraction", center_fraction),
                                             ("sr_factor", sr_factor),
                                             ("box_size", box_size), ("pixel_p", pixel_p), ("views", views),
                                             ("angular_range", angular_range), ("rel_noise", rel_noise))
             if value is not None}
    family = FamilyOptions(sigma_max, sigma_min, levels, steps_each, eps, noise_boost, dc_boost, sigma_offset, ald_dc,
                           dc_norm_weight, init, final_denoise, snr, corrector_steps, start_fraction, start_sigma,
                           pc_dps_step, dds_gamma, cg_iters)
    family.check()
    padis = PadisOptions(padis_steps, padis_sigma_max, padis_sigma_min, inner_steps, alpha_factor, padis_zeta,
                         padis_init)
    padis.check()
    snr_list = parse_snr_list(snr_db)
    if not dps_step > 0:
        raise UserError(f"--dps-step must be > 0, got {dps_step}.")
    cs = {"tv": dict(CS_DEFAULTS["tv"]), "l1-wavelet": dict(CS_DEFAULTS["l1-wavelet"])}
    for regulariser, lamda, iters in (("tv", cs_tv_lambda, cs_tv_iters), ("l1-wavelet", cs_l1_lambda, cs_l1_iters)):
        if lamda is not None and not lamda > 0:
            raise UserError(f"--cs-{'tv' if regulariser == 'tv' else 'l1'}-lambda must be > 0, got {lamda}.")
        cs[regulariser].update({k: v for k, v in (("lamda", lamda), ("max_iter", iters)) if v is not None})
    if save_path is not None and os.path.exists(save_path):
        raise UserError(f"--save-measurements {save_path} already exists; measurement sets are never overwritten.")
    seeds = parse_seeds(seeds)
    model = load_model(network_path, device, patch_size, patch_batch, assembly, compile_net)
    if acquired_draw is not None:
        with_acquired_draw(FullMask() if model is None else model.mask_law, acquired_draw)  # refuses other laws
    if sample_accel is not None and (model is None or not model.mask_law.kind.startswith("lines")):
        law = "no --network" if model is None else f"{network_path}, trained with the {model.mask_law.kind} mask law"
        raise UserError(f"--sample-accel applies to MSM models trained on MRI line masks, got {law}.")
    if measurements_path is not None:
        if data_path is not None:
            raise UserError("--data and --measurements exclude each other: the measurement set holds its data.")
        if snr_list is not None:
            raise UserError("--snr-db measures the examples anew at each SNR; it does not apply to --measurements.")
        measurements = load_measurements(measurements_path)
        check_against_stored(measurements.task, task, given, measurements_path)
        task, source = measurements.task.task, measurements_path
        if selection_given(indices, first, num):
            chosen = select_indices(indices, first, num, sorted(measurements.examples))
            measurements.examples = {i: measurements.examples[i] for i in chosen}
    else:
        if data_path is None or task is None:
            raise UserError("Give --data and --task (the data to measure and the task), or --measurements DIR.")
        data = open_data(data_path)
        check_data_kind(task, data, data_path)
        acquired = task == "mri" and not data.describe()["fully_sampled"]
        resolution = data.shape[-1] if task == "mri" else data.resolution
        chosen = select_indices(indices, first, num, list(range(len(data))))
        # Every rank measures every selected record: a bad record stops all ranks before anything is written, and
        # every rank knows the whole set's hash. Held-out sets are small, so they are kept in memory. With --snr-db,
        # one set per SNR (the same masks and noise draws, scaled to each SNR).
        sets = []
        for level in snr_list or [None]:
            task_options = resolve_task_options(task, acquired, given if level is None else {**given, "snr_db": level},
                                                resolution)
            measured = {i: measure_example(data[i], task_options) for i in chosen}
            if acquired:  # the converter's per-slice noise estimate, where recorded, is the noise std of the data
                for i, example in measured.items():
                    noise = data.meta["slices"][i].get("noise_std")
                    example.sigma_y = None if noise is None else torch.tensor([float(noise)], dtype=torch.float64)
            sets.append((level, MeasurementSet(task_options, measured, os.path.abspath(data_path))))
        measurements = sets[0][1]
        source = data_path
    sets = sets if measurements_path is None else [(None, measurements)]
    if save_path is not None and len(sets) > 1:
        raise UserError(f"--save-measurements writes one measurement set, but --snr-db {snr_db} makes {len(sets)}.")
    check_model(task, model, measurements, network_path, source)
    if metric_convention != "sense" and task != "mri":
        raise UserError(f"--metric-convention {metric_convention} applies to --task mri only.")
    if metric_convention == "fastmri" and snr_list is not None:
        raise UserError("--metric-convention fastmri scores whole volumes and does not combine with --snr-db.")
    # The volume of each example for fastMRI's per-volume metrics: its source file where the records say (fastMRI
    # conversions), else the example alone.
    slices = data.meta["slices"] if measurements_path is None and task == "mri" else []
    volumes = {i: slices[i].get("source", f"example {i}") if i < len(slices) else f"example {i}"
               for i in measurements.examples}
    volume_max = {}
    if metric_convention == "fastmri":
        for i, example in measurements.examples.items():
            if example.reference is not None:
                peak = float(rss_images(example.reference, example.maps).max())
                volume_max[volumes[i]] = max(volume_max.get(volumes[i], 0.0), peak)
    methods = parse_methods(methods, task, model)
    dc_step = dc_step if dc_step is not None else (2.0 if task == "mri" else 1.75)
    check_dc_step(dc_step)
    method_options = MethodOptions(msm_steps=num_steps, num_subsets=num_subsets or (3 if task == "mri" else 2),
                                   dc_step=dc_step, eta=eta, outer=outer, dps_steps=dps_steps, dps_step=dps_step,
                                   cs=cs, family=family, padis=padis, sample_accel=sample_accel,
                                   acquired_draw=acquired_draw, msm_solver=msm_solver, vp_grid=vp_grid)
    run = Run(model, measurements.task, method_options, device, show_progress=rank == 0)
    examples = measurements.examples
    stored = any(e.reference is None for e in examples.values())
    report = {"options": options, "measurements": measurements.describe(),
              "settings": {m: METHODS[m].settings(run) for m in methods}}
    if snr_list is not None:
        report["snr_sweep"] = {f"{level:g}": m.describe() for level, m in sets}

    if rank == 0:
        dnnlib.write_outdir_settings(outdir, recorded)  # everything is checked: record before the first output
        if save_path is not None:
            save_measurements(save_path, measurements)
        for sub in ("panels", "reconstructions"):
            os.makedirs(os.path.join(outdir, sub), exist_ok=True)
    dist.barrier()
    pairs = dist.shard([(i, s) for i in examples for s in seeds])
    batches = [(level, run if level is None else Run(model, measured.task, method_options, device, rank == 0),
                measured.examples, pairs[k : k + max_batch])
               for level, measured in sets for k in range(0, len(pairs), max_batch)]
    dist.print0(f"Reconstructing {len(examples)} example(s) x {len(seeds)} seed(s) with {', '.join(methods)} "
                f"({task}, measurements {report['measurements']['hash'][:12]}"
                + ("" if snr_list is None else f", at SNR {', '.join(f'{v:g}' for v in snr_list)} dB")
                + f") on {world} rank(s) to {outdir}")
    for m in methods:
        if "schedule" in report["settings"][m]:
            dist.print0(f"{m}: {report['settings'][m]['schedule']}")
    deterministic, rows = {}, []
    for b, (level, run, examples, batch) in enumerate(batches):
        batch_examples = [examples[i] for i, _ in batch]
        label = f"batch {b + 1}/{len(batches)}"
        learned = {m: run_method(m, run, batch_examples, [s for _, s in batch], label)
                   for m in methods if METHODS[m].seeded}
        for j, (i, seed) in enumerate(batch):
            example = examples[i]
            results, costs = {}, {}
            for m in methods:
                if METHODS[m].seeded:
                    images, nfe, seconds = learned[m]
                    results[m], costs[m] = images[j : j + 1], (nfe, seconds)
                else:
                    if (level, i, m) not in deterministic:
                        images, nfe, seconds = run_method(m, run, [example], [seed], f"example {i}")
                        deterministic[(level, i, m)] = images, (nfe, seconds)
                    results[m], costs[m] = deterministic[(level, i, m)]
            measurement = display_images((run_fbp if task == "ct" else run_zero_filled)(run, [example], [seed]), task)
            reference = display_images(example.reference, task) if example.reference is not None else None
            shown = {m: display_images(image, task) for m, image in results.items()}
            name = f"{i:05d}-{seed:06d}" + ("" if level is None else f"-snr{level:g}dB")
            save_panel(os.path.join(outdir, "panels", f"{name}.png"), measurement, shown, reference, task)
            np.savez(os.path.join(outdir, "reconstructions", f"{name}.npz"),
                     **{m: image[0].numpy().astype(np.float32) for m, image in results.items()})
            if reference is not None:
                new = {m: {**(metric_rows(reference, shown[m], task) if metric_convention == "sense" else
                              convention_row(metric_convention, example.reference, results[m], example.maps,
                                              volume_max.get(volumes[i]))),
                           "nfe": costs[m][0], "seconds": costs[m][1]} for m in methods}
                rows += [{"example": i, "seed": seed, "method": m, **({} if level is None else {"snr_db": level}), **r}
                         for m, r in new.items()]
                tqdm.tqdm.write(("" if world == 1 else f"[rank {rank}] ") + example_line(i, seed, new))
            else:
                tqdm.tqdm.write(("" if world == 1 else f"[rank {rank}] ") + f"example {i} seed {seed}: done")

    rows = [r for part in dist.all_gather_object(rows) for r in part]
    if rank == 0:
        if stored:
            with open(os.path.join(outdir, "summary.json"), "w") as f:
                json.dump({**report, "methods": None, "note": "stored measurements have no reference: no metrics"},
                          f, indent=2)
            print(f"Wrote panels and reconstructions to {outdir} (stored measurements: no reference, no metrics)")
        else:
            order = {m: k for k, m in enumerate(methods)}
            rows.sort(key=lambda r: (r.get("snr_db", 0), r["example"], r["seed"], order[r["method"]]))
            summary = summarise(rows, methods) if snr_list is None else {
                f"{m} @ {level:g} dB": values for level in snr_list
                for m, values in summarise([r for r in rows if r["snr_db"] == level], methods).items()}
            report["metric_convention"] = CONVENTION_TEXT[metric_convention] if task == "mri" else None
            if metric_convention == "fastmri":
                report["volumes"] = volume_rows(measurements.examples, volumes, outdir, seeds, methods)
                with open(os.path.join(outdir, "volumes.csv"), "w", newline="") as f:
                    f.write(f"# {CONVENTION_TEXT['fastmri']}\n")
                    writer = csv.DictWriter(f, fieldnames=["volume", "slices", "seed", "method", "psnr", "ssim",
                                                           "nmse"])
                    writer.writeheader()
                    writer.writerows(report["volumes"])
            write_metrics(outdir, rows, summary, report)
            print(format_table(summary))
            print(f"Wrote panels, reconstructions, metrics.csv and summary.json to {outdir}")
    dist.destroy()


if __name__ == "__main__":
    dnnlib.run_cli(main)
