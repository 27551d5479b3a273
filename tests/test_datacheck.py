"""Bad data: every kind of bad input, generated in a temporary tree, gets its documented outcome."""
from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from trainer import config as config_lib, data, datacheck, demo_data
from trainer.errors import ConfigError, DataError


@dataclasses.dataclass
class Tree:
    """A generated tree in one layout; mutations name classes by role (covid, normal, viral)."""

    root: Path
    classes: list[str]
    names: dict  # role -> class folder name
    images_dir: str  # "" (the tutorial's flat folders) or "images" (the current database)

    def folder(self, role: str) -> Path:
        return self.root / self.names[role]

    def images(self, role: str) -> Path:
        return self.folder(role) / self.images_dir if self.images_dir else self.folder(role)

    def first(self, role: str = "normal") -> Path:
        return sorted(p for p in self.images(role).iterdir() if p.is_file())[0]


TUTORIAL = {"covid": "COVID-19", "normal": "NORMAL", "viral": "Viral Pneumonia"}
DATABASE = {"covid": "COVID", "normal": "Normal", "viral": "Viral Pneumonia"}


def make_tree(root: Path, layout_name: str, images_per_class: int, seed: int) -> Tree:
    if layout_name == "tutorial":
        demo_data.generate(root, images_per_class=images_per_class, seed=seed)
        return Tree(root, list(config_lib.TUTORIAL_CLASSES), TUTORIAL, "")
    demo_data.generate_database(root, images_per_class=images_per_class, seed=seed)
    return Tree(root, list(demo_data.DATABASE_CLASSES), DATABASE, "images")


def corrupt(tree):
    (tree.images("normal") / "corrupt.png").write_bytes(os.urandom(500))


def truncated(tree):
    path = tree.images("normal") / "t.jpg"
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def zero_bytes(tree):
    (tree.images("covid") / "empty.png").write_bytes(b"")


def text_as_image(tree):
    (tree.images("covid") / "notes.jpg").write_text("radiologist notes")


def non_image_file(tree):
    (tree.images("covid") / "notes.txt").write_text("radiologist notes")


def too_small(tree):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tree.images("normal") / "tiny.png")


def extra_folder(tree):
    (tree.root / "Tuberculosis").mkdir()
    shutil.copy(tree.first(), tree.root / "Tuberculosis" / "x.png")


def missing_folder(tree):
    shutil.rmtree(tree.folder("viral"))


def empty_folder(tree):
    for f in tree.images("viral").iterdir():
        f.unlink()


def symlink_loop(tree):
    os.symlink(tree.images("normal"), tree.images("normal") / "again")


def duplicate_in_split(tree):
    shutil.copy(tree.first(), tree.images("normal") / "copy.png")


def leak_into_test_tree(tree):
    test = make_tree(tree.root.parent / "test", "tutorial" if not tree.images_dir else "database",
                     3, seed=9)
    shutil.copy(tree.first(), test.images("normal") / "leaked.png")


def copy_our_split_puts_apart(tree):
    """A renamed copy that the path-hash split sends to another split than the original."""
    original = tree.first()
    names = sorted(p.name for p in tree.images("normal").iterdir())
    for i in range(100):
        candidate = f"copy-{i}.png"
        examples = [data.Example(n, n, 0) for n in names + [candidate]]
        parts = data.split_examples(examples, 1, 0.2, 2, seed=28)
        where = {e.path: name for name in data.SPLITS for e in parts[name]}
        if where[candidate] != where[original.name]:
            shutil.copy(original, tree.images("normal") / candidate)
            return
    raise AssertionError("no name found")


def same_image_two_classes(tree):
    shutil.copy(tree.first(), tree.images("covid") / "mislabelled.png")


def nested_folder(tree):
    (tree.images("normal") / "portable").mkdir()
    shutil.copy(tree.first(), tree.images("normal") / "portable" / "x.png")
    (tree.images("normal") / "portable" / "x.png").write_bytes(
        (tree.images("normal") / "portable" / "x.png").read_bytes() + b"trailing")  # no duplicate


def folder_beside_images(tree):
    (tree.folder("covid") / "augmented").mkdir()
    shutil.copy(tree.first("covid"), tree.folder("covid") / "augmented" / "x.png")


def image_beside_images(tree):
    shutil.copy(tree.first("covid"), tree.folder("covid") / "loose.png")


