"""experiments.train end to end, in process: rows, W&B offline, checkpoints, resume, failures."""

from __future__ import annotations

import csv
import json
import math

import pandas as pd
import pytest
import torch
import wandb
from hydra import compose, initialize_config_dir

from attn_zoo.documents import positions_in_document
from experiments import results, train
from experiments.config import register_configs
from experiments.tasks import Task, make_task
from experiments.wandb_logger import read_offline_run
from tests.test_conf import CONF
from tests.test_tasks import write_corpus

TINY = ["model.dim=16", "model.depth=2", "model.heads=2", "seq_len=32", "steps=3",
        "tokens_per_step=64", "eval_sequences=4", "warmup_steps=1", "threads=1",
        "task.vocab_size=20", "task.n_pairs=4"]


def composed(*overrides: str, config: str = "train", hydra: bool = False):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config, overrides=list(overrides), return_hydra_config=hydra)


@pytest.fixture
def tiny(tmp_path):
    def make(*overrides: str, logger: str = "none"):
        return composed(*TINY, f"out_dir={tmp_path}", f"logger={logger}", *overrides)
    return make


def test_a_point_writes_rows_logs_wandb_and_a_checkpoint_that_rebuilds_the_model(tiny, tmp_path):
    cfg = tiny("attention=local", "attention.window=8", "eval_lens=[32,64]", logger="wandb")
    result = train.run(cfg)
    assert result["status"] == "ok" and not result["skipped"]
    rows = pd.read_csv(tmp_path / "train.csv")
    assert rows["eval_len"].tolist() == [32, 64]  # 64 > the training length: extrapolation
    assert (rows["status"] == "ok").all() and (rows["seq_len"] == 32).all()
    assert rows["accuracy"].between(0, 1).all() and rows["n_params"].iloc[0] > 0
    assert rows["params"].iloc[0] == '{"scale": null, "window": 8}'
    # The checkpoint alone rebuilds the trained model: its evaluation repeats the rows'.
    model, task, state = train.load_checkpoint(cfg.checkpoint)
    assert state["config"]["attention"]["name"] == "local"
    assert state["model_kwargs"]["attention_params"]["window"] == 8
    for length, row in zip((32, 64), rows.itertuples(), strict=True):
        metrics = train.evaluate(model, task, length, 4, 64, 0, torch.device("cpu"))
        assert metrics["eval_loss"] == pytest.approx(row.eval_loss, rel=1e-5)
        assert metrics["accuracy"] == pytest.approx(row.accuracy)
    wandb.teardown()  # flushes the offline run file
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    logged = read_offline_run(run_dir)
    assert logged["job_type"] == "train" and logged["name"] == "mqar-local-n32"
    assert logged["config"]["task"]["name"] == "mqar"
    assert logged["summary"]["eval/64/accuracy"] == pytest.approx(rows["accuracy"].iloc[1])
    assert "train/loss" in logged["summary"]


def test_checkpoint_round_trip_gives_the_same_logits(tmp_path):
    task = make_task("mqar", vocab_size=20, n_pairs=2)
    kwargs = {"vocab_size": 20, "dim": 16, "depth": 1, "heads": 2, "attention": "hierarchical",
              "attention_params": {"block": 4, "window_blocks": 1}, "max_seq_len": 32}
    torch.manual_seed(0)
    model = train.TransformerLM(**kwargs).eval()
    train.save_checkpoint(tmp_path / "m.pt", model, kwargs, task, {"seed": 0})
    again, task_again, _ = train.load_checkpoint(tmp_path / "m.pt")
    tokens = torch.randint(0, 20, (2, 29))
    torch.testing.assert_close(again(tokens), model(tokens), rtol=0, atol=0)
    assert task_again == task
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temporary file left


