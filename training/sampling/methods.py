"""The method registry: every named sampling method of reconstruct.py and generate.py, with its options.

METHODS: name -> Method. A reconstruct.py method (`run` set) reconstructs one (example, seed) pair per row:
`run(run, examples, seeds)` returns the images; `tasks` says which measurement operators it handles; `needs_model`
marks a learned prior (--network); `seeded` False marks a deterministic method (computed once per example, its rows
repeated across seeds); `settings(run)` is written beside its rows in summary.json; `network_calls(run)` is the
number of batched network calls of one run (the progress bar's total). A learned method is an assembly of the
package's four pieces (`Plan`: prior denoiser, conditioning term, solver with its grid, initial state; `PLANS`), built
once per run by `plan_of` before anything is written (the pieces check their own options), and its network calls are
its solver's `evaluations` on its grid. A generate.py
sampler (`sample` set) draws the images of a batch of seeds for a `Generation` (the model, its measurement process
and guidance; training/sampling/generation.py), `sample_calls` and `sample_settings` its progress total and log line.
Each entry names its option groups (`options` for reconstruct.py, `sample_options` for generate.py: click options
declared once, here and in generation.py; the scripts build their CLIs from them with `cli_options`), so a new method
is one plan function, one entry and its options; nothing in the scripts changes.

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
  dps          DPS (Chung et al. 2023): ancestral steps on --dps-steps levels of DDPM's 1000-step grid (default all),
               step zeta --dps-step per RMS residual (--dps-norm norm: per residual norm, as published, where 1.0
               is the paper's). Its prior, and the family's below, is the network
               as a full image denoiser, or for an MSM model MSM's aggregate denoiser: K = --subsets partial
               estimates under the model's training law per evaluation (denoisers.MSMAggregate with the 'shrink'
               fallback; `prior_denoiser`); summary.json records which ('denoiser').
  dds          DDS as published (Chung, Lee, Ye 2023; SEED_METHODS.md 3.3): the ancestral solver with DDIM
               re-noising --dds-eta (0.15) on --dds-steps levels of DDPM's grid (default 50, the paper's NFE), with
               --cg-iters CG iterations (5) of (I + gamma A^H A) x = x0_hat + gamma A^H y (--dds-gamma) on every
               denoised image, carried to the state as DDS's DDIM step does (conditioning.dds law 'ddim').
  zero-filled  A^+ y (MRI: zero-filled coil combination; SR: nearest-neighbour upsampling; inpainting: holes 0).
  cs-tv        MRI only: sigpy total-variation SENSE reconstruction (--cs-tv-lambda 1e-3, --cs-tv-iters 1000 PDHG).
  cs-l1        MRI only: sigpy L1-wavelet SENSE reconstruction (--cs-l1-lambda 1e-3, --cs-l1-iters 500).
               Both defaults are converged (sampling/baselines.py CS_DEFAULTS, bench/cs_convergence.py); the lambda
               and iterations used are written beside the rows.
  ald          Annealed Langevin (Jalal et al. 2021 / SEED_METHODS.md 2) on the geometric ladder --sigma-max,
               --sigma-min, --levels (default 333 x --steps-each 3, about 1000 NFE): steps alpha_i = --ald-step
               x sigma_i^2 (solvers.fraction_step_sizes; --eps: the reference's step at the last level, or NCSNv2's
               criterion), --noise-boost, --sigma-offset, --init; data term --ald-dc annealed
               (A^H (y - A x) / (sigma_y^2 + sigma_i^2) times --dc-boost) or normalized (--dc-norm-weight).
  pc-jalal, pc-dps, pc-projection, pc-dds
               Song et al.'s predictor-corrector (Euler-Maruyama, then --corrector-steps (2) Langevin steps of
               --corrector-step x sigma^2, or Song's --snr rule) on the same ladder, with the conditioning term
               named (sampling/conditioning.py; --pc-dps-step, --dds-gamma, --cg-iters); --start-fraction or
               --start-sigma warm-starts from A^+ y (FBP for CT).
               pc-dps's DPS term corrects the state by -zeta g per evaluation (--pc-dps-law state, PaDIS's law);
               'score' adds -zeta g to the score instead (SEED's), a pull that fades as sigma^2 at the low
               levels, where 20-view CT must fit its data (docs/tuning.md has both on validation).
               pc-dds (DDS's CG inside this ladder, the house's 'dds' before DDS as published) is kept because it
               beats DDS at equal NFE on some exact-Gaussian problems (box inpainting, and MRI and CT at gamma 100).
               pc-projection needs an exact A^+ (not CT). The family's prior is DPS's (the full or the MSM
               aggregate denoiser); each returns its last iterate (--final-denoise: its Tweedie estimate).
  padis        PaDIS's DPS-Langevin solver (SEED_METHODS.md 4.4) on EDM's rho = 7 schedule (--padis-steps,
               --padis-sigma-max, --padis-sigma-min; PaDIS's README: 100, 10, 0.003): --inner-steps iterations per
               level of a DPS step --padis-zeta on ||y - A D(x)|| (per RMS residual; --dps-norm norm: PaDIS's,
               README 0.3) then a Langevin step of
               alpha = --alpha-factor sigma^2, no noise at the last level; starts from A^+ y (FBP for CT) without
               noise as PaDIS's code (--padis-init noise: sigma_max z, as its paper). Prior as DPS's.
  fbp          CT only: filtered back-projection (ramp filter), the classical CT baseline.
Free step parameters left unset take the (method, task) defaults tuned on validation data (`step_default`,
bench/tune_methods.py, docs/tuning.md). The learned methods start their grids inside the model's training range
(training/schedules.py `sigmas_in_training_range`; the log says where and why).
"""

import dataclasses
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import click
import torch
import tqdm

