"""ImageFolder archives (.tar, .tar.gz/.tgz, .zip) read in memory, never extracted to disk: class names,
image bytes and skipped names, in the same order as the extracted directory would give them."""

from __future__ import annotations

import tarfile
import zipfile
from pathlib import Path

from ddpm.data.decode import IMAGE_EXTENSIONS
from ddpm.errors import UserError

# archives `data.folder` may name instead of a directory
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
ARCHIVE_JUNK = ("__MACOSX",)  # macOS zip metadata folders: never a class


def is_archive(path: Path) -> bool:
    """Whether `path` names a file of a supported archive type (by its suffix)."""
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def _archive_files(path: Path) -> list[tuple[tuple[str, ...], bytes]]:
    """Every regular file of a tar (any compression) or zip archive: (path parts, bytes), in archive order.

    One sequential pass: a .tar.gz cannot seek, so reading member after member is what keeps it fast.
    Names with absolute or '..' parts are refused (they cannot be meant as class folders).
    """
    files = []
    try:
        if path.name.lower().endswith(".zip"):
            with zipfile.ZipFile(path) as zf:
                for info in zf.infolist():
                    if not info.is_dir():
                        files.append((info.filename, zf.read(info)))
        else:
            with tarfile.open(path, "r:*") as tar:
                for member in tar:
                    if member.isfile():
                        f = tar.extractfile(member)
                        files.append((member.name, f.read() if f else b""))
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as err:
        raise UserError(f"data.folder {path} is not a readable archive ({err}); re-create or re-download it") from None
    out = []
    for name, data in files:
        parts = tuple(p for p in name.replace("\\", "/").split("/") if p not in ("", "."))
        if name.startswith("/") or ".." in parts:
            raise UserError(f"archive {path} holds the unsafe path {name!r}; re-create it with relative paths")
        if parts and parts[0] not in ARCHIVE_JUNK:
            out.append((parts, data))
    return out


def _unwrap(files: list[tuple[tuple[str, ...], bytes]]) -> list[tuple[tuple[str, ...], bytes]]:
    """Drop a single top-level folder around the class folders (as in train/<class>/*.jpg).

    It is unwrapped when every file lies below one folder and that folder holds sub-folders: a single
    folder holding only files is itself a class.
    """
    tops = {parts[0] for parts, _ in files}
    nested = all(len(parts) >= 3 for parts, _ in files)  # top/<class>/<file>
    if len(tops) == 1 and files and nested:
        return [(parts[1:], data) for parts, data in files]
    return files


def list_archive(path: Path) -> tuple[list[str], list[tuple[str, bytes, int]], list[str]]:
    """Class names, (relative name, bytes, label) triples and non-image files of an archive of class folders.

    The same classes, order and skipped names as `folder.list_folder` on the extracted directory, so the
    prepared arrays and their content hash do not depend on whether the folder was archived.
    """
    files = _unwrap(_archive_files(path))
    classes = sorted({parts[0] for parts, _ in files if len(parts) >= 2 and not parts[0].startswith(".")})
    if not classes:
        raise UserError(
            f"archive {path} has no class folders; archive one folder per class (<class name>/<image>), "
            "optionally inside one top-level folder"
        )
    label_of = {name: i for i, name in enumerate(classes)}
    # sorted by path components within each class, as sorted(Path) orders the directory walk
    members = sorted((label_of[p[0]], p[1:], data) for p, data in files if len(p) >= 2 and p[0] in label_of)
    items, skipped = [], []
    for label, rest, data in members:
        name = "/".join((classes[label], *rest))
        if rest[-1].lower().endswith(IMAGE_EXTENSIONS):
            items.append((name, data, label))
        else:
            skipped.append(name)
    return classes, items, skipped
