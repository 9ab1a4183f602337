"""Denoiser networks and their preconditioning, after Karras et al. 2022 ("Elucidating the Design Space of
Diffusion-Based Generative Models", EDM).

- `SongUNet`: the DDPM++ / NCSN++ UNets of Song et al. 2021 ("Score-Based Generative Modeling through SDEs").
- `DhariwalUNet`: the ADM UNet of Dhariwal & Nichol 2021 ("Diffusion Models Beat GANs on Image Synthesis").
- `EDMPrecond`, `VPPrecond`, `VEPrecond`: D(x; sigma) = c_skip x + c_out F(c_in x; c_noise), EDM Table 1;
  `DiscreteVPPrecond`: VP on the discrete DDPM schedule with integer timesteps (the MSM reference's network).
- `ARCH_PRESETS` and `network_kwargs_for`: the `--arch` / `--precond` choices of train.py.
- `NETWORK_REGISTRY`, `register_network` and `build_network`: the only classes a stored config may build, each with
  a table of the keyword arguments it may set (see "Registry" at the end of this file for how to register a class).

Conventions: images are float (N, C, H, W); a noise level sigma is given per example; class labels are one-hot float
(N, label_dim), with the all-zero vector meaning "no label" (classifier-free guidance). Every constructor argument is
JSON-serialisable (ints, floats, strings, lists), so a snapshot stores `{'class_name': ..., 'kwargs': ...}` and
`build_network` rebuilds the network from it after checking both against the registry. Weights are drawn from a
`torch.Generator` seeded by the `init_seed` argument, never from the global RNG, so building a network neither depends
on nor disturbs the global random state.
"""

import dataclasses
import inspect
import json
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dnnlib import ConfigError, Field, UserError, check_fields
from training.schedules import linear_beta_alphas_cumprod


class NetworkConfigError(UserError, ValueError):
    """An impossible network configuration: a ValueError for library callers, a UserError so that scripts print the
    one-sentence message and exit cleanly."""


def _largest_divisor_at_most(n: int, limit: int) -> int:
    """The largest divisor of n that is <= max(limit, 1); used to pick group and head counts that divide channels."""
    for d in range(max(min(limit, n), 1), 0, -1):
        if n % d == 0:
            return d
    return 1


# ----------------------------------------------------------------------------------------------------------------------
# Weight initialisation and basic layers.

INIT_MODES = ("xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal")


def init_tensor(shape, mode: str, fan_in: int, fan_out: int, generator: torch.Generator) -> torch.Tensor:
    """Variance-scaling initialisation with unit gain, drawn from `generator`.

    Variance 2 / (fan_in + fan_out) for 'xavier_*' (Glorot & Bengio) and 1 / fan_in for 'kaiming_*' (He et al., linear
    gain); '*_uniform' draws from U(-sqrt(3 var), sqrt(3 var)), '*_normal' from N(0, var). The layers below multiply
    the result by their `init_weight` / `init_bias` scale; e.g. PyTorch's default layer init, which ADM keeps, is
    'kaiming_uniform' with scale sqrt(1/3).
    """
    if mode not in INIT_MODES:
        raise NetworkConfigError(f"init_mode must be one of {', '.join(INIT_MODES)}, got {mode!r}.")
    variance = 2 / (fan_in + fan_out) if mode.startswith("xavier") else 1 / fan_in
    if mode.endswith("uniform"):
        return (torch.rand(shape, generator=generator) * 2 - 1) * math.sqrt(3 * variance)
    return torch.randn(shape, generator=generator) * math.sqrt(variance)


