"""Sphinx configuration for trio-background.

Build with::

    sphinx-build -W --keep-going -n -b html docs docs/_build/html

in an environment with only ``pip install '.[docs]'`` (no other extra is needed:
``prometheus_client`` is mocked). ``.ci/run`` builds them that way.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))  # document the source tree, not an installed copy
sys.path.insert(0, str(DOCS))  # for _inventories and _timeline

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
# Likewise the TypeVar of a job's return type (BackgroundJob[T]).
nitpick_ignore: list[tuple[str, str]] = [
    ("py:class", "PosArgsT"),
    ("py:class", "T"),
    # The TypeVar of TaskRegistry.task: it returns the function it was given.
    ("py:class", "trio_background.durable.F"),
    ("py:class", "trio_background._job.T"),
]

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
    # Previous / next links under every page (alabaster shows none by default).
    "show_relbar_bottom": True,
}
# Only the stylesheet: the docs' images under _static/ reach the output through
# the image directive. alabaster links _static/custom.css after its own CSS.
html_static_path: list[str] = ["_static/custom.css"]


def _use_offline_inventories(app: Any, config: Any) -> None:
    if ONLINE:
        return
    directory = Path(app.doctreedir) / "_offline_intersphinx"
    config.intersphinx_mapping = _inventories.write_inventories(directory)


# Names that the annotations import only under TYPE_CHECKING. Sphinx < 9 cannot
# evaluate those annotations and leaves the bare name, which links nowhere; link it
# to the real object through intersphinx.
_TYPE_CHECKING_NAMES = {
    "AbstractAsyncContextManager": "contextlib.AbstractAsyncContextManager",
    "Unpack": "typing.Unpack",  # from typing_extensions; Python 3.10 has no typing.Unpack
}


def _resolve_type_checking_names(app: Any, env: Any, node: Any, contnode: Any) -> Any:
    target = _TYPE_CHECKING_NAMES.get(node.get("reftarget", ""))
    if node.get("refdomain") != "py" or target is None:
        return None
    from sphinx.ext.intersphinx import missing_reference

    node = node.deepcopy()
    node["reftarget"] = target
    node["reftype"] = "obj"  # typing.Unpack is data, not a class
    return missing_reference(app, env, node, contnode)


def _public_attributes() -> set[str]:
    """``trio_background.<Class>.<attribute>`` for every documented data attribute.

    The public classes report ``__module__ == "trio_background"`` (as trio's do), so
    autodoc cannot find the ``#:`` comments of their attributes in the private module
    that defines them; docs/reference.rst lists those attributes itself. This collects
    what it must list: the attrs fields of the public classes and every attribute with
    a ``#:`` comment in the private modules.
    """
    import attrs
    from sphinx.errors import PycodeError
    from sphinx.pycode import ModuleAnalyzer

    import trio_background

    public = {name: getattr(trio_background, name) for name in trio_background.__all__}
    expected = {
        f"trio_background.{name}.{field.name}"
        for name, obj in public.items()
        if attrs.has(obj)
        for field in attrs.fields(obj)
    }
    for modname, module in list(sys.modules.items()):
        if not modname.startswith("trio_background._") or module is None:
            continue
        try:
            attr_docs = ModuleAnalyzer.for_module(modname).find_attr_docs()
        except PycodeError:  # no Python source to read
            continue
        for classname, attribute in attr_docs:
            if attribute.startswith("_"):
                continue  # a private attribute (its comment is for the code's readers)
            if classname in public and getattr(module, classname, None) is public[classname]:
                expected.add(f"trio_background.{classname}.{attribute}")
    return expected


def _check_attributes_documented(app: Any, env: Any) -> None:
    from sphinx.util import logging

    documented = env.get_domain("py").objects
    for name in sorted(_public_attributes() - set(documented)):
        logging.getLogger(__name__).warning(
            "%s is public but not documented: add it to docs/reference.rst", name
        )


def _draw_timeline(app: Any) -> None:
    # The figure in semantics.rst ("Ready order"): drawn from a real run on every
    # build (see docs/_timeline.py), into docs/_generated/ (gitignored), before any
    # page is read. A run that breaks the scheduling rules fails the build here.
    import _timeline

    _timeline.write(DOCS / "_generated" / "timeline.svg")


def setup(app: Any) -> dict[str, Any]:
    # Runs before intersphinx validates the mapping (priority 800).
    app.connect("config-inited", _use_offline_inventories, priority=400)
    app.connect("env-check-consistency", _check_attributes_documented)
    app.connect("missing-reference", _resolve_type_checking_names)
    app.connect("builder-inited", _draw_timeline)
    return {"parallel_read_safe": True}
