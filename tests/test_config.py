"""The typed config loader: YAML + dotted overrides, errors that name the key."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from sgcl.config import ConfigError, load_config, parse_override, to_dict


@dataclass
class Optim:
    name: Literal["sgd", "adamw", "lars"] = "sgd"
    lr: float = 0.03
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class Cfg:
    epochs: int = 10
    out: str = "runs/x"
    tags: list[str] = field(default_factory=list)
    mpp: Optional[float] = None
    amp: bool = False
    optim: Optim = field(default_factory=Optim)


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 3\noptim:\n  name: adamw\n  lr: 1e-3\n")
    cfg = load_config(Cfg, path, ["optim.lr=0.5", "tags=[a, b]", "mpp=0.25", "amp=true"])
    assert cfg.epochs == 3 and cfg.optim.name == "adamw" and cfg.optim.lr == 0.5
    assert cfg.tags == ["a", "b"] and cfg.mpp == 0.25 and cfg.amp is True
    assert cfg.optim.betas == (0.9, 0.999)
    assert to_dict(cfg)["optim"]["lr"] == 0.5


def test_int_promotes_to_float_but_not_back():
    assert load_config(Cfg, None, ["optim.lr=1"]).optim.lr == 1.0
    with pytest.raises(ConfigError, match="epochs: expected an integer"):
        load_config(Cfg, None, ["epochs=1.5"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=0.1", "unknown key optim.lrr"),
        ("epoch=3", "unknown key epoch"),
        ("optim.name=adam", "optim.name: 'adam' is not one of"),
        ("amp=maybe", "amp: expected true/false"),
        ("optim=3", "optim: expected a mapping"),
    ],
)
def test_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Cfg, None, [override])


def test_unknown_key_in_file_names_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  momentum: 0.9\n")
    with pytest.raises(ConfigError) as info:
        load_config(Cfg, path)
    assert str(path) in str(info.value) and "optim.momentum" in str(info.value)


def test_missing_file_and_bad_override(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Cfg, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("epochs")


def test_leaf_keys_and_with_overrides():
    from sgcl.config import leaf_keys, with_overrides

    assert leaf_keys(Cfg) == ["epochs", "out", "tags", "mpp", "amp", "optim.name", "optim.lr", "optim.betas"]
    base = load_config(Cfg, None, ["epochs=3"])
    cfg = with_overrides(base, {"optim.lr": 0.1, "mpp": None})
    assert cfg.epochs == 3 and cfg.optim.lr == 0.1 and cfg.optim.betas == (0.9, 0.999)
    assert base.optim.lr == 0.03  # the original is untouched
    with pytest.raises(ConfigError, match="unknown key optim.lrr"):
        with_overrides(base, {"optim.lrr": 0.1})
    with pytest.raises(ConfigError, match="epochs: expected an integer"):
        with_overrides(base, {"epochs": "many"})
