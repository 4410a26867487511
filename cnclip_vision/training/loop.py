"""The one training loop, shared by the CLIP trainer (:mod:`cnclip_vision.training.clip`) and the detector
trainer (:mod:`cnclip_vision.detection.train`).

The loop owns everything the two have in common: distributed setup (``torchrun`` environment, gloo on CPU,
nccl on GPU, DDP), AdamW with the weight-decay split of :func:`param_groups`, linear warmup + cosine decay
(:func:`warmup_cosine`), gradient accumulation, autocast and the fp16 grad scaler, gradient clipping, a NaN
guard, ``metrics.jsonl`` and a progress bar, periodic evaluation, atomic checkpoints and exact resume. A
trainer adds only a :class:`TrainingTask`: its model, its dataset and collate function, and its step.

>>> result = run_training(config, lambda env: MyTask(config, env), resume=True)

Data order: every epoch is a permutation seeded by ``(seed, epoch)``; optimizer step ``k`` of the epoch takes
the ``k``-th block of ``batch_size`` indices, split into ``accum_steps`` micro-batches of every rank (micro-batch
``a`` of rank ``r`` is the ``a * world + r``-th slice). The data position of a run is therefore its step
count alone, and a resumed run reads exactly the batches the uninterrupted one would have read.

Checkpoints (``checkpoint.pt``, every ``save_every`` steps and at the end; written atomically, so an
interrupted write leaves the previous one) hold the task's entries (:meth:`TrainingTask.state_dict`), the
optimizer, scheduler and scaler states, the step, the CPU (and CUDA) RNG state of every rank and the
configuration as JSON.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cnclip_vision.device import check_device
from cnclip_vision.errors import CNClipError
from cnclip_vision.io import atomic_write

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_NAME",
    "METRICS_NAME",
    "NO_WEIGHT_DECAY",
    "Distributed",
    "LoopResult",
    "LoopSettings",
    "StepContext",
    "StepOutput",
    "TrainingError",
    "TrainingTask",
    "check_settings",
    "dataset_length",
    "init_distributed",
    "no_weight_decay_names",
    "param_groups",
    "read_recipe",
    "run_training",
    "warmup_cosine",
]

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"


class TrainingError(CNClipError):
    """Training stopped (non-finite loss, bad configuration, a checkpoint that does not fit)."""


# -------------------------------------------------------------------------------------- settings
class LoopSettings(Protocol):
    """The options the loop reads; :class:`~cnclip_vision.training.clip.TrainConfig` and
    :class:`~cnclip_vision.detection.train.DetectorTrainConfig` (dataclasses) have them all."""

    __dataclass_fields__: ClassVar[dict[str, Any]]  # a dataclass: the checkpoint stores dataclasses.asdict of it
    output_dir: str
    epochs: int
    max_steps: int | None
    batch_size: int  # global: summed over ranks and accumulation steps
    accum_steps: int
    lr: float
    weight_decay: float
    betas: tuple[float, float]
    eps: float
    warmup: float  # a fraction of the steps (< 1) or a number of steps
    min_lr_ratio: float
    max_grad_norm: float | None
    precision: str  # fp32 | bf16 | fp16
    seed: int
    num_workers: int
    save_every: int
    keep_checkpoints: bool
    log_every: int
    device: str | None
    progress: bool

    def validate(self, world_size: int) -> None: ...


def read_recipe(
    cls: type,
    path: str | os.PathLike[str],
    overrides: dict[str, Any],
    *,
    tuples: Sequence[str] = (),
    kind: str = "training",
) -> Any:
    """``cls(**recipe)`` from a JSON file, ``overrides`` (not None) winning; unknown keys name the file.
    ``tuples`` name the options that JSON gives as lists."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CNClipError(f"cannot read training config {path}: {e}") from e
    if not isinstance(data, dict):
        raise CNClipError(f"{path}: a {kind} recipe is a JSON object of options, got a {type(data).__name__}")
    data.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise CNClipError(f"{path}: unknown {kind} options {unknown}; known: {sorted(known)}")
    for key in tuples:
        if key in data:
            data[key] = tuple(data[key])
    return cls(**data)


