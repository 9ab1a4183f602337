"""Noise-aware classifier for guidance (MGDM's classifier, SEED_METHODS.md section 1.2, in EDM's noise convention).

`NoiseAwareClassifier(x, sigma) -> logits (N, K)`: the encoder half of the project's UNets (training/networks.py
blocks: input convolution, per level a down-sampling block and `num_blocks` residual blocks, the middle pair with
attention) and a pooling head (norm, SiLU, global average pool, linear). The noise level enters as in EDMPrecond:
the input is scaled by c_in = 1 / sqrt(sigma^2 + sigma_data^2) and the blocks see the embedding of
c_noise = ln(sigma) / 4, with sigma floored at SIGMA_FLOOR so that clean images (sigma = 0) have a finite label.
It is trained by `training.loss.ClassifierLoss` (cross-entropy on images noised with the diffusion model's sigma
distribution, or on clean images only) through train.py --kind classifier; its snapshots name this class, which is
how scripts tell a classifier from a diffusion model (`is_classifier`).
"""

import torch
import torch.nn.functional as F
from torch import nn

from dnnlib import Field, UserError
from training.networks import (
    Conv2d,
    GroupNorm,
    Linear,
    PositionalEmbedding,
    UNetBlock,
    _adm_style,
    _check_layout,
    _song_style,
    image_and_sigma,
    register_network,
)

SIGMA_FLOOR = 0.002  # EDM's sigma_min: the noise label of clean images


class NoiseAwareClassifier(nn.Module):
    """Logits over `label_dim` classes of images (N, in_channels, R, R) at noise level sigma (float, 0-d, (N,) or
    (N, 1, 1, 1); 0 allowed). style 'adm' (scale-shift blocks, 64-channel heads) or 'song' (DDPM++ blocks).
    Level l works at R / 2^l with model_channels * channel_mult[l] channels. The output layer starts at zero, so a
    fresh classifier predicts the uniform distribution."""

    def __init__(self, img_resolution: int, in_channels: int, label_dim: int, model_channels: int = 64,
                 channel_mult=(1, 2, 2), channel_mult_emb: int = 4, num_blocks: int = 2, attn_resolutions=(),
                 dropout: float = 0.1, style: str = "adm", sigma_data: float = 0.5, init_seed: int = 0):
        super().__init__()
        _check_layout(img_resolution, channel_mult, num_blocks)
        if label_dim < 2:
            raise UserError(f"A classifier needs at least 2 classes, got label_dim {label_dim}.")
        if style not in ("adm", "song"):
            raise UserError(f"Classifier style must be 'adm' or 'song', got {style!r}.")
        self.img_resolution, self.in_channels, self.label_dim = img_resolution, in_channels, label_dim
        self.sigma_data = float(sigma_data)
        block_style = _adm_style() if style == "adm" else _song_style((1, 1))
        g = torch.Generator().manual_seed(int(init_seed))
        emb_channels = model_channels * channel_mult_emb
        self.noise_embedding = PositionalEmbedding(model_channels, endpoint=(style == "song"))
        self.noise_mlp = nn.Sequential(Linear(model_channels, emb_channels, generator=g, **block_style.init), nn.SiLU(),
                                       Linear(emb_channels, emb_channels, generator=g, **block_style.init))

        def block(cin, cout, **kwargs):
            return UNetBlock(cin, cout, emb_channels, block_style, generator=g, dropout=dropout, **kwargs)

        attention_at = {int(r) for r in attn_resolutions}
        c = model_channels * channel_mult[0]
        self.input_conv = Conv2d(in_channels, c, 3, generator=g, **block_style.init)
        self.blocks = nn.ModuleList()
        for level, mult in enumerate(channel_mult):
            if level > 0:
                self.blocks.append(block(c, c, resample="down"))
            for _ in range(num_blocks):
                self.blocks.append(block(c, model_channels * mult,
                                         attention=(img_resolution >> level) in attention_at))
                c = model_channels * mult
        self.blocks.extend([block(c, c, attention=True), block(c, c)])
        self.head_norm = GroupNorm(c, eps=block_style.norm_eps)
        self.head = Linear(c, label_dim, generator=g, **block_style.init_zero)

    def forward(self, x, sigma):
        x, sigma = image_and_sigma(x, sigma, self.in_channels)
        c_in = 1 / (sigma**2 + self.sigma_data**2).sqrt()
        c_noise = sigma.clamp_min(SIGMA_FLOOR).log().reshape(-1) / 4
        emb = F.silu(self.noise_mlp(self.noise_embedding(c_noise)))
        h = self.input_conv(c_in * x)
        for blk in self.blocks:
            h = blk(h, emb)
        pooled = F.silu(self.head_norm(h)).mean(dim=(2, 3))
        return self.head(pooled).to(torch.float32)


