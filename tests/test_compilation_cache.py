"""JAX's persistent compilation cache under `segjax train`, and the compile seconds in metrics.jsonl."""
import json
import os

import jax
import pytest

from segjax import cli, config as config_lib
from segjax.errors import SegjaxError
from tests.train_harness import Run

RECIPE = ("--config.num_steps=2", "--config.eval_every_steps=2")


def compile_records(workdir):
    return {kind: r for r in map(json.loads, open(workdir / "metrics.jsonl")) if r["split"] == "compile"
            for kind in ("train", "eval") if f"{kind}_compile_s" in r}


@pytest.mark.e2e  # two `segjax train` subprocesses
def test_compile_seconds_are_logged_and_a_second_run_loads_the_steps_from_the_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("SEGJAX_COMPILATION_CACHE", str(cache))
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # the tiny model compiles fast
    found = []
    for name in ("first", "second"):
        rc, out, err = Run(tmp_path / name, tmp_path / "data", *RECIPE).finish()
        assert rc == 0, err
        found.append(compile_records(tmp_path / name))
        assert any(f.startswith("jit_train_step") for f in os.listdir(cache))
    first, second = found
    assert first["train"]["step"] == 1 and first["eval"]["step"] == 2
    for kind in ("train", "eval"):
        assert first[kind][f"{kind}_compile_s"] > 0 and second[kind][f"{kind}_compile_s"] > 0
        assert first[kind]["cache_hit"] is False and second[kind]["cache_hit"] is True


@pytest.fixture
def jax_cache_settings():
    names = ("jax_compilation_cache_dir", "jax_enable_compilation_cache", "jax_persistent_cache_min_compile_time_secs")
    saved = {n: getattr(jax.config, n) for n in names}
    yield
    for n, v in saved.items():
        jax.config.update(n, v)


def test_cache_directory_and_switches(tmp_path, monkeypatch, jax_cache_settings):
    monkeypatch.delenv("SEGJAX_COMPILATION_CACHE", raising=False)
    monkeypatch.delenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    jax.config.update("jax_compilation_cache_dir", None)
    assert cli.use_compilation_cache() == str(tmp_path / "xdg" / "segjax" / "jax_cache")
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xdg" / "segjax" / "jax_cache")
    assert jax.config.jax_enable_compilation_cache and jax.config.jax_persistent_cache_min_compile_time_secs < 1
    monkeypatch.setenv("SEGJAX_COMPILATION_CACHE", str(tmp_path / "mine"))
    assert cli.use_compilation_cache() == str(tmp_path / "mine")
    assert cli.use_compilation_cache(False) is None and not jax.config.jax_enable_compilation_cache
    monkeypatch.setenv("SEGJAX_COMPILATION_CACHE", "off")
    assert cli.use_compilation_cache() is None and not jax.config.jax_enable_compilation_cache
    # eval and predict take --no-compilation-cache; train takes the recipe key
    assert cli.build_parser().parse_args(["eval", "--workdir", "w", "--no-compilation-cache"]).compilation_cache is False
    assert cli.build_parser().parse_args(["predict", "--checkpoint", "c", "x.png", "--out", "o"]).compilation_cache
    config = config_lib.apply_overrides(config_lib.load_config(), ["--config.compilation_cache=false"])
    assert config.compilation_cache is False
    config_lib.check(config)
    with pytest.raises(SegjaxError, match="compilation_cache"):
        config_lib.apply_overrides(config_lib.load_config(), ["--config.compilation_cache=maybe"])
