"""Quality of one attention variant on one task at one training length: one point per Hydra job.

    python -m experiments.train task=mqar attention=local seq_len=512 out_dir=results/mqar
    python -m experiments.train task=stdlib_lm model=small seq_len=256 steps=2000
    python -m experiments.train task=needle seq_len=512 'eval_lens=[512,1024,2048]'
    python -m experiments.train task=stdlib_lm packing=true     # files packed into rows
    python -m experiments.train -m --config-name quality     # the quality sweep (conf/quality.yaml)
    torchrun --nproc_per_node=4 -m experiments.train parallel.cp=2 parallel.dp=2 seq_len=8192

Configs: `conf/train.yaml` (typed by `experiments.config.TrainConfig`), groups `attention/`
(every registered variant), `model/` (backbone sizes) and `task/` (`experiments.tasks`).
A point trains `TransformerLM(task.vocab_size, **model, attention=...)` for `steps` AdamW
steps (linear warm-up, cosine decay to a tenth) of `tokens_per_step` tokens each
(`tokens_per_step // seq_len` sequences), with the loss read on the task's answer positions
(every position for language models); the module is in train mode. A curriculum
(`curriculum_steps` > 0) draws the first `curriculum_steps` steps' sequences at
`curriculum_len` tokens (the same tokens per step, one learning-rate schedule). With `packing=true`
(tasks made of documents: `stdlib_lm`) the training rows are the task's documents packed into
rows (`Task.packed_batches`): the model gets their `document_ids`, so attention and positions
stay inside each document, and no target is predicted across a document boundary; the same
tokens per step as without. Then, in eval mode under `no_grad`, it evaluates `eval_sequences`
held-out sequences at each of `eval_lens` (lengths longer than `seq_len` measure length
extrapolation): `eval_loss` (nats per answer token), `accuracy` (synthetic tasks) or
`bits_per_byte` (`stdlib_lm`: its validation files packed into rows, each file its own
document, whether the point trained packed or not), and the same per bucket of positions
(`position_buckets`; a position counts from its document's start): `position_loss` and
`position_accuracy`, JSON objects `{"first-last": value}`. The evaluation data depend on the seed
and the length only, so every variant and both layouts see the same.

Each step's loss adds `aux_loss_weight` times the attention modules' own losses
(`Attention.auxiliary_loss`: topk's indexer loss, whose graph reaches only the indexer, so the
weight scales the indexer's gradients alone).

Each (point, eval length) becomes one row appended to `<out_dir>/train.csv`
(`experiments.results.Table`: typed columns, whole lines under a lock, so parallel jobs share
it; a malformed line is moved aside with a warning): key (attention, params, model, task,
task_params, packing, seq_len, eval_len and the budget: steps, tokens_per_step, lr, seed,
aux_loss_weight, curriculum_len, curriculum_steps), `status` (ok, oom, unsupported, error)
with the message in `error`, metrics and the environment. A point whose rows all exist is
skipped (failed ones too, unless `retry_failed=true`); at the end of a sweep the report
(`experiments.report`, joined with `speed_dir`) is written.
`checkpoint` (a path, or null) receives the model's weights and everything needed to rebuild
it (`load_checkpoint`).
Parallel training (`parallel.cp=P parallel.dp=D`, under `torchrun` with WORLD_SIZE = P * D
processes; `Parallel`): the processes form a (dp, cp) `DeviceMesh`. Every step's batch is split
into D equal shares of its sequences, each sequence into P contiguous shards of positions (the
targets are the next tokens of the whole sequence, so a shard's last target is the next
shard's first input); the model runs with `context_parallel` over its cp group. Each rank's
loss is its answer tokens' summed cross-entropy over the whole batch's count of answer tokens,
and the gradients are summed over all ranks by one all-reduce: every rank then holds the
gradient of one process on the whole batch and takes the same optimizer step. Evaluation is
sharded over cp (each dp replica evaluates the same sequences). Only rank 0 writes rows,
checkpoints and W&B. Under cp > 1 packed rows and text tasks (documents) are not supported.
A variant's own loss is each rank's share (context-parallel calls split it over the ranks),
divided by dp and summed like the main loss.

Runs are deterministic given `seed` on a given machine and thread count. W&B: one run per
point (offline by default), `train/loss` (and `train/aux_loss` where a variant has one) every
`log_every` steps and `eval/<len>/<metric>`; the rows' `aux_loss` is the mean auxiliary loss of
the last tenth of the steps (empty without one).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from attn_zoo.attention import Attention
from attn_zoo.layers import token_positions
from attn_zoo.model import TransformerLM
from experiments import report
from experiments.bench import SweepProgress, check_device
from experiments.config import attention_params, register_configs
from experiments.measure import text_table
from experiments.results import (
    ENVIRONMENT_COLUMNS,
    STATUS_COLUMNS,
    Table,
    environment,
    error_row,
)
from experiments.tasks import TASKS, Batch, Task, bits, make_task
from experiments.wandb_logger import NullRun, start_run

log = logging.getLogger(__name__)

CSV_NAME = "train.csv"
CHECKPOINT_FORMAT = "attn_zoo.train/1"
CHECKPOINT_KEYS = ("model", "model_kwargs", "task", "config")
BUDGET = {"steps": int, "tokens_per_step": int, "lr": float, "seed": int,
          "aux_loss_weight": float, "curriculum_len": int, "curriculum_steps": int}
KEY = ("attention", "params", "model", "task", "task_params", "packing", "seq_len", "eval_len",
       *BUDGET)
METRICS = {"eval_loss": float, "accuracy": float, "bits_per_byte": float, "train_loss": float,
           "train_seconds": float, "train_tokens_per_s": float, "eval_seconds": float,
           "n_params": int, "train_tokens": int, "aux_loss": float, "position_loss": str,
           "position_accuracy": str}
COLUMNS = ({"attention": str, "params": str, "model": str, "task": str, "task_params": str,
            "packing": bool, "seq_len": int, "eval_len": int} | BUDGET | STATUS_COLUMNS | METRICS
           | ENVIRONMENT_COLUMNS)
DEFAULTS = {"packing": False, "aux_loss_weight": 1.0, "curriculum_len": 0, "curriculum_steps": 0}
"""What rows written before a column existed meant."""
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
EVAL_SEED_OFFSET = 1_000_003  # evaluation data: a stream apart from the training data


# -- the point ------------------------------------------------------------------------------


def plain(node: Any) -> dict[str, Any]:
    """A composed config node as plain Python values (enums as their names)."""
    return OmegaConf.to_container(node, resolve=True, enum_to_str=True)


def task_params(cfg: DictConfig) -> dict[str, Any]:
    return {key: value for key, value in plain(cfg.task).items() if key != "name"}


def model_params(cfg: DictConfig) -> dict[str, Any]:
    return {key: value for key, value in plain(cfg.model).items() if key != "name"}


def eval_lengths(cfg: DictConfig) -> list[int]:
    """`eval_lens`, or `[seq_len]` when empty; sorted, without repeats."""
    lengths = sorted(set(cfg.eval_lens or [cfg.seq_len]))
    for length in lengths:
        if not isinstance(length, int) or length < 1:
            raise ValueError(f"eval_lens must hold positive ints, got {list(cfg.eval_lens)}")
    return lengths


def point_of(cfg: DictConfig) -> dict[str, Any]:
    """The identifying columns shared by the point's rows (all but `eval_len`)."""
    return {"attention": cfg.attention.name,
            "params": json.dumps(attention_params(cfg.attention), sort_keys=True),
            "model": cfg.model.name, "task": cfg.task.name,
            "task_params": json.dumps(task_params(cfg), sort_keys=True),
            "packing": cfg.packing, "seq_len": cfg.seq_len} | {axis: cfg[axis] for axis in BUDGET}


