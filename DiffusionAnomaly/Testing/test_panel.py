"""The panel file: it loads, has every widget the module uses, and binds every parameter."""

from __future__ import annotations

import ast
import os
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

MODULE_DIR = Path(__file__).resolve().parents[1]
UI_FILE = MODULE_DIR / "Resources" / "UI" / "DiffusionAnomaly.ui"
MODULE_FILE = MODULE_DIR / "DiffusionAnomaly.py"

# The class each widget the module uses must have (the module calls their class's API).
EXPECTED_CLASSES = {
    "modelSelector": "QComboBox",
    "loadModelButton": "QPushButton",
    "modelSummaryLabel": "QLabel",
    **{f"channel{i}Selector": "qMRMLNodeComboBox" for i in range(4)},
    **{f"channel{i}Label": "QLabel" for i in range(4)},
    "noiseLevelSlider": "ctkSliderWidget",
    "guidanceScaleSlider": "ctkSliderWidget",
    "thresholdSlider": "ctkSliderWidget",
    "thresholdModeComboBox": "QComboBox",
    "thresholdMeaningLabel": "QLabel",
    "brainMaskModeComboBox": "QComboBox",
    "brainMaskSegmentationSelector": "qMRMLNodeComboBox",
    "stepsSpinBox": "QSpinBox",
    "deviceComboBox": "QComboBox",
    "batchSizeSpinBox": "QSpinBox",
    "redrawNoiseLevelSlider": "ctkSliderWidget",
    "mapReferenceComboBox": "QComboBox",
    "outputMapSelector": "qMRMLNodeComboBox",
    "outputSegmentationSelector": "qMRMLNodeComboBox",
    "detectButton": "QPushButton",
    "previewButton": "QPushButton",
    "progressBar": "QProgressBar",
    "statusLabel": "QLabel",
}
# Parameter types each widget class can edit through the parameter-node wrapper.
BINDABLE = {"ctkSliderWidget": {"float"}, "QSpinBox": {"int"}, "QCheckBox": {"bool"}, "QComboBox": {"str"}}


def _widgets() -> dict:
    root = ElementTree.parse(UI_FILE).getroot()
    return {w.get("name"): w for w in root.iter("widget")}


def _string_property(widget, name: str):
    for prop in widget.findall("property"):
        if prop.get("name") == name:
            child = prop[0]
            return [s.text for s in child.findall("string")] if child.tag == "stringlist" else child.text
    return None


def _ui_names_used_by_module() -> set:
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    return {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui"
            and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"}


def _parameter_fields() -> dict:
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    wrapper = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "DiffusionAnomalyParameterNode")
    fields = {}
    for statement in wrapper.body:
        if isinstance(statement, ast.AnnAssign):
            annotation = statement.annotation
            if isinstance(annotation, ast.Subscript):  # Annotated[float, ...]
                annotation = annotation.slice.elts[0] if isinstance(annotation.slice, ast.Tuple) else annotation.slice
            fields[statement.target.id] = ast.unparse(annotation)
    return fields


def test_every_widget_the_module_uses_exists_with_the_expected_class():
    widgets = _widgets()
    used = _ui_names_used_by_module()
    assert used, "the module refers to no widgets"
    for name in sorted(used):
        assert name in widgets, f"DiffusionAnomaly.py uses self.ui.{name}, which the .ui file lacks"
        assert name in EXPECTED_CLASSES, f"add self.ui.{name}'s expected class to this test"
        assert widgets[name].get("class") == EXPECTED_CLASSES[name], f"{name} is a {widgets[name].get('class')}"


def test_every_parameter_is_bound_to_a_widget_that_can_edit_its_type():
    fields = _parameter_fields()
    bound = {}
    for name, widget in _widgets().items():
        parameter = _string_property(widget, "SlicerParameterName")
        if parameter is None:
            continue
        assert parameter in fields, f"{name} is bound to '{parameter}', which the parameter node lacks"
        kind = widget.get("class")
        if kind == "qMRMLNodeComboBox":
            assert _string_property(widget, "nodeTypes") == [fields[parameter]], f"{name} offers other nodes than {fields[parameter]}"
        else:
            assert fields[parameter] in BINDABLE[kind], f"{name} ({kind}) cannot edit a {fields[parameter]}"
        bound[parameter] = name
    # The model choice is kept by the module itself: the model list is filled at run time.
    assert set(fields) - set(bound) == {"modelPath", "automaticModel"}


