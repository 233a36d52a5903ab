"""The LoRA / QLoRA trainer: ``train(config, report) -> TrainResult``.

Each attempt runs :class:`FinetuneRecipe`: setup → train loop → evaluate → save checkpoint →
save adapter → cleanup. What makes it faster than a stock ``transformers.Trainer`` run on real
(variable-length) chat data:

* padding-free packing (see :mod:`jobs.training.data`): no padding tokens are computed; on CUDA
  each packed example is attended by PyTorch's flash varlen kernel (:mod:`jobs.training.attention`);
* the output head runs only on positions that carry loss (assistant tokens), not on every token:
  for small models the vocabulary projection is a large share of the work;
* with bf16 base weights, the adapters compute in bf16 under autocast without peft's extra casts
  (their weights, gradients and optimizer state stay fp32), see :func:`_compute_adapters_in_bf16`;
* the output head and the loss run fused, a chunk of rows at a time, so the full-vocabulary
  logits never exist; on CUDA with liger-kernel, Liger's RMSNorm/SwiGLU/RoPE kernels
  (:mod:`jobs.training.kernels`);
* LoRA projections that read one input (q, k, v; gate, up) run as one autograd node with the
  scale-and-add inside the adapter's matmul, and recompute the RMSNorm output they read instead
  of keeping it (:mod:`jobs.training.projections`);
* activation checkpointing only where memory needs it: an automatic plan
  (:func:`jobs.training.memory.plan_activations`, the rule the pre-flight estimate uses)
  checkpoints the fewest leading layers that let each forward pass fit the worker's memory, and
  splits micro-batches into smaller passes only when even every layer checkpointed does not fit;
  an example too long even then parks checkpointed layers' inputs in host memory
  (:func:`jobs.training.offload.offloaded_checkpoint`) and then runs the MLP in chunks of the
  sequence (:mod:`jobs.training.chunked_mlp`);
* QLoRA and LoRA on a GPU keep the frozen input embedding in host memory
  (:mod:`jobs.training.offload`).

Loss is the mean over target tokens of the whole effective batch (micro-batches x accumulation),
so accumulation and packing do not change what is optimised.
"""

from __future__ import annotations

import gc
import math
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from jobs.training import checkpoint as ckpt
from jobs.training import chunked_mlp, distributed, graphs, sharding
from jobs.training.attention import (
    VARLEN,
    packed_attention_kwargs,
    register_varlen_attention,
    varlen_kernel_available,
)
from jobs.training.config import ALL_LINEAR, TrainingConfig, resolve_auto
from jobs.training.data import (
    IGNORE_INDEX,
    Batch,
    PreferencePair,
    collate,
    epoch_order,
    forward_passes,
    load_data,
    micro_batches,
    sequences_of,
)
from jobs.training.jsonl import read_examples
from jobs.training.kernels import apply_fused_kernels, fuse_swiglu_adapters, linear_cross_entropy
from jobs.training.memory import (
    GIB,
    HEADROOM,
    ActivationPlan,
    ModelShape,
    adapter_bytes,
    plan_activations,
    shards,
    split_choices,
    weight_bytes,
)
from jobs.training.offload import HostEmbedding, HostStash, embedding_to_host, offloaded_checkpoint
from jobs.training.preference import REFERENCE_ADAPTER, TRAINED_ADAPTER, DpoObjective
from jobs.training.projections import (
    forget_copies,
    fuse_lora_projections,
    recompute_norm_outputs,
)
from jobs.training.sharding import init_lora

KEEP_CHECKPOINTS = 3
AUTOCAST_DTYPE = "_tuneplex_autocast_dtype"  # set on the model by load_model; read by forward_loss
FUSED_KERNELS = "_tuneplex_fused_kernels"  # set by load_model: Liger's kernels are in the layers
CHECKPOINT_READY = "_tuneplex_checkpoint_ready"  # checkpointing set up once; layers then toggled
PLAIN_CHECKPOINT = "_tuneplex_plain_checkpoint"  # on a layer: transformers' own checkpoint function
HOST_STASH = "_tuneplex_host_stash"  # on the base model: the offloaded layers' HostStash
GRAPHED_OOM = "tuneplex_graphed"  # set on an out-of-memory error raised while graphs were held


class Reporter(Protocol):
    def event(self, message: str, *, level: str = "info", data: dict | None = None) -> None: ...

    def metrics(self, data: dict[str, Any]) -> None: ...

    def checkpoint(self, step: int, path: str, metrics: dict[str, Any]) -> None: ...

    def should_stop(self) -> bool: ...

    def should_pause(self) -> bool:
        """Checkpoint at the end of this step and stop (:class:`Paused`)."""
        ...


class Cancelled(Exception):
    pass


class Paused(Exception):
    """Training stopped for a pause after ``step`` steps, with a checkpoint of that step (or the
    one it resumed from, when it trained no step since)."""

    def __init__(self, step: int) -> None:
        super().__init__(f"paused after step {step}")
        self.step = step


class OutOfHostMemory(MemoryError):
    """An allocation in host memory failed (the CPU allocator's error, or Python's MemoryError).

    Not retried: the retry with half the micro-batch is for GPU memory, which the memory plan
    budgets and PyTorch reports exactly (torch.OutOfMemoryError); on the CPU no budget is planned,
    and an allocation fails only under a limit on the process (RLIMIT_AS, ulimit -v) or strict
    overcommit; a machine that runs short kills the process instead. The entry point reports it
    as ``out_of_memory`` with the allocation that failed."""


CPU_ALLOCATOR = "DefaultCPUAllocator"  # how PyTorch's CPU allocator starts its failure message


@dataclass
class TrainResult:
    status: str  # succeeded | cancelled
    adapter_dir: str | None
    sha256: str | None
    steps: int
    trained_tokens: int
    config: dict[str, Any]
    final_metrics: dict[str, Any] = field(default_factory=dict)
    stopped_early: bool = False


# --- entry point ---------------------------------------------------------------------------------


