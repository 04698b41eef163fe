from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from imageclf.config import Params, ParamsError, apply_overrides, load_params, parse_assignments
from tests.conftest import REPO


def write_changed(tmp_path: Path, change: Callable[[dict[str, Any]], None]) -> Path:
    """The repository's params.yaml with ``change`` applied to it, written under ``tmp_path``."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    change(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def model_fields(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted params.yaml key, pydantic field) for every field of ``model``, sections included."""
    for name, field in model.model_fields.items():
        key = f"{prefix}{field.alias or name}"
        yield key, field
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from model_fields(field.annotation, f"{key}.")


def test_repository_params_load(default_params):
    assert default_params.train.epochs >= 1
    assert 0 < default_params.data.fraction <= 1


def test_params_yaml_is_the_only_source_of_values():
    """No field of the Params tree has a default (config.py cannot disagree with params.yaml),
    and params.yaml spells out every one of them, the optional (null) ones included."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    with_default, missing = [], []
    for key, field in model_fields(Params):
        if not field.is_required():
            with_default.append(key)
        node: Any = raw
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                missing.append(key)
                break
            node = node[part]
    assert not with_default, f"defaults in imageclf/config.py: {with_default}"
    assert not missing, f"fields not in params.yaml: {missing}"


@pytest.mark.parametrize("key", ["train.width", "serving.workers", "train.max_steps", "seed"])
def test_missing_key_is_an_error_naming_it(tmp_path, key):
    *parents, leaf = key.split(".")

    def drop(raw: dict[str, Any]) -> None:
        node = raw
        for part in parents:
            node = node[part]
        del node[leaf]

    with pytest.raises(ParamsError, match=re.escape(f"{key}: Field required")):
        load_params(write_changed(tmp_path, drop))


def test_unknown_key_is_an_error_naming_it(tmp_path):
    path = write_changed(tmp_path, lambda raw: raw["train"].update(epochz=3))
    with pytest.raises(ParamsError, match=r"train\.epochz"):
        load_params(path)


def test_invalid_value_says_which_and_why(tmp_path):
    path = write_changed(tmp_path, lambda raw: raw["data"].update(fraction=1.5))
    with pytest.raises(ParamsError, match=r"data\.fraction: Input should be less than or equal"):
        load_params(path)


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(ParamsError, match="does not exist"):
        load_params(tmp_path / "nope.yaml")


def test_augmentation_policy_is_checked_when_params_load():
    """A typo or a missing number in train.augment fails at load time, naming the step."""
    params = load_params()
    good = apply_overrides(params, {"train.augment": ["hflip", {"rotation": 10}]})
    assert good.train.flips and good.tta_flip == params.evaluate.tta_flip
    no_flip = apply_overrides(params, {"train.augment": [{"translate": 2}]})
    assert not no_flip.train.flips and not no_flip.tta_flip  # no flip TTA without flips
    assert (good.tta_views, no_flip.tta_views) == (2 if params.evaluate.tta_flip else 1, 1)
    square = apply_overrides(params, {"train.augment": ["hflip", "vflip", "rot90"]})
    assert square.train.symmetry_views == 8  # a cell is a cell in any orientation
    assert apply_overrides(square, {"evaluate.tta_flip": False}).tta_views == 1
    for bad, words in (
        (["hflp"], "unknown augmentation 'hflp'"),
        (["rotation"], "needs its degrees"),
        ([{"hflip": 1}], "takes no number"),
        ([{"rotation": 5, "translate": 2}], "one name to one number"),
    ):
        with pytest.raises(ParamsError, match=words):
            apply_overrides(params, {"train.augment": bad})


def test_a_configuration_file_is_validated_before_any_run(tmp_path):
    from imageclf.config import load_overrides

    photos = load_overrides(REPO / "configs" / "photos.yaml")
    assert photos["train.pretrained"] == "imagenet" and photos["data.channels"] == 3
    bad = tmp_path / "bad.yaml"
    bad.write_text("train.epochz: 3\n")
    with pytest.raises(ParamsError, match=r"bad.yaml: Unknown parameter 'train.epochz'"):
        load_overrides(bad)
    seeded = tmp_path / "seeded.yaml"  # a top-level parameter needs no dot
    seeded.write_text("seed: 43\ntrain.epochs: 3\n")
    assert load_overrides(seeded) == {"seed": 43, "train.epochs": 3}
    bad.write_text("train:\n  epochs: 3\n")
    with pytest.raises(ParamsError, match="dotted parameter keys"):
        load_overrides(bad)
    with pytest.raises(ParamsError, match="No configuration file"):
        load_overrides(tmp_path / "missing.yaml")


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_configuration_applies_over_params_yaml(path, default_params):
    """configs/*.yaml are what the README tells people to run: each one applies cleanly (an
    ensemble's members included) before anyone spends an hour on it."""
    from imageclf.config import ensemble_members, load_overrides

    params = apply_overrides(default_params, load_overrides(path))
    assert ensemble_members(params)


def test_command_line_assignments_are_typed_and_may_name_a_top_level_value(default_params):
    """`-S KEY=VALUE` (the training flow's set_params, the benchmark's --set): YAML-typed values,
    dotted keys or a top-level one such as seed, as `dvc exp run -S` takes them."""
    parsed = parse_assignments(["train.lr=0.1", "seed=43", "train.augment=[hflip]", "a.b= x=y"])
    assert parsed == {"train.lr": 0.1, "seed": 43, "train.augment": ["hflip"], "a.b": "x=y"}
    params = apply_overrides(default_params, {k: parsed[k] for k in ("train.lr", "seed")})
    assert (params.train.lr, params.seed) == (0.1, 43)
    for bad in ("train.lr", "=3", " =3"):
        with pytest.raises(ParamsError, match="is not KEY=VALUE"):
            parse_assignments([bad])
    assert parse_assignments(None) == {}
