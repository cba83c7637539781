"""Training under data + context parallelism (experiments.train `parallel`, TransformerLM
`context_parallel`) on gloo: the same losses and weights as one process on the same batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.distributed as dist
from hydra import compose, initialize_config_dir

from attn_zoo.model import TransformerLM
from experiments import train
from experiments.config import register_configs
from experiments.parallel import run_ranks
from experiments.tasks import make_task
from experiments.wandb_logger import NullRun

ROOT = Path(__file__).resolve().parent.parent
# Two steps of a 2-layer model on 2 sequences of 32 tokens (shards of 16; of 14 and 13 when
# evaluating 27), one variant per scheme: causal `local` (gather) with a band crossing the
# shard boundary, GQA and learned positions (which count from the shard's start), `full`
# (ring) and `topk` (heads; its indexer loss trains its indexer weights) with RoPE.
TINY = ["model.dim=16", "model.depth=2", "model.heads=2", "seq_len=32", "steps=2",
        "tokens_per_step=64", "eval_sequences=4", "warmup_steps=1", "log_every=1", "threads=1",
        "logger=none", "checkpoint=null"]
MQAR = ["task.vocab_size=20", "task.n_pairs=4"]
ATTENTIONS = {"local": ["attention.window=6", "model.kv_heads=1", "model.pos=learned"],
              "full": [], "topk": ["attention.top_k=4", "attention.index_dim=4"]}


class Losses(NullRun):
    """Records every logged training loss."""

    def __init__(self) -> None:
        super().__init__()
        self.losses: list[float] = []

    def log(self, metrics) -> None:
        self.losses.append(metrics["train/loss"])


def _config(attention: str, cp: int, dp: int, *overrides: str, task: str = "mqar"):
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", [*TINY, *(MQAR if task == "mqar" else []), f"task={task}",
                                 f"attention={attention}", *ATTENTIONS.get(attention, []),
                                 f"parallel.cp={cp}", f"parallel.dp={dp}", *overrides])


def _trained(cfg, parallel: train.Parallel | None) -> tuple[list[float], float, dict]:
    """Two float64 training steps: (logged losses, train_loss, final weights)."""
    task = make_task(cfg.task.name, **train.task_params(cfg))
    group = parallel.cp_group if parallel is not None and parallel.cp > 1 else None
    torch.manual_seed(cfg.seed)
    model = TransformerLM(**train.model_kwargs(cfg, task), context_parallel=group).double()
    logger = Losses()
    result = train.train_model(cfg, task, model, torch.device("cpu"), logger, parallel)
    return logger.losses, result["train_loss"], {k: v.clone() for k, v in
                                                  model.state_dict().items()}


def _compare(parallel: train.Parallel, attentions: list[str]) -> dict[str, tuple]:
    """Per attention: (parallel run, one-process run) on this rank."""
    return {attention: (_trained(_config(attention, parallel.cp, parallel.dp), parallel),
                        _trained(_config(attention, 1, 1), None)) for attention in attentions}


def _errors(parallel: train.Parallel) -> dict[str, str]:
    """The message of each bad configuration at world size 2 (`parallel`: cp=2)."""
    cases = {"world": _config("local", 1, 1), "world_dp": _config("local", 1, 4),
             "text": _config("local", 2, 1, task="stdlib_lm"),
             "packing": _config("local", 2, 1, "packing=true"),
             "rows": _config("local", 1, 2, "tokens_per_step=96")}
    messages = {}
    for name, cfg in cases.items():
        with pytest.raises(ValueError) as error:
            train.setup_parallel(cfg)
        messages[name] = str(error.value)
    model = TransformerLM(20, 16, 1, 2, attention="local", attention_params={"window": 4},
                          context_parallel=parallel.cp_group)
    tokens = torch.zeros(1, 5, dtype=torch.long)
    for name, call in (("generate", lambda: model.generate(tokens, 2)),
                       ("documents", lambda: model(tokens, document_ids=tokens)),
                       ("short", lambda: parallel.shard(train.Batch(tokens[:, :1], tokens[:, :1],
                                                                    tokens[:, :1].bool())))):
        with pytest.raises(ValueError) as error:
            call()
        messages[name] = str(error.value)
    return messages


def _world2() -> dict:
    """Every case on one rank of two (one spawn: starting ranks costs more than the cases)."""
    context = train.setup_parallel(_config("local", 2, 1))
    data = train.setup_parallel(_config("local", 1, 2))
    return {"context": _compare(context, list(ATTENTIONS)), "data": _compare(data, ["local"]),
            "errors": _errors(context), "rank": dist.get_rank()}


@pytest.fixture(scope="module")
def world2() -> list[dict]:
    return run_ranks(2, _world2)


def _check_runs(results: list[dict], kind: str) -> None:
    for result in results:
        for attention, ((losses, tail, weights), (ref_losses, ref_tail, ref_weights)) in \
                result[kind].items():
            if result["rank"] == 0:
                assert len(losses) == 2
                assert losses == pytest.approx(ref_losses, rel=1e-12, abs=0), attention
            assert tail == pytest.approx(ref_tail, rel=1e-12, abs=0), attention
            for name, tensor in weights.items():
                torch.testing.assert_close(tensor, ref_weights[name], rtol=1e-10, atol=1e-12,
                                           msg=lambda m, n=name, a=attention: f"{a} {n}: {m}")


def test_context_parallel_training_equals_one_process(world2):
    _check_runs(world2, "context")


def test_data_parallel_training_equals_one_process(world2):
    _check_runs(world2, "data")


def test_bad_parallel_configurations_are_clear_errors(world2):
    errors = world2[0]["errors"]
    assert "parallel.cp * parallel.dp (1 * 1) must equal" in errors["world"]
    assert "(1 * 4)" in errors["world_dp"] and "torchrun --nproc_per_node=4" in errors["world_dp"]
    assert "task=stdlib_lm" in errors["text"]
    assert "packing=True" in errors["packing"]
    assert "parallel.dp=2 must divide" in errors["rows"] and "= 3" in errors["rows"]
    assert "generate is not supported under context parallelism" in errors["generate"]
    assert "document_ids must be None under context parallelism" in errors["documents"]
    assert "parallel.cp=2 shards" in errors["short"]


def test_torchrun_runs_a_context_parallel_point_that_matches_one_process(tmp_path):
    """`torchrun -m experiments.train parallel.cp=2` on gloo: rank 0 alone writes the rows
    and the checkpoint and prints the table; the rows equal one process's."""
    point = [*TINY, *MQAR, "attention=local", *ATTENTIONS["local"], "eval_lens=[32,27]"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", "-m", "experiments.train", *point, "parallel.cp=2",
               f"out_dir={tmp_path / 'cp'}", f"checkpoint={tmp_path / 'model.pt'}"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("eval_loss") == 1  # one table: rank 1 is silent
    rows = pd.read_csv(tmp_path / "cp" / train.CSV_NAME).sort_values("eval_len")
    assert list(rows["eval_len"]) == [27, 32] and set(rows["status"]) == {"ok"}
    model, _, _ = train.load_checkpoint(tmp_path / "model.pt")
    assert model.context_parallel is None
    alone = train.run(_config("local", 1, 1, f"out_dir={tmp_path / 'one'}",
                              "eval_lens=[32,27]"))["rows"]
    for metric in ("train_loss", "eval_loss", "accuracy"):
        assert list(rows[metric]) == pytest.approx(
            [row[metric] for row in sorted(alone, key=lambda row: row["eval_len"])],
            rel=1e-5), metric


def test_a_model_group_must_be_a_process_group():
    with pytest.raises(TypeError, match="context_parallel must be a torch.distributed"):
        TransformerLM(20, 16, 1, 2, context_parallel="world")


SBATCH = ROOT / "conf" / "slurm" / "train_cp.sbatch"


def _sbatch(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """The recipe run as SLURM would on a node, with srun, scontrol and torchrun stubbed (in
    tmp_path/bin) to record their arguments in tmp_path."""
    stubs = {"srun": 'for a in "$@"; do case $a in --*) echo "$a" >> "$LOG/srun";; *) break;; '
                     'esac; shift; done; exec "$@"',
             "scontrol": "echo node7; echo node8",
             "torchrun": 'printf "%s\\n" "$@" > "$LOG/torchrun"'}
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "LOG": str(tmp_path),
           "SLURM_JOB_NODELIST": "node[7-8]", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_JOB_ID": "123"} | env
    return subprocess.run(["bash", str(SBATCH), *args], env=env, capture_output=True,
                          text=True, timeout=30)


def test_the_slurm_recipe_runs_the_documented_torchrun_on_every_node(tmp_path):
    lines = SBATCH.read_text().splitlines()
    first_command = next(i for i, line in enumerate(lines[1:], 1)
                         if line.strip() and not line.startswith("#"))
    directives = [i for i, line in enumerate(lines) if line.startswith("#SBATCH")]
    assert directives and max(directives) < first_command  # sbatch reads them all
    done = _sbatch(tmp_path, {"SLURM_GPUS_ON_NODE": "4"}, "parallel.cp=4", "parallel.dp=2")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "srun").read_text().split() == ["--ntasks-per-node=1"]
    assert (tmp_path / "torchrun").read_text().split("\n")[:-1] == [
        "--nnodes=2", "--nproc_per_node=4", "--rdzv_id=123", "--rdzv_backend=c10d",
        "--rdzv_endpoint=node7:29500", "-m", "experiments.train", "device=cuda",
        "parallel.cp=4", "parallel.dp=2"]
    done = _sbatch(tmp_path, {"NPROC_PER_NODE": "2", "MASTER_PORT": "4000"})
    assert done.returncode == 0, done.stderr
    assert "--nproc_per_node=2" in (tmp_path / "torchrun").read_text().split()
    assert "--rdzv_endpoint=node7:4000" in (tmp_path / "torchrun").read_text().split()


def test_the_slurm_recipe_without_gpus_per_node_says_so(tmp_path):
    done = _sbatch(tmp_path, {})
    assert done.returncode != 0 and "set --gpus-per-node or NPROC_PER_NODE" in done.stderr
    assert not (tmp_path / "torchrun").exists()