def test_runs_are_deterministic_and_resume(tiny, tmp_path):
    first = train.run(tiny("attention=lsh", "attention.bucket_size=8", "checkpoint=null"))
    again = train.run(tiny("attention=lsh", "attention.bucket_size=8", "checkpoint=null",
                           f"out_dir={tmp_path / 'again'}"))
    assert first["rows"][0]["train_loss"] == again["rows"][0]["train_loss"]
    assert first["rows"][0]["eval_loss"] == again["rows"][0]["eval_loss"]
    skipped = train.run(tiny("attention=lsh", "attention.bucket_size=8", "checkpoint=null"))
    assert skipped["skipped"] and skipped["status"] == "ok"
    assert len(pd.read_csv(tmp_path / "train.csv")) == 1


TOO_MANY_PAIRS = ["task.n_pairs=16", "task.vocab_size=40"]  # 16 pairs and a query: 33 > 32


def test_a_failing_point_is_a_row_and_the_next_point_runs(tiny, tmp_path):
    bad = train.run(tiny(*TOO_MANY_PAIRS, "checkpoint=null"))
    assert bad["status"] == "unsupported" and "seq_len" in bad["rows"][0]["error"]
    good = train.run(tiny("attention=sparse_fixed", "attention.stride=8", "attention.summary=2",
                          "checkpoint=null"))
    assert good["status"] == "ok"
    rows = pd.read_csv(tmp_path / "train.csv")
    assert rows["status"].tolist() == ["unsupported", "ok"]
    # A failed point is not retried unless asked.
    assert train.run(tiny(*TOO_MANY_PAIRS, "checkpoint=null"))["skipped"]
    assert not train.run(tiny(*TOO_MANY_PAIRS, "checkpoint=null", "retry_failed=true"))[
        "skipped"]


def test_an_eval_length_that_does_not_fit_fails_alone(tiny):
    result = train.run(tiny("checkpoint=null", "eval_lens=[8,32]"))
    statuses = [row["status"] for row in result["rows"]]
    assert statuses == ["unsupported", "ok"] and result["status"] == "unsupported"


def test_a_model_learns_a_small_mqar(tiny):
    cfg = tiny("checkpoint=null", "task.vocab_size=10", "task.n_pairs=2", "seq_len=16",
               "model.dim=32", "steps=150", "tokens_per_step=256", "lr=1e-2",
               "warmup_steps=10", "eval_sequences=64")
    row = train.run(cfg)["rows"][0]
    # chance: log(5 values) = 1.61 nats; an untrained model is near log(10) = 2.30
    assert row["train_loss"] < 0.9 * math.log(5)
    assert row["accuracy"] > 0.5


TOPK = ["attention=topk", "attention.top_k=4", "attention.index_heads=2",
        "attention.index_dim=4", "steps=4"]


def test_the_indexer_loss_trains_only_through_its_weight_and_is_a_column(tiny, tmp_path):
    """topk's indexer learns from `aux_loss_weight` times its loss alone: at weight 0 its
    weights keep their initial values, at 1 they move; the loss is logged either way."""
    index = {}
    for weight in (0.0, 1.0):
        cfg = tiny(*TOPK, f"aux_loss_weight={weight}", f"checkpoint={tmp_path}/{weight}.pt")
        row = train.run(cfg)["rows"][0]
        assert row["status"] == "ok" and row["aux_loss_weight"] == weight
        assert 0 < row["aux_loss"] < math.inf
        model, _, state = train.load_checkpoint(cfg.checkpoint)
        index[weight] = {name: p for name, p in model.named_parameters() if ".index_" in name}
    torch.manual_seed(0)  # the run's seed: the initial weights
    initial = dict(train.TransformerLM(**state["model_kwargs"]).named_parameters())
    assert len(index[0.0]) == 6  # index_q, index_w, index_k in each of the two layers
    for name, trained in index[0.0].items():
        assert torch.equal(trained, initial[name])
        assert not torch.equal(index[1.0][name], initial[name])
    assert train.table(tmp_path).read()["aux_loss_weight"].tolist() == [0.0, 1.0]
    local = train.run(tiny("checkpoint=null", "attention=local", "attention.window=8"))
    assert local["rows"][0]["aux_loss"] is None  # no variant loss: an empty column


