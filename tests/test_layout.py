"""The hard limits on the tree (docs/ARCHITECTURE.md, "Limits"): file and class sizes, no
import cycle between fastmaml modules, and every design reference resolving inside the
repository.

- every ``fastmaml/**/*.py`` at most 450 lines (only ``fastmaml/triton/`` is exempt: its
  kernels are long straight-line code);
- every class at most 150 lines, decorators and docstring included;
- no import cycle between fastmaml modules, counting every ``import`` anywhere in a file
  (inside functions and under ``TYPE_CHECKING`` too); the one allowed edge is a package
  ``__init__`` importing from its own subpackages and modules (a re-export);
- no tracked text file names a design or style document other than ``docs/DESIGN.md`` and
  ``docs/ARCHITECTURE.md``, nor a relative path that climbs out of the repository; every ``docs/DESIGN.md §N``
  names a section of docs/DESIGN.md, and a quoted name after it one of its paragraphs or
  headings; every repository path the README and docs/ name in backticks exists.
"""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "fastmaml"
MAX_FILE_LINES = 450
MAX_CLASS_LINES = 150
EXEMPT = ("fastmaml/triton/",)


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__.py``)."""
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def _rel(p: Path) -> str:
    return p.relative_to(ROOT).as_posix()


def _is_package(mod: str) -> bool:
    return MODULES[mod].name == "__init__.py"


def test_package_files_are_at_most_450_lines():
    long = {}
    for p in MODULES.values():
        n = len(p.read_text().splitlines())
        if n > MAX_FILE_LINES and not _rel(p).startswith(EXEMPT):
            long[_rel(p)] = n
    assert not long, f"files over {MAX_FILE_LINES} lines: {long}"


def test_classes_are_at_most_150_lines():
    long = {}
    for p in MODULES.values():
        for node in ast.walk(ast.parse(p.read_text(), str(p))):
            if isinstance(node, ast.ClassDef):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                n = node.end_lineno - first + 1
                if n > MAX_CLASS_LINES:
                    long[f"{_rel(p)}:{node.lineno} {node.name}"] = n
    assert not long, f"classes over {MAX_CLASS_LINES} lines: {long}"


# --- imports ---------------------------------------------------------------------------
# The graph: an edge A -> B when module A imports module B anywhere in its file. Importing
# ``pkg.mod`` also runs ``pkg/__init__``: an edge to every package above the target too.
# ``from pkg import name`` depends on ``pkg.name`` when that is a module, else on where
# ``pkg/__init__`` gets ``name`` from (followed through re-exports, and, for a package
# that loads its names lazily through ``__getattr__``, every module of it defining
# ``name``), else on ``pkg`` itself. Compiled modules (``fastmaml._C``) are leaves. The
# edges of a package ``__init__`` to its own subpackages and modules are not counted (a
# re-export is fine).

EXTENSIONS = {".".join(p.relative_to(ROOT).with_suffix("").parts) for p in PKG.rglob("*.pyi")} - set(MODULES)


def _tree(mod: str) -> ast.Module:
    return ast.parse(MODULES[mod].read_text(), str(MODULES[mod]))


def _base(mod: str, node: ast.ImportFrom) -> str | None:
    """The module a ``from X import ...`` reads X as (relative imports resolved)."""
    if not node.level:
        return node.module
    pkg = mod if _is_package(mod) else mod.rpartition(".")[0]
    for _ in range(node.level - 1):
        pkg = pkg.rpartition(".")[0]
    return f"{pkg}.{node.module}" if node.module else pkg


def _owner(name: str) -> str | None:
    """The fastmaml module a dotted name lives in (its longest prefix that is a module)."""
    while name and name not in MODULES and name not in EXTENSIONS:
        name = name.rpartition(".")[0]
    return name or None


def _defines(mod: str, name: str) -> bool:
    """Whether ``mod`` binds ``name`` at its top level other than by an import."""
    for node in _tree(mod).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return True
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else []
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return True
    return False


def _source_of(pkg: str, name: str, seen: frozenset = frozenset()) -> set[str]:
    """The modules ``from pkg import name`` depends on, ``pkg`` a package, ``name`` not
    one of its modules."""
    if pkg in seen or pkg in EXTENSIONS or not _is_package(pkg) or _defines(pkg, name):
        return {pkg}
    for node in _tree(pkg).body:
        if isinstance(node, ast.ImportFrom) and (base := _base(pkg, node)) and base.split(".")[0] == "fastmaml":
            for a in node.names:
                if (a.asname or a.name) == name:
                    t = _owner(f"{base}.{a.name}")
                    return _source_of(t, a.name, seen | {pkg}) if t == base else {t}
    lazy = any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__" for n in _tree(pkg).body)
    if lazy:
        found = {m for m in MODULES if m.startswith(pkg + ".") and _defines(m, name)}
        if found:
            return found
    return {pkg}


def _ancestors(mod: str) -> set[str]:
    parts = mod.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def _imports(mod: str) -> set[str]:
    """The fastmaml modules ``mod`` imports anywhere in its file (see above)."""
    out = set()
    for node in ast.walk(_tree(mod)):
        if isinstance(node, ast.Import):
            targets = {_owner(a.name) for a in node.names if a.name.split(".")[0] == "fastmaml"}
        elif isinstance(node, ast.ImportFrom) and (base := _base(mod, node)) and base.split(".")[0] == "fastmaml":
            targets = set()
            for a in node.names:
                t = _owner(f"{base}.{a.name}")
                targets |= _source_of(t, a.name) if t == base else {t}
        else:
            continue
        for t in filter(None, targets):
            out |= {t} | _ancestors(t)
    return out - {mod}


def _allowed(src: str, dst: str) -> bool:
    # a package __init__ importing its own children (a re-export) is not a cycle's edge
    return not (_is_package(src) and dst.startswith(src + "."))


def _graph() -> dict[str, set[str]]:
    graph = {m: {d for d in _imports(m) if _allowed(m, d)} for m in MODULES}
    return graph | {e: set() for e in EXTENSIONS}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each as one
    cycle through its modules."""
    index, low, stack, on, comps = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_one_cycle(graph, c) for c in comps]


