"""Ensembles (train.ensemble): the model averages its members exactly, keeps the one-model
contract every stage relies on, and each member is bit for bit the run its overrides make alone."""

from __future__ import annotations

import logging

import numpy as np
import onnxruntime as ort
import pytest
import torch

from imageclf.config import ParamsError, apply_overrides, ensemble_members
from imageclf.data.transforms import to_model_input
from imageclf.errors import InvalidInput
from imageclf.io import read_json
from imageclf.models.checkpoint import (
    ModelSpec,
    load_checkpoint,
    load_pretrained_features,
    save_checkpoint,
)
from imageclf.models.ensemble import ensemble, members_of
from imageclf.models.zoo import ServingGraph, fold_batchnorm, split_head
from stages import evaluate, export, train
from tests.conftest import tiny_params

SPEC = ModelSpec("resnet_pos", 8, 4, 1, 12, ("a", "b", "c", "d"), (0.3,), (0.2,))


def trained_like(seed: int) -> torch.nn.Module:
    """A member with distinct weights and batch-norm statistics (as training leaves them)."""
    torch.manual_seed(seed)
    model = SPEC.build()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_ensemble_averages_its_members_log_probabilities_and_keeps_the_model_contract():
    members = [trained_like(seed) for seed in (1, 2, 3)]
    model = ensemble(members).eval()
    x = torch.rand(5, 1, 12, 12)
    with torch.no_grad():
        expected = torch.stack([m(x).log_softmax(1) for m in members]).mean(0)
        torch.testing.assert_close(model(x), expected)
        # split_head (embedding + classifier) still composes to the model: ServingGraph,
        # monitoring's embedding and export all rely on it.
        features, head = split_head(model)
        embedding = features(x)
        assert embedding.shape == (5, 3 * 128)
        torch.testing.assert_close(head(embedding), expected)
        scores, served_embedding = ServingGraph(model, views=1).eval()(x)
        torch.testing.assert_close(scores, expected)
        torch.testing.assert_close(served_embedding, embedding)
        # Batch norm folds inside every member (the optimize stage's first step).
        torch.testing.assert_close(fold_batchnorm(model)(x), expected, atol=1e-5, rtol=1e-4)
    assert members_of(model) == 3 and members_of(members[0]) == 1
    assert head.out_features == 4  # read by code written for an nn.Linear classifier


def test_an_ensemble_needs_two_models_with_linear_classifiers():
    with pytest.raises(ValueError, match="two or more"):
        ensemble([trained_like(1)])
    with pytest.raises(TypeError, match=r"nn\.Sequential"):
        ensemble([torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)])


def test_an_ensemble_checkpoint_round_trips_and_a_single_model_keeps_its_bytes(tmp_path):
    members = [trained_like(seed) for seed in (1, 2)]
    spec = ModelSpec(**{**SPEC.__dict__, "members": 2})
    save_checkpoint(tmp_path / "ens.pt", ensemble(members), spec)
    loaded, loaded_spec, _ = load_checkpoint(tmp_path / "ens.pt")
    x = torch.rand(3, 1, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ensemble(members).eval()(x))
    assert loaded_spec == spec and members_of(loaded) == 2
    # Each member keeps its own input normalisation, from the weights, not from the spec.
    normalize = [m[0] for m in split_head(loaded)[0][1].members]
    assert all(float(n.mean) == pytest.approx(0.3) for n in normalize)
    # A one-model checkpoint is written as before ensembles existed: no "members" key.
    save_checkpoint(tmp_path / "one.pt", members[0], SPEC)
    raw = torch.load(tmp_path / "one.pt", weights_only=True)
    assert "members" not in raw["spec"]
    assert load_checkpoint(tmp_path / "one.pt")[1].members == 1
    with pytest.raises(Exception, match="at least one member"):
        ModelSpec(**{**SPEC.__dict__, "members": 0})
    # Transfer learning (train.init_from) starts from one model, not from an ensemble.
    with pytest.raises(InvalidInput, match="is an ensemble of 2 models"):
        load_pretrained_features(SPEC.build(), tmp_path / "ens.pt")


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ([{}], "one member: that is a single model"),
        ([{}, {"train.width": 32}], r"member 1 overrides \['train.width'\]"),
        ([{}, {"data.fraction": 0.5}], r"member 1 overrides \['data.fraction'\]"),
        ([{}, {"train.epochs": 0}], "member 1: .*train.epochs"),
        ([{}, {"train.nope": 1}], "member 1: Unknown parameter 'train.nope'"),
    ],
)
def test_a_member_that_cannot_be_trained_is_refused_when_the_params_are_read(
    default_params, members, message
):
    with pytest.raises(ParamsError, match=message):
        apply_overrides(default_params, {"train.ensemble": members})


def test_members_are_the_runs_their_overrides_make(default_params):
    params = apply_overrides(
        default_params, {"train.ensemble": [{}, {"seed": 43, "train.ema_decay": 0.99}]}
    )
    first, second = ensemble_members(params)
    assert (first.seed, second.seed, second.train.ema_decay) == (42, 43, 0.99)
    assert first.train.ensemble == second.train.ensemble == []
    assert ensemble_members(default_params) == [default_params]


def stage_weights(paths) -> dict[str, torch.Tensor]:
    return torch.load(paths.checkpoint, weights_only=True)["state_dict"]