class Linear(nn.Module):
    """Fully connected layer y = x W^T + b with explicit initialisation (see `init_tensor`)."""

    def __init__(self, in_features: int, out_features: int, *, generator: torch.Generator, bias: bool = True,
                 init_mode: str = "kaiming_normal", init_weight: float = 1.0, init_bias: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        shape_args = dict(mode=init_mode, fan_in=in_features, fan_out=out_features, generator=generator)
        self.weight = nn.Parameter(init_weight * init_tensor((out_features, in_features), **shape_args))
        self.bias = nn.Parameter(init_bias * init_tensor((out_features,), **shape_args)) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


def fir_filter(taps) -> torch.Tensor:
    """Separable 2-D FIR filter from 1-D taps (even length, symmetric, positive sum), normalised to sum 1: (L, L)."""
    taps = [float(t) for t in taps]
    if len(taps) % 2 != 0 or taps != taps[::-1] or sum(taps) <= 0:
        raise NetworkConfigError(f"resample_filter must be symmetric taps of even length such as [1, 1] or "
                                 f"[1, 3, 3, 1], got {taps}.")
    t = torch.tensor(taps, dtype=torch.float32)
    t = t / t.sum()
    return torch.outer(t, t)


class Resample2x(nn.Module):
    """Factor-2 up- or down-sampling of every channel with a FIR filter (no learned weights).

    down: y = (f conv x) taken at every other pixel; taps [1, 1] is 2x2 average pooling.
    up:   zero insertion then 4 f conv, the exact adjoint of `down` times 4; taps [1, 1] is nearest-neighbour.
    Both are centred: pixel i of the coarse grid sits between pixels 2i and 2i + 1 of the fine grid. Shapes:
    (N, C, H, W) -> (N, C, H/2, W/2) or (N, C, 2H, 2W); H and W must be even for `down`.
    """

    def __init__(self, direction: str, resample_filter=(1, 1)):
        super().__init__()
        if direction not in ("up", "down"):
            raise NetworkConfigError(f"Resample2x direction must be 'up' or 'down', got {direction!r}.")
        self.direction = direction
        self.register_buffer("filter", fir_filter(resample_filter), persistent=False)
        self.padding = (self.filter.shape[-1] - 1) // 2

    def forward(self, x):
        channels = x.shape[1]
        if self.direction == "down":
            weight = self.filter.to(x.dtype).expand(channels, 1, -1, -1)
            return F.conv2d(x, weight, stride=2, padding=self.padding, groups=channels)
        weight = (self.filter * 4).to(x.dtype).expand(channels, 1, -1, -1)
        return F.conv_transpose2d(x, weight, stride=2, padding=self.padding, groups=channels)


class Conv2d(nn.Module):
    """k x k convolution with 'same' zero padding (k odd), optionally combined with 2x FIR resampling.

    resample=None: plain convolution. resample='up' / 'down': the image is resampled with `Resample2x` and then
    convolved at the new resolution. fused=True (only with 'down'): one stride-2 convolution whose kernel is the
    convolution kernel composed with the FIR filter, i.e. convolution at the fine resolution followed by filtered
    decimation in one call (Song et al.'s FIR down-sampling convolution, used by NCSN++'s residual input path).
    Shapes: (N, in_channels, H, W) -> (N, out_channels, H', W') with H' = H, 2H or H/2.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, *, generator: torch.Generator,
                 bias: bool = True, resample: str | None = None, resample_filter=(1, 1), fused: bool = False,
                 init_mode: str = "kaiming_normal", init_weight: float = 1.0, init_bias: float = 0.0):
        super().__init__()
        if kernel < 1 or kernel % 2 == 0:
            raise NetworkConfigError(f"Conv2d kernel size must be a positive odd number, got {kernel}.")
        if fused and resample != "down":
            raise NetworkConfigError("Conv2d fused=True fuses a convolution with down-sampling; set resample='down'.")
        self.in_channels, self.out_channels, self.fused = in_channels, out_channels, fused
        fans = dict(mode=init_mode, fan_in=in_channels * kernel**2, fan_out=out_channels * kernel**2,
                    generator=generator)
        self.weight = nn.Parameter(init_weight * init_tensor((out_channels, in_channels, kernel, kernel), **fans))
        self.bias = nn.Parameter(init_bias * init_tensor((out_channels,), **fans)) if bias else None
        self.resample = Resample2x(resample, resample_filter) if resample is not None else None

    def forward(self, x):
        weight, bias = self.weight, self.bias
        kernel_padding = weight.shape[-1] // 2
        if self.fused:
            taps = self.resample.filter
            size = taps.shape[-1]
            # Full 2-D convolution of every (out, in) kernel with the filter: a (k + L - 1)^2 kernel.
            composed = F.conv2d(weight.reshape(-1, 1, *weight.shape[-2:]), taps.flip(-1, -2)[None, None],
                                padding=size - 1)
            composed = composed.reshape(*weight.shape[:2], *composed.shape[-2:])
            return F.conv2d(x, composed, bias, stride=2, padding=kernel_padding + self.resample.padding)
        if self.resample is not None:
            x = self.resample(x)
        return F.conv2d(x, weight, bias, padding=kernel_padding)


class GroupNorm(nn.Module):
    """Group normalisation with min(max_groups, C // min_channels_per_group) groups (rounded down to a divisor of C,
    at least 1), so that narrow layers of small CPU networks still get several channels per group; or, with
    num_groups > 0, exactly that many groups (guided-diffusion's GroupNorm32 is num_groups=32), which must divide C.
    Statistics are computed in the parameters' precision (float32) even for bf16 activations; the output keeps the
    input dtype."""

    def __init__(self, num_channels: int, *, eps: float = 1e-5, max_groups: int = 32, min_channels_per_group: int = 4,
                 num_groups: int = 0):
        super().__init__()
        if num_groups:
            if num_groups < 0 or num_channels % num_groups:
                raise NetworkConfigError(f"norm_groups {num_groups} does not divide a layer of {num_channels} "
                                         "channels.")
            self.num_groups = int(num_groups)
        else:
            groups = min(max_groups, num_channels // min_channels_per_group)
            self.num_groups = _largest_divisor_at_most(num_channels, groups)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        return F.group_norm(x.to(self.weight.dtype), self.num_groups, self.weight, self.bias, self.eps).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# Noise-level embeddings.


TIMESTEP_EMBEDDINGS = ("edm", "guided-diffusion")


class PositionalEmbedding(nn.Module):
    """Transformer-style sinusoidal embedding of a scalar noise label: (N,) -> (N, num_channels).

    Output [cos(x w_0), ..., cos(x w_{h-1}), sin(x w_0), ..., sin(x w_{h-1})] with h = num_channels / 2 frequencies
    spaced geometrically from 1 down to 1 / max_positions (reached exactly when endpoint=True, as in DDPM++; one step
    short when endpoint=False, as in ADM).

    rounding: how the float32 frequencies w_k = max_positions^(-k / steps) are computed: 'edm' as a power (the
    default), 'guided-diffusion' as exp(-ln(max_positions) k / h) in float32, the ADM code's formula (endpoint=False
    only). The two differ in the last bit of some frequencies, which moves the embedding of t ~ 1000 by up to 3e-5:
    a network converted from guided-diffusion reproduces its source to float32 precision only with its own rounding.
    """

    def __init__(self, num_channels: int, *, max_positions: float = 10000.0, endpoint: bool = False,
                 rounding: str = "edm"):
        super().__init__()
        if num_channels < 2 or num_channels % 2:
            raise NetworkConfigError(f"The positional noise embedding needs an even channel count, got {num_channels}.")
        if rounding not in TIMESTEP_EMBEDDINGS or (rounding == "guided-diffusion" and endpoint):
            raise NetworkConfigError(f"timestep_embedding must be one of {', '.join(TIMESTEP_EMBEDDINGS)} "
                                     f"('guided-diffusion' only without endpoint), got {rounding!r}.")
        half = num_channels // 2
        steps = max(half - 1, 1) if endpoint else half
        if rounding == "guided-diffusion":
            freqs = torch.exp(-math.log(max_positions) * torch.arange(half, dtype=torch.float32) / half)
        else:
            freqs = (1 / max_positions) ** (torch.arange(half, dtype=torch.float32) / steps)
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, x):
        angles = torch.outer(x.to(torch.float32), self.freqs)
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features of a scalar noise label (NCSN++): (N,) -> (N, num_channels).

    Output [cos(2 pi x w), sin(2 pi x w)] with num_channels / 2 fixed frequencies w ~ N(0, scale^2) drawn from the
    generator at construction; they are a persistent buffer, so a loaded state dict restores them.
    """

    def __init__(self, num_channels: int, *, generator: torch.Generator, scale: float = 16.0):
        super().__init__()
        if num_channels < 2 or num_channels % 2:
            raise NetworkConfigError(f"The Fourier noise embedding needs an even channel count, got {num_channels}.")
        self.register_buffer("freqs", torch.randn(num_channels // 2, generator=generator) * scale)

    def forward(self, x):
        angles = torch.outer(x.to(torch.float32), 2 * np.pi * self.freqs)
        return torch.cat([angles.cos(), angles.sin()], dim=1)


# ----------------------------------------------------------------------------------------------------------------------
# UNet blocks.


@dataclasses.dataclass(frozen=True)
class BlockStyle:
    """What distinguishes the blocks of DDPM++ / NCSN++ (Song et al.) from those of ADM (Dhariwal & Nichol)."""

    init: dict  # initialisation of ordinary layers (kwargs of Linear / Conv2d)
    init_zero: dict  # last layer of every residual branch and the output layer: each branch starts as the identity
    init_attn: dict  # the fused query / key / value projection
    scale_shift: bool  # noise embedding as norm(h) * (1 + scale) + shift (ADM) or added before the norm (Song)
    skip_scale: float  # residual sums are multiplied by this: 1/sqrt(2) keeps their variance (Song), 1 (ADM)
    skip_conv_on_resample: bool  # 1x1 convolution on the skip path of resampling blocks (Song) or only on width change
    channels_per_head: int | None  # attention head width; None means a single head (Song)
    resample_filter: tuple  # FIR taps of up / down sampling
    norm_eps: float
    num_heads: int = 0  # > 0: this many attention heads in every attention layer (overrides channels_per_head)
    norm_groups: int = 0  # > 0: exactly this many GroupNorm groups everywhere; 0: `GroupNorm`'s rule

    def norm(self, channels: int) -> "GroupNorm":
        return GroupNorm(channels, eps=self.norm_eps, num_groups=self.norm_groups)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions of a feature map, as a residual branch:
    x -> (x + proj(attention(qkv(norm(x))))) * skip_scale. Shapes (N, C, H, W) -> (N, C, H, W)."""

    def __init__(self, channels: int, style: BlockStyle, *, generator: torch.Generator):
        super().__init__()
        if style.num_heads:
            if channels % style.num_heads:
                raise NetworkConfigError(f"num_heads {style.num_heads} does not divide an attention layer of "
                                         f"{channels} channels.")
            self.num_heads = style.num_heads
        else:
            heads = 1 if style.channels_per_head is None else channels // style.channels_per_head
            self.num_heads = _largest_divisor_at_most(channels, heads)
        self.skip_scale = style.skip_scale
        self.norm = style.norm(channels)
        self.qkv = Conv2d(channels, channels * 3, 1, generator=generator, **style.init_attn)
        self.proj = Conv2d(channels, channels, 1, generator=generator, **style.init_zero)

    def forward(self, x):
        n, c, h, w = x.shape
        # qkv channels are laid out as [query | key | value], each split into heads of c / num_heads channels.
        qkv = self.qkv(self.norm(x)).reshape(n, 3, self.num_heads, c // self.num_heads, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (n, heads, h*w, c / heads)
        attended = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(c / heads)) v
        attended = attended.transpose(-1, -2).reshape(n, c, h, w)
        return (x + self.proj(attended)) * self.skip_scale


class UNetBlock(nn.Module):
    """Residual block conditioned on the embedding, optionally resampling and optionally followed by self-attention.

    h = conv0(resample(silu(norm0(x))));  h = silu(norm1(h) * (1 + scale) + shift)  or  silu(norm1(h + e));
    h = conv1(dropout(h));  x = (h + skip(x)) * skip_scale;  then SelfAttention if `attention`.
    Shapes: x (N, in_channels, H, W), emb (N, emb_channels) -> (N, out_channels, H', W'), H' = H, 2H or H/2.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, style: BlockStyle, *,
                 generator: torch.Generator, resample: str | None = None, attention: bool = False,
                 dropout: float = 0.0):
        super().__init__()
        self.dropout, self.scale_shift, self.skip_scale = dropout, style.scale_shift, style.skip_scale
        self.norm0 = style.norm(in_channels)
        self.conv0 = Conv2d(in_channels, out_channels, 3, generator=generator, resample=resample,
                            resample_filter=style.resample_filter, **style.init)
        self.emb_proj = Linear(emb_channels, out_channels * (2 if style.scale_shift else 1), generator=generator,
                               **style.init)
        self.norm1 = style.norm(out_channels)
        self.conv1 = Conv2d(out_channels, out_channels, 3, generator=generator, **style.init_zero)
        if in_channels != out_channels or (resample is not None and style.skip_conv_on_resample):
            self.skip = Conv2d(in_channels, out_channels, 1, generator=generator, resample=resample,
                               resample_filter=style.resample_filter, **style.init)
        elif resample is not None:
            self.skip = Resample2x(resample, style.resample_filter)
        else:
            self.skip = nn.Identity()
        self.attention = SelfAttention(out_channels, style, generator=generator) if attention else None

    def forward(self, x, emb):
        h = self.conv0(F.silu(self.norm0(x)))
        e = self.emb_proj(emb)[:, :, None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = F.silu(self.norm1(h) * (1 + scale) + shift)
        else:
            h = F.silu(self.norm1(h + e))
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        x = (h + self.skip(x)) * self.skip_scale
        return self.attention(x) if self.attention is not None else x


# ----------------------------------------------------------------------------------------------------------------------
# UNets.


def _check_layout(img_resolution: int, channel_mult, num_blocks: int) -> None:
    """Refuse UNet layouts whose levels cannot be built (shared by the constructors and `network_kwargs_for`)."""
    mults = list(channel_mult)
    if not mults or any(not isinstance(m, int) or m < 1 for m in mults):
        raise NetworkConfigError(f"channel_mult (--cres) must be a non-empty list of positive integers, got {mults}.")
    if num_blocks < 1:
        raise NetworkConfigError(f"num_blocks must be at least 1, got {num_blocks}.")
    if img_resolution < 1 or img_resolution % 2 ** (len(mults) - 1) != 0:
        raise NetworkConfigError(f"img_resolution {img_resolution} must be divisible by 2^{len(mults) - 1} to build "
                                 f"{len(mults)} resolution levels (channel_mult {mults}).")


class _UNet(nn.Module):
    """The encoder-decoder skeleton shared by `SongUNet` and `DhariwalUNet`; the public classes choose the noise
    embedding, the block style and the input / output paths.

    Level l (0 = finest) works at resolution img_resolution / 2^l with model_channels * channel_mult[l] channels.
    Encoder: input conv; per level (a down-sampling block for l > 0, then num_blocks blocks); every output is kept as a
    skip connection. Middle: a block with attention and one without. Decoder: per level from the coarsest (an
    up-sampling block for l < L-1, then num_blocks + 1 blocks, each fed the concatenation with one skip). At the
    resolutions in attn_resolutions, attention follows every encoder block and either every decoder block (ADM) or
    only the last decoder block of the level (Song et al.), as chosen by `attention_in_every_decoder_block`.

    Song et al.'s optional input and output pyramids:
    encoder 'skip': the input image, down-sampled by the FIR filter, is added through a 1x1 conv at every level;
    encoder 'residual': x = aux = (x + fused_down_conv3x3(aux)) / sqrt(2) at every level, aux starting as the input;
    decoder 'skip': each level adds an output head (norm, silu, conv3x3) to the up-sampled sum of the coarser heads.
    """

    def __init__(self, *, img_resolution, in_channels, out_channels, label_dim, model_channels, channel_mult,
                 channel_mult_emb, num_blocks, attn_resolutions, dropout, label_dropout, noise_embedding,
                 noise_channels, style, first_channels, encoder_type, decoder_type, attention_in_every_decoder_block,
                 generator, label_before_mlp=False):
        super().__init__()
        _check_layout(img_resolution, channel_mult, num_blocks)
        if in_channels < 1 or out_channels < 1 or label_dim < 0:
            raise NetworkConfigError(f"Need in_channels >= 1, out_channels >= 1 and label_dim >= 0, got "
                                     f"{in_channels}, {out_channels} and {label_dim}.")
        if not 0 <= dropout < 1 or not 0 <= label_dropout <= 1:
            raise NetworkConfigError(f"dropout must lie in [0, 1) and label_dropout in [0, 1], got {dropout} and "
                                     f"{label_dropout}.")
        self.img_resolution, self.in_channels, self.out_channels = img_resolution, in_channels, out_channels
        self.label_dim, self.label_dropout = label_dim, label_dropout
        self.encoder_type, self.decoder_type = encoder_type, decoder_type
        g = generator
        levels = len(channel_mult)
        attention_at = {int(r) for r in attn_resolutions}
        emb_channels = model_channels * channel_mult_emb

        # Embedding: noise features -> MLP, plus a label embedding (std 1 per entry, like an embedding table); blocks
        # receive silu(embedding).
        self.noise_embedding = noise_embedding
        self.noise_mlp = nn.Sequential(Linear(noise_channels, emb_channels, generator=g, **style.init), nn.SiLU(),
                                       Linear(emb_channels, emb_channels, generator=g, **style.init))
        self.label_before_mlp = bool(label_before_mlp) and label_dim > 0
        if self.label_before_mlp:
            # EDM's conditional DDPM++ / NCSN++: a biased map of sqrt(label_dim) * label added to the noise features
            # before the MLP (converted EDM networks need it to be exact).
            self.label_embedding = Linear(label_dim, noise_channels, generator=g, **style.init)
        else:
            self.label_embedding = (Linear(label_dim, emb_channels, generator=g, bias=False,
                                           init_mode="kaiming_normal", init_weight=math.sqrt(label_dim))
                                    if label_dim else None)

        def block(cin, cout, **kwargs):
            return UNetBlock(cin, cout, emb_channels, style, generator=g, dropout=dropout, **kwargs)

        def output_head(cin):
            return nn.Sequential(style.norm(cin), nn.SiLU(),
                                 Conv2d(cin, out_channels, 3, generator=g, **style.init_zero))

        # Encoder.
        self.input_conv = Conv2d(in_channels, first_channels, 3, generator=g, **style.init)
        c = first_channels
        skip_channels = [c]
        aux_channels = in_channels
        self.down_blocks, self.encoder_aux, self.encoder = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for level, mult in enumerate(channel_mult):
            if level > 0:
                self.down_blocks.append(block(c, c, resample="down"))
                if encoder_type == "skip":
                    self.encoder_aux.append(Conv2d(in_channels, c, 1, generator=g, **style.init))
                elif encoder_type == "residual":
                    self.encoder_aux.append(Conv2d(aux_channels, c, 3, generator=g, resample="down", fused=True,
                                                   resample_filter=style.resample_filter, **style.init))
                    aux_channels = c
                skip_channels.append(c)
            blocks = nn.ModuleList()
            for _ in range(num_blocks):
                blocks.append(block(c, model_channels * mult, attention=(img_resolution >> level) in attention_at))
                c = model_channels * mult
                skip_channels.append(c)
            self.encoder.append(blocks)
        self.aux_down = Resample2x("down", style.resample_filter) if encoder_type == "skip" else None

        self.middle = nn.ModuleList([block(c, c, attention=True), block(c, c)])

        # Decoder; up_blocks[l] goes from level l + 1 to level l.
        self.up_blocks, self.decoder, self.output_heads = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        decoder_levels = [None] * levels
        for level in reversed(range(levels)):
            if level < levels - 1:
                self.up_blocks.insert(0, block(c, c, resample="up"))
            blocks = nn.ModuleList()
            for index in range(num_blocks + 1):
                cout = model_channels * channel_mult[level]
                attention = (img_resolution >> level) in attention_at and (
                    attention_in_every_decoder_block or index == num_blocks)
                blocks.append(block(c + skip_channels.pop(), cout, attention=attention))
                c = cout
            decoder_levels[level] = blocks
            if decoder_type == "skip":
                self.output_heads.insert(0, output_head(c))
        self.decoder.extend(decoder_levels)
        if decoder_type == "standard":
            self.output_heads.append(output_head(c))
        self.aux_up = Resample2x("up", style.resample_filter) if decoder_type == "skip" else None

    def embed(self, noise_labels, class_labels):
        """(N,) noise labels and (N, label_dim) labels or None (= no label) -> (N, emb_channels) block embedding."""
        features = self.noise_embedding(noise_labels)
        if self.label_embedding is None:
            return F.silu(self.noise_mlp(features))
        if class_labels is None:
            labels = torch.zeros(len(noise_labels), self.label_dim, device=features.device)
        else:
            labels = class_labels.to(device=features.device, dtype=torch.float32).reshape(-1, self.label_dim)
            if len(labels) != len(noise_labels):
                raise ValueError(f"Got {len(labels)} class labels for a batch of {len(noise_labels)} images.")
        if self.training and self.label_dropout > 0:
            # Classifier-free guidance training: some examples see the all-zero "no label" vector.
            keep = torch.rand(len(labels), 1, device=labels.device) >= self.label_dropout
            labels = labels * keep
        if self.label_before_mlp:
            return F.silu(self.noise_mlp(features + self.label_embedding(labels * math.sqrt(self.label_dim))))
        return F.silu(self.noise_mlp(features) + self.label_embedding(labels))

    def forward(self, x, noise_labels, class_labels=None):
        """x (N, in_channels, H, W), H and W divisible by 2^(levels-1); noise_labels (N,); class_labels (N, label_dim)
        one-hot, or None for the no-label vector (ignored when label_dim == 0) -> F (N, out_channels, H, W)."""
        emb = self.embed(noise_labels, class_labels)

        aux = x
        x = self.input_conv(x)
        skips = [x]
        for level, blocks in enumerate(self.encoder):
            if level > 0:
                x = self.down_blocks[level - 1](x, emb)
                if self.encoder_type == "skip":
                    aux = self.aux_down(aux)
                    x = x + self.encoder_aux[level - 1](aux)
                elif self.encoder_type == "residual":
                    x = aux = (x + self.encoder_aux[level - 1](aux)) / math.sqrt(2)
                skips.append(x)
            for blk in blocks:
                x = blk(x, emb)
                skips.append(x)

        for blk in self.middle:
            x = blk(x, emb)

        image = None
        for level in reversed(range(len(self.decoder))):
            if level < len(self.decoder) - 1:
                x = self.up_blocks[level](x, emb)
            for blk in self.decoder[level]:
                x = blk(torch.cat([x, skips.pop()], dim=1), emb)
            if self.decoder_type == "skip":
                head = self.output_heads[level](x)
                image = head if image is None else self.aux_up(image) + head
        return image if self.decoder_type == "skip" else self.output_heads[0](x)


def _song_style(resample_filter) -> BlockStyle:
    """DDPM++ / NCSN++: Glorot-uniform layers with zero biases, zero-initialised residual outputs, one attention head
    whose q, k, v Song initialises separately with scale 0.1 (fan_avg C); our fused qkv map has fan_avg 2C, so scale
    sqrt(0.2) reproduces that bound."""
    return BlockStyle(init=dict(init_mode="xavier_uniform"),
                      init_zero=dict(init_mode="xavier_uniform", init_weight=0.0),
                      init_attn=dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2)),
                      scale_shift=False, skip_scale=math.sqrt(0.5), skip_conv_on_resample=True, channels_per_head=None,
                      resample_filter=tuple(resample_filter), norm_eps=1e-6)


def _adm_style() -> BlockStyle:
    """ADM: PyTorch's default layer init (kaiming-uniform weights and biases with scale sqrt(1/3)), zero-initialised
    residual outputs, scale-shift embedding, 64-channel attention heads, plain average-pool / nearest resampling."""
    default = dict(init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
    return BlockStyle(init=default, init_zero=dict(init_mode="kaiming_uniform", init_weight=0.0, init_bias=0.0),
                      init_attn=default, scale_shift=True, skip_scale=1.0, skip_conv_on_resample=False,
                      channels_per_head=64, resample_filter=(1, 1), norm_eps=1e-5)


class SongUNet(_UNet):
    """DDPM++ (embedding_type='positional', encoder_type='standard', resample_filter=[1, 1]) and NCSN++
    (embedding_type='fourier', channel_mult_noise=2, encoder_type='residual', resample_filter=[1, 3, 3, 1]) of Song et
    al. 2021. Forward: (x (N, in_channels, H, W), noise_labels (N,), class_labels (N, label_dim) or None) ->
    (N, out_channels, H, W). The first convolution has model_channels channels; blocks at level l have
    model_channels * channel_mult[l]. The output layers start at zero, so a fresh network returns F = 0.
    label_before_mlp=True embeds labels as EDM's conditional DDPM++ / NCSN++ do (`_UNet`), for converted EDM
    networks (training/conversion/edm.py)."""

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 model_channels: int = 128, channel_mult=(2, 2, 2), channel_mult_emb: int = 4, num_blocks: int = 4,
                 attn_resolutions=(16,), dropout: float = 0.10, label_dropout: float = 0.0,
                 embedding_type: str = "positional", channel_mult_noise: int = 1, encoder_type: str = "standard",
                 decoder_type: str = "standard", resample_filter=(1, 1), init_seed: int = 0,
                 label_before_mlp: bool = False):
        for name, value, allowed in (("embedding_type", embedding_type, ("positional", "fourier")),
                                     ("encoder_type", encoder_type, ("standard", "skip", "residual")),
                                     ("decoder_type", decoder_type, ("standard", "skip"))):
            if value not in allowed:
                raise NetworkConfigError(f"SongUNet {name} must be one of {', '.join(allowed)}, got {value!r}.")
        generator = torch.Generator().manual_seed(int(init_seed))
        noise_channels = model_channels * channel_mult_noise
        if embedding_type == "positional":
            noise_embedding = PositionalEmbedding(noise_channels, endpoint=True)
        else:
            noise_embedding = FourierEmbedding(noise_channels, generator=generator)
        super().__init__(img_resolution=img_resolution, in_channels=in_channels, out_channels=out_channels,
                         label_dim=label_dim, model_channels=model_channels, channel_mult=channel_mult,
                         channel_mult_emb=channel_mult_emb, num_blocks=num_blocks, attn_resolutions=attn_resolutions,
                         dropout=dropout, label_dropout=label_dropout, noise_embedding=noise_embedding,
                         noise_channels=noise_channels, style=_song_style(resample_filter),
                         first_channels=model_channels, encoder_type=encoder_type, decoder_type=decoder_type,
                         attention_in_every_decoder_block=False, generator=generator,
                         label_before_mlp=label_before_mlp)


class DhariwalUNet(_UNet):
    """ADM of Dhariwal & Nichol 2021: sinusoidal noise embedding, scale-shift blocks, 64-channel attention heads, plain
    average-pool / nearest resampling. Forward as `SongUNet`. The first convolution has model_channels *
    channel_mult[0] channels; the output layers start at zero, so a fresh network returns F = 0.

    Options for networks converted from guided-diffusion (training/conversion/guided_diffusion.py; the defaults are
    this project's): channels_per_head (attention head width, 64) or num_heads > 0 (a fixed head count in every
    attention layer); norm_groups > 0 (exactly that many GroupNorm groups everywhere, guided-diffusion's 32, instead
    of min(32, C / 4)); timestep_embedding 'guided-diffusion' (its float32 rounding of the embedding frequencies,
    `PositionalEmbedding`)."""

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 model_channels: int = 192, channel_mult=(1, 2, 3, 4), channel_mult_emb: int = 4, num_blocks: int = 3,
                 attn_resolutions=(32, 16, 8), dropout: float = 0.10, label_dropout: float = 0.0, init_seed: int = 0,
                 channels_per_head: int = 64, num_heads: int = 0, norm_groups: int = 0,
                 timestep_embedding: str = "edm"):
        if channels_per_head < 1 or num_heads < 0 or norm_groups < 0:
            raise NetworkConfigError(f"Need channels_per_head >= 1, num_heads >= 0 and norm_groups >= 0, got "
                                     f"{channels_per_head}, {num_heads} and {norm_groups}.")
        generator = torch.Generator().manual_seed(int(init_seed))
        style = dataclasses.replace(_adm_style(), channels_per_head=int(channels_per_head), num_heads=int(num_heads),
                                    norm_groups=int(norm_groups))
        super().__init__(img_resolution=img_resolution, in_channels=in_channels, out_channels=out_channels,
                         label_dim=label_dim, model_channels=model_channels, channel_mult=channel_mult,
                         channel_mult_emb=channel_mult_emb, num_blocks=num_blocks, attn_resolutions=attn_resolutions,
                         dropout=dropout, label_dropout=label_dropout,
                         noise_embedding=PositionalEmbedding(model_channels, endpoint=False,
                                                             rounding=timestep_embedding),
                         noise_channels=model_channels, style=style,
                         first_channels=model_channels * channel_mult[0], encoder_type="standard",
                         decoder_type="standard", attention_in_every_decoder_block=True, generator=generator)