def _one_cycle(graph, comp: list[str]) -> list[str]:
    """A path start -> ... -> start inside one component (breadth first)."""
    start, members = comp[0], set(comp)
    prev, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    path = [v]
                    while prev[path[-1]] is not None:
                        path.append(prev[path[-1]])
                    return [*reversed(path), start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return comp


def test_the_import_graph_sees_every_kind_of_import():
    # the cycle test below proves nothing unless the graph sees lazy imports (inside a
    # function), re-exports, lazily loaded names, the packages above a target, and the
    # compiled module as a leaf
    assert "fastmaml.triton.sgd_step" in _imports("fastmaml.ops._sgd_step.launch")  # inside a function
    assert "fastmaml.ops._sgd_step.function" in _imports("fastmaml.maml.adjoint") or \
        "fastmaml.ops" in _imports("fastmaml.maml.adjoint")
    assert _source_of("fastmaml.ops", "sgd_step") == {"fastmaml.ops._sgd_step.function"}  # a re-export
    assert _source_of("fastmaml.maml", "MAML") == {"fastmaml.maml.module"}  # loaded by __getattr__
    assert {"fastmaml.ops", "fastmaml.ops._sgd_step"} <= _imports("fastmaml.bench.op_sgd_step")
    assert "fastmaml._C" in EXTENSIONS and "fastmaml._C" in _imports("fastmaml._ext")
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_fastmaml_modules():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


# --- references ------------------------------------------------------------------------

def _tracked_text_files() -> dict[str, str]:
    try:
        names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True,
                               timeout=60).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError) as e:  # not a git checkout (an sdist)
        pytest.skip(f"git ls-files failed: {e}")
    out = {}
    for n in filter(None, names):
        p = ROOT / n
        if not p.is_file():
            continue
        data = p.read_bytes()
        if b"\0" in data:
            continue
        try:
            out[n] = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
    return out


# Any file name ending in .md or .txt whose name says design, style or architecture.
DOC_NAME = re.compile(r"[\w./~-]*(?:design|style|architecture)[\w-]*\.(?:md|txt|rst)\b", re.I)
ALLOWED_DOCS = {"docs/DESIGN.md", "docs/ARCHITECTURE.md"}
# A relative path that climbs out of the repository (a parent folder's sibling).
CLIMB = re.compile(r"(?<![\w.])((?:\.\./)+)([\w.-]*)")


