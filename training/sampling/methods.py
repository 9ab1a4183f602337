"""The method registry: every named sampling method of reconstruct.py and generate.py, with its options.

METHODS: name -> Method. A reconstruct.py method (`run` set) reconstructs one (example, seed) pair per row:
`run(run, examples, seeds)` returns the images; `tasks` says which measurement operators it handles; `needs_model`
marks a learned prior (--network); `seeded` False marks a deterministic method (computed once per example, its rows
repeated across seeds); `settings(run)` is written beside its rows in summary.json; `network_calls(run)` is the
number of batched network calls of one run (the progress bar's total; one small function per method). A generate.py
sampler (`sample` set) draws the images of a batch of seeds for a `Generation` (the model, its measurement process
and guidance; training/sampling/generation.py), `sample_calls` and `sample_settings` its progress total and log line.
Each entry names its option groups (`options` for reconstruct.py, `sample_options` for generate.py: click options
declared once, here and in generation.py; the scripts build their CLIs from them with `cli_options`), so a new method
is one function, one entry and its options; nothing in the scripts changes.

Methods of reconstruct.py:
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
The learned methods start their grids inside the model's training range (training/samplers.py
`sigmas_in_training_range`; the log says where and why).
"""

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import click
import torch
import tqdm

from dnnlib import UserError
from torch_utils.compiling import compile_network
from torch_utils.misc import SeedGenerators
from training import snapshot as checkpoint
from training.classifier import is_classifier
from training.conditioning import dds, dps, jalal, jalal_normalized, projection
from training.ct import fbp
from training.masks import FullMask, mask_law_from_config, with_acquired_draw
from training.measurements import aggregate_projection, skip_space_of
from training.operators import Identity
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
from training.sampling.generation import (
    ACQUIRED_DRAW_OPTION,
    BRIDGE_OPTIONS,
    DEFAULT_SUBSETS,
    EDM_OPTIONS,
    GUIDANCE_OPTIONS,
    IMAGE_POSTERIOR_SUBSETS,
    SAMPLER_OPTIONS,
    SAMPLERS,
    ambient_settings,
    edm_calls,
    edm_settings,
    msm_calls,
    posterior_subsets,
    sample_ambient,
    sample_edm,
    sample_msm,
)
from training.sampling.generation import msm_settings as msm_generation_settings
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
    IMAGE_OPERATOR_TASKS,
    TASKS,
    Example,
    MeasurementSet,
    TaskOptions,
    first_estimate,
    task_operator,
)

# ----------------------------------------------------------------------------
# The model.


@dataclass
class Model:
    net: CountingNetwork  # all its denoisers are built on it, so its count is the run's NFE
    kind: str  # 'mri' (2-channel complex images, k-space measurements) or 'image'
    mask_law: object  # the training mask law; FullMask for a model trained on clean data (an oracle)
    loss_config: dict | None  # the snapshot's loss (its noise-level distribution bounds the sampling grids)


def load_network(network_path: str, device, patch_size=None, patch_batch=None, assembly=None,
                 compile_net: bool = False, needs: str = "a diffusion model is needed"):
    """The --network snapshot as a network that counts its calls (CountingNetwork) and its config; a patch prior
    becomes its stitched whole-image network (training/patches.py), so every sampler drives it as any other network.
    compile_net: the samplers call the torch.compile'd network. A classifier snapshot is refused (`needs` says what
    the script needs instead)."""
    net, config = checkpoint.load_snapshot(network_path, device=device)
    if is_classifier(config):
        raise UserError(f"--network {network_path} is a classifier snapshot; {needs}.")
    if compile_net:
        net = compile_network(net, torch.device(device).type)
    return CountingNetwork(patch_prior(net, config, patch_size, patch_batch, assembly)), config


