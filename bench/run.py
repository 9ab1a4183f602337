"""One benchmark command for every performance figure the project claims: JSON, Markdown tables and plots.

    python bench/run.py [--out out/bench] [--quick] [--device cpu|cuda] [--threads N] [--rounds R]
                        [--sections sampler,training,loader,edm]

Sections (each timed in interleaved rounds, see below):
1. MSM sampler step against its network floor (bench/msm_sampler.py's cases: grayscale and RGB images and 8-coil MRI,
   64 px, K = 1-4, batch 1 and 8; on CUDA also batch 64): "floor" is one network call on the K x B batch per level,
   the least the batched sampler can cost; "reference" is the sampler's reference variant (one subset at a time, as the
   MSM reference code); "outside" is the sampler with a network that costs nothing (bench/msm_sampler.py's stub), the
   time outside the network measured directly, and 1 + outside / floor the low-noise estimate of MSM / floor. The
   acceptance figures of issue 15 (MRI K = 1 within 1.05x of its floor at batch 8, every image case within 1.03x) are
   checked on both and stated.
2. Training images/s (forward, backward, Adam step) of MSM (noiseless and SURE), Ambient and EDM on the same network
   and batch, images and 8-coil MRI (bench/msm_training.py's cases).
3. The MRI training data path (open_dataset -> MeasuredDataset -> StreamSampler -> DataLoader) against the rate of
   MSM training steps on the same batches (bench/operators.py's functions).
4. EDM's Heun sampler against the network calls it makes (its overhead: float64 state, casts, the ODE update).
5. Peak memory of each workload (CPU: peak resident set size above the start, via /proc/self/clear_refs; CUDA:
   torch.cuda.max_memory_allocated above the start).
6. On CUDA only: training in fp32 / bf16 autocast, with and without channels_last, and torch.compile on/off for the
   MSM sampler and its floor. This path has not been run on the 2-core CPU machine the project is developed on.

Honest timing on a shared machine: every timed item runs once per round, in an order shuffled anew each round, so slow
phases of the machine spread over all items instead of falling on one; cells are medians over rounds, and every ratio
is taken within each round (the two items ran seconds apart) and reported as median (min-max over rounds), the range
being that figure's noise. The sampler and its floor, whose ratio the issue's targets name, are one item timed back to
back in the order sampler, floor, floor, sampler (`abba`), so the machine's drift within a round cancels in their ratio.
Compare ratios, not absolute times, across machines.

Writes OUT/results.json (machine, settings, every figure and the raw per-round values), OUT/results.md (one table per
section, the settings next to it) and PNGs: the sampler's ratio against K per case and its time per image against the
batch size. `--quick` shrinks everything (a tiny network, two rounds) to check the command end to end in about a minute.
"""

import contextlib
import ctypes
import datetime
import importlib.util
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time

import click
import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import dnnlib  # noqa: E402
from dnnlib import UserError  # noqa: E402
from torch_utils.misc import SeedGenerators  # noqa: E402
from torch_utils.plot import line_plot  # noqa: E402
from training import snapshot as checkpoint  # noqa: E402
from training.loss import AmbientLoss, EDMLoss, MSMLoss  # noqa: E402
from training.networks import network_kwargs_for  # noqa: E402
from training.sampling.denoisers import CountingNetwork, net_denoiser, net_partial_denoiser  # noqa: E402
from training.sampling.solvers import ODE, noise_start  # noqa: E402
from training.schedules import rho_schedule, vp200_sigmas  # noqa: E402
from training.training_loop import StreamSampler  # noqa: E402


