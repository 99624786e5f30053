"""Typed flag parsing and atomic checkpoints (common.parse_config / save_checkpoint)."""
import dataclasses
import os
import typing

import pytest
import torch

import common
from common import load_checkpoint, parse_config, save_checkpoint


@dataclasses.dataclass
class Cfg:
    preset: str = "tiny"
    lr: float = 1e-3
    steps: int = 10
    compile: bool = False
    seeds: tuple[int, ...] = (0,)
    head_init: typing.Optional[str] = None


PRESETS = {"tiny": {}, "big": {"steps": 100, "lr": 1e-4}}


def test_flags_types_and_presets():
    c = parse_config(Cfg, ["--preset=big", "--lr", "3e-4", "--compile=false", "--seeds=0,1,2", "--head_init=x"], PRESETS)
    assert (c.preset, c.steps, c.lr, c.compile, c.seeds, c.head_init) == ("big", 100, 3e-4, False, (0, 1, 2), "x")
    assert parse_config(Cfg, ["--compile=true"], PRESETS).compile is True


@pytest.mark.parametrize("argv,needle", [(["--lr=abc"], "--lr"), (["--nope=1"], "--nope"),
                                         (["--compile=maybe"], "--compile"), (["--preset=huge"], "huge"),
                                         (["steps"], "steps")])
def test_bad_flags_name_the_flag(argv, needle):
    with pytest.raises(SystemExit) as e:
        parse_config(Cfg, argv, PRESETS)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_checkpoint_atomic_overwrite(tmp_path):
    p = str(tmp_path / "ck")
    save_checkpoint(p, {"w": torch.ones(3)}, {"v": 1}, train_state={"step": 1, "rng": torch.get_rng_state()})
    save_checkpoint(p, {"w": torch.zeros(3)}, {"v": 2})
    tensors, cfg, state = load_checkpoint(p, with_train_state=True)
    assert cfg == {"v": 2} and torch.equal(tensors["w"], torch.zeros(3)) and state is None
    assert os.listdir(tmp_path) == ["ck"]  # no temp or old directories left behind
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_checkpoint(str(tmp_path))


@dataclasses.dataclass
class Inner:
    width: int = 4
    name: str = "a"


@dataclasses.dataclass
class Outer:
    preset: str = "x"
    steps: int = 1
    inner: Inner = dataclasses.field(default_factory=lambda: Inner(width=8))


def test_nested_config_fields_are_plain_flags():
    """A dataclass-typed field (TrainConfig.model) is set through its own fields' names; its default is the
    field's default_factory (not the nested class's defaults); a preset naming no field is an error."""
    presets = {"x": {}, "wide": {"width": 32, "steps": 3}, "bad": {"depth": 2}}
    assert parse_config(Outer, [], presets).inner == Inner(width=8)
    c = parse_config(Outer, ["--preset=wide", "--name=b"], presets)
    assert (c.steps, c.inner) == (3, Inner(width=32, name="b"))
    for argv, needle in ((["--inner=3"], "--inner"), (["--preset=bad"], "depth"), (["--width=x"], "--width")):
        with pytest.raises(SystemExit) as e:
            parse_config(Outer, argv, presets)
        assert needle in str(e.value) and "\n" not in str(e.value)
    back = common.config_from_dict(Outer, common.config_to_dict(c))  # JSON round trip rebuilds the nested config
    assert back == c and isinstance(back.inner, Inner)


def test_git_commit_prefers_gem_commit(monkeypatch):
    """A copied tree (a lent GPU machine's) may carry another commit's .git: $GEM_COMMIT, when set, names
    the code that ran; otherwise the checkout's own commit."""
    import re
    from common import git_commit
    monkeypatch.delenv("GEM_COMMIT", raising=False)
    own = git_commit()
    assert re.fullmatch(r"[0-9a-f]{40}", own) or own == "unknown"
    monkeypatch.setenv("GEM_COMMIT", "4d0a5eb")
    assert git_commit() == "4d0a5eb"