def xray_copied_into_masks(tree):
    """A mask folder holding an X-ray's very bytes: masks are never read, so no duplicate."""
    shutil.copy(tree.first(), tree.folder("normal") / "masks" / "stray.png")


# (case, mutation, flag overrides, expected error text or None, expected warning text or None);
# every case runs in both layouts.
CASES = [
    ("corrupt", corrupt, {}, "corrupt.png: not a readable image", None),
    ("truncated-jpeg", truncated, {}, "t.jpg: not a readable image", None),
    ("zero-bytes", zero_bytes, {}, "empty.png: empty file (0 bytes)", None),
    ("text-named-jpg", text_as_image, {}, "notes.jpg: not a readable image", None),
    ("too-small", too_small, {}, "tiny.png: too small (8x8; --min_image_side is 32)", None),
    ("corrupt-skipped", corrupt, {"on_bad_image": "skip"}, None, "leaving out 1 bad images"),
    ("too-small-allowed", too_small, {"min_image_side": 8}, None, None),
    ("non-image-file", non_image_file, {}, None, "ignoring 1 non-image files"),
    ("extra-folder", extra_folder, {}, None, "Tuberculosis: not one of the classes"),
    ("missing-folder", missing_folder, {}, "no folder for class 'Viral Pneumonia'", None),
    ("empty-folder", empty_folder, {}, "class folder holds no images", None),
    ("symlink-loop", symlink_loop, {}, "symlink loop", None),
    ("duplicate-in-split", duplicate_in_split, {"test_per_class": 0, "validation_split": 0.0},
     None, "1 duplicate images inside a split"),
    ("copy-kept-together", copy_our_split_puts_apart, {}, None, "kept 1 copies of an image in "
     "the split of their first copy"),
    ("leak", leak_into_test_tree, {}, "1 images appear in two splits", None),
    ("leak-warned", leak_into_test_tree, {"on_leak": "warn"}, None, "1 images appear in two splits"),
    ("two-classes", same_image_two_classes, {}, "1 images appear under two classes", None),
    ("nested-folder-used", nested_folder, {}, None, None),
    ("clean", lambda tree: None, {}, None, None),
]
# Only in the database's layout: what lies beside images/ is reported and not used; masks/
# is never read as images.
DATABASE_CASES = [
    ("folder-beside-images", folder_beside_images, {}, None, "not used: 1 entries beside a "
     "class's images/ folder"),
    ("image-beside-images", image_beside_images, {}, None, "not used: 1 entries"),
    ("xray-in-masks", xray_copied_into_masks, {}, None, None),
]
TABLE = ([("tutorial", *case) for case in CASES] + [("database", *case) for case in CASES]
         + [("database", *case) for case in DATABASE_CASES])


@pytest.mark.parametrize("layout_name, case, mutate, overrides, error, warning", TABLE,
                         ids=[f"{t[0]}-{t[1]}" for t in TABLE])
def test_bad_inputs(tmp_path, caplog, layout_name, case, mutate, overrides, error, warning):
    tree = make_tree(tmp_path / "data", layout_name, images_per_class=12, seed=2)
    mutate(tree)
    test_dir = str(tmp_path / "test") if (tmp_path / "test").exists() else ""
    config = config_lib.load("vanilla", overrides={"data_dir": str(tree.root), "test_dir": test_dir,
                                                   "classes": tree.classes, "test_per_class": 2,
                                                   **overrides})
    if error:
        with pytest.raises(DataError) as err:
            datacheck.check(data.make_splits(config.data), config.data)
        assert error in str(err.value)
        return
    with caplog.at_level("WARNING"):
        splits = datacheck.check(data.make_splits(config.data), config.data)
    warnings = "\n".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    if warning:
        assert warning in warnings
    else:
        assert not warnings
    infos = {name: [datacheck.inspect(e.path, config.data.min_image_side)
                    for e in getattr(splits, name)] for name in data.SPLITS}
    assert all(i.problem is None for name in data.SPLITS for i in infos[name])
    assert not any("/masks/" in e.path for name in data.SPLITS for e in getattr(splits, name))
    added = {"too-small-allowed": 1, "duplicate-in-split": 1, "copy-kept-together": 1,
             "nested-folder-used": 1}.get(case, 0)  # images that the mutation added and kept
    if not test_dir:  # only X-rays counted: no mask, nothing beside images/
        assert sum(map(sum, splits.counts().values())) == 12 * len(tree.classes) + added
    if case != "leak-warned":  # no image content in two splits
        train, val, test = ({i.sha256 for i in infos[name]} for name in data.SPLITS)
        assert not (train & val or train & test or val & test)