def _load_bench(name: str):
    """A sibling benchmark script as a module (by path, so that bench/operators.py cannot shadow another module)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(ROOT, "bench", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sampler_bench = _load_bench("msm_sampler")
training_bench = _load_bench("msm_training")
data_bench = _load_bench("operators")
throughput_bench = _load_bench("train_throughput")

# bench/msm_sampler.py's columns timed here: the default sampler, its floor, and the reference variant (one subset at a
# time, the MSM reference code's order), whose cost against the batched one the issue quotes.
SAMPLER_COLUMNS = ("msm batched", "floor", "msm reference", "outside (stub)")
PAIRED = ("msm batched", "floor")  # timed back to back (`abba`): their ratio is the figure the targets name
TARGETS = {"images": 1.03, "mri": 1.05}  # issue 15: every image case within 1.03x of its floor, MRI K = 1 within 1.05x
FULL = dict(cases="gray64,rgb64,mri64", batches="1,8", subsets="1,2,3,4", levels=3, rounds=5,
            train_resolution=32, train_batch=8, train_steps=3, loader_slices=128, loader_resolution=64, workers=2,
            loader_batches=8, loader_training_steps=2, edm_steps=5, edm_batches="1,8", tiny=False)
QUICK = dict(cases="gray32,mri64", batches="1,2", subsets="1,2", levels=1, rounds=2,
             train_resolution=16, train_batch=2, train_steps=1, loader_slices=16, loader_resolution=16, workers=1,
             loader_batches=2, loader_training_steps=1, edm_steps=2, edm_batches="1,2", tiny=True)


# ---------------------------------------------------------------------------------------------------------------------
# Measuring


def interleaved(items: dict, rounds: int, warmup: bool = True, memory: dict | None = None,
                device=None) -> tuple[dict, dict]:
    """Call every item (name -> function returning one measurement) once per round, in an order shuffled anew each
    round (seeded by the round, so runs are comparable). With `warmup`, every item runs once unrecorded first
    (allocator, FFT plans, one-time costs). `memory` (item name -> label) names the items whose peak memory is
    measured, on their first call (the warm-up, else round 0's; the measurement adds no time inside the item).
    Returns (name -> [measurement per round], label -> peak MiB)."""
    labels, peaks = dict(memory or {}), {}

    def first_call(name):
        if name not in labels:
            return items[name]()
        result = []
        peaks[labels[name]] = peak_memory_mib(lambda: result.append(items[name]()), device)
        return result[0]

    if warmup:
        for name in items:
            first_call(name)
    values = {name: [] for name in items}
    for r in range(rounds):
        order = list(items)
        random.Random(r).shuffle(order)
        for name in order:
            values[name].append(first_call(name) if r == 0 and not warmup else items[name]())
    return values, {label: peaks[label] for label in labels.values()}  # in the order asked, not the shuffled one


def seconds(fn, device):
    """A function returning the wall time of one call of fn (synchronising the GPU around it on CUDA)."""
    return lambda: sampler_bench.timed(fn, device)


def abba(fn_a, fn_b, device):
    """One measurement of two items timed back to back in the order a, b, b, a: (mean time of a, mean time of b).
    A ratio of two items timed at different moments of a round carries the machine's drift between them (on a shared
    2-core VM, +-10% between rounds); in this order any drift linear over the four calls cancels in the ratio."""
    def measure():
        a1 = sampler_bench.timed(fn_a, device)
        b1 = sampler_bench.timed(fn_b, device)
        b2 = sampler_bench.timed(fn_b, device)
        a2 = sampler_bench.timed(fn_a, device)
        return (a1 + a2) / 2, (b1 + b2) / 2

    return measure


def spread(values: list) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def ratios(numerators: list, denominators: list) -> dict:
    """Median and range over rounds of the per-round ratios."""
    return spread([a / b for a, b in zip(numerators, denominators)])


def _libc_trim():
    """Give freed heap memory back to the OS (glibc), so a later peak-RSS delta is not hidden by a cached heap."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def memory_method(device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated minus the memory allocated before the call"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "peak resident set size (VmHWM, reset through /proc/self/clear_refs) minus the size before the call"
    except OSError:
        return "unavailable (no writable /proc/self/clear_refs to reset the peak resident set size)"


