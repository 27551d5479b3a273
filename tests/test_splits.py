"""Source-aware validation: patient-grouped splits, a held-out validation source, and per-source
test metrics for test trees with their own manifest.csv."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from conftest import tree_with_sources
from trainer import config as config_lib, data, demo_data, models, sources
from trainer.errors import ConfigError, DataError

KERMANY = r"(person\d+)_|IM-(\d+)-"


def _tutorial_split(examples, n_classes, validation_split, test_per_class, seed):
    """data.split_examples as it was before group_by (dd5ed07), the reference for group_by=''."""
    out = {name: [] for name in data.SPLITS}
    for label in range(n_classes):
        ranked = sorted((e for e in examples if e.label == label),
                        key=lambda e: data.split_rank(e.relpath, seed))
        n_test = min(test_per_class, len(ranked))
        rest = ranked[n_test:]
        n_val = int(round(len(rest) * validation_split))
        out["test"] += ranked[:n_test]
        out["val"] += rest[:n_val]
        out["train"] += rest[n_val:]
    return out


def _examples(files: list[tuple[int, str]]) -> list[data.Example]:
    return [data.Example(f"/d/{label}/{rel}", rel, label) for label, rel in files]


# Files: (label, patient, image, kind). Patients 0..29 with up to 10 images, in one class or
# several; names like Kermany's (person<N>_..., IM-<N>-<k>, in sub-folders too) or without a
# patient (kind 2: a group of its own).
PATIENT_FILES = st.lists(
    st.tuples(st.integers(0, 2), st.integers(0, 29), st.integers(0, 9), st.integers(0, 2)),
    min_size=1, max_size=120, unique_by=lambda t: t)


def _names(drawn) -> list[tuple[int, str]]:
    names = {0: "sub/person{p}_virus_{k}.jpeg", 1: "IM-{p:04d}-{k:04d}.jpeg",
             2: "scan-{p}-{k}.png"}
    return [(label, names[kind].format(p=p, k=k)) for label, p, k, kind in drawn]


@settings(max_examples=150, deadline=None)
@given(PATIENT_FILES, st.floats(0, 0.9), st.integers(0, 8), st.integers(0, 3))
def test_grouped_splits_never_share_a_group(drawn, validation_split, test_per_class, seed):
    examples = _examples(_names(drawn))
    parts = data.split_examples(examples, 3, validation_split, test_per_class, seed, KERMANY)
    where: dict = {}
    for name in data.SPLITS:
        for e in parts[name]:
            group = data.split_group(e, re.compile(KERMANY))
            assert where.setdefault(group, name) == name, (group, where[group], name)
    assert sorted(e.path for name in data.SPLITS for e in parts[name]) == \
        sorted(e.path for e in examples)
    for label in range(3):  # stratified: every class still fills its test share
        n = sum(e.label == label for e in examples)
        assert sum(e.label == label for e in parts["test"]) >= min(test_per_class, n)


@settings(max_examples=60, deadline=None)
@given(PATIENT_FILES, st.integers(0, 5), st.randoms())
def test_grouped_splits_are_deterministic_whatever_the_listing_order(drawn, seed, rnd):
    examples = _examples(_names(drawn))
    shuffled = examples[:]
    rnd.shuffle(shuffled)
    first = data.split_examples(examples, 3, 0.2, 3, seed, KERMANY)
    second = data.split_examples(shuffled, 3, 0.2, 3, seed, KERMANY)
    assert first == second


@settings(max_examples=100, deadline=None)
@given(PATIENT_FILES, st.floats(0, 0.9), st.integers(0, 8), st.integers(0, 3))
def test_no_group_by_is_exactly_the_tutorial_split(drawn, validation_split, test_per_class, seed):
    examples = _examples(_names(drawn))
    assert data.split_examples(examples, 3, validation_split, test_per_class, seed) == \
        _tutorial_split(examples, 3, validation_split, test_per_class, seed)


def test_no_group_by_keeps_the_tutorial_split_of_the_original_database():
    examples = [data.Example(f"/d/{label}/img{i}.png", f"img{i}.png", label)
                for label, n in enumerate([219, 1341, 1345]) for i in range(n)]
    assert data.split_examples(examples, 3, 0.2, 40, 28) == \
        _tutorial_split(examples, 3, 0.2, 40, 28)


GROUPS = [  # relpath -> the group key, for KERMANY
    ("person1_virus_1.jpeg", ("group", "person1")),
    ("kermany-person124_virus_248.jpg", ("group", "person124")),
    ("kermany-IM-0301-0001.jpg", ("group", "0301")),
    ("kermany-NORMAL2-IM-0301-0002.jpg", ("group", "0301")),  # both numberings: one patient
    ("sub/dir/person7_bacteria_3.png", ("group", "person7")),
    ("cxnet-001.jpg", ("file", 0, "cxnet-001.jpg")),
    ("personX_virus.jpg", ("file", 0, "personX_virus.jpg")),
]


@pytest.mark.parametrize("relpath, expected", GROUPS)
def test_split_group(relpath, expected):
    example = data.Example(f"/d/0/{relpath}", relpath, 0)
    assert data.split_group(example, re.compile(KERMANY)) == expected


def test_a_patient_in_two_classes_stays_in_one_split():
    files = [(0, f"person{p}_virus_{k}.jpeg") for p in range(20) for k in range(2)]
    files += [(1, f"person{p}_virus_9.jpeg") for p in range(20)]  # the same patients, class 1
    parts = data.split_examples(_examples(files), 2, 0.3, 4, 1, KERMANY)
    split_of = {}
    for name in data.SPLITS:
        for e in parts[name]:
            patient = e.relpath.split("_")[0]
            assert split_of.setdefault(patient, name) == name


def test_grouped_split_of_the_real_cxr3_tree(cxr3):
    config = config_lib.load("robust", overrides={"data_dir": str(cxr3)})
    splits = data.make_splits(config.data)
    pattern = re.compile(config.data.group_by)
    seen = {}
    for name in data.SPLITS:
        for e in getattr(splits, name):
            group = data.split_group(e, pattern)
            if group[0] == "group":
                assert seen.setdefault(group, name) == name
    assert len(seen) > 2000  # Kermany patients found
    counts = splits.counts()
    assert all(n >= config.data.test_per_class for n in counts["test"])
    assert [sum(c) for c in zip(*counts.values())] == [921, 1341, 1345]


# --- validation on a held-out source --------------------------------------------------------

def _tree_with_sources(root: Path) -> Path:
    """COVID-19 from sources a and b, the rest from k and m."""
    return tree_with_sources(root, ("a", "b"), ("k", "m"))


def test_val_sources_covering_every_class_are_the_whole_validation_split(tmp_path):
    root = _tree_with_sources(tmp_path / "data")
    config = config_lib.load("vanilla", overrides={"data_dir": str(root), "test_per_class": 2,
                                                   "val_sources": ["b", "m"]})
    splits = data.make_splits(config.data)
    split_sources = {name: set(data.read_sources(str(root), getattr(splits, name)))
                     for name in data.SPLITS}
    assert split_sources["val"] == {"b", "m"}
    assert not split_sources["train"] & {"b", "m"} and not split_sources["test"] & {"b", "m"}
    assert splits.counts()["val"] == [10, 10, 10]  # every image of b and m, nothing else
    assert splits.counts()["test"] == [2, 2, 2]
    assert splits.counts()["train"] == [8, 8, 8]  # nothing from validation_split


@pytest.mark.parametrize("validation_split, val, train", [
    (0.25, [2, 10, 10], [6, 8, 8]),  # COVID-19, which m lacks, is validated on a's images
    (0.0, [0, 10, 10], [8, 8, 8]),   # 0: the val source alone, one class left unvalidated
])
def test_val_and_holdout_sources_together(tmp_path, validation_split, val, train):
    root = _tree_with_sources(tmp_path / "data")
    config = config_lib.load("vanilla", overrides={
        "data_dir": str(root), "test_per_class": 2, "validation_split": validation_split,
        "val_sources": ["m"], "holdout_sources": ["b"]})
    splits = data.make_splits(config.data)
    counts = splits.counts()
    assert counts["val"] == val and counts["test"] == [12, 2, 2] and counts["train"] == train
    val_sources = data.read_sources(str(root), splits.val)
    assert {(e.label, s) for e, s in zip(splits.val, val_sources)} <= {(0, "a"), (1, "m"),
                                                                       (2, "m")}


@pytest.mark.parametrize("val_sources, validation_split, expected", [
    ([], 0.2, [0.2, 0.2, 0.2]),
    (["m"], 0.2, [0.2, 0.0, 0.0]),
    (["b"], 0.3, [0.0, 0.3, 0.3]),
    (["b", "m"], 0.2, [0.0, 0.0, 0.0]),
    (["m"], 0.0, [0.0, 0.0, 0.0]),
])
def test_validation_shares_fill_the_classes_the_val_sources_lack(tmp_path, val_sources,
                                                                  validation_split, expected):
    root = _tree_with_sources(tmp_path / "data")
    config = config_lib.load("vanilla", overrides={
        "data_dir": str(root), "validation_split": validation_split, "val_sources": val_sources})
    examples = data.list_examples(str(root), config.data.classes)
    _, validation, _ = data.hold_out_sources(examples, config.data)
    assert data.validation_shares(config.data, validation) == expected


def test_a_share_per_class_splits_each_class_by_its_own():
    files = [(label, f"f{label}-{i}.png") for label in range(3) for i in range(20)]
    parts = data.split_examples(_examples(files), 3, [0.5, 0.0, 0.25], 0, 1)
    assert [sum(e.label == c for e in parts["val"]) for c in range(3)] == [10, 0, 5]


@pytest.mark.parametrize("manifest, overrides, message", [
    (None, {"holdout_sources": ["b"]}, "--holdout_sources needs"),
    ("relpath,label\n", {"holdout_sources": ["b"]}, "--holdout_sources needs"),
    ("relpath,label,source\nCOVID-19/demo-000.png,COVID-19,a\n", {"holdout_sources": ["z"]},
     "--holdout_sources: no images from z in manifest.csv (sources: a, unknown)"),
    (None, {"val_sources": ["b"]}, "--val_sources needs"),
    ("relpath,label\n", {"val_sources": ["b"]}, "--val_sources needs"),
    ("relpath,label,source\nCOVID-19/demo-000.png,COVID-19,a\n", {"val_sources": ["z"]},
     "--val_sources: no images from z in manifest.csv (sources: a, unknown)"),
    ("relpath,label,source\nCOVID-19/demo-000.png,COVID-19,a\n",
     {"val_sources": ["a"], "holdout_sources": ["z"]},
     "--holdout_sources: no images from z in manifest.csv"),
])
def test_bad_holdout_or_val_sources(tmp_path, manifest, overrides, message):
    root = tmp_path / "data"
    demo_data.generate(root, images_per_class=4, seed=4)
    if manifest is not None:
        (root / "manifest.csv").write_text(manifest)
    config = config_lib.load("vanilla", overrides={"data_dir": str(root), "test_per_class": 1,
                                                   **overrides})
    with pytest.raises(DataError) as err:
        data.make_splits(config.data)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("flag", ["holdout_sources", "val_sources"])
def test_taking_every_source_of_a_class_out_of_training_is_refused(tmp_path, flag):
    root = _tree_with_sources(tmp_path / "data")
    config = config_lib.load("vanilla", overrides={"data_dir": str(root), "test_per_class": 2,
                                                   flag: ["a", "b"]})
    with pytest.raises(DataError, match="training split has no images of class 'COVID-19'"):
        data.make_splits(config.data)


# --- per-source metrics of test trees with their own manifest -------------------------------

def _test_tree(root: Path) -> Path:
    """A separate test tree whose manifest.csv names its own sources x (COVID-19) and y."""
    demo_data.generate(root, images_per_class=3, seed=9)
    rows = ["relpath,label,source"]
    for cls in config_lib.TUTORIAL_CLASSES:
        rows += [f"{cls}/{f.name},{cls},{'x' if cls == 'COVID-19' else 'y'}"
                 for f in sorted((root / cls).iterdir())]
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root


def test_tree_sources_reads_each_images_own_manifest(tmp_path):
    train_root = _tree_with_sources(tmp_path / "data")
    test_root = _test_tree(tmp_path / "data-test")  # shares a prefix with data/
    config = config_lib.load("vanilla", overrides={"data_dir": str(train_root),
                                                   "test_dir": str(test_root),
                                                   "holdout_sources": ["b"]})
    test = data.make_splits(config.data).test
    found = sources.tree_sources(test, [str(train_root), str(test_root)])
    assert sorted(set(found)) == ["b", "x", "y"]
    assert found.count("x") == 3 and found.count("y") == 6 and found.count("b") == 10
    assert data.read_sources(str(train_root), test).count("unknown") == 9  # what it was before
    assert sources.tree_sources(test, [str(tmp_path / "elsewhere")]) is None


def test_evaluate_breaks_a_test_tree_down_by_its_own_sources(tmp_path):
    from trainer import evaluate, train
    train_root = _tree_with_sources(tmp_path / "data")
    test_root = _test_tree(tmp_path / "data-test")
    config = config_lib.load("vanilla", overrides={
        "data_dir": str(train_root), "test_dir": str(test_root), "holdout_sources": ["b"],
        "image_size": 8, "epochs": 1, "batch_size": 16, "model_dir": str(tmp_path / "run")})
    trained = train.run(config)
    expected = {"b": 10, "x": 3, "y": 6}
    assert {k: v["n"] for k, v in trained["sources"]["by_source"].items()} == expected
    _, own = evaluate.evaluate(evaluate.Options(str(tmp_path / "run")))
    assert {k: v["n"] for k, v in own["sources"]["by_source"].items()} == expected
    assert own["confusion_matrix"] == trained["confusion_matrix"]
    _, other = evaluate.evaluate(evaluate.Options(str(tmp_path / "run"),
                                                  overrides={"test_dir": str(test_root)}))
    assert {k: v["n"] for k, v in other["sources"]["by_source"].items()} == {"x": 3, "y": 6}


# --- config validation of the new data keys -------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    ({"group_by": "person"}, "data.group_by (--group_by) needs a capture group"),
    ({"group_by": "person(\\d+"}, "data.group_by (--group_by) is not a valid regular expression"),
    ({"val_sources": ["a"], "holdout_sources": ["a", "b"]},
     "--val_sources) and data.holdout_sources (--holdout_sources) both name a"),
])
def test_bad_split_options_are_config_errors(overrides, message):
    config = config_lib.load("vanilla", overrides=overrides)
    with pytest.raises(ConfigError) as err:
        config_lib.validate(config, models.min_image_sizes())
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("overrides", [{"group_by": ""}, {"group_by": KERMANY},
                                       {"group_by": "^([^_]+)_"}, {"val_sources": ["a"]},
                                       {"val_sources": ["a"], "holdout_sources": ["b"]}])
def test_good_split_options_validate(overrides):
    config_lib.validate(config_lib.load("vanilla", overrides=overrides), models.min_image_sizes())
