"""The Slicer build lists every engine file, and the engine never imports Slicer or Qt."""

from __future__ import annotations

import ast
import re
from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parents[1]


def test_cmake_lists_every_engine_file():
    cmake = (MODULE_DIR / "CMakeLists.txt").read_text()
    listed = set(re.findall(r"^\s+(DiffusionAnomalyLib/\S+\.py)\s*$", cmake, flags=re.MULTILINE))
    on_disk = {str(p.relative_to(MODULE_DIR)) for p in (MODULE_DIR / "DiffusionAnomalyLib").glob("*.py")}
    assert listed == on_disk, f"missing from CMakeLists.txt: {sorted(on_disk - listed)}; listed but absent: {sorted(listed - on_disk)}"


def test_engine_imports_neither_slicer_nor_qt():
    for path in (MODULE_DIR / "DiffusionAnomalyLib").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in {"slicer", "qt", "ctk", "vtk", "PythonQt"}, f"{path.name} imports {name}"


def test_engine_parses_as_python_3_9_for_older_slicer_releases():
    for path in (MODULE_DIR / "DiffusionAnomalyLib").glob("*.py"):
        source = path.read_text()
        ast.parse(source, filename=str(path), feature_version=(3, 9))
        if "|" in source or "list[" in source or "dict[" in source:
            assert "from __future__ import annotations" in source, f"{path.name} needs postponed annotations on 3.9"
