"""Every Hydra config composes, on CPU with logging off, and typos fail at composition."""

from __future__ import annotations

import dataclasses
import enum
import os
from pathlib import Path
from typing import Literal

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

import attn_zoo
from attn_zoo.registry import get
from experiments import bench
from experiments.config import _omegaconf_type, attention_params, register_configs

CONF = Path(__file__).resolve().parent.parent / "conf"
ATTENTION_YAMLS = sorted(path.stem for path in (CONF / "attention").glob("*.yaml"))


def composed(*overrides: str, hydra: bool = False):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("bench", overrides=["logger=none", *overrides], return_hydra_config=hydra)


def test_every_registered_variant_has_a_yaml():
    missing = sorted(set(attn_zoo.available()) - set(ATTENTION_YAMLS))
    assert not missing, f"add conf/attention/<name>.yaml (name + every parameter) for {missing}"


@pytest.mark.parametrize("name", ATTENTION_YAMLS)
def test_attention_yaml_holds_the_registry_defaults(name):
    cfg = composed(f"attention={name}", "seq_len=16")
    defaults = get(name).Params().to_dict()
    assert cfg.attention.name == name
    assert attention_params(cfg.attention) == {k: v for k, v in defaults.items()
                                               if k not in ("backend", "sinks")}
    assert cfg.backend.name == defaults["backend"]


@pytest.mark.parametrize("logger", ["wandb", "none"])
def test_logger_group_composes(logger):
    cfg = composed(f"logger={logger}")
    assert cfg.logger.name == logger
    if logger == "wandb":
        assert cfg.logger.mode.name == "offline"


@pytest.mark.parametrize("launcher, target", [
    ("basic", "BasicLauncher"), ("joblib", "JoblibLauncher"),
    ("submitit_slurm", "SlurmLauncher"), ("submitit_local", "LocalLauncher"),
    ("slurm", "SlurmLauncher"),
])
def test_launcher_group_composes(launcher, target):
    cfg = composed(f"hydra/launcher={launcher}", hydra=True)
    assert cfg.hydra.launcher._target_.endswith(target)
    if launcher == "slurm":
        assert cfg.hydra.launcher.gpus_per_node == 1 and cfg.hydra.launcher.tasks_per_node == 1


def test_bench_defaults_and_the_default_sweep():
    cfg = composed(hydra=True)
    assert (cfg.device, cfg.dtype.name, cfg.mode.name, cfg.kv_heads) == ("cpu", "float32",
                                                                          "both", cfg.heads)
    assert (cfg.contender, list(cfg.seq_len)) == ("attn_zoo", [1024, 2048, 4096, 8192, 16384])
    assert cfg.out_dir == f"results/{cfg.sweep_name}"
    assert cfg.hydra.sweep.dir.startswith(cfg.out_dir + "/hydra/")
    assert dict(cfg.hydra.sweeper.params) == {"attention": "glob(*)"}


@pytest.mark.parametrize("app, overrides", [
    ("bench", ["logger=none"]), ("train", ["logger=none"]), ("decode", []),
])
def test_every_apps_hydra_folders_are_unique_per_process(app, overrides):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(app, overrides=overrides, return_hydra_config=True)
    for key in ("run", "sweep"):
        folder = cfg.hydra[key].dir
        assert folder.startswith(f"{cfg.out_dir}/hydra/")
        assert folder.endswith(f"-{os.getpid()}")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(app, overrides=[*overrides, "out_dir=''"], return_hydra_config=True)
    with pytest.raises(Exception, match="out_dir must be a folder path"):
        cfg.hydra.run.dir  # noqa: B018 (resolving it raises)


# Each preset and the command it replaces: bench_local, bench_variants (--no-peers, peers),
# gpu_bench (full, --quick, and its torch-backend contender).
PRESETS = {
    "cpu_local": ({"attention": "local",
                   "contender": "attn_zoo,flex_attention,sdpa,local-attention"},
                  {"device": "cpu", "out_dir": "results/cpu/local_bench", "check_n": 589}),
    "cpu_variants": ({"attention": "glob(*)"},
                     {"device": "cpu", "out_dir": "results/cpu/variants_bench",
                      "call_limit_s": 20.0}),
    "cpu_peers": ({"attention": "lsh,longformer,bigbird",
                   "contender": "attn_zoo,reformer,hf_longformer,hf_bigbird,"
                                "hf_bigbird_no_dense", "causal": "true,false"},
                  {"device": "cpu", "out_dir": "results/cpu/variants_bench", "check_n": 1024}),
    "cpu_packed": ({"attention": "glob(*)", "layout": "packed,padded"},
                   {"device": "cpu", "out_dir": "results/cpu/packed", "seq_len": [16384],
                    "docs": 16}),
    "cpu_selection": ({"attention": "moba,nsa,topk,full,local"},
                      {"device": "cpu", "out_dir": "results/cpu/selection",
                       "seq_len": [4096, 16384, 65536], "call_limit_s": 120.0}),
    "gpu": ({"attention": "glob(*)", "contender": "attn_zoo,flex_attention,sdpa",
             "backend": "triton,flex", "head_dim": "64,128"},
            {"device": "cuda", "tokens": 16384, "heads": 32, "repeats": 20}),
    "gpu_quick": ({"attention": "glob(*)", "contender": "attn_zoo,flex_attention,sdpa",
                   "backend": "triton,flex", "head_dim": "64"},
                  {"device": "cuda", "seq_len": [8192, 16384]}),
    "gpu_torch": ({"attention": "lsh", "contender": "attn_zoo", "backend": "torch",
                   "head_dim": "64,128"}, {"device": "cuda"}),
}


def test_every_preset_is_tested():
    assert sorted(path.stem for path in (CONF / "bench").glob("*.yaml")) == sorted(PRESETS)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_compose_into_their_sweeps(preset):
    sweep, values = PRESETS[preset]
    cfg = composed(f"bench={preset}", hydra=True)
    assert dict(cfg.hydra.sweeper.params) == sweep
    for key, value in values.items():
        assert OmegaConf.to_object(cfg[key]) == value if key == "seq_len" else cfg[key] == value
    bench.validate(cfg)


def test_gpu_heads_follow_the_head_dim():
    assert composed("bench=gpu", "head_dim=128").heads == 16


@pytest.mark.parametrize("override", [
    "attention.windw=3", "attention.window=abc", "mode=fwdbwd", "batch=x", "dtype=float64",
    "backend=cuda", "logger.mode=offlin", "repeat=3", "bench=nope",
])
def test_typos_and_wrong_types_fail_at_composition(override):
    with pytest.raises(ConfigCompositionException):
        composed("attention=local", override)


def test_parameter_types_map_to_what_omegaconf_checks():
    assert _omegaconf_type(int | None, "seed") == int | None
    assert _omegaconf_type(float | None, "scale") == float | None
    choices = _omegaconf_type(Literal["mean", "max"], "compress")
    assert issubclass(choices, enum.Enum) and [c.name for c in choices] == ["mean", "max"]


def test_schema_fields_follow_params():
    cfg = composed("attention=bigbird")
    names = [f.name for f in dataclasses.fields(get("bigbird").Params)
             if f.name not in ("backend", "sinks")]
    assert sorted(cfg.attention) == sorted(["name", *names])
