"""convert_checkpoint.py --from guided-diffusion: converted networks compute what guided-diffusion's UNetModel computes.

The reference outputs in tests/data/guided_diffusion/ were made by running openai/guided-diffusion's UNetModel out of
this tree (description.json says how); the weights are not stored but drawn here again, tensor by tensor in the
order of guided-diffusion's state dict, from the seed and rule recorded there. Realistic weight scales (1 / fan_in,
the zero-initialised output layers included) make a wrong qkv order or timestep visible in the output.
"""

import json
import math
import os
import pickle

import numpy as np
import PIL.Image
import pytest
import torch

import convert_checkpoint
from tests.helpers import make_phantoms, run_cli, run_in_process
from training import snapshot as checkpoint
from training.conversion import guided_diffusion as gd
from training.conversion import write_converted_snapshot
from training.mri import MRIDataset
from training.networks import VPPrecond
from training.schedules import linear_beta_alphas_cumprod

DATA = os.path.join(os.path.dirname(__file__), "data", "guided_diffusion")
DESCRIPTION = json.load(open(os.path.join(DATA, "description.json")))
CONFIGS = {c["name"]: c for c in DESCRIPTION["configs"]}
TOLERANCE = 1e-5


def reference(name: str) -> dict:
    with np.load(os.path.join(DATA, "reference.npz"), allow_pickle=False) as f:
        keys, shapes, eps = (f[f"{name}/{k}"] for k in ("keys", "shapes", "eps"))
    return {"keys": [(str(k), tuple(int(d) for d in s if d >= 0)) for k, s in zip(keys, shapes)],
            "eps": torch.from_numpy(eps)}


def draw_weights(keys_shapes: list, seed: int) -> dict:
    """The 'weights' rule of description.json."""
    g = torch.Generator().manual_seed(seed)
    shapes = dict(keys_shapes)
    state = {}
    for key, shape in keys_shapes:
        weight_of_bias = shapes.get(key[: -len("bias")] + "weight", ()) if key.endswith(".bias") else ()
        if len(shape) >= 2:
            state[key] = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
        elif len(weight_of_bias) >= 2:
            state[key] = torch.randn(shape, generator=g) / math.sqrt(math.prod(weight_of_bias[1:]))
        elif key.endswith(".weight"):
            state[key] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            state[key] = 0.1 * torch.randn(shape, generator=g)
    return state


def architecture(cfg: dict, **changes) -> gd.Architecture:
    unet = cfg["unet"]
    heads = ({"num_head_channels": -1, "num_heads": unet["num_heads"]} if unet.get("num_head_channels") == -1 else
             {"num_head_channels": unet["num_head_channels"]})
    arch = gd.Architecture(image_size=unet["image_size"], model_channels=unet["model_channels"],
                           channel_mult=tuple(unet["channel_mult"]), num_res_blocks=unet["num_res_blocks"],
                           attention_resolutions=tuple(unet["attention_resolutions"]),
                           attention_order="new" if unet["use_new_attention_order"] else "legacy", **heads)
    return gd.dataclasses.replace(arch, **changes)


def cli_architecture(cfg: dict) -> list:
    """The same architecture as convert_checkpoint.py options."""
    unet = cfg["unet"]
    heads = (["--num-heads", unet["num_heads"]] if unet.get("num_head_channels") == -1 else
             ["--head-channels", unet["num_head_channels"]])
    return ["--resolution", unet["image_size"], "--channels", unet["model_channels"], "--channel-mult",
            ",".join(map(str, unet["channel_mult"])), "--blocks", unet["num_res_blocks"], "--attn",
            ",".join(map(str, unet["attention_resolutions"])), *heads, "--attention-order",
            "new" if unet["use_new_attention_order"] else "legacy"]


def inputs(cfg: dict):
    unet = cfg["unet"]
    size = unet["image_size"]
    x = torch.randn((len(cfg["timesteps"]), unet["in_channels"], size, size),
                    generator=torch.Generator().manual_seed(cfg["input_seed"]))
    labels = (torch.nn.functional.one_hot(torch.tensor(cfg["labels"]), unet["num_classes"]).float()
              if cfg["labels"] is not None else None)
    return x, torch.tensor(cfg["timesteps"], dtype=torch.float32), labels


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Each config's seeded guided-diffusion state dict, saved as guided-diffusion saves one (torch.save)."""
    root = tmp_path_factory.mktemp("gd")
    paths = {}
    for name, cfg in CONFIGS.items():
        paths[name] = str(root / f"{name}.pt")
        torch.save(draw_weights(reference(name)["keys"], cfg["weight_seed"]), paths[name])
    return paths


