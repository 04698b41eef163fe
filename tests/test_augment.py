"""The train.augment policy: each step, its determinism, and the default equal to what it was."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imageclf.config import ParamsError
from imageclf.data.loaders import InMemoryImages, NumberedBatch, batch_generator, make_loader
from imageclf.data.store import Split
from imageclf.data.transforms import build_augmentation, to_model_input
from tests.conftest import synthetic_split, tiny_params

PER_IMAGE_STEPS = [
    {"random_resized_crop": 0.5},
    {"rotation": 30},
    {"color_jitter": 0.4},
    {"randaugment": 9},
    "trivialaugment",
    {"random_erasing": 0.5},
]
EVERY_STEP = ["hflip", {"translate": 2}, *PER_IMAGE_STEPS]


def today_random_augment(
    batch: torch.Tensor, generator: torch.Generator, pad: int = 2
) -> torch.Tensor:
    """The training augmentation before the policy existed, verbatim (flip, then a shift of up
    to ``pad`` pixels, on the float batch in the training loop): a [hflip, translate] policy
    must equal it."""
    n, _, h, w = batch.shape
    flip_mask = torch.rand(n, generator=generator) < 0.5
    batch = torch.where(flip_mask[:, None, None, None], batch.flip(3), batch)
    padded = torch.nn.functional.pad(batch, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator)
    rows = (torch.arange(h)[None, :] + dy)[:, None, :, None]
    cols = (torch.arange(w)[None, :] + dx)[:, None, None, :]
    n_idx = torch.arange(n)[:, None, None, None]
    c_idx = torch.arange(batch.shape[1])[None, :, None, None]
    return padded[n_idx, c_idx, rows, cols]


def uint8_batch(n: int = 32, channels: int = 3, size: int = 16, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, (n, channels, size, size), dtype=np.uint8))


def asymmetric_batch(n: int, size: int = 12) -> torch.Tensor:
    """Images whose mirror is unmistakable: a bright bar down the left side, a dot top right."""
    batch = torch.zeros(n, 1, size, size, dtype=torch.uint8)
    batch[:, :, 2:10, 3] = 250
    batch[:, :, 3, 8] = 180
    return batch


def shifts(image: torch.Tensor, pad: int = 2) -> list[torch.Tensor]:
    """Every translation of ``image`` by -pad..pad pixels (zero fill)."""
    _, h, w = image.shape
    padded = torch.nn.functional.pad(image, (pad, pad, pad, pad))
    return [
        padded[:, dy : dy + h, dx : dx + w]
        for dy in range(2 * pad + 1)
        for dx in range(2 * pad + 1)
    ]


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("step", EVERY_STEP, ids=str)
def test_each_step_keeps_shape_dtype_and_range(step, channels):
    augmentation = build_augmentation([step], channels=channels, size=16)
    batch = uint8_batch(channels=channels)
    out = augmentation(batch, torch.Generator().manual_seed(0))
    assert out.shape == batch.shape and out.dtype == torch.uint8
    # And it does something: some image of the batch changed.
    assert not torch.equal(out, batch), step
    model_input = to_model_input(out.permute(0, 2, 3, 1))
    assert float(model_input.min()) >= 0.0 and float(model_input.max()) <= 1.0


def test_without_hflip_no_image_is_ever_mirrored():
    """A mirrored digit is another digit: without hflip in the policy, every output is a shift
    of its input, never of its mirror. With hflip, about half are mirrored."""
    batch = asymmetric_batch(200)
    original, mirror = shifts(batch[0]), shifts(batch[0].flip(2))
    for policy, expected_mirrored in (
        ([{"translate": 2}], (0, 0)),
        (["hflip", {"translate": 2}], (70, 130)),
    ):
        out = build_augmentation(policy, 1, 12)(batch, torch.Generator().manual_seed(1))
        mirrored = 0
        for image in out:
            plain = any(torch.equal(image, s) for s in original)
            flipped = any(torch.equal(image, s) for s in mirror)
            assert plain != flipped  # each output is exactly one of the two
            mirrored += flipped
        assert expected_mirrored[0] <= mirrored <= expected_mirrored[1], (policy, mirrored)


def test_geometric_steps_without_hflip_keep_left_and_right():
    """Rotation and crops move pixels but keep the bright bar on the left of the dot."""
    batch = torch.nn.functional.interpolate(asymmetric_batch(64).float(), size=24)
    batch = batch.to(torch.uint8)
    policy = [{"rotation": 10}, {"random_resized_crop": 0.8}, {"translate": 2}]
    out = build_augmentation(policy, 1, 24)(batch, torch.Generator().manual_seed(0)).float()
    columns = torch.arange(24.0)
    centre_of_mass = (out.sum(2)[:, 0] * columns).sum(1) / out.sum((1, 2, 3)).clamp(min=1)
    assert (centre_of_mass < 12).all()  # the bar (left) outweighs the dot: never mirrored


@pytest.mark.parametrize("step", [{"rotation": 30}, {"random_resized_crop": 0.3}], ids=str)
def test_rotation_and_crop_change_almost_every_image(step):
    batch = uint8_batch(n=40, channels=1, size=16)
    out = build_augmentation([step], 1, 16)(batch, torch.Generator().manual_seed(0))
    changed = (out != batch).flatten(1).any(1).float().mean()
    assert changed >= 0.9


def test_random_erasing_honours_its_probability():
    batch = torch.full((600, 1, 16, 16), 200, dtype=torch.uint8)  # erasing writes zeros
    out = build_augmentation([{"random_erasing": 0.3}], 1, 16)(
        batch, torch.Generator().manual_seed(0)
    )
    erased = (out == 0).flatten(1).any(1).float().mean().item()
    assert 0.24 <= erased <= 0.36, erased
    never = build_augmentation([{"random_erasing": 0.0}], 1, 16)(
        batch, torch.Generator().manual_seed(0)
    )
    assert torch.equal(never, batch)


def test_colour_jitter_fits_the_channel_count():
    """Saturation has no meaning for one channel: the grey policy leaves it out, the RGB one
    uses it (torchvision would otherwise refuse a grey image)."""
    grey = build_augmentation([{"color_jitter": 0.3}], 1, 8).stages[0].transform.transforms[0]
    rgb = build_augmentation([{"color_jitter": 0.3}], 3, 8).stages[0].transform.transforms[0]
    assert grey.saturation is None and rgb.saturation == (0.7, 1.3)


def test_same_seed_same_augmentation_other_batch_other_draws():
    augmentation = build_augmentation(EVERY_STEP, 3, 16)
    batch = uint8_batch()
    first = augmentation(batch, batch_generator(7, 3))
    assert torch.equal(first, augmentation(batch, batch_generator(7, 3)))
    assert not torch.equal(first, augmentation(batch, batch_generator(7, 4)))
    assert not torch.equal(first, augmentation(batch, batch_generator(8, 3)))


def test_default_policy_is_todays_augmentation():
    """params.yaml's default ([hflip, {translate: k}]) gives, per batch, exactly what the
    training loop used to compute on its float batch with the same generator."""
    default = tiny_params().train.augment
    assert len(default) == 2 and default[0] == "hflip" and list(default[1]) == ["translate"]
    pad = int(default[1]["translate"])
    split = synthetic_split(16, size=12, seed=3)
    dataset = InMemoryImages(split, build_augmentation(default, 1, 12), seed=5)
    indices = list(range(0, 64, 3))
    images, labels = dataset.__getitems__(NumberedBatch(4, indices))
    before = today_random_augment(to_model_input(split.images[indices]), batch_generator(5, 4), pad)
    torch.testing.assert_close(images, before, rtol=0, atol=0)
    assert torch.equal(labels, torch.from_numpy(split.labels[indices]))


def loader_epochs(split: Split, workers: int, augment: list, epochs: int = 2) -> list:
    from imageclf.data.loaders import LoaderSettings

    loader = make_loader(
        split,
        8,
        shuffle=True,
        seed=11,
        settings=LoaderSettings(num_workers=workers, prefetch_factor=2),
        augment=augment,
    )
    return [[batch for batch in loader] for _ in range(epochs)]


def test_policy_gives_the_same_batches_with_any_number_of_workers():
    """dataloader_check picks num_workers by speed: augmentation must not depend on it, nor on
    which worker builds which batch. Two epochs, so that epoch two draws anew."""
    split = synthetic_split(6, size=12, channels=3)  # 24 images: 3 batches per epoch
    policy = ["hflip", {"translate": 2}, {"randaugment": 9}, {"random_erasing": 0.5}]
    serial = loader_epochs(split, 0, policy)
    parallel = loader_epochs(split, 2, policy)
    for epoch_a, epoch_b in zip(serial, parallel, strict=True):
        for (xa, ya), (xb, yb) in zip(epoch_a, epoch_b, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    first, second = (torch.cat([x for x, _ in epoch]) for epoch in serial)
    assert not torch.equal(first, second)  # a new epoch, new draws (and a new order)


def test_overfit_and_evaluation_loaders_are_not_augmented():
    split = synthetic_split(4, size=12)
    ((images, _),) = list(make_loader(split, 16, shuffle=False))
    torch.testing.assert_close(images, to_model_input(split.images))


@pytest.mark.parametrize(
    ("step", "message"),
    [
        ({"translate": 1.5}, "whole pixels"),
        ({"random_resized_crop": 0}, "min_scale in"),
        ({"rotation": -5}, "degrees in"),
        ({"color_jitter": 1.5}, "strength in"),
        ({"randaugment": 40}, "magnitude as a whole number"),
        ({"random_erasing": 2}, "probability in"),
    ],
    ids=str,
)
def test_bad_numbers_are_refused_with_what_to_do(step, message):
    with pytest.raises(ParamsError, match=message) as error:
        build_augmentation([step], 3, 16)
    assert "params.yaml" in str(error.value)


def test_memory_mapped_split_gives_the_same_batches_as_one_in_ram(tmp_path):
    """A dataset over data.ram_budget_mb is memory-mapped: workers read its rows from disk and
    augment them exactly as they would the same images held in RAM."""
    split = synthetic_split(6, size=12, channels=3)
    np.save(tmp_path / "images.npy", split.images)
    mapped = Split(np.load(tmp_path / "images.npy", mmap_mode="r"), split.labels)
    policy = ["hflip", {"translate": 2}, {"rotation": 10}]
    in_ram = loader_epochs(split, 0, policy, epochs=1)[0]
    from_disk = loader_epochs(mapped, 1, policy, epochs=1)[0]
    for (xa, ya), (xb, yb) in zip(in_ram, from_disk, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_square_symmetries_draw_every_orientation_and_keep_the_pixels():
    """vflip and rot90 (solar cells, microscopy): each output is one of the eight symmetries of
    its input, all eight occur, and without them none but the identity does."""
    image = torch.arange(16, dtype=torch.uint8).reshape(1, 1, 4, 4)
    batch = image.repeat(400, 1, 1, 1)
    symmetries = [torch.rot90(im, k, dims=(1, 2)) for im in (image[0], image[0].flip(2))
                  for k in range(4)]  # fmt: skip
    out = build_augmentation(["hflip", "vflip", "rot90"], 1, 4)(
        batch, torch.Generator().manual_seed(0)
    )
    seen = [next(i for i, s in enumerate(symmetries) if torch.equal(o, s)) for o in out]
    counts = np.bincount(seen, minlength=8)
    assert (counts > 20).all(), counts  # each of the 8 about 50 times
    same = build_augmentation([{"translate": 0}], 1, 4)(batch, torch.Generator().manual_seed(0))
    assert torch.equal(same, batch)
