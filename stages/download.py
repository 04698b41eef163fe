"""Stage download: fetch and verify the raw data, then write the canonical dataset."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path
from typing import Any

from PIL import Image

from imageclf.config import Params
from imageclf.data import elpv, fashion_mnist
from imageclf.data.scan import build_imagefolder_dataset
from imageclf.data.store import (
    Split,
    SplitWriter,
    dataset_draft,
    exceeds_budget,
    finish_dataset,
    stratified_fraction,
)
from imageclf.data.transforms import prepare_image
from imageclf.errors import StageError
from imageclf.io import write_json
from imageclf.paths import ProjectPaths
from imageclf.stage import main


def _write_fashion_mnist(
    params: Params, dest: Path, splits: dict[str, Split], meta: dict[str, Any]
) -> dict[str, Any]:
    """Write the IDX arrays, brought to another size or to RGB via the shared preprocessing
    when params ask for it, streamed to disk when they exceed data.ram_budget_mb."""
    cfg = params.data
    shape = (cfg.image_size, cfg.image_size, cfg.channels)
    on_disk = exceeds_budget(sum(len(s) for s in splits.values()), shape, cfg.ram_budget_mb)
    with dataset_draft(dest) as tmp:
        done = {}
        for name, split in splits.items():
            writer = SplitWriter(tmp, name, len(split), shape, on_disk)
            same = split.images.shape[1:] == shape
            for img, label in zip(split.images, split.labels, strict=True):
                if not same:
                    img = prepare_image(Image.fromarray(img[..., 0]), cfg.image_size, cfg.channels)
                writer.add(img, int(label))
            done[name] = writer.finish()
        return finish_dataset(
            tmp, done["train"], done["test"], meta, "mmap" if on_disk else "memory"
        )


def _folder_source(params: Params, paths: ProjectPaths) -> tuple[Path, Any, dict[str, Any]]:
    """(root, file listing or None for a train/test folder tree, provenance) of a file dataset."""
    cfg = params.data
    if cfg.name == "elpv":
        root, classes, files = elpv.listing(cfg.elpv_task, cfg.test_fraction, params.seed)
        source = {"name": "elpv", "task": cfg.elpv_task, "test_fraction": cfg.test_fraction}
        source["package"] = f"{elpv.PACKAGE} {version(elpv.PACKAGE)}"
        return root, (classes, files), source
    if not cfg.imagefolder_root:
        raise StageError(
            "data.name is imagefolder but data.imagefolder_root is not set: point "
            "it at a folder with train/<class>/ and test/<class>/ images."
        )
    return paths.resolve(cfg.imagefolder_root), None, {}


def run(params: Params, paths: ProjectPaths) -> dict[str, Any]:
    """Get the dataset named in params.data and write data/dataset (arrays + meta)."""
    cfg = params.data
    if cfg.name == "fashion_mnist":
        raw = paths.fashion_mnist_raw
        try:
            provenance = fashion_mnist.fetch(raw, cfg.sources, timeout=cfg.download_timeout_s)
        except fashion_mnist.DownloadError as exc:
            raise StageError(str(exc)) from exc
        splits = {}
        for name in ("train", "test"):
            split = Split(*fashion_mnist.load_split(raw, name))
            splits[name] = split.subset(
                stratified_fraction(split.labels, cfg.fraction, params.seed)
            )
        source = {"files": provenance, "md5": {f.name: f.md5 for f in fashion_mnist.FILES}}
        meta = _write_fashion_mnist(
            params,
            paths.dataset,
            splits,
            {
                "name": cfg.name,
                "classes": list(fashion_mnist.CLASSES),
                "fraction": cfg.fraction,
                "source": source,
            },
        )
    else:
        root, listed, source = _folder_source(params, paths)
        meta = build_imagefolder_dataset(
            root,
            paths.dataset,
            size=cfg.image_size,
            channels=cfg.channels,
            fraction=cfg.fraction,
            seed=params.seed,
            on_bad_file=cfg.on_bad_file,
            ram_budget_mb=cfg.ram_budget_mb,
            listed=listed,
            source=source,
        )
        write_json(paths.imagefolder_source, {**meta["source"], "classes": meta["classes"]})
    report = {
        k: meta[k] for k in ("name", "num_train", "num_test", "train_hash", "test_hash", "storage")
    }
    report["num_classes"] = len(meta["classes"])
    report.update(meta.get("quality", {}))
    write_json(paths.download_report, report)
    return report


if __name__ == "__main__":
    main(run)
