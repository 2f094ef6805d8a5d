"""The ``anaus pretrain`` loop, shared by every method: streaming batches -> method -> LARS.

The trainer knows a pre-training method only through ``anaus_core.methods.PretrainMethod``
(``config.method`` picks it). One optimiser step::

    for each of accumulation_steps micro-batches:
        batch    = next(loader)                                # timed: data-wait
        prepared = method.prepare_batch(batch, generator=g)    # e.g. photometric ops on the device
    method.begin_step(all prepared micro-batches)              # e.g. target projections of the step
    for each micro-batch:
        outputs  = method(prepared, generator=g, step=step)    # bf16 autocast on CUDA only
        (outputs["loss"] / accumulation_steps).backward()      # DDP all-reduces on the last one
    lr = cosine_schedule_with_warmup(step)   -> LARS step
    method.after_optimizer_step(step, total)                   # EMA exactly once, after the step

The 0-d outputs are summed on the device and read back only at log steps.

Randomness is keyed, not streamed: the generator of a micro-batch is seeded from
``(seed, step, micro_step, rank)``, so a resumed run draws the same augmentations and damage as an
uninterrupted one without replaying anything. The data stream is positioned by
``{"epoch", "batches_done"}`` from the checkpoint.

``anaus_core`` must not import ``shards``: the trainer receives a ``PretrainDataSource`` (the CLI
builds one over ``shards.stream.build_pretrain_loader``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import platform
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol

import torch

from anaus_core.config import config_to_dict, save_config
from anaus_core.errors import UserInputError
from anaus_core.train.checkpoint import (
    CHECKPOINT_DIRNAME,
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    LAST_NAME,
    capture_rng_state,
    load_checkpoint,
    resolve_resume_path,
    restore_rng_state,
    save_checkpoint,
)
from anaus_core.train.config import PretrainConfig, validate_config
from anaus_core.train.distributed import (
    DistributedContext,
    all_reduce_mean,
    barrier,
    init_distributed,
    teardown_distributed,
)
from anaus_core.train.metrics import MetricsWriter, WindowTimer
from anaus_core.train.optimization import (  # noqa: F401  (re-exported: the trainer's public names)
    Schedule,
    build_optimizer,
    learning_rate,
    make_schedule,
    unwrap,
    weight_decay_at,
)
from anaus_core.train.plots import plot_loss_curve

ENCODER_FILENAME = "encoder.pt"
FPN_FILENAME = "fpn.pt"
LOSS_CURVE_FILENAME = "loss_curve.png"


class OnlineEvaluation(Protocol):
    """What the trainer needs from the online evaluation (``anaus_core.evaluate.online.
    OnlineEvaluator``, built by the CLI with the injected frame reader): ``evaluate(encoder)``
    scores an encoder view ((B, 3, H, W) -> (B, D)) and returns the values to log."""

    def evaluate(self, encoder: torch.nn.Module) -> Mapping[str, float]: ...


class PretrainDataSource(Protocol):
    """What the trainer needs from the data side.

    ``num_samples``: images in one epoch. ``loader(...)`` yields collated CPU batches (the
    pre-training batch, ``anaus_core.augment.collate``) of ``batch_size`` images for ``rank`` of ``world_size``,
    for ``epoch``, starting after ``skip_batches`` batches of that epoch. Every rank must see the
    same number of batches (drop the ragged tail).
    """

    num_samples: int

    def loader(self, *, epoch: int, skip_batches: int, batch_size: int, rank: int,
               world_size: int) -> Iterable[Mapping[str, torch.Tensor]]: ...


@dataclass
class PretrainResult:
    """What a finished (or stopped) run produced."""

    run_dir: Path
    steps_done: int
    total_steps: int
    records: list[dict[str, Any]] = field(default_factory=list)   # every metrics line this process logged
    eval_records: list[dict[str, Any]] = field(default_factory=list)  # online-evaluation lines (rank 0)
    last_checkpoint: Path | None = None
    encoder_path: Path | None = None
    fpn_path: Path | None = None
    loss_curve: Path | None = None
    batches_seen: int = 0                                           # micro-batches this rank consumed
    images_per_s: float = float("nan")                              # over the whole run, all ranks
    model: Any = field(default=None, repr=False)                    # the trained AnaUSModel (unwrapped)


def micro_step_seed(seed: int, step: int, micro_step: int, rank: int) -> int:
    """A 63-bit seed for one micro-batch, independent of how the run was split into sessions."""
    digest = hashlib.blake2b(f"anaus/{seed}/{step}/{micro_step}/{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def make_generator(device: torch.device, seed: int) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


# -------------------------------------------------------------------------------------------
# method / optimiser construction (the method itself: anaus_core.methods)
# -------------------------------------------------------------------------------------------

def build_model(config: PretrainConfig):
    """``build_method(config)`` with the run seed applied first, so every rank starts from
    identical weights."""
    from anaus_core.methods import build_method

    torch.manual_seed(config.run.seed)
    return build_method(config)


def use_compile(config: PretrainConfig, device: torch.device) -> bool:
    """``run.compile``: "on", "off", or "auto" = on CUDA only (on the CPU the compile time is
    not won back in a run of this size, and the step is not kernel-launch bound)."""
    return config.run.compile == "on" or (config.run.compile == "auto" and device.type == "cuda")


def _autocast(device: torch.device, amp: bool):
    """bf16 autocast when ``amp`` is on and the device is CUDA (never on CPU)."""
    if amp and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def forward_losses(model, prepared: Mapping[str, torch.Tensor], *, generator: torch.Generator,
                   device: torch.device, amp: bool, step: int = 0) -> dict[str, torch.Tensor]:
    """``model(prepared)`` under bf16 autocast when ``amp`` is on and the device is CUDA."""
    with _autocast(device, amp):
        losses = model(prepared, generator=generator, step=step)
    if "loss" not in losses:
        raise RuntimeError("the method's forward must return a dict with a 'loss' entry")
    return losses


# -------------------------------------------------------------------------------------------
# the run
# -------------------------------------------------------------------------------------------

def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


def _current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as handle:
            pages = int(handle.read().split()[1])
        import os

        return pages * os.sysconf("SC_PAGE_SIZE") / (1024.0 * 1024.0)
    except (OSError, ValueError, IndexError):
        return float("nan")


def _check_run_dir(run_dir: Path, resume_path: Path | None) -> None:
    last = run_dir / CHECKPOINT_DIRNAME / LAST_NAME
    if resume_path is None and last.exists():
        raise UserInputError(f"{run_dir}: already holds a run ({last}); pass --resume to continue it or choose a new --out")


def _saved_config(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's config with today's defaults for fields it predates (a checkpoint from
    before ``method`` existed is an AnaUS run)."""
    from anaus_core.config import _from_mapping

    saved = dict(checkpoint.get("config", {}))
    try:
        return config_to_dict(_from_mapping(PretrainConfig, saved, ""))
    except Exception:  # an unreadable config is reported by the comparison itself
        return saved


