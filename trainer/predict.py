"""``python -m trainer.predict --model_dir=RUN IMAGE_OR_DIR...``: class probabilities per image.

Images are decoded exactly as in training (``data.decode_pixels``). A file that cannot be read
or decoded gets one ``error:`` line on stderr and the others continue; the exit status is then
3 (data error). Folders are searched recursively for image files.
"""
from __future__ import annotations

import csv
import io
import json
import re
import sys

from absl import flags, logging

from trainer import cli, flags as trainer_flags, helptext, runs
from trainer.errors import ConfigError, DataError, ExitStatus

trainer_flags.define_config_flags()
trainer_flags.define_checkpoint_flag()
flags.DEFINE_enum("format", "table", ["table", "json", "csv"], "Output format on stdout.")

CHUNK = 64  # images decoded and predicted together

USAGE = helptext.Usage(
    ("python -m trainer.predict --model_dir=RUN [--format=json|csv] IMAGE_OR_DIR...",
     "python -m trainer.predict --model_dir=runs/vanilla-20260102-030405 scan.png",
     "python -m trainer.predict --model_dir=RUN --format=csv folder/ > predictions.csv"),
    ("model_dir", "checkpoint", "format"),
    defaults=helptext.RUN,
    help=(("model_dir", "The run whose model predicts (the folder training wrote), local or "
           "gs://. Its config.yaml fixes the image size and classes."),))


def expand(paths: list[str]) -> tuple[list[str], list[str]]:
    """(image files, error lines): folders become their image files, sorted, as a class folder
    gives them to training (a database class folder's images/, never its masks/)."""
    from trainer import data, layout, storage
    files, errors = [], []
    for path in paths:
        if storage.isdir(path):
            folder = layout.scan_class(path)
            found = [storage.join(folder.image_root, rel) for rel in folder.images]
            if not found:
                errors.append(f"{path}: folder holds no images ({', '.join(data.IMAGE_EXTENSIONS)})")
            files += found
        elif storage.exists(path):
            files.append(path)
        else:
            errors.append(f"{path}: no such file or folder")
    return files, errors


def decode_file(path: str, image_size: int, interpolation: str):
    """The training decode of one file; a DataError naming it if it is not a readable image."""
    import tensorflow as tf
    from trainer import data, storage
    try:
        return data.decode_pixels(storage.read_bytes(path), image_size, interpolation).numpy()
    except (tf.errors.OpError, OSError, ValueError) as err:
        reason = re.sub(r"\{\{.*?\}\}\s*", "", str(getattr(err, "message", err)))
        reason = reason.splitlines()[0][:160]
        raise DataError(f"{path}: cannot read it as an image ({reason})") from None


def predict_files(model, paths: list[str], image_size: int,
                  interpolation: str) -> tuple[list[tuple[str, list[float]]], list[str]]:
    """(path, probabilities) for each readable file, and an error line for each other one."""
    import numpy as np
    from trainer import models
    results, errors = [], []
    for start in range(0, len(paths), CHUNK):
        good, images = [], []
        for path in paths[start:start + CHUNK]:
            try:
                images.append(decode_file(path, image_size, interpolation))
                good.append(path)
            except DataError as err:
                errors.append(str(err))
        if images:
            probs = model.predict(models.feed(model, np.stack(images)), verbose=0)
            results += [(p, [float(v) for v in row]) for p, row in zip(good, probs)]
    return results, errors


def format_results(results: list, classes: list[str], kind: str) -> str:
    rows = [{"path": path, "class": classes[max(range(len(p)), key=p.__getitem__)],
             "probabilities": dict(zip(classes, p))} for path, p in results]
    if kind == "json":
        return json.dumps(rows, indent=2)
    if kind == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["path", "class", *classes])
        for r in rows:
            writer.writerow([r["path"], r["class"],
                             *[f"{r['probabilities'][c]:.6f}" for c in classes]])
        return out.getvalue().rstrip("\n")
    width = max([len("path")] + [len(r["path"]) for r in rows])
    cls_width = max(len("class"), *(len(c) for c in classes))
    columns = [max(len(c), 6) for c in classes]  # class names in full, never cut
    lines = [f"{'path':<{width}}  {'class':<{cls_width}}" +
             "".join(f"  {c:>{w}}" for c, w in zip(classes, columns))]
    for r in rows:
        lines.append(f"{r['path']:<{width}}  {r['class']:<{cls_width}}" +
                     "".join(f"  {r['probabilities'][c]:>{w}.4f}" for c, w in zip(classes, columns)))
    return "\n".join(lines)


def predict(model_dir: str, paths: list[str], checkpoint: str = "best",
            kind: str = "table") -> tuple[str, list[str]]:
    """(formatted results, error lines) for the given files and folders; a warning on stderr
    first when the run was trained on the synthetic demo data."""
    if not paths:
        raise ConfigError("no images given: python -m trainer.predict --model_dir=RUN "
                          "IMAGE_OR_DIR...")
    config = runs.read_config(model_dir)
    warning = runs.synthetic_warning(config, model_dir)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    files, errors = expand(paths)
    path = runs.checkpoint_path(model_dir, checkpoint)
    model = runs.load_model(path)
    runs.check_model_fits(model, config, path)
    results, bad = predict_files(model, files, config.data.image_size, config.data.interpolation)
    return format_results(results, config.data.classes, kind) if results else "", errors + bad


def predict_from_flags(argv: list[str]) -> int:
    f = trainer_flags.FLAGS
    ignored = [name for name in ("model", "config", *trainer_flags.overrides())
               if name != "model_dir" and f[name].value is not None]
    if ignored:
        raise ConfigError(f"--{ignored[0]} does not apply to predict: the run's config.yaml fixes "
                          "it (predict takes --model_dir, --checkpoint, --format and images)")
    text, errors = predict(f.model_dir or "", argv[1:], f.checkpoint, f.format)
    if text:
        print(text)
    for line in errors:
        print(f"error: {line}", file=sys.stderr)
    return ExitStatus.DATA if errors else ExitStatus.OK


def run() -> None:
    cli.run(predict_from_flags, usage=USAGE, positional=True, verbosity=logging.WARNING)


if __name__ == "__main__":
    run()