def test_a_negative_aux_loss_weight_is_an_error_row(tiny):
    result = train.run(tiny(*TOPK, "checkpoint=null", "aux_loss_weight=-1"))
    assert "aux_loss_weight must be finite and >= 0, got -1.0" in result["rows"][0]["error"]


def test_bad_budget_is_an_error_row(tiny):
    result = train.run(tiny("checkpoint=null", "tokens_per_step=16"))
    assert result["status"] == "unsupported" and "tokens_per_step" in result["rows"][0]["error"]


def test_a_curriculum_trains_its_first_steps_at_its_length(tiny, monkeypatch):
    drawn = []
    batch = Task.batch

    def recording(task, batch_size, seq_len, generator, split="train"):
        if split == "train":
            drawn.append((batch_size, seq_len))
        return batch(task, batch_size, seq_len, generator, split)

    monkeypatch.setattr(Task, "batch", recording)
    result = train.run(tiny("checkpoint=null", "steps=5", "curriculum_steps=3",
                            "curriculum_len=16"))
    row = result["rows"][0]
    assert drawn == [(4, 16)] * 3 + [(2, 32)] * 2  # 64 tokens a step either way
    assert row["train_tokens"] == 5 * 64
    assert (row["curriculum_steps"], row["curriculum_len"]) == (3, 16)  # part of the key


@pytest.mark.parametrize("overrides, parameter", [
    (["curriculum_steps=3"], "curriculum_steps"),  # not below steps=3
    (["curriculum_steps=-1"], "curriculum_steps"),
    (["curriculum_steps=1", "curriculum_len=0"], "curriculum_len"),
    (["curriculum_steps=1", "curriculum_len=65"], "curriculum_len"),  # > tokens_per_step
])
def test_a_bad_curriculum_is_an_error_row_naming_it(tiny, overrides, parameter):
    result = train.run(tiny("checkpoint=null", *overrides))
    assert result["status"] != "ok" and f"{parameter} must be" in result["rows"][0]["error"]


def test_position_buckets_split_the_length_and_bad_ones_are_named():
    assert train.position_buckets([64, 256, 1024], 2048) == [(0, 63), (64, 255), (256, 1023),
                                                             (1024, 2047)]
    assert train.position_buckets([64, 256, 1024], 100) == [(0, 63), (64, 99)]
    assert train.position_buckets([], 10) == [(0, 9)]
    for bad in ([256, 64], [0], [64, 64], [2.5]):
        with pytest.raises(ValueError, match="position_buckets"):
            train.position_buckets(bad, 100)


def test_by_position_sums_and_counts_each_bucket():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    positions = torch.tensor([0, 3, 4, 9, 12])  # 12 lies past the last bucket
    buckets = [(0, 3), (4, 9), (10, 11)]
    totals = train.by_position(values, positions, buckets)
    assert totals.tolist() == [[3.0, 2.0], [7.0, 2.0], [0.0, 0.0]]
    # means scaled, the empty bucket left out
    assert json.loads(train.bucket_means(totals, buckets, 2.0)) == {"0-3": 3.0, "4-9": 7.0}


def test_evaluate_splits_its_metrics_by_position():
    task = make_task("mqar", vocab_size=20, n_pairs=4)
    torch.manual_seed(0)
    model = train.TransformerLM(20, 16, 1, 2, max_seq_len=32)
    metrics = train.evaluate(model, task, 32, 8, 256, 0, torch.device("cpu"), buckets=[16])
    accuracy = json.loads(metrics["position_accuracy"])
    loss = json.loads(metrics["position_loss"])
    assert list(accuracy) == list(loss) == ["0-15", "16-31"]
    # the answers sit at positions 8 .. 31: 8 of a row's in the first bucket, 16 in the second
    assert (8 * accuracy["0-15"] + 16 * accuracy["16-31"]) / 24 == pytest.approx(
        metrics["accuracy"])
    assert (8 * loss["0-15"] + 16 * loss["16-31"]) / 24 == pytest.approx(metrics["eval_loss"])


