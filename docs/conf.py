"""Sphinx configuration for trio-background.

Build with::

    sphinx-build -W --keep-going -n -b html docs docs/_build/html
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))  # document the source tree, not an installed copy
sys.path.insert(0, str(DOCS))  # for _inventories

import _inventories  # noqa: E402

from trio_background._version import __version__  # noqa: E402

project = "trio-background"
author = "trio-background contributors"
copyright = "trio-background contributors"
version = release = __version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.intersphinx",
    "sphinx.ext.napoleon",
    "sphinxcontrib_trio",
]

exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
default_role = "obj"
nitpicky = True
# The TypeVarTuple in the annotations of BackgroundHandle.spawn/send (the same
# pattern as trio.Nursery.start_soon). It exists only under TYPE_CHECKING and is
# not public API, so there is nothing to link to.
nitpick_ignore: list[tuple[str, str]] = [("py:class", "PosArgsT")]

# -- autodoc / napoleon ------------------------------------------------------
# trio_background.prometheus imports prometheus_client, an optional extra; the
# docs build with only the ``docs`` extra installed, so autodoc imports it mocked.
autodoc_mock_imports = ["prometheus_client"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_attr_annotations = True

# -- intersphinx -------------------------------------------------------------
# Build machines (and CI) have no network access to readthedocs.io or
# docs.python.org, so the inventories are generated offline from the tables in
# _inventories.py; see its docstring. TRIO_BACKGROUND_DOCS_ONLINE=1 uses the
# real upstream inventories instead.
ONLINE = os.environ.get("TRIO_BACKGROUND_DOCS_ONLINE") == "1"
intersphinx_mapping: dict[str, tuple[str, str | None]] = {
    "trio": (_inventories.TRIO_URL, None),
    "python": (_inventories.PYTHON_URL, None),
}
intersphinx_timeout = 10

# -- HTML --------------------------------------------------------------------
html_theme = "alabaster"
html_title = f"trio-background {release}"
html_theme_options = {
    "description": "Bounded, supervised background jobs for Trio",
    "fixed_sidebar": True,
}
html_static_path: list[str] = []


def _use_offline_inventories(app: Any, config: Any) -> None:
    if ONLINE:
        return
    directory = Path(app.doctreedir) / "_offline_intersphinx"
    config.intersphinx_mapping = _inventories.write_inventories(directory)


def setup(app: Any) -> dict[str, Any]:
    # Runs before intersphinx validates the mapping (priority 800).
    app.connect("config-inited", _use_offline_inventories, priority=400)
    return {"parallel_read_safe": True}