def check_settings(settings: LoopSettings, world_size: int) -> None:
    """The checks of the loop's own options: batch split, precision, length (TrainingError)."""
    if settings.accum_steps < 1 or settings.batch_size % (world_size * settings.accum_steps):
        raise TrainingError(
            f"batch_size {settings.batch_size} must be divisible by world size x accum_steps "
            f"= {world_size} x {settings.accum_steps}"
        )
    if settings.precision not in ("fp32", "bf16", "fp16"):
        raise TrainingError(f"precision must be fp32, bf16 or fp16, got {settings.precision!r}")
    if settings.epochs < 1 and not settings.max_steps:
        raise TrainingError("give epochs >= 1 or max_steps")


# ----------------------------------------------------------------------------------- distributed
@dataclass(frozen=True)
class Distributed:
    """This process's place in the run: its rank, the number of processes and its device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the checkpoints, the metrics and the final model."""
        return self.rank == 0


def init_distributed(device: str | None = None) -> Distributed:
    """Rank and world size from the ``torchrun`` environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); the
    process group is initialised when there are several processes (nccl on GPU, gloo on CPU). ``device``
    default: the local GPU if there is one, else the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if device:
        chosen = check_device(device)
    elif torch.cuda.is_available():
        chosen = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    else:
        chosen = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if chosen.type == "cuda" else "gloo"
        if chosen.type == "cuda":
            torch.cuda.set_device(chosen)
        dist.init_process_group(backend)
        logger.info("rank %d of %d (%s)", rank, world, backend)
    return Distributed(rank, world, chosen)


# ---------------------------------------------------------------------------- optimizer, schedule
#: Parameter names (any dotted component) that are positional or class embeddings: no weight decay.
NO_WEIGHT_DECAY = frozenset(
    {
        "pos_embed",
        "cls_token",
        "reg_token",
        "dist_token",  # timm ViT (its no_weight_decay())
        "position_embeddings",  # BERT
        "positional_embedding",
        "class_embedding",  # OpenAI CLIP / open_clip
        "logit_scale",
    }
)


def no_weight_decay_names(
    module: nn.Module, named_parameters: Sequence[tuple[str, nn.Parameter]] | None = None
) -> set[str]:
    """Names of the parameters that get no weight decay: every parameter with fewer than 2 dimensions (biases,
    the gains and shifts of LayerNorm / GroupNorm / BatchNorm, scalars such as the logit scale or a temperature,
    1-D learned embeddings), every parameter one of whose dotted name components is in :data:`NO_WEIGHT_DECAY`
    (positional and class embeddings), and the names a submodule declares with timm's ``no_weight_decay()``.

    Weight matrices and kernels are decayed: linear and conv weights (the patch embedding included) and
    lookup tables such as BERT's word and token-type embeddings. Names are matched by component, never by
    substring, so ``patch_embed`` or ``word_embeddings`` are not taken for ``pos_embed`` / ``position_embeddings``.
    (open_clip's rule, ``p.ndim < 2 or "bn"/"ln"/"bias"/"logit_scale" in name``, is the same for biases, norms
    and gains but decays positional embeddings; here they are exempt, as in timm and the original CLIP.)"""
    if named_parameters is None:
        named_parameters = list(module.named_parameters())
    declared: set[str] = set()
    for prefix, child in module.named_modules(remove_duplicate=False):
        hook = getattr(child, "no_weight_decay", None)
        if callable(hook):
            declared.update(f"{prefix}.{n}" if prefix else n for n in hook())
    return {
        name
        for name, p in named_parameters
        if p.ndim < 2 or name in declared or not NO_WEIGHT_DECAY.isdisjoint(name.split("."))
    }


def param_groups(
    module: nn.Module, weight_decay: float, named_parameters: Sequence[tuple[str, nn.Parameter]] | None = None
) -> list[dict[str, Any]]:
    """Two AdamW parameter groups, ``[decayed (weight_decay), exempt (0.0)]``, of ``named_parameters`` (default:
    the trainable parameters of ``module``) split by :func:`no_weight_decay_names`. A parameter listed twice
    (a shared tensor) is taken once. Both groups are always there, so optimizer states keep their layout."""
    if named_parameters is None:
        named_parameters = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    exempt = no_weight_decay_names(module, named_parameters)
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for name, p in named_parameters:
        if id(p) not in seen:
            seen.add(id(p))
            (no_decay if name in exempt else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup: float, min_lr_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the optimizer's learning rate, then cosine decay to ``min_lr_ratio`` of it at
    ``total_steps``; ``warmup`` is a fraction of the steps (< 1) or a number of steps."""
    warmup_steps = int(warmup * total_steps) if warmup < 1 else int(warmup)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ------------------------------------------------------------------------------------ the task
