"""Images checked before training: every unreadable file is listed at once, with the fix, instead of a
traceback in the middle of a run."""
from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image

FULL_DECODE_LIMIT = 2000  # larger sets: header and integrity check (PIL's verify) instead of a full decode


def check_images(paths: list[Path], what: str, skip_bad: bool = False, full: bool | None = None) -> list[Path]:
    """Open every image up front (``full``: decode it; default: decode small sets, verify large ones)
    and list every unreadable one in one error naming ``--skip_bad_files``; with ``skip_bad`` they are
    dropped with a warning instead. Returns the readable paths."""
    full = len(paths) <= FULL_DECODE_LIMIT if full is None else full
    bad = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image.load() if full else image.verify()
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            bad.append((path, f"{Path(path).name} ({err})"))
    if bad and not skip_bad:
        listed = "; ".join(b for _, b in bad[:10]) + (" …" if len(bad) > 10 else "")
        raise ValueError(f"{what}: {len(bad)} image(s) cannot be read: {listed}. Re-save or remove them, or pass "
                         "--skip_bad_files")
    if bad:
        warnings.warn(f"{what}: skipping {len(bad)} unreadable image(s): {'; '.join(b for _, b in bad[:10])}",
                      stacklevel=2)
        dropped = {p for p, _ in bad}
        paths = [p for p in paths if p not in dropped]
        if not paths:
            raise ValueError(f"{what}: no readable image left")
    return paths
