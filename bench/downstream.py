"""Does guided synthetic data help a downstream classifier? MGDM's claim, measured on a task this project makes itself.

    python bench/downstream.py --out out/downstream                 # 3 seeds, 32x32, 50 real images per class
    python bench/downstream.py --out out/downstream-quick --quick   # minutes-free smoke run (tests/test_downstream.py)

Per seed: 2-class lesion phantoms (training/phantoms.py `lesion_phantoms`: class 1 carries a small low-contrast disc)
give a small real training set and a held-out real test set. Through the project's own CLIs, a class-conditional
diffusion model (label dropout, for CFG) and a noise-aware classifier are trained on the real set
(train.py, train.py --kind classifier), and four synthetic sets of the real set's size are generated (generate.py):
unguided (class-conditional), CFG (--cfg-scale), classifier guidance (--guidance classifier), and the
uncertainty-guided dual bridge of the real set (--bridge-source, --guidance entropy). The same downstream classifier
(a clean NoiseAwareClassifier trained for a fixed number of steps) is trained on the real set alone and on real +
each synthetic set, and scored on the test set: accuracy, balanced accuracy, macro-F1 and AUC. Mean and std over
the seeds go to `table.md` (also printed), `results.json` and a bar plot `downstream.png` (drawn with PIL).
"""

import json
import os
import subprocess
import sys

import click
import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dnnlib
from dnnlib import UserError
from training.classifier import NoiseAwareClassifier
from training.data_tools import ZipDatasetWriter
from training.dataset import open_dataset
from training.loss import ClassifierLoss
from training.phantoms import lesion_phantoms

SETS = ("real", "real+unguided", "real+cfg", "real+classifier", "real+bridge-entropy")
METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auc")

FULL = dict(resolution=32, per_class=50, test=500, diffusion_kimg=40, classifier_kimg=20, steps=18,
            downstream_steps=600, seeds="0,1,2")
