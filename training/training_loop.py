"""The training loop: EDM's semantics (kimg bookkeeping, global batch with per-rank accumulation, lr ramp-up, EMA
half-life, NaN-safe gradients, tick / snapshot / state dump), with exact resume.

Exact resume rests on two choices:
- The data order is a pure function of (seed, global stream position): epoch e visits the examples in the order of a
  permutation seeded by (seed, e), and optimizer step k consumes stream positions [k B, (k+1) B). A resumed run starts
  reading at position cur_nimg: no replay, no loader state to save.
- Every other random draw comes from per-rank RNGs (the loss's torch.Generator and the global RNG used by dropout)
  whose states are saved for every rank in the training state.

With several ranks the network is wrapped in DistributedDataParallel: gradients are averaged during the backward pass
of the last accumulation round (the others run under no_sync), so the fp16 GradScaler checks the reduced gradients
for overflow and every rank takes, or skips, the same steps.
"""

import copy
import hashlib
import json
import os
import re
import resource
import time
from contextlib import nullcontext

import numpy as np
import torch

from dnnlib import EasyDict, UserError, atomic_write
from torch_utils import distributed as dist
from torch_utils.loss_curves import SIGMA_BAND_EDGES, band_stats, band_totals, write_loss_plot
from training import snapshot as checkpoint
from training.dataset import open_dataset
from training.loss import AmbientLoss, ClassifierLoss, EDMLoss, MSMLoss, VELoss, VPLoss
from training.lr_schedules import learning_rate
from training.patches import WithPositions, crop_batch, from_patch_config
from training.power_ema import PowerEMA

# What an options dict may name in its 'class_name' entries (training_options.json records these names); objects are
# built from these tables, never by looking a dotted name up.
DATASETS = {"training.dataset.open_dataset": open_dataset}
LOSSES = {f"training.loss.{cls.__name__}": cls for cls in (EDMLoss, VPLoss, VELoss, MSMLoss, AmbientLoss,
                                                                   ClassifierLoss)}
OPTIMIZERS = {"torch.optim.Adam": torch.optim.Adam}


def build(kwargs: dict, table: dict, **extra):
    """{'class_name': a key of table, **kw} -> table[class_name](**kw, **extra)."""
    kwargs = dict(kwargs)
    name = kwargs.pop("class_name")
    if name not in table:
        raise UserError(f"class_name {name!r} is not one of {', '.join(table)}.")
    return table[name](**kwargs, **extra)


class StreamSampler(torch.utils.data.Sampler):
    """Indices of this rank's examples, forever, starting at global stream position `start_pos`.

    Global position s maps to example perm_{s // N}[s % N]. Within one optimizer step (B = batch_gpu * world * rounds
    positions), accumulation round a of rank r takes positions a*batch_gpu*world + r*batch_gpu + [0, batch_gpu).
    With `class_of` (the class index of every example), epochs are class-balanced instead (MGDM's imbalanced
    sampler): epoch e is N draws with replacement, example i drawn with probability proportional to 1 / (size of its
    class), seeded by (seed, e) like the permutations, so resume stays exact.
    """

    def __init__(self, num_examples, rank, world_size, batch_gpu, rounds, seed, start_pos=0, shuffle=True,
                 with_position=False, class_of=None):
        self.n, self.rank, self.world, self.batch_gpu, self.rounds = num_examples, rank, world_size, batch_gpu, rounds
        self.seed, self.start_pos, self.shuffle = seed, start_pos, shuffle
        self.with_position = with_position  # yield (index, global position): the 'resample' protocol keys on it
        self.batch_size = batch_gpu * world_size * rounds
        if start_pos % self.batch_size:
            raise ValueError(f"start position {start_pos} is not a multiple of the batch size {self.batch_size}")
        self._epoch, self._perm = None, None
        self._weights = None
        if class_of is not None:
            class_of = torch.as_tensor(np.asarray(class_of), dtype=torch.int64)
            self._weights = 1.0 / torch.bincount(class_of)[class_of].to(torch.float64)

    def _example(self, pos):
        epoch = pos // self.n
        if epoch != self._epoch:
            if self._weights is not None:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._perm = torch.multinomial(self._weights, self.n, replacement=True, generator=g).numpy()
            elif self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._perm = torch.randperm(self.n, generator=g).numpy()
            else:
                self._perm = np.arange(self.n)
            self._epoch = epoch
        return int(self._perm[pos % self.n])

    def __iter__(self):
        step_pos = self.start_pos
        while True:
            for a in range(self.rounds):
                base = step_pos + (a * self.world + self.rank) * self.batch_gpu
                for j in range(self.batch_gpu):
                    pos = base + j
                    yield (self._example(pos), pos) if self.with_position else self._example(pos)
            step_pos += self.batch_size