from dnnlib import UserError
from torch_utils.compiling import compile_network
from torch_utils.misc import SeedGenerators
from training import snapshot as checkpoint
from training.classifier import is_classifier
from training.ct import fbp
from training.masks import FullMask, mask_law_from_config, with_acquired_draw
from training.measurements import aggregate_projection, skip_space_of
from training.operators import Identity
from training.patches import patch_prior, use_seeds
from training.sampling.baselines import CS_DEFAULTS, cs_mri, first_estimate, zero_filled
from training.sampling.conditioning import (
    DPS_NORMS,
    DPS_ZETA,
    dds,
    dps,
    jalal,
    jalal_normalized,
    msm_aggregate_step,
    msm_partial_step,
    projection,
)
from training.sampling.denoisers import (
    CountingNetwork,
    MSMAggregate,
    net_denoiser,
    net_partial_denoiser,
    real_view,
    subset_count,
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
    edm_settings,
    generation_calls,
    posterior_subsets,
    sample_ambient,
    sample_edm,
    sample_msm,
)
from training.sampling.generation import msm_settings as msm_generation_settings
from training.sampling.solvers import (
    ALD_INITS,
    ODE,
    OUTER_UPDATES,
    PADIS_INITS,
    Ancestral,
    Langevin,
    PredictorCorrector,
    ald_initial_state,
    ald_step_sizes,
    auto_eps,
    fraction_step_sizes,
    noise_start,
    padis_initial_state,
    padis_solver,
    warm_start,
    warm_start_levels,
)
from training.schedules import (
    EDM_SIGMA_MAX,
    ddpm_sigmas,
    geometric_ladder,
    padis_sigmas,
    respaced_sigmas,
    rho_schedule,
    sigmas_in_training_range,
    training_sigma_max,
    vp_grid_of,
)
from training.tasks import (
    IMAGE_OPERATOR_TASKS,
    TASKS,
    Example,
    MeasurementSet,
    TaskOptions,
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
    """The options of the ALD / predictor-corrector family (validated where their pieces are built: `plan_of`)."""

    sigma_max: float = 50.0
    sigma_min: float = 0.01
    levels: int = 333  # with 3 ALD steps per level, or 1 + 2 PC evaluations per level: about 1000 NFE
    steps_each: int = 3
    ald_step: float | None = None  # eps_i = ald_step sigma_i^2 (solvers.fraction_step_sizes); None: `step_default`
    eps: float | str | None = None  # the reference's: a number, the step at the last level, or 'ncsnv2' (auto_eps)
    noise_boost: float = 1.0
    dc_boost: float | None = None  # the likelihood's weight (ald annealed, pc-jalal); None: `step_default`
    sigma_offset: int = 0
    ald_dc: str = "annealed"
    dc_norm_weight: float = 5.0
    init: str = "noise"
    final_denoise: bool = False
    snr: float | None = None  # Song's corrector rule instead of corrector_step
    corrector_step: float | None = None  # the corrector's eps = corrector_step sigma^2; None: `step_default`
    corrector_steps: int = 2
    start_fraction: float | None = None
    start_sigma: float | None = None
    pc_dps_law: str | None = None  # how pc-dps's term enters: 'state' or 'score'; None: `step_default`
    pc_dps_step: float | None = None  # None: the tuned or general step of the law in use (`family_pieces`)
    dds_gamma: float | None = None  # None: `step_default`
    cg_iters: int = 5


@dataclass(frozen=True)
class PadisOptions:
    """The options of PaDIS's solver (solvers.padis_solver with the dps term's 'state' law); defaults from PaDIS's
    README."""

    steps: int = 100
    sigma_max: float = 10.0
    sigma_min: float = 0.003
    inner_steps: int = 10
    alpha_factor: float = 0.5
    zeta: float | None = None  # None: `step_default` (PaDIS's README: 0.3 with its 'norm' step)
    init: str = "adjoint"


# The free step parameters of the learned methods. A None option takes its default from here: the value tuned for
# the (method, task) on validation data by bench/tune_methods.py (docs/tuning.md says how: the same oracle prior,
# 4 held-out phantoms that the test tables never use, the budget of README's tables), else the method's general one.
# Every rule means the same at every image size and layout (a fraction of sigma^2; DPS per RMS residual), so a value
# tuned at one size carries over; the Langevin fractions also across budgets, DPS-type steps are per level. The
# general ones: the closed-form choice where the method is an exact sampler at dc_boost 1
# (tests/sampling/test_step_rules.py), else between the tuned values of MRI and CT.
PC_DPS_LAWS = ("state", "score")
GENERAL_STEP_DEFAULTS = {
    "ald": {"ald_step": 0.8, "dc_boost": 1.0},
    "pc-jalal": {"corrector_step": 0.8, "dc_boost": 1.0},
    "pc-projection": {"corrector_step": 0.8},
    "pc-dps": {"corrector_step": 0.8, "pc_dps_law": "state", "pc_dps_step": 0.04},
    "pc-dds": {"corrector_step": 0.8, "dds_gamma": 10.0},
    "dds": {"dds_gamma": 0.5},
    "dps": {"dps_step": 0.03},
    "padis": {"padis_zeta": 0.04},
}
# pc-dps's general step per law (its two laws' steps are in different units): the state law's between its MRI and CT
# choices; the score law's between its MRI (270) and CT (3) validation optima.
PC_DPS_GENERAL_STEPS = {"state": GENERAL_STEP_DEFAULTS["pc-dps"]["pc_dps_step"], "score": 30.0}
TUNED_STEP_DEFAULTS = {  # (method, task) -> {parameter: value}: docs/tuning.json's choices
    ("ald", "mri"): {"ald_step": 0.4, "dc_boost": 3.0},
    ("pc-jalal", "mri"): {"corrector_step": 0.1, "dc_boost": 15.0},
    ("dds", "mri"): {"dds_gamma": 0.27},
    ("pc-dds", "mri"): {"dds_gamma": 3.0},
    ("dps", "mri"): {"dps_step": 0.02},
    ("padis", "mri"): {"padis_zeta": 0.01},
    ("pc-dps", "mri"): {"pc_dps_law": "state", "pc_dps_step": 0.02},
    ("pc-projection", "mri"): {"corrector_step": 0.4},
    ("ald", "ct"): {"ald_step": 0.1, "dc_boost": 15.0},
    ("pc-jalal", "ct"): {"corrector_step": 0.1, "dc_boost": 15.0},
    ("dds", "ct"): {"dds_gamma": 0.9},
    ("pc-dds", "ct"): {"dds_gamma": 30.0},
    ("dps", "ct"): {"dps_step": 0.04},
    ("padis", "ct"): {"padis_zeta": 0.16},
    ("pc-dps", "ct"): {"pc_dps_law": "state", "pc_dps_step": 0.16},
    ("ald", "sr"): {"ald_step": 0.1, "dc_boost": 120.0},
    ("pc-jalal", "sr"): {"corrector_step": 0.1, "dc_boost": 120.0},
    ("pc-dps", "sr"): {"pc_dps_law": "score", "pc_dps_step": 30.0},
    ("dds", "sr"): {"dds_gamma": 30.0},
    ("dps", "sr"): {"dps_step": 0.08},
    ("padis", "sr"): {"padis_zeta": 0.16},
    ("pc-dds", "sr"): {"dds_gamma": 1111.11},
    ("pc-projection", "sr"): {"corrector_step": 1.6},
    ("ald", "box"): {"ald_step": 0.4, "dc_boost": 1.0},
    ("pc-jalal", "box"): {"corrector_step": 0.4, "dc_boost": 1.0},
    ("pc-projection", "box"): {"corrector_step": 0.2},
    ("pc-dps", "box"): {"pc_dps_law": "score", "pc_dps_step": 30.0},
    ("pc-dds", "box"): {"dds_gamma": 3703.7},
    ("dds", "box"): {"dds_gamma": 0.27},
    ("dps", "box"): {"dps_step": 0.04},
    ("padis", "box"): {"padis_zeta": 0.08},
}


def step_default(name: str, task: str, parameter: str, given=None):
    """The value of a free step parameter of method `name`: `given` when the user gave one, else the tuned default
    of the (method, task), else the method's general one. Returns (value, where it came from)."""
    if given is not None:
        return given, "given"
    tuned = TUNED_STEP_DEFAULTS.get((name, task), {})
    if parameter in tuned:
        return tuned[parameter], "tuned"
    return GENERAL_STEP_DEFAULTS[name][parameter], "general"


# DDS as published (Chung, Lee, Ye 2023, "Decomposed diffusion sampler"; SEED_METHODS.md 3.3): DDIM on DDPM's
# 1000-step grid respaced to 50 levels (the paper's headline budget, 50 NFE, beside DPS's 1000) with eta 0.15.
DDS_STEPS = 50


DDS_ETA = 0.15  # DDS's DDIM re-noising (Chung, Lee, Ye 2023; SEED_METHODS.md 3.3)


@dataclass
class MethodOptions:
    msm_steps: int
    num_subsets: int
    dc_step: float
    eta: float
    outer: str
    dps_steps: int
    dps_step: float | None  # None: `step_default`
    cs: dict  # regulariser -> {'lamda': ..., 'max_iter': ...}
    family: FamilyOptions = FamilyOptions()
    padis: PadisOptions = PadisOptions()
    sample_accel: float | None = None  # R of the MSM model's line masks at sampling; None: the training law's
    acquired_draw: str | None = None  # acquired-mask models: 'frequencies' or 'masks' (masks.AcquiredMaskLaw)
    msm_solver: str = "ancestral"  # 'ancestral' (the ancestral solver on the VP-200 levels) or 'heun' (EDM's ODE)
    vp_grid: str | None = None  # rule of the VP-200 levels ('ddim' / 'section'); None: the snapshot's (vp_grid_of)
    dds_steps: int = DDS_STEPS  # dds: levels of DDPM's grid
    dds_eta: float = DDS_ETA  # dds: DDIM eta
    dps_norm: str = "rms"  # dps, pc-dps, padis: the DPS step per RMS residual, or DPS's per residual norm


@dataclass
class Run:
    """What a method needs: the model (None for baselines), the task, the options, where to compute, and whether
    this process shows progress. `plans` keeps each learned method's pieces, built once (`plan_of`)."""

    model: Model | None
    task: TaskOptions
    options: MethodOptions
    device: torch.device
    show_progress: bool = False
    plans: dict = field(default_factory=dict)


def stack(examples: list[Example], field_name: str, device):
    values = [getattr(e, field_name) for e in examples]
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
    (schedules.vp_grid_of: the reference's ddim200 where it records none)."""
    return run.options.vp_grid or vp_grid_of(run.model.loss_config)


def msm_sigmas(run: Run) -> tuple[torch.Tensor, str]:
    return sigmas_in_training_range(respaced_sigmas(run.options.msm_steps, msm_grid_rule(run)),
                                    run.model.loss_config)


HEUN_SIGMA_MIN, HEUN_RHO = 0.002, 7.0  # EDM's rho grid (Karras et al. 2022, Table 1)


# ----------------------------------------------------------------------------
# A learned method is an assembly of the four pieces (training/sampling/__init__.py): a prior denoiser, its
# conditioning term, a solver and its grid, and an initial state. `plan_of` builds the pieces that depend on the
# options only (solver, grid, and the term's options, checked by building it), once per run and before anything is
# written; `run_plan` adds what depends on the batch (the operator, y, the seeds) and runs the solver.


@dataclass
class Batch:
    """One batch of (example, seed) pairs on the device."""

    operator: object  # the task's A of the batch (MRI: T = F S; its line mask is `mask`)
    y: torch.Tensor
    mask: torch.Tensor | None  # MRI's line mask (the image operators hold their masks)
    sigma_y: torch.Tensor | float  # (N, 1, 1, 1) float64 per-example noise std, or 0.0 where none is recorded
    gen: SeedGenerators
    shape: tuple  # (N, C, H, W) of the images

    def estimate(self, task: str) -> torch.Tensor:
        return first_estimate(task, self.operator, self.y).to(torch.float64)


def batch_of(run: Run, examples: list[Example], seeds: list[int]) -> Batch:
    device, net = run.device, run.model.net
    y, mask, maps = stack(examples, "y", device), stack(examples, "mask", device), stack(examples, "maps", device)
    sigma_y = stack(examples, "sigma_y", device)
    operator = task_operator(run.task, net.img_resolution, mask, maps, device)
    return Batch(operator, y, mask if run.task.task == "mri" else None,
                 0.0 if sigma_y is None else sigma_y.to(torch.float64).reshape(-1, 1, 1, 1),
                 SeedGenerators(seeds, device=device),
                 (len(seeds), net.out_channels, net.img_resolution, net.img_resolution))


def noise_latents(run: Run, batch: Batch, sigmas) -> torch.Tensor:
    """sigmas[0] times standard normal images from the seeds (float64)."""
    return noise_start(batch.gen.randn(batch.shape, dtype=torch.float64), sigmas[0].item())


@dataclass
class Plan:
    """A learned method's pieces. denoiser(run, batch) -> (D, callback): the prior (`prior_denoiser`, or MSM's
    aggregate with its data-consistency steps) and what the solver reports its estimates to; term(batch) -> the
    conditioning term or None; start(run, batch, sigmas) -> the state at sigmas[0]; finish maps the solver's output
    to images. The run's NFE is the solver's own count on its grid (`evaluations`)."""

    solver: object
    sigmas: torch.Tensor
    schedule: str  # how the grid was chosen (the log and summary.json)
    start: Callable
    term: Callable = lambda batch: None
    denoiser: Callable = None
    finish: Callable = lambda out, batch: out
    settings: dict = field(default_factory=dict)

    def evaluations(self) -> int:
        return self.solver.evaluations(self.sigmas)


def run_plan(name: str, run: Run, examples: list[Example], seeds: list[int]) -> torch.Tensor:
    """One posterior sample per (example, seed) of a learned method -> images (B, C, H, W)."""
    plan, batch = plan_of(name, run), batch_of(run, examples, seeds)
    with torch.no_grad():  # DPS's terms take their gradient under torch.enable_grad
        denoiser, callback = (plan.denoiser or prior_denoiser)(run, batch)
        x = plan.start(run, batch, plan.sigmas)
        out = plan.solver(denoiser, x, batch.gen, plan.sigmas.to(run.device), conditioning=plan.term(batch),
                          callback=callback)
        return plan.finish(out, batch)


def prior_denoiser(run: Run, batch: Batch):
    """The prior as the image denoiser D(x, sigma) of DPS, DDS, PaDIS and the ALD / predictor-corrector family: the
    network itself for a model trained on clean data (one network call per evaluation); for an MSM model, MSM's
    aggregate of K = --subsets partial estimates under its training law (one batched call on K copies of the batch),
    in the model's measurement space (MRI: the task's T = F S; images: T = I), with the 'shrink' fallback (solvers
    call it at arbitrary levels and differentiate through it)."""
    net, law = run.model.net, sampling_law(run)
    if law.kind == "full":
        return net_denoiser(net, mask_channel="full"), None
    operator = batch.operator if run.model.kind == "mri" else Identity()
    partial = net_partial_denoiser(net, operator, skip_space=skip_space_of(run.model.loss_config))
    return MSMAggregate(partial, law, batch.gen, run.options.num_subsets, fallback="shrink", operator=operator), None


def prior_denoiser_settings(run: Run) -> dict:
    if run.model.mask_law.kind == "full":
        return {"denoiser": "full"}
    return {"denoiser": "msm-aggregate", "K": run.options.num_subsets, "mask_law": sampling_law(run).to_config()}


def plan_of(name: str, run: Run) -> Plan:
    """The pieces of a learned method for this run, built (and so checked: one sentence per bad option) once."""
    if name not in run.plans:
        run.plans[name] = PLANS[name](run)
    return run.plans[name]


def msm_plan(run: Run) -> Plan:
    """MSM posterior sampling: the ancestral solver (or Heun's ODE) driving MSM's aggregate of the model's partial
    estimates, with MSM's data-consistency step on every partial estimate in k-space (MRI) or on the aggregate
    (images, a conditioning term); uncovered entries keep the estimate the solver last used (`remember`)."""
    o, mri = run.options, run.task.task == "mri"
    law, skip_space = sampling_law(run), skip_space_of(run.model.loss_config)
    dc_step = o.dc_step
    msm_partial_step(None, None, dc_step)  # the step's constructor checks lambda
    subsets = subset_count(o.num_subsets, law)
    if o.msm_solver == "heun":
        sigma_max = min(EDM_SIGMA_MAX, training_sigma_max(run.model.loss_config)[0])
        solver, sigmas = ODE("heun"), rho_schedule(o.msm_steps, HEUN_SIGMA_MIN, sigma_max, HEUN_RHO)
        schedule = (f"EDM rho {HEUN_RHO:g} grid, {o.msm_steps} Heun steps from sigma {sigma_max:.3g} to "
                    f"{HEUN_SIGMA_MIN:g}, no churn")
        settings = {"K": subsets, "dc_step": dc_step, "solver": "heun", "steps": o.msm_steps, "sigma_max": sigma_max,
                    "schedule": schedule, "skip_space": skip_space}
    else:
        solver, (sigmas, schedule) = Ancestral(o.eta, o.outer, precision="single"), msm_sigmas(run)
        settings = {"K": subsets, "dc_step": dc_step, "eta": o.eta, "outer": o.outer, "levels": len(sigmas),
                    "sigma_max": sigmas[0].item(), "schedule": schedule, "vp_grid": msm_grid_rule(run),
                    "skip_space": skip_space}
    if o.sample_accel is not None and law.kind != "full":
        settings["sample_R"] = o.sample_accel
    if run.model.mask_law.kind == "acquired":
        settings["acquired_draw"] = law.draw
    # Heun's ODE steps complex k-space as its real view; MSM's sampler keeps single-precision states.
    real = mri and o.msm_solver == "heun"
    precision = "double" if o.msm_solver == "heun" else "single"

    def denoiser(run, batch):
        operator = batch.operator if mri else Identity()
        aggregate = MSMAggregate(net_partial_denoiser(run.model.net, operator, skip_space=skip_space if mri else
                                                      "image"), law, batch.gen, o.num_subsets,
                                 partial_step=msm_partial_step(batch.y, batch.mask, dc_step) if mri else None,
                                 project=aggregate_projection(skip_space, operator) if mri else None)
        if real:  # the solver's estimates are real views; the aggregate keeps its own as the fallback
            return real_view(aggregate), None
        return aggregate, aggregate.remember

    def start(run, batch, sigmas):
        if mri:  # the measurement-space state: complex k-space with N(0, 1) real and imaginary parts (MSM.md 1)
            x = noise_start(torch.view_as_complex(batch.gen.randn([*batch.y.shape, 2], dtype=torch.float64)),
                            sigmas[0].item(), precision)
            return torch.view_as_real(x) if real else x
        return noise_start(batch.gen.randn(batch.shape, dtype=torch.float64), sigmas[0].item(), precision)

    def finish(out, batch):
        if not mri:
            return out
        z_hat = torch.view_as_complex(out.contiguous()) if real else out
        return batch.operator.pinv(z_hat.to(torch.complex64))

    term = (lambda batch: None) if mri else (lambda batch: msm_aggregate_step(batch.operator, batch.y, dc_step))
    return Plan(solver, sigmas, schedule, start, term, denoiser, finish, settings)


def dps_plan(run: Run) -> Plan:
    """DPS: the ancestral solver at eta 1 (float64 state and noise) with the dps term's 'ddpm' law (Chung et al.'s
    step), its zeta per RMS residual by default (--dps-norm norm: per residual norm, as published)."""
    o = run.options
    zeta, source = step_default("dps", run.task.task, "dps_step", o.dps_step)
    dps(None, None, zeta=zeta, law="ddpm", norm=o.dps_norm)  # the term's constructor checks zeta
    sigmas, schedule = sigmas_in_training_range(ddpm_sigmas(o.dps_steps), run.model.loss_config)
    return Plan(Ancestral(eta=1.0, precision="double", noise="state"), sigmas, schedule, start=noise_latents,
                term=lambda batch: dps(batch.operator, batch.y, batch.mask, zeta=zeta, law="ddpm", norm=o.dps_norm),
                settings={"zeta": zeta, "zeta_default": source, "norm": o.dps_norm, "levels": len(sigmas),
                          "sigma_max": sigmas[0].item(), "schedule": schedule, **prior_denoiser_settings(run)})


def dds_plan(run: Run) -> Plan:
    """DDS as published (SEED_METHODS.md 3.3): the ancestral solver with DDIM re-noising (--dds-eta, 0.15) on
    --dds-steps levels of DDPM's grid, and the dds term (--cg-iters CG iterations on the denoised image)."""
    o, f = run.options, run.options.family
    gamma, source = step_default("dds", run.task.task, "dds_gamma", f.dds_gamma)
    dds(None, None, gamma=gamma, cg_iters=f.cg_iters)  # the term's constructor checks its options
    sigmas, schedule = sigmas_in_training_range(ddpm_sigmas(o.dds_steps), run.model.loss_config)
    return Plan(Ancestral(eta=o.dds_eta, outer="ddim", precision="double", noise="state"), sigmas, schedule,
                start=noise_latents,
                term=lambda batch: dds(batch.operator, batch.y, batch.mask, gamma=gamma, cg_iters=f.cg_iters,
                                       law="ddim"),
                settings={"gamma": gamma, "gamma_default": source, "cg_iters": f.cg_iters, "eta": o.dds_eta,
                          "levels": len(sigmas), "sigma_max": sigmas[0].item(), "schedule": schedule,
                          **prior_denoiser_settings(run)})


def family_pieces(name: str, f: FamilyOptions, task: str, sigmas: torch.Tensor, dps_norm: str = "rms"):
    """The solver, the conditioning term (batch -> term) and the settings of an ALD / predictor-corrector method on
    the ladder `sigmas`, every free step parameter resolved (`step_default`). The registry's assembly, also what the
    closed-form tests of the defaults drive (tests/sampling/test_step_rules.py)."""
    settings = {}

    def default(method, parameter, given):
        value, source = step_default(method, task, parameter, given)
        settings.update({parameter: value, f"{parameter}_default": source})
        return value

    if name == "ald" and f.ald_dc == "normalized":
        term = lambda b: jalal_normalized(b.operator, b.y, b.mask, weight=f.dc_norm_weight)  # noqa: E731
    elif name in ("ald", "pc-jalal"):
        boost = default(name, "dc_boost", f.dc_boost)
        term = lambda b: jalal(b.operator, b.y, b.mask, sigma_y=b.sigma_y, scale=boost)  # noqa: E731
    elif name == "pc-dps":
        law = default(name, "pc_dps_law", f.pc_dps_law)
        if law not in PC_DPS_LAWS:
            raise UserError(f"--pc-dps-law must be one of {', '.join(PC_DPS_LAWS)}, got {law!r}.")
        tuned = TUNED_STEP_DEFAULTS.get((name, task), {})
        if f.pc_dps_step is not None:
            zeta, source = f.pc_dps_step, "given"
        elif "pc_dps_step" in tuned and tuned.get("pc_dps_law") == law:
            zeta, source = tuned["pc_dps_step"], "tuned"
        else:  # no step tuned for this law here (a step tuned for the other law is in another unit)
            zeta, source = PC_DPS_GENERAL_STEPS[law], "general"
        settings.update(pc_dps_step=zeta, pc_dps_step_default=source)
        term = lambda b: dps(b.operator, b.y, b.mask, zeta=zeta, law=law, norm=dps_norm)  # noqa: E731
        settings["norm"] = dps_norm
    elif name == "pc-projection":
        term = lambda b: projection(b.operator, b.y, b.mask)  # noqa: E731
    else:
        gamma = default(name, "dds_gamma", f.dds_gamma)
        term = lambda b: dds(b.operator, b.y, b.mask, gamma=gamma, cg_iters=f.cg_iters, law="estimate")  # noqa: E731
        settings["cg_iters"] = f.cg_iters
    if name != "pc-projection":  # the term's constructor checks its options (projection has none)
        term(Batch(None, None, None, 0.0, None, ()))
    if name == "ald":
        if not 0 <= f.sigma_offset < f.levels:
            raise UserError(f"--sigma-offset must be in 0..{f.levels - 1} (levels of the ALD ladder to skip), "
                            f"got {f.sigma_offset}.")
        offset = min(f.sigma_offset, len(sigmas) - 1)  # the ladder may lose its top to the training range
        if f.eps is None:
            steps = fraction_step_sizes(sigmas, default(name, "ald_step", f.ald_step))
        elif f.ald_step is not None:
            raise UserError("Give either --ald-step (a fraction of sigma^2) or --eps (the reference's rule), not both.")
        else:
            eps = auto_eps(sigmas, f.steps_each) if f.eps == "ncsnv2" else f.eps
            steps = ald_step_sizes(sigmas, eps)
            settings.update(eps=eps, eps_rule="NCSNv2" if f.eps == "ncsnv2" else "given")
        settings.update(steps_each=f.steps_each, noise_boost=f.noise_boost, sigma_offset=f.sigma_offset,
                        dc=f.ald_dc, init=f.init)
        if f.ald_dc == "normalized":
            settings["dc_norm_weight"] = f.dc_norm_weight
        return Langevin(steps, f.steps_each, f.noise_boost, offset, final_denoise=f.final_denoise), term, settings
    if f.snr is None:
        corrector_step = default(name, "corrector_step", f.corrector_step)
    else:
        corrector_step = None
        if f.corrector_step is not None:
            raise UserError("Give either --corrector-step (a fraction of sigma^2) or --snr (Song's rule), not both.")
        if name == "pc-dps" and settings["pc_dps_law"] == "state":
            raise UserError("--snr gives the corrector no weight of x0_hat in its step, which --pc-dps-law state "
                            "needs; use --corrector-step or --pc-dps-law score.")
        settings["snr"] = f.snr
    settings.update(corrector_steps=f.corrector_steps, start_fraction=f.start_fraction, start_sigma=f.start_sigma)
    rule = {"corrector_step": corrector_step} if f.snr is None else {"snr": f.snr}
    solver = PredictorCorrector(corrector_steps=f.corrector_steps, final_denoise=f.final_denoise, **rule)
    return solver, term, settings


def family_plan(name: str):
    """ALD (the Langevin solver on the --sigma-max/--sigma-min/--levels ladder, Jalal's data term) or the
    predictor-corrector solver on the same ladder with the term the name says; the prior is `prior_denoiser`'s."""

    def plan(run: Run) -> Plan:
        f = run.options.family
        sigmas, schedule = sigmas_in_training_range(geometric_ladder(f.sigma_max, f.sigma_min, f.levels),
                                                    run.model.loss_config)
        if name != "ald":
            sigmas = warm_start_levels(sigmas, start_sigma=f.start_sigma, fraction=f.start_fraction)
        solver, term, pieces = family_pieces(name, f, run.task.task, sigmas, run.options.dps_norm)
        settings = {"levels": len(sigmas), "sigma_max": sigmas[0].item(), "sigma_min": sigmas[-1].item(),
                    "final_denoise": f.final_denoise, "schedule": schedule, **pieces, **prior_denoiser_settings(run)}
        if name == "ald":
            offset = solver.offset

            def start(run, batch, sigmas):
                return ald_initial_state(f.init, batch.shape, batch.gen, sigmas[offset].item(),
                                         batch.estimate(run.task.task))

            return Plan(solver, sigmas, schedule, start, term, settings=settings)
        warm = f.start_fraction is not None or f.start_sigma is not None

        def start(run, batch, sigmas):
            if not warm:
                return noise_latents(run, batch, sigmas)
            return warm_start(batch.estimate(run.task.task), sigmas, batch.gen)[0]

        return Plan(solver, sigmas, schedule, start, term, settings=settings)

    return plan


def padis_plan(run: Run) -> Plan:
    """PaDIS: the Langevin solver with PaDIS's step rule (`padis_solver`) and the dps term's 'state' law, starting
    from A^+ y (FBP for CT) without noise or (--padis-init noise) sigma_max z."""
    p = run.options.padis
    zeta, source = step_default("padis", run.task.task, "padis_zeta", p.zeta)
    dps(None, None, zeta=zeta, law="state", norm=run.options.dps_norm)  # the term's constructor checks zeta
    sigmas, schedule = sigmas_in_training_range(padis_sigmas(p.steps, p.sigma_min, p.sigma_max),
                                                run.model.loss_config)

    def start(run, batch, sigmas):
        return padis_initial_state(p.init, batch.estimate(run.task.task), batch.gen, sigmas[0].item())

    norm = run.options.dps_norm
    return Plan(padis_solver(sigmas, p.inner_steps, p.alpha_factor), sigmas, schedule, start,
                term=lambda b: dps(b.operator, b.y, b.mask, zeta=zeta, law="state", norm=norm),
                settings={"levels": len(sigmas), "sigma_max": sigmas[0].item(), "sigma_min": sigmas[-1].item(),
                          "rho": 7, "inner_steps": p.inner_steps, "alpha_factor": p.alpha_factor, "zeta": zeta,
                          "zeta_default": source, "norm": norm, "init": p.init, "schedule": schedule,
                          **prior_denoiser_settings(run)})


FAMILY = ("ald", "pc-jalal", "pc-dps", "pc-projection", "pc-dds")
PLANS = {"msm": msm_plan, "dps": dps_plan, "dds": dds_plan, "padis": padis_plan,
         **{name: family_plan(name) for name in FAMILY}}


def parse_eps(value: str | None):
    """--eps: None, 'ncsnv2', or a number."""
    if value is None or value == "ncsnv2":
        return value
    try:
        return float(value)
    except ValueError:
        raise UserError(f"--eps must be a number (the ALD step at the last level) or 'ncsnv2', got {value!r}."
                        ) from None


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
    click.option("--ald-step", type=float, default=None,
                 help="ALD: Langevin step eps_i = this x sigma_i^2, in (0, 2)  [default: tuned per task]"),
    click.option("--eps", default=None,
                 help="ALD: the reference's rule instead, the step at the last level (a number), or 'ncsnv2' "
                      "(NCSNv2's criterion; it shrinks as --steps-each grows)"),
    click.option("--noise-boost", type=float, default=FamilyOptions.noise_boost, show_default=True,
                 help="ALD: noise power (1: correct temperature; 0.5: the reference's complex noise)"),
    click.option("--dc-boost", type=float, default=None,
                 help="ALD (annealed) and pc-jalal: weight of the likelihood term (1: the likelihood itself; above 1 a "
                      "tempered posterior)  [default: tuned per method and task]"),
    click.option("--sigma-offset", type=int, default=FamilyOptions.sigma_offset, show_default=True,
                 help="ALD: highest levels skipped"),
    click.option("--ald-dc", type=click.Choice(("annealed", "normalized")), default=FamilyOptions.ald_dc,
                 show_default=True, help="ALD data term: A^H (y - A x) / (sigma_y^2 + sigma^2), or Jalal's code's"),
    click.option("--dc-norm-weight", type=float, default=FamilyOptions.dc_norm_weight, show_default=True,
                 help="ALD normalized: data step / score norm"),
    click.option("--init", type=click.Choice(ALD_INITS), default=FamilyOptions.init, show_default=True,
                 help="ALD start (adjoint: A^+ y, FBP for CT)"),
    click.option("--final-denoise", is_flag=True, help="ALD/PC: return the Tweedie estimate of the last iterate"),
    click.option("--corrector-step", type=float, default=None,
                 help="PC: corrector Langevin step eps = this x sigma^2, in (0, 2)  [default: tuned per method and "
                      "task]"),
    click.option("--snr", type=float, default=None,
                 help="PC: Song et al.'s corrector rule instead, eps = 2 (snr ||z|| / ||score||)^2 per example (0.16 "
                      "in their paper; it depends on the image size through the norms)"),
    click.option("--corrector-steps", type=int, default=FamilyOptions.corrector_steps, show_default=True,
                 help="PC: Langevin corrector steps per level"),
    click.option("--start-fraction", type=float, default=None,
                 help="PC: warm start from A^+ y (FBP for CT) this fraction down the ladder [default: from noise]"),
    click.option("--start-sigma", type=float, default=None,
                 help="PC: warm start from A^+ y (FBP for CT) at the first level <= this sigma"),
    click.option("--pc-dps-step", type=float, default=None,
                 help="pc-dps: zeta of the DPS term, g = grad ||y - A x0_hat|| per RMS residual (--dps-norm): the "
                      "state moves by -zeta g per evaluation (--pc-dps-law state) or the score by -zeta g ('score')  "
                      "[default: tuned per task and law, else 0.04 (state) / 30 (score)]"),
    click.option("--pc-dps-law", type=click.Choice(PC_DPS_LAWS), default=None,
                 help="pc-dps: the DPS term corrects the state (PaDIS's law; fits ill-conditioned data such as "
                      "20-view CT) or adds to the score (SEED's; its pull fades as sigma^2 at the low levels)  "
                      "[default: tuned per task, else state]"),
    click.option("--dds-gamma", type=float, default=None,
                 help="dds, pc-dds: gamma of the CG step (I + gamma A^H A) x = x0_hat + gamma A^H y  [default: tuned "
                      "per method and task]"),
    click.option("--cg-iters", type=int, default=FamilyOptions.cg_iters, show_default=True,
                 help="dds, pc-dds: CG iterations (the DDS paper's 5)"),
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
    click.option("--padis-zeta", type=float, default=None,
                 help="padis: DPS step zeta on the unsquared ||y - A D(x)|| (per RMS residual: --dps-norm)  [default: "
                      "tuned per task; PaDIS's README: 0.3 with --dps-norm norm]"),
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
    click.option("--dps-step", type=float, default=None,
                 help=f"DPS: step zeta (per RMS residual: --dps-norm)  [default: tuned per task; the paper's "
                      f"{DPS_ZETA:g} with --dps-norm norm]"),
    click.option("--dps-norm", type=click.Choice(DPS_NORMS), default="rms", show_default=True,
                 help="dps, pc-dps, padis: the step per RMS residual (the same at every image size), or per residual "
                      "norm as DPS's and PaDIS's code (smaller per pixel on larger images)"),
)
DDS_OPTIONS = (
    click.option("--dds-steps", type=click.IntRange(min=2, max=1000), default=DDS_STEPS, show_default=True,
                 help="dds: levels of DDPM's 1000-step grid, one network call each (the DDS paper's budget is 50 "
                      "NFE; those above the model's training range are dropped)"),
    click.option("--dds-eta", type=click.FloatRange(min=0, max=1), default=DDS_ETA, show_default=True,
                 help="dds: DDIM re-noising eta (the DDS paper's 0.15)"),
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
OPTION_GROUPS = (FAMILY_OPTIONS, PADIS_OPTIONS, SUBSETS_OPTIONS, MSM_OPTIONS, DPS_OPTIONS, DDS_OPTIONS, CS_TV_OPTIONS,
                 CS_L1_OPTIONS,
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


def learned(name: str, tasks: tuple, options: tuple, **sampler) -> Method:
    """A learned posterior method: its pieces (`PLANS`) run by `run_plan`; its settings and NFE are its plan's."""
    return Method(lambda run, examples, seeds: run_plan(name, run, examples, seeds), tasks,
                  settings=lambda run: plan_of(name, run).settings,
                  network_calls=lambda run: plan_of(name, run).evaluations(), options=options, **sampler)


SAMPLER_GROUPS = (GUIDANCE_OPTIONS, EDM_OPTIONS, SAMPLER_OPTIONS)
METHODS = {
    "edm": Method(sample=sample_edm, sample_calls=generation_calls, sample_settings=edm_settings,
                  sample_options=(*SAMPLER_GROUPS, BRIDGE_OPTIONS)),
    "msm": learned("msm", IMAGE_OPERATOR_TASKS, (SUBSETS_OPTIONS, MSM_OPTIONS), sample=sample_msm,
                   sample_calls=generation_calls, sample_settings=msm_generation_settings,
                   sample_options=SAMPLER_GROUPS),
    "dps": learned("dps", TASKS, (SUBSETS_OPTIONS, MSM_OPTIONS, DPS_OPTIONS)),
    "dds": learned("dds", TASKS, (SUBSETS_OPTIONS, MSM_OPTIONS, DDS_OPTIONS, FAMILY_OPTIONS)),
    **{name: learned(name, IMAGE_OPERATOR_TASKS if name == "pc-projection" else TASKS,
                     (SUBSETS_OPTIONS, MSM_OPTIONS, FAMILY_OPTIONS)) for name in FAMILY},
    "padis": learned("padis", TASKS, (SUBSETS_OPTIONS, MSM_OPTIONS, PADIS_OPTIONS)),
    "zero-filled": Method(run_zero_filled, IMAGE_OPERATOR_TASKS, needs_model=False, seeded=False,
                          settings=lambda run: {}),
    "fbp": Method(run_fbp, ("ct",), needs_model=False, seeded=False, settings=lambda run: {"filter": "ramp"}),
    "cs-tv": Method(cs_method("tv"), ("mri",), needs_model=False, seeded=False,
                    settings=lambda run: dict(run.options.cs["tv"]), options=(CS_TV_OPTIONS,)),
    "cs-l1": Method(cs_method("l1-wavelet"), ("mri",), needs_model=False, seeded=False,
                    settings=lambda run: dict(run.options.cs["l1-wavelet"]), options=(CS_L1_OPTIONS,)),
    "ambient": Method(sample=sample_ambient, sample_calls=generation_calls, sample_settings=ambient_settings,
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
    """The options of every method from the parsed CLI options `o` (the names of the groups above). The learned
    methods' options are checked where their pieces are built (`plan_of`: reconstruct.py asks every chosen method
    for its settings before anything is written)."""
    names = [f.name for f in dataclasses.fields(FamilyOptions)]
    family = FamilyOptions(**{k: parse_eps(o[k]) if k == "eps" else o[k] for k in names})
    padis = PadisOptions(o["padis_steps"], o["padis_sigma_max"], o["padis_sigma_min"], o["inner_steps"],
                         o["alpha_factor"], o["padis_zeta"], o["padis_init"])
    cs = {"tv": dict(CS_DEFAULTS["tv"]), "l1-wavelet": dict(CS_DEFAULTS["l1-wavelet"])}
    for regulariser, flag in (("tv", "tv"), ("l1-wavelet", "l1")):
        lamda, iters = o[f"cs_{flag}_lambda"], o[f"cs_{flag}_iters"]
        if lamda is not None and not lamda > 0:
            raise UserError(f"--cs-{flag}-lambda must be > 0, got {lamda}.")
        cs[regulariser].update({k: v for k, v in (("lamda", lamda), ("max_iter", iters)) if v is not None})
    dc_step = o["dc_step"] if o["dc_step"] is not None else (2.0 if task == "mri" else 1.75)
    return MethodOptions(msm_steps=o["num_steps"], num_subsets=o["num_subsets"] or posterior_subsets(task),
                         dc_step=dc_step, eta=o["eta"], outer=o["outer"], dps_steps=o["dps_steps"],
                         dps_step=o["dps_step"], cs=cs, family=family, padis=padis, sample_accel=o["sample_accel"],
                         acquired_draw=o["acquired_draw"], msm_solver=o["msm_solver"], vp_grid=o["vp_grid"],
                         dds_steps=o["dds_steps"], dds_eta=o["dds_eta"], dps_norm=o["dps_norm"])


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
