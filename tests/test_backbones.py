"""Pretrained backbones offline: EfficientNet-Lite0's packaged ImageNet weights recognise real
photos through the project's own preprocessing; torchvision architectures take only a local
weights file that fits them; per-channel normalisation; export of a backbone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imageclf.data.transforms import prepare_image, to_model_input
from imageclf.errors import InvalidInput
from imageclf.models.backbones import (
    lite0_packaged_weights,
    load_pretrained,
    read_state_dict,
    weights_path,
)
from imageclf.models.checkpoint import ModelSpec, load_checkpoint, save_checkpoint
from imageclf.models.zoo import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ServingGraph,
    available_models,
    build_model,
    fold_batchnorm,
    model_contract,
    split_head,
)

CAT_CLASSES = range(281, 286)  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


@pytest.fixture(scope="module")
def imagenet_lite0() -> torch.nn.Module:
    """Lite0 with all its packaged weights, the 1000-class ImageNet classifier included."""
    model = build_model(
        "efficientnet_lite0", 1000, 3, mean=IMAGENET_MEAN, std=IMAGENET_STD, image_size=224
    )
    load_pretrained(model, "efficientnet_lite0", "imagenet", Path("."))
    state = read_state_dict(lite0_packaged_weights())
    model[-1].classifier.load_state_dict({"weight": state["_fc.weight"], "bias": state["_fc.bias"]})
    return model.eval()


def top5(model: torch.nn.Module, photo: np.ndarray) -> list[int]:
    """ImageNet top-5 of a photo through the project's preprocessing (what serving does)."""
    contract = model_contract("efficientnet_lite0")
    image = prepare_image(Image.fromarray(photo), contract.size, contract.channels)
    with torch.inference_mode():
        return model(to_model_input(image[None]))[0].topk(5).indices.tolist()


def test_pretrained_lite0_recognises_a_cat_and_an_espresso(imagenet_lite0):
    from skimage import data

    assert set(top5(imagenet_lite0, data.chelsea())) & set(CAT_CLASSES)
    assert ESPRESSO in top5(imagenet_lite0, data.coffee())


def test_registry_declares_the_input_contract_and_refuses_grayscale():
    for name in ("efficientnet_lite0", "tv_resnet18", "tv_convnext_tiny"):
        contract = model_contract(name)
        assert (contract.size, contract.channels) == (224, 3)
        assert contract.mean == IMAGENET_MEAN and contract.std == IMAGENET_STD
    assert model_contract("resnet_small").channels is None  # trained here: the data decides
    with pytest.raises(InvalidInput, match=r"data\.channels: 3"):
        build_model("efficientnet_lite0", 5, in_channels=1)


@pytest.mark.parametrize(
    "name",
    [
        "efficientnet_lite0",
        "tv_resnet18",
        "tv_resnet50",
        "tv_mobilenet_v3_large",
        "tv_efficientnet_b0",
        "tv_convnext_tiny",
    ],
)
def test_every_backbone_keeps_the_model_contract(name):
    """Normalize, then a body ending in a new classifier, and layer groups that name modules."""
    assert name in available_models()
    model = build_model(name, 7, 3, image_size=64).eval()
    features, head = split_head(model)
    assert isinstance(head, torch.nn.Linear) and head.out_features == 7
    with torch.inference_mode():
        x = torch.rand(2, 3, 64, 64)
        assert model(x).shape == (2, 7)
        assert head(features(x)).shape == (2, 7)
    for group in model[-1].layer_groups:
        for module_name in group:
            assert any(True for _ in model[-1].get_submodule(module_name).parameters())