def peak_memory_mib(fn, device) -> float | None:
    """Peak memory one call of fn adds above what was in use before it, in MiB (None where it cannot be measured)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    _libc_trim()
    try:
        with open("/proc/self/clear_refs", "w") as f:  # "5" resets the peak RSS (VmHWM) to the current RSS
            f.write("5")
        base = _proc_status_kib("VmRSS")
        fn()
        return (_proc_status_kib("VmHWM") - base) / 1024
    except OSError:
        return None


def _load_average() -> list | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def machine(device) -> dict:
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    info = {"cpu": cpu, "logical_cpus": os.cpu_count(),
            "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "device": str(device), "load_average_at_start": _load_average()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def machine_line(m: dict) -> str:
    gpu = f", GPU {m['gpu']} (CUDA {m['cuda']})" if "gpu" in m else ""
    load = m.get("load_average_at_start")
    load_text = f"; load average {load[0]:.2f} at start" if load else ""
    return (f"{m['cpu']}, {m['usable_cpus']} usable of {m['logical_cpus']} logical CPUs, {m['torch_threads']} torch "
            f"threads, torch {m['torch']}, device {m['device']}{gpu}{load_text}")


def tiny_network(resolution: int, in_channels: int, out_channels: int) -> dict:
    """The --quick network: checks the plumbing, not the figures."""
    return network_kwargs_for(arch="ddpmpp", precond="edm", img_resolution=resolution, in_channels=in_channels,
                              out_channels=out_channels, label_dim=0, cbase=8, cres=[1, 2], num_blocks=1,
                              attn_resolutions=[], dropout=0.0)


def network_name(p: dict, full: str) -> str:
    return "tiny DDPM++ cbase 8 (1,2), 1 block" if p["tiny"] else full


def sampler_case(name: str, batch: int, device, tiny: bool, compile_backend: str | None = None):
    """bench/msm_sampler.py's Case, with its network swapped for the tiny one (--quick) or a torch.compile'd one."""
    case = sampler_bench.Case(name, batch, device)
    if tiny:
        channels, resolution, _ = sampler_bench.CASES[name]
        torch.manual_seed(0)
        case.net = checkpoint.build_network(tiny_network(resolution, channels, channels)).eval().requires_grad_(False)
        case.net = case.net.to(device)
    if compile_backend:
        case.net = torch.compile(case.net, backend=compile_backend)
    case.partial = net_partial_denoiser(case.net, case.operator)
    return case


# ---------------------------------------------------------------------------------------------------------------------
# Sections: each returns a JSON-able dict and stores its raw per-round values under "raw"


def bench_sampler(p: dict, device, log) -> dict:
    names = p["cases"].split(",")
    batches = [int(b) for b in p["batches"].split(",")]
    ks = [int(k) for k in p["subsets"].split(",")]
    sigmas = vp200_sigmas()[: p["levels"]]
    cases = {(name, b): sampler_case(name, b, device, p["tiny"]) for name in names for b in batches}
    items = {}
    for (name, b), case in cases.items():
        for k in ks:
            run = {column: (lambda c=case, k=k, col=column: c.run(col, k, sigmas)) for column in SAMPLER_COLUMNS}
            items[f"{name}/B={b}/K={k}/{' | '.join(PAIRED)}"] = abba(*(run[column] for column in PAIRED), device)
            for column in SAMPLER_COLUMNS:
                if column not in PAIRED:
                    items[f"{name}/B={b}/K={k}/{column}"] = seconds(run[column], device)
    b, k = max(batches), max(ks)
    memory = {}
    log(f"sampler: {len(items)} items x {p['rounds']} rounds")
    with torch.no_grad():
        for name in names:  # peak memory of one call each, before the rounds (it also warms these items up)
            for column in PAIRED:
                memory[f"{name} {column}, B = {b}, K = {k}"] = peak_memory_mib(
                    lambda c=cases[name, b], col=column: c.run(col, k, sigmas), device)
        raw, _ = interleaved(items, p["rounds"], device=device)
    for key in [key for key in raw if key.endswith(" | ".join(PAIRED))]:  # split the pairs into one list per column
        pairs = raw.pop(key)
        for i, column in enumerate(PAIRED):
            raw[key.replace(" | ".join(PAIRED), column)] = [pair[i] for pair in pairs]
    rows = []
    for (name, b), case in cases.items():
        for k in ks:
            msm, floor = raw[f"{name}/B={b}/K={k}/msm batched"], raw[f"{name}/B={b}/K={k}/floor"]
            reference = raw[f"{name}/B={b}/K={k}/msm reference"]
            outside = raw[f"{name}/B={b}/K={k}/outside (stub)"]
            ratio = ratios(msm, floor)
            rows.append({"case": name, "description": case.describe(), "batch": b, "K": k,
                         "msm_ms_per_step": statistics.median(msm) * 1000 / len(sigmas),
                         "floor_ms_per_step": statistics.median(floor) * 1000 / len(sigmas),
                         "msm_ms_per_image_step": statistics.median(msm) * 1000 / len(sigmas) / b,
                         "floor_ms_per_image_step": statistics.median(floor) * 1000 / len(sigmas) / b,
                         "reference_ms_per_step": statistics.median(reference) * 1000 / len(sigmas),
                         "msm_over_floor": ratio, "outside_network_fraction": 1 - 1 / ratio["median"],
                         "outside_ms_per_step": statistics.median(outside) * 1000 / len(sigmas),
                         "stub_estimate": 1 + statistics.median(outside) / statistics.median(floor),
                         "reference_over_msm": ratios(reference, msm)})
    network = network_name(p, "DDPM++ cbase 32 (1,2,2), 1 block, no attention")
    settings = {"network": network, "levels": len(sigmas), "schedule": "first levels of the VP 200-level schedule",
                "rounds": p["rounds"], "batches": batches, "K": ks, "cases": names}
    return {"settings": settings, "rows": rows, "acceptance": acceptance(rows), "memory_mib": memory, "raw": raw}


def acceptance(rows: list) -> dict:
    """Issue 15's targets, checked at batch 8 (the issue's) where it was measured, else at the largest batch."""
    batches = {r["batch"] for r in rows}
    b = 8 if 8 in batches else max(batches)
    out = {"batch": b}
    mri = [r for r in rows if r["case"].startswith("mri") and r["K"] == 1 and r["batch"] == b]
    if mri:
        value, estimate = mri[0]["msm_over_floor"]["median"], mri[0]["stub_estimate"]
        out["mri_K1"] = {"ratio": value, "stub_estimate": estimate, "target": TARGETS["mri"],
                         "met": value <= TARGETS["mri"], "stub_met": estimate <= TARGETS["mri"]}
    images = [r for r in rows if not r["case"].startswith("mri") and r["batch"] == b]
    if images:
        worst = max(images, key=lambda r: r["msm_over_floor"]["median"])
        value = worst["msm_over_floor"]["median"]
        worst_stub = max(images, key=lambda r: r["stub_estimate"])
        out["images_worst"] = {"ratio": value, "case": worst["case"], "K": worst["K"], "target": TARGETS["images"],
                               "met": value <= TARGETS["images"], "stub_estimate": worst_stub["stub_estimate"],
                               "stub_case": worst_stub["case"], "stub_K": worst_stub["K"],
                               "stub_met": worst_stub["stub_estimate"] <= TARGETS["images"]}
    return out


def training_cases(kind: str, resolution: int, tiny: bool, measurement: dict) -> dict:
    """bench/msm_training.py's cases: name -> (network config, loss)."""
    channels = 1 if kind == "image" else 2
    network = tiny_network if tiny else training_bench.network
    plain = network(resolution, channels, channels)
    return {"EDM (clean)": (plain, EDMLoss()),
            "MSM eta=0": (plain, MSMLoss(measurement)),
            "MSM eta=0.01 (SURE)": (plain, MSMLoss({**measurement, "sigma_y": 0.01})),
            "Ambient": (network(resolution, channels + (kind == "image"), channels), AmbientLoss(measurement))}


