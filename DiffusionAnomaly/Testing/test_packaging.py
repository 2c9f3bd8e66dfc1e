"""The Slicer build lists every module file, and each layer imports only what it may."""

from __future__ import annotations

import ast
import re
from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parents[1]
MODULE_FILE = MODULE_DIR / "DiffusionAnomaly.py"
ENGINE = MODULE_DIR / "DiffusionAnomalyLib"
SCENE = MODULE_DIR / "DiffusionAnomalyScene"


def _cmake_list(variable: str) -> set:
    cmake = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    block = re.search(rf"set\({variable}\n(.*?)\n\s*\)", cmake, flags=re.DOTALL)
    assert block, f"CMakeLists.txt has no set({variable} ...)"
    return {line.strip() for line in block.group(1).splitlines() if line.strip() and not line.strip().startswith("#")}


def _on_disk(folder: Path, pattern: str) -> set:
    return {str(p.relative_to(MODULE_DIR)) for p in folder.rglob(pattern)
            if p.is_file() and "__pycache__" not in p.parts and not p.name.startswith(".")}


def test_cmake_lists_every_python_file_of_the_module():
    on_disk = {MODULE_FILE.name} | _on_disk(ENGINE, "*.py") | _on_disk(SCENE, "*.py")
    listed = _cmake_list("MODULE_PYTHON_SCRIPTS")
    assert listed == on_disk, f"missing from CMakeLists.txt: {sorted(on_disk - listed)}; listed but absent: {sorted(listed - on_disk)}"


def test_cmake_lists_every_resource():
    on_disk = _on_disk(MODULE_DIR / "Resources", "*")
    listed = _cmake_list("MODULE_PYTHON_RESOURCES")
    assert listed == on_disk, f"missing from CMakeLists.txt: {sorted(on_disk - listed)}; listed but absent: {sorted(listed - on_disk)}"
    assert {"Resources/UI/DiffusionAnomaly.ui", "Resources/Icons/DiffusionAnomaly.png", "Resources/requirements.txt"} <= listed


def test_cmake_registers_the_module_self_test():
    cmake = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "slicerMacroBuildScriptedModule" in cmake
    assert re.search(r"slicer_add_python_unittest\(SCRIPT \$\{MODULE_NAME\}\.py\)", cmake)
    top = (MODULE_DIR.parent / "CMakeLists.txt").read_text(encoding="utf-8")
    for setting in ("EXTENSION_HOMEPAGE", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        assert re.search(rf'set\({setting} "[^"]+"\)', top), setting
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in top
    assert "add_subdirectory(DiffusionAnomaly)" in top and "Slicer_EXTENSION_CPACK" in top


def _imported_roots(path: Path) -> set:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_engine_imports_neither_slicer_nor_qt_nor_the_layers_above_it():
    for path in ENGINE.glob("*.py"):
        forbidden = _imported_roots(path) & {"slicer", "qt", "ctk", "vtk", "PythonQt", "DiffusionAnomalyScene", "DiffusionAnomalyWeb", "trame", "trame_slicer"}
        assert not forbidden, f"{path.name} imports {forbidden}"


def test_scene_logic_imports_neither_qt_nor_a_front_end():
    for path in SCENE.glob("*.py"):
        forbidden = _imported_roots(path) & {"qt", "ctk", "PythonQt", "PySide6", "PyQt5", "DiffusionAnomaly", "DiffusionAnomalyWeb", "trame", "trame_slicer"}
        assert not forbidden, f"{path.name} imports {forbidden}"


def test_the_engine_command_line_has_no_web_command():
    from DiffusionAnomalyLib.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    assert "web" not in commands and {"detect", "demo", "evaluate"} <= set(commands)


def test_module_logic_class_uses_no_qt():
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    logic = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "DiffusionAnomalyLogic")
    qt_uses = [node.lineno for node in ast.walk(logic) if isinstance(node, ast.Name) and node.id in {"qt", "ctk"}]
    assert not qt_uses, f"DiffusionAnomalyLogic uses Qt on lines {qt_uses}"


def test_module_follows_the_scripted_module_template():
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    classes = {node.name: [base.id if isinstance(base, ast.Name) else getattr(base, "attr", "") for base in node.bases]
               for node in tree.body if isinstance(node, ast.ClassDef)}
    assert "ScriptedLoadableModule" in classes["DiffusionAnomaly"]
    assert "ScriptedLoadableModuleWidget" in classes["DiffusionAnomalyWidget"]
    assert "ScriptedLoadableModuleLogic" in classes["DiffusionAnomalyLogic"]
    assert "ScriptedLoadableModuleTest" in classes["DiffusionAnomalyTest"]
    assert "DiffusionAnomalyParameterNode" in classes


def test_module_and_engine_parse_as_python_3_9_for_older_slicer_releases():
    for path in [MODULE_FILE, *ENGINE.glob("*.py"), *SCENE.glob("*.py")]:
        source = path.read_text(encoding="utf-8")
        ast.parse(source, filename=str(path), feature_version=(3, 9))
        if path != MODULE_FILE and ("|" in source or "list[" in source or "dict[" in source):
            assert "from __future__ import annotations" in source, f"{path.name} needs postponed annotations on 3.9"