def _to_device(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


class SigmaRecorder:
    """Keeps the noise levels the loss drew in its last call, for the per-band loss statistics (loss_curves.py).

    Every diffusion loss draws its per-example training sigma through its `sample_sigma(n, generator, device)` once
    per call (patch training: once per patch); wrapping that method on the loss object reads the draw without
    changing what the loss computes or draws. A loss without `sample_sigma` (ClassifierLoss) has no bands:
    `active` is then False."""

    def __init__(self, loss_fn):
        self.last = None
        draw = getattr(loss_fn, "sample_sigma", None)
        self.active = draw is not None
        if self.active:
            def recording_draw(n, generator, device):
                self.last = draw(n, generator, device)
                return self.last

            loss_fn.sample_sigma = recording_draw

    def take(self) -> torch.Tensor:
        """The sigma of the last loss call, once (a loss that did not draw raises, not reuse an old draw)."""
        if self.last is None:
            raise RuntimeError("the loss returned without drawing its noise levels through sample_sigma")
        sigma, self.last = self.last, None
        return sigma


def format_duration(seconds: float) -> str:
    """Seconds -> '2d 03h 04m', '3h 04m', '4m 05s' or '5s' for the tick line's ETA."""
    s = int(round(max(seconds, 0)))
    d, h, m = s // 86400, s // 3600 % 24, s // 60 % 60
    if d:
        return f"{d}d {h:02d}h {m:02d}m"
    if h:
        return f"{h}h {m:02d}m"
    return f"{m}m {s % 60:02d}s" if m else f"{s}s"


def _rng_state(loss_gen: torch.Generator) -> dict:
    state = {"loss": loss_gen.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict, loss_gen: torch.Generator):
    loss_gen.set_state(state["loss"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _finite_grads_(params: list):
    """Replace NaN/Inf gradients by finite values in place (EDM's guard for fp32 / bf16; under fp16 the GradScaler
    has already decided to skip the step when there were any)."""
    for p in params:
        if p.grad is not None:
            torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)


def cpu_bf16_support(cpuinfo: str = "/proc/cpuinfo") -> tuple[bool | None, str]:
    """(native, what the CPU has): whether it executes bf16 in hardware (x86 flags avx512_bf16 / amx_bf16, Arm bf16 in
    /proc/cpuinfo), None when that cannot be told; and a description for the log, e.g. 'AVX2 without avx512_bf16 or
    amx_bf16'. Without native bf16, autocast emulates it and is usually several times slower than fp32."""
    capability = torch.backends.cpu.get_cpu_capability()
    try:
        with open(cpuinfo) as f:
            flags = set(re.search(r"^(?:flags|Features)\s*:(.*)$", f.read(), re.M).group(1).split())
    except (OSError, AttributeError):
        return None, f"{capability} (no /proc/cpuinfo flags to check for bf16 instructions)"
    native = sorted(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    if native:
        return True, f"{capability} with {' and '.join(native)}"
    return False, f"{capability} without avx512_bf16 or amx_bf16"


def _truncate_stats(path: str, nimg: int) -> int:
    """Keep the lines of stats.jsonl up to training position nimg (a resumed run redoes the ticks after its state;
    a line torn by a kill is dropped too) -> how many lines were removed."""
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = f.read().splitlines()
    keep = []
    for line in lines:
        try:
            if round(json.loads(line)["kimg"] * 1000) > nimg:
                break
        except (ValueError, KeyError, TypeError):
            break
        keep.append(line)
    if len(keep) < len(lines):
        with atomic_write(path, "w") as f:
            f.write("".join(line + "\n" for line in keep))
    return len(lines) - len(keep)


def _write_loss_plot(stats_path: str, log):
    """loss.png beside stats.jsonl (loss_curves.write_loss_plot); a plot that cannot be drawn costs a log line, never
    the run."""
    try:
        write_loss_plot(stats_path)
    except (OSError, ValueError) as e:
        log(f"Warning: could not draw {os.path.join(os.path.dirname(stats_path), 'loss.png')}: {e}")


def parameter_hash(net: torch.nn.Module) -> str:
    """SHA-256 of all parameter bytes: ranks of one run must agree on it exactly."""
    h = hashlib.sha256()
    for p in net.parameters():
        h.update(p.detach().cpu().numpy().tobytes())  # C-order bytes whatever the memory format
    return h.hexdigest()


def _save_snapshots(run_dir: str, config: dict, ema: torch.nn.Module, profiles: PowerEMA | None, nimg: int,
                    step: int):
    """The network snapshot at training position nimg and, with --ema-profiles, one snapshot per power-function EMA
    profile (`power-ema-{sigma_rel}-{kimg}.pt`, an ordinary snapshot whose config says which profile at which
    optimizer step it holds: what posthoc_ema.py reads)."""
    checkpoint.save_snapshot(os.path.join(run_dir, checkpoint.progress_file_name("network-snapshot", nimg)), config,
                             ema)
    if profiles is None:
        return
    for sigma_rel, profile in zip(profiles.sigma_rels, profiles.emas):
        checkpoint.save_snapshot(os.path.join(run_dir, checkpoint.progress_file_name(f"power-ema-{sigma_rel:g}", nimg)),
                                 {**config, "power_ema": {"sigma_rel": sigma_rel, "step": step, "nimg": nimg}},
                                 profile)


def snapshot_config(c: EasyDict, dataset) -> dict:
    """What a snapshot must carry so generate.py / reconstruct.py need no flags about the model or the data. Loading
    accepts only the sections and keys that checkpoint.check_snapshot_config knows: add new ones there too."""
    return {
        "network": c.network,
        "dataset": dataset.describe(),
        "loss": c.loss_kwargs,
        "measurement": c.get("measurement"),
        **({"patches": c.patches} if c.get("patches") else {}),
        "training": {k: c[k] for k in ("batch_size", "total_kimg", "seed", "precision") if k in c},
    }


def training_loop(
    c: EasyDict,  # the options dict written to training_options.json (see train.py)
    run_dir: str,
    device: torch.device,
    log=print,  # rank-0 logger (prints and appends to log.txt)
    resume_state: str | None = None,  # training-state file to continue from
):
    rank, world = dist.get_rank(), dist.get_world_size()
    start_time = time.time()
    if rank == 0:
        removed = checkpoint.remove_stale_temp_files(run_dir)
        if removed:
            log(f"Removed {len(removed)} partial checkpoint file(s) left by a killed run: {', '.join(removed)}")
    if rank == 0 and c.precision == "bf16" and device.type == "cpu":
        native, cpu = cpu_bf16_support()
        if native is False:
            log(f"Warning: --precision bf16 on a CPU without bf16 instructions ({cpu}): autocast emulates bf16 there, "
                "usually several times slower than fp32; `python bench/train_throughput.py` measures both.")

    # Data.
    dataset = build(c.dataset_kwargs, DATASETS)
    rounds = c.batch_size // (c.batch_gpu * world)
    assert c.batch_size == c.batch_gpu * world * rounds

    # Network, EMA, loss, optimizer. Initial weights come from the run's seed, and DistributedDataParallel broadcasts
    # rank 0's copy, so every rank starts from the same parameters whatever its RNG history.
    torch.manual_seed(c.seed)
    net = checkpoint.build_network(c.network).to(device)
    if c.get("transfer"):
        src, _ = checkpoint.load_snapshot(c.transfer)
        net.load_state_dict(src.state_dict())
    net.train().requires_grad_(True)
    memory_format = torch.channels_last if c.get("channels_last") else torch.contiguous_format
    net.to(memory_format=memory_format)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    profiles = PowerEMA(net, c.ema_profiles) if c.get("ema_profiles") else None
    loss_fn = build(c.loss_kwargs, LOSSES)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = build(c.optimizer_kwargs, OPTIMIZERS, params=params)
    autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[c.precision]
    scaler = torch.amp.GradScaler(device.type, enabled=(c.precision == "fp16"))
    loss_gen = torch.Generator(device).manual_seed(c.seed * world + rank)
    torch.manual_seed(c.seed * world + rank)  # dropout draws from the global RNG; its state is saved per rank

    if rank == 0:
        num_params, desc = sum(p.numel() for p in net.parameters()), dataset.describe()
        log(f"Network: {c.network['class_name']}, {num_params / 1e6:.2f} M parameters; dataset: "
            f"{len(dataset)} examples of shape {desc.get('image_shape') or desc.get('shape')}; device {device}, "
            f"{world} rank(s), {rounds} accumulation round(s) of {c.batch_gpu}, precision {c.precision}")

    # Patch training (training/patches.py): one patch size per step, drawn from (seed, step); cur_nimg counts the
    # examples trained on (patches), data_nimg the images read from the data stream (the two differ when a step crops
    # several patches per image).
    geometry, patch_law = from_patch_config(c.patches) if c.get("patches") else (None, None)
    if rank == 0 and profiles is not None:
        log(f"Power-function EMA profiles sigma_rel {', '.join(f'{s:g}' for s in profiles.sigma_rels)} (gamma "
            f"{', '.join(f'{g:.3f}' for g in profiles.gammas)}): saved beside every network snapshot; "
            "posthoc_ema.py reconstructs other lengths from them.")
    if rank == 0 and patch_law is not None:
        log(f"Patch training on {geometry.describe()}: sizes {patch_law.sizes} with probabilities "
            f"{[round(p, 4) for p in patch_law.probs]} and {patch_law.muls} crops per image (mean "
            f"{patch_law.mean_multiplier():.3g}); kimg, --duration, EMA and lr ramp-up count the patches trained on.")
    total_nimg = int(round(c.total_kimg * 1000))
    cur_nimg, cur_tick = 0, 0
    data_nimg = 0
    if resume_state is not None:
        state = checkpoint.load_training_state(resume_state, c, world, device)  # checked before any use
        net.load_state_dict(state["net"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        if profiles is not None:
            profiles.load_state_dicts(state["ema_profiles"])
        cur_nimg, cur_tick = state["progress"]["cur_nimg"], state["progress"]["cur_tick"]
        data_nimg = state["progress"].get("data_nimg", cur_nimg)
        if len(state["rng"]) == world:
            _set_rng_state(state["rng"][rank], loss_gen)
        elif rank == 0:
            log(f"Warning: the state was saved with {len(state['rng'])} rank(s), now {world}; noise draws are "
                "reseeded (the data order and everything else continue exactly).")
        if rank == 0:
            log(f"Resuming from {resume_state} at {cur_nimg / 1000:.3f} kimg (tick {cur_tick}).")
            if state["progress"]["total_kimg"] != c.total_kimg:
                log(f"The duration changed from {state['progress']['total_kimg']:g} to {c.total_kimg:g} kimg."
                    + (" The cosine learning-rate schedule now ends at the new duration, so the rate changes from "
                       "here on." if c.get("lr_schedule", {}).get("kind") == "cosine" else ""))
            if cur_nimg >= total_nimg:
                log(f"The run is already at {cur_nimg / 1000:.3f} kimg, at or past --duration ({c.total_kimg:g} "
                    f"kimg): nothing to train; it ends at {cur_nimg / 1000:.3f} kimg.")
        del state
    stats_path = os.path.join(run_dir, "stats.jsonl")
    if rank == 0 and (redone := _truncate_stats(stats_path, cur_nimg)):
        log(f"Removed {redone} line(s) of stats.jsonl past {cur_nimg / 1000:.3f} kimg (those ticks are redone).")
    ddp = dist.data_parallel(net, device)
    # --compile: the loss calls a torch.compile'd wrapper of the (DDP-wrapped) network; `net` itself stays the plain
    # module, so the EMA, the snapshots and the training states keep its state_dict keys (no `_orig_mod.` prefix),
    # and a run may switch compile on or off between resumes.
    loss_net = torch.compile(ddp) if c.get("compile") else ddp
    if rank == 0 and c.get("compile"):
        log("Compiling the network with torch.compile: the first steps include the compilation (minutes on a CPU).")

    class_of = [int(dataset.get_label(i).argmax()) for i in range(len(dataset))] if c.get("balanced") else None
    sampler = StreamSampler(len(dataset), rank, world, c.batch_gpu, rounds, c.seed, start_pos=data_nimg,
                            with_position=getattr(dataset, "uses_stream_position", False), class_of=class_of)
    validation = None
    if c.get("val_dataset_kwargs"):
        from training.classifier import Validation

        validation = Validation(build(c.val_dataset_kwargs, DATASETS), c.seed)
    # The loader gets its own generator: iter(DataLoader) otherwise draws a base seed from the global RNG, which
    # would shift the dropout stream of a resumed run by one draw.
    loader = torch.utils.data.DataLoader(
        dataset, sampler=sampler, batch_size=c.batch_gpu, num_workers=c.workers,
        pin_memory=(device.type == "cuda"), prefetch_factor=(4 if c.workers > 0 else None),
        persistent_workers=c.workers > 0, generator=torch.Generator().manual_seed(c.seed))
    data_iter = iter(loader)

    tick_start_nimg, tick_start_time = cur_nimg, time.time()
    # On this rank, on the device (no host synchronisation per round): the sum of the per-example losses and their
    # count, then per sigma band (loss_curves.band_totals) the sums and the counts; reduced over ranks at each tick.
    sigma_recorder = SigmaRecorder(loss_fn)
    num_bands = len(SIGMA_BAND_EDGES) + 1 if sigma_recorder.active else 0
    tick_totals = torch.zeros(2 + 2 * num_bands, dtype=torch.float64, device=device)
    config = snapshot_config(c, dataset)
    done = cur_nimg >= total_nimg

    while not done:
        # One optimizer step over the global batch: per-rank gradients of (sum of losses) / (batch / world), summed
        # over rounds locally and averaged over ranks by DDP in the last round's backward pass.
        optimizer.zero_grad(set_to_none=True)
        patch_size, mul = (patch_law.step_choice(c.seed, data_nimg // c.batch_size) if patch_law is not None
                           else (None, 1))
        for round_idx in range(rounds):
            last_round = round_idx == rounds - 1
            with nullcontext() if last_round else dist.no_sync(ddp):
                batch = _to_device(next(data_iter), device)
                step_net = loss_net
                if patch_size is not None:
                    batch, positions = crop_batch(batch, geometry, patch_size, mul, loss_gen)
                    step_net = WithPositions(loss_net, positions)
                if "image" in batch:
                    batch["image"] = batch["image"].contiguous(memory_format=memory_format)
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    loss = loss_fn(net=step_net, batch=batch, generator=loss_gen)
                tick_totals[0] += loss.detach().double().sum()
                tick_totals[1] += loss.shape[0]
                if num_bands:
                    tick_totals[2:] += band_totals(sigma_recorder.take(), loss).flatten()
                if last_round:  # a rank that hangs before the reduction is named here, not left to stall the others
                    dist.barrier(f"the gradient reduction of the step at {cur_nimg / 1000:.3f} kimg")
                scaler.scale(loss.sum() / (c.batch_size // world * mul)).backward()
        scaler.unscale_(optimizer)  # the overflow check sees the reduced gradients: the same decision on every rank
        _finite_grads_(params)
        lr = learning_rate(cur_nimg, c.optimizer_kwargs["lr"], c.lr_rampup_kimg, c.total_kimg, c.get("lr_schedule"))
        for g in optimizer.param_groups:
            g["lr"] = lr
        scaler.step(optimizer)
        scaler.update()

        # EMA with a half-life in images (ramped up early on, as in EDM).
        ema_halflife_nimg = c.ema_halflife_kimg * 1000
        if c.ema_rampup_ratio is not None:
            ema_halflife_nimg = min(ema_halflife_nimg, cur_nimg * c.ema_rampup_ratio)
        ema_beta = 0.5 ** (c.batch_size * mul / max(ema_halflife_nimg, 1e-8))
        with torch.no_grad():
            for p_ema, p_net in zip(ema.parameters(), net.parameters()):
                p_ema.copy_(p_net.detach().lerp(p_ema, ema_beta))
            for b_ema, b_net in zip(ema.buffers(), net.buffers()):
                b_ema.copy_(b_net)
        if profiles is not None:
            profiles.update(net, data_nimg // c.batch_size + 1)  # steps counted from 1, exact on resume

        cur_nimg += c.batch_size * mul
        data_nimg += c.batch_size
        done = cur_nimg >= total_nimg
        if not done and cur_tick != 0 and cur_nimg < tick_start_nimg + c.kimg_per_tick * 1000:
            continue

        # Tick: status line, stats, snapshot, training state.
        dist.barrier(f"the tick at {cur_nimg / 1000:.3f} kimg")
        totals = dist.all_reduce_(tick_totals.clone()).cpu()
        tick_totals.zero_()
        tick_end_time = time.time()
        tick_nimg = cur_nimg - tick_start_nimg
        # ETA from this tick's rate (the first tick's includes start-up, and compilation with --compile).
        eta_sec = (total_nimg - cur_nimg) * (tick_end_time - tick_start_time) / max(tick_nimg, 1)
        stats = {
            "kimg": cur_nimg / 1000, "tick": cur_tick, "loss": (totals[0] / totals[1].clamp(min=1)).item(),
            "sec_per_tick": tick_end_time - tick_start_time,
            "sec_per_kimg": (tick_end_time - tick_start_time) / max(tick_nimg / 1000, 1e-8),
            "images_per_sec": tick_nimg / max(tick_end_time - tick_start_time, 1e-8), "lr": lr,
            "ema_halflife_kimg": ema_halflife_nimg / 1000, "total_sec": tick_end_time - start_time,
            "cpu_mem_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "gpu_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0,
            "eta_sec": eta_sec,
            **(band_stats(totals[2:].reshape(2, num_bands)) if num_bands else {}),
        }
        if validation is not None and rank == 0:
            stats.update(validation(ema, device))
        if rank == 0:
            log(f"tick {cur_tick:<5d} kimg {stats['kimg']:<9.3f} loss {stats['loss']:<8.4f} "
                f"time {stats['total_sec']:<8.1f} sec/tick {stats['sec_per_tick']:<7.1f} "
                f"img/s {stats['images_per_sec']:<7.1f} lr {lr:.2e} cpumem {stats['cpu_mem_gb']:.2f} "
                f"gpumem {stats['gpu_mem_gb']:.2f} eta {format_duration(eta_sec)}"
                + "".join(f" {k} {v:.3f}" for k, v in stats.items() if k.startswith("val_")))
            with open(stats_path, "a") as f:
                f.write(json.dumps(stats) + "\n")

        write_snapshot = c.snapshot_ticks is not None and (done or cur_tick % c.snapshot_ticks == 0)
        write_state = c.state_dump_ticks is not None and (done or cur_tick % c.state_dump_ticks == 0)
        cur_tick += 1
        tick_start_nimg, tick_start_time = cur_nimg, time.time()
        if write_snapshot and rank == 0:
            _save_snapshots(run_dir, config, ema, profiles, cur_nimg, data_nimg // c.batch_size)
            _write_loss_plot(stats_path, log)
        if write_state:
            hashes = dist.all_gather_object(parameter_hash(net))
            if len(set(hashes)) != 1:
                raise RuntimeError(f"Ranks hold different parameters at {cur_nimg / 1000:.3f} kimg: {hashes}")
            if rank == 0 and world > 1:
                log(f"All {world} ranks hold identical parameters (sha256 {hashes[0][:16]}).")
            rng_states = dist.all_gather_object(_rng_state(loss_gen))
            if rank == 0:
                checkpoint.save_training_state(
                    os.path.join(run_dir, checkpoint.progress_file_name("training-state", cur_nimg)), config,
                    {"net": net.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict(),
                     **({"ema_profiles": profiles.state_dicts()} if profiles is not None else {}),
                     "progress": {"cur_nimg": cur_nimg, "cur_tick": cur_tick, "total_kimg": c.total_kimg,
                                  "data_nimg": data_nimg},
                     "rng": rng_states})
        dist.barrier(f"the end of the tick at {cur_nimg / 1000:.3f} kimg")

    final_snapshot = os.path.join(run_dir, checkpoint.progress_file_name("network-snapshot", cur_nimg))
    if rank == 0 and not os.path.exists(final_snapshot):  # a run resumed past its new duration
        _save_snapshots(run_dir, config, ema, profiles, cur_nimg, data_nimg // c.batch_size)
        log(f"Wrote the final snapshot {os.path.basename(final_snapshot)}.")
        if os.path.exists(stats_path):
            _write_loss_plot(stats_path, log)
    if rank == 0:
        log(f"Done: {cur_nimg / 1000:.3f} kimg in {time.time() - start_time:.1f} s.")
    return net, ema
