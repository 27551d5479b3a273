"""``python -m trainer.prepare --src=DIR|gs://... --dst=DIR|gs://...``: check a folder tree, split
it as training does, write sharded TFRecords + manifest.json.

Training with ``--data_dir=DST`` then reads the shards (few large sequential reads instead of
thousands of small ones, images already shrunk to ``--max_side``) and takes the splits from the
manifest. The split is ``data.make_splits`` itself, with the same seed / validation_split /
test_per_class flags, so every image lands in the split it would have when training from the
folders. Images that already fit ``--max_side`` are stored as their original bytes (training
sees exactly the same pixels); larger ones are shrunk (antialiased) and stored as PNG.

Re-running resumes: finished shards (listed in DST/progress.json) are kept and their images
skipped; manifest.json is written last, so its presence means the directory is complete.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import hashlib
import io
import json

from absl import flags, logging

from trainer import cli, config as config_lib, flags as trainer_flags, helptext
from trainer.errors import ConfigError, DataError
from trainer.progress import Progress

PROGRESS = "progress.json"
KEEP_AS_IS = {"PNG", "JPEG", "BMP", "GIF"}  # formats the pipeline's decoder reads directly

trainer_flags.define_config_flags()
flags.DEFINE_string("src", None, "Folder tree to prepare (one folder per class), local or gs://. "
                    "Default: --data_dir.")
flags.DEFINE_string("dst", None, "Output folder for the shards and manifest.json, local or gs://.")
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
     "test_dir", "classes", "seed", "validation_split", "test_per_class", "holdout_sources",
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


@dataclasses.dataclass
class Encoded:
    """One image ready for its record."""

    record: bytes
    sha256: str
    stored: str  # "source" (original bytes) or "resized" (PNG)


# ----------------------------------------------------------------------------- planning


def ordered(examples: list, seed: int) -> list:
    """A split's images in shard order: mixed across classes by a seeded hash, deterministic."""
    from trainer import data
    return sorted(examples, key=lambda e: data.split_rank(data.record_key(e.label, e.relpath), seed))


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


def encode_example(example, max_side: int) -> Encoded:
    import tensorflow as tf

    from trainer import storage
    raw = storage.read_bytes(example.path)
    image, stored = encode_image(raw, max_side)
    features = tf.train.Features(feature={
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[example.label])),
        "relpath": tf.train.Feature(bytes_list=tf.train.BytesList(
            value=[example.relpath.encode()])),
    })
    record = tf.train.Example(features=features).SerializeToString()
    return Encoded(record, hashlib.sha256(raw).hexdigest(), stored)


# ----------------------------------------------------------------------------- writing


def _read_progress(dst: str, settings: Settings) -> dict:
    from trainer import storage
    path = storage.join(dst, PROGRESS)
    if not storage.exists(path):
        return {"settings": dataclasses.asdict(settings), "shards": {}}
    progress = json.loads(storage.read_text(path))
    if progress.get("settings") != json.loads(json.dumps(dataclasses.asdict(settings))):
        raise ConfigError(f"{dst} holds an unfinished prepare with other settings "
                          f"({progress.get('settings')}); use the same flags to resume, "
                          "or another --dst")
    return progress


