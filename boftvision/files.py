"""Files from elsewhere are data; files we write appear whole or not at all.

- :func:`atomic_folder` / :func:`write_text_atomic`: write under a temporary sibling name, then rename,
  so a kill leaves the old version or the new one, never a mix (an adapter's weights with another
  run's config).
- :func:`check_regex`: module-name patterns read from configs are bounded in length and refused when
  their backtracking can blow up (nested unbounded repeats), before they are matched.
- :func:`regular_file` / :func:`inside_root`: dataset readers open regular files only (a FIFO would
  block for ever) and only under the dataset's root unless the user allows otherwise.
"""
from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

try:  # Python ≥ 3.11
    from re import _constants as sre_constants
    from re import _parser as sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants
    import sre_parse

MAX_PATTERN_LENGTH = 2048


@contextmanager
def atomic_folder(path: str | os.PathLike, owns: set[str] | None = None) -> Iterator[Path]:
    """``with atomic_folder(p) as tmp:`` write the folder's files into ``tmp``; on success ``tmp``
    replaces ``p`` (an existing ``p`` is moved aside first and then deleted). On an error nothing
    changes at ``p``.

    ``owns``: the file names this writer owns. When ``p`` also holds other files (a user's folder), it
    is not replaced: each new file is renamed into it, one atomic rename per file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a folder; remove it or choose another path")
    shared = owns is not None and path.exists() and bool(set(os.listdir(path)) - owns)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        if shared:
            for f in sorted(tmp.iterdir()):
                os.replace(f, path / f.name)
            tmp.rmdir()
        elif path.exists():
            old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to disk, so a rename never exposes unwritten bytes."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without O_RDONLY on folders
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for f in folder.rglob("*"):
        if f.is_file():
            _fsync(f)
    _fsync(folder)


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on success it is flushed and renamed over
    ``path``, on any error removed (``path`` is never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _fsync(Path(tmp))
        os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return Path(path)


# --- patterns ---------------------------------------------------------------------------------------
_REPEATS = {sre_constants.MAX_REPEAT, sre_constants.MIN_REPEAT}
_REPEATS |= {getattr(sre_constants, "POSSESSIVE_REPEAT")} if hasattr(sre_constants, "POSSESSIVE_REPEAT") else set()


def _risky(items, in_repeat: int) -> bool:
    """True when a repeat that runs several times holds an unbounded repeat, or an unbounded repeat
    holds an alternation: the shapes (``(a+)+``, ``(.*x){20}``, ``(a|ab)*``) whose backtracking grows
    exponentially. ``in_repeat``: 0 outside repeats, 1 inside a bounded one, 2 inside an unbounded one."""
    for op, arg in items:
        if op in _REPEATS:
            low, high, body = arg
            unbounded = high == sre_constants.MAXREPEAT
            if in_repeat and unbounded:
                return True
            if _risky(body, max(in_repeat, 2 if unbounded else 1 if high > 1 else 0)):
                return True
        elif op == sre_constants.BRANCH:
            if in_repeat == 2:
                return True
            if any(_risky(branch, in_repeat) for branch in arg[1]):
                return True
        elif op == sre_constants.SUBPATTERN:
            if _risky(arg[-1], in_repeat):
                return True
        elif op in (sre_constants.ASSERT, sre_constants.ASSERT_NOT):
            if _risky(arg[1], in_repeat):
                return True
        elif op == getattr(sre_constants, "ATOMIC_GROUP", None) and _risky(arg, in_repeat):
            return True
    return False


def check_regex(pattern: str, field: str) -> None:
    """Refuse a pattern that is too long, does not compile, or can backtrack catastrophically."""
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise ValueError(f"{field}: regex of {len(pattern)} characters; at most {MAX_PATTERN_LENGTH} are accepted")
    try:
        re.compile(pattern)
        parsed = sre_parse.parse(pattern)
    except re.error as err:
        raise ValueError(f"{field}: {pattern!r} is not a valid regex: {err}") from err
    if _risky(parsed, 0):
        raise ValueError(f"{field}: regex {pattern!r} repeats a group that itself repeats or alternates (like "
                         "'(a+)+' or '(a|b)*'), which can take exponential time to match; write it without the "
                         "nested repeat, e.g. '.*\\.(to_q|to_k)' or a list of module names")


# --- reading datasets -------------------------------------------------------------------------------
def check_model_location(value: str | os.PathLike, what: str = "model") -> str:
    """A model argument that looks like a local path (starts with / . ~, or has more than one /) must
    exist: a typo fails at once with "no such folder" instead of retrying as a hub id. Hub ids
    (``org/name``, ``name``) pass through."""
    text = str(value)
    path_like = text.startswith(("/", ".", "~")) or text.count("/") > 1 or text.endswith("/") or "\\" in text
    if path_like and not Path(text).expanduser().exists():
        raise FileNotFoundError(f"{what} {text}: no such folder (a local path; hub ids look like 'org/name')")
    return text


def is_regular_file(path: str | os.PathLike) -> bool:
    """A regular file (symlinks followed): not a folder, FIFO, socket or device."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def regular_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` if it is a regular file, else a clear error naming ``what`` it was meant to be."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what}: {path} does not exist")
    if not is_regular_file(path):
        raise ValueError(f"{what}: {path} is not a regular file (a folder, FIFO or device); give an image file")
    return path


def inside_root(root: str | os.PathLike, relative: str, what: str, allow_outside: bool = False) -> Path:
    """``root / relative`` resolved; an absolute path or one that leaves ``root`` (``../``, symlinks) is
    refused unless ``allow_outside``."""
    root = Path(root).resolve()
    path = (root / relative).resolve()
    if not allow_outside and root != path and root not in path.parents:
        raise ValueError(f"{what}: {relative!r} points outside the dataset folder {root}; move the file into it, "
                         "or pass --allow_paths_outside_data_dir if you trust this dataset")
    return path