def epsilon(net, cfg) -> torch.Tensor:
    x, t, labels = inputs(cfg)
    with torch.no_grad():
        return net.model(x, t, labels)[:, :, ::2, ::2]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_converted_network_computes_guided_diffusions_output(name, sources, tmp_path):
    cfg, ref = CONFIGS[name], reference(name)
    converted = gd.convert_guided_diffusion(sources[name], architecture(cfg), drop_variance=True)
    dest = str(tmp_path / "converted.pt")
    write_converted_snapshot(dest, converted.config, converted.state, converted.source)
    net, config = checkpoint.load_snapshot(dest)  # an ordinary snapshot
    assert config["source"]["format"] == "guided-diffusion" and config["source"]["sha256"]
    assert (epsilon(net, cfg) - ref["eps"]).abs().max() <= TOLERANCE

    # Through the preconditioner, at guided-diffusion's noise level of step t: D(x; sigma_t) = x - sigma_t eps(x_t, t)
    # with x_t = sqrt(abar_t) x, and sigma_t maps back to the integer step t.
    x_t, t, labels = inputs(cfg)
    abar = linear_beta_alphas_cumprod()[t.long()].reshape(-1, 1, 1, 1)
    sigma = (1 / abar - 1).sqrt()
    assert torch.equal(net.timestep(sigma.flatten().float()), t)
    x = (x_t / abar.sqrt()).float()
    with torch.no_grad():
        denoised = net(x, sigma.flatten().float(), labels)[:, :, ::2, ::2].double()
    expected = x.double()[:, :, ::2, ::2] - sigma * ref["eps"].double()
    assert ((denoised - expected).abs() / (1 + sigma)).max() <= TOLERANCE

    # The test sees the mistakes it guards against. The other qkv row order:
    other = "new" if architecture(cfg).attention_order == "legacy" else "legacy"
    wrong = gd.convert_guided_diffusion(sources[name], architecture(cfg, attention_order=other), drop_variance=True)
    net.load_state_dict(wrong.state)
    assert (epsilon(net, cfg) - ref["eps"]).abs().max() > 100 * TOLERANCE
    net.load_state_dict(converted.state)
    # A timestep one step off (e.g. the section grid's t where the reference's is meant):
    x_t, t, labels = inputs(cfg)
    with torch.no_grad():
        shifted = net.model(x_t, t + 1, labels)[:, :, ::2, ::2]
    assert (shifted - ref["eps"]).abs().max() > 100 * TOLERANCE
    # EDM's continuous VP preconditioning over the same network (c_noise = 999 t(sigma), close to but not the
    # reference's integer step):
    kwargs = {k: v for k, v in config["network"]["kwargs"].items() if k not in ("num_steps", "beta_start", "beta_end")}
    continuous = VPPrecond(**kwargs).eval()
    continuous.load_state_dict(net.state_dict())
    with torch.no_grad():
        denoised = continuous(x, sigma.flatten().float(), labels)[:, :, ::2, ::2].double()
    assert ((denoised - expected).abs() / (1 + sigma)).max() > 100 * TOLERANCE


def test_qkv_rows_turn_the_legacy_layout_into_the_projects():
    # 2 heads of 3 channels: legacy rows are (head, q/k/v, channel); ours (q/k/v, head, channel).
    rows = gd.qkv_rows(6, 2).tolist()
    legacy = [(h, s, c) for h in range(2) for s in range(3) for c in range(3)]
    ours = [(h, s, c) for s in range(3) for h in range(2) for c in range(3)]
    assert [legacy[r] for r in rows] == ours