QUICK = dict(resolution=16, per_class=6, test=48, diffusion_kimg=0.064, classifier_kimg=0.064, steps=3,
             downstream_steps=20, seeds="0,1")


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(args: list[str]):
    """Run `python <script> args...` in the repository with one thread per process; a failure stops the benchmark
    with the command's last output lines."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise UserError(f"{' '.join(args[:1])} failed: {(proc.stderr or proc.stdout).strip()[-1500:]}")


# ----------------------------------------------------------------------------------------------------------------------
# Metrics (binary labels 0/1).


def binary_metrics(labels: np.ndarray, scores: np.ndarray) -> dict:
    """labels (N,) in {0, 1}, scores (N,) = p(class 1); the prediction is scores > 0.5. Balanced accuracy is the mean
    per-class recall, macro-F1 the mean of the two classes' F1, AUC the Mann-Whitney probability that a positive
    outscores a negative (ties count one half)."""
    labels = np.asarray(labels, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    predicted = (scores > 0.5).astype(np.int64)
    recalls, f1s = [], []
    for k in (0, 1):
        tp = np.sum((predicted == k) & (labels == k))
        actual, claimed = np.sum(labels == k), np.sum(predicted == k)
        recalls.append(tp / actual if actual else 0.0)
        f1s.append(2 * tp / (actual + claimed) if actual + claimed else 0.0)
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return {"accuracy": float(np.mean(predicted == labels)), "balanced_accuracy": float(np.mean(recalls)),
            "macro_f1": float(np.mean(f1s)), "auc": float(wins / max(len(pos) * len(neg), 1))}


# ----------------------------------------------------------------------------------------------------------------------
# Data and the downstream classifier.


def write_zip(path: str, images: np.ndarray, labels: np.ndarray) -> str:
    with ZipDatasetWriter(path) as writer:
        for image, label in zip(images, labels):
            writer.add_image(np.rint(image * 255).astype(np.uint8)[:, :, None], int(label))
        writer.finish()
    return path


def load_labelled(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    dataset = open_dataset(path, use_labels=True)
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([it["image"] for it in items]), torch.stack([it["label"] for it in items]).argmax(1)


def train_downstream(images: torch.Tensor, labels: torch.Tensor, steps: int, seed: int, resolution: int):
    """The downstream classifier: a clean NoiseAwareClassifier (width 16, levels 1,2,2), Adam 1e-3, batch 32 drawn
    uniformly from the training set, x-flips; the same steps whatever the set size."""
    torch.manual_seed(seed)
    net = NoiseAwareClassifier(resolution, 1, 2, model_channels=16, channel_mult=[1, 2, 2], num_blocks=1,
                               dropout=0.1, init_seed=seed)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    loss_fn = ClassifierLoss(clean=True)
    g = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(steps):
        idx = torch.randint(0, len(images), (32,), generator=g)
        x = images[idx]
        flip = torch.rand(len(idx), generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        batch = {"image": x, "label": torch.nn.functional.one_hot(labels[idx], 2).float()}
        loss = loss_fn(net, batch, g).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return net.eval()


@torch.no_grad()
def score(net, images: torch.Tensor) -> np.ndarray:
    return torch.cat([torch.softmax(net(images[i:i + 256], 0.0), dim=1)[:, 1]
                      for i in range(0, len(images), 256)]).numpy()


# ----------------------------------------------------------------------------------------------------------------------
# One seed through the CLIs.


def run_seed(out: str, seed: int, p: dict, contrast: float, radius: float, cfg_scale: float, classifier_scale: float,
             bridge_scale: float, log) -> dict:
    folder = os.path.join(out, f"seed{seed}")
    os.makedirs(folder, exist_ok=True)
    n_real = 2 * p["per_class"]
    real_images, real_labels = lesion_phantoms(n_real, p["resolution"], 1000 * seed, contrast, radius)
    test_images, test_labels = lesion_phantoms(p["test"], p["resolution"], 1000 * seed + 999, contrast, radius)
    real_zip = os.path.join(folder, "real.zip")
    if not os.path.exists(real_zip):
        write_zip(real_zip, real_images, real_labels)
    small = ["--cbase", "16", "--cres", "1,2,2", "--blocks", "1", "--attn", "", "--batch", "32", "--lr", "2e-3",
             "--lr-rampup", "0.0001", "--ema", "0.001", "--dropout", "0.1", "--workers", "0", "--seed", str(seed)]
    runs = {}
    for kind, kimg, extra in (("diffusion", p["diffusion_kimg"], ["--cond", "--label-dropout", "0.1"]),
                              ("classifier", p["classifier_kimg"], ["--kind", "classifier"])):
        tick = max(kimg / 4, 0.032)
        log(f"seed {seed}: training the {kind} ({kimg:g} kimg)")
        run_cli(["train.py", "--outdir", os.path.join(folder, kind), "--data", real_zip, "--duration",
                 str(kimg / 1000), "--tick", str(tick), "--snap", "1000", "--dump", "1000", *small, *extra])
        runs[kind] = os.path.join(folder, kind, sorted(os.listdir(os.path.join(folder, kind)))[-1])
    common = ["--network", runs["diffusion"], "--steps", str(p["steps"]), "--device", "cpu"]
    guided = ["--classifier", runs["classifier"]]
    synthetic = {
        "real+unguided": ["--per-class", str(p["per_class"])],
        "real+cfg": ["--per-class", str(p["per_class"]), "--cfg-scale", str(cfg_scale)],
        "real+classifier": ["--per-class", str(p["per_class"]), *guided, "--guidance", "classifier",
                            "--guidance-scale", str(classifier_scale)],
        "real+bridge-entropy": ["--bridge-source", real_zip, *guided, "--guidance", "entropy", "--guidance-scale",
                                str(bridge_scale)],
    }
    train_x = torch.from_numpy(real_images)[:, None] * 2 - 1
    train_y = torch.from_numpy(real_labels)
    test_x = torch.from_numpy(test_images)[:, None] * 2 - 1
    sets = {"real": (train_x, train_y)}
    for name, args in synthetic.items():
        outdir = os.path.join(folder, name.replace("+", "-"))
        if not os.path.exists(os.path.join(outdir, "dataset.json")):
            log(f"seed {seed}: generating {name}")
            run_cli(["generate.py", *common, "--outdir", outdir, "--seeds", str(seed * 100000), *args])
        x, y = load_labelled(outdir)
        sets[name] = (torch.cat([train_x, x]), torch.cat([train_y, y]))
    results = {}
    for name in SETS:
        x, y = sets[name]
        net = train_downstream(x, y, p["downstream_steps"], seed, p["resolution"])
        results[name] = binary_metrics(test_labels, score(net, test_x))
        log(f"seed {seed}: {name:<20s} " + " ".join(f"{m} {v:.3f}" for m, v in results[name].items()))
    return results


# ----------------------------------------------------------------------------------------------------------------------
# Report.


def summarise(per_seed: dict) -> dict:
    """{set: {metric: (mean, std over seeds)}}; std is the sample std (ddof 1), 0 for one seed."""
    out = {}
    for name in SETS:
        out[name] = {}
        for m in METRICS:
            values = np.array([per_seed[s][name][m] for s in per_seed])
            out[name][m] = (float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0)
    return out


def table(summary: dict, num_seeds: int) -> str:
    lines = [f"| training set (mean ± std over {num_seeds} seeds) | " + " | ".join(METRICS) + " |",
             "|---|" + "---|" * len(METRICS)]
    for name in SETS:
        lines.append(f"| {name} | " + " | ".join(f"{summary[name][m][0]:.3f} ± {summary[name][m][1]:.3f}"
                                                  for m in METRICS) + " |")
    return "\n".join(lines)


def bar_plot(summary: dict, path: str):
    """Grouped bars (one group per metric, one bar per training set, whiskers = std) on a 0..1 axis, drawn with
    PIL so the benchmark needs no plotting library."""
    width, height, margin = 900, 420, 50
    colours = [(90, 90, 90), (70, 130, 180), (60, 170, 110), (220, 140, 40), (200, 70, 80)]
    img = PIL.Image.new("RGB", (width, height), "white")
    draw = PIL.ImageDraw.Draw(img)
    plot_h = height - 2 * margin - 40
    y0 = margin + plot_h
    for v in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = y0 - v * plot_h
        draw.line([(margin, y), (width - margin, y)], fill=(225, 225, 225))
        draw.text((8, y - 6), f"{v:.2f}", fill="black")
    group_w = (width - 2 * margin) / len(METRICS)
    bar_w = group_w * 0.8 / len(SETS)
    for gi, m in enumerate(METRICS):
        gx = margin + gi * group_w + group_w * 0.1
        draw.text((gx, y0 + 6), m, fill="black")
        for si, name in enumerate(SETS):
            mean, std = summary[name][m]
            x = gx + si * bar_w
            draw.rectangle([x, y0 - mean * plot_h, x + bar_w - 2, y0], fill=colours[si])
            cx = x + bar_w / 2 - 1
            draw.line([(cx, y0 - (mean + std) * plot_h), (cx, y0 - (mean - std) * plot_h)], fill="black")
    for si, name in enumerate(SETS):
        x = margin + si * (width - 2 * margin) / len(SETS)
        draw.rectangle([x, height - 30, x + 12, height - 18], fill=colours[si])
        draw.text((x + 16, height - 30), name, fill="black")
    draw.text((margin, 10), "Downstream classifier on held-out real lesion phantoms", fill="black")
    img.save(path)


@click.command()
@click.option("--out", required=True, help="Output folder (per-seed runs, table.md, results.json, downstream.png)")
@click.option("--quick", is_flag=True, help="A tiny smoke configuration (2 seeds, 16x16, a few steps)")
@click.option("--seeds", default=None, help=f"Seeds  [default: {FULL['seeds']}]")
@click.option("--resolution", type=click.IntRange(min=8), default=None)
@click.option("--per-class", type=click.IntRange(min=2), default=None, help="Real training images per class")
@click.option("--test", type=click.IntRange(min=4), default=None, help="Held-out real test images")
@click.option("--diffusion-kimg", type=float, default=None)
@click.option("--classifier-kimg", type=float, default=None)
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Sampler steps (and bridge steps each way)")
@click.option("--downstream-steps", type=click.IntRange(min=1), default=None)
@click.option("--contrast", type=float, default=0.25, show_default=True, help="Lesion contrast (intensity 0..1)")
@click.option("--radius", type=float, default=0.12, show_default=True, help="Lesion radius (half field of view = 1)")
@click.option("--cfg-scale", type=float, default=1.0, show_default=True, help="CFG weight (mgdm convention)")
@click.option("--classifier-scale", type=float, default=1.0, show_default=True)
@click.option("--bridge-scale", type=float, default=2.0, show_default=True, help="Entropy guidance of the bridge")
def main(out, quick, seeds, contrast, radius, cfg_scale, classifier_scale, bridge_scale, **sizes):
    p = dict(QUICK if quick else FULL)
    p.update({k: v for k, v in sizes.items() if v is not None})
    if seeds is not None:
        p["seeds"] = seeds
    seed_list = [int(s) for s in str(p["seeds"]).split(",")]
    os.makedirs(out, exist_ok=True)
    log_path = os.path.join(out, "log.txt")

    def log(msg):
        print(msg, flush=True)
        with open(log_path, "a") as f:
            f.write(msg + "\n")

    settings = {**p, "contrast": contrast, "radius": radius, "cfg_scale": cfg_scale,
                "classifier_scale": classifier_scale, "bridge_scale": bridge_scale}
    log(f"settings: {json.dumps(settings)}")
    per_seed = {s: run_seed(out, s, p, contrast, radius, cfg_scale, classifier_scale, bridge_scale, log)
                for s in seed_list}
    summary = summarise(per_seed)
    text = table(summary, len(seed_list))
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"settings": settings, "per_seed": {str(s): r for s, r in per_seed.items()}, "summary": summary},
                  f, indent=2)
    bar_plot(summary, os.path.join(out, "downstream.png"))
    log(text)


if __name__ == "__main__":
    dnnlib.run_cli(main)
