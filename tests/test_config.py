from __future__ import annotations

import pytest

from imageclf.config import ParamsError, load_params


def test_repository_params_load(default_params):
    assert default_params.train.epochs >= 1
    assert 0 < default_params.data.fraction <= 1


def test_unknown_key_is_an_error_naming_it(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  epochz: 3\n")
    with pytest.raises(ParamsError, match=r"train\.epochz"):
        load_params(path)


def test_invalid_value_says_which_and_why(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("data:\n  fraction: 1.5\n")
    with pytest.raises(ParamsError, match=r"data\.fraction"):
        load_params(path)


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(ParamsError, match="does not exist"):
        load_params(tmp_path / "nope.yaml")
