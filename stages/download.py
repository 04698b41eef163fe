"""Stage download: fetch and verify the raw data, then write the canonical dataset."""

from __future__ import annotations

from typing import Any

import numpy as np

from imageclf.config import Params
from imageclf.data import fashion_mnist
from imageclf.data.store import Split, read_imagefolder, stratified_fraction, write_dataset
from imageclf.io import write_json
from imageclf.paths import ProjectPaths
from imageclf.stage import StageError, main
from imageclf.transforms import prepare_image


def _resize(split: Split, size: int, channels: int) -> Split:
    """Bring Fashion-MNIST to another size or to RGB (pretrained models) via the shared code."""
    from PIL import Image

    if split.images.shape[1:] == (size, size, channels):
        return split
    images = np.stack(
        [prepare_image(Image.fromarray(img[..., 0]), size, channels) for img in split.images]
    )
    return Split(images, split.labels)


def run(params: Params, paths: ProjectPaths) -> dict[str, Any]:
    """Get the dataset named in params.data and write data/dataset (train/test npz + meta)."""
    cfg = params.data
    if cfg.name == "fashion_mnist":
        raw = paths.fashion_mnist_raw
        try:
            provenance = fashion_mnist.fetch(raw, cfg.sources, timeout=cfg.download_timeout_s)
        except fashion_mnist.DownloadError as exc:
            raise StageError(str(exc)) from exc
        train = Split(*fashion_mnist.load_split(raw, "train"))
        test = Split(*fashion_mnist.load_split(raw, "test"))
        classes = list(fashion_mnist.CLASSES)
        train = _resize(train, cfg.image_size, cfg.channels)
        test = _resize(test, cfg.image_size, cfg.channels)
        source = {"files": provenance, "md5": {f.name: f.md5 for f in fashion_mnist.FILES}}
    else:
        if not cfg.imagefolder_root:
            raise StageError(
                "data.name is imagefolder but data.imagefolder_root is not set: point "
                "it at a folder with train/<class>/ and test/<class>/ images."
            )
        root = paths.resolve(cfg.imagefolder_root)
        train, classes = read_imagefolder(root / "train", cfg.image_size, cfg.channels)
        test, test_classes = read_imagefolder(root / "test", cfg.image_size, cfg.channels)
        if classes != test_classes:
            raise StageError(f"train and test class folders differ: {classes} vs {test_classes}.")
        source = {"imagefolder_root": str(root)}
        write_json(paths.imagefolder_source, {**source, "classes": classes})
    train = train.subset(stratified_fraction(train.labels, cfg.fraction, params.seed))
    test = test.subset(stratified_fraction(test.labels, cfg.fraction, params.seed))
    meta = write_dataset(
        paths.dataset,
        train,
        test,
        {"name": cfg.name, "classes": classes, "fraction": cfg.fraction, "source": source},
    )
    report = {k: meta[k] for k in ("name", "num_train", "num_test", "train_hash", "test_hash")}
    report["num_classes"] = len(classes)
    write_json(paths.download_report, report)
    return report


if __name__ == "__main__":
    main(run)
