"""experiments.generate: streams bytes from a checkpoint alone, through the KV cache."""

from __future__ import annotations

import io
import re

import pytest
import torch

from experiments import generate, train
from experiments.tasks import make_task
from tests.test_tasks import corpus  # noqa: F401  (fixture)
from tests.test_train import TINY, composed


class CountingOut(io.StringIO):
    """A text stream that counts flushes."""

    flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


@pytest.fixture
def text_checkpoint(tmp_path, corpus):  # noqa: F811
    cfg = composed(*TINY[:-2], "task=stdlib_lm", f"task.root={corpus}", "attention=local",
                   "attention.window=8", "logger=none", f"out_dir={tmp_path / 'run'}")
    assert train.run(cfg)["status"] == "ok"
    return cfg.checkpoint


def test_streams_the_requested_number_of_bytes(text_checkpoint):
    out = CountingOut()
    new = generate.stream(text_checkpoint, "def f", 24, temperature=0, out=out)
    assert new.numel() == 24 and out.flushes >= 24  # one flush per byte at least
    model, task, _ = train.load_checkpoint(text_checkpoint)
    assert out.getvalue() == "def f" + task.decode(new) + "\n"
    # Streaming through the cache gives what greedy decoding by full forward passes gives.
    tokens = task.encode("def f")[None]
    with torch.no_grad():
        for _ in range(24):
            tokens = torch.cat([tokens, model(tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(new, tokens[0, 5:])


def test_sampling_is_seeded(text_checkpoint):
    runs = [generate.stream(text_checkpoint, "import ", 16, temperature=0.8, top_k=20, seed=s,
                            out=io.StringIO()) for s in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_missing_checkpoint_and_non_text_task(tmp_path):
    with pytest.raises(FileNotFoundError, match="ckpt="):
        generate.stream(tmp_path / "none.pt", "x", 4)
    task = make_task("mqar", vocab_size=20, n_pairs=2)
    kwargs = {"vocab_size": 20, "dim": 16, "depth": 1, "heads": 2, "attention": "full"}
    train.save_checkpoint(tmp_path / "mqar.pt", train.TransformerLM(**kwargs), kwargs, task, {})
    with pytest.raises(ValueError, match="'mqar' task"):
        generate.stream(tmp_path / "mqar.pt", "x", 4)


@pytest.mark.parametrize("options,error,message", [
    ({"prompt": ""}, ValueError, "prompt must be a non-empty string"),
    ({"temperature": -1.0}, ValueError, "temperature must be >= 0"),
    ({"temperature": "hot"}, TypeError, "temperature must be a number \\(0: greedy\\), got 'hot'"),
    ({"top_k": 0}, ValueError, "top_k must be an int >= 1, got 0"),
    ({"top_k": "5"}, TypeError, "top_k must be an int or None, got '5'"),
    ({"top_k": "5", "temperature": 0}, TypeError, "top_k must be an int or None"),
    ({"top_p": 2.0}, ValueError, "top_p must be in"),
    ({"max_new_tokens": -3}, ValueError, "max_new_tokens must be an int >= 0, got -3"),
    ({"max_new_tokens": 1.5}, TypeError, "max_new_tokens must be an int, got 1.5"),
    ({"seed": "one"}, TypeError, "seed must be an int, got 'one'"),
])
def test_bad_arguments_fail_before_the_checkpoint_is_read(tmp_path, options, error, message):
    arguments = {"prompt": "x", "max_new_tokens": 4} | options
    # The checkpoint does not exist: the argument's error must come first.
    with pytest.raises(error, match=message):
        generate.stream(tmp_path / "none.pt", **arguments)


def damaged(path, kind: str, checkpoint=None):
    """Write a damaged checkpoint of `kind` to `path`; returns what its error must say."""
    if kind == "empty":
        path.write_bytes(b"")
        return "the file is empty"
    if kind == "random bytes":
        path.write_bytes(bytes(torch.randint(0, 256, (4096,),
                                             generator=torch.Generator().manual_seed(0)).tolist()))
        return "not a readable torch checkpoint"
    state = torch.load(checkpoint, weights_only=True)
    if kind == "lacking keys":
        del state["model_kwargs"], state["task"]
        message = r"lacks the entries \['model_kwargs', 'task'\]"
    elif kind == "other format":
        state = {"weights": state["model"]}
        message = "not a checkpoint of experiments.train"
    else:  # lacking weights
        state["model"].pop("embedding.weight")
        message = "cannot rebuild its model and task .*embedding.weight"
    torch.save(state, path)
    return message


@pytest.mark.parametrize("kind", ["empty", "random bytes", "lacking keys", "other format",
                                  "lacking weights"])
def test_a_damaged_checkpoint_names_ckpt_and_what_is_wrong(text_checkpoint, tmp_path, kind):
    path = tmp_path / "bad.pt"
    message = damaged(path, kind, text_checkpoint)
    with pytest.raises(ValueError, match=f"ckpt={re.escape(str(path))}: {message}"):
        train.load_checkpoint(path)
    with pytest.raises(ValueError, match="ckpt="):
        generate.stream(path, "x", 4, out=io.StringIO())


def test_command_line_takes_any_prompt(text_checkpoint, capsys):
    generate.main([f"ckpt={text_checkpoint}", "prompt=def main(", "max_new_tokens=8",
                   "temperature=0.5", "top_k=null", "top_p=0.9"])
    assert capsys.readouterr().out.startswith("def main(")
    options = generate.parse_options(["ckpt=m.pt", "prompt=a=b, [c]", "top_k=5"])
    assert options.prompt == "a=b, [c]" and options.top_k == 5 and options.top_p is None
    with pytest.raises(ValueError, match="max_new_tokens must be int"):
        generate.parse_options(["ckpt=m.pt", "max_new_tokens=many"])
    with pytest.raises(ValueError, match="key one of"):
        generate.parse_options(["ckpt=m.pt", "tokens=5"])
    with pytest.raises(ValueError, match="ckpt must be given"):
        generate.parse_options(["prompt=x"])
