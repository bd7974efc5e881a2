"""An approximation of "the runtime before instruments existed".

No such release exists, so we build one: copy the ``trio_background`` package into a
temporary directory under another name and, in its ``_runtime.py`` only, delete every
statement that exists solely for instruments:

* ``if <test>:`` statements without ``else`` whose test mentions ``instrument`` or
  ``hooks`` (the guards around hook calls, and the calls with them);
* plain assignments of a local name from an expression mentioning ``instrument`` or
  ``hooks`` (``hooks = self.instruments.hooks``), provided the name is not used
  elsewhere after the guards are gone.

Everything else (validation, accounting, scheduling) is byte-for-byte the shipped code.
The result is imported and sanity-checked by the benchmark; if the transformation
cannot be applied cleanly, the comparison is reported as n/a rather than guessed.
"""

from __future__ import annotations

import ast
import atexit
import importlib
import shutil
import sys
import tempfile
from pathlib import Path
from types import ModuleType

_MARKERS = ("instrument", "hooks")


def _mentions_instruments(node: ast.AST) -> bool:
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name) and any(m in sub.id.lower() for m in _MARKERS):
            return True
        if isinstance(sub, ast.Attribute) and any(m in sub.attr.lower() for m in _MARKERS):
            return True
    return False


class _Stripper(ast.NodeTransformer):
    def __init__(self) -> None:
        self.removed: list[str] = []
        self._function = "?"

    def _visit_function(
        self, node: ast.FunctionDef | ast.AsyncFunctionDef
    ) -> ast.FunctionDef | ast.AsyncFunctionDef:
        outer, self._function = self._function, node.name
        self.generic_visit(node)
        # Now drop ``alias = <...instruments...>`` if nothing in the function reads alias.
        loaded = {
            sub.id
            for sub in ast.walk(node)
            if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Load)
        }
        node.body = [stmt for stmt in node.body if not self._dead_alias(stmt, loaded)]
        self._function = outer
        if not node.body:
            node.body = [ast.Pass()]
        return node

    def _dead_alias(self, stmt: ast.stmt, loaded: set[str]) -> bool:
        if (
            isinstance(stmt, ast.Assign)
            and len(stmt.targets) == 1
            and isinstance(stmt.targets[0], ast.Name)
            and stmt.targets[0].id not in loaded
            and _mentions_instruments(stmt.value)
        ):
            self.removed.append(f"{self._function}(): {ast.unparse(stmt)}")
            return True
        return False

    visit_FunctionDef = _visit_function
    visit_AsyncFunctionDef = _visit_function

    def visit_If(self, node: ast.If) -> ast.AST | None:
        if not node.orelse and _mentions_instruments(node.test):
            self.removed.append(f"{self._function}(): if {ast.unparse(node.test)}: ...")
            return None
        return self.generic_visit(node)

    def generic_visit(self, node: ast.AST) -> ast.AST:
        """Visit the children; a block left empty (a guard was all it held) gets ``pass``.

        That covers every statement list, e.g. ``for x in xs: if hooks: ...`` becomes
        ``for x in xs: pass`` (the loop itself is not instrument code: it stays).
        """
        emptiable = {
            name
            for name, value in ast.iter_fields(node)
            if isinstance(value, list) and value and isinstance(value[0], ast.stmt)
        }
        super().generic_visit(node)
        for name in emptiable:
            if not getattr(node, name):
                setattr(node, name, [ast.Pass()])
        return node


def build(source_package: Path, workdir: Path | None = None) -> tuple[ModuleType, list[str]]:
    """Return the stripped copy of ``source_package`` (imported) and what was removed.

    Raises:
        RuntimeError: Nothing to strip.
    """
    if workdir is None:
        root = Path(tempfile.mkdtemp(prefix="tb-bench-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
    else:
        root = Path(workdir)
    name = "trio_background_without_instruments"
    target = root / name
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source_package, target, ignore=shutil.ignore_patterns("__pycache__"))
    runtime = target / "_runtime.py"
    tree = ast.parse(runtime.read_text(encoding="utf-8"))
    stripper = _Stripper()
    tree = ast.fix_missing_locations(stripper.visit(tree))
    if not stripper.removed:
        raise RuntimeError("found no instrument guards to strip in _runtime.py")
    runtime.write_text(ast.unparse(tree) + "\n", encoding="utf-8")
    sys.path.insert(0, str(root))
    try:
        module = importlib.import_module(name)
    finally:
        sys.path.remove(str(root))
    return module, stripper.removed
