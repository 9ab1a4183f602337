"""Train a diffusion model: EDM's options and run directories, as `python train.py ...` or under torchrun.

    python train.py --outdir runs --data datasets/phantoms-64.zip --arch ddpmpp --cbase 32 --cres 1,2,2 \
        --batch 32 --duration 0.05
    python train.py --outdir runs --data datasets/phantoms-64.zip --loss msm --mask box --p 0.4 ...
    python train.py --outdir runs --data datasets/mri-8coil --loss msm --accel 4 --sigma-y 0.01 ...
    torchrun --standalone --nproc_per_node=8 train.py --outdir runs --data ... --batch 512 --batch-gpu 64
    python train.py ... --lr-schedule isqrt --ema-profiles 0.05,0.1    # then posthoc_ema.py for any EMA length

Re-running the same command continues the newest run with the same options from its last training state (so a
killed job resumes by running it again); with another --duration it trains that run on to the new length, or, when it
is already past it, ends it there. `--resume RUN_DIR|STATE` continues a given run, refusing when options that change
the result differ from the ones it was started with.
"""

import json
import os

import click

import dnnlib
from dnnlib import EasyDict, UserError
from torch_utils import distributed as dist
from training import masks
from training import snapshot as checkpoint
from training.lr_schedules import DEFAULT_REF_MIMG, SCHEDULES
from training.training_options import (
    build_options,
    find_run_to_continue,
    new_run_dir,
    resolve_resume,
)


@click.command()
@click.option("--outdir", required=True, help="Where to make run directories", metavar="DIR")
@click.option("--data", required=True, help="Dataset: zip or folder", metavar="ZIP|DIR")
@click.option("--kind", type=click.Choice(["diffusion", "classifier"]), default="diffusion", show_default=True,
              help="What to train: a diffusion model, or a noise-aware classifier of the labelled images (guidance)")
@click.option("--cond", is_flag=True, help="Class-conditional (labels from dataset.json)")
@click.option("--val-data", type=str, default=None, metavar="ZIP|DIR",
              help="--kind classifier: labelled images whose accuracy is logged every tick")
@click.option("--clean", is_flag=True, help="--kind classifier: train on clean images only (sigma = 0)")
@click.option("--balanced", is_flag=True, help="Class-balanced sampling of the training examples")
@click.option("--arch", type=click.Choice(["ddpmpp", "ncsnpp", "adm"]), default="ddpmpp", show_default=True)
@click.option("--precond", type=click.Choice(["edm", "vp", "ve"]), default="edm", show_default=True)
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), default=200, show_default=True,
              help="Training duration in Mimg")
@click.option("--batch", type=click.IntRange(min=1), default=512, show_default=True, help="Global batch size")
@click.option("--batch-gpu", type=click.IntRange(min=1), default=None, help="Per-rank batch (gradient accumulation)")
@click.option("--cbase", type=click.IntRange(min=1), default=None, help="Channel multiplier base [arch default]")
@click.option("--cres", type=str, default=None, help="Channel multipliers per resolution, e.g. 1,2,2")
@click.option("--blocks", type=click.IntRange(min=1), default=None, help="Residual blocks per resolution")
@click.option("--attn", type=str, default=None, help="Attention resolutions, e.g. 16 or '' for none")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=10e-4, show_default=True)
@click.option("--lr-rampup", type=click.FloatRange(min=0), default=10, show_default=True, help="Mimg")
@click.option("--lr-schedule", type=str, default="constant", show_default=True,
              help=f"Learning rate after the ramp-up: {', '.join(SCHEDULES)} (EDM's constant rate, EDM2's inverse "
                   "square root decay after --lr-ref, or a half cosine down to --lr-final at --duration)")
@click.option("--lr-ref", type=click.FloatRange(min=0, min_open=True), default=None,
              help="--lr-schedule isqrt: Mimg after which the rate falls as 1/sqrt(images), halving for every 4x  "
                   f"[default: {DEFAULT_REF_MIMG:g} (10 kimg): EDM2 ends its ImageNet runs (~2 Gimg) at ~15x its "
                   "reference of 143 Mimg; quickstart-sized runs of 30-120 kimg end at 3-12x]")
@click.option("--lr-final", type=float, default=None,
              help="--lr-schedule cosine: the rate at --duration as a fraction of --lr  [default: 0]")