@dataclass
class StepOutput:
    """What a task's step reports: the loss (NaN guard, log), the samples all ranks processed in the step
    (throughput) and other values for the log record (loss terms, ...)."""

    loss: float
    samples: int
    values: dict[str, float] = field(default_factory=dict)


@dataclass
class StepContext:
    """What a task's :meth:`~TrainingTask.train_step` gets from the loop besides its micro-batches."""

    model: nn.Module  # call this one: the DDP wrapper under torchrun, else the task's model
    env: Distributed
    step: int  # the number of this optimizer step, from 1
    indices: torch.Tensor  # dataset indices of the step's global batch, micro-batch by micro-batch, rank by rank
    accum_steps: int
    autocast_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Autocast to the run's precision (a no-op in fp32)."""
        enabled = self.autocast_dtype is not None
        return torch.autocast(self.env.device.type, dtype=self.autocast_dtype, enabled=enabled)

    def micro_batch(self, index: int) -> contextlib.AbstractContextManager[Any]:
        """Wrap forward + backward of micro-batch ``index``: DDP synchronises gradients on the last one only."""
        if index < self.accum_steps - 1 and isinstance(self.model, nn.parallel.DistributedDataParallel):
            return self.model.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, scaled by the fp16 grad scaler when there is one."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()


class TrainingTask(ABC):
    """What a trainer adds to the loop: the model, the data and the step.

    Subclasses set :attr:`model`, :attr:`dataset` and :attr:`collate_fn` in ``__init__`` (called by
    :func:`run_training` with the :class:`Distributed` of the process, after the seed is set) and implement the
    abstract methods.
    """

    model: nn.Module  # its trainable parameters are optimised; DDP wraps it under torchrun
    dataset: Dataset  # map-style; an epoch is len(dataset) // batch_size steps
    collate_fn: Callable[[list[Any]], Any]  # one micro-batch from a list of items (goes to DataLoader workers)
    label: str = "train"  # progress-bar label
    eval_every: int | None = None  # steps between evaluations; None: at the end of each epoch
    random_items: bool = False  # items draw random numbers (augmentation): seed them by (seed, epoch, index)

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The named parameters the optimizer updates (default: those of :attr:`model` that require grad)."""
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    @abstractmethod
    def train_step(self, micro_batches: list[Any], ctx: StepContext) -> StepOutput | None:
        """Forward and backward over the step's ``accum_steps`` micro-batches (gradients summed, wrapped in
        ``ctx.micro_batch(i)``); the loop then clips, steps the optimizer and the schedule. None: nothing could
        be trained on (the step is skipped but counted)."""

    def after_optimizer_step(self, output: StepOutput) -> None:  # noqa: B027 -- an optional hook, not abstract
        """Called after each optimizer step (e.g. to clamp a parameter); may add values to ``output.values``."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """The task's entries of a checkpoint (its weights; tensors and plain values only)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any], path: Path) -> None:
        """Restore :meth:`state_dict`'s entries from the checkpoint ``state`` read from ``path``."""

    def evaluate(self, step: int) -> dict[str, Any] | None:
        """A metrics record (appended to ``metrics.jsonl``) after step ``step``, on rank 0; None: no evaluation."""
        return None

    @abstractmethod
    def save(self, output_dir: Path) -> None:
        """Write the final model into ``output_dir`` (rank 0, after the last step, model in eval mode)."""


# ---------------------------------------------------------------------------------------- data
class _StepSampler(torch.utils.data.Sampler[list[int]]):
    """This rank's micro-batches for every optimizer step of one epoch from step ``start_step`` on: the step's
    block of a seeded permutation, ``accum_steps`` micro-batches of every rank (see the module docstring)."""

    def __init__(self, n: int, settings: LoopSettings, env: Distributed, epoch: int, start_step: int) -> None:
        self.batch_size, self.accum_steps = settings.batch_size, settings.accum_steps
        self.env, self.start_step = env, start_step
        self.micro = settings.batch_size // (env.world_size * settings.accum_steps)
        self.steps = n // settings.batch_size
        generator = torch.Generator().manual_seed(settings.seed * 100_003 + epoch)
        self.order = torch.randperm(n, generator=generator)

    def global_batch(self, step_in_epoch: int) -> torch.Tensor:
        """Indices of a step's whole batch, in the order the gathered micro-batches take."""
        return self.order[step_in_epoch * self.batch_size : (step_in_epoch + 1) * self.batch_size]

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.steps):
            batch = self.global_batch(step).tolist()
            for a in range(self.accum_steps):  # micro-batch a of every rank, then the next one
                start = (a * self.env.world_size + self.env.rank) * self.micro
                yield batch[start : start + self.micro]

    def __len__(self) -> int:
        return (self.steps - self.start_step) * self.accum_steps