def _config_differences(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            diffs.extend(_config_differences(a, b, f"{prefix}{key}."))
        elif a != b:
            diffs.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return diffs


# Changing these mid-run would change the maths of the run being resumed, not just its length.
_RESUME_LOCKED = ("method", "data.batch_size", "data.num_workers", "data.shuffle_buffer", "views.", "augment.", "model.",
                  "run.seed", "optim.accumulation_steps")


def pretrain(config: PretrainConfig, out_dir: str | Path, *, data: PretrainDataSource,
             resume: str | Path | bool | None = None, console=None,
             stop_after_steps: int | None = None, evaluator: OnlineEvaluation | None = None) -> PretrainResult:
    """Run (or resume) a pre-training run into ``out_dir``; returns what it wrote.

    Works in one process or under ``torchrun`` (the process group is created from the
    environment and torn down at the end). ``stop_after_steps`` ends this session early —
    checkpointing first — without changing the schedule (the resume test uses it to split one
    run into two sessions). ``evaluator``: the online evaluation, run on the main rank every
    ``eval.every`` steps and at the end of the session (None: no online evaluation).
    """
    context = init_distributed(config.run.device)
    try:
        return _pretrain(config, Path(out_dir), data=data, resume=resume, context=context,
                         console=console, stop_after_steps=stop_after_steps, evaluator=evaluator)
    finally:
        teardown_distributed(context)


def _pretrain(config: PretrainConfig, run_dir: Path, *, data: PretrainDataSource, resume, context: DistributedContext,
              console, stop_after_steps: int | None, evaluator: OnlineEvaluation | None = None) -> PretrainResult:
    validate_config(config, world_size=context.world_size)
    device = context.device
    on_cuda = device.type == "cuda"
    resume_path = resolve_resume_path(resume, run_dir) if context.is_main else None
    resume_path = _broadcast_path(resume_path, context)
    if context.is_main:
        _check_run_dir(run_dir, resume_path)
        run_dir.mkdir(parents=True, exist_ok=True)
    barrier(context)

    if config.run.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if on_cuda:
        torch.backends.cudnn.benchmark = not config.run.deterministic
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    schedule = make_schedule(config, int(data.num_samples), context.world_size)
    accumulation = config.optim.accumulation_steps

    model = build_model(config)
    # a run-level switch kept in the model section; converting a model without BatchNorm is a no-op
    if config.model.sync_batchnorm and context.distributed:
        if not on_cuda:
            raise UserInputError("model.sync_batchnorm: SyncBatchNorm needs CUDA devices (NCCL); turn it off for CPU runs")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    use_channels_last = config.run.channels_last and on_cuda
    if use_channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, config, schedule.peak_lr)
    if evaluator is not None:
        try:
            model.eval_encoder()
        except NotImplementedError as exc:
            raise UserInputError(f"--eval-data: {exc}; online evaluation is not available for this method") from None
    if use_compile(config, device):
        model.compile_for_training()

    step, epoch, batches_done = 0, 0, 0
    if resume_path is not None:
        checkpoint = load_checkpoint(resume_path, map_location=device)
        locked = [d for d in _config_differences(_saved_config(checkpoint), config_to_dict(config))
                  if d.startswith(_RESUME_LOCKED)]
        if locked:
            raise UserInputError(f"{resume_path}: cannot resume with a different " + "; ".join(locked))
        saved_world = int(checkpoint.get("world_size", context.world_size))
        if saved_world != context.world_size:
            raise UserInputError(
                f"{resume_path}: saved by a {saved_world}-process run, resumed with {context.world_size}; the data "
                "stream's epoch plan depends on the number of processes, so resume with the same world size")
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        step = int(checkpoint["step"])
        epoch = int(checkpoint["data_state"]["epoch"])
        batches_done = int(checkpoint["data_state"]["batches_done"])
        restore_rng_state(checkpoint["rng"])
        del checkpoint

    if context.distributed:
        ddp_kwargs = {"device_ids": [device.index]} if on_cuda else {}
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, find_unused_parameters=bool(model.has_unused_parameters()), **ddp_kwargs)
    else:
        train_model = model
    train_model.train()

    if context.is_main:
        save_config(config, run_dir / "config.yaml")
    metrics = MetricsWriter(run_dir, enabled=context.is_main, tensorboard=config.run.tensorboard,
                            resume_step=step if resume_path is not None else None)
    result = PretrainResult(run_dir=run_dir, steps_done=step, total_steps=schedule.total_steps)
    end_step = schedule.total_steps if stop_after_steps is None else min(schedule.total_steps, int(stop_after_steps))
    progress = _Progress(enabled=context.is_main and config.run.progress, total=schedule.total_steps,
                         start=step, console=console)

    global_images_per_step = config.data.batch_size
    window = WindowTimer()
    run_start, run_start_step = time.perf_counter(), step
    batches: Iterator | None = None
    last_checkpoint: Path | None = None
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)

    try:
        with progress:
            while step < end_step:
                if batches_done >= schedule.steps_per_epoch * accumulation:
                    epoch, batches_done, batches = epoch + 1, 0, None
                if batches is None:
                    batches = iter(data.loader(epoch=epoch, skip_batches=batches_done, batch_size=schedule.micro_batch,
                                               rank=context.rank, world_size=context.world_size))
                optimizer.zero_grad(set_to_none=True)
                # every micro-batch of the step is read and prepared first, so that the method can
                # see the whole step (begin_step: e.g. target projections of the global batch)
                prepared_batches, generators = [], []
                for micro in range(accumulation):
                    wait_start = time.perf_counter()
                    try:
                        batch = next(batches)
                    except StopIteration:
                        raise RuntimeError(
                            f"data stream ended after {batches_done} batches of epoch {epoch}; expected "
                            f"{schedule.batches_per_epoch} (the loader must drop ragged tails equally on every rank)") from None
                    window.add_wait(time.perf_counter() - wait_start)
                    batches_done += 1
                    result.batches_seen += 1
                    generator = make_generator(device, micro_step_seed(config.run.seed, step, micro, context.rank))
                    prepared_batches.append(model.prepare_batch(batch, device=device, generator=generator))
                    generators.append(generator)
                    del batch
                with _autocast(device, config.run.amp):
                    model.begin_step(prepared_batches, generators=generators, step=step)
                step_values: dict[str, torch.Tensor] = {}
                for micro in range(accumulation):
                    prepared, generator = prepared_batches[micro], generators[micro]
                    prepared_batches[micro] = None  # free each micro-batch once used
                    sync = (micro == accumulation - 1) or not context.distributed
                    with (contextlib.nullcontext() if sync else train_model.no_sync()):
                        outputs = forward_losses(train_model, prepared, generator=generator, device=device,
                                                 amp=config.run.amp, step=step)
                        (outputs["loss"] / accumulation).backward()
                    # accumulated on the device: read back only at log steps (no sync in the step)
                    for key, value in outputs.items():
                        if isinstance(value, torch.Tensor) and value.dim() == 0:
                            step_values[key] = step_values.get(key, 0.0) + value.detach().float() / accumulation
                    del prepared

                lr = learning_rate(step, schedule, config)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                    # (a checkpoint from before the schedule existed has no base_weight_decay)
                    base_decay = group.setdefault("base_weight_decay", group["weight_decay"])
                    if config.optim.final_weight_decay is not None and base_decay > 0:
                        group["weight_decay"] = weight_decay_at(step, schedule, base_decay, config.optim.final_weight_decay)
                if config.optim.grad_clip_norm is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip_norm)
                model.before_optimizer_step(step=step)
                optimizer.step()
                method_logs = model.after_optimizer_step(step=step, total_steps=schedule.total_steps)
                if config.optim.final_weight_decay is not None:
                    method_logs = {**method_logs, "weight_decay": max(g["weight_decay"] for g in optimizer.param_groups)}
                step += 1
                window.add_step(global_images_per_step)
                progress.advance(step, window)

                if step % config.run.log_every == 0 or step == end_step:
                    # collapse/health monitors of the step's last micro-batch (log steps only)
                    for key, value in model.health(outputs).items():
                        step_values[key] = value.detach().float().reshape(())
                    record = _log_record(step, epoch, step_values, lr, method_logs, window, context, device)
                    if not all(math.isfinite(v) for k, v in record.items() if k.startswith("loss")):
                        metrics.log(record)
                        raise RuntimeError(f"non-finite loss at step {step}: "
                                           + json.dumps({k: v for k, v in record.items() if k.startswith("loss")}))
                    metrics.log(record)
                    result.records.append(record)
                    progress.show_loss(record.get("loss"))
                    window.reset()

                at_end = step == end_step
                if evaluator is not None and context.is_main and (
                        at_end or (config.eval.every and step % config.eval.every == 0)):
                    eval_record = {"step": step, "epoch": epoch,
                                   **{k: float(v) for k, v in evaluator.evaluate(model.eval_encoder()).items()}}
                    metrics.log(eval_record)
                    result.eval_records.append(eval_record)
                if at_end or (config.run.checkpoint_every and step % config.run.checkpoint_every == 0):
                    last_checkpoint = _save(model, optimizer, config, schedule, step, epoch, batches_done,
                                            run_dir, context, keep_step_file=config.run.keep_step_checkpoints)
    finally:
        metrics.close()
        batches = None

    result.steps_done = step
    result.last_checkpoint = last_checkpoint
    result.model = model
    elapsed = time.perf_counter() - run_start
    if step > run_start_step and elapsed > 0:
        result.images_per_s = (step - run_start_step) * global_images_per_step / elapsed
    if context.is_main:
        curve = run_dir / LOSS_CURVE_FILENAME
        result.loss_curve = plot_loss_curve(run_dir / "metrics.jsonl", curve)
        if step >= schedule.total_steps:
            result.encoder_path, result.fpn_path = export_encoder(model, run_dir)
        _write_summary(run_dir, result, schedule, context, config)
    barrier(context)
    return result


