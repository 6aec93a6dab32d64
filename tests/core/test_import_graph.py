"""spell_core's modules import each other without a circle: every import counts, at the top of a module or inside a
function (a lazy import only hides a circle, it does not remove it). spell_core.index is a package whose
command line (spell_core.index.cli) builds through spell_core.build, which imports the package's modules back:
the package must not import cli until one of its names is used."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def modules(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under package (a package is named by its __init__.py)."""
    out = {}
    for f in sorted(package.rglob("*.py")):
        parts = list(f.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def imported(name: str, path: Path, node: ast.Import | ast.ImportFrom) -> list[str]:
    """What one import statement of module name (file path) names: its module, and for ``from M import x`` also
    M.x (x may be a submodule)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module
    return [target] + [f"{target}.{a.name}" for a in node.names]


def import_graph(package: Path) -> tuple[dict[str, set[str]], list[str]]:
    """(module -> the package's modules it imports, anywhere in its code; relative imports naming no module)."""
    mods = modules(package)
    graph, unresolved = {}, []
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            targets = imported(name, path, node)
            if isinstance(node, ast.ImportFrom) and node.level and targets[0] not in mods:
                unresolved.append(f"{path.relative_to(package.parent)}:{node.lineno} imports {targets[0]}")
            deps.update(t for t in targets if t in mods and t != name)
        graph[name] = deps
    return graph, unresolved


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan), each as one circle through it."""
    index, low, stack, on, found = {}, {}, [], set(), []

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
            scc = []
            while True:
                w = stack.pop()
                on.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                found.append(circle(graph, set(scc)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def circle(graph: dict[str, set[str]], scc: set[str]) -> list[str]:
    """One closed path a -> ... -> a inside the component scc (breadth first from its first module)."""
    start = min(scc)
    back = {start: None}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & scc):
            if w == start:
                path = [v]
                while back[path[-1]] is not None:
                    path.append(back[path[-1]])
                return path[::-1] + [start]
            if w not in back:
                back[w] = v
                queue.append(w)
    return sorted(scc)  # pragma: no cover - a component always holds a circle


def test_spell_core_imports_no_circle():
    graph, unresolved = import_graph(ROOT / "spell_core")
    assert "spell_core.index.search" in graph and "spell_core.build" in graph  # the walk found the modules
    assert not unresolved, "relative imports of modules that do not exist:\n" + "\n".join(unresolved)
    found = cycles(graph)
    assert not found, "import circles in spell_core:\n" + "\n".join(" -> ".join(c) for c in found)


def test_the_check_finds_circles_also_through_lazy_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import g\n    return g\n")
    (pkg / "c.py").write_text("import os\n\n\ndef g():\n    from . import a\n    from .missing import x\n")
    graph, unresolved = import_graph(pkg)
    assert cycles(graph) == [["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]]
    assert unresolved == ["pkg/c.py:6 imports pkg.missing"]
    (pkg / "c.py").write_text("def g():\n    return 1\n")
    assert cycles(import_graph(pkg)[0]) == []


def test_index_package_does_not_load_its_command_line_until_used():
    code = ("import sys, spell_core.index as ix\n"
            "early = sorted(m for m in ('spell_core.index.cli', 'spell_core.build') if m in sys.modules)\n"
            "main = ix.main\n"
            "print(early, main.__module__, 'spell_core.build' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT), timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[]", "spell_core.index.cli", "True"]


def test_index_names_stay_importable_from_the_package():
    """Every name spell_core/index.py defined (before it became a package) is importable from spell_core.index."""
    import spell_core.index as ix

    names = ["AUTO_BACKEND", "BACKENDS", "CASCADE_CELL", "CASCADE_ROUNDS", "CASCADE_SPLIT", "CELL_DIM", "CELL_SIZE",
             "ClusterCells", "Features", "INDEX_FILE", "INDEX_FORMAT", "LatentStore", "MANIFEST", "PRE_DIM",
             "PROJECTIONS", "ProgressFn", "ReferenceIndex", "SLACK", "Shard", "StorageError", "SubspaceCells",
             "annulus_rows", "build_shards", "cascade_basis", "complete_shards", "faiss", "flat_torch",
             "folder_source", "folder_within", "kmeans", "latent_files", "main", "nearest_centroid", "pca_basis",
             "pool_basis", "project_store", "read_header", "resolve_backend", "shard_name", "shards_within",
             "two_level_kmeans"]
    names += ["SHARD_DTYPES", "shard_dtype"]  # added since: float16 shards
    assert [n for n in names if not hasattr(ix, n)] == []
    assert sorted(ix.__all__) == sorted(names)
    from spell_core.index.search import ReferenceIndex
    from spell_core.storage import StorageError

    assert ix.ReferenceIndex is ReferenceIndex and ix.StorageError is StorageError