def dataset_length(dataset: Dataset) -> int:
    """``len(dataset)``: torch's Dataset declares no ``__len__``, the loop's map-style datasets must have one."""
    if not isinstance(dataset, Sized):
        raise TypeError(f"the training dataset ({type(dataset).__name__}) has no len(): it must be map-style")
    return len(dataset)


class _SeededItems(Dataset):
    """Items whose random draws are a function of (seed, epoch, index) only: the same items whatever the number
    of workers, and again after a resume."""

    def __init__(self, dataset: Dataset, seed: int, epoch: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, epoch

    def __len__(self) -> int:
        return dataset_length(self.dataset)

    def __getitem__(self, index: int) -> Any:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch * 100_003 + index) % (2**63))
            return self.dataset[index]


# ------------------------------------------------------------------------------------ the loop
@dataclass
class LoopResult:
    """How a run ended: its steps, checkpoint, last evaluation record (or None) and the task."""

    steps: int
    checkpoint: Path
    last_eval: dict[str, Any] | None
    task: TrainingTask


def run_training(
    settings: LoopSettings, make_task: Callable[[Distributed], TrainingTask], *, resume: bool = False
) -> LoopResult:
    """Run (or, with ``resume``, continue from ``output_dir/checkpoint.pt``) a training run of the task that
    ``make_task`` builds. Raises TrainingError for bad settings and, naming the last good checkpoint, for a
    non-finite loss (the weights are not updated with it)."""
    env = init_distributed(settings.device)
    settings.validate(env.world_size)
    if settings.precision == "fp16" and env.device.type != "cuda":
        raise TrainingError("fp16 training needs a GPU; use precision bf16 on the CPU")
    out = Path(settings.output_dir)
    checkpoint_path = out / CHECKPOINT_NAME
    torch.manual_seed(settings.seed)
    task = make_task(env)  # reads the data and loads the model: bad input fails before output_dir is made
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
    n = dataset_length(task.dataset)
    steps_per_epoch = n // settings.batch_size
    if steps_per_epoch == 0:
        raise TrainingError(f"the training data has {n} samples, fewer than one batch of {settings.batch_size}")
    total = settings.max_steps or settings.epochs * steps_per_epoch
    named = task.trainable_parameters()
    optimizer = torch.optim.AdamW(
        param_groups(task.model, settings.weight_decay, named), lr=settings.lr, betas=settings.betas, eps=settings.eps
    )
    params = [p for group in optimizer.param_groups for p in group["params"]]
    scheduler = warmup_cosine(optimizer, total, settings.warmup, settings.min_lr_ratio)
    scaler = torch.amp.GradScaler("cuda") if settings.precision == "fp16" else None
    step = 0
    if resume and checkpoint_path.is_file():
        step = _restore(checkpoint_path, task, optimizer, scheduler, scaler, env, steps_per_epoch)
        if env.is_main:
            _truncate_metrics(out / METRICS_NAME, step)
    else:
        if resume:
            logger.info("no checkpoint in %s: starting from scratch", out)
        if env.is_main:  # records of an earlier run killed before its first checkpoint, or replaced
            _truncate_metrics(out / METRICS_NAME, 0)
    model = _data_parallel(task.model, named) if env.world_size > 1 else task.model
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(settings.precision)
    eval_every = task.eval_every or steps_per_epoch
    log = _Log(out / METRICS_NAME, env, settings, total, step, task.label)
    last_eval: dict[str, Any] | None = None
    ran = trained = 0  # steps of this run, and those that had something to train on
    while step < total:
        epoch, start = divmod(step, steps_per_epoch)
        sampler = _StepSampler(n, settings, env, epoch, start)
        data = _SeededItems(task.dataset, settings.seed, epoch) if task.random_items else task.dataset
        loader = DataLoader(
            data,
            batch_sampler=sampler,
            num_workers=settings.num_workers,
            collate_fn=task.collate_fn,
            pin_memory=env.device.type == "cuda",
            generator=torch.Generator().manual_seed(settings.seed + epoch),
        )
        batches = iter(loader)  # the generator keeps DataLoader seeding off the global RNG (exact resume)
        for step_in_epoch in range(start, steps_per_epoch):
            if step >= total:
                break
            micro_batches = [next(batches) for _ in range(settings.accum_steps)]
            ctx = StepContext(
                model, env, step + 1, sampler.global_batch(step_in_epoch), settings.accum_steps, autocast_dtype, scaler
            )
            optimizer.zero_grad(set_to_none=True)
            output = task.train_step(micro_batches, ctx)
            ran += 1
            if output is None:
                logger.warning("step %d: nothing to train on in the batch; the step is skipped", step + 1)
            else:
                trained += 1
                _check_finite(output, step + 1, checkpoint_path, env)
                _optimizer_step(optimizer, scaler, params, settings.max_grad_norm)
                task.after_optimizer_step(output)
            scheduler.step()
            step += 1
            log.step(step, epoch, output, float(scheduler.get_last_lr()[0]))
            if step % settings.save_every == 0 or step == total:
                _save(out, task, optimizer, scheduler, scaler, step, steps_per_epoch, settings, env)
            if env.is_main and (step % eval_every == 0 or step == total):
                with torch.random.fork_rng(devices=[env.device] if env.device.type == "cuda" else []):
                    record = task.evaluate(step)  # its random draws (if any) must not change the training's
                if record is not None:
                    last_eval = record
                    log.append(record)
    log.close()
    if ran and not trained:
        raise TrainingError(
            f"none of the {ran} steps had anything to train on (every image missing or unreadable? check the "
            "image folder); no model was written"
        )
    if env.world_size > 1:
        dist.barrier()
    task.model.eval()
    if env.is_main:
        task.save(out)
    return LoopResult(step, checkpoint_path, last_eval, task)