def _broadcast_path(path: Path | None, context: DistributedContext) -> Path | None:
    from anaus_core.train.distributed import broadcast_object

    value = broadcast_object(str(path) if path is not None else None, context)
    return Path(value) if value is not None else None


def _log_record(step: int, epoch: int, step_losses: Mapping[str, torch.Tensor], lr: float,
                method_logs: Mapping[str, float], window: WindowTimer, context: DistributedContext,
                device: torch.device) -> dict[str, Any]:
    """The metrics line of a log step: the step's 0-d outputs (rank means; the only place the
    host waits for the device), the method's own values, lr and timing."""
    names = sorted(step_losses)
    record: dict[str, Any] = {"step": step, "epoch": epoch}
    if names:
        stacked = torch.stack([step_losses[name].reshape(()) for name in names])
        reduced = all_reduce_mean(stacked, context).cpu().tolist()
        record.update({name: float(value) for name, value in zip(names, reduced)})
    timing = window.summary()
    if context.distributed:
        # rank-averaged wait fraction: the slowest loader is what a user needs to see, but the
        # mean is what is comparable between 1 and N ranks; log both.
        waits = torch.tensor([timing["data_wait_fraction"]], dtype=torch.float64)
        record["data_wait_fraction_max"] = float(_all_reduce_max(waits, context))
        timing["data_wait_fraction"] = float(all_reduce_mean(waits, context))
    record.update({"lr": lr, **{k: float(v) for k, v in method_logs.items()}, **timing, "peak_rss_mb": _peak_rss_mb(),
                   "rss_mb": _current_rss_mb()})
    if device.type == "cuda":
        record["cuda_peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return record


def _all_reduce_max(value: torch.Tensor, context: DistributedContext) -> float:
    import torch.distributed as dist

    reduced = value.clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.MAX)
    return float(reduced.item())


