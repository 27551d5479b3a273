"""Leave-one-source-out study: how recipes do on a hospital/source they never trained on.

    python bench/leave_source_out.py --data=../shared/data/cxr3 --out=/tmp/loso \
        --variant vanilla=--model=vanilla --variant robust=--model=robust \
        --holdout=hannover --holdout=cxnet --seeds=1,2,3

Each (variant, held-out source, seed) is one ``python -m trainer.task`` run in its own process
with ``--holdout_sources=SOURCE --seed=SEED``: every image of that source goes to the test
split and none to training or validation. What counts is the accuracy on those images (read
from the run's per-source breakdown in metrics.json); the in-distribution test accuracy is
printed beside it and is optimistic. Results are appended to OUT/results.jsonl, so an
interrupted study resumes where it stopped; the summary gives, per variant and source, the
median over seeds with the Wilson 95% interval of the median run, and writes OUT/summary.md.

``--split_source=kermany:NORMAL2-=kermany-later`` names a sub-collection a source of its own:
files of source ``kermany`` whose path matches the regular expression ``NORMAL2-`` become
``kermany-later``. The runs then read a view of the tree in OUT/data (links to the images, the
manifest rewritten), so a later collection of one hospital can be held out like a hospital.

``--holdout=cxnet+kermany-later`` holds out several sources in one run; their union is then the
held-out set. Where it holds more than one class, its macro-F1 (over the classes it holds) and
recall per class are given beside its accuracy: a held-out set of one class measures only that
class's sensitivity, which a model biased towards the class wins. The in-distribution recall
per class is given for the same reason.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, sep, flags = text.partition("=")
    if not sep or not name:
        raise SystemExit(f"error: --variant takes NAME=FLAGS, got {text!r}")
    return name, shlex.split(flags)


def split_source_view(data: Path, out: Path, rules: list[str]) -> Path:
    """OUT/data: links to every entry of ``data`` and a manifest.csv whose sources follow the
    ``SOURCE:REGEX=NEW`` rules (a file of SOURCE whose path REGEX matches is NEW)."""
    parsed = []
    for rule in rules:
        source, _, rest = rule.partition(":")
        pattern, _, new = rest.rpartition("=")
        if not (source and pattern and new):
            raise SystemExit(f"error: --split_source takes SOURCE:REGEX=NEW, got {rule!r}")
        try:
            parsed.append((source, re.compile(pattern), new))
        except re.error as e:
            raise SystemExit(f"error: --split_source {rule!r}: {pattern!r} is no regular "
                             f"expression ({e})")
    view = out / "data"
    view.mkdir(parents=True, exist_ok=True)
    for entry in data.iterdir():
        link = view / entry.name
        if entry.name != "manifest.csv" and not link.exists():
            link.symlink_to(entry.resolve())
    rows = list(csv.DictReader(io.StringIO((data / "manifest.csv").read_text())))
    for row in rows:
        for source, pattern, new in parsed:
            if row["source"] == source and pattern.search(row["relpath"]):
                row["source"] = new
    with open(view / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return view


def run_once(data: str, out: Path, name: str, flags: list[str], source: str, seed: int,
             extra: list[str]) -> dict:
    """One training run with ``source`` held out; its figures on that source and in
    distribution."""
    model_dir = out / f"{name}-{source}-seed{seed}"
    args = [sys.executable, "-m", "trainer.task", f"--data_dir={data}", *flags, *extra,
            f"--holdout_sources={source.replace('+', ',')}", f"--seed={seed}",
            f"--model_dir={model_dir}", "--overwrite"]
    started = time.monotonic()
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"error: {' '.join(args)} failed ({done.returncode}):\n"
                         f"{done.stderr[-3000:]}")
    results = json.loads((model_dir / "metrics.json").read_text())
    by_source = results["sources"]["by_source"]
    held_names = source.split("+")
    held = pooled([v for k, v in by_source.items() if k in held_names])
    seen = pooled([v for k, v in by_source.items() if k not in held_names])
    return {"variant": name, "flags": flags + extra, "source": source, "seed": seed,
            "held_out_n": held["n"], "held_out_correct": held["correct_n"],
            "held_out_predicted": held["predicted"], "held_out_true": held["true"],
            "held_out_correct_by_class": held["correct"],
            "in_distribution_accuracy": seen["correct_n"] / seen["n"] if seen["n"] else None,
            "in_distribution_recall": recall(seen),
            "last_epoch": results.get("last_epoch"), "seconds": round(seconds, 1)}


def pooled(parts: list[dict]) -> dict:
    """metrics.json's per-source entries added up: n, per class true, predicted and correct
    counts, and correct_n (their correct ones together)."""
    total = {"n": sum(p["n"] for p in parts)}
    for key in ("true", "predicted", "correct"):
        total[key] = {}
        for part in parts:
            for label, count in part[key].items():
                total[key][label] = total[key].get(label, 0) + count
    total["correct_n"] = sum(total["correct"].values())
    return total


def recall(counts: dict) -> dict:
    """Recall of every class the counts hold."""
    return {c: counts["correct"][c] / n for c, n in counts["true"].items() if n}


def macro_f1(row: dict) -> float | None:
    """Macro-F1 of a held-out set over the classes it holds (None for one class)."""
    true, predicted = row.get("held_out_true", {}), row.get("held_out_predicted", {})
    correct = row.get("held_out_correct_by_class", {})
    present = [c for c, n in true.items() if n]
    if len(present) < 2:
        return None
    return statistics.mean(2 * correct[c] / (true[c] + predicted[c]) for c in present)


def summarise(rows: list[dict]) -> str:
    from trainer.metrics import wilson_interval
    lines = ["| variant | held-out source | seeds | held-out accuracy, median (95% CI of that run) "
             "| per seed | held-out macro-F1, median | held-out recall per class, medians "
             "| in-distribution test accuracy (optimistic), median "
             "| in-distribution recall per class, medians | minutes/run |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    keys = list(dict.fromkeys((r["variant"], r["source"]) for r in rows))
    for variant, source in keys:
        mine = sorted((r for r in rows if (r["variant"], r["source"]) == (variant, source)),
                      key=lambda r: r["held_out_correct"] / r["held_out_n"])
        middle = mine[(len(mine) - 1) // 2]
        low, high = wilson_interval(middle["held_out_correct"], middle["held_out_n"])
        per_seed = ", ".join(f"{r['held_out_correct'] / r['held_out_n']:.3f}" for r in
                             sorted(mine, key=lambda r: r["seed"]))
        seen = statistics.median(r["in_distribution_accuracy"] for r in mine)
        minutes = statistics.median(r["seconds"] for r in mine) / 60
        f1s = [f for f in (macro_f1(r) for r in mine) if f is not None]
        f1 = f"{statistics.median(f1s):.3f}" if f1s else "-"
        held_recall = [recall({"true": r["held_out_true"],
                               "correct": r["held_out_correct_by_class"]})
                       for r in mine if "held_out_correct_by_class" in r]
        seen_recall = [r["in_distribution_recall"] for r in mine if "in_distribution_recall" in r]
        lines.append(f"| {variant} | {source} (n={middle['held_out_n']}) | {len(mine)} | "
                     f"{middle['held_out_correct'] / middle['held_out_n']:.3f} "
                     f"[{low:.3f}, {high:.3f}] | {per_seed} | {f1} | "
                     f"{median_recall(held_recall)} | {seen:.3f} | "
                     f"{median_recall(seen_recall)} | "
                     f"{minutes:.1f} |")
    return "\n".join(lines)


def median_recall(recalls: list[dict]) -> str:
    """'COVID-19 0.95, NORMAL 0.90' from per-run recalls (medians per class), '-' if none."""
    if not recalls:
        return "-"
    return ", ".join(f"{c} {statistics.median(r[c] for r in recalls):.3f}" for c in recalls[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="tree with manifest.csv (source column)")
    parser.add_argument("--out", required=True, help="folder for the runs and results.jsonl")
    parser.add_argument("--variant", action="append", required=True, help="NAME=FLAGS")
    parser.add_argument("--holdout", action="append", required=True,
                        help="a source to hold out, or several joined by +")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--extra", default="", help="flags added to every run")
    parser.add_argument("--split_source", action="append", default=[],
                        help="SOURCE:REGEX=NEW: a sub-collection as a source of its own")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = str(split_source_view(Path(args.data), out, args.split_source)) \
        if args.split_source else args.data
    results_path = out / "results.jsonl"
    rows = [json.loads(line) for line in results_path.read_text().splitlines()] \
        if results_path.exists() else []
    done = {(r["variant"], r["source"], r["seed"]) for r in rows}
    variants = [parse_variant(v) for v in args.variant]
    seeds = [int(s) for s in args.seeds.split(",")]
    extra = shlex.split(args.extra)
    plan = [(n, f, s, k) for n, f in variants for s in args.holdout for k in seeds
            if (n, s, k) not in done]
    for i, (name, flags, source, seed) in enumerate(plan, 1):
        print(f"[{i}/{len(plan)}] {name}, {source} held out, seed {seed} ...", flush=True)
        row = run_once(data, out, name, flags, source, seed, extra)
        print(f"    held-out accuracy {row['held_out_correct']}/{row['held_out_n']}, "
              f"in distribution {row['in_distribution_accuracy']:.3f}, {row['seconds']:.0f} s",
              flush=True)
        with open(results_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        rows.append(row)
    summary = summarise(rows)
    (out / "summary.md").write_text(summary + "\n")
    print(summary)


if __name__ == "__main__":
    main()
