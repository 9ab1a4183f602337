"""What train.py makes of its options: the training options dict of a run (network, preconditioning, loss,
measurement process, optimizer, patches, classifier), its description, and the run directory it continues or
starts (EDM's layout; a continuation with options that change the result is refused, naming them)."""

import json
import os
import re

import torch

from dnnlib import EasyDict, UserError
from torch_utils.compiling import check_compiler
from torch_utils.misc import parse_int_list
from training import masks
from training import snapshot as checkpoint
from training.lr_schedules import schedule_options
from training.power_ema import parse_profiles

# Options that may change between the start of a run and its continuation without changing what is computed
# (or that only extend it).
RESUME_MAY_DIFFER = {
    "total_kimg", "kimg_per_tick", "snapshot_ticks", "state_dump_ticks", "workers", "batch_gpu", "desc", "world_size",
    "compile",
}


# Options of the measurement process (--loss msm / ambient); None / False means "not given".
MEASUREMENT_OPTIONS = ("mask", "p", "accel", "acs", "center_fraction", "sigma_y", "protocol", "mask_seed",
                       "sigma_dist", "vp_grid", "sure_tau", "sure_weight", "pseudo_clean_grad", "ambient_delta",
                       "mask_channel", "skip_space")
LAW_PARAMETERS = {"box": ("p",), "pixel": ("p",), "lines-random": ("accel", "acs"),
                  "lines-equispaced": ("accel", "acs"), "fastmri-random": ("accel", "center_fraction"),
                  "fastmri-equispaced": ("accel", "center_fraction"), "full": ()}


def mask_config(opts: EasyDict, kind: str, width: int) -> dict:
    """--mask/--p/--accel/--acs/--center-fraction -> a mask-law config; what is not given takes the defaults of every
    tool (training/masks.py: the law DEFAULT_LAW of the data kind, MASK_DEFAULTS, `default_acs`)."""
    law = opts.mask or masks.DEFAULT_LAW[kind]
    stray = [f"--{n.replace('_', '-')}" for n in ("p", "accel", "acs", "center_fraction")
             if opts[n] is not None and n not in LAW_PARAMETERS[law]]
    if stray:
        raise UserError(f"{', '.join(stray)} do not apply to --mask {law}.")
    return masks.mask_config(law, width, {"p": opts.p, "R": opts.accel, "acs": opts.acs,
                                          "center_fraction": opts.center_fraction})


def noise_level_options(opts: EasyDict, c: EasyDict):
    """--p-mean / --p-std: the log-normal training noise levels ln sigma ~ N(P_mean, P_std^2) of EDM's loss, of the
    MSM and Ambient losses with --sigma-dist lognormal and of a noise-aware classifier. Recorded only when given, so
    runs started before the options existed still continue (and their snapshots read EDM's -1.2 / 1.2)."""
    given = {name: value for name, value in (("P_mean", opts.p_mean), ("P_std", opts.p_std)) if value is not None}
    if not given:
        return
    name = c.loss_kwargs["class_name"].rsplit(".", 1)[-1]
    if name in ("VPLoss", "VELoss"):
        raise UserError(f"--p-mean / --p-std set EDM's log-normal noise levels; --precond {opts.precond} draws its "
                        "own (use --precond edm).")
    if c.loss_kwargs.get("sigma_dist", "lognormal") != "lognormal":
        raise UserError("--p-mean / --p-std set the log-normal noise levels; they do not apply to --sigma-dist "
                        f"{c.loss_kwargs['sigma_dist']}.")
    # The ranges a snapshot's loss config may hold (training/snapshot.py), so a run never writes one it cannot read.
    if "P_mean" in given and not -20 <= given["P_mean"] <= 20:
        raise UserError(f"--p-mean must be in [-20, 20] (a log noise level), got {given['P_mean']:g}.")
    if "P_std" in given and not 0 < given["P_std"] <= 20:
        raise UserError(f"--p-std must be in (0, 20], got {given['P_std']:g}.")
    c.loss_kwargs.update(given)