def test_learning_rate_warms_up_then_decays_to_a_tenth(tiny):
    cfg = tiny("steps=100", "warmup_steps=10", "lr=1.0")
    rates = [train.learning_rate(step, cfg) for step in range(100)]
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)
    assert rates[-1] == pytest.approx(0.1, abs=1e-3) and max(rates) == pytest.approx(1.0)


@pytest.mark.parametrize("task", ["mqar", "needle", "selective_copy", "stdlib_lm"])
@pytest.mark.parametrize("model", ["tiny", "small"])
def test_train_configs_compose(task, model):
    cfg = composed(f"task={task}", f"model={model}", "logger=none")
    assert cfg.task.name == task and cfg.model.name == model
    make_task(cfg.task.name, **train.task_params(cfg))


def test_quality_sweep_config_composes():
    cfg = composed(config="quality", hydra=True)
    params = cfg.hydra.sweeper.params
    assert params.attention == "glob(*)" and params.task == "mqar,needle"
    assert params.seq_len == "512,2048" and cfg.model.name == "tiny_conv"
    assert cfg.model.short_conv == 4 and 0 < cfg.curriculum_steps < cfg.steps
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher") and cfg.threads == 1
    assert cfg.checkpoint is None and cfg.logger.name == "none"


def test_position_sweep_config_composes():
    cfg = composed(config="position", hydra=True)
    assert cfg.hydra.sweeper.params.attention == "glob(*)"
    assert cfg.task.name == "stdlib_lm" and cfg.seq_len == 2048
    assert list(cfg.position_buckets) == [64, 256, 1024] and cfg.model.name == "tiny_conv"
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher") and cfg.threads == 1
    assert cfg.checkpoint is None and cfg.out_dir == "results/cpu/position"


def raw(path) -> list[dict[str, str]]:
    """The CSV's records as text, exactly as stored."""
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("commit", ["1234e56", "0123456"])
def test_a_commit_that_looks_like_a_number_stays_text(tiny, tmp_path, monkeypatch, commit):
    monkeypatch.setattr(results, "git_commit", lambda: commit)
    train.run(tiny("checkpoint=null"))
    train.run(tiny("checkpoint=null", "attention=local", "attention.window=8"))  # next write
    assert [row["commit"] for row in raw(tmp_path / "train.csv")] == [commit, commit]
    assert list(train.table(tmp_path).read()["commit"]) == [commit, commit]


def test_a_malformed_line_is_quarantined_and_the_sweep_goes_on(tiny, tmp_path):
    train.run(tiny("checkpoint=null"))
    with open(tmp_path / "train.csv", "a") as handle:
        handle.write("full,{},tiny\n")  # a line cut short
    with pytest.warns(UserWarning, match=r"train\.csv: line 3: 3 fields"):
        result = train.run(tiny("checkpoint=null", "attention=local", "attention.window=8"))
    assert result["status"] == "ok" and not result["skipped"]
    assert (tmp_path / "train.csv.bad").read_text() == "full,{},tiny\n"
    assert [row["attention"] for row in raw(tmp_path / "train.csv")] == ["full", "local"]
    # The first point is still done: its row survived the quarantine.
    assert train.run(tiny("checkpoint=null"))["skipped"]


def test_a_sweep_whose_every_point_failed_gets_its_report(tiny, tmp_path, capsys):
    cfg = tiny(*TOO_MANY_PAIRS, "checkpoint=null")
    train.run(cfg)
    train.QualityProgress().on_multirun_end(cfg)  # the end of a sweep
    assert "failed and skipped points:" in capsys.readouterr().out
    md = (tmp_path / "report.md").read_text()
    assert "* full N=32 eval 32: unsupported: ValueError: " in md


def test_zero_threads_is_an_error_before_anything_runs(tiny, tmp_path):
    with pytest.raises(ValueError, match="threads must be >= 1 or null, got 0"):
        train.run(tiny("threads=0"))
    assert not (tmp_path / "train.csv").exists()