def tv_mobilenet_file(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A torchvision weights file as a user would have it (random weights: no download)."""
    from torchvision.models import mobilenet_v3_large

    torch.manual_seed(3)
    state = mobilenet_v3_large(weights=None).state_dict()
    path = tmp_path / "mobilenet_v3_large.pth"
    torch.save(state, path)
    return path, state


def test_a_torchvision_backbone_loads_a_matching_local_file(tmp_path):
    from torchvision.models import mobilenet_v3_large

    path, state = tv_mobilenet_file(tmp_path)
    model = build_model("tv_mobilenet_v3_large", 4, 3, mean=0.0, std=1.0, image_size=64).eval()
    assert load_pretrained(model, "tv_mobilenet_v3_large", str(path), tmp_path) == path
    reference = mobilenet_v3_large(weights=None)
    reference.load_state_dict(state)
    reference.eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        expected = reference.classifier[:3](
            torch.flatten(reference.avgpool(reference.features(x)), 1)
        )
        embedding = split_head(model)[0](x)
    torch.testing.assert_close(embedding, expected)  # the pre-logits layer came along
    assert split_head(model)[1].out_features == 4  # the classifier is new


def test_a_weights_file_that_does_not_fit_is_refused_with_the_reason(tmp_path):
    _, state = tv_mobilenet_file(tmp_path)
    del state["features.0.0.weight"]
    state["features.1.block.0.0.weight"] = torch.zeros(16, 1, 5, 5)
    state["extra.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    model = build_model("tv_mobilenet_v3_large", 4, 3, image_size=64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InvalidInput) as caught:
        load_pretrained(model, "tv_mobilenet_v3_large", str(bad), tmp_path)
    message = str(caught.value)
    assert "1 missing key(s): features.0.0.weight" in message
    assert "1 unexpected key(s): extra.weight" in message
    assert "features.1.block.0.0.weight (16, 1, 5, 5) in the file vs (16, 1, 3, 3)" in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "partly loaded"


def test_missing_weights_are_clear_errors_and_nothing_is_downloaded(tmp_path):
    with pytest.raises(InvalidInput, match="ships no weights here"):
        weights_path("tv_resnet18", "imagenet", tmp_path)
    with pytest.raises(InvalidInput, match="no weights file at"):
        weights_path("tv_resnet18", "weights/resnet18.pth", tmp_path)
    with pytest.raises(InvalidInput, match="has no pretrained weights"):
        weights_path("resnet_small", "imagenet", tmp_path)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not weights")
    with pytest.raises(InvalidInput, match="not a PyTorch weights file"):
        load_pretrained(build_model("tv_resnet18", 2, 3), "tv_resnet18", str(garbage), tmp_path)
    spec = ModelSpec("resnet_small", 4, 2, 3, 12, ("a", "b"), 0.5, 0.5)
    ours = save_checkpoint(tmp_path / "model.pt", spec.build(), spec)
    with pytest.raises(InvalidInput, match=r"use train\.init_from"):
        load_pretrained(build_model("tv_resnet18", 2, 3), "tv_resnet18", str(ours), tmp_path)


def test_lite0_exports_to_onnx_with_a_dynamic_batch_and_folds_its_batch_norm(tmp_path):
    from imageclf.deploy.export import export_onnx, verify_onnx

    model = build_model(
        "efficientnet_lite0", 5, 3, mean=IMAGENET_MEAN, std=IMAGENET_STD, image_size=96
    )
    load_pretrained(model, "efficientnet_lite0", "imagenet", tmp_path)
    model.eval()
    serving = ServingGraph(model, views=2).eval()
    path = export_onnx(serving, tmp_path / "lite0.onnx", (3, 96, 96), opset=18)
    images = np.random.default_rng(0).integers(0, 256, (3, 96, 96, 3), dtype=np.uint8)
    check = verify_onnx(path, serving, images)
    assert check["dynamic_batch"] and check["max_abs_diff"] < 1e-4
    # Exported out of place (twice as fast), trained in place: the flags are back.
    relu6 = [m for m in model.modules() if isinstance(m, torch.nn.ReLU6)]
    assert relu6 and all(m.inplace for m in relu6)
    x = torch.rand(2, 3, 96, 96)
    with torch.inference_mode():
        torch.testing.assert_close(fold_batchnorm(model)(x), model(x), atol=1e-4, rtol=1e-3)


def test_activations_run_out_of_place_only_while_exporting():
    from imageclf.deploy.export import functional_activations

    model = torch.nn.Sequential(torch.nn.ReLU6(inplace=True), torch.nn.ReLU(), torch.nn.ReLU(True))
    with pytest.raises(RuntimeError), functional_activations(model):
        assert [m.inplace for m in model] == [False, False, False]
        raise RuntimeError("the export failed")
    assert [m.inplace for m in model] == [True, False, True]  # as they were, even after a failure


def test_per_channel_normalisation_and_checkpoints_with_one_float(tmp_path):
    spec = ModelSpec(
        "efficientnet_lite0", 32, 3, 3, 64, ("a", "b", "c"), IMAGENET_MEAN, IMAGENET_STD,
        pretrained="imagenet",
    )  # fmt: skip
    model = spec.build().eval()
    torch.testing.assert_close(model[0].mean.flatten(), torch.tensor(IMAGENET_MEAN))
    save_checkpoint(tmp_path / "m.pt", model, spec)
    loaded, loaded_spec, _ = load_checkpoint(tmp_path / "m.pt")
    assert loaded_spec == spec
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), model(x))
    contract = torch.load(tmp_path / "m.pt", weights_only=True)["input_contract"]
    assert contract["channels"] == 3 and contract["pretrained_size"] == 224
    assert contract["mean"] == list(IMAGENET_MEAN)
    # A checkpoint written before per-channel statistics: one float each.
    old = ModelSpec("resnet_small", 8, 4, 1, 12, tuple("abcd"), 0.2, 0.3)
    state = torch.load(save_checkpoint(tmp_path / "old.pt", old.build(), old), weights_only=True)
    state["spec"].update(mean=0.2, std=0.3)
    del state["spec"]["pretrained"]
    torch.save(state, tmp_path / "old.pt")
    _, old_spec, _ = load_checkpoint(tmp_path / "old.pt")
    assert old_spec.mean == (0.2,) and old_spec.std == (0.3,)
    with pytest.raises(InvalidInput, match="2 value"):
        ModelSpec("resnet_small", 8, 4, 3, 12, tuple("abcd"), (0.1, 0.2), 0.3)