def train(config: TrainingConfig, report: Reporter) -> TrainResult:
    """Train (:class:`FinetuneRecipe`), retrying once with half the micro-batch if the GPU runs
    out of memory. An allocation that fails in host memory raises :class:`OutOfHostMemory`."""
    with Path(config.train_file).open("rb") as stream:
        n_examples = sum(1 for _ in read_examples(stream))
    config = resolve_auto(config, int(n_examples * (1 - config.validation_split)))
    world = distributed.current()
    graphed = False
    try:
        return _attempt(config, report)
    except torch.OutOfMemoryError as exc:
        graphed = getattr(exc, GRAPHED_OOM, False)
        # Across several processes a retry would need every rank to agree first; one GPU only.
        if not graphed and (config.batch_size <= 1 or world.distributed):
            raise
    # Retry outside the except block: inside it, the exception's traceback still holds the failed
    # attempt's model, optimizer and activations, and the retry would run out of memory too
    # (seen on an H100: both attempts failed until this moved here).
    resume = str(ckpt.latest_checkpoint(Path(config.output_dir) / "checkpoints") or "") or None
    if graphed:  # the graphs hold their activations for the job: eager passes free theirs
        retry = config.replace(cuda_graphs=False, resume_from=resume)
        message = (f"Out of GPU memory with CUDA graphs at micro-batch {config.batch_size}; "
                   "retrying once without them.")
    else:
        retry = config.replace(
            batch_size=config.batch_size // 2,
            gradient_accumulation_steps=config.gradient_accumulation_steps * 2, resume_from=resume)
        message = (f"Out of GPU memory at micro-batch {config.batch_size}; retrying once with "
                   f"micro-batch {retry.batch_size} and gradient accumulation "
                   f"{retry.gradient_accumulation_steps} (same effective batch).")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    report.event(message, level="warning",
                 data={"oom_retry": True, "batch_size": retry.batch_size,
                       "gradient_accumulation_steps": retry.gradient_accumulation_steps,
                       "cuda_graphs": not graphed})
    return _attempt(retry, report)


def _attempt(config: TrainingConfig, report: Reporter) -> TrainResult:
    """One run of the recipe, start to end; its process group is left whatever happens."""
    recipe = FinetuneRecipe(config, report)
    try:
        with _host_memory_errors():
            recipe.setup()
            recipe.train()
            return recipe.save()
    finally:
        recipe.cleanup()


@contextmanager
def _host_memory_errors():
    """An allocation that fails in host memory (PyTorch's CPU allocator raises a RuntimeError,
    Python a MemoryError) becomes :class:`OutOfHostMemory`."""
    try:
        yield
    except MemoryError as exc:
        raise OutOfHostMemory(str(exc) or "an allocation failed") from exc
    except RuntimeError as exc:
        text = str(exc)
        if CPU_ALLOCATOR not in text:
            raise
        raise OutOfHostMemory(text[text.index(CPU_ALLOCATOR):].splitlines()[0]) from exc


# --- the recipe ----------------------------------------------------------------------------------