@pytest.fixture
def text(tmp_path):
    """A tiny stdlib_lm point on a small corpus: overrides -> its composed config."""
    corpus = write_corpus(tmp_path / "corpus")

    def make(*overrides: str):
        return composed(*[o for o in TINY if not o.startswith("task.")], "task=stdlib_lm",
                        f"task.root={corpus}", "task.val_fraction=0.25", f"out_dir={tmp_path}",
                        "logger=none", *overrides)
    return make


def test_packed_and_unpacked_text_points_train_equal_tokens_and_share_the_evaluation(
        text, tmp_path):
    packed = train.run(text("packing=true"))
    plain = train.run(text())
    assert packed["status"] == plain["status"] == "ok"
    written = train.table(tmp_path).read()
    assert written["packing"].tolist() == [True, False]
    assert written["train_tokens"].tolist() == [3 * 64, 3 * 64]
    assert written["bits_per_byte"].between(0, 16).all()
    # Both layouts' checkpoints are kept, and each is a done point of its own.
    assert (tmp_path / "checkpoints" / "stdlib_lm-full-n32-packed.pt").is_file()
    assert (tmp_path / "checkpoints" / "stdlib_lm-full-n32.pt").is_file()
    assert train.run(text("packing=true"))["skipped"]
    # The evaluation is the held-out files packed into rows, whichever layout trained.
    model, task, _ = train.load_checkpoint(tmp_path / "checkpoints" / "stdlib_lm-full-n32.pt")
    metrics = train.evaluate(model, task, 32, 4, 64, 0, torch.device("cpu"))
    assert metrics["bits_per_byte"] == pytest.approx(written["bits_per_byte"].iloc[1], rel=1e-5)


def test_packed_training_gives_the_model_the_rows_documents(text, monkeypatch):
    seen = []
    forward = train.TransformerLM.forward

    def recording(model, tokens, **options):
        seen.append(options["document_ids"])
        return forward(model, tokens, **options)

    monkeypatch.setattr(train.TransformerLM, "forward", recording)
    train.run(text("packing=true", "checkpoint=null", "steps=20"))
    assert len(seen) == 20 + 2  # the steps, then two evaluation batches
    assert all(ids.shape == (2, 32) for ids in seen)
    assert any(ids[:, 1:].ne(ids[:, :-1]).any() for ids in seen)  # a row of two documents


def test_text_positions_count_from_each_documents_start(text, monkeypatch):
    cfg = text()
    train.run(cfg)
    model, task, _ = train.load_checkpoint(cfg.checkpoint)
    seen, read = [], []
    logits_of, by_position = train.logits_of, train.by_position

    def recording_logits(model, batch, device):
        seen.append(batch)
        return logits_of(model, batch, device)

    def recording_positions(values, positions, buckets):
        read.append(positions)
        return by_position(values, positions, buckets)

    monkeypatch.setattr(train, "logits_of", recording_logits)
    monkeypatch.setattr(train, "by_position", recording_positions)
    metrics = train.evaluate(model, task, 256, 4, 1024, 0, torch.device("cpu"), buckets=[8])
    (batch,) = seen
    expected = positions_in_document(batch.document_ids)[batch.mask]
    assert torch.equal(read[0], expected) and torch.equal(read[1], expected)  # loss, hits
    assert batch.document_ids[:, 1:].ne(batch.document_ids[:, :-1]).any()  # a boundary
    assert set(json.loads(metrics["position_loss"])) == {"0-7", "8-255"}


def test_packing_a_task_without_documents_is_an_error_row(tiny):
    result = train.run(tiny("packing=true", "checkpoint=null"))
    assert result["status"] == "unsupported"
    assert "packing needs a task made of documents (stdlib_lm), got mqar" in result["rows"][0][
        "error"]


def test_rows_written_before_the_packing_column_are_unpacked_done_points(tiny, tmp_path):
    train.run(tiny("checkpoint=null"))
    rows = pd.read_csv(tmp_path / "train.csv").drop(columns="packing")
    rows.to_csv(tmp_path / "train.csv", index=False)
    assert train.run(tiny("checkpoint=null"))["skipped"]
    assert train.table(tmp_path).read()["packing"].tolist() == [False]
