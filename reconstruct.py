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

Measurements (training/tasks.py). The measurement of example i is a function of the data, i, --mask-seed and the
task options only (--task, --sigma-y, and --mask-kind/--accel/--acs, --sr-factor, --box-size or --pixel-p), never of
the model, so every method and every prior sees the same measurements: a generator seeded by (--mask-seed, i) draws
the mask, then the noise of std --sigma-y. MRI masks default to lines-random, R = 4, with the default ACS of every
tool, min(20, W // 8) centre lines (training/masks.py `default_acs`). Stored undersampled MRI records are used as
acquired. --save-measurements DIR writes the measured examples (y, mask, coil maps, reference, index) with the task
options and a content hash (sha256 over the options and every array); --measurements DIR reuses them (task options
given beside it must agree with the stored ones). The hash is written into metrics.csv and summary.json either way,
so two result tables come from the same measurements exactly when their hashes agree.

Posterior samples depend only on their seed (one random stream per seed), not on --batch or the number of ranks.

Methods (--methods; training/sampling/methods.py documents each and declares its options): msm (MSM posterior
sampling), dps, ald, pc-jalal, pc-dps, pc-projection, dds, padis (learned: they need --network), zero-filled
(A^+ y), fbp (CT), cs-tv and cs-l1 (MRI, sigpy). Default: msm with --network (pc-jalal for CT), plus the task's
baselines. The learned methods start their grids inside the model's training range (the log says where and why).
CT (--task ct, training/ct.py): parallel-beam projections of the image at --views angles over --angular-range
degrees (less than 180: limited angle), noise std 5% of mean |A x| by default (seed 003; --rel-noise, or --sigma-y).
--snr-db 10,20,30 measures the same examples at each SNR (training/tasks.py NOISE_CONVENTION), tabulated per SNR.

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

import os

import click
import numpy as np
import tqdm

import dnnlib
from dnnlib import UserError
from torch_utils import distributed as dist
from torch_utils.misc import parse_seeds
from training import snapshot as checkpoint
from training.evaluation import (
    check_metric_convention,
    display_images,
    example_line,
    example_volumes,
    save_panel,
    score,
    volume_maxima,
    write_report,
    write_unscored,
)
from training.metrics import CONVENTIONS
from training.sampling.methods import (
    METHODS,
    POSTERIOR_METHODS,
    Run,
    check_model,
    check_sampling_law_options,
    cli_options,
    load_model,
    measurement_image,
    method_options,
    model_options,
    parse_methods,
    reconstruct_pairs,
    with_options,
)
from training.tasks import (
    TASK_OPTIONS,
    TASKS,
    given_task_options,
    measurement_sets,
    parse_snr_list,
    save_measurements,
)


@click.command()
@click.option("--network", "network_path", default=None, help="Network snapshot or run directory (omit: baselines)")
@click.option("--data", "data_path", default=None, help="Clean references (image zip/folder, MRI records) or "
              "stored undersampled MRI records (not with --measurements)")
@click.option("--measurements", "measurements_path", default=None,
              help="Reuse the measurement set written by --save-measurements (instead of --data)")
@click.option("--save-measurements", "save_path", default=None, help="Write the measurements to this new folder")
@click.option("--task", type=click.Choice(TASKS), default=None, help="The inverse problem [required with --data]")
@click.option("--outdir", required=True, help="Where to write panels, metrics and the summary")
@click.option("--methods", default=None, help=f"Comma list of {', '.join(POSTERIOR_METHODS)} [default: msm with "
              "--network, plus the task's baselines]")
@click.option("--indices", default=None, help="Examples to reconstruct, e.g. 0-7 or 1,5,9 (overrides --first/--num)")
@click.option("--first", type=click.IntRange(min=0), default=None, help="First example [default: 0]")
@click.option("--num", type=click.IntRange(min=1), default=None, help="Number of examples [default: all from --first]")
@click.option("--seeds", default="0", show_default=True, help="Posterior sample seeds, e.g. 0-3")
@click.option("--batch", "max_batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="(example, seed) pairs per sampler call")
@with_options(TASK_OPTIONS, *cli_options("reconstruct"), model_options("examples"))
@click.option("--metric-convention", type=click.Choice(CONVENTIONS), default="sense", show_default=True,
              help="MRI metrics: SENSE-combined magnitude, fastMRI's (RSS, crop, per volume) or the MSM paper's "
              "(min-max normalised)")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True)
def main(**options):
    o = dnnlib.EasyDict(options)
    options = {p.name: options[p.name] for p in click.get_current_context().command.params if p.name != "device"}
    # What the outputs depend on, recorded in OUTDIR/settings.json: a rerun may overwrite its own outputs only.
    paths = {"network_path": o.network_path and checkpoint.resolve_snapshot_path(o.network_path),
             "data_path": o.data_path, "measurements_path": o.measurements_path}
    recorded = {**{k: v for k, v in options.items() if k not in ("outdir", "max_batch", "compile_net", "save_path")},
                **{k: os.path.abspath(v) for k, v in paths.items() if v is not None}}
    outdir = o.outdir
    dnnlib.check_outdir(outdir)
    dnnlib.check_outdir_settings(outdir, recorded)
    device = dist.init(o.device)
    rank, world = dist.get_rank(), dist.get_world_size()

    # Validate everything before writing anything.
    snr_list = parse_snr_list(o.snr_db)
    if o.save_path is not None and os.path.exists(o.save_path):
        raise UserError(f"--save-measurements {o.save_path} already exists; measurement sets are never overwritten.")
    seeds = parse_seeds(o.seeds)
    model = load_model(o.network_path, device, o.patch_size, o.patch_batch, o.assembly, o.compile_net)
    check_sampling_law_options(model, o.network_path, o.sample_accel, o.acquired_draw)
    sets, task, source, slices = measurement_sets(o.data_path, o.measurements_path, o.task, given_task_options(o),
                                                  o.indices, o.first, o.num, snr_list)
    measurements = sets[0][1]
    if o.save_path is not None and len(sets) > 1:
        raise UserError(f"--save-measurements writes one measurement set, but --snr-db {o.snr_db} makes {len(sets)}.")
    check_model(task, model, measurements, o.network_path, source)
    check_metric_convention(o.metric_convention, task, snr_list)
    volumes = example_volumes(measurements.examples, slices)
    volume_max = volume_maxima(measurements.examples, volumes) if o.metric_convention == "fastmri" else {}
    methods = parse_methods(o.methods, task, model)
    chosen = method_options(o, task)
    runs = {level: Run(model, measured.task, chosen, device, show_progress=rank == 0) for level, measured in sets}
    report = {"options": options, "measurements": measurements.describe(),
              "settings": {m: METHODS[m].settings(runs[sets[0][0]]) for m in methods}}
    if snr_list is not None:
        report["snr_sweep"] = {f"{level:g}": m.describe() for level, m in sets}

    if rank == 0:
        dnnlib.write_outdir_settings(outdir, recorded)  # everything is checked: record before the first output
        if o.save_path is not None:
            save_measurements(o.save_path, measurements)
        for sub in ("panels", "reconstructions"):
            os.makedirs(os.path.join(outdir, sub), exist_ok=True)
    dist.barrier()
    pairs = dist.shard([(i, s) for i in measurements.examples for s in seeds])
    batches = [(level, measured.examples, pairs[k : k + o.max_batch])
               for level, measured in sets for k in range(0, len(pairs), o.max_batch)]
    dist.print0(f"Reconstructing {len(measurements.examples)} example(s) x {len(seeds)} seed(s) with "
                f"{', '.join(methods)} ({task}, measurements {report['measurements']['hash'][:12]}"
                + ("" if snr_list is None else f", at SNR {', '.join(f'{v:g}' for v in snr_list)} dB")
                + f") on {world} rank(s) to {outdir}")
    for m in methods:
        if "schedule" in report["settings"][m]:
            dist.print0(f"{m}: {report['settings'][m]['schedule']}")
    deterministic, rows, prefix = {}, [], "" if world == 1 else f"[rank {rank}] "
    learned = [m for m in methods if METHODS[m].needs_model]
    for b, (level, examples, batch) in enumerate(batches):
        for i, seed, results, costs in reconstruct_pairs(methods, runs[level], examples, batch,
                                                         f"batch {b + 1}/{len(batches)}", deterministic, level):
            example = examples[i]
            measurement = display_images(measurement_image(runs[level], example), task)
            reference = display_images(example.reference, task) if example.reference is not None else None
            shown = {m: display_images(image, task) for m, image in results.items()}
            name = f"{i:05d}-{seed:06d}" + ("" if level is None else f"-snr{level:g}dB")
            save_panel(os.path.join(outdir, "panels", f"{name}.png"), measurement, shown, reference, task, learned)
            np.savez(os.path.join(outdir, "reconstructions", f"{name}.npz"),
                     **{m: image[0].numpy().astype(np.float32) for m, image in results.items()})
            if reference is None:
                tqdm.tqdm.write(f"{prefix}example {i} seed {seed}: done")
                continue
            new = {m: {**score(o.metric_convention, task, example, results[m], shown[m], reference,
                               volume_max.get(volumes[i])), "nfe": costs[m][0], "seconds": costs[m][1]}
                   for m in methods}
            rows += [{"example": i, "seed": seed, "method": m, **({} if level is None else {"snr_db": level}), **r}
                     for m, r in new.items()]
            tqdm.tqdm.write(prefix + example_line(i, seed, new))

    rows = [r for part in dist.all_gather_object(rows) for r in part]
    if rank == 0:
        if any(e.reference is None for e in measurements.examples.values()):
            write_unscored(outdir, report)
            print(f"Wrote panels and reconstructions to {outdir} (stored measurements: no reference, no metrics)")
        else:
            write_report(outdir, rows, methods, report, snr_list, o.metric_convention, task, measurements.examples,
                         volumes, seeds)
            print(f"Wrote panels, reconstructions, metrics.csv and summary.json to {outdir}")
    dist.destroy()


if __name__ == "__main__":
    dnnlib.run_cli(main)