# ----------------------------------------------------------------------------------------------------------------------
# Preconditioning: D(x; sigma) = c_skip x[:, :out_channels] + c_out F(c_in x; c_noise).

MODEL_TYPES = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}


def image_and_sigma(x, sigma, in_channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Check a network input: images (N, in_channels, H, W) of any float dtype and sigma a float, a 0-d tensor or per
    example -> (x float32, sigma float32 (N, 1, 1, 1)). Shared by the preconditioners and the classifier."""
    if x.ndim != 4 or x.shape[1] != in_channels:
        raise ValueError(f"Expected images of shape (N, {in_channels}, H, W), got {tuple(x.shape)}.")
    x = x.to(torch.float32)
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    if sigma.numel() not in (1, len(x)):
        raise ValueError(f"sigma must hold 1 or {len(x)} (batch size) values, got shape {tuple(sigma.shape)}.")
    return x, sigma.reshape(-1, 1, 1, 1).expand(len(x), 1, 1, 1)


class _Precond(nn.Module):
    """Shared part of the preconditioners. Subclasses define `coefficients(sigma) -> (c_skip, c_out, c_in, c_noise)`.

    Input and output channels are separate: the network may see extra conditioning channels (e.g. a mask appended
    to a 2-channel complex MRI image: in 3, out 2). The skip term c_skip * x then uses the first out_channels input
    channels, which must be the image being denoised; out_channels > in_channels is refused.
    """

    def __init__(self, img_resolution, in_channels, out_channels, label_dim, sigma_min, sigma_max, model_type,
                 model_kwargs, position_channels=0):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        if out_channels > in_channels:
            raise NetworkConfigError(f"out_channels ({out_channels}) cannot exceed in_channels ({in_channels}): the "
                                     f"skip term c_skip * x[:, :out_channels] needs the image in the first input "
                                     f"channels.")
        if model_type not in MODEL_TYPES:
            raise NetworkConfigError(f"model_type must be one of {', '.join(MODEL_TYPES)}, got {model_type!r}.")
        self.img_resolution, self.in_channels, self.out_channels = img_resolution, in_channels, out_channels
        self.label_dim, self.sigma_min, self.sigma_max = label_dim, float(sigma_min), float(sigma_max)
        self.position_channels = int(position_channels)
        self.model = MODEL_TYPES[model_type](img_resolution=img_resolution, in_channels=in_channels + position_channels,
                                             out_channels=out_channels, label_dim=label_dim, **model_kwargs)

    def round_sigma(self, sigma):
        """Noise levels are continuous here: the identity, as a tensor."""
        return torch.as_tensor(sigma)

    def forward(self, x, sigma, class_labels=None, positions=None, **model_kwargs):
        """x (N, in_channels, H, W) of any float dtype; sigma a float, a 0-d tensor, or per example (N,) / (N,1,1,1);
        class_labels (N, label_dim) one-hot, or None for the no-label vector; positions (N, position_channels, H, W)
        for a patch prior (training/patches.py), else None -> D(x; sigma) float32 (N, out_channels, H, W). The
        preconditioning is computed in float32; the network may run under autocast."""
        x, sigma = image_and_sigma(x, sigma, self.in_channels)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        net_in = c_in * x
        if self.position_channels or positions is not None:
            # Patch priors: coordinates are appended after c_in, unscaled (Patch-Diffusion / PaDIS).
            expected = (len(x), self.position_channels, *x.shape[2:])
            if positions is None or tuple(positions.shape) != expected:
                raise ValueError(f"This network takes positions of shape {expected}, got "
                                 f"{None if positions is None else tuple(positions.shape)}.")
            net_in = torch.cat([net_in, positions.to(net_in.dtype)], dim=1)
        net_out = self.model(net_in, c_noise.reshape(-1), class_labels, **model_kwargs)
        return c_skip * x[:, : self.out_channels] + c_out * net_out.to(torch.float32)


class EDMPrecond(_Precond):
    """EDM preconditioning: c_skip = sd^2 / (s^2 + sd^2), c_out = s sd / sqrt(s^2 + sd^2), c_in = 1 / sqrt(s^2 + sd^2),
    c_noise = ln(s) / 4, with sd = sigma_data. sigma_min / sigma_max only record the supported range."""

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int | None = None, label_dim: int = 0,
                 sigma_min: float = 0.0, sigma_max: float = math.inf, sigma_data: float = 0.5,
                 model_type: str = "SongUNet", position_channels: int = 0, **model_kwargs):
        super().__init__(img_resolution, in_channels, out_channels, label_dim, sigma_min, sigma_max, model_type,
                         model_kwargs, position_channels)
        self.sigma_data = float(sigma_data)

    def coefficients(self, sigma):
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / (sigma**2 + sd2).sqrt()
        c_in = 1 / (sigma**2 + sd2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise


def _vp_sigma(t: torch.Tensor, beta_d: float, beta_min: float) -> torch.Tensor:
    return torch.expm1(0.5 * beta_d * t**2 + beta_min * t).sqrt()


class VPPrecond(_Precond):
    """Variance-preserving preconditioning (Song et al.'s VP SDE in EDM form): c_skip = 1, c_out = -s,
    c_in = 1 / sqrt(s^2 + 1), c_noise = (M - 1) t(s), with sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1),
    i.e. sigma(t)^2 = exp(int_0^t beta) - 1 for the linear schedule beta(t) = beta_min + beta_d t.
    sigma_min = sigma(epsilon_t) and sigma_max = sigma(1)."""

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int | None = None, label_dim: int = 0,
                 beta_d: float = 19.9, beta_min: float = 0.1, M: int = 1000, epsilon_t: float = 1e-5,
                 model_type: str = "SongUNet", position_channels: int = 0, **model_kwargs):
        # device="cpu": also under torch.device("meta") (see linear_beta_alphas_cumprod).
        sigma_min = float(_vp_sigma(torch.tensor(epsilon_t, dtype=torch.float64, device="cpu"), beta_d, beta_min))
        sigma_max = float(_vp_sigma(torch.tensor(1.0, dtype=torch.float64, device="cpu"), beta_d, beta_min))
        super().__init__(img_resolution, in_channels, out_channels, label_dim, sigma_min, sigma_max, model_type,
                         model_kwargs, position_channels)
        self.beta_d, self.beta_min, self.M, self.epsilon_t = float(beta_d), float(beta_min), int(M), float(epsilon_t)

    def sigma(self, t):
        """sigma(t) for t in [epsilon_t, 1] (float or tensor) -> tensor."""
        return _vp_sigma(torch.as_tensor(t), self.beta_d, self.beta_min)

    def sigma_inv(self, sigma):
        """t(sigma), the positive root of beta_d t^2 / 2 + beta_min t = ln(1 + sigma^2) -> tensor."""
        sigma = torch.as_tensor(sigma)
        return ((self.beta_min**2 + 2 * self.beta_d * torch.log1p(sigma**2)).sqrt() - self.beta_min) / self.beta_d

    def coefficients(self, sigma):
        return torch.ones_like(sigma), -sigma, 1 / (sigma**2 + 1).sqrt(), (self.M - 1) * self.sigma_inv(sigma)


class DiscreteVPPrecond(_Precond):
    """VP preconditioning on a discrete DDPM schedule, as the MSM reference (guided-diffusion) trains its network:
    c_skip = 1, c_out = -s, c_in = 1 / sqrt(s^2 + 1), and c_noise = the timestep index t whose noise level is s,
    sigma_t = sqrt(1 / abar_t - 1) for the linear betas (`linear_beta_alphas_cumprod`). The network F is then
    exactly the reference's epsilon predictor eps(x_t, t) with x_t = sqrt(abar_t) (x + s n) = c_in (x + s n).

    Between integer steps, t is interpolated linearly in ln(1 + s^2) = -ln abar (monotone in t), so any sigma in
    [sigma_0, sigma_{N-1}] is accepted (e.g. by EDM's sampler); a grid sigma given in float32 is snapped to its exact
    integer index (float32 rounding moves it by < 1e-4 of a step), so training on the respaced grid
    (`vp_grid_sigmas`) feeds the network the reference's timestep integers.
    """

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int | None = None, label_dim: int = 0,
                 num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                 model_type: str = "SongUNet", position_channels: int = 0, **model_kwargs):
        alphas_cumprod = linear_beta_alphas_cumprod(num_steps, beta_start, beta_end)
        sigmas = (1 / alphas_cumprod - 1).sqrt()
        super().__init__(img_resolution, in_channels, out_channels, label_dim, float(sigmas[0]), float(sigmas[-1]),
                         model_type, model_kwargs, position_channels)
        self.num_steps, self.beta_start, self.beta_end = int(num_steps), float(beta_start), float(beta_end)
        self.register_buffer("neg_log_alphas_cumprod", -alphas_cumprod.log(), persistent=False)

    def timestep(self, sigma):
        """sigma (any shape) -> the continuous timestep index t in [0, num_steps - 1], float32."""
        table = self.neg_log_alphas_cumprod
        level = torch.log1p(torch.as_tensor(sigma, device=table.device).to(torch.float64) ** 2)
        upper = torch.searchsorted(table, level.contiguous()).clamp(1, len(table) - 1)
        lower_value, upper_value = table[upper - 1], table[upper]
        t = (upper - 1) + (level - lower_value) / (upper_value - lower_value)
        t = t.clamp(0, len(table) - 1)
        t = torch.where((t - t.round()).abs() < 1e-3, t.round(), t)
        return t.to(torch.float32)

    def coefficients(self, sigma):
        return torch.ones_like(sigma), -sigma, 1 / (sigma**2 + 1).sqrt(), self.timestep(sigma)


class VEPrecond(_Precond):
    """Variance-exploding preconditioning (Song et al.'s VE SDE in EDM form): c_skip = 1, c_out = s, c_in = 1,
    c_noise = ln(s / 2)."""

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int | None = None, label_dim: int = 0,
                 sigma_min: float = 0.02, sigma_max: float = 100.0, model_type: str = "SongUNet",
                 position_channels: int = 0, **model_kwargs):
        super().__init__(img_resolution, in_channels, out_channels, label_dim, sigma_min, sigma_max, model_type,
                         model_kwargs, position_channels)

    def coefficients(self, sigma):
        return torch.ones_like(sigma), sigma, torch.ones_like(sigma), (0.5 * sigma).log()


# ----------------------------------------------------------------------------------------------------------------------
# Presets used by train.py.

# Architecture kwargs of EDM's train.py for --arch (dropout is a separate option there, 0.13 by default).
ARCH_PRESETS = {
    "ddpmpp": dict(model_type="SongUNet", embedding_type="positional", encoder_type="standard",
                   decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1], model_channels=128,
                   channel_mult=[2, 2, 2]),
    "ncsnpp": dict(model_type="SongUNet", embedding_type="fourier", encoder_type="residual", decoder_type="standard",
                   channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=128, channel_mult=[2, 2, 2]),
    "adm": dict(model_type="DhariwalUNet", model_channels=192, channel_mult=[1, 2, 3, 4]),
}

PRECOND_CLASSES = {"edm": EDMPrecond, "vp": VPPrecond, "ve": VEPrecond, "vp-discrete": DiscreteVPPrecond}


def _constructor_arguments(cls) -> set:
    return {name for name, p in inspect.signature(cls.__init__).parameters.items()
            if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def network_kwargs_for(arch: str, precond: str, cbase: int | None = None, cres: list | None = None,
                       dropout: float | None = None, **extra) -> dict:
    """The network config train.py stores: dict(class_name='training.networks.<Precond>', kwargs={...}).

    arch in ARCH_PRESETS, precond in PRECOND_CLASSES; cbase / cres / dropout override model_channels /
    channel_mult / dropout when given (dropout=None keeps the architecture's default, 0.10); `extra` adds or
    overrides any other argument of the preconditioner or the UNet (img_resolution, in_channels, out_channels,
    label_dim, num_blocks, sigma_data, ...). The kwargs are plain JSON values, so `build_network` rebuilds the
    network from a snapshot.
    """
    if arch not in ARCH_PRESETS:
        raise UserError(f"--arch must be one of {', '.join(ARCH_PRESETS)}, got {arch!r}.")
    if precond not in PRECOND_CLASSES:
        raise UserError(f"--precond must be one of {', '.join(PRECOND_CLASSES)}, got {precond!r}.")
    kwargs = json.loads(json.dumps(ARCH_PRESETS[arch]))  # a deep copy
    if cbase is not None:
        if cbase < 1:
            raise UserError(f"--cbase must be a positive integer, got {cbase}.")
        kwargs["model_channels"] = int(cbase)
    if cres is not None:
        kwargs["channel_mult"] = list(cres)
    if dropout is not None:
        if not 0 <= dropout < 1:
            raise UserError(f"--dropout must lie in [0, 1), got {dropout}.")
        kwargs["dropout"] = float(dropout)
    precond_cls = PRECOND_CLASSES[precond]
    model_cls = MODEL_TYPES[kwargs["model_type"]]
    allowed = _constructor_arguments(precond_cls) | _constructor_arguments(model_cls)
    unknown = sorted(set(extra) - allowed)
    if unknown:
        raise UserError(f"Network option {unknown[0]!r} is not an argument of {precond_cls.__name__} or "
                        f"{model_cls.__name__}.")
    kwargs.update(extra)
    try:
        kwargs = json.loads(json.dumps(kwargs, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise UserError(f"Network options must be plain JSON values (ints, floats, strings, lists): {e}.") from e
    if "img_resolution" in kwargs:
        try:
            _check_layout(kwargs["img_resolution"], kwargs["channel_mult"], kwargs.get("num_blocks", 1))
        except NetworkConfigError as e:
            raise UserError(str(e)) from e
    config = dict(class_name=f"{__name__}.{precond_cls.__name__}", kwargs=kwargs)
    check_network_config(config)  # what train.py stores must be loadable
    return config


# ----------------------------------------------------------------------------------------------------------------------
# Registry: the network classes a stored config (snapshot, training state, --transfer) may name, and the keyword
# arguments each may set. Nothing else is ever built from a file: no class or function is looked up by its dotted
# name, so a crafted config can only choose values within these tables.
#
# To make a new network class loadable from snapshots, call `register_network(TheClass, arguments)` right after the
# class, in its own module, with a table {argument name: dnnlib.Field} of every constructor argument a config may set
# (kind, range, choices; mark the ones without default `required=True`), and import that module in
# training/snapshot.py (beside `training.networks`) so that loading sees the registration. A preconditioner that
# wraps one of several architectures passes `architectures={model_type: table}` as well: a config then may set the
# preconditioner's arguments plus those of the architecture its `model_type` names. The name stored in configs is
# `module.ClassName`, as `network_kwargs_for` writes it.


@dataclasses.dataclass(frozen=True)
class NetworkEntry:
    cls: type
    arguments: dict  # name -> Field: the constructor arguments a config may set
    architectures: dict | None = None  # model_type -> {name: Field}: arguments of the wrapped network, if any


NETWORK_REGISTRY: dict[str, NetworkEntry] = {}


def register_network(cls: type, arguments: dict, architectures: dict | None = None) -> str:
    """Allow configs to build `cls` with the given arguments (see above); returns the name configs store."""
    name = f"{cls.__module__}.{cls.__name__}"
    NETWORK_REGISTRY[name] = NetworkEntry(cls, dict(arguments), architectures)
    return name


def check_network_config(config, where: str = "network") -> NetworkEntry:
    """Refuse (dnnlib.ConfigError naming the field) a {'class_name', 'kwargs'} config that the registry does not
    allow; returns the registry entry of its class."""
    check_fields(config, {"class_name": Field("str", required=True), "kwargs": Field("json", required=True)}, where)
    entry = NETWORK_REGISTRY.get(config["class_name"])
    if entry is None:
        raise ConfigError(f"{where}.class_name", f"names {config['class_name']!r:.80}, which is not a registered "
                          f"network class (expected one of {', '.join(NETWORK_REGISTRY)})")
    kwargs, fields = config["kwargs"], dict(entry.arguments)
    if not isinstance(kwargs, dict):
        raise ConfigError(f"{where}.kwargs", f"must be a JSON object, got {type(kwargs).__name__}")
    if entry.architectures is not None:
        fields["model_type"] = Field("str", choices=tuple(entry.architectures))
        model_type = kwargs.get("model_type", "SongUNet")  # the preconditioners' default
        problem = fields["model_type"].problem(model_type)
        if problem:
            raise ConfigError(f"{where}.kwargs.model_type", f"{problem}, got {model_type!r:.60}")
        fields.update(entry.architectures[model_type])
    check_fields(kwargs, fields, f"{where}.kwargs")
    return entry


def build_network(config, where: str = "network") -> nn.Module:
    """A fresh network from a stored {'class_name', 'kwargs'} config, after `check_network_config`. Settings that
    pass the per-argument checks but do not fit together (e.g. a resolution that the levels cannot halve) raise
    ConfigError naming the config too."""
    entry = check_network_config(config, where)
    try:
        return entry.cls(**config["kwargs"])
    except (NetworkConfigError, ValueError, TypeError) as e:
        raise ConfigError(f"{where}.kwargs", f"do not describe a buildable network ({str(e).rstrip('.')})") from e


_SIZE = dict(img_resolution=Field("int", 1, 4096, required=True), in_channels=Field("int", 1, 64, required=True),
             out_channels=Field("int", 1, 64, optional=True), label_dim=Field("int", 0, 100_000),
             position_channels=Field("int", 0, 64))
_NOISE_LEVEL = Field("float", 0, 1e6)
_COMMON_UNET = dict(model_channels=Field("int", 1, 1024), channel_mult=Field("ints", 1, 16, max_items=8),
                    channel_mult_emb=Field("int", 1, 16), num_blocks=Field("int", 1, 16),
                    attn_resolutions=Field("ints", 1, 4096, max_items=8), dropout=Field("float", 0, 1),
                    label_dropout=Field("float", 0, 1), init_seed=Field("int", 0, 2**63 - 1))
ARCHITECTURE_ARGUMENTS = {
    "SongUNet": {**_COMMON_UNET, "embedding_type": Field("str", choices=("positional", "fourier")),
                 "channel_mult_noise": Field("int", 1, 16),
                 "encoder_type": Field("str", choices=("standard", "skip", "residual")),
                 "decoder_type": Field("str", choices=("standard", "skip")),
                 "resample_filter": Field("ints", 1, 1000, max_items=8), "label_before_mlp": Field("bool")},
    "DhariwalUNet": {**_COMMON_UNET, "channels_per_head": Field("int", 1, 4096), "num_heads": Field("int", 0, 4096),
                     "norm_groups": Field("int", 0, 1024),
                     "timestep_embedding": Field("str", choices=TIMESTEP_EMBEDDINGS)},
}
register_network(EDMPrecond, {**_SIZE, "sigma_min": _NOISE_LEVEL, "sigma_max": _NOISE_LEVEL,
                              "sigma_data": Field("float", 1e-6, 1e3)}, ARCHITECTURE_ARGUMENTS)
register_network(VPPrecond, {**_SIZE, "beta_d": Field("float", 1e-6, 1e3), "beta_min": Field("float", 0, 1e3),
                             "M": Field("int", 2, 1_000_000), "epsilon_t": Field("float", 1e-9, 1)},
                 ARCHITECTURE_ARGUMENTS)
register_network(DiscreteVPPrecond, {**_SIZE, "num_steps": Field("int", 2, 1_000_000),
                                     "beta_start": Field("float", 1e-9, 1), "beta_end": Field("float", 1e-9, 1)},
                 ARCHITECTURE_ARGUMENTS)
register_network(VEPrecond, {**_SIZE, "sigma_min": _NOISE_LEVEL, "sigma_max": _NOISE_LEVEL}, ARCHITECTURE_ARGUMENTS)