def bench_training(p: dict, device, log) -> dict:
    resolution, batch, steps = p["train_resolution"], p["train_batch"], p["train_steps"]
    items, memory = {}, {}
    for kind in ("image", "mri"):
        batch_dict, measurement = training_bench.make_batch(kind, batch, resolution, 8, device)
        for name, (cfg, loss) in training_cases(kind, resolution, p["tiny"], measurement).items():
            fn = lambda c=cfg, lf=loss, bd=batch_dict: training_bench.images_per_second(c, lf, bd, batch, steps, device)
            items[f"{kind}/{name}"] = fn
            memory[f"{kind}/{name}"] = f"{kind} {name}"
    log(f"training: {len(items)} items x {p['rounds']} rounds")
    # images_per_second warms up (2 steps) before it times, and times inside: its peak memory is taken in round 0
    raw, memory = interleaved(items, p["rounds"], warmup=False, memory=memory, device=device)
    rows = []
    for key, rates in raw.items():
        kind, name = key.split("/", 1)
        rows.append({"data": kind, "loss": name, "images_per_s": spread(rates),
                     "vs_edm": ratios(rates, raw[f"{kind}/EDM (clean)"])})
    network = network_name(p, "DDPM++ cbase 32 (1,2,2), 2 blocks, attention 16")
    settings = {"network": network, "resolution": resolution, "batch": batch, "timed_steps": steps,
                "warmup_steps": 2, "rounds": p["rounds"], "coils": 8,
                "masks": "images: box p = 0.4; MRI: random lines R = 4"}
    return {"settings": settings, "rows": rows, "memory_mib": memory, "raw": raw}


def loader_seconds(dataset, workers: int, count: int):
    """A function returning the seconds the training loop's loader (bench/operators.py's settings, the training
    loop's: StreamSampler, prefetch 4 per worker) takes for `count` batches in steady state. Each call starts a fresh
    loader and stops it afterwards, so that its workers neither refill their queue between rounds (the timed batches
    would then be ready-made, not loaded) nor take CPU from the items timed in between."""

    def run() -> float:
        sampler = StreamSampler(len(dataset), 0, 1, data_bench.BATCH, 1, seed=0, with_position=True)
        loader = torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=data_bench.BATCH,
                                             num_workers=workers, prefetch_factor=4 if workers else None,
                                             persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0))
        iterator = iter(loader)
        for _ in range(1 + 4 * workers):  # worker start-up and the batches queued meanwhile: not steady state
            next(iterator)
        start = time.perf_counter()
        for _ in range(count):
            next(iterator)
        elapsed = time.perf_counter() - start
        del iterator  # shuts the workers down
        return elapsed

    return run


