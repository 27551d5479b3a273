"""Which source (hospital, collection) each image came from: the ``manifest.csv`` of the tree
that holds it, so a test split that mixes trees (``--test_dir`` plus held-out sources of the
data folder) is broken down by the sources of both."""
from __future__ import annotations

from trainer import data


def tree_sources(examples: list, roots: list[str]) -> list[str] | None:
    """Each example's source from the manifest.csv of the root folder it lies under (the
    longest root that contains it); 'unknown' where that tree lists no source for it.
    None when no root has a manifest with sources."""
    found: list[str] = ["unknown"] * len(examples)
    any_manifest = False
    placed = [False] * len(examples)
    for root in sorted({r for r in roots if r}, key=len, reverse=True):
        prefix = root.rstrip("/") + "/"
        mine = [i for i, e in enumerate(examples) if not placed[i] and e.path.startswith(prefix)]
        for i in mine:
            placed[i] = True
        sources = data.read_sources(root, [examples[i] for i in mine]) if mine else None
        if sources is None:
            continue
        any_manifest = True
        for i, source in zip(mine, sources):
            found[i] = source
    return found if any_manifest else None