def build_options(opts: EasyDict, world_size: int) -> EasyDict:
    """Click options -> the options dict of the run (what training_options.json records). Validates everything."""
    from training.measurements import measurement_config_for
    from training.networks import network_kwargs_for
    from training.patches import position_channels
    from training.training_loop import DATASETS, LOSSES, build

    c = EasyDict()
    base_kwargs = dict(class_name="training.dataset.open_dataset", path=opts.data,
                       use_labels=opts.cond or opts.kind == "classifier", xflip=opts.xflip, max_size=opts.max_size)
    try:
        dataset = build(base_kwargs, DATASETS)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"--data {opts.data} could not be loaded as a dataset: {e}") from e
    desc = dataset.describe()
    label_dim = desc.get("label_dim", 0)
    if opts.cond and label_dim == 0:
        raise UserError(f"--cond was given but --data {opts.data} has no labels.")
    if desc["kind"] == "mri":
        if desc["shape"][0] != desc["shape"][1]:
            raise UserError(f"--data {opts.data} holds {desc['shape'][0]}x{desc['shape'][1]} slices; the networks "
                            "need square images.")
        shape = [2, *desc["shape"]]  # the complex coil-combined image as (re, im) channels
    else:
        shape = desc["image_shape"]

    if opts.balanced and (label_dim == 0 or not hasattr(dataset, "get_label")):
        raise UserError(f"--balanced needs labelled images (--cond or --kind classifier), but --data {opts.data} "
                        "gives none.")
    if opts.val_data is not None and opts.kind != "classifier":
        raise UserError("--val-data applies to --kind classifier only.")
    if opts.balanced:  # recorded only when on, so runs started before the option existed still continue
        c.balanced = True

    c.measurement, extra_in_channels, precond = None, 0, opts.precond
    if opts.kind == "classifier":
        classifier_options(opts, c, base_kwargs, desc, shape)
    elif opts.loss == "edm":
        given = [f"--{name.replace('_', '-')}" for name in MEASUREMENT_OPTIONS if opts[name] not in (None, False)]
        if given:
            raise UserError(f"{', '.join(given)} only apply to --loss msm or ambient, not to --loss edm.")
        if desc["kind"] == "mri" and not desc["fully_sampled"]:
            raise UserError(f"--loss edm needs fully sampled data, but --data {opts.data} holds undersampled "
                            "measurements (use --loss msm or ambient).")
        c.dataset_kwargs = base_kwargs
        c.loss_kwargs = dict(class_name={"edm": "training.loss.EDMLoss", "vp": "training.loss.VPLoss",
                                         "ve": "training.loss.VELoss"}[opts.precond])
    else:
        measurement = measurement_config_for(dataset, mask_config(opts, desc["kind"], shape[-1]),
                                             sigma_y=0.0 if opts.sigma_y is None else opts.sigma_y,
                                             protocol=opts.protocol or "fixed", seed=opts.mask_seed or 0)
        measurement.law.sample(1, tuple(shape[1:]), torch.Generator())  # rejects a law that does not fit the data
        if desc["kind"] == "mri" and desc["fully_sampled"]:
            # The records were scaled on their normalisation's centre lines; a mask without all of them would make
            # the scale read lines the training data never measure.
            used, kept = desc["normalisation"]["acs"], measurement.law.centre_lines(shape[-1])
            if kept < used:
                raise UserError(f"--mask {measurement.law.kind} keeps {kept} centre lines, fewer than the {used} that "
                                f"the intensity normalisation of --data {opts.data} read; use --acs >= {used} (or a "
                                "larger --center-fraction).")
        c.measurement = measurement.to_config()
        c.dataset_kwargs = {**base_kwargs, "measurement": c.measurement}
        sigma_dist = opts.sigma_dist or "lognormal"
        if opts.precond == "vp" and sigma_dist == "vp200":
            precond = "vp-discrete"  # the reference's network: integer timesteps of the 1000-step schedule
        common = dict(measurement=c.measurement, sigma_dist=sigma_dist,
                      weighting="edm" if opts.precond == "edm" else "inverse-variance")
        if sigma_dist == "vp200":  # recorded only for the grid, so lognormal runs started before it still continue
            common["vp_grid"] = opts.vp_grid or "ddim"
        elif opts.vp_grid is not None:
            raise UserError("--vp-grid chooses the levels of --sigma-dist vp200; it does not apply to lognormal.")
        mask_channel = opts.mask_channel or opts.loss == "ambient"
        if opts.loss == "ambient" and opts.mask_channel:
            raise UserError("--mask-channel is an msm option; --loss ambient always gives image networks the mask.")
        if mask_channel and desc["kind"] == "mri" and opts.loss == "msm":
            raise UserError("--mask-channel needs an image-space mask; MRI line masks cannot be an input channel.")
        extra_in_channels = 1 if mask_channel and desc["kind"] != "mri" else 0
        if opts.loss == "msm":
            if opts.ambient_delta is not None:
                raise UserError("--ambient-delta only applies to --loss ambient.")
            c.loss_kwargs = dict(class_name="training.loss.MSMLoss", **common,
                                 sure_tau=0.005 if opts.sure_tau is None else opts.sure_tau,
                                 sure_weight=0.05 if opts.sure_weight is None else opts.sure_weight,
                                 pseudo_clean_grad=opts.pseudo_clean_grad)
            if opts.skip_space == "measurement":  # recorded only when on, so earlier runs still continue
                c.loss_kwargs["skip_space"] = opts.skip_space
        else:
            if opts.skip_space is not None:
                raise UserError("--skip-space only applies to --loss msm.")
            if opts.sure_tau is not None or opts.sure_weight is not None or opts.pseudo_clean_grad:
                raise UserError("--sure-tau, --sure-weight and --pseudo-clean-grad only apply to --loss msm.")
            c.loss_kwargs = dict(class_name="training.loss.AmbientLoss", **common,
                                 delta=0.1 if opts.ambient_delta is None else opts.ambient_delta)
        build(c.loss_kwargs, LOSSES)  # validates eta, tau, weights, delta
        dataset = build(c.dataset_kwargs, DATASETS)

    noise_level_options(opts, c)
    c.patches = patch_options(opts, desc, shape)
    extra = {"num_blocks": opts.blocks, "attn_resolutions": parse_int_list(opts.attn, "--attn", 1) if opts.attn else
             ([] if opts.attn == "" else None), "label_dropout": opts.label_dropout or None,
             "position_channels": c.patches and position_channels(c.patches["encoding"])}
    if opts.kind != "classifier":
        c.network = network_kwargs_for(
            arch=opts.arch, precond=precond, cbase=opts.cbase,
            cres=parse_int_list(opts.cres, "--cres", 1) if opts.cres else None,
            dropout=opts.dropout, img_resolution=max(c.patches["sizes"]) if c.patches else shape[-1],
            in_channels=shape[0] + extra_in_channels, out_channels=shape[0], label_dim=label_dim,
            **{k: v for k, v in extra.items() if v is not None})
    if c.patches is None:
        del c.patches  # recorded only for patch runs, so runs started before the option existed still continue
    if opts.transfer:
        checkpoint.check_transfer(opts.transfer, c.network)
    c.optimizer_kwargs = dict(class_name="torch.optim.Adam", lr=opts.lr, betas=[0.9, 0.999], eps=1e-8)

    c.total_kimg = opts.duration * 1000
    c.batch_size = opts.batch
    c.batch_gpu = opts.batch_gpu or opts.batch // world_size
    if opts.batch % (c.batch_gpu * world_size) != 0:
        raise UserError(f"--batch {opts.batch} is not divisible by ranks x --batch-gpu = {world_size} x {c.batch_gpu}.")
    c.ema_halflife_kimg = opts.ema * 1000
    c.ema_rampup_ratio = opts.ema_rampup if opts.ema_rampup > 0 else None
    c.lr_rampup_kimg = opts.lr_rampup * 1000
    # The schedule and the EMA profiles are recorded only when used, so that runs started before they existed
    # still continue.
    schedule = schedule_options(opts.lr_schedule, opts.lr_ref, opts.lr_final, opts.lr_rampup, opts.duration)
    if schedule is not None:
        c.lr_schedule = schedule
    if opts.ema_profiles:
        c.ema_profiles = parse_profiles(opts.ema_profiles, "--ema-profiles")
    c.kimg_per_tick, c.snapshot_ticks, c.state_dump_ticks = opts.tick, opts.snap, opts.dump
    c.seed, c.precision, c.channels_last = opts.seed, opts.precision, opts.channels_last
    c.workers = opts.workers
    c.compile = opts.compile
    if opts.compile:
        check_compiler("cuda" if opts.device == "cuda" or (opts.device == "auto" and torch.cuda.is_available())
                       else "cpu")
    c.transfer = opts.transfer
    c.world_size = world_size
    if opts.precision == "fp16" and not torch.cuda.is_available():
        raise UserError("--precision fp16 needs a CUDA device; use bf16 on CPU.")
    c.desc = describe(opts, dataset, world_size)
    return c


