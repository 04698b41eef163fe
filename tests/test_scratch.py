"""Backpropagation by hand against autograd (course/autograd_by_hand.py)."""

from __future__ import annotations

import pytest
import torch

from course.autograd_by_hand import ScratchMLP, SoftmaxCrossEntropy, softmax_cross_entropy
from imageclf.models.zoo import build_model
from tests.conftest import synthetic_split


def test_custom_function_passes_gradcheck_and_matches_pytorchs_loss():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 5, (6,), generator=g)
    # Finite differences against the hand-written backward (float64, as gradcheck needs).
    assert torch.autograd.gradcheck(SoftmaxCrossEntropy.apply, (logits, targets))
    ours = softmax_cross_entropy(logits, targets)
    theirs = torch.nn.functional.cross_entropy(logits, targets)
    torch.testing.assert_close(ours, theirs)
    (ours_grad,) = torch.autograd.grad(ours, logits)
    (their_grad,) = torch.autograd.grad(theirs, logits)
    torch.testing.assert_close(ours_grad, their_grad)


@pytest.mark.parametrize("hidden", [16, (16, 8, 8)])
def test_hand_written_backward_equals_autograd_for_every_parameter(hidden):
    g = torch.Generator().manual_seed(1)
    mlp = ScratchMLP(12, hidden, 4, generator=g, dtype=torch.float64)
    x = torch.randn(8, 12, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 4, (8,), generator=g)
    loss, grads = mlp.gradients(x, targets)

    # The same function, recorded by autograd.
    leaves = {k: v.clone().requires_grad_(True) for k, v in mlp.params.items()}
    layers = len(leaves) // 2
    assert layers == (2 if hidden == 16 else 4)
    out = x
    for i in range(1, layers + 1):
        out = out @ leaves[f"w{i}"] + leaves[f"b{i}"]
        out = out.relu() if i < layers else out
    reference = torch.nn.functional.cross_entropy(out, targets)
    reference.backward()
    assert abs(loss - reference.item()) < 1e-12
    assert set(grads) == set(leaves)
    for name, leaf in leaves.items():
        torch.testing.assert_close(grads[name], leaf.grad, msg=f"gradient of {name}")
        assert grads[name].abs().sum() > 0  # every layer gets a gradient


def test_scratch_mlp_learns_a_learnable_task():
    train, test = synthetic_split(30, seed=3), synthetic_split(10, seed=4)

    def flat(images):  # pixels standardised, as the models' Normalize layer does
        return (torch.from_numpy(images).float().flatten(1) / 255 - 0.5) / 0.25

    x, y = flat(train.images), torch.from_numpy(train.labels)
    mlp = ScratchMLP(x.shape[1], 32, 4, generator=torch.Generator().manual_seed(0))
    losses = [mlp.sgd_step(x, y, lr=0.05) for _ in range(150)]
    assert losses[-1] < losses[0] / 10
    accuracy = (mlp.predict(flat(test.images)) == torch.from_numpy(test.labels)).float().mean()
    assert accuracy > 0.9  # chance is 0.25


def test_scratch_mlp_at_a_width_has_the_registered_mlps_layers():
    """The bare-tensor network and ``train.model: mlp`` share their layer sizes: the same
    weight matrices (nn.Linear stores them transposed), BatchNorm and dropout aside."""
    scratch = ScratchMLP.for_width(3 * 10 * 10, width=4, classes=7)
    registered = build_model("mlp", num_classes=7, in_channels=3, width=4, image_size=10)
    linears = [m for m in registered.modules() if isinstance(m, torch.nn.Linear)]
    weights = [scratch.params[f"w{i}"] for i in range(1, scratch.layers + 1)]
    assert [tuple(w.T.shape) for w in weights] == [tuple(m.weight.shape) for m in linears]