def load_model(network_path: str | None, device, patch_size=None, patch_batch=None, assembly=None,
               compile_net: bool = False) -> Model | None:
    """reconstruct.py's --network (`load_network`) with what the methods read from its snapshot; None without one."""
    if network_path is None:
        if patch_size is not None or patch_batch is not None or assembly is not None:
            raise UserError("--patch-size, --patch-batch and --assembly apply to a patch prior given with --network.")
        if compile_net:
            raise UserError("--compile applies to a network given with --network.")
        return None
    net, config = load_network(network_path, device, patch_size, patch_batch, assembly, compile_net,
                               needs="reconstruct.py needs a diffusion model")
    measurement = config.get("measurement")
    dataset_kind = (config.get("dataset") or {}).get("kind")
    if measurement is not None:
        kind = "mri" if measurement["operator"] == "mri" else "image"
        law = mask_law_from_config(measurement["mask"])
    else:
        kind = "mri" if dataset_kind == "mri" else "image"
        law = FullMask()
    return Model(net=net, kind=kind, mask_law=law, loss_config=config.get("loss"))


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


def padis_network_calls(run: Run) -> int:
    return len(padis_levels(run)[0]) * run.options.padis.inner_steps


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


# ----------------------------------------------------------------------------
# Options of the reconstruct.py methods, declared once: click options in the order the CLI lists them.

