"""Where each class's X-rays are inside its folder: the tutorial's flat class folders, or the
current COVID-19 Radiography Database's ``images/`` and ``masks/`` sub-folders.

One listing per class folder decides it, so a lung mask is never taken for an X-ray and no
other nested folder is mixed in unseen: what was found and what was used is kept for the data
check to report. Listing only (names, no image is read), local or gs:// alike.
"""
from __future__ import annotations

import dataclasses
import posixpath

from trainer import storage

IMAGES_DIR = "images"  # the database's X-rays (299x299 PNG), matched case-insensitively
MASKS_DIR = "masks"  # its lung masks (256x256 PNG): never an image of the class
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")


@dataclasses.dataclass(frozen=True)
class ClassFolder:
    """One class folder as listed: the X-rays used, the masks paired with them, and the rest."""

    path: str
    image_root: str  # the folder the images are taken from: path, or path/images
    images: tuple[str, ...]  # relative to image_root, '/' separators, sorted
    masks: dict  # image relpath -> its mask's full path (same name in masks/)
    unpaired_masks: tuple[str, ...]  # masks whose name matches no image (full paths)
    unused: tuple[str, ...]  # found, not used: folders and images beside images/ (full paths)
    nested: dict  # sub-folders of the image root whose images are used -> how many
    non_images: tuple[str, ...]  # other files in the folders used (full paths)

    @property
    def has_images_dir(self) -> bool:
        return self.image_root != self.path


def is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _stem(relpath: str) -> str:
    """The name a mask and its image share: the path without its extension, any case."""
    return posixpath.splitext(relpath)[0].lower()


def _named(folders: set[str], wanted: str) -> str | None:
    return next((name for name in sorted(folders) if name.lower() == wanted), None)


def scan_class(folder: str) -> ClassFolder:
    """Lists ``folder`` once and sorts its files into X-rays, masks and the rest.

    With an ``images/`` sub-folder the X-rays are the images below it and nothing beside it
    is used; without one they are every image below the folder as before (the tutorial's
    layout), except a ``masks/`` sub-folder's. Raises storage.SymlinkLoopError.
    """
    files = storage.walk_files(folder)
    top_folders = {rel.split("/", 1)[0] for rel in files if "/" in rel}
    images_dir, masks_dir = _named(top_folders, IMAGES_DIR), _named(top_folders, MASKS_DIR)

    def under(name: str | None) -> list[str]:
        return [rel[len(name) + 1:] for rel in files if name and rel.startswith(name + "/")]

    if images_dir:
        image_root = storage.join(folder, images_dir)
        inside = under(images_dir)
        beside = [rel for rel in files
                  if rel.split("/", 1)[0] not in (images_dir, masks_dir)]
        unused = sorted({storage.join(folder, rel.split("/", 1)[0]) for rel in beside
                         if "/" in rel or is_image(rel)})
        non_images = [storage.join(folder, rel) for rel in beside
                      if "/" not in rel and not is_image(rel)]
    else:
        image_root, unused, non_images = folder, [], []
        inside = [rel for rel in files if not (masks_dir and rel.startswith(masks_dir + "/"))]
    images = sorted(rel for rel in inside if is_image(rel))
    non_images = non_images + [storage.join(image_root, rel) for rel in inside if not is_image(rel)]
    nested: dict[str, int] = {}
    for rel in images:
        if "/" in rel:
            nested[rel.split("/", 1)[0]] = nested.get(rel.split("/", 1)[0], 0) + 1
    mask_files = {_stem(rel): storage.join(folder, masks_dir, rel)
                  for rel in under(masks_dir) if is_image(rel)}
    masks = {rel: mask_files[_stem(rel)] for rel in images if _stem(rel) in mask_files}
    paired = set(masks.values())
    return ClassFolder(folder, image_root, tuple(images), masks,
                       tuple(sorted(set(mask_files.values()) - paired)), tuple(unused), nested,
                       tuple(sorted(non_images)))


def top_level_files(root: str) -> list[str]:
    """Names of the files (not folders) directly in ``root``: the database's metadata sheets
    and readme, a manifest.csv; never images of a class."""
    return [name for name in storage.listdir(root) if not storage.isdir(storage.join(root, name))]


def describe(folder: ClassFolder) -> str:
    """One line saying where a class's images were taken from (for the log)."""
    line = f"{folder.path}: {len(folder.images)} images"
    if folder.has_images_dir:
        line += f" from {posixpath.basename(folder.image_root.rstrip('/'))}/"
    if folder.nested:
        line += " (sub-folders " + ", ".join(f"{name}/ {n}" for name, n in
                                             sorted(folder.nested.items())) + ")"
    if folder.masks or folder.unpaired_masks:
        line += f"; {len(folder.masks)} lung masks paired by name, not used as images"
        if folder.unpaired_masks:
            line += f" ({len(folder.unpaired_masks)} masks match no image)"
    return line