def test_skipped_bad_image_run_completes(tmp_path, tiny_config, demo_tree):
    tree = Tree(demo_tree, list(config_lib.TUTORIAL_CLASSES), TUTORIAL, "")
    corrupt(tree)
    zero_bytes(tree)
    tiny_config.data.on_bad_image = "skip"
    tiny_config.train.epochs = 1
    from trainer import train
    results = train.run(tiny_config)
    assert sum(map(sum, results["counts"].values())) == 90  # the two bad files left out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_decoding_random_bytes_never_crashes(raw):
    problem = datacheck.decode_error(raw)
    assert problem is None or problem.startswith(("empty file", "not a readable image"))


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=8, max_size=400))
def test_decoding_mangled_png_never_crashes(tail):
    image = Image.fromarray(np.zeros((40, 40), np.uint8))
    import io
    buf = io.BytesIO()
    image.save(buf, "PNG")
    raw = buf.getvalue()[:60] + tail
    problem = datacheck.decode_error(raw)
    assert problem is None or problem.startswith("not a readable image")


YAML_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8)
KEYS = st.sampled_from(["data", "model", "train", "runtime", "output", "bogus"])
LEAVES = st.sampled_from(list(config_lib.leaf_fields()) + ["bogus"])


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(KEYS, st.dictionaries(LEAVES, YAML_VALUES, max_size=4) | YAML_VALUES,
                       max_size=4))
def test_config_loader_only_raises_config_errors(raw):
    from trainer import models
    try:
        config = config_lib.from_dict(raw, "random.yaml")
        config_lib.validate(config, models.min_image_sizes())
    except ConfigError as err:
        assert str(err) and "\n" not in str(err)


CHECK_ONLY = [("clean", lambda tree: None, 0, "data check passed"),
              ("corrupt", corrupt, 3, "corrupt.png: not a readable image"),
              ("symlink-loop", symlink_loop, 3, "symlink loop")]


@pytest.mark.parametrize("layout_name", ["tutorial", "database"])
@pytest.mark.parametrize("case, mutate, status, expected", CHECK_ONLY,
                         ids=[c[0] for c in CHECK_ONLY])
def test_prepare_check_only(tmp_path, layout_name, case, mutate, status, expected):
    import subprocess
    import sys
    tree = make_tree(tmp_path / "data", layout_name, images_per_class=8, seed=5)
    mutate(tree)
    proc = subprocess.run([sys.executable, "-m", "trainer.prepare", "--check_only",
                           f"--src={tree.root}", f"--classes={','.join(tree.classes)}",
                           "--test_per_class=2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == status, proc.stderr[-2000:]
    assert expected in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # nothing written


class _Clock:
    """A clock the test moves by hand."""

    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.mark.parametrize("seconds_per_image, expected", [
    (0.001, []),  # a small tree: done before the first report, nothing printed
    (0.5, ["data check: 20/100 images (20%) 2.0/s elapsed 0:00:10 ETA 0:00:40",
           "data check: 40/100 images (40%) 2.0/s elapsed 0:00:20 ETA 0:00:30",
           "data check: 60/100 images (60%) 2.0/s elapsed 0:00:30 ETA 0:00:20",
           "data check: 80/100 images (80%) 2.0/s elapsed 0:00:40 ETA 0:00:10",
           "data check: 100/100 images (100%) 2.0/s elapsed 0:00:50 ETA 0:00:00"]),
])
def test_progress_line_every_10_s_in_a_log_and_none_for_a_quick_check(seconds_per_image,
                                                                     expected):
    import io
    from trainer.progress import Progress
    out, now = io.StringIO(), _Clock()
    bar = Progress(100, "data check", stream=out, now=now)
    for _ in range(100):
        now.t += seconds_per_image
        bar.update()
    assert out.getvalue().splitlines() == expected


def test_a_slow_data_check_reports_progress(demo_tree, monkeypatch, capsys):
    """The data check itself feeds the progress line (here made due at every image)."""
    from trainer import progress
    monkeypatch.setattr(progress, "LOG_EVERY", 0.0)
    config = config_lib.load("vanilla", overrides={"data_dir": str(demo_tree), "test_per_class": 6})
    datacheck.check(data.make_splits(config.data), config.data)
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1].startswith("data check: 90/90 images (100%) ") and "ETA 0:00:00" in lines[-1]
    assert len(lines) >= 2