FAMILY_OPTIONS = (
    click.option("--sigma-max", type=float, default=FamilyOptions.sigma_max, show_default=True,
                 help="ALD/PC: top of the geometric ladder (levels above the model's training range are dropped)"),
    click.option("--sigma-min", type=float, default=FamilyOptions.sigma_min, show_default=True,
                 help="ALD/PC: bottom of the ladder"),
    click.option("--levels", type=int, default=FamilyOptions.levels, show_default=True, help="ALD/PC: ladder levels"),
    click.option("--steps-each", type=int, default=FamilyOptions.steps_each, show_default=True,
                 help="ALD: Langevin steps per level"),
    click.option("--eps", type=float, default=None, help="ALD: step at the last level [default: NCSNv2's criterion]"),
    click.option("--noise-boost", type=float, default=FamilyOptions.noise_boost, show_default=True,
                 help="ALD: noise power (1: correct temperature; 0.5: the reference's complex noise)"),
    click.option("--dc-boost", type=float, default=FamilyOptions.dc_boost, show_default=True,
                 help="ALD (annealed) and pc-jalal: weight of the likelihood term"),
    click.option("--sigma-offset", type=int, default=FamilyOptions.sigma_offset, show_default=True,
                 help="ALD: highest levels skipped"),
    click.option("--ald-dc", type=click.Choice(("annealed", "normalized")), default=FamilyOptions.ald_dc,
                 show_default=True, help="ALD data term: A^H (y - A x) / (sigma_y^2 + sigma^2), or Jalal's code's"),
    click.option("--dc-norm-weight", type=float, default=FamilyOptions.dc_norm_weight, show_default=True,
                 help="ALD normalized: data step / score norm"),
    click.option("--init", type=click.Choice(ALD_INITS), default=FamilyOptions.init, show_default=True,
                 help="ALD start (adjoint: A^+ y, FBP for CT)"),
    click.option("--final-denoise", is_flag=True, help="ALD/PC: return the Tweedie estimate of the last iterate"),
    click.option("--snr", type=float, default=FamilyOptions.snr, show_default=True,
                 help="PC: corrector signal-to-noise ratio (Song et al.)"),
    click.option("--corrector-steps", type=int, default=FamilyOptions.corrector_steps, show_default=True,
                 help="PC: Langevin corrector steps per level"),
    click.option("--start-fraction", type=float, default=None,
                 help="PC: warm start from A^+ y (FBP for CT) this fraction down the ladder [default: from noise]"),
    click.option("--start-sigma", type=float, default=None,
                 help="PC: warm start from A^+ y (FBP for CT) at the first level <= this sigma"),
    click.option("--pc-dps-step", type=float, default=FamilyOptions.pc_dps_step, show_default=True,
                 help="pc-dps: zeta of the score term -zeta grad ||y - A x0_hat||"),
    click.option("--dds-gamma", type=float, default=FamilyOptions.dds_gamma, show_default=True, help="dds: gamma"),
    click.option("--cg-iters", type=int, default=FamilyOptions.cg_iters, show_default=True, help="dds: CG iterations"),
)
PADIS_OPTIONS = (
    click.option("--padis-steps", type=int, default=PadisOptions.steps, show_default=True,
                 help="padis: levels of EDM's rho = 7 schedule (those above the model's training range are dropped)"),
    click.option("--padis-sigma-max", type=float, default=PadisOptions.sigma_max, show_default=True,
                 help="padis: top of the schedule"),
    click.option("--padis-sigma-min", type=float, default=PadisOptions.sigma_min, show_default=True,
                 help="padis: bottom of the schedule"),
    click.option("--inner-steps", type=int, default=PadisOptions.inner_steps, show_default=True,
                 help="padis: DPS + Langevin iterations per level"),
    click.option("--alpha-factor", type=float, default=PadisOptions.alpha_factor, show_default=True,
                 help="padis: Langevin step alpha = this x sigma^2 (x <- x + alpha/2 score + sqrt(alpha) z)"),
    click.option("--padis-zeta", type=float, default=PadisOptions.zeta, show_default=True,
                 help="padis: DPS step zeta on the unsquared ||y - A D(x)||"),
    click.option("--padis-init", type=click.Choice(PADIS_INITS), default=PadisOptions.init, show_default=True,
                 help="padis start: A^+ y (FBP for CT) without noise (PaDIS's code), or sigma_max noise (its paper)"),
)
SUBSETS_OPTIONS = (
    click.option("--subsets", "num_subsets", type=click.IntRange(min=1), default=None,
                 help="MSM: K, also of an MSM prior's aggregate denoiser in dps and the ald / pc / dds family "
                      f"[default: {DEFAULT_SUBSETS} MRI, {IMAGE_POSTERIOR_SUBSETS} images; 1 for an oracle model]"),
)
MSM_OPTIONS = (
    click.option("--steps", "num_steps", type=click.IntRange(min=1, max=200), default=200, show_default=True,
                 help="MSM: levels of the VP-200 grid (those above the model's training range are dropped)"),
    click.option("--dc-step", type=float, default=None, help="MSM: data-consistency lambda [default: 2 MRI, 1.75 "
                 "images]"),
    click.option("--sample-accel", type=click.FloatRange(min=1), default=None,
                 help="MSM model on MRI lines: acceleration R of the masks its partial estimates use at sampling "
                      "[default: the training law's]"),
    ACQUIRED_DRAW_OPTION,
    click.option("--msm-solver", type=click.Choice(["ancestral", "heun"]), default="ancestral", show_default=True,
                 help="MSM: the MSM sampler on --steps VP-200 levels, or EDM's Heun ODE sampler on --steps levels of "
                      "its rho grid (2 --steps - 1 evaluations, each of K subsets)"),
    click.option("--vp-grid", type=click.Choice(["ddim", "section"]), default=None,
                 help="MSM: rule of the VP-200 grid, the reference's ddim200 stride (t = 0, 5, ..., 995) or the "
                      "section rule (t = round(i 999 / 199))  [default: the snapshot's; ddim where it records none]"),
    click.option("--eta", type=click.FloatRange(min=0, max=1), default=0.85, show_default=True, help="MSM: outer eta"),
    click.option("--outer", type=click.Choice(OUTER_UPDATES), default="ddnm", show_default=True,
                 help="MSM: outer update"),
)
DPS_OPTIONS = (
    click.option("--dps-steps", type=click.IntRange(min=2, max=1000), default=1000, show_default=True,
                 help="DPS: levels of DDPM's 1000-step grid (those above the model's training range are dropped)"),
    click.option("--dps-step", type=float, default=DPS_ZETA, show_default=True, help="DPS: step zeta"),
)
CS_TV_OPTIONS = (
    click.option("--cs-tv-lambda", type=float, default=None, help="cs-tv weight [default: "
                 f"{CS_DEFAULTS['tv']['lamda']}]"),
    click.option("--cs-tv-iters", type=click.IntRange(min=1), default=None, help="cs-tv PDHG iterations [default: "
                 f"{CS_DEFAULTS['tv']['max_iter']}]"),
)
CS_L1_OPTIONS = (
    click.option("--cs-l1-lambda", type=float, default=None, help="cs-l1 weight [default: "
                 f"{CS_DEFAULTS['l1-wavelet']['lamda']}]"),
    click.option("--cs-l1-iters", type=click.IntRange(min=1), default=None, help="cs-l1 iterations [default: "
                 f"{CS_DEFAULTS['l1-wavelet']['max_iter']}]"),
)
# Every option group in the order the CLIs list them; each script lists those its entries name (`cli_options`).
OPTION_GROUPS = (FAMILY_OPTIONS, PADIS_OPTIONS, SUBSETS_OPTIONS, MSM_OPTIONS, DPS_OPTIONS, CS_TV_OPTIONS, CS_L1_OPTIONS,
                 GUIDANCE_OPTIONS, BRIDGE_OPTIONS, EDM_OPTIONS, SAMPLER_OPTIONS)