@click.option("--ema", type=click.FloatRange(min=0), default=0.5, show_default=True, help="EMA half-life, Mimg")
@click.option("--ema-rampup", type=click.FloatRange(min=0), default=0.05, show_default=True, help="0 disables")
@click.option("--ema-profiles", type=str, default=None, metavar="SIGMA_RELS",
              help="EDM2's power-function EMAs to track besides --ema, as relative lengths sigma_rel, e.g. 0.05,0.1: "
                   "saved at every --snap as power-ema-SIGMA-KIMG.pt, from which posthoc_ema.py reconstructs any "
                   "other length  [default: none]")
@click.option("--dropout", type=click.FloatRange(min=0, max=1), default=0.13, show_default=True)
@click.option("--label-dropout", type=click.FloatRange(min=0, max=1), default=0.0, show_default=True,
              help="Drop class labels with this probability (classifier-free guidance)")
@click.option("--xflip", is_flag=True, help="Dataset x-flips (doubles the data)")
@click.option("--max-size", type=click.IntRange(min=1), default=None, help="Use at most this many examples")
@click.option("--loss", type=click.Choice(["edm", "msm", "ambient"]), default="edm", show_default=True,
              help="edm: clean data; msm / ambient: learn from the partial measurements only")
@click.option("--mask", type=click.Choice(["box", "pixel", "lines-random", "lines-equispaced", "fastmri-random",
                                         "fastmri-equispaced", "full"]), default=None,
              help=f"Mask law of the measurements  [default: {masks.DEFAULT_LAW['image']} for images, "
                   f"{masks.DEFAULT_LAW['mri']} for MRI]")
@click.option("--p", type=float, default=None,
              help=f"Drop probability of the box / pixel law  [default: {masks.MASK_DEFAULTS['p']:g}]")
@click.option("--accel", type=float, default=None,
              help=f"Acceleration R of the line laws  [default: {masks.MASK_DEFAULTS['R']:g}]")
@click.option("--acs", type=int, default=None, help=f"Always-kept centre lines  [default: {masks.ACS_RULE}]")
@click.option("--center-fraction", type=float, default=None,
              help="fastMRI laws: fraction of the columns kept at the centre (docs/fastmri.md)  "
                   f"[default: {masks.MASK_DEFAULTS['center_fraction']:g}]")
@click.option("--sigma-y", type=float, default=None, help="Measurement noise std eta  [default: 0]")
@click.option("--protocol", type=click.Choice(["fixed", "resample"]), default=None,
              help="fixed: each example measured once; resample: a fresh mask per draw  [default: fixed; stored "
                   "undersampled MRI uses its own masks]")
@click.option("--mask-seed", type=int, default=None, help="Seed of the simulated measurements  [default: 0]")
@click.option("--sigma-dist", type=click.Choice(["lognormal", "vp200"]), default=None,
              help="Training noise levels: EDM's log-normal, or the reference's 200-level VP grid (with --precond vp "
                   "the network then takes its integer timesteps)  [default: lognormal]")
@click.option("--p-mean", type=float, default=None,
              help="Log-normal training noise levels ln sigma ~ N(P_mean, P_std^2) (EDM's loss; MSM / Ambient with "
                   "--sigma-dist lognormal): their mean  [default: -1.2]")
@click.option("--p-std", type=float, default=None, help="... and their standard deviation  [default: 1.2]")
@click.option("--vp-grid", type=click.Choice(["ddim", "section"]), default=None,
              help="Rule of --sigma-dist vp200's levels: the reference's ddim200 stride (t = 0, 5, ..., 995), or "
                   "the section rule t = round(i 999 / 199) of runs started before the rule was recorded  "
                   "[default: ddim]")
@click.option("--sure-tau", type=float, default=None, help="SURE finite-difference step (eta > 0)  [default: 0.005]")
@click.option("--sure-weight", type=float, default=None, help="Weight of the SURE term (eta > 0)  [default: 0.05]")
@click.option("--pseudo-clean-grad", is_flag=True, help="Let gradients flow through the pseudo-clean target (eta > 0)")
@click.option("--ambient-delta", type=float, default=None, help="Ambient's extra drop probability  [default: 0.1]")
@click.option("--mask-channel", is_flag=True, help="MSM on images: give the network the mask as an input channel")
@click.option("--skip-space", type=click.Choice(["image", "measurement"]), default=None,
              help="MSM: the preconditioning's skip term c_skip T^H s in image space (the reference), or c_skip s in "
                   "measurement space (consistent for multi-coil MRI; the same for images)  [default: image]")
