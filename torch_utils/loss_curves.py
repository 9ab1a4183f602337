"""Training loss per noise-level band (EDM2's view of a diffusion loss) and the loss-curve PNG of a run.

The loss of a diffusion model mixes very different tasks: at small sigma the network removes a little noise from an
almost clean input, at large sigma it guesses the data mean. Their losses differ by orders of magnitude, so a total
that stalls can hide a band that still improves (or one that diverges). The training loop therefore adds, to every
tick's line of stats.jsonl, the mean per-example loss and the number of examples in each band of the training sigma:

    "loss_bands": {"sigma<0.1": 0.41, "0.1<=sigma<0.5": 0.23, ...},   (null for a band without examples)
    "count_bands": {"sigma<0.1": 96, ...}

Counts make the bands checkable: sum over bands of count x mean = count x tick loss. `write_loss_plot` draws the total
and one curve per band against kimg (log y when every value is positive) into loss.png beside stats.jsonl; lines of
runs started before the bands existed, or of losses without a training sigma (the classifier), have no band keys and
contribute only to the total.
"""

import json
import math
import os

import torch

from torch_utils.plot import line_plot

# Band edges of the training noise level sigma: [0, 0.1), [0.1, 0.5), [0.5, 1), [1, 5), [5, inf). With EDM's
# ln sigma ~ N(-1.2, 1.2^2), 18%, 49%, 18%, 15% and 1% of the draws fall into them.
SIGMA_BAND_EDGES = (0.1, 0.5, 1.0, 5.0)


def band_names(edges=SIGMA_BAND_EDGES) -> list[str]:
    """['sigma<0.1', '0.1<=sigma<0.5', ..., 'sigma>=5']: the band keys of stats.jsonl, in order of sigma."""
    names = [f"sigma<{edges[0]:g}"]
    names += [f"{lo:g}<=sigma<{hi:g}" for lo, hi in zip(edges[:-1], edges[1:])]
    return names + [f"sigma>={edges[-1]:g}"]


def band_totals(sigma: torch.Tensor, loss: torch.Tensor, edges=SIGMA_BAND_EDGES) -> torch.Tensor:
    """Per-example noise levels (N, ...) and losses (N,) -> float64 (2, bands): row 0 the sum of the losses in each
    band, row 1 the number of examples. Stays on the losses' device (no host synchronisation)."""
    sigma = sigma.detach().reshape(-1)
    loss = loss.detach().reshape(-1).to(torch.float64)
    if sigma.shape != loss.shape:
        raise ValueError(f"band_totals: {sigma.numel()} noise levels for {loss.numel()} losses")
    boundaries = torch.tensor(edges, dtype=sigma.dtype, device=sigma.device)
    band = torch.bucketize(sigma, boundaries, right=True)  # edges[i-1] <= sigma < edges[i]
    totals = torch.zeros(2, len(edges) + 1, dtype=torch.float64, device=loss.device)
    totals[0].index_add_(0, band.to(loss.device), loss)
    totals[1].index_add_(0, band.to(loss.device), torch.ones_like(loss))
    return totals


def band_stats(totals: torch.Tensor, edges=SIGMA_BAND_EDGES) -> dict:
    """band_totals summed over a tick (and the ranks) -> the stats.jsonl entries 'loss_bands' and 'count_bands'."""
    sums, counts = totals.cpu().tolist()
    names = band_names(edges)
    return {"loss_bands": {n: (s / c if c > 0 else None) for n, s, c in zip(names, sums, counts)},
            "count_bands": {n: int(c) for n, c in zip(names, counts)}}


def read_stats(path: str) -> list[dict]:
    """The tick records of a stats.jsonl; a last line torn by a killed run is skipped (the loop removes it when the
    run resumes)."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


def loss_series(records: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """{'total': [(kimg, loss)], band name: [(kimg, band mean)], ...}: the finite points of each curve, bands in order
    of sigma; a band appears when any record has a value for it."""
    series = {"total": [(r["kimg"], r["loss"]) for r in records if _finite(r.get("loss"))]}
    names = []
    for r in records:
        names += [n for n in r.get("loss_bands") or {} if n not in names]
    for name in names:
        series[name] = [(r["kimg"], r["loss_bands"][name]) for r in records
                        if _finite((r.get("loss_bands") or {}).get(name))]
    return {name: points for name, points in series.items() if points}


def write_loss_plot(stats_path: str, png_path: str | None = None):
    """Draw the loss curves of stats.jsonl into png_path (default: loss.png beside it) -> the plot's Axes
    (torch_utils.plot: where each point was drawn), or None, writing nothing, when the file holds no finite loss.
    Log y when every plotted value is positive (a SURE term can make an MSM loss negative; the plot is then linear and
    says so)."""
    png_path = png_path or os.path.join(os.path.dirname(os.path.abspath(stats_path)), "loss.png")
    series = loss_series(read_stats(stats_path))
    if not series:
        return None
    positive = all(y > 0 for points in series.values() for _, y in points)
    title = "Training loss (mean per example) by noise level" + ("" if positive else "; linear y: some values <= 0")
    return line_plot(png_path, title, "kimg", "loss", series, log_y=positive)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