def _data_parallel(model: nn.Module, trainable: Sequence[tuple[str, nn.Parameter]]) -> nn.Module:
    """DDP over the trainable parameters only: a frozen part that keeps ``requires_grad`` (the detector's CLIP)
    gets no gradients, which DDP would otherwise wait for."""
    ids = {id(p) for _, p in trainable}
    frozen = [n for n, p in model.named_parameters() if id(p) not in ids]
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
    return nn.parallel.DistributedDataParallel(model)


def _check_finite(output: StepOutput, step: int, checkpoint_path: Path, env: Distributed) -> None:
    bad = not math.isfinite(output.loss)
    if env.world_size > 1:  # every rank stops, not only the one whose loss broke
        flag = torch.tensor(float(bad), device=env.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        bad = bool(flag.item())
    if bad:
        terms = f" ({output.values})" if output.values else ""
        last = checkpoint_path if checkpoint_path.exists() else "none (no checkpoint written yet)"
        raise TrainingError(
            f"the loss became {output.loss} at step {step}{terms}; stopping. The last good checkpoint is {last}; "
            "lower the learning rate or use fp32/bf16"
        )


def _optimizer_step(
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    params: list[nn.Parameter],
    max_grad_norm: float | None,
) -> None:
    if scaler is not None:
        scaler.unscale_(optimizer)
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


class _Log:
    """``metrics.jsonl`` records every ``log_every`` steps and the progress bar (rank 0)."""

    def __init__(self, path: Path, env: Distributed, settings: LoopSettings, total: int, step: int, label: str) -> None:
        from tqdm.auto import tqdm

        self.path, self.main, self.every, self.total = path, env.is_main, settings.log_every, total
        disable = True if not settings.progress or not env.is_main else None  # None: a bar on terminals only
        self.bar = tqdm(total=total, initial=step, desc=label, unit="step", disable=disable)
        self.since, self.samples = time.perf_counter(), 0

    def step(self, step: int, epoch: int, output: StepOutput | None, lr: float) -> None:
        self.bar.update(1)
        if output is None:
            return
        self.samples += output.samples
        if not self.main or (step % self.every and step != self.total):
            return
        now = time.perf_counter()
        record = {
            "step": step,
            "epoch": epoch,
            "loss": round(output.loss, 6),
            **{k: round(v, 6) for k, v in output.values.items()},
            "lr": lr,
            "images_per_s": round(self.samples / max(now - self.since, 1e-9), 2),
        }
        self.since, self.samples = now, 0
        self.bar.set_postfix(loss=f"{output.loss:.4f}", ips=record["images_per_s"])
        self.append(record)

    def append(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")

    def close(self) -> None:
        self.bar.close()


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop the records of steps after ``step`` (written by the interrupted run after its checkpoint), so that
    a resumed run's ``metrics.jsonl`` has every step once; a line cut by the interruption goes too."""
    if not path.is_file():
        return
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            dropped += line.strip() != ""
            continue
        if isinstance(record, dict) and record.get("step", 0) > step:
            dropped += 1
        else:
            kept.append(line + "\n")
    if dropped:
        with atomic_write(path) as tmp:
            tmp.write_text("".join(kept), encoding="utf-8")
        logger.info("%s: dropped %d records after step %d (the run resumes there)", path, dropped, step)


# --------------------------------------------------------------------------------- checkpoints
def _rng_states(env: Distributed) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """The CPU (and CUDA) RNG state of every rank (a collective under torchrun)."""
    mine = (torch.get_rng_state(), torch.cuda.get_rng_state(env.device) if env.device.type == "cuda" else None)
    states: list[tuple[torch.Tensor, torch.Tensor | None]] = [mine]
    if env.world_size > 1:
        gathered: list[Any] = [None] * env.world_size
        dist.all_gather_object(gathered, mine)
        states = gathered
    cpu = [s[0] for s in states]
    if env.device.type != "cuda":
        return cpu, None
    cuda = [s[1] for s in states if s[1] is not None]
    if len(cuda) != len(states):
        raise TrainingError("a rank sent no CUDA RNG state (every rank must train on a GPU)")
    return cpu, cuda


def _save(
    out: Path,
    task: TrainingTask,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    step: int,
    steps_per_epoch: int,
    settings: LoopSettings,
    env: Distributed,
) -> None:
    cpu_rng, cuda_rng = _rng_states(env)  # every rank takes part
    if not env.is_main:
        return
    state = {
        **task.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "step": step,
        "epoch": (step - 1) // steps_per_epoch,
        "steps_per_epoch": steps_per_epoch,
        "rng": cpu_rng[0],
        "rng_ranks": cpu_rng,
        **({"cuda_rng_ranks": cuda_rng} if cuda_rng is not None else {}),
        "train_config": json.dumps(dataclasses.asdict(settings), default=list),
    }
    paths = [out / CHECKPOINT_NAME] + ([out / f"step_{step}.pt"] if settings.keep_checkpoints else [])
    for path in paths:
        with atomic_write(path) as tmp:
            torch.save(state, tmp)


def _restore(
    path: Path,
    task: TrainingTask,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    env: Distributed,
    steps_per_epoch: int,
) -> int:
    """Task, optimizer, scheduler, scaler and RNG state from a checkpoint; returns its step."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # written atomically, so this is not a half-written file
        raise TrainingError(f"cannot read the training checkpoint {path}: {e}") from e
    task.load_state_dict(state, path)
    try:
        optimizer.load_state_dict(state["optimizer"])
    except ValueError as e:
        raise TrainingError(
            f"cannot resume from {path}: its optimizer state does not fit this run's parameter groups ({e}); was "
            "the model or its trainable part changed, or was the checkpoint written before the weight-decay rule "
            "of cnclip_vision.training.loop.param_groups?"
        ) from e
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    ranks = state.get("rng_ranks")
    exact = ranks is not None and len(ranks) == env.world_size
    torch.set_rng_state(ranks[env.rank] if exact else state["rng"])
    cuda = state.get("cuda_rng_ranks")
    if env.device.type == "cuda" and cuda is not None and len(cuda) == env.world_size:
        torch.cuda.set_rng_state(cuda[env.rank], env.device)
    if env.world_size > 1 and not exact:
        logger.warning(
            "%s holds no RNG state for rank %d of %d: random draws will differ from an uninterrupted run",
            path,
            env.rank,
            env.world_size,
        )
    saved = state.get("steps_per_epoch", steps_per_epoch)
    if saved != steps_per_epoch:
        logger.warning(
            "%s was written with %d steps per epoch, this run has %d: the data order after the resume "
            "is not the interrupted run's",
            path,
            saved,
            steps_per_epoch,
        )
    step = int(state["step"])
    logger.info("resumed from %s at step %d", path, step)
    return step
