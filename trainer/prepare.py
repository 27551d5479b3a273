"""``python -m trainer.prepare --src=DIR|gs://... --dst=DIR|gs://...``: check a folder tree, split
it as training does, write it as a TensorFlow Datasets dataset (trainer/prepared.py).

Training with ``--data_dir=DST`` then reads the shards (few large sequential reads instead of
thousands of small ones, images already shrunk to ``--max_side``) and takes the splits from the
dataset; any TF program reads it with ``tfds.builder_from_directory(DST)``. The split is
``data.make_splits`` itself, with the same seed / validation_split / test_per_class /
holdout_sources flags, so every image lands in the split it would have when training from the
folders. PNG and JPEG images that already fit ``--max_side`` are stored as their original bytes
(training sees exactly the same pixels); larger ones, and BMP and GIF (which TFDS's image
decoder would not give as one frame of 3 channels), are stored as PNG, shrunk (antialiased).

Re-running resumes: finished shards (listed in DST/progress.json) are kept and their images
skipped; dataset_info.json is written last, so its presence means the directory is complete.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import io

from absl import flags, logging

from trainer import cli, config as config_lib, flags as trainer_flags, helptext
from trainer.errors import ConfigError
from trainer.progress import Progress

KEEP_AS_IS = {"PNG", "JPEG"}  # formats that both the pipeline and TFDS's Image decode as stored

trainer_flags.define_config_flags()
flags.DEFINE_string("src", None, "Folder tree to prepare (one folder per class), local or gs://. "
                    "Default: --data_dir.")
flags.DEFINE_string("dst", None, "Output folder for the TFDS dataset (shards, dataset_info.json), "
                    "local or gs://.")
flags.DEFINE_integer("max_side", 256, "Images whose longer side exceeds this are shrunk to it "
                     "(keep it at least the --image_size you will train at).")
flags.DEFINE_integer("shard_mb", 150, "Target shard size in MB (GCS reads best at 100-200 MB).")
flags.DEFINE_integer("workers", 8, "Threads that read and encode images.")
flags.DEFINE_boolean("dry_run", False, "Print the plan (splits, counts, shards) and write nothing.")
flags.DEFINE_boolean("check_only", False, "Only run the data check on --src (bad images, stray "
                     "files, duplicates, leakage) with training's split; write nothing.")


USAGE = helptext.Usage(
    ("python -m trainer.prepare --src=DIR --dst=DIR [--max_side=N] [--dry_run | --check_only]",
     "python -m trainer.prepare --src=/data/cxr --dst=/data/cxr-prepared --dry_run",
     "python -m trainer.prepare --check_only --src=/data/cxr   (the data check alone)"),
    ("src", "dst", "max_side", "shard_mb", "workers", "dry_run", "check_only", "model", "config",
     "test_dir", "classes", "seed", "validation_split", "test_per_class", "group_by", "holdout_sources", "val_sources",
     "check", "on_bad_image", "on_leak", "min_image_side"))


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the output depends on; a resumed run must use the same."""

    seed: int
    validation_split: float
    test_per_class: int
    max_side: int
    shard_mb: int
    classes: tuple
    source: str
    test_source: str
    holdout_sources: tuple = ()
    group_by: str = ""
    val_sources: tuple = ()


# ----------------------------------------------------------------------------- planning


def ordered(examples: list, seed: int) -> list:
    """A split's images in shard order: mixed across classes by a seeded hash, deterministic."""
    from trainer import data, prepared
    return sorted(examples, key=lambda e: data.split_rank(prepared.record_key(e.label, e.relpath),
                                                          seed))


def validate_splits(splits, data_config):
    """The check before writing: every image decodable and large enough, no duplicates across
    splits (trainer.datacheck, the same check training runs). Swap this function to change
    what prepare refuses; it returns the splits to write (bad images left out with
    --on_bad_image=skip, each still in the split training would put it in)."""
    from trainer import datacheck
    return datacheck.check(splits, data_config)


# ----------------------------------------------------------------------------- encoding


def encode_image(raw: bytes, max_side: int) -> tuple[bytes, str]:
    """Original bytes when they fit ``max_side`` in a format the pipeline decodes, else the
    image shrunk to ``max_side`` (aspect kept, antialiased) as PNG, grayscale kept grayscale."""
    import numpy as np
    from PIL import Image

    image = Image.open(io.BytesIO(raw))
    if image.format in KEEP_AS_IS and max(image.size) <= max_side:
        return raw, "source"
    image.seek(0)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16/32-bit grayscale -> 8-bit
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif image.mode == "1":
        image = image.convert("L")
    elif image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif image.mode not in ("L", "LA", "RGB", "RGBA"):
        image = image.convert("RGB")
    scale = max_side / max(image.size)
    if scale < 1:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=None)
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=3)
    return out.getvalue(), "resized"


def encode_example(example, max_side: int):
    """The bytes one image's record stores (prepared.Encoded)."""
    from trainer import prepared, storage
    raw = storage.read_bytes(example.path)
    image, stored = encode_image(raw, max_side)
    return prepared.Encoded(image, hashlib.sha256(raw).hexdigest(), stored)


# ----------------------------------------------------------------------------- writing


def plan_text(splits, settings: Settings, source_bytes: int | None) -> str:
    lines = [f"source: {settings.source}" + (f" (test: {settings.test_source})"
                                            if settings.test_source else ""),
             f"classes: {list(settings.classes)}",
             f"split: seed {settings.seed}, validation_split {settings.validation_split}, "
             f"test_per_class {settings.test_per_class}",
             f"images: longer side at most {settings.max_side} px; shards of about "
             f"{settings.shard_mb} MB"]
    for name, counts in splits.counts().items():
        lines.append(f"  {name:5s} {sum(counts):6d} images {dict(zip(splits.classes, counts))}")
    if source_bytes is not None:
        lines.append(f"source size {source_bytes / 1e6:.1f} MB: at most "
                     f"{max(1, -(-source_bytes // (settings.shard_mb * 1_000_000)))} shards "
                     "per split (fewer when images are shrunk)")
    return "\n".join(lines)