def _leaves_the_repository(name: str, ups: str) -> bool:
    depth = len(Path(name).parent.parts)  # folders between the repository root and the file
    return ups.count("../") > depth


def test_only_the_two_docs_are_named_as_design_or_style_files():
    bad = []
    for name, text in _tracked_text_files().items():
        for i, line in enumerate(text.splitlines(), 1):
            for m in DOC_NAME.finditer(line):
                token = m.group(0).removeprefix("./")
                if token not in ALLOWED_DOCS:
                    bad.append(f"{name}:{i}: {token}")
            for m in CLIMB.finditer(line):
                if _leaves_the_repository(name, m.group(1)) or m.group(2) == "shared":
                    bad.append(f"{name}:{i}: {m.group(0)} (outside the repository)")
    assert not bad, "references to design/style files other than docs/DESIGN.md and docs/ARCHITECTURE.md:\n" + \
        "\n".join(bad)


def _design_sections() -> tuple[set[int], str]:
    text = (ROOT / "docs/DESIGN.md").read_text()
    return {int(n) for n in re.findall(r"^## (\d+)\. ", text, flags=re.M)}, text


# "docs/DESIGN.md §5", "`docs/DESIGN.md` §2", "docs/DESIGN.md §1, §2", "§5 "Device check""
DESIGN_REF = re.compile(r"docs/DESIGN\.md`?\s*((?:§\s*\d+(?:\.\d+)*(?:\s*\"[^\"]+\")?(?:\s*(?:,|and|-|–)\s*)?)+)")


def test_every_design_section_reference_exists():
    sections, design = _design_sections()
    assert sections == set(range(1, 10)), f"docs/DESIGN.md sections: {sorted(sections)} (want 1-9)"
    bad, seen = [], 0
    for name, text in _tracked_text_files().items():
        for i, line in enumerate(text.splitlines(), 1):
            for m in DESIGN_REF.finditer(line):
                for sec, quoted in re.findall(r"§\s*(\d+)(?:\.\d+)*(?:\s*\"([^\"]+)\")?", m.group(1)):
                    seen += 1
                    if int(sec) not in sections:
                        bad.append(f"{name}:{i}: §{sec} is not a section of docs/DESIGN.md")
                    elif quoted and quoted not in _section_text(design, int(sec)):
                        bad.append(f"{name}:{i}: §{sec} has no {quoted!r}")
            if re.search(r"(?<![\w/`])DESIGN\.md`?\s*§", line):
                bad.append(f"{name}:{i}: a § reference to the design without its docs/ folder")
    assert seen >= 10, f"only {seen} docs/DESIGN.md § references found: the pattern is broken"
    assert not bad, "\n".join(bad)


def _section_text(design: str, n: int) -> str:
    m = re.search(rf"^## {n}\. .*?(?=^## \d+\. |\Z)", design, flags=re.M | re.S)
    return m.group(0) if m else ""


# `csrc/...`, `fastmaml/...`, `tests/...`, `benchmarks/...`, `docs/...`, `examples/...` in
# backticks: a path of the repository (patterns with *, {}, <> and "..." are not paths).
DOC_PATH = re.compile(r"`((?:csrc|fastmaml|tests|benchmarks|docs|examples)/[^`\s]*)`")


def test_paths_named_in_the_docs_exist():
    bad, seen = [], 0
    for doc in ("README.md", "docs/DESIGN.md", "docs/ARCHITECTURE.md"):
        planned = False
        for i, line in enumerate((ROOT / doc).read_text().splitlines(), 1):
            if line.startswith("## "):
                # a planned section names what is not built yet, "Where the former files
                # went" what is gone
                planned = "(planned)" in line or "former files" in line
            for m in DOC_PATH.finditer(line):
                path = m.group(1).rstrip(".,;:")
                if planned or any(c in path for c in "*{}<>") or "..." in path:
                    continue
                seen += 1
                if not (ROOT / path).exists():
                    bad.append(f"{doc}:{i}: {path}")
    assert seen >= 20, f"only {seen} paths found in the docs: the pattern is broken"
    assert not bad, "paths named in the docs that do not exist:\n" + "\n".join(bad)
