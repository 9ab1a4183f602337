"""guided-diffusion UNet state dicts (openai/guided-diffusion `UNetModel`, and the MSM reference's networks, which
are that class) -> this project's DhariwalUNet under DiscreteVPPrecond.

What guided-diffusion computes, and where it lands here (training/networks.py):
- eps(x_t, t): a UNet of the timestep index t of its 1000-step linear-beta schedule. DiscreteVPPrecond is exactly
  that epsilon predictor: D(x; s) = x - s F(x / sqrt(1 + s^2); t(s)) with x_t = sqrt(abar_t) x and t(s) the integer
  step of noise level s, so every sampler here drives the converted network at the reference's integer timesteps
  (on the reference's 'ddim200' grid, schedules.respaced_timesteps). The schedule is not stored in the file: the
  conversion assumes guided-diffusion's linear betas 1e-4 .. 0.02 over 1000 steps (the MSM reference's).
- timestep_embedding(t, C): [cos | sin] of t exp(-ln(10000) k / (C / 2)): DhariwalUNet's PositionalEmbedding
  (endpoint False) with timestep_embedding='guided-diffusion', its float32 rounding of the frequencies.
- time_embed (linear C -> 4C, SiLU, linear) -> noise_mlp; label_emb (an embedding table) -> label_embedding (its
  transpose: a linear map of one-hot labels; the all-zero vector then means "no label", which guided-diffusion has
  not, so give a class-conditional network its class).
- GroupNorm32 (32 groups, eps 1e-5, computed in float32) -> GroupNorm with norm_groups=32.
- ResBlock (scale-shift norm; resblock_updown: average-pool / nearest resampling inside the block, applied after the
  first norm + SiLU and to the skip path) -> UNetBlock with the ADM style: in_layers.0 / .2 -> norm0 / conv0,
  emb_layers.1 -> emb_proj, out_layers.0 / .3 -> norm1 / conv1 (dropout between is inactive in eval),
  skip_connection (1x1 where the width changes) -> skip. The zero-initialised out layers are ordinary weights here.
- AttentionBlock -> the block's SelfAttention: norm -> norm; qkv, proj_out (1-D convolutions (out, in, 1)) ->
  qkv, proj (2-D (out, in, 1, 1)). Heads: num_head_channels (channels_per_head) or a fixed num_heads. The qkv rows:
  the new order (QKVAttention: chunk into q | k | v, then heads) is the project's (q/k/v, head, channel); the legacy
  order (QKVAttentionLegacy, use_new_attention_order False, the MSM reference's) is (head, q/k/v, channel), permuted
  here. The softmax(q k^T / sqrt(d)) v is the same in both.
- input_blocks[0] (conv) -> input_conv; per level, the res blocks (+ attention) -> encoder[level], the down block
  after each level but the last -> down_blocks; middle_block (res, attention, res) -> middle[0] (+ attention),
  middle[1]; output_blocks -> decoder[level] (+ attention), the up block ending each level but the first ->
  up_blocks[level - 1]; out (norm, SiLU, conv) -> output_heads[0]. Skip connections pair up in the same order.

Refused, each in one sentence: anything but a plain state dict of tensors (read with torch.load(weights_only=True),
so a pickle with code is never executed), keys or shapes other than those of the declared architecture,
non-finite weights, and what DhariwalUNet cannot represent: no scale-shift norm, strided-convolution or
block-free resampling (resblock_updown False), fractional channel multipliers, widths GroupNorm32 cannot split,
attention widths the head size does not divide, a different head count for the decoder, extra conditioning input
channels (super-resolution models, the reference's cond_channels), and learned sigma (6 output channels for 3)
unless drop_variance asks to keep only the epsilon half.
"""

import dataclasses
import math
import os

import torch

from dnnlib import UserError, file_sha256
from torch_utils import archive
from training.masks import default_acs
from training.networks import NetworkConfigError, _check_layout

ATTENTION_ORDERS = ("legacy", "new")
NUM_STEPS, BETA_START, BETA_END = 1000, 1e-4, 0.02  # guided-diffusion's linear schedule, the MSM reference's
# The largest published guided-diffusion UNet (ImageNet 512, class-conditional) holds about 2.2 GB of float32 weights.
MAX_SOURCE_BYTES = 4 << 30
GROUPS = 32  # guided-diffusion's normalization(): GroupNorm32(32, channels)