@dataclass(frozen=True)
class Method:
    """An entry of METHODS (module docstring): a reconstruct.py method (`run`), a generate.py sampler (`sample`), or
    both (msm)."""

    run: Callable | None = None  # (Run, examples, seeds) -> images (B, C, H, W), one per (example, seed) pair
    tasks: tuple = ()  # the tasks (measurement operators) it handles
    needs_model: bool = True  # a learned prior: needs --network
    seeded: bool = True  # a posterior sample per seed; False: deterministic, computed once per example
    settings: Callable | None = None  # (Run) -> the settings written beside its rows in summary.json
    network_calls: Callable | None = None  # (Run) -> batched network calls per run (the progress bar's total)
    options: tuple = ()  # its option groups in reconstruct.py
    sample: Callable | None = None  # generate.py: (Generation, seeds, gen, labels, target, latents) -> images
    sample_calls: Callable | None = None  # (Generation) -> network calls per batch (the progress bar's total)
    sample_settings: Callable | None = None  # (Generation) -> its settings for the log
    sample_options: tuple = ()  # its option groups in generate.py


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


SAMPLER_GROUPS = (GUIDANCE_OPTIONS, EDM_OPTIONS, SAMPLER_OPTIONS)
METHODS = {
    "edm": Method(sample=sample_edm, sample_calls=edm_calls, sample_settings=edm_settings,
                  sample_options=(*SAMPLER_GROUPS, BRIDGE_OPTIONS)),
    "msm": Method(run_msm, IMAGE_OPERATOR_TASKS, settings=msm_settings, network_calls=msm_network_calls,
                  options=(SUBSETS_OPTIONS, MSM_OPTIONS), sample=sample_msm, sample_calls=msm_calls,
                  sample_settings=msm_generation_settings, sample_options=SAMPLER_GROUPS),
    "dps": Method(run_dps, TASKS, settings=dps_settings, network_calls=lambda run: len(dps_levels(run)[0]),
                  options=(SUBSETS_OPTIONS, MSM_OPTIONS, DPS_OPTIONS)),
    **{name: Method(family_method(name), tasks, settings=lambda run, name=name: family_settings(name, run),
                    network_calls=lambda run, name=name: family_network_calls(name, run),
                    options=(SUBSETS_OPTIONS, MSM_OPTIONS, FAMILY_OPTIONS))
       for name, tasks in (("ald", TASKS), ("pc-jalal", TASKS), ("pc-dps", TASKS),
                           ("pc-projection", IMAGE_OPERATOR_TASKS), ("dds", TASKS))},
    "padis": Method(run_padis, TASKS, settings=padis_settings, network_calls=padis_network_calls,
                    options=(SUBSETS_OPTIONS, MSM_OPTIONS, PADIS_OPTIONS)),
    "zero-filled": Method(run_zero_filled, IMAGE_OPERATOR_TASKS, needs_model=False, seeded=False,
                          settings=lambda run: {}),
    "fbp": Method(run_fbp, ("ct",), needs_model=False, seeded=False, settings=lambda run: {"filter": "ramp"}),
    "cs-tv": Method(cs_method("tv"), ("mri",), needs_model=False, seeded=False,
                    settings=lambda run: dict(run.options.cs["tv"]), options=(CS_TV_OPTIONS,)),
    "cs-l1": Method(cs_method("l1-wavelet"), ("mri",), needs_model=False, seeded=False,
                    settings=lambda run: dict(run.options.cs["l1-wavelet"]), options=(CS_L1_OPTIONS,)),
    "ambient": Method(sample=sample_ambient, sample_calls=edm_calls, sample_settings=ambient_settings,
                      sample_options=(EDM_OPTIONS, SAMPLER_OPTIONS)),
}
POSTERIOR_METHODS = [name for name, method in METHODS.items() if method.run is not None]  # reconstruct.py's
assert tuple(name for name, method in METHODS.items() if method.sample is not None) == SAMPLERS