class FinetuneRecipe:
    """One attempt at a LoRA / QLoRA job, in the shape of torchtune's recipes
    (``recipes/lora_finetune_single_device.py``): :meth:`setup` (device, data, model and
    optimizer, memory plan, schedule, resume), :meth:`train` (the loop), :meth:`evaluate`,
    :meth:`save_checkpoint`, :meth:`save` (the adapter and the result) and :meth:`cleanup`.

    The objective, supervised next-token loss or DPO, comes from the config
    (:func:`objective_for`); the recipe holds what the steps share. Everything it reports goes
    through ``report`` (:class:`Reporter`), from small methods outside the loop's body.
    """

    def __init__(self, config: TrainingConfig, report: Reporter) -> None:
        self.config = config
        self.report = report
        self.world = distributed.current()  # one process, or this rank of a torchrun job
        self.objective = objective_for(config)
        self.state = ckpt.TrainerState()
        self.stopped_early = False
        # Set by setup() (or around()):
        self.device = torch.device("cpu")
        self.pad_id = 0
        self.examples: list = []  # training examples (or DPO pairs)
        self.validation: list = []
        self.sharded = False  # the model split across the ranks (FSDP2, jobs.training.sharding)
        self.model: Any = None
        self.trainable: list[torch.nn.Parameter] = []
        self.optimizer: Any = None
        self.scheduler: Any = None
        self.available: int | None = None  # the GPU memory budget (None on the CPU)
        self.plan: ActivationPlan | None = None
        self.forward_cap: int | None = None  # tokens a forward pass may hold (split micro-batches)
        self.graphed: graphs.GraphedPasses | None = None  # passes replayed from CUDA graphs
        self.steps_per_epoch = 0
        self.total_steps = 0
        self.checkpointed_step: int | None = None  # the step of the newest checkpoint on disk

    @classmethod
    def around(cls, model, optimizer, scheduler, examples, *, config: TrainingConfig,
               report: Reporter, pad_id: int, device: torch.device,
               forward_cap: int | None = None) -> FinetuneRecipe:
        """A recipe around a model and optimizer made elsewhere (a test's, a benchmark's), ready
        for :meth:`optimizer_step` without :meth:`setup`."""
        recipe = cls(config, report)
        recipe.model, recipe.optimizer, recipe.scheduler = model, optimizer, scheduler
        recipe.trainable = [p for p in model.parameters() if p.requires_grad]
        recipe.examples, recipe.pad_id, recipe.device = examples, pad_id, device
        recipe.forward_cap = forward_cap
        return recipe

    # --- setup -------------------------------------------------------------------------------

    def setup(self) -> None:
        """Everything before the first step, in order; each part reports what it decided."""
        self._setup_device()
        self._setup_data()
        self._setup_model()
        self._setup_memory_plan()
        self._setup_schedule()
        self._report_start()

    def _setup_device(self) -> None:
        self.device = _device(self.config, self.world)
        distributed.init(self.world, self.device)
        if self.config.method == "qlora" and self.device.type != "cuda":
            raise RuntimeError("QLoRA needs a CUDA GPU; this job was accepted for one")
        torch.manual_seed(self.config.seed)

    def _setup_data(self) -> None:
        from jobs.training.tokenize import load_tokenizer

        config = self.config
        tokenizer = load_tokenizer(Path(config.base_model_dir))
        self.pad_id = (tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                       else tokenizer.eos_token_id)
        data = load_data(train_file=config.train_file, validation_file=config.validation_file,
                         validation_split=config.validation_split, tokenizer=tokenizer,
                         max_seq_len=config.max_seq_len,
                         assistant_only_loss=config.assistant_only_loss, seed=config.seed)
        if not data.train:
            raise ValueError("no training examples with target tokens")
        dpo = config.objective == "dpo"
        if self._pairs(data.train) != dpo:
            wanted = "preference pairs" if dpo else "examples, not preference pairs"
            raise ValueError(f"a {config.objective} job needs {wanted}")
        self.examples, self.validation = data.train, data.validation
        if data.truncated or data.dropped_without_targets:
            self.report.event(
                f"{data.truncated} example(s) truncated to {config.max_seq_len} tokens; "
                f"{data.dropped_without_targets} dropped with nothing left to learn.",
                level="warning", data={"truncated": data.truncated,
                                       "dropped": data.dropped_without_targets})

    @staticmethod
    def _pairs(examples) -> bool:
        return isinstance(examples[0], PreferencePair)

    def _setup_model(self) -> None:
        """The model with its adapters (sharded across the ranks where the rule says so) and
        the optimizer of its trainable parameters."""
        device = self.device
        bf16 = self.config.method == "qlora" or _use_bf16(self.config, device)  # QLoRA: bf16
        self.config = config = self.config.replace(
            packing=_use_packing(self.config, device, bf16), bf16=bf16)
        self.available = _memory_budget(config, device)
        self.sharded = _shard(config, self.world, self.available, bf16, device)
        self.model = model = load_model(
            config, device, attention=_attention(config.packing, device, bf16),
            sharded=self.sharded, world=self.world)
        model.train()
        self.trainable = [p for p in model.parameters() if p.requires_grad]  # same on every rank
        self.optimizer = torch.optim.AdamW(self.trainable, lr=config.learning_rate,
                                           weight_decay=config.weight_decay,
                                           fused=device.type == "cuda" and not self.sharded)
        # new weights: new copies of them (jobs.training.projections)
        self.optimizer.register_step_post_hook(lambda *_: forget_copies(model))

    def _setup_memory_plan(self) -> None:
        """What each pass recomputes (the memory plan), and the CUDA graphs where they are
        wanted and fit, captured before the first step."""
        config, model, examples = self.config, self.model, self.examples
        graphed = _graphs_wanted(model, config, examples, self.world, self.device, self.report)
        plan = _activation_plan(model, config, examples, self.trainable, self.device,
                                self.available, graphed=graphed)
        if graphed and (plan.split or plan.estimate.total > (self.available or 0) * HEADROOM):
            # graphs keep a pass's activations for the job: where even the most recomputation
            # does not fit whole passes beside them, the eager passes' plan (they free theirs)
            graphed = False
            plan = _activation_plan(model, config, examples, self.trainable, self.device,
                                    self.available)
            if config.cuda_graphs:
                self.report.event("cuda_graphs is on, but whole passes do not fit the memory "
                                  "budget beside the graphs' pool: the passes run without them.",
                                  level="warning", data={"cuda_graphs": 0})
        _report_plan(plan, self.available, self.report)
        self.plan = plan
        self.forward_cap = plan.forward_tokens if plan.split else None
        if graphed:
            with _marking_oom(True):
                self.graphed = _graphed_passes(model, config, examples, self.trainable,
                                               self.device, plan, self.pad_id, self.report)

    def _setup_schedule(self) -> None:
        """Steps, the learning-rate schedule, and the checkpoint to resume from."""
        config = self.config
        micro_per_epoch = math.ceil(len(self.examples) / config.batch_size)
        self.steps_per_epoch = math.ceil(micro_per_epoch / config.gradient_accumulation_steps)
        self.total_steps = config.epochs * self.steps_per_epoch
        if config.max_steps:
            self.total_steps = min(self.total_steps, config.max_steps)
        self.scheduler = _scheduler(config, self.optimizer, self.total_steps)
        if config.resume_from:
            self.state = ckpt.load_checkpoint(Path(config.resume_from), model=self.model,
                                              optimizer=self.optimizer, scheduler=self.scheduler)
            self.report.event(f"Resumed from checkpoint at step {self.state.step}.",
                              data={"resumed_from_step": self.state.step})

    def _report_start(self) -> None:
        config, world = self.config, self.world
        n_trainable = sum(p.numel() for p in self.trainable)
        self.report.event(
            f"Training {config.method} r={config.lora_rank} ({config.objective}) on "
            f"{len(self.examples)} {'pairs' if self._pairs(self.examples) else 'examples'} "
            f"({len(self.validation)} for evaluation): {config.epochs} epoch(s), "
            f"{self.total_steps} steps, micro-batch {config.batch_size} x accumulation "
            f"{config.gradient_accumulation_steps}, lr {config.learning_rate:g}, "
            f"{n_trainable:,} trainable parameters on {self.device.type}"
            + (f" x {world.size} processes "
               f"({'sharded, FSDP2' if self.sharded else 'data-parallel'})."
               if world.distributed else "."),
            data={"total_steps": self.total_steps, "trainable_parameters": n_trainable,
                  "hyperparameters": {"epochs": config.epochs, "batch_size": config.batch_size,
                                      "learning_rate": config.learning_rate}})

    # --- train -------------------------------------------------------------------------------

    def train(self) -> None:
        """Optimizer steps until the last one, an early stop, a cancel request (Cancelled) or a
        pause request (Paused, with a checkpoint); after each step its metrics, an evaluation
        and a checkpoint when they are due."""
        state = self.state
        started = time.monotonic() - state.elapsed_seconds
        self.checkpointed_step = state.step if self.config.resume_from else None
        self._stop_if_requested()  # a pause asked while setting up stops before any step
        while state.step < self.total_steps and not self.stopped_early:
            for group in self._steps_left_in_epoch():
                step_started = time.monotonic()
                with _marking_oom(self.graphed is not None):
                    step = self.optimizer_step(group)
                self._count_step(step, elapsed=time.monotonic() - started)
                metrics = self._metrics(step, seconds=time.monotonic() - step_started)
                if self._evaluation_due():
                    metrics.update(self.evaluate())
                    self.stopped_early = self._no_longer_improving(metrics["eval_loss"])
                state.last_metrics = metrics
                self.report.metrics(metrics)
                if self._checkpoint_due():
                    self.save_checkpoint()
                # After the last step the adapter follows at once: nothing is left to pause.
                self._stop_if_requested(
                    pausable=state.step < self.total_steps and not self.stopped_early)
                if state.step >= self.total_steps or self.stopped_early:
                    break
            else:
                state.epoch += 1
                state.step_in_epoch = 0
        if self.stopped_early:
            self.report.event(f"Stopped early at step {state.step}: eval loss did not improve "
                              f"for {self.config.early_stopping_patience} evaluation(s).",
                              data={"early_stop": True})

    def _stop_if_requested(self, *, pausable: bool = True) -> None:
        """At a step boundary, agreed by every rank in one collective: Cancelled on a cancel
        request; on a pause request, a checkpoint of this step (unless there is one) and
        Paused."""
        flags = [float(self.report.should_stop()), float(self.report.should_pause())]
        if self.world.distributed:
            flags = distributed.sum_across(flags, self.world, self.device)
        if flags[0]:
            raise Cancelled()
        if flags[1] and pausable:
            if self.checkpointed_step != self.state.step and self.state.step > 0 and (
                    self.world.main or self.sharded):
                self.save_checkpoint()
            raise Paused(self.state.step)

    def _steps_left_in_epoch(self) -> list[list[list[int]]]:
        """This epoch's optimizer steps not run yet, each a group of micro-batches (gradient
        accumulation), in the epoch's seeded order."""
        config = self.config
        order = epoch_order(len(self.examples), seed=config.seed, epoch=self.state.epoch)
        groups = micro_batches(self.examples, order, batch_size=config.batch_size,
                               packing=config.packing)
        per_step = config.gradient_accumulation_steps
        steps = [groups[i:i + per_step] for i in range(0, len(groups), per_step)]
        return steps[self.state.step_in_epoch:]

    def _count_step(self, step: dict[str, Any], *, elapsed: float) -> None:
        self.state.step += 1
        self.state.step_in_epoch += 1
        self.state.trained_tokens += step.pop("target_tokens")
        self.state.elapsed_seconds = elapsed

    def _metrics(self, step: dict[str, Any], *, seconds: float) -> dict[str, Any]:
        """The step's metrics line: the optimizer step's own, then progress and throughput."""
        state, total = self.state, self.total_steps
        metrics = {
            "step": state.step, "total_steps": total, "epoch": state.epoch + 1,
            **step,
            "learning_rate": self.scheduler.get_last_lr()[0],
            "tokens_per_second": round(step["tokens"] / max(seconds, 1e-9), 1),
            "trained_tokens": state.trained_tokens,
            "elapsed_seconds": round(state.elapsed_seconds, 2),
            "eta_seconds": round(state.elapsed_seconds / state.step * (total - state.step), 1),
        }
        if self.device.type == "cuda":  # this process's peak so far (rank 0's, sharded or not)
            metrics["gpu_memory_peak_gib"] = round(
                torch.cuda.max_memory_allocated(self.device) / GIB, 2)
        return metrics

    def _evaluation_due(self) -> bool:
        every = self.config.eval_every_steps or self.steps_per_epoch
        step = self.state.step
        return bool(self.validation) and (step % every == 0 or step == self.total_steps)

    def _checkpoint_due(self) -> bool:
        """Every checkpoint_every_steps (or epoch) but the last step (the adapter follows it);
        sharded, every rank takes part (each gathers its shards), rank 0 writes."""
        every = self.config.checkpoint_every_steps or self.steps_per_epoch
        step = self.state.step
        return ((self.world.main or self.sharded) and step % every == 0
                and step < self.total_steps)

    def _no_longer_improving(self, eval_loss: float) -> bool:
        """Early stopping: the eval loss did not improve for early_stopping_patience
        evaluations (the best so far is kept in the checkpointed state)."""
        state = self.state
        if state.best_eval_loss is None or eval_loss < state.best_eval_loss - 1e-6:
            state.best_eval_loss = eval_loss
            state.evals_without_improvement = 0
            return False
        state.evals_without_improvement += 1
        patience = self.config.early_stopping_patience
        return bool(patience and state.evals_without_improvement >= patience)

    # --- one optimizer step ------------------------------------------------------------------

    def optimizer_step(self, group: list[list[int]]) -> dict[str, Any]:
        """One optimizer step over ``group``'s micro-batches (indices into the examples): this
        rank's share of them as forward passes, the gradients summed across ranks, clipped and
        applied. Its metrics: train_loss and the objective's summary, grad_norm, tokens
        computed, target_tokens."""
        model, world, device = self.model, self.world, self.device
        batches = self._forward_batches(group)
        # The loss is the mean over the whole step's units (target tokens; pairs for DPO), on
        # every rank: accumulation, splitting into passes and data parallelism do not change
        # what is optimised.
        units, targets = (int(n) for n in distributed.sum_across(
            [sum(self.objective.units(b) for b in batches), sum(b.target_tokens for b in batches)],
            world, device))
        sharded = sharding.is_sharded(model)
        work = [(batch, 1.0) for batch in batches]
        if sharded:  # every rank runs as many passes as the busiest (each gathers every layer)
            idle = collate(sequences_of([self.examples[group[0][0]]]),
                           packing=self.config.packing, pad_id=self.pad_id)
            work += [(idle, 0.0)] * (distributed.most_across(len(batches), world, device)
                                     - len(batches))
        totals, tokens, padding = self._accumulate(work, units)
        if not sharded:  # sharded, the last backward pass reduce-scattered the gradients
            distributed.sum_gradients(self.trainable, world)
        totals, tokens = _sum_tallies(totals, tokens, world, device)
        # An infinite norm measures without clipping (sharded gradients need the collective norm).
        max_norm = self.config.max_grad_norm
        grad_norm = sharding.gathered(torch.nn.utils.clip_grad_norm_(
            self.trainable, max_norm if max_norm > 0 else math.inf))
        self.optimizer.step()
        self.scheduler.step()
        # graphed passes add into the same gradient tensors
        self.optimizer.zero_grad(set_to_none=self.graphed is None)
        summary = self.objective.summary(totals, units)
        return {"train_loss": summary.pop("loss"), **summary,
                "grad_norm": round(float(grad_norm), 4), "tokens": tokens, "target_tokens": targets,
                **({"graph_padding_tokens": padding} if self.graphed is not None else {})}

    def _forward_batches(self, group: list[list[int]]) -> list[Batch]:
        """This rank's share of a step's micro-batches (in micro-batches of the same size), each
        split into forward passes of at most ``forward_cap`` tokens where the plan says so."""
        config, examples = self.config, self.examples
        if self.world.distributed:
            indices = [i for micro in group for i in micro]
            share = distributed.shard(indices, [len(examples[i].input_ids) for i in indices],
                                      self.world)
            group = [share[i:i + config.batch_size]
                     for i in range(0, len(share), config.batch_size)]
        passes = [part for micro in group for part in (
            forward_passes(micro, examples, max_tokens=self.forward_cap, packing=config.packing)
            if self.forward_cap else [micro])]
        return [collate(sequences_of(examples[i] for i in part), packing=config.packing,
                        pad_id=self.pad_id) for part in passes]

    def _accumulate(self, work: list[tuple[Batch, float]], units: int
                    ) -> tuple[dict[str, float], int, int]:
        """The forward and backward passes of one step, each pass's loss weighted by
        weight / units into the gradients: the objective's tallies and the tokens of the passes
        that count (weight > 0), and the tokens the graphed passes computed as padding."""
        totals: dict[str, float] = dict.fromkeys(self.objective.TALLIES, 0.0)
        tokens = padding = 0
        for index, (batch, weight) in enumerate(work):
            if self.graphed is not None:  # replayed from a CUDA graph (supervised: loss, correct)
                loss, correct = self.graphed.run(batch, weight / units)
                tallies = {"loss": loss, "correct": correct}
                padding += graphs.bucket(batch.tokens) - batch.tokens
            else:
                if self.plan is not None:
                    _apply_plan_for(self.model, self.plan, batch.input_ids.numel())
                # sharded: reduce the gradients once, at the end
                sharding.set_gradient_sync(self.model, index == len(work) - 1)
                loss_sum, tallies = self.objective.forward(self.model, batch.to(self.device))
                (loss_sum * (weight / units)).backward()
            if weight:
                _add(totals, tallies)
                tokens += batch.tokens
            if not self.world.distributed and self.report.should_stop():  # ranks: between steps
                raise Cancelled()
        return totals, tokens, padding

    # --- evaluate, save, cleanup -------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """The objective's eval_ metrics over the validation examples (see :func:`evaluate`)."""
        with _marking_oom(self.graphed is not None):
            return evaluate(self.model, self.validation, batch_size=self.config.batch_size,
                            packing=bool(self.config.packing), pad_id=self.pad_id,
                            device=self.device, objective=self.objective, world=self.world)

    def save_checkpoint(self) -> None:
        """A resumable checkpoint of this step (sharded, every rank gathers; rank 0 writes),
        reported, and the oldest beyond the newest KEEP_CHECKPOINTS removed."""
        directory = Path(self.config.output_dir) / "checkpoints"
        path = directory / f"step-{self.state.step}"
        write = self.world.main
        ckpt.save_checkpoint(path, model=self.model, optimizer=self.optimizer,
                             scheduler=self.scheduler, state=self.state, write=write)
        self.checkpointed_step = self.state.step
        if not write:
            return
        self.report.checkpoint(self.state.step, str(path), self.state.last_metrics)
        old = sorted(directory.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
        for stale in old[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(stale, ignore_errors=True)

    def save(self) -> TrainResult:
        """The adapter beside the configuration it was trained with (rank 0 writes it;
        sharded, after every rank gathered it), and the run's result."""
        adapter_dir = Path(self.config.output_dir) / "adapter"
        main = self.world.main
        if main or self.sharded:
            ckpt.save_adapter(self.model, adapter_dir, config_json=self.config.to_json(),
                              write=main)
        return TrainResult(status="succeeded", adapter_dir=str(adapter_dir),
                           sha256=ckpt.sha256_of(adapter_dir) if main else "",
                           steps=self.state.step, trained_tokens=self.state.trained_tokens,
                           config=_as_dict(self.config), final_metrics=self.state.last_metrics,
                           stopped_early=self.stopped_early)

    def cleanup(self) -> None:
        """Leave the process group (a torchrun job); nothing to do in one process."""
        if self.world.distributed:
            distributed.close()


# --- setup ---------------------------------------------------------------------------------------


def _device(config: TrainingConfig, world: distributed.World) -> torch.device:
    """One GPU per process (torchrun's LOCAL_RANK), or the CPU."""
    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("device=cuda but no CUDA GPU is visible")
        if world.distributed:
            torch.cuda.set_device(world.local_rank)
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _use_bf16(config: TrainingConfig, device: torch.device) -> bool:
    if config.bf16 is not None:
        return config.bf16
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def load_model(config: TrainingConfig, device: torch.device, attention: str = "sdpa",
               fused_kernels: bool = True, *, sharded: bool = False,
               world: distributed.World = distributed.World()):
    """The base model with LoRA adapters, fused kernels where available, and activation
    checkpointing on every layer if the config forces it (the automatic plan comes later,
    :func:`apply_checkpoint_plan`, once the model's real size is known). ``sharded``: split
    across the ranks of ``world`` (:mod:`jobs.training.sharding`)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if _use_bf16(config, device) else torch.float32
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attention}
    if sharded:
        model = sharding.build_skeleton(Path(config.base_model_dir), dtype, attention)
    elif config.method == "qlora":
        from jobs.training.quantization import four_bit_config, prepare_quantized

        kwargs["quantization_config"] = four_bit_config()
        kwargs["device_map"] = {"": device.index or 0}
        kwargs["dtype"] = torch.bfloat16
        model = prepare_quantized(AutoModelForCausalLM.from_pretrained(config.base_model_dir,
                                                                       **kwargs), device)
    else:
        model = AutoModelForCausalLM.from_pretrained(config.base_model_dir, **kwargs)
        if device.type == "cuda":
            embedding_to_host(model, device)  # frozen lookup table: 1 GB less on an 8B model
        model.to(device)
    fused = fused_kernels and device.type == "cuda" and apply_fused_kernels(model)
    model.config.use_cache = False
    torch.manual_seed(config.seed)  # dropout's random state starts here
    lora = LoraConfig(
        r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=ALL_LINEAR if config.target_modules == ALL_LINEAR else list(config.target_modules),
        bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    if sharded and config.init_adapter_dir and config.objective == "dpo":
        raise ValueError("a DPO job continued from an adapter cannot be sharded yet (its "
                         "reference adapter is loaded whole): set sharding to off")
    if not sharded:
        init_lora(model, config.seed)
        if config.init_adapter_dir:
            _start_from_adapter(model, Path(config.init_adapter_dir),
                                reference=config.objective == "dpo")
    if kwargs["dtype"] == torch.bfloat16:
        _compute_adapters_in_bf16(model)
    if fused_kernels:
        fuse_lora_projections(model, keep_copies=not sharded)
        recompute_norm_outputs(model)
        fuse_swiglu_adapters(model)
    if not sharded:  # long passes may run the MLP in chunks (the memory plan decides)
        chunked_mlp.install(model)
    setattr(model, FUSED_KERNELS, fused)
    if sharded:
        sharding.shard(model, _decoder_layers(model), device, world, bf16=dtype == torch.bfloat16)
        sharding.materialise(model, Path(config.base_model_dir), device, world, seed=config.seed,
                             host_embedding=device.type == "cuda")
        if config.init_adapter_dir:
            _start_from_adapter(model, Path(config.init_adapter_dir), reference=False)
    if config.gradient_checkpointing:
        apply_checkpoint_plan(model, len(_decoder_layers(model)))
    return model


def _start_from_adapter(model, directory: Path, *, reference: bool) -> None:
    """Continued training: the new adapter starts from ``directory``'s weights, which must fit it
    exactly (same rank and target modules). With ``reference`` (DPO) the same weights are also
    loaded, frozen, as the reference adapter: DPO then measures against the adapter training
    continues from, not against the bare base model."""
    from safetensors.torch import load_file

    try:
        ckpt.load_adapter_weights(model, load_file(directory / "adapter_model.safetensors"))
    except ValueError as exc:
        raise ValueError(f"the adapter in {directory.name} does not fit this job's LoRA settings "
                         f"({str(exc)[:200]}): continued training needs the same rank and target "
                         "modules") from None
    if reference:
        from peft.tuners.lora import LoraLayer

        model.load_adapter(str(directory), adapter_name=REFERENCE_ADAPTER, is_trainable=False)
        model.set_adapter(TRAINED_ADAPTER)  # the reference is frozen; the default trains
        for module in model.modules():  # the reference scores without dropout, in train mode too
            if isinstance(module, LoraLayer) and REFERENCE_ADAPTER in module.lora_dropout:
                module.lora_dropout[REFERENCE_ADAPTER] = torch.nn.Identity()


def _decoder_layers(model) -> list[torch.nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def apply_checkpoint_plan(model, checkpointed_layers: int, *, random: bool = True,
                          offloaded_layers: int = 0, mlp_chunk_tokens: int = 0) -> None:
    """Recompute the activations of the first ``checkpointed_layers`` decoder layers in the
    backward pass (non-reentrant checkpointing); the other layers keep theirs. ``random=False``
    (the model draws no random numbers: no dropout) skips saving and restoring the RNG state
    around each layer, which a CUDA graph capture cannot do; the first call decides.

    For passes too long for that alone (:meth:`ActivationPlan.long_pass_for`): the first
    ``offloaded_layers`` of the checkpointed layers park their input in host memory
    (:func:`jobs.training.offload.offloaded_checkpoint`), and every MLP runs in chunks of
    ``mlp_chunk_tokens`` (:mod:`jobs.training.chunked_mlp`; 0: whole)."""
    layers = _decoder_layers(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if checkpointed_layers > 0 and not getattr(base, CHECKPOINT_READY, False):
        setattr(base, CHECKPOINT_READY, True)
        # transformers 5.2x renamed it; 5.17 (the GPU image) has only the old name
        options = {"use_reentrant": False, "preserve_rng_state": random}
        if hasattr(base, "activation_checkpointing_enable"):
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
        for layer in layers:
            setattr(layer, PLAIN_CHECKPOINT, layer._gradient_checkpointing_func)
    stash = _host_stash(base) if offloaded_layers else None
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = index < checkpointed_layers
        if layer.gradient_checkpointing:
            layer._gradient_checkpointing_func = (
                offloaded_checkpoint(layer, stash, getattr(layer, PLAIN_CHECKPOINT))
                if index < offloaded_layers
                else getattr(layer, PLAIN_CHECKPOINT))
    chunked_mlp.set_chunk_tokens(model, mlp_chunk_tokens)


def _apply_plan_for(model, plan: ActivationPlan, tokens: int) -> None:
    """The memory plan's checkpointing for one forward pass of ``tokens`` tokens."""
    offloaded, chunk = plan.long_pass_for(tokens)
    apply_checkpoint_plan(model, plan.layers_for(tokens), offloaded_layers=offloaded,
                          mlp_chunk_tokens=chunk)


def _host_stash(base) -> HostStash:
    stash = getattr(base, HOST_STASH, None)
    if stash is None:
        stash = HostStash(next(p.device for p in base.parameters()))
        setattr(base, HOST_STASH, stash)
    return stash


def _compute_adapters_in_bf16(model) -> None:
    """Run the forward under bf16 autocast (:func:`forward_loss`), as stock Trainer's bf16 mode does.

    peft keeps the adapter weights in fp32 and, without autocast, casts every adapted layer's input
    to fp32 and computes the adapter's output, its scaling and its sum with the base output in fp32:
    full-size fp32 tensors and non-tensor-core matmuls, seven per transformer layer. Measured on an
    H100 (8B LoRA, packed): more GPU time in those casts and fp32 kernels than in the base model's
    own matmuls. Under autocast they run in bf16; the adapter weights, their gradients and the
    optimizer state stay fp32. peft's own input cast is switched off: autocast casts for the
    matmul, and peft's cast to fp32 would only add a copy of each input.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False
    setattr(model, AUTOCAST_DTYPE, torch.bfloat16)


def _scheduler(config: TrainingConfig, optimizer, total_steps: int):
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[config.lr_scheduler]
    warmup = math.ceil(config.warmup_ratio * total_steps)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def _shard(config: TrainingConfig, world: distributed.World, available: int | None,
           bf16: bool, device: torch.device) -> bool:
    """Whether this job's model is sharded across its processes: the rule of the platform's
    pre-flight estimate (:func:`jobs.training.memory.shards`), on the model's real size."""
    weights = 0
    if world.distributed and config.sharding == "auto" and config.method == "lora":
        path = Path(config.base_model_dir)  # only auto reads the model's size
        shape = ModelShape.from_directory(path, sharding.parameter_count(path))
        weights = weight_bytes(shape, method=config.method, bf16=bf16,
                               on_gpu=device.type == "cuda")
    return shards(sharding=config.sharding, method=config.method, gpus=world.size,
                  weights=weights, budget=available) > 1


def _memory_budget(config: TrainingConfig, device: torch.device) -> int | None:
    """The GPU memory this job plans for: ``memory_limit_gib`` (enforced through the caching
    allocator) or the whole device; None on the CPU."""
    if device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    if config.memory_limit_gib is None:
        return total
    limit = min(total, int(config.memory_limit_gib * GIB))
    torch.cuda.set_per_process_memory_fraction(limit / total, device)
    return limit


def _planned_micro_batches(config: TrainingConfig, examples) -> list[list[int]]:
    """Every micro-batch of the planned epochs, in order."""
    return [micro for epoch in range(config.epochs or 1)
            for micro in micro_batches(examples, epoch_order(len(examples), seed=config.seed,
                                                             epoch=epoch),
                                       batch_size=config.batch_size, packing=config.packing)]


def _largest_pass(config: TrainingConfig, examples) -> int:
    """Tokens computed by the largest micro-batch of the planned epochs (padded rows included)."""
    lengths = [len(e.input_ids) for e in examples]
    return max((sum(lengths[i] for i in micro) if config.packing
                else len(micro) * max(lengths[i] for i in micro))
               for micro in _planned_micro_batches(config, examples))


def _activation_plan(model, config: TrainingConfig, examples, trainable, device: torch.device,
                     available: int | None, *, graphed: bool = False) -> ActivationPlan:
    """The memory rule of :func:`jobs.training.memory.plan_activations`, fed with this job's
    real numbers: the memory the loaded model and adapter state take, and the largest forward
    pass the micro-batches of the planned epochs form (``graphed``: padded to its bucket, with
    the head over every row, :mod:`jobs.training.graphs`)."""
    lengths = [len(e.input_ids) for e in examples]
    largest = _largest_pass(config, examples)
    target_share = min(1.0, sum(sum(e.loss_mask) for e in examples) / sum(lengths) * 1.25)
    if graphed:
        largest, target_share = graphs.bucket(largest), 1.0
    n_trainable = sum(sharding.local_numel(p) for p in trainable)  # this rank's share, sharded
    adapter = adapter_bytes(n_trainable, bf16=bool(config.bf16),
                            sharded=sharding.is_sharded(model))
    if device.type == "cuda":
        weights = torch.cuda.memory_allocated(device) - n_trainable * 4
    else:
        weights = sum(sharding.local_numel(p) * p.element_size()
                      for p in model.parameters()) - n_trainable * 4
    if sharding.is_sharded(model):  # a layer gathered whole, and the next one prefetched
        layer = _decoder_layers(model)[0]
        weights += 2 * sum(p.numel() * (2 if config.bf16 else 4) for p in layer.parameters())
    mode = config.gradient_checkpointing
    if mode is None and device.type != "cuda":
        mode = False  # the CPU has the memory; recomputing would only cost time
    shape = ModelShape.from_config(model.get_base_model().config.to_dict(),
                                   sum(p.numel() for p in model.parameters()))
    return plan_activations(
        shape, fixed=weights + adapter,
        pass_tokens=split_choices(largest, max(lengths), packing=bool(config.packing)),
        target_share=target_share, method=config.method, bf16=bool(config.bf16),
        fused_kernels=bool(getattr(model, FUSED_KERNELS, False)), fused_head=True,
        gradient_checkpointing=mode, available=available, weights=weights, adapter=adapter,
        dropout=config.lora_dropout > 0, graphed=graphed,
        long_passes=device.type == "cuda" and not graphed and not sharding.is_sharded(model))


@contextmanager
def _marking_oom(graphed: bool):
    """Mark an out-of-memory error raised while CUDA graphs hold memory: :func:`train` then
    retries without them rather than with a smaller micro-batch."""
    try:
        yield
    except torch.OutOfMemoryError as exc:
        if graphed:
            setattr(exc, GRAPHED_OOM, True)
        raise


def _graph_keys(config: TrainingConfig, examples) -> list[graphs.Key]:
    """The graph of each pass of the planned epochs (whole micro-batches: graphed jobs do not
    split them), in order; up to ``max_steps`` when it ends the job sooner."""
    lengths = [len(e.input_ids) for e in examples]
    micros = _planned_micro_batches(config, examples)
    if config.max_steps:
        micros = micros[:config.max_steps * config.gradient_accumulation_steps]
    return [graphs.key_of(sum(lengths[i] for i in micro), len(micro)) for micro in micros]


def _graphs_wanted(model, config: TrainingConfig, examples, world: distributed.World,
                   device: torch.device, report: Reporter) -> bool:
    """Whether this job's passes replay from CUDA graphs (``cuda_graphs``, :func:`graphs.wanted`);
    asked for where they cannot run, a warning says why and the passes run eagerly."""
    reason = graphs.unavailable_reason(
        device=device, distributed=world.distributed, packing=bool(config.packing),
        varlen=model.get_base_model().config._attn_implementation == VARLEN,
        objective=config.objective, dropout=config.lora_dropout)
    if config.cuda_graphs and reason:
        report.event(f"cuda_graphs is on, but {reason}: the passes run without them.",
                     level="warning", data={"cuda_graphs": 0})
    return graphs.wanted(config.cuda_graphs, reason, _graph_keys(config, examples))


def _graphed_passes(model, config: TrainingConfig, examples, trainable, device: torch.device,
                    plan: ActivationPlan, pad_id: int, report: Reporter) -> graphs.GraphedPasses:
    """Capture a graph for every pass of the job, before the first step."""
    passes = graphs.GraphedPasses(
        model, trainable, device, losses=every_row_loss, pad_id=pad_id,
        checkpointed_layers=lambda tokens: apply_checkpoint_plan(model, plan.layers_for(tokens),
                                                                 random=False))
    passes.prepare(_graph_keys(config, examples))
    report.event(passes.describe(), data={"cuda_graphs": len(passes.graphs),
                                          "capture_seconds": round(passes.capture_seconds, 2),
                                          "graph_pool_bytes": passes.pool_bytes})
    return passes


def _report_plan(plan: ActivationPlan, available: int | None, report: Reporter) -> None:
    report.event(f"Memory plan: {plan.describe()}.",
                 data={"checkpointed_layers": plan.checkpointed_layers, "layers": plan.layers,
                       "offloaded_layers": plan.offloaded_layers,
                       "mlp_chunk_tokens": plan.mlp_chunk_tokens,
                       "forward_tokens": plan.forward_tokens, "split": plan.split,
                       "estimated_peak_bytes": plan.estimate.total,
                       "memory_budget_bytes": available})


# --- forward passes and objectives ---------------------------------------------------------------


def _varlen(device: torch.device, bf16: bool) -> bool:
    """Whether packed rows get the flash varlen kernel: CUDA, a PyTorch that has it, bf16 compute
    (the kernel takes no fp32)."""
    return device.type == "cuda" and bf16 and varlen_kernel_available()


def _use_packing(config: TrainingConfig, device: torch.device, bf16: bool) -> bool:
    if config.packing is not None:
        return config.packing
    return device.type == "cpu" or _varlen(device, bf16)


def _attention(packing: bool, device: torch.device, bf16: bool) -> str:
    """The flash varlen kernel for packed rows on CUDA; sdpa otherwise (the CPU packs with sdpa's
    block-diagonal mask, which is fast there; padded rows need sdpa's padding mask)."""
    if packing and _varlen(device, bf16):
        return register_varlen_attention()
    return "sdpa"


def token_losses(model, batch: Batch, reduction: str = "none", *,
                 inputs_embeds: torch.Tensor | None = None, every_row: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(each target position's loss, or their sum with ``reduction="sum"``; correct predictions).

    The transformer runs on every token; the output head only on target positions, fused with
    the loss (:func:`jobs.training.kernels.linear_cross_entropy`), or with ``every_row`` on
    every position, those without loss ignored (fixed shapes, for :mod:`jobs.training.graphs`,
    which also passes the ``inputs_embeds`` it looked up itself).
    """
    base = model.get_base_model()
    extra: dict[str, Any] = {}
    if base.config._attn_implementation == VARLEN:
        extra = packed_attention_kwargs(batch.cu_seqlens, batch.max_length)
    embedding = base.get_input_embeddings()
    if inputs_embeds is not None:
        extra["inputs_embeds"] = inputs_embeds
    elif isinstance(embedding, HostEmbedding) and batch.host_input_ids is not None:
        extra["inputs_embeds"] = embedding(batch.host_input_ids)  # no wait for the GPU
    else:
        extra["input_ids"] = batch.input_ids
    autocast_dtype = getattr(model, AUTOCAST_DTYPE, None)
    with torch.autocast(batch.input_ids.device.type, dtype=autocast_dtype or torch.bfloat16,
                        enabled=autocast_dtype is not None):
        hidden = base.model(position_ids=batch.position_ids,
                            attention_mask=batch.attention_mask, use_cache=False,
                            **extra).last_hidden_state
        if every_row:
            return linear_cross_entropy(base.get_output_embeddings(), hidden.flatten(0, 1),
                                        batch.labels.flatten(), reduction=reduction,
                                        ignored=True)
        targets = batch.labels != IGNORE_INDEX
        return linear_cross_entropy(base.get_output_embeddings(), hidden[targets],
                                    batch.labels[targets], reduction=reduction)


def forward_loss(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token losses, correct predictions) over the positions that carry loss."""
    return token_losses(model, batch, reduction="sum")


def every_row_loss(model, batch: Batch, inputs_embeds: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`forward_loss` with fixed shapes: what a graphed pass computes."""
    return token_losses(model, batch, reduction="sum", inputs_embeds=inputs_embeds,
                        every_row=True)


class SupervisedObjective:
    """Next-token loss on the target tokens; a unit is a target token."""

    TALLIES = ("loss", "correct")

    def units(self, batch: Batch) -> int:
        return batch.target_tokens

    def forward(self, model, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        loss_sum, correct = forward_loss(model, batch)
        return loss_sum, {"loss": loss_sum.item(), "correct": int(correct)}

    def summary(self, totals: dict[str, float], units: int) -> dict[str, Any]:
        n = max(1, units)
        return {"loss": round(totals["loss"] / n, 6), "token_accuracy": round(totals["correct"] / n, 4)}


def objective_for(config: TrainingConfig) -> SupervisedObjective | DpoObjective:
    if config.objective == "dpo":
        return DpoObjective(config.dpo_beta, token_losses)
    return SupervisedObjective()


def _add(totals: dict[str, float], tallies: dict[str, float]) -> None:
    for key, value in tallies.items():
        totals[key] = totals.get(key, 0) + value


def _sum_tallies(totals: dict[str, float], count: int, world: distributed.World,
                 device: torch.device) -> tuple[dict[str, float], int]:
    """An objective's tallies and a count, summed over the ranks (the same keys on every rank,
    a rank without examples this step included)."""
    names = sorted(totals)
    summed = distributed.sum_across([totals[name] for name in names] + [count], world, device)
    return dict(zip(names, summed[:-1], strict=True)), int(summed[-1])


@torch.no_grad()
def evaluate(model, examples, *, batch_size: int, packing: bool, pad_id: int,
             device: torch.device, objective: SupervisedObjective | DpoObjective | None = None,
             world: distributed.World = distributed.World()) -> dict[str, float]:
    """eval_loss and eval_token_accuracy (supervised) or eval_reward_accuracy, eval_reward_margin,
    ... (dpo) over ``examples`` (each rank evaluates every world.size-th one)."""
    objective = objective or SupervisedObjective()
    model.eval()
    parts = [examples[world.rank::world.size][start:start + batch_size]
             for start in range(0, len(examples[world.rank::world.size]), batch_size)]
    if sharding.is_sharded(model):  # as many passes on every rank; the extra ones count nothing
        parts += [[]] * (distributed.most_across(len(parts), world, device) - len(parts))
    totals: dict[str, float] = dict.fromkeys(objective.TALLIES, 0.0)
    units = 0
    for part in parts:
        batch = collate(sequences_of(part or examples[:1]), packing=packing,
                        pad_id=pad_id).to(device)
        _, tallies = objective.forward(model, batch)
        if part:
            _add(totals, tallies)
            units += objective.units(batch)
    model.train()
    totals, units = _sum_tallies(totals, units, world, device)
    return {f"eval_{name}": value for name, value in objective.summary(totals, units).items()}


def _as_dict(config: TrainingConfig) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(config)