def test_cli_writes_an_ordinary_snapshot(sources, tmp_path, capsys):
    dest = tmp_path / "rgb.pt"
    code, err = run_in_process(convert_checkpoint.main, ["--from", "guided-diffusion", "--source",
                                                         sources["rgb-legacy"], "--dest", dest,
                                                         *cli_architecture(CONFIGS["rgb-legacy"])], capsys)
    assert code == 0, err
    net, config = checkpoint.load_snapshot(str(dest))
    assert (epsilon(net, CONFIGS["rgb-legacy"]) - reference("rgb-legacy")["eps"]).abs().max() <= TOLERANCE
    assert config["dataset"] == {"kind": "image", "image_shape": [3, 16, 16], "label_dim": 0}
    assert "measurement" not in config and config["network"]["kwargs"]["timestep_embedding"] == "guided-diffusion"
    # A learned-sigma, class-conditional file: the epsilon half, with its classes.
    dest = tmp_path / "classes.pt"
    code, err = run_in_process(convert_checkpoint.main, [
        "--from", "guided-diffusion", "--source", sources["rgb-new-classes-learned-sigma"], "--dest", dest,
        "--drop-variance", *cli_architecture(CONFIGS["rgb-new-classes-learned-sigma"])], capsys)
    assert code == 0, err
    net, config = checkpoint.load_snapshot(str(dest))
    assert net.out_channels == 3 and net.label_dim == 4


def test_reference_presets_record_their_training():
    assert sorted(gd.PRESETS) == sorted([
        "ffhq_uncond_p00_noise0_0_img128", "ffhq_msm_p04_noise0_0_img128", "ffhq_msm_p04_noise0_1_img128",
        "fmri_uncond_R1_noise0_0_img256", "fmri_msm_R4_noise0_0_img256", "fmri_msm_R4_noise0_1_img256"])
    ffhq, mri = gd.preset("ffhq_msm_p04_noise0_1_img128.pt"), gd.preset("fmri_msm_R4_noise0_0_img256")
    assert ffhq.architecture.channel_mult == (1, 1, 2, 3, 4) and mri.architecture.channel_mult == (1, 1, 2, 2, 4, 4)
    for p in (ffhq, mri):
        a = p.architecture
        assert (a.model_channels, a.num_res_blocks, a.attention_resolutions, a.num_head_channels,
                a.attention_order) == (128, 2, (32, 16, 8), 64, "legacy")
    sections = gd.preset_sections(ffhq, ffhq.architecture, 3)
    assert sections["measurement"]["mask"] == {"kind": "box", "p": 0.4} and sections["measurement"]["sigma_y"] == 0.1
    assert sections["loss"]["vp_grid"] == "ddim" and sections["loss"]["sure_weight"] == 0.05
    # R = 4 lines at 256: the reference's 20 ACS lines plus each other line with probability 1/4, 79 lines on
    # average; the project's law keeps exactly round(256 / R) lines, so R = 256 / 79.
    law = gd.preset_sections(mri, mri.architecture, 2)["measurement"]["mask"]
    assert law["acs"] == 20 and law["R"] == 256 / 79
    from training.masks import mask_law_from_config

    assert mask_law_from_config(law).num_lines(256) == 79
    oracle = gd.preset("fmri_uncond_R1_noise0_0_img256")
    assert "loss" not in gd.preset_sections(oracle, oracle.architecture, 2)


@pytest.fixture(scope="module")
def mri_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("mri")
    phantoms = make_phantoms(str(root / "phantoms.zip"), num=2, resolution=16)
    run_cli(["dataset_tool.py", "simulate-mri", "--source", phantoms, "--dest", str(root / "mri"), "--coils", "4"])
    maps = str(root / "maps.npy")
    np.save(maps, MRIDataset(str(root / "mri"))[0]["maps"].numpy())
    return str(root / "mri"), maps


# A 16-pixel variant of each preset's layout, with the weights of the reference configs of the same layout.
TINY = {"fmri_msm_R4_noise0_0_img256": ("mri-legacy-fixed-heads", ["--resolution", 16, "--channels", 32,
                                                                   "--channel-mult", "1,1,2", "--blocks", 1,
                                                                   "--attn", "8,4", "--num-heads", 2]),
        "ffhq_msm_p04_noise0_1_img128": ("rgb-legacy", ["--resolution", 16, "--channels", 32, "--channel-mult",
                                                         "1,2,2", "--blocks", 2, "--attn", "8,4",
                                                         "--head-channels", 16])}


def convert_preset(preset: str, sources, dest, capsys):
    name, options = TINY[preset]
    code, err = run_in_process(convert_checkpoint.main, ["--from", "guided-diffusion", "--preset", preset,
                                                         "--source", sources[name], "--dest", dest, *options], capsys)
    assert code == 0, err
    return name


