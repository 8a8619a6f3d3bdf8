"""Where Numba keeps the compiled kernels: ``$POCKETLM_HOME/numba/<key>``.

Numba checks a cached kernel against its own source file only, so an edit to a helper it
inlines from another file (``_base.py``) would keep serving stale machine code. The key
names every kernel file with its size and modification time, so any edit starts a new
folder. Numba must know the folder before the kernel modules are decorated, so this runs
at import; it only reads file stamps (Numba makes the folder when it first writes).
Left alone when ``NUMBA_CACHE_DIR`` is set.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numba

from pocketlm.paths import home


def _key() -> str:
    h = hashlib.sha256()
    for f in sorted(Path(__file__).parent.glob("*.py")):
        st = f.stat()
        h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:16]


if not numba.config.CACHE_DIR:
    numba.config.CACHE_DIR = str(home() / "numba" / _key())