def patch_options(opts: EasyDict, desc: dict, shape: list) -> dict | None:
    """--patch-sizes, --patch-probs / --real-p, --patch-muls, --pad-width, --pos-enc -> the run's 'patches' config
    (training/patches.py), or None for a whole-image model."""
    given = [f"--{n.replace('_', '-')}" for n in ("patch_probs", "real_p", "patch_muls", "pad_width", "pos_enc")
             if opts[n] is not None]
    if opts.patch_sizes is None:
        if given:
            raise UserError(f"{', '.join(given)} only apply to patch training (--patch-sizes).")
        return None
    if opts.kind == "classifier" or opts.loss == "ambient":
        raise UserError("--patch-sizes trains a diffusion prior with --loss edm or msm, not "
                        f"{'a classifier' if opts.kind == 'classifier' else 'with --loss ambient'}.")
    if opts.loss == "msm" and desc["kind"] == "mri":
        raise UserError("--patch-sizes with --loss msm needs image-space masks (box, pixel); MRI k-space masks are "
                        "not local in image space, so a patch cannot see a partial measurement of itself.")
    from training.networks import ARCH_PRESETS
    from training.patches import training_patch_config

    levels = len(parse_int_list(opts.cres, "--cres", 1)) if opts.cres else len(ARCH_PRESETS[opts.arch]["channel_mult"])
    probs = None
    if opts.patch_probs is not None:
        try:
            probs = [float(v) for v in opts.patch_probs.split(",")]
        except ValueError as e:
            raise UserError(f"--patch-probs must be a comma list of probabilities, got {opts.patch_probs!r}.") from e
    return training_patch_config(
        parse_int_list(opts.patch_sizes, "--patch-sizes", 1), probs, opts.real_p,
        parse_int_list(opts.patch_muls, "--patch-muls", 1) if opts.patch_muls is not None else None, opts.pad_width,
        opts.pos_enc, shape[-1], desc["kind"], 2 ** (levels - 1))