def test_presets_choose_the_msm_sampler_and_the_reference_grid(sources, tmp_path, capsys):
    """What generate.py and reconstruct.py decide from a converted preset without flags (the end-to-end runs below
    are slow tests)."""
    from training.sampling import generation, methods

    for preset in TINY:
        snapshot = str(tmp_path / f"{preset}.pt")
        convert_preset(preset, sources, snapshot, capsys)
        _, config = checkpoint.load_snapshot(snapshot)
        assert generation.resolve_sampler(None, config, 0) == "msm"
        sigmas, note = generation.msm_sigmas("vp200", 18, 0.002, 80.0, 7.0, config.get("loss"))
        assert len(sigmas) == 200 and abs(sigmas[0] - 151.18) < 0.01 and note.endswith("ddim grid")
        model = methods.load_model(snapshot, "cpu")
        options = methods.MethodOptions(msm_steps=4, num_subsets=2, dc_step=1.0, eta=0.85, outer="ddnm",
                                        dps_steps=4, dps_step=1.0, cs={})
        run = methods.Run(model, None, options, torch.device("cpu"))
        assert methods.msm_grid_rule(run) == "ddim" and abs(methods.msm_sigmas(run)[0][0] - 151.18) < 0.01


@pytest.mark.slow
def test_mri_preset_is_sampled_and_reconstructed_end_to_end(sources, mri_data, tmp_path, capsys):
    data, maps = mri_data
    snapshot = str(tmp_path / "fmri_msm_R4.pt")
    name = convert_preset("fmri_msm_R4_noise0_0_img256", sources, snapshot, capsys)
    net, config = checkpoint.load_snapshot(snapshot)
    assert (epsilon(net, CONFIGS[name]) - reference(name)["eps"]).abs().max() <= TOLERANCE
    assert config["measurement"]["mask"] == {"kind": "lines-random", "R": 16 / 6, "acs": 2}
    # generate.py: the MSM sampler (a masked training law) on the reference's ddim200 grid, without any flag
    # (K 1 to keep it short).
    proc = run_cli(["generate.py", "--network", snapshot, "--maps", maps, "--seeds", "0-1", "--subsets", "1",
                    "--outdir", str(tmp_path / "samples")])
    assert "msm batched, K = 1, 200 levels from sigma 151" in proc.stdout and "ddim grid" in proc.stdout
    assert sorted(n for n in os.listdir(tmp_path / "samples") if n.endswith(".png")) == ["000000.png", "000001.png"]
    # reconstruct.py: MSM posterior sampling of R = 4 measurements on 4 levels of the same grid.
    run_cli(["reconstruct.py", "--network", snapshot, "--data", data, "--task", "mri", "--indices", "0",
             "--seeds", "0", "--steps", "4", "--methods", "msm,zero-filled", "--outdir", str(tmp_path / "recon")])
    summary = json.load(open(tmp_path / "recon" / "summary.json"))
    msm = summary["settings"]["msm"]
    assert msm["vp_grid"] == "ddim" and msm["levels"] == 4 and abs(msm["sigma_max"] - 151.18) < 0.01
    with open(tmp_path / "recon" / "metrics.csv") as f:
        rows = [line for line in f if line.startswith("0,")]
    assert len(rows) == 2


@pytest.mark.slow
def test_image_preset_is_sampled_and_reconstructed_end_to_end(sources, tmp_path, capsys):
    snapshot = str(tmp_path / "ffhq_msm.pt")
    convert_preset("ffhq_msm_p04_noise0_1_img128", sources, snapshot, capsys)
    _, config = checkpoint.load_snapshot(snapshot)
    assert config["measurement"]["mask"] == {"kind": "box", "p": 0.4} and config["loss"]["pseudo_clean_grad"]
    proc = run_cli(["generate.py", "--network", snapshot, "--seeds", "0", "--subsets", "1", "--outdir",
                    str(tmp_path / "samples")])
    assert "msm batched, K = 1, 200 levels from sigma 151" in proc.stdout
    images = tmp_path / "rgb"
    images.mkdir()
    for i in range(2):
        pixels = np.random.default_rng(i).integers(0, 256, (16, 16, 3), dtype=np.uint8)
        PIL.Image.fromarray(pixels).save(images / f"{i}.png")
    run_cli(["reconstruct.py", "--network", snapshot, "--data", str(images), "--task", "box", "--num", "1",
             "--steps", "3", "--methods", "msm", "--outdir", str(tmp_path / "recon")])
    assert json.load(open(tmp_path / "recon" / "summary.json"))["settings"]["msm"]["vp_grid"] == "ddim"