def cli_options(script: str) -> tuple:
    """The option groups of a script's entries ('reconstruct': `options`, 'generate': `sample_options`), in the
    order of OPTION_GROUPS."""
    used = [group for method in METHODS.values()
            for group in (method.options if script == "reconstruct" else method.sample_options)]
    return tuple(group for group in OPTION_GROUPS if any(group is u for u in used))


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
# Options.


def parse_methods(methods: str | None, task: str, model: Model | None) -> list[str]:
    applicable = [m for m, method in METHODS.items() if task in method.tasks]
    if methods is None:
        learned = "msm" if "msm" in applicable else "pc-jalal"  # MSM's image data consistency needs A^+ (not CT)
        return ([learned] if model is not None else []) + [m for m in applicable if not METHODS[m].needs_model]
    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    if not chosen:
        raise UserError("--methods is empty; expected a comma list of " + ", ".join(POSTERIOR_METHODS) + ".")
    for m in chosen:
        if m not in POSTERIOR_METHODS:
            raise UserError(f"--methods: unknown method {m!r}; expected a comma list of "
                            f"{', '.join(POSTERIOR_METHODS)}.")
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


def model_options(unit: str) -> tuple:
    """--patch-size, --patch-batch, --assembly and --compile of a script that loads a --network (`load_network`);
    unit: what the script makes many of ('examples', 'seeds')."""
    return (
        click.option("--patch-size", type=click.IntRange(min=1), default=None,
                     help="Patch prior: tile size [default: the largest training size whose tile grid can shift]"),
        click.option("--patch-batch", type=click.IntRange(min=1), default=None,
                     help="Patch prior: tiles per network call  [default: 256]"),
        click.option("--assembly", type=click.Choice(["tile", "overlap"]), default=None,
                     help="Patch prior: non-overlapping tiles on a grid shifted at random per call, or a fixed grid "
                     "of stride p/2 averaged  [default: tile]"),
        click.option("--compile", "compile_net", is_flag=True,
                     help=f"torch.compile the network (pays off for many {unit}; the first batch includes the "
                     "compilation)"),
    )


def with_options(*groups):
    """A decorator adding the click options of `groups` (tuples of click.option decorators) in their order."""

    def apply(function):
        for option in reversed([o for group in groups for o in group]):
            function = option(function)
        return function

    return apply


