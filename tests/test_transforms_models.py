"""The shared preprocessing, the model zoo, checkpoints and BN folding."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from imageclf.data.transforms import prepare_image, random_augment, to_model_input
from imageclf.models.checkpoint import ModelSpec, load_checkpoint, save_checkpoint
from imageclf.models.zoo import (
    FlipTTA,
    available_models,
    build_model,
    fold_batchnorm,
    model_contract,
)


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "I;16", "CMYK", "1"])
def test_prepare_image_handles_any_mode_and_size(mode):
    img = Image.new("RGB", (97, 45), (200, 10, 10)).convert(mode)
    out = prepare_image(img, 28, 1)
    assert out.shape == (28, 28, 1) and out.dtype == np.uint8
    assert prepare_image(img, 32, 3).shape == (32, 32, 3)


def test_transparent_background_becomes_black():
    img = Image.new("RGBA", (28, 28), (255, 255, 255, 0))
    assert prepare_image(img, 28, 1).max() == 0


def test_exif_rotation_is_applied():
    """A phone stores a portrait photo as landscape pixels plus an EXIF tag saying "rotate 90°
    clockwise to display". The model must see what the person saw: here a bright block in the
    top-right quarter. Ignoring the tag would put it in the top-left quarter (and a rotation
    the wrong way in the bottom-left): only one corner is lit, so every mistake shows."""
    seen = np.zeros((40, 20), np.uint8)  # what the viewer sees: 20 wide, 40 tall
    seen[:20, 10:] = 255  # the top-right quarter
    stored = Image.fromarray(seen).transpose(Image.Transpose.ROTATE_90)  # undo the display turn
    assert stored.size == (40, 20)  # landscape pixels, as the camera wrote them
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise on display
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", quality=95, exif=exif)
    with Image.open(buf) as decoded:
        assert decoded.size == (40, 20)  # the tag is not applied by decoding alone
        out = prepare_image(decoded, 20, 1)[..., 0].astype(int)
        assert decoded.size == (40, 20)  # and the caller's image is left as it was
    # Away from the block's edges (resampling and JPEG blur them): lit only top-right.
    assert out[1:8, 12:19].min() > 200, out
    for corner in (out[1:8, 1:8], out[12:19, 1:8], out[12:19, 12:19]):
        assert corner.max() < 55, out


def test_non_square_images_are_centre_cropped_not_squashed():
    """A photo's shapes must keep their proportions: the shorter side is resized and the
    centre square kept. Three squares side by side, black | white | grey: squashing the strip
    into a square would show all three; the centre crop shows only the white one."""
    strip = np.zeros((20, 60), np.uint8)
    strip[:, 20:40], strip[:, 40:] = 255, 128
    for image in (Image.fromarray(strip), Image.fromarray(strip.T.copy())):  # wide and tall
        assert (prepare_image(image, 20, 1) == 255).all()  # same scale: exactly the centre
        smaller = prepare_image(image, 8, 3)  # resampling blends the border pixels a little
        assert smaller.shape == (8, 8, 3) and smaller[1:-1, 1:-1].min() >= 250
        assert smaller.min() > 200  # a squashed strip would be a third black


def test_square_images_are_resized_exactly_as_before():
    """Fashion-MNIST (28x28, and any square image) gets the very pixels it always did."""
    rng = np.random.default_rng(0)
    square = Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8))
    expected = square.resize((28, 28), Image.Resampling.BILINEAR, reducing_gap=3.0)
    np.testing.assert_array_equal(prepare_image(square, 28, 1)[..., 0], np.asarray(expected))
    fashion = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    np.testing.assert_array_equal(prepare_image(Image.fromarray(fashion), 28, 1)[..., 0], fashion)


def test_large_jpeg_is_decoded_at_reduced_scale_with_the_same_result():
    """A phone photo is decoded at 1/8 scale (Image.draft) when that still leaves the model's
    size: the decoder does an eighth of the work, and the prepared image barely changes."""
    y, x = np.mgrid[0:1200, 0:1600]
    photo = np.stack([x * 255 // 1600, y * 255 // 1200, (x + y) * 255 // 2800], -1)
    buf = io.BytesIO()
    Image.fromarray(photo.astype(np.uint8)).save(buf, format="JPEG", quality=90)
    with Image.open(buf) as lazy:
        drafted = prepare_image(lazy, 96, 3)
        assert lazy.size == (200, 150)  # decoded at 1/8 scale, still above 96 pixels
    with Image.open(buf) as full:
        full.load()  # decoded pixels: draft cannot apply
        reference = prepare_image(full, 96, 3)
        assert full.size == (1600, 1200)
    assert drafted.shape == reference.shape == (96, 96, 3)
    assert np.abs(drafted.astype(int) - reference.astype(int)).mean() < 2.0


def test_model_input_contract():
    batch = np.full((3, 5, 5, 1), 255, np.uint8)
    x = to_model_input(batch)
    assert x.shape == (3, 1, 5, 5) and x.dtype == torch.float32 and float(x.max()) == 1.0
    with pytest.raises(TypeError):
        to_model_input(batch.astype(np.float32))


def test_random_augment_shifts_and_flips_within_bounds():
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(64, 1, 8, 8)
    x[:, :, 3:5, 3:5] = 1.0
    out = random_augment(x, g, pad=2)
    assert out.shape == x.shape
    # Content is moved, not created or destroyed (the block is far from the border).
    assert torch.allclose(out.sum((1, 2, 3)), x.sum((1, 2, 3)))
    assert not torch.equal(out, x)


@pytest.mark.parametrize("name", available_models())
def test_every_registered_model_trains_one_step(name):
    channels = model_contract(name).channels or 1  # ImageNet backbones take RGB
    model = build_model(name, num_classes=5, in_channels=channels, width=8, image_size=32)
    x, y = torch.rand(4, channels, 32, 32), torch.tensor([0, 1, 2, 3])
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert model(x).shape == (4, 5)


def test_unknown_model_lists_choices():
    with pytest.raises(ValueError, match="resnet_small"):
        build_model("nope", 10)


def test_fold_batchnorm_preserves_outputs():
    model = build_model("resnet_small", 10, 1, 8)
    model.train()
    for _ in range(3):  # give BN non-trivial running statistics
        model(torch.rand(16, 1, 28, 28))
    model.eval()
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.rand(4, 1, 28, 28)
    torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-4)


def test_flip_tta_is_mirror_invariant():
    model = FlipTTA(build_model("resnet_small", 10, 1, 8).eval())
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(model(x), model(x.flip(3)), atol=1e-5, rtol=1e-4)


def test_eight_view_tta_is_invariant_to_every_symmetry_of_the_square():
    from imageclf.data.transforms import symmetric_images
    from imageclf.models.zoo import ServingGraph, symmetric_views

    model = build_model("resnet_small", 10, 1, 8).eval()
    x = torch.rand(2, 1, 12, 12)
    views = symmetric_views(x, 8).unflatten(0, (8, 2))
    assert len({v.numpy().tobytes() for v in views}) == 8  # eight distinct views
    as_arrays = symmetric_images(x.permute(0, 2, 3, 1).numpy(), 8)  # the NumPy twin, NHWC
    for view, array in zip(views, as_arrays, strict=True):
        assert np.array_equal(view.permute(0, 2, 3, 1).numpy(), array)
    graph = ServingGraph(model, views=8)
    scores, embedding = graph(x)
    for view in views:  # any view of the image scores as the image itself
        torch.testing.assert_close(graph(view)[0], scores, atol=1e-5, rtol=1e-4)
    explicit = torch.stack([model(v).log_softmax(1) for v in views]).mean(0)
    torch.testing.assert_close(scores, explicit, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(embedding, graph.features(x))  # the image's own embedding
    torch.testing.assert_close(FlipTTA(model, 8)(x), scores)
    for bad in (3, True):
        with pytest.raises(ValueError, match="views must be 1, 2 or 8"):
            ServingGraph(model, views=bad)


def test_checkpoint_round_trip_including_folded(tmp_path):
    spec = ModelSpec("resnet_small", 8, 10, 1, 28, tuple("abcdefghij"), 0.3, 0.35)
    model = spec.build().eval()
    x = torch.rand(2, 1, 28, 28)
    save_checkpoint(tmp_path / "m.pt", model, spec)
    loaded, loaded_spec, _ = load_checkpoint(tmp_path / "m.pt")
    assert loaded_spec == spec
    torch.testing.assert_close(loaded(x), model(x))
    folded_spec = ModelSpec(**{**spec.__dict__, "bn_folded": True})
    save_checkpoint(tmp_path / "f.pt", fold_batchnorm(model), folded_spec)
    refolded, _, _ = load_checkpoint(tmp_path / "f.pt")
    torch.testing.assert_close(refolded(x), model(x), atol=1e-5, rtol=1e-4)


def test_missing_checkpoint_says_which_stage_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="train stage"):
        load_checkpoint(tmp_path / "none.pt")


def test_serving_graph_scores_match_evaluation_and_expose_the_embedding():
    from imageclf.models.zoo import ServingGraph

    model = build_model("resnet_small", 10, 1, 8).eval()
    x = torch.rand(3, 1, 28, 28)
    scores, embedding = ServingGraph(model, views=2)(x)
    torch.testing.assert_close(scores, FlipTTA(model)(x))
    assert embedding.shape == (3, 32)  # 4 * width: the pooled features before the classifier
    plain, _ = ServingGraph(model, views=1)(x)
    torch.testing.assert_close(plain, model(x))


def test_zero_init_residual_block_starts_as_the_identity():
    from imageclf.models.zoo import ResidualBlock

    x = torch.rand(2, 8, 6, 6)  # non-negative, so relu(x + 0) == x
    block = ResidualBlock(8, zero_init=True).train()
    torch.testing.assert_close(block(x), x)
    # ... and only starts there: the branch still gets a gradient and grows in.
    block(x).sum().backward()
    assert block.body[1][1].weight.grad.abs().sum() > 0
    plain = ResidualBlock(8).train()
    assert not torch.allclose(plain(x), x)


@pytest.mark.parametrize("size", [12, 27, 28, 64])
def test_resnet_pos_classifier_reads_the_whole_map_at_any_size(size):
    from imageclf.models.zoo import POS_HIDDEN, ServingGraph, split_head

    model = build_model("resnet_pos", 10, 1, 8, image_size=size).eval()
    features, _ = split_head(model)
    side = math.ceil(math.ceil(size / 2) / 2)  # after two stride-2 convs
    hidden = [m for m in features.modules() if isinstance(m, torch.nn.Linear)]
    assert hidden[0].in_features == 4 * 8 * side * side  # every position of the last map
    x = torch.rand(3, 1, size, size)
    scores, embedding = ServingGraph(model, views=1)(x)
    assert scores.shape == (3, 10) and embedding.shape == (3, POS_HIDDEN)


def test_resnet_pos_full_adds_a_residual_block_at_full_resolution_only():
    """resnet_pos_full is resnet_pos plus one residual block on the 28x28 map; resnet_pos keeps
    its layer names (checkpoints saved before resnet_pos_full existed still load)."""
    from imageclf.models.zoo import ResidualBlock

    def block_sides(name: str) -> list[int]:
        model = build_model(name, 10, 1, 8, image_size=28).eval()
        sides: list[int] = []
        for m in model.modules():
            if isinstance(m, ResidualBlock):
                m.register_forward_hook(lambda _m, _i, out: sides.append(out.shape[-1]))
        model(torch.rand(2, 1, 28, 28))
        return sides

    assert block_sides("resnet_pos") == [14, 7]
    assert block_sides("resnet_pos_full") == [28, 14, 7]
    # The layer names of resnet_pos as before the refactor that added resnet_pos_full.
    pos = [k for k in build_model("resnet_pos", 10, 1, 8).state_dict() if k.endswith("weight")]
    assert pos[:5] == ["1.0.0.weight", "1.0.1.weight", "1.1.0.weight", "1.1.1.weight",
                       "1.2.body.0.0.weight"]  # fmt: skip
    assert pos[-2:] == ["1.6.weight", "1.9.weight"]


def test_mlp_learns_folds_and_exports_like_every_model(tmp_path):
    """``train.model: mlp`` (Mini-Project 2) through the road every model takes: the engine's
    loop learns a held-out task, its BatchNorm folds into the Linear layers, a folded checkpoint
    reloads, and the served graph exports to ONNX with the same scores and a dynamic batch."""
    from imageclf.deploy.export import export_onnx, verify_onnx
    from imageclf.models.zoo import ServingGraph, split_head
    from imageclf.training.engine import predict_logits, train_model
    from tests.conftest import synthetic_split, tiny_params

    cfg = tiny_params(train={"model": "mlp", "width": 8, "epochs": 10, "augment": []}).train
    torch.manual_seed(0)
    spec = ModelSpec("mlp", cfg.width, 4, 1, 12, tuple("abcd"), 0.3, 0.35)
    model = spec.build()
    train_model(model, synthetic_split(24, seed=1), None, cfg, seed=0, progress=False)
    held_out = synthetic_split(10, seed=2)
    logits = predict_logits(model, held_out.images)
    assert (logits.argmax(1).numpy() == held_out.labels).mean() >= 0.9  # chance: 0.25

    model.eval()
    x = torch.rand(5, 1, 12, 12)
    assert split_head(model)[0](x).shape == (5, 16 * cfg.width)  # the embedding served
    torch.testing.assert_close(model(x.contiguous(memory_format=torch.channels_last)), model(x))
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in folded.modules())
    torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-4)
    folded_spec = ModelSpec(**{**spec.__dict__, "bn_folded": True})
    save_checkpoint(tmp_path / "f.pt", folded, folded_spec)
    torch.testing.assert_close(load_checkpoint(tmp_path / "f.pt")[0](x), folded(x))

    serving = ServingGraph(folded, views=1).eval()
    path = export_onnx(serving, tmp_path / "mlp.onnx", (1, 12, 12))
    check = verify_onnx(path, serving, held_out.images)
    assert check["dynamic_batch"] and check["argmax_agreement"] == 1.0
    assert check["max_abs_diff"] < 1e-4
