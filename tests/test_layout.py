"""Class-folder layouts: the tutorial's flat folders and the current COVID-19 Radiography
Database's images/ + masks/ (a mask is never an image), metadata sheets as sources, and a
whole run on a generated tree of the database's layout."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainer import config as config_lib, data, datacheck, demo_data, layout, sources
from trainer.errors import DataError

CLASSES = list(demo_data.DATABASE_CLASSES)


def _tree(folder: Path, files: list[str]) -> None:
    """Writes each relative path: images as distinct small PNGs, anything else as text."""
    for i, rel in enumerate(files):
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if layout.is_image(rel):
            Image.fromarray(np.full((40, 40), i * 7 % 256, np.uint8)).save(path, "PNG")
        else:
            path.write_text("notes")


# (case, files in one class folder, images used, {image: mask}, unpaired masks, unused,
#  nested sub-folders used, non-image files)
LAYOUTS = [
    ("flat", ["a.png", "b.jpg", "notes.txt"], ["a.png", "b.jpg"], {}, [], [], {}, ["notes.txt"]),
    ("flat-nested", ["a.png", "sub/b.png"], ["a.png", "sub/b.png"], {}, [], [], {"sub": 1}, []),
    ("flat-masks", ["a.png", "masks/a.png"], ["a.png"], {"a.png": "masks/a.png"}, [], [], {}, []),
    ("database", ["images/x.png", "images/y.png", "masks/x.png", "masks/z.png"],
     ["x.png", "y.png"], {"x.png": "masks/x.png"}, ["masks/z.png"], [], {}, []),
    ("database-any-case", ["Images/x.PNG", "MASKS/X.png"], ["x.PNG"], {"x.PNG": "MASKS/X.png"},
     [], [], {}, []),
    ("mask-other-extension", ["images/x.png", "masks/x.jpg"], ["x.png"], {"x.png": "masks/x.jpg"},
     [], [], {}, []),
    ("database-extras", ["images/x.png", "extra/y.png", "loose.png", "notes.txt",
                         "images/readme.md"],
     ["x.png"], {}, [], ["extra", "loose.png"], {}, ["images/readme.md", "notes.txt"]),
    ("database-nested", ["images/a/x.png", "images/y.png"], ["a/x.png", "y.png"], {}, [], [],
     {"a": 1}, []),
]


@pytest.mark.parametrize("case, files, images, masks, unpaired, unused, nested, non_images",
                         LAYOUTS, ids=[c[0] for c in LAYOUTS])
def test_class_folder_layouts(tmp_path, case, files, images, masks, unpaired, unused, nested,
                              non_images):
    _tree(tmp_path, files)
    found = layout.scan_class(str(tmp_path))
    assert list(found.images) == images
    assert found.masks == {k: str(tmp_path / v) for k, v in masks.items()}
    assert list(found.unpaired_masks) == [str(tmp_path / m) for m in unpaired]
    assert list(found.unused) == [str(tmp_path / u) for u in unused]
    assert found.nested == nested
    assert list(found.non_images) == [str(tmp_path / n) for n in non_images]
    assert all(os.path.isfile(os.path.join(found.image_root, rel)) for rel in found.images)


@pytest.mark.parametrize("files, message", [
    (["images/readme.txt", "masks/a.png"], "COVID/images: class folder holds no images"),
    (["masks/a.png"], "COVID: class folder holds no images"),
], ids=["empty-images-folder", "masks-only"])
def test_class_folders_without_xrays_are_refused(tmp_path, files, message):
    for cls in ("COVID", "Normal"):
        _tree(tmp_path / cls, files if cls == "COVID" else ["images/n.png"])
    with pytest.raises(DataError) as err:
        data.list_examples(str(tmp_path), ["COVID", "Normal"])
    assert message in str(err.value)


@pytest.fixture
def database(tmp_path) -> Path:
    return demo_data.generate_database(tmp_path / demo_data.DATABASE_DIR, images_per_class=10,
                                       seed=3)


def test_database_lists_only_xrays_each_paired_with_its_mask(database):
    examples = data.list_examples(str(database), CLASSES)
    assert len(examples) == 40
    for e in examples:
        assert Path(e.path).parent.name == "images" and Image.open(e.path).size == (64, 64)
        assert Path(e.mask) == database / CLASSES[e.label] / "masks" / e.relpath
        assert Image.open(e.mask).size == (48, 48)  # a mask, never read as an X-ray


def test_data_check_reports_what_it_found_and_used(database, caplog):
    (database / "COVID" / "extra").mkdir()
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(database / "COVID" / "extra" / "x.png")
    (database / "Normal" / "masks" / "orphan.png").write_bytes(
        (database / "Normal" / "masks" / "Normal-1.png").read_bytes())
    config = config_lib.load("vanilla", overrides={"data_dir": str(database), "classes": CLASSES,
                                                   "test_per_class": 2})
    with caplog.at_level("INFO"):
        splits = datacheck.check(data.make_splits(config.data), config.data)
    log = "\n".join(r.getMessage() for r in caplog.records)
    assert sum(map(sum, splits.counts().values())) == 40
    assert "checking 40 images" in log
    assert f"{database / 'COVID'}: 10 images from images/; 10 lung masks paired" in log
    assert "(1 masks match no image)" in log
    assert "not used: 1 entries beside a class's images/ folder" in log
    assert str(database / "COVID" / "extra") in log
    assert "not class images (metadata sheets, readme): COVID.metadata.xlsx" in log


@pytest.mark.parametrize("url, expected", [
    ("https://www.kaggle.com/c/rsna-pneumonia-detection-challenge/data",
     "kaggle.com/c/rsna-pneumonia-detection-challenge"),
    ("https://github.com/ieee8023/covid-chestxray-dataset/tree/master/images",
     "github.com/ieee8023/covid-chestxray-dataset"),
    ("https://sirm.org/category/senza-categoria/covid-19/", "sirm.org"),
    ("HTTPS://Eurorad.org", "eurorad.org"),
    ("padchest", "padchest"),
    ("  ", "unknown"),
])
def test_source_names_from_urls(url, expected):
    assert sources.site(url) == expected


def test_sources_from_the_metadata_sheets(database):
    examples = data.list_examples(str(database), CLASSES)
    found = dict(zip((e.relpath for e in examples), data.read_sources(str(database), examples)))
    assert found["COVID-1.png"] == "github.com/ieee8023/covid-chestxray-dataset"
    assert found["COVID-2.png"] == "sirm.org"
    assert found["Normal-2.png"] == "kaggle.com/paultimothymooney/chest-xray-pneumonia"  # NORMAL-2
    assert found["Viral Pneumonia-3.png"] == "kaggle.com/paultimothymooney/chest-xray-pneumonia"
    assert "unknown" not in found.values()


def test_manifest_csv_comes_before_the_sheets(database):
    (database / "manifest.csv").write_text("relpath,source\nCOVID/images/COVID-1.png,padchest\n")
    examples = data.list_examples(str(database), CLASSES)
    found = dict(zip((e.relpath for e in examples), data.read_sources(str(database), examples)))
    assert found["COVID-1.png"] == "padchest" and found["COVID-2.png"] == "sirm.org"


@pytest.mark.parametrize("content, warning", [
    (b"not a workbook", "COVID.metadata.xlsx: not read (BadZipFile"),
    (None, "COVID.metadata.xlsx: no FILE NAME and URL columns"),
], ids=["corrupt", "no-columns"])
def test_an_unreadable_sheet_costs_its_sources_only(database, caplog, content, warning):
    sheet = database / "COVID.metadata.xlsx"
    if content is None:
        demo_data.write_sheet(sheet, [])
        import openpyxl
        book = openpyxl.load_workbook(sheet)
        book.active.delete_rows(1)
        book.active.append(["NAME", "LINK"])
        book.save(sheet)
    else:
        sheet.write_bytes(content)
    examples = data.list_examples(str(database), CLASSES)
    with caplog.at_level("WARNING"):
        found = data.read_sources(str(database), examples)
    assert warning in caplog.text
    assert {s for e, s in zip(examples, found) if e.label == 0} == {"unknown"}
    assert {s for e, s in zip(examples, found) if e.label == 2} == {
        "kaggle.com/c/rsna-pneumonia-detection-challenge"}


def test_holdout_of_a_site_named_in_the_sheets(database):
    config = config_lib.load("vanilla", overrides={
        "data_dir": str(database), "classes": CLASSES, "test_per_class": 1,
        "holdout_sources": ["sirm.org"]})
    splits = data.make_splits(config.data)
    held = [e for e in splits.test if e.label == 0]
    assert len(held) == 1 + 3  # COVID-2, -5, -8 are from sirm.org, plus one held-out test image
    for name in ("train", "val"):
        assert "sirm.org" not in data.read_sources(str(database), getattr(splits, name))


def test_a_run_on_the_database_layout_counts_only_xrays(tmp_path):
    """The issue's acceptance run: four classes, distinct masks, sheets and readme at the
    top; every count in the log and metrics.json is an X-ray count (masks would double it)."""
    root = demo_data.generate_database(tmp_path / demo_data.DATABASE_DIR, images_per_class=16,
                                       seed=4)
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.task", "--model=vanilla", f"--data_dir={root}",
         "--classes=COVID,Normal,Lung_Opacity,Viral Pneumonia", "--image_size=16", "--epochs=2",
         "--batch_size=16", "--test_per_class=3", f"--model_dir={run}"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checking 64 images" in proc.stderr
    assert "train split:    40 images" in proc.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["counts"] == {"train": [10] * 4, "val": [3] * 4, "test": [3] * 4}
    assert metrics["classes"] == CLASSES
    assert sum(v["n"] for v in metrics["sources"]["by_source"].values()) == 12
    assert "COVID" in metrics["sources"]["confounded_classes"]  # no other class shares its sites
