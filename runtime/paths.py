"""Where pocketlm keeps its files: ``$POCKETLM_HOME``, else ``~/.cache/pocketlm``."""
from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("POCKETLM_HOME") or Path.home() / ".cache" / "pocketlm")
