"""The code's layout (DESIGN's layering): no import circle, no import climbing back up, no
package file over the line limit.

The graph is read from the source with ast, every import counted, the ones inside functions too
(an import put inside a function to dodge a circle still closes it).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("curate", "captioning", "model", "dpo", "flows")

# What each package may import of ours besides itself.
ALLOWED = {
    "curate": set(),
    "captioning": {"curate"},
    "model": {"curate", "captioning/mixing.py"},
    "dpo": {"model", "curate"},
    "flows": {"curate", "captioning", "model", "dpo"},
}
KIT = "curate/runtime"  # the stage kit every stage uses: it imports nothing else of ours


def package_files(root: Path = ROOT) -> list[Path]:
    return sorted(p for package in PACKAGES for p in (root / package).rglob("*.py"))


def module_file(name: str, root: Path = ROOT) -> str | None:
    """The file of ours a dotted module name is, or None when it is not ours."""
    if name.split(".")[0] not in PACKAGES:
        return None
    path = root / Path(*name.split("."))
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py").relative_to(root).as_posix()
    if (path / "__init__.py").is_file():
        return (path / "__init__.py").relative_to(root).as_posix()
    return None


def imports_of(path: Path, root: Path = ROOT) -> set[str]:
    """The files of ours that `path` imports, at any depth of its code."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            # `from pkg import module` names a file; `from pkg.module import name` names pkg.module
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            target = module_file(name, root)
            if target is not None:
                found.add(target)
                if isinstance(node, ast.ImportFrom) and not target.endswith("__init__.py"):
                    break  # the most specific file named; its package is not imported as well
    own = path.relative_to(root).as_posix()
    return {target for target in found if target != own and not target.endswith("__init__.py")}


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    return {p.relative_to(root).as_posix(): imports_of(p, root) for p in package_files(root)}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one file (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def upward_arrows(graph: dict[str, set[str]]) -> list[str]:
    """Imports from one package into another that the layering does not allow."""
    wrong = []
    for source, targets in sorted(graph.items()):
        package = source.split("/")[0]
        for target in sorted(targets):
            if target.split("/")[0] == package and not source.startswith(KIT + "/"):
                continue
            allowed = ALLOWED[package]
            if source.startswith(KIT + "/"):
                allowed_here = target.startswith(KIT + "/")
            else:
                allowed_here = target.split("/")[0] in allowed or target in allowed
            if not allowed_here:
                wrong.append(f"{source} -> {target}")
    return wrong


def test_the_code_has_no_import_circle():
    assert circles(import_graph()) == []


def test_no_import_climbs_back_up_the_layers():
    assert upward_arrows(import_graph()) == []


def test_the_graph_sees_imports_inside_functions(tmp_path):
    """An import hidden in a function still counts: the circle it closes is found."""
    (tmp_path / "curate").mkdir()
    (tmp_path / "curate" / "a.py").write_text("from curate.b import f\n")
    (tmp_path / "curate" / "b.py").write_text("def f():\n    from curate import a\n")
    for package in PACKAGES[1:]:
        (tmp_path / package).mkdir()
    graph = import_graph(tmp_path)
    assert graph == {"curate/a.py": {"curate/b.py"}, "curate/b.py": {"curate/a.py"}}
    assert circles(graph) == [["curate/a.py", "curate/b.py"]]


@pytest.mark.parametrize(
    "source, target, allowed",
    [
        ("curate/stage.py", "captioning/config.py", False),
        ("captioning/stage.py", "curate/runtime/store.py", True),
        ("model/train.py", "captioning/mixing.py", True),
        ("model/train.py", "captioning/stage.py", False),
        ("dpo/trainer.py", "flows/cli.py", False),
        ("flows/cli.py", "dpo/trainer.py", True),
    ],
)
def test_the_layer_rule_allows_only_the_design_arrows(source, target, allowed):
    assert (upward_arrows({source: {target}}) == []) == allowed


LINE_LIMIT = 400  # a file past this is usually two ideas (STYLE.md)


def test_no_package_file_is_over_the_line_limit():
    long = {}
    for path in package_files():
        lines = len(path.read_text().splitlines())
        if lines > LINE_LIMIT:
            long[path.relative_to(ROOT).as_posix()] = lines
    assert long == {}, f"over {LINE_LIMIT} lines: {long}; split by idea"