@dataclasses.dataclass(frozen=True)
class Architecture:
    """The guided-diffusion UNetModel options the file does not record (its input / output channels and class count
    are read from the weights). attention_resolutions are image sizes, as in guided-diffusion's option string
    '32,16,8'; num_head_channels -1 means a fixed num_heads (then num_heads_upsample must be -1 or equal)."""

    image_size: int
    model_channels: int
    channel_mult: tuple
    num_res_blocks: int
    attention_resolutions: tuple
    num_head_channels: int = 64
    num_heads: int = 4
    num_heads_upsample: int = -1
    attention_order: str = "legacy"
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True


@dataclasses.dataclass(frozen=True)
class Preset:
    """One of the MSM reference's published networks: its architecture and the data and measurement process it was
    trained with (recorded in the snapshot, so generate.py and reconstruct.py need no flags)."""

    name: str
    architecture: Architecture
    data: str  # 'ffhq' (RGB in [-1, 1]) or 'fastmri' (complex coil-combined image as 2 channels)
    mask: str  # 'full' (oracle), 'box' (p = 0.4) or 'lines' (R = 4 random lines plus the centre ACS lines)
    sigma_y: float  # measurement noise std eta of the training data
    what: str  # one line for the log and the docs


def _reference(size: int, mult: tuple) -> Architecture:
    # The reference's configs: num_channels 128, num_res_blocks 2, attention_resolutions "32,16,8",
    # num_head_channels 64, use_scale_shift_norm, resblock_updown, use_new_attention_order False, channel_mult ""
    # (guided-diffusion's default for the image size: 128 -> (1, 1, 2, 3, 4), 256 -> (1, 1, 2, 2, 4, 4)).
    return Architecture(image_size=size, model_channels=128, channel_mult=mult, num_res_blocks=2,
                        attention_resolutions=(32, 16, 8), num_head_channels=64, attention_order="legacy")


_FFHQ, _FASTMRI = _reference(128, (1, 1, 2, 3, 4)), _reference(256, (1, 1, 2, 2, 4, 4))
PRESETS = {p.name: p for p in (
    Preset("ffhq_uncond_p00_noise0_0_img128", _FFHQ, "ffhq", "full", 0.0, "FFHQ 128 oracle (clean images)"),
    Preset("ffhq_msm_p04_noise0_0_img128", _FFHQ, "ffhq", "box", 0.0, "FFHQ 128 MSM, box masks p = 0.4"),
    Preset("ffhq_msm_p04_noise0_1_img128", _FFHQ, "ffhq", "box", 0.1, "FFHQ 128 MSM, box masks p = 0.4, eta 0.1"),
    Preset("fmri_uncond_R1_noise0_0_img256", _FASTMRI, "fastmri", "full", 0.0,
           "fastMRI brain 256 oracle (R = 1, fully sampled)"),
    Preset("fmri_msm_R4_noise0_0_img256", _FASTMRI, "fastmri", "lines", 0.0, "fastMRI brain 256 MSM, R = 4"),
    Preset("fmri_msm_R4_noise0_1_img256", _FASTMRI, "fastmri", "lines", 0.1,
           "fastMRI brain 256 MSM, R = 4, eta 0.1"),
)}

REFERENCE_ACS = 20  # the reference's randomly_cartesian_mask keeps the centre lines W/2 - 10 .. W/2 + 9
REFERENCE_ACCEL = 4
BOX_P = 0.4


def preset(name: str) -> Preset:
    """A preset by its published file name, with or without '.pt'."""
    key = name[:-3] if name.endswith(".pt") else name
    if key not in PRESETS:
        raise UserError(f"--preset {name} is not one of the MSM reference's networks ({', '.join(PRESETS)}).")
    return PRESETS[key]


def reference_line_law(width: int) -> dict:
    """The project's line law closest to the reference's R = 4 training masks at image width W: the reference keeps
    its 20 centre lines (all of them when W <= 20) and each other line with probability 1/4, i.e. 20 + (W - 20) / 4
    lines on average (79 at 256, effective R 3.24), where the project's 'lines-random' keeps exactly round(W / R)
    lines, ACS included. So R is recorded as W / that count: masks of the density the network was trained on."""
    acs = min(REFERENCE_ACS, width) if width >= 2 * REFERENCE_ACS else default_acs(width)
    lines = acs + math.floor((width - acs) / REFERENCE_ACCEL + 0.5)
    return {"kind": "lines-random", "R": width / lines, "acs": acs}


# ----------------------------------------------------------------------------------------------------------------------
# Reading the file.


