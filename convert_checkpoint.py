"""Convert published diffusion networks into this project's network snapshots (state dict + JSON config).

    # The MSM reference's networks (guided-diffusion state dicts), by their published names:
    python convert_checkpoint.py --from guided-diffusion --preset fmri_msm_R4_noise0_0_img256 \\
        --source pretrained_models/fmri_msm_R4_noise0_0_img256.pt --dest models/fmri_msm_R4.pt
    # Another guided-diffusion UNet: its architecture as guided-diffusion's options
    python convert_checkpoint.py --from guided-diffusion --source model.pt --dest model-converted.pt \\
        --resolution 64 --channels 128 --channel-mult 1,2,3,4 --blocks 3 --attn 32,16,8 --head-channels 64
    # EDM-format pickles (EDM, PaDIS), read without executing the code they embed:
    python convert_checkpoint.py --from edm --source edm-cifar10-32x32-uncond-vp.pkl --dest cifar10-uncond-vp.pt

The written file is an ordinary snapshot (training/snapshot.py): generate.py, reconstruct.py and every sampler
take it unchanged. A preset records the measurement process the network was trained with (mask law, noise level) and
the reference's 200-level grid, so generate.py and reconstruct.py pick the MSM sampler and that grid by themselves.
Nothing is downloaded: get the files from the projects' pages (docs/pretrained-models.md). Bad input is refused in
one sentence with nothing written.
"""

import dataclasses
import os

import click

import dnnlib
from dnnlib import UserError
from torch_utils.misc import parse_int_list

ARCHITECTURE_OPTIONS = ("resolution", "channels", "channel_mult", "blocks", "attn", "head_channels", "num_heads",
                        "attention_order")


def guided_diffusion_architecture(preset_name, options: dict):
    """--preset and the architecture options -> (Architecture, Preset or None); without a preset the layout options
    are required, with one they override its layout (e.g. a smaller variant), never its measurement process."""
    from training.conversion import guided_diffusion as gd

    entry = gd.preset(preset_name) if preset_name else None
    given = {k: v for k, v in options.items() if v is not None}
    if entry is None:
        missing = [f"--{k.replace('_', '-')}" for k in ("resolution", "channels", "channel_mult", "blocks", "attn")
                   if k not in given]
        if missing:
            raise UserError(f"Without --preset, give the network's architecture: {', '.join(missing)} (its "
                            "guided-diffusion options image_size, num_channels, channel_mult, num_res_blocks, "
                            "attention_resolutions).")
    if "head_channels" in given and "num_heads" in given:
        raise UserError("--head-channels and --num-heads each set the attention heads; give only one.")
    fields = {"image_size": given.get("resolution"), "model_channels": given.get("channels"),
              "channel_mult": tuple(parse_int_list(given["channel_mult"], "--channel-mult", 1))
              if "channel_mult" in given else None,
              "num_res_blocks": given.get("blocks"),
              "attention_resolutions": tuple(parse_int_list(given["attn"], "--attn", 1)) if "attn" in given else None,
              "attention_order": given.get("attention_order")}
    if "num_heads" in given:
        fields.update(num_head_channels=-1, num_heads=given["num_heads"])
    elif "head_channels" in given:
        fields["num_head_channels"] = given["head_channels"]
    fields = {k: v for k, v in fields.items() if v is not None}
    base = entry.architecture if entry is not None else gd.Architecture(
        image_size=0, model_channels=0, channel_mult=(), num_res_blocks=0, attention_resolutions=())
    return dataclasses.replace(base, **fields), entry


@click.command()
@click.option("--from", "source_format", type=click.Choice(["guided-diffusion", "edm"]), required=True,
              help="Format of --source: a guided-diffusion UNet state dict (.pt), or an EDM-format pickle (.pkl)")
@click.option("--source", required=True, metavar="FILE", help="The published file")
@click.option("--dest", required=True, metavar="SNAPSHOT.pt", help="The snapshot to write (must not exist)")
@click.option("--preset", "preset_name", default=None, metavar="NAME",
              help="guided-diffusion: one of the MSM reference's six networks by its published name (e.g. "
                   "ffhq_msm_p04_noise0_0_img128): its architecture and training measurement process")
@click.option("--resolution", type=click.IntRange(min=1), default=None, help="guided-diffusion: image_size")
@click.option("--channels", type=click.IntRange(min=1), default=None, help="guided-diffusion: num_channels")
@click.option("--channel-mult", default=None, metavar="LIST", help="guided-diffusion: channel_mult, e.g. 1,1,2,3,4")
@click.option("--blocks", type=click.IntRange(min=1), default=None, help="guided-diffusion: num_res_blocks")
@click.option("--attn", default=None, metavar="LIST",
              help="guided-diffusion: attention_resolutions (image sizes), e.g. 32,16,8")
@click.option("--head-channels", type=click.IntRange(min=1), default=None,
              help="guided-diffusion: num_head_channels  [default: 64]")
@click.option("--num-heads", type=click.IntRange(min=1), default=None,
              help="guided-diffusion: a fixed num_heads (num_head_channels -1) instead of --head-channels")
@click.option("--attention-order", type=click.Choice(["legacy", "new"]), default=None,
              help="guided-diffusion: qkv layout, legacy (use_new_attention_order False) or new  [default: legacy]")
@click.option("--drop-variance", is_flag=True,
              help="guided-diffusion: keep only the epsilon half of a learned-sigma network's output")
def main(source_format, source, dest, preset_name, drop_variance, **architecture):
    """Convert a published network into a snapshot of this project."""
    from training.conversion import check_dest, write_converted_snapshot

    check_dest(dest)
    if source_format == "edm":
        given = [f"--{k.replace('_', '-')}" for k, v in architecture.items() if v is not None]
        given += ["--preset"] * bool(preset_name) + ["--drop-variance"] * drop_variance
        if given:
            raise UserError(f"{', '.join(given)} apply to --from guided-diffusion; an EDM pickle records its "
                            "architecture.")
        from training.conversion.edm import convert_edm  # the EDM converter (restricted unpickler)

        config, state = convert_edm(source)
        source_record = {"format": "edm", "file": os.path.basename(source), "sha256": dnnlib.file_sha256(source)}
        notes = []
    else:
        from training.conversion import guided_diffusion as gd

        arch, entry = guided_diffusion_architecture(preset_name, architecture)
        converted = gd.convert_guided_diffusion(source, arch, entry, drop_variance)
        config, state, source_record, notes = (converted.config, converted.state, converted.source,
                                               converted.notes)
    write_converted_snapshot(dest, config, state, source_record)
    kwargs = config["network"]["kwargs"]
    click.echo(f"Wrote {dest}: {config['network']['class_name'].rsplit('.', 1)[-1]} over "
               f"{kwargs.get('model_type', 'SongUNet')}, {kwargs['img_resolution']} px, {kwargs['in_channels']} "
               f"channel(s){'; ' if notes else ''}{'; '.join(notes)}")


if __name__ == "__main__":
    dnnlib.run_cli(main)