def checkpoint_payload(model, optimizer, config: PretrainConfig, schedule: Schedule, step: int, epoch: int,
                       batches_done: int, world_size: int = 1) -> dict[str, Any]:
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "method": getattr(unwrap(model), "name", "anaus"),
        "step": step,
        "epoch": epoch,
        "data_state": {"epoch": epoch, "batches_done": batches_done},
        "world_size": world_size,
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": {"total_steps": schedule.total_steps, "warmup_steps": schedule.warmup_steps,
                      "peak_lr": schedule.peak_lr, "final_lr": config.optim.final_lr,
                      "steps_per_epoch": schedule.steps_per_epoch},
        "rng": capture_rng_state(),
        "config": config_to_dict(config),
    }


def _save(model, optimizer, config, schedule, step, epoch, batches_done, run_dir, context, *, keep_step_file) -> Path | None:
    path = None
    if context.is_main:
        payload = checkpoint_payload(model, optimizer, config, schedule, step, epoch, batches_done, context.world_size)
        path = save_checkpoint(payload, run_dir / CHECKPOINT_DIRNAME, step=step, keep_step_file=keep_step_file,
                               keep_last=config.run.keep_last_checkpoints)
    barrier(context)
    return path


def export_encoder(model, out_dir: str | Path) -> tuple[Path, Path | None]:
    """``method.export(out_dir)``; returns (``encoder.pt``, ``fpn.pt`` or None)."""
    paths = unwrap(model).export(Path(out_dir))
    by_name = {path.name: path for path in paths}
    encoder = by_name.get(ENCODER_FILENAME, paths[0] if paths else None)
    return encoder, by_name.get(FPN_FILENAME)


