"""The last release of trio_background, built from git, to compare this version against.

``git archive`` extracts the package as it was at the release's commit into a temporary
directory under another name (its imports are relative, so it imports as a package of
its own next to this checkout's). Needs the repository's history; without it (an sdist,
a shallow clone) the comparison is reported as n/a.
"""

from __future__ import annotations

import atexit
import importlib
import io
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
#: The release compared against, and the commit it was made from.
RELEASE = "1.1.0"
COMMIT = "d81c6f1"
NAME = "trio_background_release"


def build() -> ModuleType:
    """Import the release's package as ``trio_background_release``.

    Raises:
        RuntimeError: The release's commit is not in this repository's history.
    """
    proc = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", COMMIT, "trio_background"],
        capture_output=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"git archive {COMMIT} failed: {proc.stderr.decode(errors='replace').strip()}"
        )
    root = Path(tempfile.mkdtemp(prefix="tb-release-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    with tarfile.open(fileobj=io.BytesIO(proc.stdout)) as archive:
        archive.extractall(root, filter="data")
    (root / "trio_background").rename(root / NAME)
    sys.path.insert(0, str(root))
    try:
        module = importlib.import_module(NAME)
    finally:
        sys.path.remove(str(root))
    if getattr(module, "__version__", None) != RELEASE:
        raise RuntimeError(f"commit {COMMIT} is not release {RELEASE}: {module.__version__!r}")
    return module