class _Canary:
    """A pickled object whose loading would create a file: with weights_only it is never built."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def _edit(state: dict, **changes) -> dict:
    state = dict(state)
    for key, value in changes.items():
        if value is None:
            del state[key]
        else:
            state[key] = value
    return state


def test_malformed_sources_are_refused_in_one_sentence_with_nothing_written(sources, tmp_path, capsys):
    cfg = CONFIGS["rgb-legacy"]
    state = torch.load(sources["rgb-legacy"], weights_only=True)
    canary = tmp_path / "canary"
    bad = {
        "not a state dict": [torch.ones(3)],
        "holds a dict, not a state dict": {"time_embed.0.weight": 1.0},
        "has no weight time_embed.2.bias": _edit(state, **{"time_embed.2.bias": None}),
        "has a weight 'extra.weight'": _edit(state, **{"extra.weight": torch.zeros(2)}),
        "input_blocks.1.0.in_layers.2.weight has shape (32, 32, 1, 1)": _edit(
            state, **{"input_blocks.1.0.in_layers.2.weight": torch.zeros(32, 32, 1, 1)}),
        "NaN or infinite": _edit(state, **{"out.2.bias": torch.full((3,), math.nan)}),
        "strided convolutions": _edit(state, **{"input_blocks.3.0.op.weight": torch.zeros(32, 32, 3, 3)}),
        "without scale-shift norm": _edit(state, **{"input_blocks.1.0.emb_layers.1.weight": torch.zeros(32, 128)}),
        "learned variance": _edit(state, **{"out.2.weight": torch.zeros(6, 32, 3, 3), "out.2.bias": torch.zeros(6)}),
        "conditioning input channel": _edit(state, **{"input_blocks.0.0.weight": torch.zeros(32, 6, 3, 3)}),
    }
    cases = []
    for i, (message, content) in enumerate(bad.items()):
        path = tmp_path / f"bad{i}.pt"
        torch.save(content, path)
        cases.append((message, path))
    torch.save({"w": _Canary(str(canary))}, tmp_path / "code.pt")  # torch's zip format with code in data.pkl
    with open(tmp_path / "code.pkl", "wb") as f:  # a bare pickle with code
        pickle.dump({"w": _Canary(str(canary))}, f)
    cases += [("so it is not read", tmp_path / "code.pt"), ("as a zip archive", tmp_path / "code.pkl")]
    for message, path in cases:
        dest = tmp_path / "out.pt"
        code, err = run_in_process(convert_checkpoint.main, ["--from", "guided-diffusion", "--source", path,
                                                             "--dest", dest, *cli_architecture(cfg)], capsys)
        assert code == 1 and message in err, (message, err)
        assert err.count("\n") == 1 and err.startswith("Error: ") and not dest.exists()
    assert not canary.exists()

    options = ["--from", "guided-diffusion", "--source", sources["rgb-legacy"]]
    existing = tmp_path / "existing.pt"
    existing.write_bytes(b"keep")
    for message, args in {
        "already exists": [*options, "--dest", existing, *cli_architecture(cfg)],
        "give the network's architecture: --resolution": [*options, "--dest", tmp_path / "o.pt"],
        "is not one of the MSM reference's networks": [*options, "--dest", tmp_path / "o.pt", "--preset", "ffhq"],
        "apply to --from guided-diffusion": ["--from", "edm", "--source", sources["rgb-legacy"], "--dest",
                                             tmp_path / "o.pt", "--preset", "ffhq_msm_p04_noise0_0_img128"],
        "do not divide an attention layer of 64": [*options, "--dest", tmp_path / "o.pt",
                                                  *cli_architecture(cfg), "--head-channels", 24],
        "a fastMRI network with 2 channels": [*options, "--dest", tmp_path / "o.pt", "--preset",
                                              "fmri_msm_R4_noise0_0_img256", *TINY["ffhq_msm_p04_noise0_1_img128"][1]],
    }.items():
        code, err = run_in_process(convert_checkpoint.main, args, capsys)
        assert code == 1 and message in err and err.count("\n") == 1, (message, err)
        assert not (tmp_path / "o.pt").exists()
    assert existing.read_bytes() == b"keep"