def classifier_options(opts: EasyDict, c: EasyDict, base_kwargs: dict, desc: dict, shape: list):
    """--kind classifier: the noise-aware classifier (training/classifier.py) and its cross-entropy loss on the
    labelled images, noised with EDM's training noise levels (or clean with --clean); --arch adm picks ADM blocks,
    the others DDPM++ blocks; --cbase / --cres / --blocks / --attn / --dropout size it (defaults 64, 1,2,2, 2, none)."""
    from training.classifier import classifier_kwargs
    from training.training_loop import DATASETS, build

    if desc["kind"] != "image":
        raise UserError(f"--kind classifier needs a labelled image dataset, but --data {opts.data} holds MRI data.")
    given = [f"--{name.replace('_', '-')}" for name in MEASUREMENT_OPTIONS if opts[name] not in (None, False)]
    given += ["--loss"] if opts.loss != "edm" else []
    given += ["--label-dropout"] if opts.label_dropout else []
    if given:
        raise UserError(f"{', '.join(given)} do not apply to --kind classifier.")
    c.dataset_kwargs = base_kwargs
    c.loss_kwargs = dict(class_name="training.loss.ClassifierLoss", clean=opts.clean)
    c.network = classifier_kwargs(
        shape[-1], shape[0], desc["label_dim"], cbase=opts.cbase or 64,
        cres=parse_int_list(opts.cres, "--cres", 1) if opts.cres else (1, 2, 2), blocks=opts.blocks or 2,
        attn=parse_int_list(opts.attn, "--attn", 1) if opts.attn else (), dropout=opts.dropout,
        style="adm" if opts.arch == "adm" else "song")
    if opts.val_data is not None:
        c.val_dataset_kwargs = dict(class_name="training.dataset.open_dataset", path=opts.val_data, use_labels=True)
        val = build(c.val_dataset_kwargs, DATASETS).describe()
        if val.get("image_shape") != desc["image_shape"] or val.get("label_dim") != desc["label_dim"]:
            raise UserError(f"--val-data {opts.val_data} holds images {val.get('image_shape')} with "
                            f"{val.get('label_dim')} classes, but --data has {desc['image_shape']} with "
                            f"{desc['label_dim']}.")