def export_encoder_from_checkpoint(checkpoint_path: str | Path, out_dir: str | Path) -> tuple[Path, Path]:
    """Rebuild the model from a checkpoint's own config, load its weights, export the encoder."""
    from anaus_core.config import _from_mapping

    checkpoint = load_checkpoint(checkpoint_path)
    config = _from_mapping(PretrainConfig, checkpoint["config"], "")
    model = build_model(config)
    model.load_state_dict(checkpoint["model"])
    return export_encoder(model, out_dir)


def _write_summary(run_dir: Path, result: PretrainResult, schedule: Schedule, context: DistributedContext,
                   config: PretrainConfig) -> None:
    summary = {
        "steps_done": result.steps_done,
        "total_steps": schedule.total_steps,
        "steps_per_epoch": schedule.steps_per_epoch,
        "warmup_steps": schedule.warmup_steps,
        "peak_lr": schedule.peak_lr,
        "global_batch": config.data.batch_size,
        "micro_batch_per_rank": schedule.micro_batch,
        "world_size": context.world_size,
        "device": str(context.device),
        "images_per_s_this_session": result.images_per_s,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "encoder": str(result.encoder_path) if result.encoder_path else None,
        "last_checkpoint": str(result.last_checkpoint) if result.last_checkpoint else None,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))


class _Progress:
    """rich progress bar over optimiser steps with images/s, data-wait and ETA (main rank only)."""

    def __init__(self, *, enabled: bool, total: int, start: int, console=None) -> None:
        self.enabled = enabled
        self._progress = None
        self._task = None
        if not enabled:
            return
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        from anaus_core.progress import make_progress

        self._progress = make_progress(
            TextColumn("[bold]pretrain"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]:>8} img/s"), TextColumn("wait {task.fields[wait]}"),
            TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=console, transient=False)
        self._task = self._progress.add_task("pretrain", total=total, completed=start, rate="-", wait="-", loss="-")

    def __enter__(self):
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.stop()

    def advance(self, step: int, window: WindowTimer) -> None:
        if self._progress is None:
            return
        summary = window.summary()
        self._progress.update(self._task, completed=step, rate=f"{summary['images_per_s']:.1f}",
                              wait=f"{100 * summary['data_wait_fraction']:.0f}%")

    def show_loss(self, loss: float | None) -> None:
        if self._progress is not None and loss is not None:
            self._progress.update(self._task, loss=f"{loss:.4f}")