def write_split(name: str, examples: list, dst: str, settings: Settings, progress: dict,
                bar: Progress, workers: int) -> list[dict]:
    """Writes one split's shards (skipping finished ones); returns its file entries."""
    import tensorflow as tf

    from trainer import data, storage
    entries: list[dict] = []
    done = progress["shards"].setdefault(name, [])
    position = 0
    for shard in done:  # finished shards cover a prefix of the ordered split
        keys = [data.record_key(e.label, e.relpath) for e in
                examples[position:position + shard["count"]]]
        if keys != [f["key"] for f in shard["files"]] or \
                not storage.exists(storage.join(dst, shard["file"])):
            raise DataError(f"{dst}: finished shard {shard['file']} does not match the source "
                            "any more; prepare into a new --dst")
        entries += shard["files"]
        position += shard["count"]
        bar.update(shard["count"])
        logging.info("keeping finished shard %s (%d images)", shard["file"], shard["count"])
    target = settings.shard_mb * 1_000_000
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        while position < len(examples):
            index = len(done)
            file = f"{name}-{index:05d}.tfrecord"
            files, size = [], 0
            with tf.io.TFRecordWriter(storage.join(dst, file)) as writer:
                while position < len(examples) and size < target:
                    window = examples[position:position + 4 * workers]
                    for example, encoded in zip(window, pool.map(
                            lambda e: encode_example(e, settings.max_side), window)):
                        writer.write(encoded.record)
                        size += len(encoded.record)
                        files.append({"key": data.record_key(example.label, example.relpath),
                                      "relpath": example.relpath, "label": example.label,
                                      "sha256": encoded.sha256, "stored": encoded.stored,
                                      "shard": file})
                        bar.update()
                        position += 1
                        if size >= target:
                            break
            done.append({"file": file, "count": len(files), "bytes": size, "files": files})
            storage.write_text_atomic(storage.join(dst, PROGRESS), json.dumps(progress))
            entries += files
    return entries


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


def prepare(config: config_lib.Config, src: str, dst: str, max_side: int, shard_mb: int,
            workers: int = 8, dry_run: bool = False) -> dict | None:
    """Checks, splits and writes ``src`` into ``dst``; returns the manifest (None for a dry run)."""
    from trainer import data, storage
    data_config = dataclasses.replace(config.data, data_dir=src)
    if data.is_prepared(src):
        raise ConfigError(f"--src {src} is already a prepared directory; pass the image folders")
    settings = Settings(data_config.seed, data_config.validation_split,
                        data_config.test_per_class, max_side, shard_mb,
                        tuple(data_config.classes), src, data_config.test_dir)
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
    if storage.exists(storage.join(dst, data.MANIFEST)):
        manifest = data.read_manifest(dst)
        if manifest.get("settings") == json.loads(json.dumps(dataclasses.asdict(settings))):
            logging.info("%s is already prepared with these settings; nothing to do", dst)
            return manifest
        raise ConfigError(f"{dst} already holds data prepared with other settings "
                          f"({manifest.get('settings')}); choose another --dst")
    storage.makedirs(dst)
    progress = _read_progress(dst, settings)
    if config.data.check:
        splits = validate_splits(splits, data_config)
    logging.info("preparing %s -> %s\n%s", src, dst, plan_text(splits, settings, None))
    bar = Progress(sum(len(getattr(splits, name)) for name in data.SPLITS), "prepare")
    files, shards = {}, {}
    for name in data.SPLITS:
        examples = ordered(getattr(splits, name), settings.seed)
        files[name] = write_split(name, examples, dst, settings, progress, bar, workers)
        shards[name] = [{k: s[k] for k in ("file", "count", "bytes")}
                        for s in progress["shards"].get(name, [])]
    counts = splits.counts()
    manifest = {
        "format": data.PREPARED_FORMAT, "version": 1,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "classes": list(splits.classes), "source": src, "test_source": data_config.test_dir,
        "settings": dataclasses.asdict(settings),
        "counts": counts,
        "class_weights": list(data.class_weights([e.label for e in splits.train],
                                                 len(splits.classes)).values()),
        "shards": shards,
        "files": {name: [{k: f[k] for k in ("relpath", "label", "sha256", "stored", "shard")}
                         for f in entries] for name, entries in files.items()},
    }
    storage.write_text_atomic(storage.join(dst, data.MANIFEST), json.dumps(manifest, indent=1))
    storage.remove_tree(storage.join(dst, PROGRESS))
    total = sum(s["bytes"] for split in shards.values() for s in split)
    logging.info("prepared %d images into %d shards (%.1f MB) in %s; train with --data_dir=%s",
                 sum(map(sum, counts.values())), sum(map(len, shards.values())), total / 1e6,
                 dst, dst)
    return manifest


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