def describe(opts, dataset, world_size) -> str:
    """The run directory's name after its id: EDM's parts, the loss when not edm, then the words of --desc that the
    name does not already hold (`--desc msm` on an MSM run adds nothing)."""
    name = os.path.splitext(os.path.basename(os.path.normpath(opts.data)))[0]
    parts = [name, "classifier" if opts.kind == "classifier" else "cond" if opts.cond else "uncond", opts.arch,
             opts.precond, f"gpus{world_size}",
             f"batch{opts.batch}", opts.precision] + ([opts.loss] if opts.loss != "edm" else []) + \
        (["patches"] if opts.patch_sizes is not None else [])
    for word in (opts.desc or "").split("-"):
        if word and word not in parts:
            parts.append(word)
    return "-".join(parts)


def differing_options(a: dict, b: dict) -> list[str]:
    keys = (set(a) | set(b)) - RESUME_MAY_DIFFER
    return sorted(k for k in keys if json.loads(json.dumps(a.get(k))) != json.loads(json.dumps(b.get(k))))


def read_run_options(opts_file: str) -> dict:
    """A run folder's training_options.json, refused in one sentence when it is not a JSON object; its loss's
    200-level grid rule made explicit (a vp200 run from before the rule was recorded trained on the section rule:
    `training.loss.with_recorded_vp_grid`), so that it compares equal to the options of the command that continues
    it."""
    from training.loss import with_recorded_vp_grid

    try:
        with open(opts_file) as f:
            options = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise UserError(f"{opts_file} cannot be read as JSON ({type(e).__name__}); repair it or move its run folder "
                        "out of --outdir.") from e
    if not isinstance(options, dict):
        raise UserError(f"{opts_file} is not a JSON object of training options; repair it or move its run folder out "
                        "of --outdir.")
    if isinstance(options.get("loss_kwargs"), dict):
        options["loss_kwargs"] = with_recorded_vp_grid(options["loss_kwargs"])
    return options


def find_run_to_continue(outdir: str, c: EasyDict) -> tuple[str | None, str | None]:
    """The newest run in outdir started with the same options (any duration) -> (run_dir, its latest state file).

    The loop then trains it on to the given duration, or, when its state is already at or past it (a shorter
    --duration, or the same command again), says so and only writes the final snapshot if it is missing."""
    if not os.path.isdir(outdir):
        return None, None
    for name in sorted(os.listdir(outdir), reverse=True):
        run_dir = os.path.join(outdir, name)
        opts_file = os.path.join(run_dir, "training_options.json")
        if not (re.fullmatch(r"\d{5}-.*", name) and os.path.isfile(opts_file)):
            continue
        if differing_options(read_run_options(opts_file), c):
            continue
        return run_dir, checkpoint.latest_file(run_dir, "training-state")
    return None, None


def resolve_resume(resume: str, c: EasyDict) -> tuple[str, str]:
    """--resume RUN_DIR|STATE_FILE -> (run_dir, state file), refusing runs started with other options."""
    run_dir = resume if os.path.isdir(resume) else os.path.dirname(os.path.abspath(resume))
    state = checkpoint.latest_file(run_dir, "training-state") if os.path.isdir(resume) else resume
    if state is None:
        raise UserError(f"--resume {resume}: the run directory holds no training-state-*.pt file.")
    opts_file = os.path.join(run_dir, "training_options.json")
    if not os.path.isfile(opts_file):
        raise UserError(f"--resume {resume}: {opts_file} is missing, so the run's options cannot be checked.")
    old = read_run_options(opts_file)
    diff = differing_options(old, c)
    if diff:
        details = ", ".join(f"{k} ({old.get(k)!r} -> {c.get(k)!r})" for k in diff)
        raise UserError(f"--resume {resume}: the run was started with other options: {details}.")
    return run_dir, state


def new_run_dir(outdir: str, desc: str) -> str:
    ids = [int(m.group(1)) for n in (os.listdir(outdir) if os.path.isdir(outdir) else [])
           if (m := re.fullmatch(r"(\d{5})-.*", n))]
    return os.path.join(outdir, f"{max(ids, default=-1) + 1:05d}-{desc}")