def method_options(o: dict, task: str) -> MethodOptions:
    """The options of every method from the parsed CLI options `o` (the names of the groups above), checked before
    anything is written (one sentence each)."""
    family = FamilyOptions(*(o[k] for k in ("sigma_max", "sigma_min", "levels", "steps_each", "eps", "noise_boost",
                                            "dc_boost", "sigma_offset", "ald_dc", "dc_norm_weight", "init",
                                            "final_denoise", "snr", "corrector_steps", "start_fraction", "start_sigma",
                                            "pc_dps_step", "dds_gamma", "cg_iters")))
    family.check()
    padis = PadisOptions(o["padis_steps"], o["padis_sigma_max"], o["padis_sigma_min"], o["inner_steps"],
                         o["alpha_factor"], o["padis_zeta"], o["padis_init"])
    padis.check()
    if not o["dps_step"] > 0:
        raise UserError(f"--dps-step must be > 0, got {o['dps_step']}.")
    cs = {"tv": dict(CS_DEFAULTS["tv"]), "l1-wavelet": dict(CS_DEFAULTS["l1-wavelet"])}
    for regulariser, flag in (("tv", "tv"), ("l1-wavelet", "l1")):
        lamda, iters = o[f"cs_{flag}_lambda"], o[f"cs_{flag}_iters"]
        if lamda is not None and not lamda > 0:
            raise UserError(f"--cs-{flag}-lambda must be > 0, got {lamda}.")
        cs[regulariser].update({k: v for k, v in (("lamda", lamda), ("max_iter", iters)) if v is not None})
    dc_step = o["dc_step"] if o["dc_step"] is not None else (2.0 if task == "mri" else 1.75)
    check_dc_step(dc_step)
    return MethodOptions(msm_steps=o["num_steps"], num_subsets=o["num_subsets"] or posterior_subsets(task),
                         dc_step=dc_step, eta=o["eta"], outer=o["outer"], dps_steps=o["dps_steps"],
                         dps_step=o["dps_step"], cs=cs, family=family, padis=padis, sample_accel=o["sample_accel"],
                         acquired_draw=o["acquired_draw"], msm_solver=o["msm_solver"], vp_grid=o["vp_grid"])


def check_sampling_law_options(model: Model | None, network_path: str | None, sample_accel, acquired_draw):
    """--acquired-draw and --sample-accel apply to MSM models of the matching mask laws only."""
    if acquired_draw is not None:
        with_acquired_draw(FullMask() if model is None else model.mask_law, acquired_draw)  # refuses other laws
    if sample_accel is not None and (model is None or not model.mask_law.kind.startswith("lines")):
        law = "no --network" if model is None else f"{network_path}, trained with the {model.mask_law.kind} mask law"
        raise UserError(f"--sample-accel applies to MSM models trained on MRI line masks, got {law}.")


def reconstruct_pairs(methods: list[str], run: Run, examples: dict, batch: list, label: str, cache: dict, key=None):
    """Every method on one batch of (example, seed) pairs -> [(index, seed, {method: image (1, C, H, W)},
    {method: (nfe, seconds)})]. Seeded methods run once on the whole batch; a deterministic one once per example
    (and `key`, e.g. the SNR level), its result kept in `cache` for the example's other seeds."""
    learned = {m: run_method(m, run, [examples[i] for i, _ in batch], [s for _, s in batch], label)
               for m in methods if METHODS[m].seeded}
    out = []
    for j, (i, seed) in enumerate(batch):
        results, costs = {}, {}
        for m in methods:
            if METHODS[m].seeded:
                images, nfe, seconds = learned[m]
                results[m], costs[m] = images[j : j + 1], (nfe, seconds)
            else:
                if (key, i, m) not in cache:
                    images, nfe, seconds = run_method(m, run, [examples[i]], [seed], f"example {i}")
                    cache[(key, i, m)] = images, (nfe, seconds)
                results[m], costs[m] = cache[(key, i, m)]
        out.append((i, seed, results, costs))
    return out


def measurement_image(run: Run, example: Example) -> torch.Tensor:
    """The measurement as an image for the panels: FBP for CT, else A^+ y."""
    return (run_fbp if run.task.task == "ct" else run_zero_filled)(run, [example], [0])
