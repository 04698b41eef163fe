from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from imageclf.config import Params, ParamsError, load_params
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
