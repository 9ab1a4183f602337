"""Post-hoc EMA (EDM2, Karras et al. 2024): network snapshots with any EMA length, reconstructed after training from
the power-function EMA profiles a run stored (train.py --ema-profiles).

    python train.py --outdir runs --data datasets/phantoms-32.zip ... --ema-profiles 0.05,0.1
    python posthoc_ema.py --run runs/00000-phantoms-32-uncond-ddpmpp-edm-gpus1-batch32-fp32 \\
        --sigma-rel 0.03,0.07,0.15 --outdir runs/phema
    python generate.py --network runs/phema/posthoc-ema-0.07-000120.pt --outdir out/samples

Each written snapshot `posthoc-ema-{sigma_rel}-{kimg}.pt` is an ordinary network snapshot (generate.py, reconstruct.py
and fid.py take it unchanged) holding the EMA with that relative length sigma_rel at the run's last profile snapshot
(or the last one up to --kimg): a least-squares combination of all the stored profile snapshots up to there
(training/power_ema.py). Its config's 'source' records the fit and its relative error. Choose the length on
validation data, never on the test set. Bad input is refused in one sentence with nothing written.
"""

import os

import click

import dnnlib
from dnnlib import UserError
from training import snapshot as checkpoint
from training.power_ema import parse_profiles, reconstruct


@click.command()
@click.option("--run", "run_dir", required=True, metavar="DIR",
              help="Run directory trained with --ema-profiles (its power-ema-*.pt snapshots)")
@click.option("--sigma-rel", "sigma_rels", required=True, metavar="LIST",
              help="Relative EMA lengths to reconstruct, e.g. 0.03,0.07,0.15")
@click.option("--kimg", type=click.FloatRange(min=0), default=None,
              help="Use the profile snapshots up to this training position and reconstruct at the last of them  "
                   "[default: all, the latest]")
@click.option("--outdir", required=True, metavar="DIR", help="Where to write the snapshots")
def main(run_dir, sigma_rels, kimg, outdir):
    dnnlib.check_outdir(outdir)
    sigma_rels = parse_profiles(sigma_rels, "--sigma-rel")
    results = reconstruct(run_dir, sigma_rels, None if kimg is None else round(kimg * 1000))
    try:
        os.makedirs(outdir, exist_ok=True)
        for r in results:
            path = os.path.join(outdir, checkpoint.progress_file_name(f"posthoc-ema-{r['sigma_rel']:g}", r["nimg"]))
            checkpoint.save_snapshot(path, r["config"], r["net"])
            print(f"sigma_rel {r['sigma_rel']:g} at {r['nimg'] / 1000:g} kimg from "
                  f"{r['config']['source']['snapshots']} profile snapshots (relative fit error "
                  f"{r['fit_error']:.1e}): {path}")
    except OSError as e:
        raise UserError(f"--outdir {outdir} cannot be written: {e.strerror or e}.") from e


if __name__ == "__main__":
    dnnlib.run_cli(main)