def member_weights(state: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    """The ensemble's member ``index`` as a one-model state_dict. Its features are
    Sequential(Normalize, *body[:-1]) (split_head), so feature layer j is body layer j - 1, and
    its head is the body's last layer."""
    features, head = f"1.0.members.{index}.", f"1.1.heads.{index}."
    classifier = len(SPEC.build_member()[1]) - 1
    found = {}
    for key, value in state.items():
        if key.startswith(features):
            j, _, tail = key.removeprefix(features).partition(".")
            found["0." + tail if j == "0" else f"1.{int(j) - 1}.{tail}"] = value
        elif key.startswith(head):
            found[f"1.{classifier}." + key.removeprefix(head)] = value
    return found


def test_each_member_is_bit_for_bit_the_run_alone_and_the_ensemble_serves(project, caplog):
    caplog.set_level(logging.INFO)
    ensemble_params = tiny_params(
        train={"epochs": 2, "width": 8, "ensemble": [{}, {"seed": 43, "train.ema_decay": 0.5}]}
    )
    result = train.run(ensemble_params, project)
    state = stage_weights(project)
    assert result["weights"] == "ensemble" and result["epochs"] == 4
    assert [m["seed"] for m in result["members"]] == [42, 43]
    history = read_json(project.train_history)
    assert [(row["member"], row["epoch"]) for row in history] == [(0, 1), (0, 2), (1, 1), (1, 2)]
    assert not list(project.last_checkpoint.parent.glob("member-*.pt"))  # only while running

    # The served model: evaluate scores it, export writes it as one ONNX graph that agrees.
    report = evaluate.run(ensemble_params, project)
    assert 0.0 <= report["test_accuracy"] <= 1.0
    exported = export.run(ensemble_params, project)
    assert exported["argmax_agreement"] >= 0.999
    session = ort.InferenceSession(str(project.onnx), providers=["CPUExecutionProvider"])
    scores, embedding = session.run(
        None, {"images": to_model_input(np.zeros((2, 12, 12, 1), np.uint8)).numpy()}
    )
    assert scores.shape == (2, 4) and embedding.shape == (2, 2 * 128)

    # Each member alone, with its overrides as the parameters: the same weights, bit for bit.
    alone = [
        tiny_params(train={"epochs": 2, "width": 8}),
        tiny_params(train={"epochs": 2, "width": 8, "ema_decay": 0.5}).model_copy(
            update={"seed": 43}
        ),
    ]
    for index, params in enumerate(alone):
        train.run(params, project)
        single = stage_weights(project)
        member = member_weights(state, index)
        assert member.keys() == single.keys()
        assert all(torch.equal(member[k], single[k]) for k in single), f"member {index}"


def test_a_killed_ensemble_run_reuses_the_members_it_finished(project, monkeypatch, caplog):
    params = tiny_params(train={"epochs": 1, "width": 8, "ensemble": [{}, {"seed": 43}]})
    train.run(params, project)
    uninterrupted = stage_weights(project)

    real, calls = train.train_model, []

    def dies_in_the_second_member(*args, **kwargs):
        calls.append(kwargs["seed"])
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "train_model", dies_in_the_second_member)
    with pytest.raises(KeyboardInterrupt):
        train.run(params, project)
    assert (project.last_checkpoint.parent / "member-0.pt").is_file()
    monkeypatch.setattr(train, "train_model", real)
    caplog.set_level(logging.INFO)
    train.run(params, project)
    assert "ensemble member 0: trained by the killed run, reused" in caplog.text
    again = stage_weights(project)
    assert all(torch.equal(again[k], uninterrupted[k]) for k in uninterrupted)
    history = read_json(project.train_history)
    assert [row["member"] for row in history] == [0, 1]


def test_checkpoints_trained_apart_combine_into_one_ensemble(project, tmp_path, capsys):
    """tools.ensemble: members trained elsewhere (--save-models, other processes) make the same
    kind of checkpoint the stage saves; what cannot be one model is refused, saying why."""
    from tools.ensemble import combine, main

    members = [trained_like(seed) for seed in (1, 2)]
    files = []
    for i, member in enumerate(members):
        files.append(save_checkpoint(tmp_path / f"m{i}.pt", member, SPEC))
    out = tmp_path / "ens.pt"
    assert main([str(out), *map(str, files), "--score", "--root", str(project.root)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].endswith("2 x resnet_pos width 8") and printed[-1].startswith("ensemble: ")
    loaded, spec, _ = load_checkpoint(out)
    x = torch.rand(4, 1, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ensemble(members).eval()(x))
    assert spec.members == 2

    wider = ModelSpec(**{**SPEC.__dict__, "width": 16})
    save_checkpoint(tmp_path / "wide.pt", wider.build(), wider)
    with pytest.raises(InvalidInput, match="width 16 vs 8"):
        combine([files[0], tmp_path / "wide.pt"])
    with pytest.raises(InvalidInput, match="is an ensemble"):
        combine([files[0], out])
    with pytest.raises(InvalidInput, match="two or more"):
        combine([files[0]])
    assert main([str(tmp_path / "x.pt"), str(files[0]), str(tmp_path / "missing.pt")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the output would overwrite a member
        main([str(files[0]), str(files[0]), str(files[1])])
