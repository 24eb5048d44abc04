"""Checks on user input made before any compute, with bounded work on hostile files.

- files the user names: exists, a regular file and not a folder, not larger than a stated bound;
- YAML: at most ``MAX_CONFIG_BYTES`` of text and ``MAX_CONFIG_VALUES`` values once its aliases and
  merge keys are expanded, checked on the parsed node graph before any Python object is built;
- output folders: writable (the nearest existing parent), the files to be written not folders,
  all checked before training so a bad ``--out`` never costs a run;
- bounds on what a file may ask us to allocate: classes, image sides.

This module imports neither torch nor the rest of antidoor (only :mod:`antidoor.errors`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from antidoor.errors import AntidoorError, clip, excerpt

MAX_CLASSES = 10_000  # labels, class names and model outputs; ImageNet-21k-sized label sets are out of scope
MAX_IMAGE_SIDE = 1024  # pixels per side of a dataset image or a recorded image shape
MIN_IMAGE_SIDE = 8  # as data.image_size
MAX_CONFIG_BYTES = 1 << 20  # a YAML config or study file
MAX_CONFIG_VALUES = 100_000  # scalars, lists and mappings in a config, aliases expanded
MAX_SIDECAR_BYTES = 16 << 20  # a checkpoint's JSON sidecar


def max_array_bytes() -> int:
    """The most a data file may ask us to hold: half this machine's memory, at most 16 GiB."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system
        physical = 32 << 30
    return min(16 << 30, physical // 2)


def user_file(path: str | Path, what: str, limit: int | None = None) -> Path:
    """``path`` as a regular file of at most ``limit`` bytes, or a one-line error naming what is wrong."""
    path = Path(path)
    try:
        if path.is_dir():
            raise AntidoorError(f"{what} {str(path)!r} is a folder; give a file")
        if not path.exists():
            raise AntidoorError(f"{what} {str(path)!r} does not exist")
        if not path.is_file():
            raise AntidoorError(f"{what} {str(path)!r} is not a regular file")
        size = path.stat().st_size
    except OSError as e:  # a path too long, a loop of links, no permission to look
        raise AntidoorError(f"{what} {clip(str(path), 200)!r} cannot be read ({e.strerror or e})") from None
    if limit is not None and size > limit:
        raise AntidoorError(f"{what} {str(path)!r} is {size:,} bytes; at most {limit:,} are allowed")
    return path


def read_user_text(path: str | Path, what: str, limit: int) -> str:
    """The text of a small user file (UTF-8), size-checked before it is read."""
    path = user_file(path, what, limit)
    try:
        return path.read_bytes()[: limit + 1].decode("utf-8")
    except UnicodeDecodeError as e:
        raise AntidoorError(f"{what} {str(path)!r} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise AntidoorError(f"{what} {str(path)!r} cannot be read ({e.strerror or e})") from None


def _expanded_size(node: yaml.Node, limit: int) -> int:
    """How many nodes ``node`` stands for with every alias expanded, counting at most ``limit + 1``.

    Aliases are shared node objects, so a few hundred bytes can stand for billions of values; walking
    with a counter that stops at the limit keeps the check itself bounded (cycles included).
    """
    count, stack = 0, [node]
    while stack:
        n = stack.pop()
        count += 1
        if count > limit:
            return count
        if isinstance(n, yaml.SequenceNode):
            stack.extend(n.value)
        elif isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                stack.append(k)
                stack.append(v)
    return count


class InvalidYAML(AntidoorError):
    """Text that does not parse as YAML (``--set`` then takes it as a plain string)."""


def load_yaml(text: str, what: str) -> Any:
    """``yaml.safe_load`` with bounded work: at most ``MAX_CONFIG_BYTES`` and ``MAX_CONFIG_VALUES``."""
    if len(text) > MAX_CONFIG_BYTES:
        raise AntidoorError(f"{what} is {len(text):,} characters; at most {MAX_CONFIG_BYTES:,} are allowed")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, MAX_CONFIG_VALUES) > MAX_CONFIG_VALUES:
            raise AntidoorError(f"{what} expands to more than {MAX_CONFIG_VALUES:,} values (YAML aliases or merge keys?); "
                                f"at most {MAX_CONFIG_VALUES:,} are allowed")
        return loader.construct_document(node)
    except AntidoorError:  # a ValueError too: keep its own message
        raise
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InvalidYAML(f"{what} is not valid YAML ({clip(first, 200)})") from None
    except RecursionError:
        raise AntidoorError(f"{what} is nested too deeply") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise AntidoorError(f"{what} holds a value that cannot be read ({clip(str(e), 200)})") from None
    finally:
        loader.dispose()


def check_output_dir(folder: str | Path, files: Iterable[str] = (), option: str = "--out") -> Path:
    """Check, before any compute, that ``folder`` can receive ``files``; create nothing.

    The folder may not exist yet: then its nearest existing parent must be a writable folder.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise AntidoorError(f"{option} {str(folder)!r} is an existing file; give a folder")
    for name in files:
        target = folder / name
        if target.is_dir():
            raise AntidoorError(f"{option} {str(folder)!r}: {name} there is a folder, so it cannot be written")
    parent = folder.absolute()
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise AntidoorError(f"{option} {str(folder)!r}: {str(parent)!r} is a file, so the folder cannot be made")
    if not os.access(parent, os.W_OK | os.X_OK):
        where = "it" if parent == folder.absolute() else f"its parent {str(parent)!r}"
        raise AntidoorError(f"{option} {str(folder)!r}: {where} is not writable; choose another folder")
    return folder


def study_folder_name(name: str) -> str:
    """A study name used as the folder ``runs/<name>``: one plain path component, nothing that climbs out."""
    if (not name or len(name) > 100 or name.startswith(".") or any(c in name for c in "/\\\0")
            or name != name.strip() or Path(name).is_absolute()):
        raise AntidoorError(f"study name {excerpt(name)} cannot be a folder under runs/ (at most 100 characters, "
                            "no '/', '\\' or leading '.'); rename the study or give --out FOLDER")
    return name


def check_image_shape(shape: Any, what: str) -> tuple[int, int, int]:
    """A (C, H, W) image shape with C in 1 or 3 and sides in [MIN_IMAGE_SIDE, MAX_IMAGE_SIDE]."""
    ok = (isinstance(shape, (list, tuple)) and len(shape) == 3 and all(isinstance(s, int) and not isinstance(s, bool)
                                                                           for s in shape))
    if not ok or shape[0] not in (1, 3) or not all(MIN_IMAGE_SIDE <= s <= MAX_IMAGE_SIDE for s in shape[1:]):
        raise AntidoorError(f"{what}: image shape {excerpt(shape)} is not (C, H, W) with C 1 or 3 and "
                            f"H, W in {MIN_IMAGE_SIDE}..{MAX_IMAGE_SIDE}")
    return (shape[0], shape[1], shape[2])


def check_num_classes(n: Any, what: str) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_CLASSES:
        raise AntidoorError(f"{what}: {excerpt(n)} classes; allowed: 1..{MAX_CLASSES:,}")
    return n