def test_settings_explain_themselves():
    widgets = _widgets()
    for name in ("noiseLevelSlider", "guidanceScaleSlider", "thresholdSlider", "stepsSpinBox", "batchSizeSpinBox", "deviceComboBox",
                 "detectButton", "previewButton", "thresholdModeComboBox", "brainMaskModeComboBox", "brainMaskSegmentationSelector",
                 "biasCorrectionComboBox", "redrawNoiseLevelSlider", "mapReferenceComboBox"):
        tooltip = _string_property(widgets[name], "toolTip")
        assert tooltip and len(tooltip.split()) >= 6, f"{name} needs a tooltip that says what it does"


def test_the_panel_loads_with_qt_and_finds_every_widget():
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    QtWidgets = pytest.importorskip("PySide6.QtWidgets", reason="PySide6 checks the panel file (pip install -e '.[test]')")
    from PySide6.QtCore import QFile
    from PySide6.QtUiTools import QUiLoader

    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    ui_file = QFile(str(UI_FILE))
    assert ui_file.open(QFile.ReadOnly)
    loader = QUiLoader()
    panel = loader.load(ui_file)
    ui_file.close()
    assert panel is not None, loader.errorString()
    for name, kind in EXPECTED_CLASSES.items():
        widget = panel.findChild(QtWidgets.QWidget, name)
        assert widget is not None, name
        if kind.startswith("Q"):  # Slicer's own widgets load as their QWidget base here
            assert widget.metaObject().className() == kind, f"{name} loaded as {widget.metaObject().className()}"
    assert panel.findChild(QtWidgets.QPushButton, "detectButton").text() == "Detect anomalies"
    panel.deleteLater()
    app.processEvents()


# Parameter -> the engine's setting it becomes (DiffusionAnomalyLogic.settings).
ENGINE_NAMES = {"noiseLevel": "noise_level", "guidanceScale": "guidance_scale", "steps": "steps", "batchSize": "batch_size",
                "redrawNoiseLevel": "redraw_noise_level"}


def _parameter_ranges() -> dict:
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    wrapper = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "DiffusionAnomalyParameterNode")
    ranges = {}
    for statement in wrapper.body:
        if isinstance(statement, ast.AnnAssign) and isinstance(statement.annotation, ast.Subscript):
            for call in ast.walk(statement.annotation):
                if isinstance(call, ast.Call) and getattr(call.func, "id", "") == "WithinRange":
                    ranges[statement.target.id] = tuple(ast.literal_eval(arg) for arg in call.args)
    return ranges


def _number_property(widget, name: str) -> float:
    for prop in widget.findall("property"):
        if prop.get("name") == name:
            return float(prop[0].text)
    raise AssertionError(f"{widget.get('name')} has no {name}")


def test_panel_ranges_are_the_engines_so_no_value_the_engine_refuses_can_be_chosen():
    from DiffusionAnomalyLib.settings import RANGES

    ranges = _parameter_ranges()
    widgets = {_string_property(w, "SlicerParameterName"): w for w in _widgets().values() if _string_property(w, "SlicerParameterName")}
    for parameter, setting in ENGINE_NAMES.items():
        assert ranges[parameter] == RANGES[setting], f"{parameter}: the parameter node allows {ranges[parameter]}, the engine {RANGES[setting]}"
        low, high = _number_property(widgets[parameter], "minimum"), _number_property(widgets[parameter], "maximum")
        assert RANGES[setting][0] <= low <= high <= RANGES[setting][1], f"{parameter}'s widget offers {low}..{high}"
    low, high = ranges["threshold"]
    assert low > 0 and high == 4, "a fixed threshold is above 0 and at most the channel count (the panel takes 4 channels)"


def _parameter_choices(name: str) -> list:
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    wrapper = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "DiffusionAnomalyParameterNode")
    statement = next(s for s in wrapper.body if isinstance(s, ast.AnnAssign) and s.target.id == name)
    choice = next(n for n in ast.walk(statement.annotation) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "Choice")
    return ast.literal_eval(choice.args[0])


def test_panel_choices_are_the_engines():
    from DiffusionAnomalyLib.settings import BIAS_CORRECTIONS, BRAIN_MASK_MODES, MAP_REFERENCES, PANEL_THRESHOLD_MODES

    assert set(_parameter_choices("biasCorrection")) == set(BIAS_CORRECTIONS)
    assert set(_parameter_choices("mapReference")) == set(MAP_REFERENCES)
    assert set(_parameter_choices("brainMaskMode")) == set(BRAIN_MASK_MODES) | {"segment"}
    assert set(_parameter_choices("thresholdMode")) == set(PANEL_THRESHOLD_MODES)
