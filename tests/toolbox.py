"""Where the test set-up (scripts/test-deps.d) puts the command-line tools it installs, and finding them."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

TOOLS_BIN = Path(os.environ.get("DDETR_TOOLS_DIR", Path.home() / ".cache" / "ddetr-tools")) / "bin"


def find_tool(name: str) -> str | None:
    """`name` on PATH, else in the set-up's tools folder, else None."""
    found = shutil.which(name)
    if found:
        return found
    candidate = TOOLS_BIN / name
    return str(candidate) if candidate.exists() else None
