"""The data-quality gate: one pass names every defect, by file and class, and decides well."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imageclf.data.loaders import make_loader
from imageclf.data.scan import FileTask, build_imagefolder_dataset, inspect_file
from imageclf.data.store import RowView, load_dataset
from imageclf.data.transforms import to_model_array
from imageclf.errors import StageError
from imageclf.io import read_json
from stages import download, validate
from tests.conftest import tiny_params

CLASSES = ("ant", "bee", "cat")


def photo(seed: int, size: tuple[int, int] = (96, 72)) -> Image.Image:
    """A distinct RGB picture: random colour blocks, upsampled (so resizing keeps its look)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    return Image.fromarray(blocks).resize(size, Image.Resampling.BILINEAR)


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def clean_folder(root: Path, n_train: int = 6, n_test: int = 3, counts: dict | None = None) -> Path:
    seed = 0
    for split, n in (("train", n_train), ("test", n_test)):
        for cls in CLASSES:
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            k = (counts or {}).get(cls, n) if split == "train" else n
            for i in range(k):
                seed += 1
                photo(seed).save(folder / f"{i}.png")
    return root


def plant_defects(root: Path) -> dict[str, str]:
    """Every kind of defect, once each; returns kind -> the file (relative to root) that has it."""
    train = root / "train"
    planted = {}

    def put(rel: str, data: bytes) -> None:
        (root / rel).write_bytes(data)
        planted[rel] = rel

    good_jpeg = jpeg_bytes(photo(1000, (64, 48)))
    put("train/ant/truncated.jpg", good_jpeg[: len(good_jpeg) // 2])
    put("train/ant/empty.png", b"")
    put("train/bee/text.jpg", b"label,file\nbee,1.png\n")
    put("train/bee/notes.txt", b"shot on a phone")
    png = io.BytesIO()
    photo(1001).save(png, "PNG")
    raw = png.getvalue()
    broken = bytearray(raw)
    middle = len(raw) // 2
    broken[middle : middle + 64] = bytes(b ^ 0xFF for b in broken[middle : middle + 64])
    put("train/cat/corrupt.png", bytes(broken))  # valid header, damaged pixel data
    shutil.copy(train / "ant/0.png", train / "ant/copy_of_0.png")  # exact duplicate
    near = Image.open(train / "bee/0.png").resize((72, 54))
    (train / "bee/near_0.jpg").write_bytes(jpeg_bytes(near, 70))  # near duplicate
    shutil.copy(train / "cat/1.png", root / "test/cat/leaked.png")  # train/test leak
    shutil.copy(train / "ant/1.png", train / "bee/conflict.png")  # same image, two labels
    photo(1002, (8, 8)).save(train / "cat/tiny.png")
    photo(1003, (200, 20)).save(train / "ant/odd.png")
    return planted


@pytest.fixture
def defective(tmp_path: Path) -> Path:
    root = clean_folder(tmp_path / "folder")
    plant_defects(root)
    return root


def folder_params(root: Path, **sections: dict):
    data = {"name": "imagefolder", "imagefolder_root": str(root), "image_size": 16, "channels": 3}
    data.update(sections.pop("data", {}))
    return tiny_params(data=data, **sections)


def test_inspect_file_classifies_each_bad_file(defective):
    def kind(rel: str, max_pixels: int = 10**8) -> str:
        facts = inspect_file(FileTask(str(defective / rel), "train", 0, 16, 3, max_pixels))
        assert (facts.array is None) == bool(facts.problem)
        return facts.problem

    assert kind("train/ant/truncated.jpg") == "truncated"
    assert kind("train/ant/empty.png") == "empty"
    assert kind("train/bee/text.jpg") == "not_image"
    assert kind("train/bee/notes.txt") == "unknown_suffix"
    assert kind("train/cat/corrupt.png") == "unreadable"
    assert kind("train/ant/0.png", max_pixels=96 * 72 - 1) == "bomb"
    assert kind("train/ant/0.png") == ""


def test_pillow_decompression_bomb_is_a_bad_file_not_a_crash(defective, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow refuses over twice this
    facts = inspect_file(FileTask(str(defective / "train/ant/0.png"), "train", 0, 16, 3))
    assert facts.problem == "bomb" and "DecompressionBombError" in facts.detail


def test_one_run_reports_every_problem_by_file_and_class(project, defective):
    params = folder_params(defective, data={"on_bad_file": "skip"})
    report = download.run(params, project)
    assert report["files_skipped"] == 5 and report["storage"] == "memory"
    meta = read_json(project.dataset / "meta.json")
    skipped = {f["path"]: f["problem"] for f in meta["skipped_files"]}
    assert skipped == {
        "train/ant/truncated.jpg": "truncated",
        "train/ant/empty.png": "empty",
        "train/bee/text.jpg": "not_image",
        "train/bee/notes.txt": "unknown_suffix",
        "train/cat/corrupt.png": "unreadable",
    }
    with pytest.raises(StageError) as err:
        validate.run(params, project)
    message = str(err.value)
    # Every failing kind, each naming its files and classes.
    assert "label conflicts" in message
    assert "train/bee/conflict.png (bee)" in message and "train/ant/1.png (ant)" in message
    assert "train/test leakage" in message and "test/cat/leaked.png (cat)" in message
    assert "imbalance" not in message  # reported, never a failure
    summary = read_json(project.reports / "validation-failed" / "validate.json")
    warnings = "\n".join(summary["warnings"])
    assert "train/ant/copy_of_0.png (ant) is an exact duplicate of train/ant/0.png" in warnings
    assert "train/bee/near_0.jpg" in warnings and "near duplicate" in warnings
    assert "train/cat/tiny.png (cat): 8x8 pixels" in warnings
    assert "train/ant/odd.png (ant): 200x20 pixels" in warnings
    assert "train/ant/truncated.jpg (ant): truncated" in warnings
    counts = read_json(project.data_quality_report)
    assert counts["label_conflict"] == 2 and counts["train_test_leak"] == 1
    assert counts["bad_file"] == 5 and counts["tiny"] == 1 and counts["odd_aspect"] == 1
    assert counts["duplicate"] >= 2 and counts["success"] is False
    page = project.data_quality_html.read_text()
    assert page.count("data:image/png;base64,") >= 8
    for name in ("train/bee/conflict.png", "test/cat/leaked.png", "train/cat/corrupt.png"):
        assert name in page


def test_fail_mode_names_every_bad_file_in_one_error_and_keeps_the_old_dataset(project, defective):
    before = (project.dataset / "meta.json").read_bytes()
    with pytest.raises(StageError) as err:
        download.run(folder_params(defective, data={"on_bad_file": "fail"}), project)
    message = str(err.value)
    assert "5 of" in message and "data.on_bad_file" in message
    for rel in ("truncated.jpg", "empty.png", "text.jpg", "notes.txt", "corrupt.png"):
        assert rel in message
    assert "(class ant): truncated" in message and "(class bee): not image" in message
    assert (project.dataset / "meta.json").read_bytes() == before


def counted_folder(root: Path, train: dict[str, int], test: dict[str, int]) -> Path:
    """A folder with these numbers of distinct train and test images per class."""
    seed = 5000
    for split, counts in (("train", train), ("test", test)):
        for cls, n in counts.items():
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                seed += 1
                photo(seed, (48, 36)).save(root / split / cls / f"{i}.png")
    return root


SIX = ("ant", "bee", "birds", "cat", "dog", "eel")


def test_ordinary_imbalance_passes_with_a_warning_naming_the_correction(project, tmp_path):
    # The folder that used to stop a run: birds 19% of train where uniform is 17%.
    shares = dict(zip(SIX, (17, 17, 19, 17, 15, 15), strict=True))
    params = folder_params(counted_folder(tmp_path / "mild", shares, dict.fromkeys(SIX, 3)))
    download.run(params, project)
    summary = validate.run(params, project)
    assert summary["success"], summary["failures"]
    assert not any("imbalance" in w for w in summary["warnings"])  # 1.1x: not worth a word
    # Strong imbalance (6 to 30 per class) is still no failure: a warning with the correction.
    strong = dict(zip(SIX, (6, 10, 10, 10, 10, 30), strict=True))
    root = counted_folder(tmp_path / "strong", strong, dict.fromkeys(SIX, 3))
    for balance, says in (
        ("none", "Not corrected: train.class_balance is none; set it to weights"),
        ("weights", "Corrected in training: train.class_balance is weights"),
    ):
        params = folder_params(root, train={"class_balance": balance})
        download.run(params, project)
        summary = validate.run(params, project)
        assert summary["success"], summary["failures"]
        (warning,) = [w for w in summary["warnings"] if "class imbalance in train" in w]
        assert "eel: 30 train images, 39.5% of train, 2.4x the uniform 16.7% (over" in warning
        assert "ant: 6 train images, 7.9% of train, 0.5x the uniform 16.7% (under" in warning
        assert says in warning
        page = project.data_quality_html.read_text()
        assert f"train.class_balance is <b>{balance}</b>" in page


def test_a_class_too_small_to_test_fails_naming_class_split_count_and_need(project, tmp_path):
    test = dict.fromkeys(SIX, 3) | {"birds": 1}
    root = counted_folder(tmp_path / "small", dict.fromkeys(SIX, 6) | {"dog": 4}, test)
    params = folder_params(root)
    download.run(params, project)
    with pytest.raises(StageError) as err:
        validate.run(params, project)
    message = str(err.value)
    assert "failed 1 of" in message and "classes too small to learn or to test: 2" in message
    assert (
        "birds: 1 test image, needs at least 3 to be tested "
        "(validate.min_test_images_per_class)" in message
    )
    assert (
        "dog: 4 train images, needs at least 5 to be learned "
        "(validate.min_train_images_per_class)" in message
    )
    assert "imbalance" not in message


def test_report_opens_with_problem_and_class_tables_then_shows_pairs_side_by_side(
    project, defective
):
    params = folder_params(defective)
    download.run(params, project)
    with pytest.raises(StageError):
        validate.run(params, project)
    page = project.data_quality_html.read_text()
    body = page.split("<body>", 1)[1]
    # The tables come first, before any picture or file name.
    first_table, first_picture = body.index("<table class=summary>"), body.index("<img")
    assert first_table < body.index("<table class=classes>") < first_picture
    assert "train/bee/conflict.png" not in body[:first_picture]
    summary = body[first_table : body.index("</table>", first_table)]
    assert (
        "label conflicts (one image under two labels)</td><td>2 files in 1 group</td>"
        "<td>fails the run</td>" in summary
    )
    assert "duplicates within a split</td><td>" in summary and "warning only" in summary
    assert "class imbalance in train</td><td>0 classes</td><td>warning only" in summary
    classes = body[body.index("<table class=classes>") :]
    assert "<td>bee</td><td>8</td><td>3</td><td>34.8%</td>" in classes
    # The conflicting pair: both files, each with its split and label, in one group.
    group = body[body.index("one image, 2 labels: ant, bee") :]
    group = group[: group.index("</div></div>")]
    assert group.count("<img") == 2 and group.count("data:image/png;base64,") == 2
    assert "label <b>ant</b>, train<br><code>train/ant/1.png</code>" in group
    assert "label <b>bee</b>, train<br><code>train/bee/conflict.png</code>" in group
    leak = body[body.index("exact duplicate · in train and test") :]
    assert "label <b>cat</b>, test<br><code>test/cat/leaked.png</code>" in leak


def test_clean_folder_passes_and_fashion_mnist_style_arrays_still_validate(project, tmp_path):
    params = folder_params(clean_folder(tmp_path / "clean"))
    download.run(params, project)
    summary = validate.run(params, project)
    assert summary["success"], summary["failures"]
    assert read_json(project.data_quality_report)["label_conflict"] == 0


def test_large_dataset_is_memory_mapped_and_equal_to_the_in_memory_one(project, defective):
    small = download.run(folder_params(defective), project)
    in_ram = load_dataset(project.dataset)
    assert small["storage"] == "memory" and not isinstance(in_ram.train.images, np.memmap)
    train, test = in_ram.train.images.copy(), in_ram.test.images.copy()
    # The smallest budget params allow (1 MiB) holds ~1,300 such images; go below this folder.
    meta = build_imagefolder_dataset(
        defective,
        project.dataset,
        size=16,
        channels=3,
        fraction=1.0,
        seed=0,
        on_bad_file="skip",
        ram_budget_mb=len(train) * 16 * 16 * 3 / 2**20 / 2,
    )
    assert meta["storage"] == "mmap"
    mapped = load_dataset(project.dataset)
    assert isinstance(mapped.train.images, np.memmap) and mapped.train.images.mode == "r"
    np.testing.assert_array_equal(mapped.train.images, train)
    np.testing.assert_array_equal(mapped.test.images, test)
    assert meta["train_hash"] == small["train_hash"] and meta["test_hash"] == small["test_hash"]
    # Skipped files made the split shorter than the files listed: the file holds only the rest.
    assert mapped.train.images.shape[0] == len(mapped.train.labels) == len(train)
    # The train stage's train/val split keeps it on disk: a view, read batch by batch.
    rows = np.arange(1, len(train), 2)
    part = mapped.train.subset(rows)
    assert isinstance(part.images, RowView) and part.images.shape == (len(rows), 16, 16, 3)
    np.testing.assert_array_equal(part.images[2:5], train[rows[2:5]])
    loader = make_loader(part, 4, shuffle=False)
    seen = torch.cat([x for x, _ in loader])
    np.testing.assert_allclose(seen.numpy(), to_model_array(train[rows]))


def test_process_pool_gives_the_same_result_as_one_process(tmp_path):
    root = clean_folder(tmp_path / "many", n_train=16)  # 57 files: enough for the pool
    plant_defects(root)
    from imageclf.data.scan import list_imagefolder, scan

    _, listed = list_imagefolder(root)
    tasks = [FileTask(str(p), s, label, 16, 3) for s in listed for p, label in listed[s]]
    pooled, serial = list(scan(tasks, workers=2)), list(scan(tasks, workers=1))
    import pandas as pd

    # DataFrame.equals: NaN (no blur score for a bad file) equals NaN.
    assert pd.DataFrame([f.row() for f in pooled]).equals(pd.DataFrame([f.row() for f in serial]))
    assert all(
        np.array_equal(a.array, b.array)
        for a, b in zip(pooled, serial, strict=True)
        if a.array is not None
    )
    assert sum(bool(f.problem) for f in pooled) == 5