CLASSIFIER_CLASS = register_network(NoiseAwareClassifier, {
    "img_resolution": Field("int", 1, 4096, required=True), "in_channels": Field("int", 1, 64, required=True),
    "label_dim": Field("int", 2, 100_000, required=True), "model_channels": Field("int", 1, 1024),
    "channel_mult": Field("ints", 1, 16, max_items=8), "channel_mult_emb": Field("int", 1, 16),
    "num_blocks": Field("int", 1, 16), "attn_resolutions": Field("ints", 1, 4096, max_items=8),
    "dropout": Field("float", 0, 0.99), "style": Field("str", choices=("adm", "song")),
    "sigma_data": Field("float", 1e-6, 1e3), "init_seed": Field("int", 0, 2**63 - 1)})


def classifier_kwargs(img_resolution: int, in_channels: int, label_dim: int, cbase: int = 64, cres=(1, 2, 2),
                      blocks: int = 2, attn=(), dropout: float = 0.1, style: str = "adm") -> dict:
    """The network config train.py --kind classifier stores (plain JSON values)."""
    kwargs = dict(img_resolution=int(img_resolution), in_channels=int(in_channels), label_dim=int(label_dim),
                  model_channels=int(cbase), channel_mult=[int(m) for m in cres], num_blocks=int(blocks),
                  attn_resolutions=[int(r) for r in attn], dropout=float(dropout), style=style)
    if label_dim < 2:
        raise UserError(f"--kind classifier needs a labelled dataset with at least 2 classes, got {label_dim}.")
    _check_layout(img_resolution, kwargs["channel_mult"], blocks)
    return dict(class_name=CLASSIFIER_CLASS, kwargs=kwargs)


def is_classifier(config: dict) -> bool:
    """Whether a snapshot config describes a classifier (rather than a diffusion model)."""
    return config["network"]["class_name"] == CLASSIFIER_CLASS


def classifier_logits(net: nn.Module):
    """A classifier network as `logits(x, sigma)` on float64 images (differentiable in x) -> float64 (N, K), the
    callable training.sampling.guidance.GuidanceTerm takes."""

    def logits(x, sigma):
        s = torch.full((x.shape[0],), float(sigma), dtype=torch.float32, device=x.device)
        return net(x.to(torch.float32), s).to(torch.float64)

    return logits


@torch.no_grad()
def accuracy(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, sigma: float, generator: torch.Generator,
             batch: int = 256) -> float:
    """Fraction of images (N, C, H, W) in [-1, 1] whose class (labels: (N,) indices) the classifier gets right at
    noise level sigma (noise from `generator`, on the images' device)."""
    correct = 0
    for start in range(0, len(images), batch):
        x = images[start:start + batch]
        noisy = x + sigma * torch.randn(x.shape, generator=generator, device=generator.device).to(x.device)
        predicted = net(noisy, torch.full((len(x),), float(sigma), device=x.device)).argmax(dim=1)
        correct += int((predicted == labels[start:start + batch].to(predicted.device)).sum())
    return correct / max(len(images), 1)


class Validation:
    """train.py --val-data for classifiers: accuracy of the EMA classifier on a labelled dataset at every tick, at
    the noise levels VALIDATION_SIGMAS, with noise drawn from a generator seeded by the run's seed afresh each tick
    (so the figures of different ticks differ only by the network)."""

    VALIDATION_SIGMAS = (0.0, 0.1, 0.5)

    def __init__(self, dataset, seed: int):
        items = [dataset[i] for i in range(len(dataset))]
        self.images = torch.stack([item["image"] for item in items])
        self.labels = torch.stack([item["label"] for item in items]).argmax(dim=1)
        self.seed = seed

    def __call__(self, net: nn.Module, device) -> dict:
        generator = torch.Generator().manual_seed(self.seed)
        return {f"val_acc_sigma{sigma:g}": accuracy(net, self.images.to(device), self.labels, sigma, generator)
                for sigma in self.VALIDATION_SIGMAS}


def check_compatible(classifier_config: dict, model_config: dict, classifier_path: str):
    """Refuse a classifier whose image size or channels differ from the diffusion model's, or whose class count
    differs from a class-conditional model's (an unconditional model may be guided by any classifier of its
    images: classifier guidance is how it gets classes)."""
    c, m = classifier_config["network"]["kwargs"], model_config["network"]["kwargs"]
    model_channels = m.get("out_channels") or m["in_channels"]
    pairs = [("resolution", c["img_resolution"], m["img_resolution"]), ("channels", c["in_channels"], model_channels)]
    if m.get("label_dim", 0):
        pairs.append(("classes", c["label_dim"], m["label_dim"]))
    for what, have, want in pairs:
        if have != want:
            raise UserError(f"--classifier {classifier_path} was trained for {what} {have}, but the diffusion model "
                            f"has {what} {want}.")

