"""Sampling as four orthogonal pieces (ARCHITECTURE.md): every generation and inverse-problem method is a solver
driving a denoiser that may be guided and conditioned. Which file owns what:

- schedules.py     every noise grid (EDM's rho schedule, the VP / DDPM respacings of the MSM reference and of DPS,
                   geometric ladders, PaDIS's and the dual bridge's grids) and the clipping of a grid to the range a
                   snapshot was trained on. Imports nothing of the networks (they import it).
- denoisers.py     the D(x, sigma) protocol and what makes one: `net_denoiser` (one wrapper, with an explicit
                   mask-channel policy), `CountingNetwork`, the partial and Ambient wrappers, `MSMAggregate` (MSM's
                   aggregate of K partial estimates: masks from the per-seed streams, one batched call, fallback,
                   optional image view, per-subset data consistency and projection; K validated here only).
- guidance.py      guided(D, terms) for classifier potentials and one classifier-free guidance helper for full and
                   partial denoisers.
- conditioning.py  one protocol for every data term, cond(D, x, step) -> x0_hat, told the solver's `Step`: Jalal's
                   likelihood terms, DPS (written once; score, Chung's 'ddpm' and PaDIS's 'state' laws), projection,
                   DDS's CG, MSM's partial and aggregate data-consistency steps.
- solvers.py       one loop per kind: ODE (Heun / Euler, churn, both directions: generation, the dual bridge),
                   Ancestral (DDPM / DDIM / DDNM: MSM's sampler on the aggregate, DPS, DDS as published),
                   Langevin (ALD, PaDIS), PredictorCorrector (Euler-Maruyama with 0 corrector steps), and the MSM
                   reference write-back loop; each reports its NFE (`evaluations`). Also the initial states and the
                   Langevin step rules.
- baselines.py     the classical reconstructions the samplers are compared with (A^+ y, compressed-sensing MRI).
The method registry (methods.py, one entry per named method of generate.py and reconstruct.py) assembles them.

This file imports nothing on purpose: training/networks.py and training/loss.py import `schedules`, and the other
modules import the networks' helpers, so an eager import here would close a circle.
"""
