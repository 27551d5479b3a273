"""Where each image came from (hospital, archive, web site): the ``source`` of the per-source
test breakdown and of --holdout_sources.

Read, per image, from the first that has it: the image itself (a prepared dataset stores its
source), ROOT/manifest.csv (columns relpath, source; relpath from ROOT), the COVID-19
Radiography Database's metadata sheets (ROOT/CLASS.metadata.xlsx, columns FILE NAME and URL:
the URL's site names the source); else 'unknown'. Sheets are read with openpyxl, imported
only when a sheet is there.
"""
from __future__ import annotations

import csv
import io
import os
import posixpath
import urllib.parse

from absl import logging

from trainer import layout, storage

SOURCES_FILE = "manifest.csv"
SHEET_SUFFIX = ".metadata.xlsx"
UNKNOWN = "unknown"
# Sites that host many unrelated collections: their first two path parts name the collection.
COLLECTION_HOSTS = ("github.com", "kaggle.com")


def read_sources(root: str, examples: list) -> list[str] | None:
    """Each example's source, or None when nothing says where any image came from."""
    if examples and any(getattr(e, "source", "") for e in examples):
        return [e.source or UNKNOWN for e in examples]
    if not root:
        return None
    rels = [_from_root(root, e.path) for e in examples]
    listed, sheets = from_manifest(root), from_sheets(root)
    if listed is None and sheets is None:
        return None
    listed, sheets = listed or {}, sheets or {}
    return [listed.get(rel) or sheets.get(_sheet_key(rel)) or UNKNOWN for rel in rels]


def origin(root: str) -> str:
    """What read_sources read under ROOT, for messages: 'manifest.csv', the sheets, or both."""
    have = [SOURCES_FILE] if from_manifest(root) is not None else []
    have += ["the metadata sheets"] if sheet_files(root) else []
    return " and ".join(have) or "nothing"


def _from_root(root: str, path: str) -> str:
    return path[len(root.rstrip("/")) + 1:].replace(os.sep, "/")


def _sheet_key(rel: str) -> tuple[str, str]:
    """(class folder, file name without extension), both lower case: how a sheet names an image."""
    folder = rel.split("/", 1)[0].lower()
    return folder, posixpath.splitext(posixpath.basename(rel))[0].lower()


def from_manifest(root: str) -> dict[str, str] | None:
    """relpath -> source from ROOT/manifest.csv; None without the file or its two columns."""
    path = storage.join(root, SOURCES_FILE)
    if not storage.exists(path):
        return None
    rows = csv.DictReader(io.StringIO(storage.read_text(path)))
    if not rows.fieldnames or not {"relpath", "source"} <= set(rows.fieldnames):
        return None
    return {row["relpath"]: row["source"] for row in rows}


def sheet_files(root: str) -> list[str]:
    """The metadata sheets at the top of ROOT (names ending in .metadata.xlsx, any case)."""
    return [name for name in storage.listdir(root) if name.lower().endswith(SHEET_SUFFIX)]


def from_sheets(root: str) -> dict[tuple[str, str], str] | None:
    """(class folder, file name) -> site, from every CLASS.metadata.xlsx at the top of ROOT;
    None without sheets. A sheet that cannot be read is skipped with one warning naming it."""
    names = sheet_files(root)
    if not names:
        return None
    found: dict[tuple[str, str], str] = {}
    for name in names:
        folder = name[:-len(SHEET_SUFFIX)].lower()
        path = storage.join(root, name)
        try:
            rows = read_sheet(storage.read_bytes(path))
        except Exception as err:  # noqa: BLE001 - a bad sheet costs its sources, not the run
            logging.warning("%s: not read (%s: %s); its images' source is unknown", path,
                            type(err).__name__, str(err).splitlines()[0][:120] if str(err) else "")
            continue
        if rows is None:
            logging.warning("%s: no FILE NAME and URL columns in its first row; its images' "
                            "source is unknown", path)
            continue
        for file_name, url in rows:
            stem = file_name.lower()
            if layout.is_image(stem):  # a name given with its extension
                stem = posixpath.splitext(stem)[0]
            found[(folder, stem)] = site(url)
    logging.info("%s: sources of %d images from %s", root, len(found), ", ".join(names))
    return found


def _column(name) -> str:
    return "".join(ch for ch in str(name or "").lower() if ch.isalnum())


def read_sheet(raw: bytes) -> list[tuple[str, str]] | None:
    """(FILE NAME, URL) of every row of a workbook's first sheet; None without those columns."""
    import openpyxl
    book = openpyxl.load_workbook(io.BytesIO(raw), read_only=True, data_only=True)
    try:
        rows = book.worksheets[0].iter_rows(values_only=True)
        header = [_column(cell) for cell in next(rows, ())]
        if "filename" not in header or "url" not in header:
            return None
        name_at, url_at = header.index("filename"), header.index("url")
        return [(str(row[name_at]).strip(), str(row[url_at]).strip()) for row in rows
                if len(row) > max(name_at, url_at) and row[name_at] and row[url_at]]
    finally:
        book.close()


def site(url: str) -> str:
    """A short source name from a URL: its host without www. (github.com and kaggle.com keep
    the two path parts that name the collection); text that is no URL is kept as it is."""
    parsed = urllib.parse.urlparse(url.strip())
    if not parsed.netloc:
        return url.strip() or UNKNOWN
    host = parsed.netloc.lower().removeprefix("www.")
    if host in COLLECTION_HOSTS:
        parts = [p for p in parsed.path.split("/") if p][:2]
        return "/".join([host, *parts])
    return host


def tree_sources(examples: list, roots: list[str]) -> list[str] | None:
    """Each example's source as read under the root folder it lies in (the longest root that
    holds it), so a test split that mixes trees (``--test_dir`` plus held-out sources of the
    data folder) is broken down by the sources of both; an image of a prepared dataset carries
    its own. None when nothing names any."""
    found = [getattr(e, "source", "") or UNKNOWN for e in examples]
    placed = [bool(getattr(e, "source", "")) for e in examples]
    any_named = any(placed)
    for root in sorted({r for r in roots if r}, key=len, reverse=True):
        prefix = root.rstrip("/") + "/"
        mine = [i for i, e in enumerate(examples) if not placed[i] and e.path.startswith(prefix)]
        for i in mine:
            placed[i] = True
        named = read_sources(root, [examples[i] for i in mine]) if mine else None
        if named is None:
            continue
        any_named = True
        for i, source in zip(mine, named):
            found[i] = source
    return found if any_named else None