def check_only(config: config_lib.Config, src: str) -> None:
    """The data check training runs, on ``src`` alone: prints the usable counts per split."""
    from trainer import data
    data_config = dataclasses.replace(config.data, data_dir=src)
    checked = validate_splits(data.make_splits(data_config), data_config)
    for name, counts in checked.counts().items():
        print(f"{name:<5} {sum(counts):6d} images {dict(zip(checked.classes, counts))}")
    print(f"data check passed: {src}")


def with_sources(splits, data_config):
    """Each image with its source (trainer.sources: manifest.csv or the metadata sheets of the
    tree it comes from), '' where nothing says; the dataset stores it per record."""
    from trainer import data, sources
    every = [e for name in data.SPLITS for e in getattr(splits, name)]
    named = sources.tree_sources(every, [data_config.data_dir, data_config.test_dir]) or []
    found = {e.path: "" if s == sources.UNKNOWN else s for e, s in zip(every, named)}
    parts = {name: [dataclasses.replace(e, source=found.get(e.path, "")) for e in getattr(splits, name)]
             for name in data.SPLITS}
    return data.Splits(splits.classes, parts["train"], parts["val"], parts["test"])


def prepare(config: config_lib.Config, src: str, dst: str, max_side: int, shard_mb: int,
            workers: int = 8, dry_run: bool = False) -> dict | None:
    """Checks, splits and writes ``src`` into ``dst`` as a TFDS dataset; returns its metadata
    (prepared.metadata; None for a dry run)."""
    from trainer import data, prepared, storage
    data_config = dataclasses.replace(config.data, data_dir=src)
    if data.is_prepared(src):
        raise ConfigError(f"--src {src} is already a prepared directory; pass the image folders")
    settings = Settings(data_config.seed, data_config.validation_split,
                        data_config.test_per_class, max_side, shard_mb,
                        tuple(data_config.classes), src, data_config.test_dir,
                        tuple(data_config.holdout_sources), data_config.group_by,
                        tuple(data_config.val_sources))
    splits = data.make_splits(data_config)
    if dry_run:
        source_bytes = None
        if not storage.is_remote(src):
            import os
            source_bytes = sum(os.path.getsize(e.path) for name in data.SPLITS
                               for e in getattr(splits, name))
        print(plan_text(splits, settings, source_bytes))
        print(f"dry run: nothing written (would write to {dst})")
        return None
    done = prepared.check_destination(dst, dataclasses.asdict(settings))
    if done is not None:
        logging.info("%s is already prepared with these settings; nothing to do", dst)
        return done
    storage.makedirs(dst)
    progress = prepared.read_progress(dst, dataclasses.asdict(settings))
    if config.data.check:
        splits = validate_splits(splits, data_config)
    splits = with_sources(splits, data_config)
    logging.info("preparing %s -> %s\n%s", src, dst, plan_text(splits, settings, None))
    bar = Progress(sum(len(getattr(splits, name)) for name in data.SPLITS), "prepare")
    feats = prepared.features(splits.classes)
    test_tree = data_config.test_dir or src

    def entry(example, encoded) -> dict:
        tree = test_tree if example.path.startswith(test_tree.rstrip("/")) else src
        found = {"path": prepared.source_path(tree, example.path), "relpath": example.relpath,
                 "label": example.label, "source": example.source, "sha256": encoded.sha256,
                 "stored": encoded.stored}
        if example.mask:  # the pairing travels with the dataset (for lung-field crops)
            found["mask"] = prepared.source_path(tree, example.mask)
        return found

    files = {}
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for name in data.SPLITS:
            examples = ordered(getattr(splits, name), settings.seed)
            files[name] = prepared.write_split(
                name, examples, entry, dst, shard_mb * 1_000_000, progress,
                lambda e: encode_example(e, max_side), feats, bar, pool)
    counts = splits.counts()
    weights = list(data.class_weights([e.label for e in splits.train], len(splits.classes)).values())
    meta = prepared.metadata(splits.classes, src, data_config.test_dir, dataclasses.asdict(settings),
                             counts, weights, files)
    prepared.finish(dst, splits.classes, progress, meta)
    shards = [s for split in progress["shards"].values() for s in split]
    logging.info("prepared %d images into %d shards (%.1f MB) in %s; train with --data_dir=%s",
                 sum(map(sum, counts.values())), len(shards),
                 sum(s["bytes"] for s in shards) / 1e6, dst, dst)
    return meta


def prepare_from_flags(argv: list[str]) -> None:
    flag = flags.FLAGS
    config = config_lib.load(flag.model, flag.config, trainer_flags.overrides())
    config_lib.check_choices(config)
    src = flag.src or config.data.data_dir
    if src and flag.check_only:
        return check_only(config, src)
    if not src or not flag.dst:
        raise ConfigError("pass --src=DIR (or --data_dir) and --dst=DIR, local or gs://")
    if flag.max_side < 1 or flag.shard_mb < 1 or flag.workers < 1:
        raise ConfigError("--max_side, --shard_mb and --workers must be at least 1")
    prepare(config, src, flag.dst, flag.max_side, flag.shard_mb, flag.workers, flag.dry_run)


def run() -> None:
    cli.run(prepare_from_flags, usage=USAGE)


if __name__ == "__main__":
    run()