def model_kwargs(cfg: DictConfig, task: Task) -> dict[str, Any]:
    """The keyword arguments of `TransformerLM` for this point (what a checkpoint stores)."""
    params = attention_params(cfg.attention) | {"backend": cfg.backend.name}
    return {"vocab_size": task.vocab_size, **model_params(cfg), "attention": cfg.attention.name,
            "attention_params": params,
            "max_seq_len": max([cfg.seq_len, *eval_lengths(cfg)])}


# -- data and context parallel --------------------------------------------------------------


@dataclass(frozen=True)
class Parallel:
    """This process's place in a (dp, cp) device mesh over the whole world."""

    mesh: DeviceMesh

    @property
    def dp(self) -> int:
        return self.mesh.size(0)

    @property
    def cp(self) -> int:
        return self.mesh.size(1)

    @property
    def cp_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("cp")

    @property
    def is_main(self) -> bool:
        """Rank 0 of the world: the process that writes rows, checkpoints and W&B."""
        return dist.get_rank() == 0

    def shard(self, batch: Batch, rows: bool = True) -> Batch:
        """This rank's part of `batch` (B, N): its dp share of the rows (B / dp of them, when
        `rows`), and of those its cp shard of the positions (contiguous, in rank order)."""
        length = batch.inputs.shape[1]
        if length < self.cp:
            raise ValueError(f"a sequence of {length} tokens cannot be split into "
                             f"parallel.cp={self.cp} shards of at least one token")

        return Batch(*(None if x is None else self.part(x, rows) for x in (
            batch.inputs, batch.targets, batch.mask, batch.document_ids)))

    def part(self, x: torch.Tensor, rows: bool = True) -> torch.Tensor:
        """This rank's part of a (B, N, ...) tensor, as `shard` cuts a batch."""
        if rows:
            x = x.tensor_split(self.dp)[self.mesh.get_local_rank("dp")]
        return x.tensor_split(self.cp, dim=1)[self.mesh.get_local_rank("cp")]

    def sum(self, values: Sequence[float | torch.Tensor], device: torch.device) -> list[float]:
        """`values` summed over every rank, as floats."""
        total = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
        dist.all_reduce(total)
        return total.tolist()

    def sum_gradients(self, model: torch.nn.Module) -> None:
        """Sum every parameter's gradient over all ranks (one all-reduce of them all)."""
        params = list(model.parameters())
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        for p, g in zip(params, flat.split([g.numel() for g in grads]), strict=True):
            p.grad = g.view_as(p)

    def from_main(self, value: Any) -> Any:
        """Rank 0's `value` (picklable) on every rank."""
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def setup_parallel(cfg: DictConfig) -> Parallel | None:
    """The (dp, cp) mesh of `cfg.parallel` over the initialized process group, or None for
    one process; a ValueError when the world size is not cp * dp or cp > 1 meets what the
    sharding does not support (packing, text tasks)."""
    cp, dp = cfg.parallel.cp, cfg.parallel.dp
    for name, value in (("parallel.cp", cp), ("parallel.dp", dp)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world != cp * dp:
        raise ValueError(f"parallel.cp * parallel.dp ({cp} * {dp}) must equal the number of "
                         f"processes (WORLD_SIZE={os.environ.get('WORLD_SIZE', world)}): launch "
                         f"with torchrun --nproc_per_node={cp * dp} (or over nodes)")
    if cp > 1 and (cfg.packing or TASKS[cfg.task.name].is_text):
        raise ValueError(f"parallel.cp={cp} supports unpacked synthetic tasks only, got "
                         f"task={cfg.task.name} packing={cfg.packing} (documents are not "
                         "sharded)")
    rows = cfg.tokens_per_step // max(1, cfg.seq_len)  # a bad seq_len is the point's error row
    if rows % dp:
        raise ValueError(f"parallel.dp={dp} must divide the sequences per step "
                         f"(tokens_per_step // seq_len = {rows})")
    if world == 1:
        return None
    device_type = torch.device(cfg.device).type
    return Parallel(init_device_mesh(device_type, (dp, cp), mesh_dim_names=("dp", "cp")))


@contextlib.contextmanager
def process_group(device: str) -> Iterator[None]:
    """Under torchrun (WORLD_SIZE > 1), the default process group for the block: NCCL for CUDA
    tensors (this process's GPU: LOCAL_RANK) and gloo for any CPU tensor with device=cuda,
    gloo with device=cpu; nothing otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 or dist.is_initialized():
        yield
        return
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


# -- training and evaluation ----------------------------------------------------------------


def logits_of(model: TransformerLM, batch: Batch, device: torch.device) -> torch.Tensor:
    """The model's (B, N, V) logits of the batch's inputs (packed rows with their documents)."""
    ids = batch.document_ids
    return model(batch.inputs.to(device), document_ids=None if ids is None else ids.to(device))


def check_curriculum(cfg: DictConfig) -> None:
    """ValueErrors naming curriculum_steps or curriculum_len when they do not fit the run."""
    steps, length = cfg.curriculum_steps, cfg.curriculum_len
    if not isinstance(steps, int) or not 0 <= steps < cfg.steps:
        raise ValueError(f"curriculum_steps must be an int in [0, steps={cfg.steps}), got "
                         f"{steps!r}")
    if steps and not (isinstance(length, int) and 1 <= length <= cfg.tokens_per_step):
        raise ValueError(f"curriculum_len must be an int in [1, tokens_per_step="
                         f"{cfg.tokens_per_step}] with curriculum_steps={steps}, got {length!r}")


def training_batches(task: Task, cfg: DictConfig,
                     generator: torch.Generator) -> Iterator[Batch]:
    """The `steps` training batches of `tokens_per_step` tokens: the first `curriculum_steps`
    of sequences of `curriculum_len` tokens, the rest of `seq_len`; packed rows with
    `packing`, else `task.batch` draws."""
    def of_length(seq_len: int) -> Iterator[Batch]:
        rows = batch_size(cfg.tokens_per_step, seq_len)
        if cfg.packing:
            return task.packed_batches(rows, seq_len, generator, "train")
        return (task.batch(rows, seq_len, generator, "train") for _ in itertools.count())

    stages = [(cfg.curriculum_len, cfg.curriculum_steps)] if cfg.curriculum_steps else []
    stages.append((cfg.seq_len, cfg.steps - cfg.curriculum_steps))
    return itertools.chain.from_iterable(itertools.islice(of_length(length), steps)
                                         for length, steps in stages)


def answer_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                count: float | None = None) -> torch.Tensor:
    """Cross-entropy (nats) summed over the mask and divided by `count` (default: the mask's
    count, the mean): logits (B, N, V), targets and mask (B, N). Float32 at least."""
    answers = logits[mask]
    answers = answers.to(torch.promote_types(answers.dtype, torch.float32))
    if count is None:
        return F.cross_entropy(answers, targets[mask])
    return F.cross_entropy(answers, targets[mask], reduction="sum") / count


def auxiliary_loss(model: TransformerLM) -> torch.Tensor | None:
    """The sum of the attention modules' own losses from the last forward
    (`Attention.auxiliary_loss`: topk's indexer loss), or None when no module has one."""
    losses = [loss for module in model.modules() if isinstance(module, Attention)
              and (loss := module.auxiliary_loss()) is not None]
    return sum(losses) if losses else None


def learning_rate(step: int, cfg: DictConfig) -> float:
    """Linear warm-up over `warmup_steps`, then cosine decay to `lr / 10` at `steps`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def batch_size(tokens_per_step: int, seq_len: int) -> int:
    """Sequences per step: `tokens_per_step // seq_len`, at least one."""
    if tokens_per_step < seq_len:
        raise ValueError(f"tokens_per_step must be >= seq_len ({seq_len}) for one sequence per "
                         f"step, got {tokens_per_step}")
    return tokens_per_step // seq_len


def train_model(cfg: DictConfig, task: Task, model: TransformerLM, device: torch.device,
                wandb_run: Any, parallel: Parallel | None = None) -> dict[str, float]:
    """`cfg.steps` AdamW steps in train mode; the mean loss of the last tenth of the steps.
    With `parallel`, this rank's part of each batch, gradients summed over the ranks."""
    for name in ("steps", "tokens_per_step", "eval_sequences", "log_every"):
        if not isinstance(cfg[name], int) or cfg[name] < 1:
            raise ValueError(f"{name} must be a positive int, got {cfg[name]!r}")
    if not (math.isfinite(cfg.aux_loss_weight) and cfg.aux_loss_weight >= 0):
        raise ValueError(f"aux_loss_weight must be finite and >= 0, got {cfg.aux_loss_weight!r}")
    check_curriculum(cfg)
    batch_size(cfg.tokens_per_step, cfg.seq_len)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=cfg.lr, betas=(0.9, 0.98))
    batches = training_batches(task, cfg, torch.Generator().manual_seed(cfg.seed))
    model.train()
    losses, aux_losses, tokens = [], [], 0
    started = time.perf_counter()
    for step, batch in enumerate(batches):
        tokens += batch.inputs.numel()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg)
        # Under parallel every rank draws the whole batch and keeps its part; its loss is its
        # share of the whole batch's mean.
        count = None if parallel is None else int(batch.mask.sum())
        if parallel is not None:
            batch = parallel.shard(batch)
        loss = answer_loss(logits_of(model, batch, device), batch.targets.to(device),
                           batch.mask.to(device), count)
        aux = auxiliary_loss(model)
        if aux is not None and parallel is not None:
            # A rank's own loss is its share of its rows' (context parallel calls split it),
            # the mean over an equal share of the batch's rows: summed over the ranks / dp it
            # is the whole batch's.
            aux = aux / parallel.dp
        optimizer.zero_grad(set_to_none=True)
        (loss if aux is None else loss + cfg.aux_loss_weight * aux).backward()
        if parallel is not None:
            parallel.sum_gradients(model)
            totals = parallel.sum([loss.detach()] + ([] if aux is None else [aux.detach()]),
                                  device)
            loss = loss.new_tensor(totals[0])
            aux = None if aux is None else aux.new_tensor(totals[1])
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"training loss is {losses[-1]} at step {step}")
        logged = {"train/loss": losses[-1], "train/lr": learning_rate(step, cfg),
                  "train/step": step}
        if aux is not None:
            aux_losses.append(aux.item())
            logged["train/aux_loss"] = aux_losses[-1]
        if (step % cfg.log_every == 0 or step == cfg.steps - 1) and (
                parallel is None or parallel.is_main):
            wandb_run.log(logged)
            log.info("step %d/%d loss %.4f", step + 1, cfg.steps, losses[-1])
    seconds = time.perf_counter() - started
    tail = losses[-max(1, len(losses) // 10):]
    aux_tail = aux_losses[-max(1, len(aux_losses) // 10):]
    return {"train_loss": sum(tail) / len(tail), "train_seconds": seconds,
            "aux_loss": sum(aux_tail) / len(aux_tail) if aux_tail else None,
            "train_tokens_per_s": tokens / seconds, "train_tokens": tokens}


def position_buckets(starts: Sequence[int], seq_len: int) -> list[tuple[int, int]]:
    """[first, last] positions of the buckets that begin at 0 and at each of `starts`
    (increasing positive ints), the last ending at seq_len - 1; those past it are left out."""
    if any(not isinstance(s, int) or s < 1 for s in starts) or list(starts) != sorted(
            set(starts)):
        raise ValueError(f"position_buckets must be increasing positive ints, got "
                         f"{list(starts)}")
    firsts = [0, *(s for s in starts if s < seq_len)]
    return list(zip(firsts, [*(s - 1 for s in firsts[1:]), seq_len - 1], strict=True))


def by_position(values: torch.Tensor, positions: torch.Tensor,
                buckets: Sequence[tuple[int, int]]) -> torch.Tensor:
    """(K, 2) float64: the sum and the count of `values` (float, any shape) whose `positions`
    (long, the same shape) lie in each of the K [first, last] buckets."""
    lasts = torch.tensor([last for _, last in buckets], device=positions.device)
    index = torch.bucketize(positions.reshape(-1), lasts)
    kept = index < len(buckets)
    sums = torch.zeros(len(buckets), dtype=torch.float64, device=values.device)
    sums.index_add_(0, index[kept], values.reshape(-1)[kept].double())
    counts = torch.bincount(index[kept], minlength=len(buckets)).double()
    return torch.stack([sums, counts], dim=1)


def bucket_means(totals: torch.Tensor, buckets: Sequence[tuple[int, int]],
                 scale: float = 1.0) -> str:
    """JSON {"first-last": mean * scale} of the buckets that held a value, from
    `by_position` totals."""
    return json.dumps({f"{first}-{last}": total / count * scale
                       for (first, last), (total, count) in zip(buckets, totals.tolist(),
                                                                strict=True) if count})


def evaluate(model: TransformerLM, task: Task, seq_len: int, sequences: int, tokens_per_batch: int,
             seed: int, device: torch.device, parallel: Parallel | None = None,
             buckets: Sequence[int] = ()) -> dict[str, Any]:
    """Eval-mode metrics over `sequences` held-out sequences of length `seq_len`.

    eval_loss: mean nats per answer token; accuracy: argmax hits on answer tokens (synthetic
    tasks); bits_per_byte: eval_loss in bits (text). position_loss (bits per byte for text,
    else nats) and position_accuracy (synthetic tasks): JSON of their means over the answers
    at the positions of each bucket of `position_buckets(buckets, seq_len)`, a position
    counted from its document's start in packed rows. Batches of `tokens_per_batch // seq_len`
    (at least one) sequences drawn from the validation split with a generator seeded by
    `seed` and `seq_len` only; text: the validation files packed into rows, each file a
    document (`Task.packed_batches`). With `parallel`, every sequence is split over cp (each
    dp replica evaluates the same sequences) and the sums are taken over the cp group.
    """
    sharded = parallel is not None and parallel.cp > 1
    generator = torch.Generator().manual_seed(seed + EVAL_SEED_OFFSET * seq_len)
    rows = max(1, tokens_per_batch // seq_len)
    packed = (task.packed_batches(min(rows, sequences), seq_len, generator, "validation")
              if task.is_text else None)
    spans = position_buckets(buckets, seq_len)  # they cover every position: sums of them all
    totals = torch.zeros(2, len(spans), 2, dtype=torch.float64, device=device)  # loss, hits
    done = 0
    started = time.perf_counter()
    model.eval()
    with torch.no_grad():
        while done < sequences:
            size = min(rows, sequences - done)
            batch = (task.batch(size, seq_len, generator, "validation") if packed is None
                     else next(packed).head(size))
            drawn = batch.inputs.shape[0]
            positions = token_positions(seq_len, device, 0, None if batch.document_ids is None
                                        else batch.document_ids.to(device))
            positions = positions.expand(drawn, seq_len)
            if sharded:
                batch, positions = parallel.shard(batch, rows=False), parallel.part(
                    positions, rows=False)
            logits = logits_of(model, batch, device)
            mask, targets = batch.mask.to(device), batch.targets.to(device)
            answers = logits[mask].float()
            losses = F.cross_entropy(answers, targets[mask], reduction="none")
            right = answers.argmax(-1) == targets[mask]
            for kind, values in enumerate((losses, right)):
                totals[kind] += by_position(values, positions[mask], spans)
            done += drawn
    if sharded:
        dist.all_reduce(totals, group=parallel.cp_group)
    (total_loss, count), hits = totals[0].sum(0).tolist(), totals[1, :, 0].sum().item()
    loss = total_loss / count
    metrics = {"eval_loss": loss, "eval_seconds": time.perf_counter() - started}
    if task.metric == "bits_per_byte":
        return metrics | {"bits_per_byte": bits(loss),
                          "position_loss": bucket_means(totals[0], spans, bits(1.0))}
    return metrics | {"accuracy": hits / count,
                      "position_loss": bucket_means(totals[0], spans),
                      "position_accuracy": bucket_means(totals[1], spans)}


# -- checkpoints ----------------------------------------------------------------------------


def save_checkpoint(path: str | os.PathLike, model: TransformerLM, kwargs: Mapping[str, Any],
                    task: Task, config: Mapping[str, Any]) -> None:
    """Write the weights, the model's and task's constructor arguments and the resolved config
    to `path` atomically (a temporary file in the same folder, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"format": CHECKPOINT_FORMAT, "model": model.state_dict(),
             "model_kwargs": dict(kwargs), "task": task.config(), "config": dict(config)}
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(handle)
    try:
        torch.save(state, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu",
                    ) -> tuple[TransformerLM, Task, dict[str, Any]]:
    """(model in eval mode, task, the checkpoint's dict) rebuilt from the checkpoint alone.

    A file that is missing, empty, not a torch file, not one of `save_checkpoint`, lacking
    an entry, or whose weights do not fit the model it describes is an error naming
    `ckpt=<path>` and what is wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt={path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise ValueError(f"ckpt={path}: the file is empty (0 bytes)")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # the torch loaders raise many types for a damaged file
        raise ValueError(f"ckpt={path}: not a readable torch checkpoint "
                         f"({type(error).__name__}: {error})".replace("\n", " ")) from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"ckpt={path}: not a checkpoint of experiments.train (format "
                         f"{CHECKPOINT_FORMAT!r}, got "
                         f"{state.get('format') if isinstance(state, dict) else type(state)!r})")
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(state.get(key), dict)]
    if missing:
        raise ValueError(f"ckpt={path}: lacks the entries {missing} (each a dict)")
    try:
        task_config = dict(state["task"])
        task = make_task(task_config.pop("name"), **task_config)
        model = TransformerLM(**state["model_kwargs"])
        model.load_state_dict(state["model"])
    except Exception as error:  # bad arguments, missing or misshapen weights
        raise ValueError(f"ckpt={path}: cannot rebuild its model and task "
                         f"({type(error).__name__}: {error})".replace("\n", " ")) from error
    return model.to(device).eval(), task, state


# -- the results folder ---------------------------------------------------------------------


def table(out_dir: str | Path) -> Table:
    """The results table `<out_dir>/train.csv`."""
    return Table(Path(out_dir) / CSV_NAME, COLUMNS, KEY, defaults=DEFAULTS)


def done_rows(out_dir: Path, points: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]] | None:
    """The rows already written for every one of `points`, or None if one is missing."""
    results = table(out_dir)
    wanted = [results.done(point) for point in points]
    return None if any(row is None for row in wanted) else wanted


# -- the app --------------------------------------------------------------------------------


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train and evaluate the point `cfg` describes unless done; write and log its rows.

    Returns {"rows": the rows, "status": "ok" when every row is ok (else the first failure's
    status), "skipped": True when earlier rows were reused}. Under `parallel` (cp * dp
    processes in an initialized process group) every rank runs it; only rank 0 writes and
    logs, and every rank returns the same rows.
    """
    if cfg.threads is not None and cfg.threads < 1:
        raise ValueError(f"threads must be >= 1 or null, got {cfg.threads}")
    parallel = setup_parallel(cfg)
    main = parallel is None or parallel.is_main
    out_dir = Path(cfg.out_dir)
    point = point_of(cfg)
    try:
        lengths = eval_lengths(cfg)
    except ValueError as error:
        rows = [point | {"eval_len": cfg.seq_len} | error_row(error)]
        return finish(cfg, out_dir, rows, None)
    points = [point | {"eval_len": length} for length in lengths]
    earlier = done_rows(out_dir, points) if main else None
    if parallel is not None:
        earlier = parallel.from_main(earlier)
    if earlier is not None and (all(r["status"] == "ok" for r in earlier)
                                or not cfg.retry_failed):
        if main:
            log.info("skip %s %s-n%s: done in %s", point["task"], point["attention"],
                     point["seq_len"], out_dir / CSV_NAME)
        return {"rows": earlier, "status": overall(earlier), "skipped": True}
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    name = f"{point['task']}-{point['attention']}-n{cfg.seq_len}" + "-packed" * cfg.packing
    wandb_run = (start_run(cfg.logger, name=name, group=cfg.sweep_name, job_type="train",
                           dir=cfg.out_dir, config=plain(cfg)) if main else NullRun())
    common: dict[str, Any] = {}
    try:
        device = check_device(cfg.device)
        common |= environment(device)
        task = make_task(cfg.task.name, **task_params(cfg))
        task.check_length(cfg.seq_len)
        kwargs = model_kwargs(cfg, task)
        torch.manual_seed(cfg.seed)  # weights, and the variants' own randomness (LSH)
        # Every rank draws the same weights (on the CPU, from the seed), as one process would.
        cp_group = parallel.cp_group if parallel is not None and parallel.cp > 1 else None
        model = TransformerLM(**kwargs, context_parallel=cp_group).to(device)
        common["n_params"] = sum(p.numel() for p in model.parameters())
        common |= train_model(cfg, task, model, device, wandb_run, parallel)
        if cfg.checkpoint and main:
            save_checkpoint(cfg.checkpoint, model, kwargs, task, plain(cfg))
    except Exception as error:  # a failing point is a row per eval length; the sweep goes on
        log.error("%s %s-n%s failed: %s", point["task"], point["attention"], cfg.seq_len,
                  error)
        rows = [p | common | error_row(error) for p in points]
        return finish(cfg, out_dir, rows, wandb_run)
    rows = []
    for p in points:
        try:
            metrics = evaluate(model, task, p["eval_len"], cfg.eval_sequences,
                               cfg.tokens_per_step, cfg.seed, device, parallel,
                               cfg.position_buckets)
            rows.append(p | common | metrics | {"status": "ok", "error": ""})
        except Exception as error:  # e.g. an eval length too short for the task
            log.error("eval at %s failed: %s", p["eval_len"], error)
            rows.append(p | common | error_row(error))
    return finish(cfg, out_dir, rows, wandb_run)


def overall(rows: Sequence[Mapping[str, Any]]) -> str:
    return next((str(r["status"]) for r in rows if r["status"] != "ok"), "ok")


def finish(cfg: DictConfig, out_dir: Path, rows: list[dict[str, Any]],
           wandb_run: Any) -> dict[str, Any]:
    """Write the rows (rank 0 alone under parallel), log them to the W&B run (if any) and
    close it."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        table(out_dir).append(rows)
    if wandb_run is not None:
        for row in rows:
            prefix = f"eval/{row['eval_len']}"
            numbers = {f"{prefix}/{metric}": row[metric] for metric in METRICS
                       if metric.startswith(("eval_", "accuracy", "bits_"))
                       and isinstance(row.get(metric), (int, float))}
            wandb_run.log(numbers)
            wandb_run.summary[f"{prefix}/status"] = row["status"]
        wandb_run.summary["train/status"] = overall(rows)
        wandb_run.finish()
    return {"rows": rows, "status": overall(rows), "skipped": False}


class QualityProgress(SweepProgress):
    """Hydra callback: a progress line per point of a multirun, the quality report at the end."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        print(report.run([config.out_dir], speed=config.speed_dir).text, flush=True)


register_configs()


@hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> dict[str, Any]:
    with process_group(cfg.device):
        result = run(cfg)
        quiet = dist.is_initialized() and dist.get_rank() != 0
    if quiet:
        return result
    columns = ("task", "attention", "packing", "seq_len", "eval_len", "status", "accuracy",
               "bits_per_byte", "eval_loss", "train_loss", "train_seconds")
    frame = pd.DataFrame(result["rows"])
    print(text_table(frame[[c for c in columns if c in frame]]), flush=True)
    for row in result["rows"]:
        if row["status"] != "ok":
            print(f"error at eval_len={row['eval_len']}: {row['error']}", flush=True)
    return result


if __name__ == "__main__":
    main()