def bench_loader(p: dict, device, log) -> dict:
    """bench/operators.py's data-path measurement, on fully sampled and on undersampled simulated 8-coil records."""
    resolution, slices, count = p["loader_resolution"], p["loader_slices"], p["loader_batches"]
    batch = data_bench.BATCH
    tmp = tempfile.mkdtemp(prefix="bench-loader-")
    try:
        source = os.path.join(tmp, "phantoms.zip")
        with data_bench.ZipDatasetWriter(source) as writer:
            for img in data_bench.random_ellipse_phantoms(slices, resolution, 0):
                writer.add_image(np.rint(img * 255).astype(np.uint8)[:, :, None])
            writer.finish()
        items, counts = {}, {}
        workers = sorted({0, p["workers"]})
        for name, law in (("fully sampled", None),
                          ("undersampled", data_bench.RandomLineMaskLaw(4, min(20, resolution // 8)))):
            dest = os.path.join(tmp, name.replace(" ", "-"))
            data_bench.simulate_mri(source, dest, num_coils=8, mask_law=law)
            dataset, measurement = data_bench.training_dataset(dest, resolution)
            for w in workers:
                key = f"loader, {name} records, {w} worker{'s' if w != 1 else ''}"
                items[key], counts[key] = loader_seconds(dataset, w, count), count * batch
            if law is None:
                key = "MSM training steps (what the loader feeds)"
                steps = p["loader_training_steps"]
                items[key] = seconds(data_bench.training_steps(dataset, measurement, resolution, steps), device)
                counts[key] = steps * batch
        log(f"loader: {len(items)} items x {p['rounds']} rounds")
        raw, _ = interleaved(items, p["rounds"], warmup=False)  # training_steps has warmed up
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rates = {key: [counts[key] / t for t in times] for key, times in raw.items()}
    training = rates["MSM training steps (what the loader feeds)"]
    rows = [{"path": key, "images_per_s": spread(values), "vs_training": ratios(values, training)}
            for key, values in rates.items()]
    settings = {"resolution": resolution, "coils": 8, "batch": batch, "slices": slices, "timed_batches": count,
                "training_steps": p["loader_training_steps"], "rounds": p["rounds"],
                "training network": "DDPM++ cbase 32 (1,2,2), 2 blocks, attention 16",
                "mask": "random lines R = 4 (fixed protocol)"}
    return {"settings": settings, "rows": rows, "raw": raw}


def bench_edm_sampler(p: dict, device, log) -> dict:
    batches = [int(b) for b in p["edm_batches"].split(",")]
    steps = p["edm_steps"]
    items, nfe, levels = {}, {}, rho_schedule(steps)
    for b in batches:
        case = sampler_case("gray64", b, device, p["tiny"])
        gen = SeedGenerators(range(b), device=device)
        latents = gen.randn([b, *case.image_shape]).to(device)
        counter = CountingNetwork(case.net)
        with torch.no_grad():
            ODE()(net_denoiser(counter), noise_start(latents, levels[0].item()), gen, levels)
        nfe[b] = counter.images // b  # network calls of one run (ODE().evaluations: 2 per step, the last Euler)
        x = torch.randn(b, *case.image_shape, device=device)
        sigma = torch.full((b,), 1.0, device=device)

        def network_calls(net=case.net, x=x, sigma=sigma, n=nfe[b]):
            for _ in range(n):
                net(x, sigma)

        items[f"B={b}/sampler"] = seconds(lambda c=case, lat=latents, g=gen: ODE()(
            net_denoiser(c.net), noise_start(lat, levels[0].item()), g, levels), device)
        items[f"B={b}/network calls"] = seconds(network_calls, device)
    b = max(batches)
    memory = {f"B={b}/sampler": f"EDM sampler, B = {b}", f"B={b}/network calls": f"its network calls, B = {b}"}
    log(f"EDM sampler: {len(items)} items x {p['rounds']} rounds")
    with torch.no_grad():
        raw, memory = interleaved(items, p["rounds"], memory=memory, device=device)
    rows = [{"batch": b, "steps": steps, "nfe": nfe[b], "sampler_ms": statistics.median(raw[f"B={b}/sampler"]) * 1000,
             "network_ms": statistics.median(raw[f"B={b}/network calls"]) * 1000,
             "sampler_over_network": ratios(raw[f"B={b}/sampler"], raw[f"B={b}/network calls"])} for b in batches]
    network = network_name(p, "DDPM++ cbase 32 (1,2,2), 1 block, no attention")
    settings = {"network": network, "image": "1x64x64", "solver": "Heun (EDM), S_churn = 0", "steps": steps,
                "rounds": p["rounds"]}
    return {"settings": settings, "rows": rows, "memory_mib": memory, "raw": raw}


def bench_accelerator(p: dict, device, log, compile_backend: str = "inductor") -> dict:
    """fp32 / bf16 autocast x channels_last training (bench/train_throughput.py) and torch.compile on/off for the MSM
    sampler and its floor. Meant for CUDA; every part reports its error instead of stopping the benchmark."""
    out = {"settings": {"rounds": p["rounds"], "compile_backend": compile_backend}}
    resolution, batch = (16, 4) if p["tiny"] else (64, 32)
    try:
        cfg = tiny_network(resolution, 1, 1) if p["tiny"] else throughput_bench.default_network(resolution)
        items = {f"{precision}{' + channels_last' if cl else ''}":
                 (lambda pr=precision, cl=cl: throughput_bench.time_training(cfg, batch, p["train_steps"] + 2, pr, cl,
                                                                            device, max_seconds=60))
                 for precision in ("fp32", "bf16") for cl in (False, True)}
        log(f"accelerator training: {len(items)} items x {p['rounds']} rounds")
        raw, _ = interleaved(items, p["rounds"], warmup=False)
        out["training"] = {"settings": {"network": network_name(p, "DDPM++ cbase 32 (1,2,2), 2 blocks, attention 16"),
                                        "resolution": resolution, "batch": batch, "loss": "EDM"},
                           "rows": [{"configuration": key, "images_per_s": spread(v), "vs_fp32": ratios(v, raw["fp32"])}
                                    for key, v in raw.items()], "raw": raw}
    except Exception as e:  # noqa: BLE001 - an optional section: its failure is a result to report, not a crash
        out["training"] = {"error": f"{type(e).__name__}: {e}"}
    try:
        b, k = max(int(x) for x in p["batches"].split(",")), 3
        sigmas = vp200_sigmas()[: p["levels"]]
        cases = {"eager": sampler_case("gray64", b, device, p["tiny"]),
                 "compiled": sampler_case("gray64", b, device, p["tiny"], compile_backend=compile_backend)}
        items = {f"{mode}/{column}": seconds(lambda c=c, col=column: c.run(col, k, sigmas), device)
                 for mode, c in cases.items() for column in ("msm batched", "floor")}
        log(f"compile on/off: {len(items)} items x {p['rounds']} rounds (the warm-up compiles)")
        with torch.no_grad():
            raw, _ = interleaved(items, p["rounds"])
        out["compile"] = {"settings": {"case": "gray64", "batch": b, "K": k, "levels": len(sigmas)},
                          "rows": [{"what": column, "eager_ms": statistics.median(raw[f"eager/{column}"]) * 1000,
                                    "compiled_ms": statistics.median(raw[f"compiled/{column}"]) * 1000,
                                    "compiled_over_eager": ratios(raw[f"compiled/{column}"], raw[f"eager/{column}"])}
                                   for column in ("msm batched", "floor")], "raw": raw}
    except Exception as e:  # noqa: BLE001 - as above
        out["compile"] = {"error": f"{type(e).__name__}: {e}"}
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Reporting


def _range(r: dict, digits: int = 3) -> str:
    return f"{r['median']:.{digits}f} ({r['min']:.2f}-{r['max']:.2f})"


def _settings_line(settings: dict) -> str:
    return "Settings: " + "; ".join(f"{k} {', '.join(map(str, v)) if isinstance(v, list) else v}"
                                    for k, v in settings.items()) + "."


def _memory_table(memory: dict) -> list:
    lines = ["| workload | peak memory above start (MiB) |", "|---|---|"]
    lines += [f"| {name} | {'n/a' if v is None else f'{v:.1f}'} |" for name, v in memory.items()]
    return lines


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [f"# Benchmark results ({results['mode']})", "",
             f"Command: `{results['command']}`", "",
             f"Machine: {machine_line(m)}.", "",
             f"Started {results['started']}, took {results['seconds']:.0f} s. Every item ran once per round in a "
             "shuffled order; cells are medians over rounds; ratios are taken within each round and shown as median "
             "(min-max over rounds).", ""]
    if "sampler" in results:
        lines += _sampler_markdown(results["sampler"], results["plots"])
    if "training" in results:
        lines += _training_markdown(results["training"])
    if "loader" in results:
        lines += _loader_markdown(results["loader"])
    if "edm_sampler" in results:
        lines += _edm_markdown(results["edm_sampler"])
    lines += [f"Memory: {results['memory_method']}.", ""]
    not_run = [name for name in ("sampler", "training", "loader", "edm_sampler") if name not in results]
    if not_run:
        lines += [f"Sections not run (--sections): {', '.join(not_run)}.", ""]
    acc = results.get("accelerator")
    if acc is None:
        lines += ["## bf16, channels_last, torch.compile", "",
                  f"Not measured: device {m['device']} (this section runs on CUDA only).", ""]
    else:
        lines += _accelerator_markdown(acc)
    return "\n".join(lines)


def _sampler_markdown(s: dict, plot_paths: list) -> list:
    lines = ["## MSM sampler step against its network floor", "",
             _settings_line(s["settings"]) + " Floor: one network call on the K x B batch per level. Reference: "
             "msm_sampler's reference variant (one subset at a time, written back before the next, as the MSM "
             "reference code). Outside: the sampler with a network that costs nothing, measured directly; "
             "1 + outside / floor estimates MSM / floor without the network's noise. Times are per sampler step (one "
             "level) for the whole batch.", "",
             "| case | batch | K | MSM step (ms) | floor (ms) | MSM / floor | outside (ms) | 1 + outside / floor | "
             "reference (ms) | reference / MSM |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in s["rows"]:
        lines.append(f"| {r['description']} | {r['batch']} | {r['K']} | {r['msm_ms_per_step']:.1f} | "
                     f"{r['floor_ms_per_step']:.1f} | {_range(r['msm_over_floor'])} | "
                     f"{r['outside_ms_per_step']:.2f} | {r['stub_estimate']:.3f} | {r['reference_ms_per_step']:.1f} | "
                     f"{_range(r['reference_over_msm'], 2)} |")
    a = s["acceptance"]
    lines.append("")
    if s["settings"]["network"].startswith("tiny"):
        lines.append("A --quick run (tiny network, few levels and rounds): the targets below are about the full run.")
    if "mri_K1" in a:
        m = a["mri_K1"]
        lines.append(f"Issue 15 target, MRI K = 1 at batch {a['batch']}: {m['ratio']:.3f}x of the floor measured, "
                     f"{m['stub_estimate']:.3f}x from the stub (target <= {m['target']}x: "
                     f"{'met' if m['met'] else 'not met'} / {'met' if m['stub_met'] else 'not met'}).")
    if "images_worst" in a:
        w = a["images_worst"]
        lines.append(f"Issue 15 target, every image case at batch {a['batch']}: worst {w['ratio']:.3f}x measured "
                     f"({w['case']}, K = {w['K']}), worst {w['stub_estimate']:.3f}x from the stub ({w['stub_case']}, "
                     f"K = {w['stub_K']}) (target <= {w['target']}x: {'met' if w['met'] else 'not met'} / "
                     f"{'met' if w['stub_met'] else 'not met'}).")
    lines += [""] + _memory_table(s["memory_mib"]) + [""]
    return lines + [f"Plots: {', '.join(plot_paths)}", ""]


def _training_markdown(t: dict) -> list:
    lines = ["## Training images/s: MSM and Ambient against EDM", "", _settings_line(t["settings"]), "",
             "| data | loss | images/s | vs EDM |", "|---|---|---|---|"]
    lines += [f"| {r['data']} | {r['loss']} | {r['images_per_s']['median']:.1f} | {_range(r['vs_edm'], 2)} |"
              for r in t["rows"]]
    return lines + [""] + _memory_table(t["memory_mib"]) + [""]


def _loader_markdown(d: dict) -> list:
    lines = ["## MRI training data path against the training rate", "",
             _settings_line(d["settings"]) + " The loader's rate is measured with training idle; above 1x it keeps up.",
             "", "| path | images/s | x training |", "|---|---|---|"]
    lines += [f"| {r['path']} | {r['images_per_s']['median']:.1f} | {_range(r['vs_training'], 1)} |"
              for r in d["rows"]]
    return lines + [""]


def _edm_markdown(e: dict) -> list:
    lines = ["## EDM sampler against its network calls", "", _settings_line(e["settings"]), "",
             "| batch | steps (network calls) | sampler (ms) | network calls (ms) | sampler / network |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['steps']} ({r['nfe']}) | {r['sampler_ms']:.1f} | {r['network_ms']:.1f} | "
              f"{_range(r['sampler_over_network'])} |" for r in e["rows"]]
    return lines + [""] + _memory_table(e["memory_mib"]) + [""]


def _accelerator_markdown(acc: dict) -> list:
    lines = ["## bf16, channels_last, torch.compile (CUDA)", ""]
    tr = acc["training"]
    if "error" in tr:
        lines += [f"Training configurations failed: {tr['error']}", ""]
    else:
        lines += [_settings_line(tr["settings"]), "", "| configuration | images/s | vs fp32 |", "|---|---|---|"]
        lines += [f"| {r['configuration']} | {r['images_per_s']['median']:.1f} | {_range(r['vs_fp32'], 2)} |"
                  for r in tr["rows"]]
        lines.append("")
    co = acc["compile"]
    if "error" in co:
        lines += [f"torch.compile failed: {co['error']}", ""]
    else:
        lines += [_settings_line(co["settings"]) + f" Backend {acc['settings']['compile_backend']}.", "",
                  "| what | eager (ms) | compiled (ms) | compiled / eager |", "|---|---|---|---|"]
        lines += [f"| {r['what']} | {r['eager_ms']:.1f} | {r['compiled_ms']:.1f} | "
                  f"{_range(r['compiled_over_eager'])} |" for r in co["rows"]]
        lines.append("")
    return lines


def plots(results: dict, out: str) -> list:
    """Ratio against K (one PNG per case) and time per image against the batch size (one PNG per case)."""
    rows = results["sampler"]["rows"]
    paths = []
    for name in dict.fromkeys(r["case"] for r in rows):
        case_rows = [r for r in rows if r["case"] == name]
        target = TARGETS["mri" if name.startswith("mri") else "images"]
        series = {f"batch {b}": [(r["K"], r["msm_over_floor"]["median"]) for r in case_rows if r["batch"] == b]
                  for b in dict.fromkeys(r["batch"] for r in case_rows)}
        path = os.path.join(out, f"sampler_ratio_vs_K_{name}.png")
        line_plot(path, f"{case_rows[0]['description']}: MSM step / network floor (median of rounds)", "K (subsets)",
                  "MSM / floor", series, hlines={"floor": 1.0, f"target {target}x": target})
        paths.append(path)
        series = {}
        for k in dict.fromkeys(r["K"] for r in case_rows):
            series[f"MSM K={k}"] = [(r["batch"], r["msm_ms_per_image_step"]) for r in case_rows if r["K"] == k]
            series[f"floor K={k}"] = [(r["batch"], r["floor_ms_per_image_step"]) for r in case_rows if r["K"] == k]
        path = os.path.join(out, f"sampler_time_vs_batch_{name}.png")
        line_plot(path, f"{case_rows[0]['description']}: time per image and step", "batch", "ms per image per step",
                  series, log_x=True, log_y=True)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------------------------------


@click.command()
@click.option("--out", default="out/bench", show_default=True, help="Folder for results.json, results.md, PNGs")
@click.option("--quick", is_flag=True, help="A tiny network and two rounds: checks the command end to end")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--threads", type=int, default=None, help="torch threads  [default: torch's]")
@click.option("--rounds", type=int, default=None, help="Interleaved rounds  [default: 5, --quick 2]")
@click.option("--sections", default="sampler,training,loader,edm", show_default=True,
              help="Comma list of sections to run (the CUDA-only section runs whenever --device is cuda)")
def main(out, quick, device, threads, rounds, sections):
    """One benchmark command for every performance figure the project claims (see bench/run.py's docstring)."""
    chosen = [s.strip() for s in sections.split(",") if s.strip()]
    known = ("sampler", "training", "loader", "edm")
    if not chosen or set(chosen) - set(known):
        raise UserError(f"--sections must be a comma list of {', '.join(known)}, got {sections!r}.")
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be a positive integer, got {threads}.")
    if rounds is not None and rounds < 1:
        raise UserError(f"--rounds must be a positive integer, got {rounds}.")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: torch sees no CUDA device here; use --device cpu.")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} exists and is not a folder.")
    if threads:
        torch.set_num_threads(threads)
    p = dict(QUICK if quick else FULL)
    if rounds:
        p["rounds"] = rounds
    if device.type == "cuda" and not quick:
        p["batches"] += ",64"  # issue 15: the fraction of step time outside the network at batch 64 on the GPU

    start = time.perf_counter()

    def log(msg: str):
        print(f"[{time.perf_counter() - start:6.0f} s] {msg}", flush=True)

    results = {"mode": "quick" if quick else "full", "command": " ".join(["python", "bench/run.py", *sys.argv[1:]]),
               "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "machine": machine(device), "settings": p, "memory_method": memory_method(device)}
    log(f"machine: {machine_line(results['machine'])}")
    runners = {"sampler": bench_sampler, "training": bench_training, "loader": bench_loader, "edm": bench_edm_sampler}
    keys = {"sampler": "sampler", "training": "training", "loader": "loader", "edm": "edm_sampler"}
    for section in chosen:
        results[keys[section]] = runners[section](p, device, log)
    if device.type == "cuda":
        results["accelerator"] = bench_accelerator(p, device, log)
    results["seconds"] = time.perf_counter() - start
    results["machine"]["load_average_at_end"] = _load_average()

    # Everything is measured; write the outputs into a fresh folder and move them into place, so that an interrupted
    # run leaves the previous results whole. Not dnnlib.util.atomic_folder: --out may already hold other files (a
    # folder cannot replace a non-empty one in one step), so the new files are renamed into it one by one.
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".bench-", dir=os.path.dirname(os.path.abspath(out)))
    try:
        results["plots"] = [os.path.join(out, os.path.basename(path)) for path in plots(results, staging)] \
            if "sampler" in results else []
        with open(os.path.join(staging, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
        text = markdown(results)
        with open(os.path.join(staging, "results.md"), "w") as f:
            f.write(text)
        os.makedirs(out, exist_ok=True)
        for name in os.listdir(staging):
            os.replace(os.path.join(staging, name), os.path.join(out, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(text)
    log(f"wrote {os.path.join(out, 'results.json')}, results.md and {len(results['plots'])} PNGs")


if __name__ == "__main__":
    dnnlib.run_cli(main)