@click.option("--patch-sizes", type=str, default=None,
              help="Patch training (PaDIS): patch sides, e.g. 16,32,64 (each at most the padded canvas)")
@click.option("--patch-probs", type=str, default=None,
              help="Probability of each patch size  [default: --real-p 0.5 for three sizes, else uniform]")
@click.option("--real-p", type=float, default=None,
              help="Patch-Diffusion's rule for three sizes: probabilities ((1-p) 2/5, (1-p) 3/5, p)")
@click.option("--patch-muls", type=str, default=None,
              help="Crops per image for each patch size, e.g. 4,2,1; kimg count the patches trained on  "
                   "[default: 1 each]")
@click.option("--pad-width", type=int, default=None, help="Patch canvas padding P on every side  [default: 0]")
@click.option("--pos-enc", type=str, default=None,
              help="Positional channels: xy (column, row in [-1, 1] over the canvas) or fourier:F  [default: xy]")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True)
@click.option("--channels-last/--no-channels-last", default=False, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True)
@click.option("--compile", "compile", is_flag=True,
              help="torch.compile the network for the training steps (snapshots are the same plain network; may be "
                   "switched on or off when a run is continued)")
@click.option("--workers", type=click.IntRange(min=0), default=1, show_default=True, help="Data-loader processes")
@click.option("--dist-timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Seconds a rank waits for the others before the job fails, naming the missing ranks  "
                   f"[default: {dist.DEFAULT_TIMEOUT_S['cpu']} on CPU, {dist.DEFAULT_TIMEOUT_S['cuda']} on GPU]")
@click.option("--desc", type=str, default=None, help="String appended to the run directory name")
@click.option("--tick", type=click.FloatRange(min=0, min_open=True), default=50, show_default=True,
              help="kimg between status lines")
@click.option("--snap", type=click.IntRange(min=1), default=50, show_default=True, help="Ticks between snapshots")
@click.option("--dump", type=click.IntRange(min=1), default=500, show_default=True, help="Ticks between states")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--transfer", type=str, default=None, help="Initialise the network from this snapshot")
@click.option("--resume", type=str, default=None, help="Continue this run directory or training-state file")
@click.option("-n", "--dry-run", is_flag=True, help="Print the options and exit")
def main(**kwargs):
    opts = EasyDict(kwargs)
    dnnlib.check_outdir(opts.outdir)
    device = dist.init(opts.device, timeout_s=opts.dist_timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    c = build_options(opts, world)

    # Pick the run directory: explicit resume, automatic continuation, or a new run.
    if opts.resume:
        run_dir, state = resolve_resume(opts.resume, c)
    else:
        run_dir, state = find_run_to_continue(opts.outdir, c)
        run_dir = run_dir or new_run_dir(opts.outdir, c.desc)
    run_dir, state = dist.broadcast_object((run_dir, state))
    if state is not None:  # every part of the state checked against this run before anything is written
        checkpoint.load_training_state(state, c, world, device)

    dist.print0(json.dumps(c, indent=2))
    dist.print0(f"Run directory: {run_dir}" + (f" (continuing from {os.path.basename(state)})" if state else ""))
    if opts.dry_run:
        dist.print0("Dry run; exiting.")
        return

    if rank == 0:
        try:
            os.makedirs(run_dir, exist_ok=True)
            with open(os.path.join(run_dir, "training_options.json"), "w") as f:
                json.dump(c, f, indent=2)
        except OSError as e:  # e.g. under /proc, or a read-only mount that os.access does not reveal
            raise UserError(f"--outdir {opts.outdir} cannot be written: {e.strerror or e} ({run_dir}).") from e
    dist.barrier("the creation of the run directory")
    log_path = os.path.join(run_dir, "log.txt")

    def log(msg: str):
        print(msg, flush=True)
        with open(log_path, "a") as f:
            f.write(msg + "\n")

    from training.training_loop import training_loop

    try:
        training_loop(c, run_dir, device, log=log, resume_state=state)
    except dist.RankTimeoutError as e:
        if rank == 0:
            log(f"Error: {e}")
        raise
    dist.destroy()


if __name__ == "__main__":
    dnnlib.run_cli(main)
