"""The package layout holds: imports point one way, and the distribution installs the
command-line shells under ``ovdistill.tools``, not as a top-level ``tools`` package."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("distill", "detectors", "segmentors", "ovdistill", "tools", "bench")


def _imports() -> dict[str, set[str]]:
    """module -> the project modules it imports (at any depth of the file), by dotted name."""
    graph: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            module = ".".join(path.relative_to(REPO).with_suffix("").parts)
            module = module.removesuffix(".__init__")
            names = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names |= {a.name for a in node.names}
                elif isinstance(node, ast.ImportFrom):
                    base = node.module or ""
                    if node.level:  # relative: from the module's package, level - 1 up
                        package = module.split(".")
                        if path.name != "__init__.py":
                            package = package[:-1]
                        package = package[:len(package) - (node.level - 1)]
                        base = ".".join([*package, base] if base else package)
                    # base.name: a module of base, or one of its names (then base's)
                    names |= {f"{base}.{a.name}" for a in node.names}
            graph[module] = {n for n in names if n.split(".")[0] in PACKAGES}
    return graph


def test_imports_point_one_way():
    graph = _imports()
    top = {m: {n.split(".")[0] for n in deps} for m, deps in graph.items()}
    for m, deps in top.items():
        root = m.split(".")[0]
        if root in ("distill", "detectors", "segmentors", "ovdistill", "bench"):
            assert "tools" not in deps, f"{m} imports tools"
        if root == "distill":
            assert not deps & {"detectors", "segmentors", "ovdistill"}, f"{m} imports {deps}"
        if root == "segmentors":
            assert "detectors" not in deps and "ovdistill" not in deps, f"{m} imports {deps}"
        if root == "detectors":
            assert not deps & {"segmentors", "ovdistill"}, f"{m} imports {deps}"
    # no circle between the packages: distill <- detectors, segmentors <- ovdistill <- tools
    order = {"distill": 0, "detectors": 1, "segmentors": 1, "ovdistill": 2, "tools": 3,
             "bench": 3}
    for m, deps in top.items():
        assert all(order[d] <= order[m.split(".")[0]] for d in deps), (m, deps)


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The circles among the project's modules: strongly connected components of more than
    one module (or one importing itself), each imported name resolved to the longest module
    that prefixes it; imports inside functions count (a lazy import hides a circle, it does
    not break it)."""
    def module(name: str) -> str | None:
        parts = name.split(".")
        for n in range(len(parts), 0, -1):
            if ".".join(parts[:n]) in graph:
                return ".".join(parts[:n])
        return None

    edges = {m: {d for d in map(module, deps) if d and d != m} for m, deps in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(m: str) -> None:  # Tarjan's algorithm
        index[m] = low[m] = len(index)
        stack.append(m)
        for d in sorted(edges[m]):
            if d not in index:
                visit(d)
                low[m] = min(low[m], low[d])
            elif d in stack:
                low[m] = min(low[m], index[d])
        if low[m] == index[m]:
            component = []
            while True:
                d = stack.pop()
                component.append(d)
                if d == m:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for m in sorted(edges):
        if m not in index:
            visit(m)
    return circles


def test_no_import_circle():
    assert import_circles({"a": {"b.f"}, "b": {"c"}, "c": {"a.g"}, "d": {"a"}}) == [
        ["a", "b", "c"]]  # the check finds a circle of three, not the module outside it
    assert import_circles(_imports()) == []


def test_tools_are_thin_shells():
    for name in ("train", "eval", "train_seg"):
        lines = (REPO / "tools" / f"{name}.py").read_text().splitlines()
        assert len(lines) <= 60, f"tools/{name}.py has {len(lines)} lines"


def test_the_wheel_installs_the_tools_under_ovdistill(tmp_path):
    import shutil

    src = tmp_path / "src"  # a copy: building writes build/ and egg-info beside the sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md", *PACKAGES[:-1]):
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy)(
            REPO / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                        if (REPO / name).is_dir() else {}))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                           "--no-build-isolation", str(src), "-w", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = tmp_path.glob("ovdistill-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        entry = next(n for n in names if n.endswith("entry_points.txt"))
        scripts = z.read(entry).decode()
    assert not any(n.startswith("tools/") for n in names)
    assert "ovdistill/tools/train.py" in names and "ovdistill/stages.py" in names
    targets = [line.split(" = ")[1] for line in scripts.splitlines() if " = " in line]
    assert len(targets) == 16 and all(t.startswith("ovdistill.tools.") for t in targets)
    for target in targets:  # each names a tool with a main()
        module = target.split(":")[0].removeprefix("ovdistill.")
        assert "def main(" in (REPO / (module.replace(".", "/") + ".py")).read_text()
