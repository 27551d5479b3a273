"""bench/leave_source_out.py's arithmetic and source rules: the figures docs/generalisation.md
reports come from these functions."""
from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("leave_source_out",
                                               REPO / "bench" / "leave_source_out.py")
loso = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(loso)

CLASSES = ["COVID-19", "NORMAL", "Viral Pneumonia"]


def _entry(true, predicted, correct):
    n = sum(true)
    return {"n": n, "accuracy": sum(correct) / n, "true": dict(zip(CLASSES, true)),
            "predicted": dict(zip(CLASSES, predicted)), "correct": dict(zip(CLASSES, correct))}


def test_pooled_adds_up_sources():
    total = loso.pooled([_entry([10, 0, 0], [8, 1, 1], [8, 0, 0]),
                         _entry([0, 5, 5], [0, 7, 3], [0, 4, 2])])
    assert (total["n"], total["correct_n"]) == (20, 14)
    assert total["true"] == {"COVID-19": 10, "NORMAL": 5, "Viral Pneumonia": 5}
    assert total["predicted"] == {"COVID-19": 8, "NORMAL": 8, "Viral Pneumonia": 4}
    assert loso.recall(total) == {"COVID-19": 0.8, "NORMAL": 0.8, "Viral Pneumonia": 0.4}


@pytest.mark.parametrize("true, predicted, correct, expected", [
    ([0, 10, 0], [0, 10, 0], [0, 10, 0], None),  # one class: no macro-F1
    ([0, 10, 10], [0, 10, 10], [0, 10, 10], 1.0),
    ([0, 10, 10], [0, 20, 0], [0, 10, 0], (2 * 10 / 30 + 0) / 2),  # all called NORMAL
    ([5, 5, 0], [2, 6, 2], [2, 4, 0], (2 * 2 / 7 + 2 * 4 / 11) / 2),  # a class predicted, absent
])
def test_macro_f1_over_the_classes_held_out(true, predicted, correct, expected):
    row = {"held_out_true": dict(zip(CLASSES, true)),
           "held_out_predicted": dict(zip(CLASSES, predicted)),
           "held_out_correct_by_class": dict(zip(CLASSES, correct))}
    assert loso.macro_f1(row) == (None if expected is None else pytest.approx(expected))


def test_split_source_rules_are_regular_expressions(tmp_path):
    data = tmp_path / "data"
    (data / "NORMAL").mkdir(parents=True)
    rows = [("NORMAL/k-IM-0001.jpg", "kermany"), ("NORMAL/k-NORMAL2-IM-0002.jpg", "kermany"),
            ("V/k-person1200_virus_1.jpg", "kermany"), ("V/k-person120_virus_2.jpg", "kermany"),
            ("C/x-NORMAL2-1.jpg", "cxnet")]
    with open(data / "manifest.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["relpath", "label", "source"])
        writer.writerows((rel, rel.split("/")[0], source) for rel, source in rows)
    view = loso.split_source_view(data, tmp_path / "out", [
        "kermany:NORMAL2-=kermany-later", r"kermany:person1[2-9]\d\d_=kermany-p1200"])
    got = {r["relpath"]: r["source"] for r in csv.DictReader(open(view / "manifest.csv"))}
    assert list(got.values()) == ["kermany", "kermany-later", "kermany-p1200", "kermany",
                                  "cxnet"]
    assert (view / "NORMAL").resolve() == (data / "NORMAL").resolve()


@pytest.mark.parametrize("rule", ["kermany", "kermany:NORMAL2-", ":x=y", "kermany:(=new"])
def test_bad_split_source_rules_are_refused(tmp_path, rule):
    (tmp_path / "manifest.csv").write_text("relpath,label,source\n")
    with pytest.raises(SystemExit, match="--split_source"):
        loso.split_source_view(tmp_path, tmp_path / "out", [rule])
