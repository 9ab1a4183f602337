"""Sampling as four orthogonal pieces (ARCHITECTURE.md): every generation and inverse-problem method is a solver
driving a denoiser that may be guided and conditioned, on a noise grid of training/schedules.py (every grid lives
there, one floor below: the losses and the discrete-VP preconditioning use the same grids). Which file owns what:

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
- baselines.py     the classical reconstructions the samplers are compared with (A^+ y, FBP for CT, compressed-sensing
                   MRI) and the first estimate warm starts begin from.
- methods.py       the method registry: one entry per named method of reconstruct.py and sampler of generate.py, its
                   options (the CLIs are built from them), how it assembles the pieces, its settings and NFE.
- generation.py    generate.py's samplers assembled from the pieces (MSM and guidance set-up, the dual bridge).
Nothing outside this package imports it but the scripts, bench/ and tests; it imports the modules below it.
"""