def read_state_dict(path: str) -> tuple[dict, str]:
    """A guided-diffusion checkpoint as {name: float32 tensor} and the sha256 of the file. Read with
    torch.load(weights_only=True): plain tensors in (nested) dicts only, so no code in the file ever runs."""
    if not os.path.isfile(path):
        raise UserError(f"--source {path} does not exist.")
    # Sizes from the archive's index before any tensor is read: a small file may declare gigabytes (a deflated zero
    # storage), and storages no tensor uses are data a state dict does not hold.
    index = archive.read_index(path, f"--source {path}")
    used = {e.key for e in archive.tensor_entries(index.root).values()}
    if index.total_bytes > MAX_SOURCE_BYTES or (isinstance(index.root, dict) and set(index.storages) - used):
        problem = (f"{index.total_bytes} bytes of tensors, more than the {MAX_SOURCE_BYTES >> 30} GiB of any published "
                   "guided-diffusion UNet" if index.total_bytes > MAX_SOURCE_BYTES else "storages no tensor uses")
        raise UserError(f"--source {path} is refused: it declares {problem}.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for pickles with code, foreign or torn files
        raise UserError(f"--source {path} is refused: it is not a state dict of plain tensors that "
                        f"torch.load(weights_only=True) can read ({type(e).__name__}); nothing in it was run.") from e
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise UserError(f"--source {path} is refused: it holds a {type(state).__name__}, not a state dict "
                        "{name: tensor} of a guided-diffusion UNet.")
    for name, value in state.items():
        if not torch.is_floating_point(value):
            raise UserError(f"--source {path} is refused: its weight {name!r:.80} is {value.dtype}, not a float "
                            "tensor.")
        if not bool(torch.isfinite(value).all()):
            raise UserError(f"--source {path} is refused: its weight {name!r:.80} holds NaN or infinite values.")
    return {k: v.to(torch.float32) for k, v in state.items()}, file_sha256(path)


def _shape(state: dict, key: str, path: str) -> tuple:
    if key not in state:
        raise UserError(f"--source {path} is refused: it has no weight {key}, so it is not a guided-diffusion UNet "
                        "(or not of the declared architecture).")
    return tuple(state[key].shape)


def _check_representable(arch: Architecture, state: dict, path: str) -> tuple[int, int, int]:
    """Refuse what DhariwalUNet cannot represent -> (in_channels, out_channels, num_classes) read from the weights."""
    where = f"--source {path} is refused"
    if any(k.endswith(".op.weight") or k.endswith(".conv.weight") for k in state) or not arch.resblock_updown:
        raise UserError(f"{where}: it resamples with strided convolutions or without residual blocks "
                        "(resblock_updown False), which DhariwalUNet cannot represent.")
    emb = _shape(state, "input_blocks.1.0.emb_layers.1.weight", path)
    width = _shape(state, "input_blocks.1.0.in_layers.2.weight", path)[0]
    if not arch.use_scale_shift_norm or emb[0] != 2 * width:
        raise UserError(f"{where}: its residual blocks add the timestep embedding without scale-shift norm "
                        "(use_scale_shift_norm False), which DhariwalUNet cannot represent.")
    if any(int(m) != m or m < 1 for m in arch.channel_mult):
        raise UserError(f"{where}: channel multipliers {list(arch.channel_mult)} are not positive integers.")
    if arch.attention_order not in ATTENTION_ORDERS:
        raise UserError(f"The attention order must be one of {', '.join(ATTENTION_ORDERS)}, got "
                        f"{arch.attention_order!r}.")
    in_channels = _shape(state, "input_blocks.0.0.weight", path)[1]
    out_channels = _shape(state, "out.2.weight", path)[0]
    num_classes = _shape(state, "label_emb.weight", path)[0] if "label_emb.weight" in state else 0
    return in_channels, out_channels, num_classes


def _attention_levels(arch: Architecture) -> set:
    return {level for level in range(len(arch.channel_mult)) if arch.image_size >> level in
            {int(r) for r in arch.attention_resolutions}}


def _check_widths(arch: Architecture):
    """GroupNorm32 and the attention heads must split every width exactly, as guided-diffusion itself asserts."""
    widths = {arch.model_channels * int(m) for m in arch.channel_mult}
    odd = sorted(w for w in widths if w % GROUPS)
    if odd:
        raise UserError(f"A layer of {odd[0]} channels cannot be split into guided-diffusion's {GROUPS} GroupNorm "
                        "groups; no guided-diffusion UNet has that architecture.")
    levels = _attention_levels(arch) | {len(arch.channel_mult) - 1}  # the middle block attends at the last level
    for level in sorted(levels):
        width = arch.model_channels * int(arch.channel_mult[level])
        heads = arch.num_heads if arch.num_head_channels == -1 else None
        if heads is None and (arch.num_head_channels < 1 or width % arch.num_head_channels):
            raise UserError(f"Attention heads of {arch.num_head_channels} channels do not divide an attention layer "
                            f"of {width} channels.")
        if heads is not None and (heads < 1 or width % heads):
            raise UserError(f"{heads} attention heads do not divide an attention layer of {width} channels.")
    if arch.num_head_channels == -1 and arch.num_heads_upsample not in (-1, arch.num_heads):
        raise UserError(f"A decoder head count ({arch.num_heads_upsample}) other than the encoder's "
                        f"({arch.num_heads}) cannot be represented: DhariwalUNet uses one head rule everywhere.")


def _heads(arch: Architecture, width: int) -> int:
    return arch.num_heads if arch.num_head_channels == -1 else width // arch.num_head_channels


# ----------------------------------------------------------------------------------------------------------------------
# The key table.


class _Mapper:
    """Moves tensors from the guided-diffusion state dict into the project's, checking every shape on the way and
    remembering what it consumed (whatever is left over is refused)."""

    def __init__(self, state: dict, path: str, arch: Architecture):
        self.state, self.path, self.arch, self.out, self.used = state, path, arch, {}, set()

    def take(self, key: str, shape: tuple) -> torch.Tensor:
        found = _shape(self.state, key, self.path)
        if found != tuple(shape):
            raise UserError(f"--source {self.path} is refused: its weight {key} has shape {found}, but the declared "
                            f"architecture needs {tuple(shape)}.")
        self.used.add(key)
        return self.state[key]

    def put(self, dest: str, value: torch.Tensor):
        self.out[f"model.{dest}"] = value.contiguous()

    def copy(self, src: str, dest: str, shape: tuple):
        self.put(dest, self.take(src, shape))

    def conv1d(self, src: str, dest: str, cout: int, cin: int, rows=None):
        """A 1-D convolution (out, in, 1) and its bias -> a 2-D 1x1 one, rows reordered by `rows` (an index)."""
        weight = self.take(f"{src}.weight", (cout, cin, 1))[..., None]
        bias = self.take(f"{src}.bias", (cout,))
        if rows is not None:
            weight, bias = weight[rows], bias[rows]
        self.put(f"{dest}.weight", weight)
        self.put(f"{dest}.bias", bias)

    def layer(self, src: str, dest: str, weight_shape: tuple):
        self.copy(f"{src}.weight", f"{dest}.weight", weight_shape)
        self.copy(f"{src}.bias", f"{dest}.bias", weight_shape[:1])

    def norm(self, src: str, dest: str, channels: int):
        self.layer(src, dest, (channels,))

    def resblock(self, src: str, dest: str, cin: int, cout: int, emb: int):
        self.norm(f"{src}.in_layers.0", f"{dest}.norm0", cin)
        self.layer(f"{src}.in_layers.2", f"{dest}.conv0", (cout, cin, 3, 3))
        self.layer(f"{src}.emb_layers.1", f"{dest}.emb_proj", (2 * cout, emb))
        self.norm(f"{src}.out_layers.0", f"{dest}.norm1", cout)
        self.layer(f"{src}.out_layers.3", f"{dest}.conv1", (cout, cout, 3, 3))
        if cin != cout:
            self.layer(f"{src}.skip_connection", f"{dest}.skip", (cout, cin, 1, 1))

    def attention(self, src: str, dest: str, channels: int):
        heads = _heads(self.arch, channels)
        self.norm(f"{src}.norm", f"{dest}.attention.norm", channels)
        self.conv1d(f"{src}.qkv", f"{dest}.attention.qkv", 3 * channels, channels,
                    rows=qkv_rows(channels, heads) if self.arch.attention_order == "legacy" else None)
        self.conv1d(f"{src}.proj_out", f"{dest}.attention.proj", channels, channels)


def qkv_rows(channels: int, heads: int) -> torch.Tensor:
    """Row index turning guided-diffusion's legacy qkv layout (head, q/k/v, channel) into the project's (q/k/v, head,
    channel): row (s, h, c) of the result is row (h, s, c) of the legacy weight."""
    legacy = torch.arange(3 * channels).reshape(heads, 3, channels // heads)
    return legacy.transpose(0, 1).reshape(-1)


def map_state_dict(state: dict, arch: Architecture, path: str, in_channels: int, out_channels: int,
                   num_classes: int, drop_variance: bool) -> tuple[dict, int]:
    """The project's state dict (prefix 'model.' of DiscreteVPPrecond) from guided-diffusion's -> (state, output
    channels kept)."""
    m = _Mapper(state, path, arch)
    mc, mults, blocks = arch.model_channels, [int(x) for x in arch.channel_mult], arch.num_res_blocks
    emb = 4 * mc
    attention_at = _attention_levels(arch)
    m.layer("time_embed.0", "noise_mlp.0", (emb, mc))
    m.layer("time_embed.2", "noise_mlp.2", (emb, emb))
    if num_classes:
        m.put("label_embedding.weight", m.take("label_emb.weight", (num_classes, emb)).T)
    c = mc * mults[0]
    m.layer("input_blocks.0.0", "input_conv", (c, in_channels, 3, 3))
    skips, index = [c], 1
    for level, mult in enumerate(mults):
        if level > 0:  # guided-diffusion ends each level but the last with a down block; here it opens the next
            m.resblock(f"input_blocks.{index}.0", f"down_blocks.{level - 1}", c, c, emb)
            skips.append(c)
            index += 1
        for k in range(blocks):
            m.resblock(f"input_blocks.{index}.0", f"encoder.{level}.{k}", c, mc * mult, emb)
            c = mc * mult
            if level in attention_at:
                m.attention(f"input_blocks.{index}.1", f"encoder.{level}.{k}", c)
            skips.append(c)
            index += 1
    m.resblock("middle_block.0", "middle.0", c, c, emb)
    m.attention("middle_block.1", "middle.0", c)
    m.resblock("middle_block.2", "middle.1", c, c, emb)
    index = 0
    for level in reversed(range(len(mults))):
        for k in range(blocks + 1):
            cout = mc * mults[level]
            m.resblock(f"output_blocks.{index}.0", f"decoder.{level}.{k}", c + skips.pop(), cout, emb)
            c = cout
            layer = 1
            if level in attention_at:
                m.attention(f"output_blocks.{index}.1", f"decoder.{level}.{k}", c)
                layer = 2
            if level > 0 and k == blocks:  # the up block ending this level opens level - 1 here
                m.resblock(f"output_blocks.{index}.{layer}", f"up_blocks.{level - 1}", c, c, emb)
            index += 1
    m.norm("out.0", "output_heads.0.0", c)
    kept = out_channels
    if out_channels == 2 * in_channels:
        if not drop_variance:
            raise UserError(f"--source {path} is refused: it predicts a learned variance besides epsilon "
                            f"({out_channels} output channels for {in_channels}); pass --drop-variance to keep only "
                            "the epsilon half (the samplers here do not use the variance).")
        kept = in_channels
    elif out_channels != in_channels:
        extra = in_channels - out_channels
        raise UserError(f"--source {path} is refused: it takes {extra} conditioning input channel(s) besides its "
                        f"{out_channels} image channel(s) (a super-resolution model or the reference's "
                        "cond_channels), which the converted network cannot be fed." if extra > 0 else
                        f"--source {path} is refused: {out_channels} output channels for {in_channels} input "
                        "channels is neither epsilon nor epsilon and variance.")
    weight = m.take("out.2.weight", (out_channels, c, 3, 3))
    bias = m.take("out.2.bias", (out_channels,))
    m.put("output_heads.0.2.weight", weight[:kept])
    m.put("output_heads.0.2.bias", bias[:kept])
    extra_keys = sorted(set(state) - m.used)
    if extra_keys:
        raise UserError(f"--source {path} is refused: it has a weight {extra_keys[0]!r:.80} that the declared "
                        "architecture does not have.")
    return m.out, kept


# ----------------------------------------------------------------------------------------------------------------------
# The snapshot config.


def network_config(arch: Architecture, channels: int, num_classes: int) -> dict:
    heads = ({"num_heads": arch.num_heads} if arch.num_head_channels == -1 else
             {"channels_per_head": arch.num_head_channels})
    return {"class_name": "training.networks.DiscreteVPPrecond",
            "kwargs": {"img_resolution": arch.image_size, "in_channels": channels, "out_channels": channels,
                       "label_dim": num_classes, "num_steps": NUM_STEPS, "beta_start": BETA_START,
                       "beta_end": BETA_END, "model_type": "DhariwalUNet", "model_channels": arch.model_channels,
                       "channel_mult": [int(m) for m in arch.channel_mult], "channel_mult_emb": 4,
                       "num_blocks": arch.num_res_blocks,
                       "attn_resolutions": sorted({int(r) for r in arch.attention_resolutions}, reverse=True),
                       "dropout": 0.0, **heads, "norm_groups": GROUPS, "timestep_embedding": "guided-diffusion"}}


def preset_sections(p: Preset, arch: Architecture, channels: int) -> dict:
    """The dataset, measurement and loss sections of a preset's snapshot (at the architecture's image size, so a
    smaller variant of a preset's layout gets the law at its own size)."""
    size = arch.image_size
    if p.data == "fastmri":
        if channels != 2:
            raise UserError(f"Preset {p.name} is a fastMRI network with 2 channels (the complex image), but the "
                            f"file has {channels}.")
        dataset = {"kind": "mri", "shape": [size, size], "image_channels": 2, "fully_sampled": True,
                   "normalisation": {"rule": "the MSM reference's: each slice's coil-combined image scaled so its "
                                             "magnitude spans [0, 1] (min-max)"}}
        operator, mask = "mri", reference_line_law(size) if p.mask == "lines" else {"kind": "full"}
    else:
        dataset = {"kind": "image", "image_shape": [channels, size, size], "label_dim": 0}
        operator, mask = "identity", {"kind": "box", "p": BOX_P} if p.mask == "box" else {"kind": "full"}
    # The reference draws a new mask for every training draw ('resample').
    measurement = {"operator": operator, "mask": mask, "sigma_y": p.sigma_y, "protocol": "resample", "seed": 0}
    sections = {"dataset": dataset, "measurement": measurement}
    if p.mask != "full":  # MSM: epsilon MSE on observed entries at uniform levels of the 'ddim200' grid
        loss = {"class_name": "training.loss.MSMLoss", "measurement": measurement, "sigma_dist": "vp200",
                "vp_grid": "ddim", "weighting": "inverse-variance"}
        if p.sigma_y > 0:  # the reference's SURE: tau 0.005, weight 0.05, gradients through the pseudo-clean target
            loss.update(sure_tau=0.005, sure_weight=0.05, pseudo_clean_grad=True)
        sections["loss"] = loss
    return sections


@dataclasses.dataclass
class Converted:
    config: dict
    state: dict
    source: dict
    notes: list


def convert_guided_diffusion(path: str, arch: Architecture, preset_entry: Preset | None = None,
                             drop_variance: bool = False) -> Converted:
    """A guided-diffusion state dict file -> the snapshot config, the project's state dict, a 'source' record and
    notes for the log (training/conversion `write_converted_snapshot` writes them)."""
    state, digest = read_state_dict(path)
    in_channels, out_channels, num_classes = _check_representable(arch, state, path)
    _check_widths(arch)
    try:
        _check_layout(arch.image_size, [int(m) for m in arch.channel_mult], arch.num_res_blocks)
    except NetworkConfigError as e:
        raise UserError(str(e)) from e
    mapped, channels = map_state_dict(state, arch, path, in_channels, out_channels, num_classes, drop_variance)
    config = {"network": network_config(arch, channels, num_classes)}
    if preset_entry is not None:
        if num_classes:
            raise UserError(f"--source {path} is class-conditional, but preset {preset_entry.name} is not.")
        config.update(preset_sections(preset_entry, arch, channels))
    else:
        config["dataset"] = {"kind": "image", "image_shape": [channels, arch.image_size, arch.image_size],
                             "label_dim": num_classes}
    source = {"format": "guided-diffusion", "file": os.path.basename(path), "sha256": digest,
              "preset": preset_entry.name if preset_entry else None,
              "architecture": {k: list(v) if isinstance(v, tuple) else v
                               for k, v in dataclasses.asdict(arch).items()},
              "schedule": f"linear betas {BETA_START:g} .. {BETA_END:g}, {NUM_STEPS} steps (assumed)"}
    notes = [f"{len(state)} tensors, {sum(v.numel() for v in state.values()) / 1e6:.1f} M parameters; attention "
             f"order {arch.attention_order}; assumed guided-diffusion's linear 1000-step schedule"]
    if channels != out_channels:
        notes.append(f"kept the epsilon half of {out_channels} output channels (learned variance dropped)")
    if preset_entry is not None:
        notes.append(f"preset {preset_entry.name}: {preset_entry.what}; measurement "
                     f"{config['measurement']['mask']}, sigma_y {preset_entry.sigma_y:g}")
    return Converted(config, mapped, source, notes)
