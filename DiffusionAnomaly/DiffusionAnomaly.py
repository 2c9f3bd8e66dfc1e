"""Diffusion Anomaly: anomaly maps and segmentations of brain MRI with classifier-guided diffusion.

Slicer module in the Extension Wizard's layout: Module, parameter node, Widget, Logic, Test.
The Widget only handles the panel; the Logic delegates the scene work to
``DiffusionAnomalyScene`` (no Qt) and the computation to ``DiffusionAnomalyLib`` (no Slicer).
"""

import html
import importlib.util
import os
import shutil
from pathlib import Path
from typing import Annotated, List, Optional

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

MAX_CHANNELS = 4
MODULE_DIR = Path(__file__).resolve().parent
RESOURCES = MODULE_DIR / "Resources"
REQUIREMENTS = RESOURCES / "requirements.txt"
SAMPLE_CATEGORY = "Diffusion Anomaly"
SAMPLE_NAME = "DiffusionAnomalySynthBrain"
POLL_INTERVAL_MS = 250
RECUT_DELAY_MS = 300


#
# Module
#


class DiffusionAnomaly(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Diffusion Anomaly")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["DiffusionAnomaly developers"]
        self.parent.helpText = _(
            "Finds anomalies (tumours, lesions) in brain MRI with a diffusion model trained with image-level labels only. "
            "Each axial slice is encoded into noise with deterministic DDIM steps down to the noise level L, then decoded "
            "with a classifier pushing it toward 'healthy' (guidance scale s). The anomaly map is the difference between "
            "the image and its healthy translation; the segmentation is the map above a threshold (fixed, or Otsu's). "
            "<br><br>Choose one volume per MRI sequence of the model, click <b>Preview slice</b> to tune the sliders on "
            "the slice shown in the red view, then <b>Detect anomalies</b>. Moving the threshold re-cuts the segmentation "
            "at once. See the <a href=\"https://github.com/DiffusionAnomaly/SlicerDiffusionAnomaly\">documentation</a>."
            "<br><br>Needs 3D Slicer 5.10 or newer (Python 3.10+, for PyTorch 2.8 and MONAI 1.6), on Windows, Linux or a Mac "
            "with Apple silicon; PyTorch and MONAI are installed, after you confirm, on the first Detect anomalies."
            "<br><br>Research software, not a medical device: the bundled model was trained on synthetic images."
        )
        self.parent.acknowledgementText = _(
            "Method: J. Wolleb, F. Bieder, R. Sandkühler, P. C. Cattin, \"Diffusion Models for Medical Anomaly Detection\", "
            "MICCAI 2022, LNCS 13438, pp. 35-45, doi:10.1007/978-3-031-16452-1_4. Networks and schedulers: MONAI. "
            "The bundled sample and model are derived from the ICBM 2009a nonlinear symmetric template: "
            "Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological Institute, "
            "McGill University (see Resources/SampleData/NOTICE.txt)."
        )
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """Adds the bundled synthetic study to the Sample Data module, with SHA-256 checksums."""
    import SampleData

    sums = {}
    for line in (RESOURCES / "SampleData" / "SHA256SUMS").read_text(encoding="utf-8").splitlines():
        digest, name = line.split(maxsplit=1)
        sums[name.strip()] = digest
    names = sorted(name for name in sums if name.endswith(".nii.gz") and not name.endswith("_seg.nii.gz"))
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category=SAMPLE_CATEGORY,
        sampleName=SAMPLE_NAME,
        thumbnailFileName=str(RESOURCES / "Icons" / "DiffusionAnomaly.png"),
        uris=[(RESOURCES / "SampleData" / name).as_uri() for name in names],
        fileNames=[Path(name).name for name in names],
        nodeNames=[Path(name).name.replace(".nii.gz", "") for name in names],
        checksums=[f"SHA256:{sums[name]}" for name in names],
    )


#
# Parameter node
#


@parameterNodeWrapper
class DiffusionAnomalyParameterNode:
    """The panel's state, saved with the scene.

    channel0Volume..channel3Volume - one input volume per model channel, in the card's order.
    modelPath - the model bundle folder; automaticModel - choose the bundled model that fits the loaded volumes.
    noiseLevel, guidanceScale, steps, thresholdMode, threshold, device, batchSize - detection settings
    (ranges as DiffusionAnomalyLib.settings.RANGES; a fixed threshold is at most the model's channel count).
    brainMaskMode, brainMaskSegmentation - how the brain is found, or the user's segmentation of it.
    biasCorrection - "n4" divides out each sequence's bias field before detection, "none" does not.
    redrawNoiseLevel - 0, or redraw what the first translation segments from this deeper noise level.
    mapReference - what the healthy translation is compared with: "input" (the scan) or "reconstruction".
    outputMap - the anomaly-map volume; outputSegmentation - its thresholded segmentation.
    """

    channel0Volume: vtkMRMLScalarVolumeNode
    channel1Volume: vtkMRMLScalarVolumeNode
    channel2Volume: vtkMRMLScalarVolumeNode
    channel3Volume: vtkMRMLScalarVolumeNode
    modelPath: str = ""
    automaticModel: bool = True
    noiseLevel: Annotated[float, WithinRange(0.01, 1.0)] = 0.1
    guidanceScale: Annotated[float, WithinRange(0.0, 1000.0)] = 40.0
    threshold: Annotated[float, WithinRange(0.005, 4.0)] = 0.1  # at most the channel count: MAX_CHANNELS
    thresholdMode: Annotated[str, Choice(["calibrated", "otsu", "fixed"])] = "calibrated"
    brainMaskMode: Annotated[str, Choice(["auto", "extract", "none", "segment"])] = "auto"
    brainMaskSegmentation: vtkMRMLSegmentationNode
    # A QComboBox bound to a Choice parameter is filled with its choices by Slicer's
    # Base/Python/slicer/parameterNodeWrapper/guiConnectors.py (the combo-box connector).
    biasCorrection: Annotated[str, Choice(["n4", "none"])] = "n4"
    steps: Annotated[int, WithinRange(4, 1000)] = 10
    # The float/ctkSliderWidget connector of guiConnectors.py (above) sets the slider's range from
    # WithinRange, whatever the .ui says, and refuses a slider bound to an unbounded float.
    redrawNoiseLevel: Annotated[float, WithinRange(0.0, 1.0)] = 0.0
    # The same combo-box connector (QComboBoxToStringableConnector) raises on writing a value
    # missing from Choice, so this lists every settings.MAP_REFERENCES (test_panel checks it).
    mapReference: Annotated[str, Choice(["input", "reconstruction"])] = "input"
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    batchSize: Annotated[int, WithinRange(1, 4096)] = 32
    outputMap: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode


#
# Widget
#


class DiffusionAnomalyWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self._pollDetection)
        # Re-cutting the segmentation imports a whole labelmap: it waits until the slider rests.
        self._recutTimer = qt.QTimer()
        self._recutTimer.setSingleShot(True)
        self._recutTimer.setInterval(RECUT_DELAY_MS)
        self._recutTimer.connect("timeout()", self._recutSegmentation)
        self._shownThreshold = None
        self._models = []
        self._card = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DiffusionAnomaly.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = DiffusionAnomalyLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self.onNodeAdded)
        self.ui.detectButton.connect("clicked(bool)", self.onDetectButton)
        self.ui.previewButton.connect("clicked(bool)", self.onPreviewButton)
        self.ui.loadModelButton.connect("clicked(bool)", self.onLoadModelButton)
        self.ui.modelSelector.connect("currentIndexChanged(int)", self.onModelSelected)
        # The threshold slider and mode are not connected here: connectGui writes their
        # values into the parameter node from a slot of its own (Slicer's
        # Base/Python/slicer/parameterNodeWrapper/guiConnectors.py, valueChanged -> wrapper's
        # _makeGuiToParamCallback), and Qt calls slots in the order they were connected, so a
        # slot connected first would read the previous value. The panel reacts to the parameter
        # node's ModifiedEvent instead (_onParameterNodeModified), which comes after the value is stored.
        self.initializeParameterNode()
        self._fillModelSelector()

    def cleanup(self) -> None:
        self.logic.cancel()
        self._timer.stop()
        self._recutTimer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event) -> None:
        self.logic.cancel()
        self._finishRun()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def onNodeAdded(self, caller, event, node) -> None:
        # Volumes loaded while the panel is open fill the empty channel selectors; wait until
        # the node is complete (name, image) before looking at it.
        if node.IsA("vtkMRMLScalarVolumeNode") and not node.IsA("vtkMRMLLabelMapVolumeNode"):
            qt.QTimer.singleShot(0, self._onVolumeAdded)

    def _onVolumeAdded(self) -> None:
        if not self._parameterNode:
            return
        if self._parameterNode.automaticModel:
            self._chooseAutomaticModel()
        elif self._card is not None:
            self.logic.guessChannelVolumes(self._parameterNode, self._card)

    def initializeParameterNode(self) -> None:
        parameterNode = self.logic.getParameterNode()
        # After Close Scene the singleton parameter node is reset to its defaults (an empty model
        # path) while the model selector still shows the model: the node takes the selector's model.
        selected = self._models[self.ui.modelSelector.currentIndex] if 0 <= self.ui.modelSelector.currentIndex < len(self._models) else None
        if not parameterNode.modelPath and selected is not None:
            parameterNode.automaticModel = False
            self._useModel(parameterNode, selected, applyDefaults=True)
        self.setParameterNode(parameterNode)
        if parameterNode.automaticModel and self._models:
            self._chooseAutomaticModel()

    def setParameterNode(self, inputParameterNode: Optional[DiffusionAnomalyParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._shownThreshold = self._thresholdChoice()
            self._updateButtons()

    # -- model ---------------------------------------------------------------------------

    def _fillModelSelector(self) -> None:
        # Entry 0 chooses the bundled model that fits the loaded volumes; then the models by folder.
        self._models = [None] + self.logic.availableModels()
        current = self._parameterNode.modelPath if self._parameterNode else ""
        if current and current not in self._models:
            self._models.append(current)
        self.ui.modelSelector.blockSignals(True)
        self.ui.modelSelector.clear()
        for path in self._models:
            self.ui.modelSelector.addItem(_("Automatic: the model that fits the loaded volumes") if path is None else Path(path).name, path or "")
        self.ui.modelSelector.blockSignals(False)
        automatic = not self._parameterNode or self._parameterNode.automaticModel or not current
        index = 0 if automatic else self._models.index(current)
        self.ui.modelSelector.setCurrentIndex(index)
        self.onModelSelected(index)

    def onLoadModelButton(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Model bundle folder (card.json + weights.safetensors)"))
        if not folder:
            return
        with slicer.util.tryWithErrorDisplay(_("This folder is not a usable model."), waitCursor=True):
            self.logic.modelCard(folder)
            if folder not in self._models:
                self._models.append(folder)
                self.ui.modelSelector.addItem(Path(folder).name, folder)
            self.ui.modelSelector.setCurrentIndex(self._models.index(folder))

    def onModelSelected(self, index: int) -> None:
        if index < 0 or index >= len(self._models) or not self._parameterNode:
            return
        self._parameterNode.automaticModel = self._models[index] is None
        if self._parameterNode.automaticModel:
            self._chooseAutomaticModel()
        else:
            path = self._models[index]
            self._useModel(self._parameterNode, path, applyDefaults=self._parameterNode.modelPath != path)

    def _chooseAutomaticModel(self) -> None:
        """Picks the bundled model whose sequences the loaded volumes have, and says so."""
        try:
            path, volumes, reason = self.logic.automaticModel()
        except ValueError as error:
            self._card = None
            self.ui.modelSummaryLabel.text = _("Automatic: {error}").format(error=html.escape(str(error)))
            return
        changed = self._parameterNode.modelPath != path
        if changed:  # the volumes chosen for another model's channels do not carry over
            for i, volume in enumerate(volumes[:MAX_CHANNELS] + [None] * (MAX_CHANNELS - len(volumes))):
                setattr(self._parameterNode, f"channel{i}Volume", volume)
        self._useModel(self._parameterNode, path, applyDefaults=changed)
        self.ui.modelSummaryLabel.text = html.escape(reason) + "<br>" + self.ui.modelSummaryLabel.text

    def _useModel(self, parameterNode, path: str, applyDefaults: bool) -> None:
        """Shows the model's card (read without PyTorch) and fits the panel to its channels."""
        try:
            card = self.logic.modelCard(path)
        except Exception as error:
            self._card = None
            self.ui.modelSummaryLabel.text = _("Cannot use this model: {error}").format(error=error)
            return
        self._card = card
        parameterNode.modelPath = path
        self.ui.modelSummaryLabel.text = "<br>".join(html.escape(line) for line in card.summary())
        if len(card.channels) > MAX_CHANNELS:
            self.ui.modelSummaryLabel.text += "<br>" + _("This panel takes at most {n} channels; use the diffusion-anomaly command line for this model.").format(n=MAX_CHANNELS)
        labels = [self.ui.channel0Label, self.ui.channel1Label, self.ui.channel2Label, self.ui.channel3Label]
        selectors = [self.ui.channel0Selector, self.ui.channel1Selector, self.ui.channel2Selector, self.ui.channel3Selector]
        for i, (label, selector) in enumerate(zip(labels, selectors)):
            used = i < len(card.channels)
            label.visible = selector.visible = used
            if used:
                label.text = f"{card.channels[i]}:"
        # A fixed threshold lies between 0 and the channel count (the map's largest value).
        self.ui.thresholdSlider.maximum = float(min(len(card.channels), MAX_CHANNELS))
        if applyDefaults:
            self.logic.applyCardDefaults(parameterNode, card)
        self.logic.guessChannelVolumes(parameterNode, card)

    # -- detection ------------------------------------------------------------------------

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        self._updateButtons()
        threshold = self._thresholdChoice()
        if threshold == self._shownThreshold or self.logic.isRunning():
            return
        self._shownThreshold = threshold
        self.logic.showThreshold(threshold)
        self._recutTimer.start()

    def _thresholdChoice(self):
        return self.logic.thresholdChoice(self._parameterNode)

    def _recutSegmentation(self) -> None:
        if not self._parameterNode or self.logic.isRunning() or not self.logic.hasResult():
            return
        with slicer.util.tryWithErrorDisplay(_("Could not update the segmentation.")):
            voxels, value = self.logic.rethreshold(self._parameterNode)
            self.ui.statusLabel.text = _("{voxels} voxels above {value:.3g}.").format(voxels=voxels, value=value)

    def _updateButtons(self, caller=None, event=None) -> None:
        running = self.logic.isRunning()
        ready = bool(self._parameterNode and self._parameterNode.modelPath and self._parameterNode.channel0Volume)
        self.ui.detectButton.text = _("Cancel") if running else _("Detect anomalies")
        self.ui.detectButton.enabled = running or ready
        self.ui.previewButton.enabled = ready and not running
        if self._parameterNode:
            mode = self._parameterNode.thresholdMode
            self.ui.thresholdSlider.enabled = mode == "fixed"
            self.ui.brainMaskSegmentationSelector.enabled = self._parameterNode.brainMaskMode == "segment"
            self.ui.thresholdMeaningLabel.text = self.logic.thresholdMeaning(self._parameterNode)

    def onDetectButton(self) -> None:
        if self.logic.isRunning():
            self.logic.cancel()
            self.ui.statusLabel.text = _("Cancelled; the scene was not changed.")
            self._finishRun()
            return
        self._start(preview=False)

    def onPreviewButton(self) -> None:
        self._start(preview=True)

    def _start(self, preview: bool) -> None:
        if not self._ensureDependencies():
            return
        with slicer.util.tryWithErrorDisplay(_("Anomaly detection could not start."), waitCursor=True):
            if preview:
                # One slice in this process (the model stays loaded): faster from click to overlay
                # than starting a process, and short enough to run under a wait cursor.
                outputs = self.logic.preview(self._parameterNode, self._redSliceCentre())
                self.ui.statusLabel.text = "\n".join(outputs.messages + [_("Preview: {summary}.").format(summary=outputs.summary())])
                return
            messages = self.logic.start(self._parameterNode)
            self.ui.statusLabel.text = "\n".join(messages + [_("Detecting...")])
            self.ui.progressBar.value = 0
            self.ui.progressBar.visible = True
            self._timer.start()
        self._updateButtons()

    def _ensureDependencies(self) -> bool:
        """Checks the Slicer version, then installs PyTorch and the packages after asking; False if they are not there."""
        problem = self.logic.runtimeProblem()
        if problem:
            slicer.util.errorDisplay(problem)
            return False
        if not self.logic.missingRequirements():
            return True
        with slicer.util.tryWithErrorDisplay(_("The Python packages that Diffusion Anomaly needs could not be installed."), waitCursor=False):
            if not self._installTorch() or not self._installPackages():
                return False
            importlib.invalidate_caches()
            missing = self.logic.missingRequirements()
            if missing:
                raise RuntimeError(_("Still missing after the installation: {missing}. Restart Slicer and click Detect anomalies again.").format(missing=missing))
            return True
        return False

    def _installTorch(self) -> bool:
        from DiffusionAnomalyLib.environment import TORCH_REQUIREMENT, describe_unmet, unmet_requirements

        unmet = unmet_requirements([TORCH_REQUIREMENT])
        if not unmet:
            return True
        if unmet[0][1] is not None:  # PyTorchUtils does not upgrade a loaded torch (PyTorchUtils.installTorch returns the imported module)
            raise RuntimeError(_("{unmet} is installed; update PyTorch in the PyTorch Utils module, restart Slicer and try again.").format(unmet=describe_unmet(unmet)))
        try:
            import PyTorchUtils
        except ImportError:
            raise RuntimeError(_("Diffusion Anomaly needs the PyTorch extension: install it from the Extensions Manager and restart Slicer.")) from None
        # installTorch returns None when the user declines (fepegar/SlicerPyTorch, PyTorchUtils.py).
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True, torchVersionRequirement=TORCH_REQUIREMENT[len("torch"):])
        if torch is None:
            self.ui.statusLabel.text = _("PyTorch was not installed: detection needs it.")
            return False
        return True

    def _installPackages(self) -> bool:
        from DiffusionAnomalyLib.environment import describe_unmet, read_requirements, unmet_requirements

        requirements = read_requirements(REQUIREMENTS)
        if not unmet_requirements(requirements):
            return True
        packaging = getattr(slicer, "packaging", None)
        if packaging is not None and hasattr(packaging, "pip_ensure"):
            # Slicer >= 5.12 (Base/Python/slicer/packaging.py): asks, installs, and raises RuntimeError when declined.
            try:
                packaging.pip_ensure(requirements, requester="Diffusion Anomaly")
            except RuntimeError as error:
                if "declined" not in str(error):
                    raise
                self.ui.statusLabel.text = _("The packages were not installed: detection needs them.")
                return False
            return True
        # Slicer 5.10: slicer.util.pip_install after a confirmation (automatic in testing mode).
        if not slicer.util.confirmOkCancelDisplay(_("Diffusion Anomaly needs these Python packages, which will now be installed:\n\n{packages}").format(
                packages=describe_unmet(unmet_requirements(requirements)))):
            self.ui.statusLabel.text = _("The packages were not installed: detection needs them.")
            return False
        with slicer.util.WaitCursor():
            slicer.util.pip_install(" ".join(f'"{requirement}"' for requirement in requirements))
        return True

    def _redSliceCentre(self):
        sliceNode = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceNode()
        return [sliceNode.GetSliceToRAS().GetElement(row, 3) for row in range(3)]

    def _pollDetection(self) -> None:
        status = self.logic.status()
        if status is None:
            self._finishRun()
            return
        self.ui.progressBar.value = int(100 * status.fraction)
        if status.state == "running":
            remaining = status.remaining
            left = _("about {s:.0f} s left").format(s=remaining) if remaining is not None else _("starting...")
            self.ui.progressBar.setFormat(f"%p%  ({left})")
            return
        try:
            outputs = self.logic.finish(self._parameterNode)
            if outputs is not None:
                self.ui.statusLabel.text = "\n".join(outputs.messages + [_("Done: {summary}.").format(summary=outputs.summary())])
        except Exception as error:
            self.ui.statusLabel.text = _("Failed: {error}").format(error=error)
            slicer.util.errorDisplay(_("Anomaly detection failed; the scene was not changed."), detailedText=str(error))
        self._finishRun()

    def _finishRun(self) -> None:
        self._timer.stop()
        self.ui.progressBar.visible = False
        self._updateButtons()


#
# Logic
#


class DiffusionAnomalyLogic(ScriptedLoadableModuleLogic):
    """Runs detection for the panel and for scripts; the scene work is ``DetectionRun``'s.

    Full detections run in a child ``PythonSlicer`` process (``ProcessJob``): the application
    stays responsive, Cancel stops the whole process tree, and the child stops if Slicer goes.
    Previews of one slice run in this process (``InlineJob``), which keeps the model loaded.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._run = None

    def getParameterNode(self):
        return DiffusionAnomalyParameterNode(super().getParameterNode())

    # -- what this Slicer has --------------------------------------------------------------------

    @staticmethod
    def runtimeProblem() -> Optional[str]:
        """Why detection cannot run in this Slicer at all (too old, Intel Mac), or None."""
        from DiffusionAnomalyLib.environment import runtime_problem

        return runtime_problem()

    @staticmethod
    def missingRequirements() -> str:
        """The packages (PyTorch, MONAI, ...) missing or in a version that does not fit, or ''."""
        from DiffusionAnomalyLib.environment import TORCH_REQUIREMENT, describe_unmet, read_requirements, unmet_requirements

        return describe_unmet(unmet_requirements([TORCH_REQUIREMENT] + read_requirements(REQUIREMENTS)))

    # -- models -------------------------------------------------------------------------------

    @staticmethod
    def availableModels() -> List[str]:
        from DiffusionAnomalyLib import resources

        return [str(folder) for folder in resources.bundled_models().values()]

    def automaticModel(self):
        """The bundled model that fits the loaded volumes' sequences, the volume for each of its channels,
        and a sentence saying so (read without PyTorch)."""
        from DiffusionAnomalyLib import resources
        from DiffusionAnomalyLib.sequences import guess_sequence

        volumes = self.sceneLogic().input_volumes()
        if not volumes:
            raise ValueError(_("load the study's volumes; the model is chosen from their sequences"))
        sequences = [guess_sequence(node.GetName()) for node in volumes]
        path, order = resources.model_for_sequences(sequences)
        card = self.modelCard(str(path))
        used = ", ".join(f"{channel}: '{volumes[index].GetName()}'" for channel, index in zip(card.channels, order))
        return str(path), [volumes[index] for index in order], _("Automatic: {name} fits the loaded volumes ({used}).").format(name=card.name, used=used)

    @staticmethod
    def modelCard(path: str):
        """The model's card, read without PyTorch (so the panel works before the packages are installed)."""
        from DiffusionAnomalyLib.cards import load_card

        return load_card(path)

    @staticmethod
    def applyCardDefaults(parameterNode, card) -> None:
        defaults = card.defaults
        parameterNode.noiseLevel = float(defaults.noise_level)
        parameterNode.guidanceScale = float(defaults.guidance_scale)
        parameterNode.steps = int(defaults.steps)
        parameterNode.batchSize = int(defaults.batch_size)
        from DiffusionAnomalyLib.settings import panel_threshold_mode

        parameterNode.thresholdMode = panel_threshold_mode(defaults.threshold)
        if not isinstance(defaults.threshold, str):
            parameterNode.threshold = float(defaults.threshold)
        parameterNode.brainMaskMode = defaults.brain_mask
        parameterNode.biasCorrection = defaults.bias_correction
        parameterNode.redrawNoiseLevel = float(defaults.redraw_noise_level)
        parameterNode.mapReference = defaults.map_reference

    @staticmethod
    def channelVolumes(parameterNode, count: int) -> list:
        return [getattr(parameterNode, f"channel{i}Volume") for i in range(count)]

    def guessChannelVolumes(self, parameterNode, card) -> None:
        """Fills empty channel selectors from the loaded volumes' names, never with a volume chosen for another channel."""
        count = min(len(card.channels), MAX_CHANNELS)
        chosen = self.channelVolumes(parameterNode, count)
        for i, guess in enumerate(self.sceneLogic().guess_channel_volumes(card.channels[:count], chosen)):
            if chosen[i] is None and guess is not None:
                setattr(parameterNode, f"channel{i}Volume", guess)

    # -- running ------------------------------------------------------------------------------

    def sceneLogic(self):
        return self.detectionRun().scene_logic

    def detectionRun(self):
        """The scene logic's detection run for the current scene (a new one after the scene changed)."""
        from DiffusionAnomalyLib.jobs import InlineJob
        from DiffusionAnomalyScene.logic import AnomalySceneLogic, DetectionRun

        if self._run is None or self._run.scene_logic.scene is not slicer.mrmlScene:
            self._run = DetectionRun(AnomalySceneLogic(slicer.mrmlScene), start_job=_startProcessJob, start_preview_job=InlineJob)
        return self._run

    @staticmethod
    def thresholdChoice(parameterNode):
        from DiffusionAnomalyLib.settings import threshold_from_panel

        return threshold_from_panel(parameterNode.thresholdMode, float(parameterNode.threshold))

    def thresholdMeaning(self, parameterNode) -> str:
        """What the threshold means, with the value it stands for on the map shown, when known."""
        from DiffusionAnomalyLib.settings import THRESHOLD_MEANINGS

        text = THRESHOLD_MEANINGS[parameterNode.thresholdMode]
        value = self.sceneLogic().threshold_value(self._run.latest.map_node, self.thresholdChoice(parameterNode)) if self.hasResult() else None
        return text + (_(" (on this map: {value:.3g})").format(value=value) if value is not None and parameterNode.thresholdMode != "fixed" else "")

    @classmethod
    def settings(cls, parameterNode):
        from DiffusionAnomalyLib.settings import DetectionSettings

        return DetectionSettings(
            noise_level=parameterNode.noiseLevel,
            guidance_scale=parameterNode.guidanceScale,
            steps=parameterNode.steps,
            threshold=cls.thresholdChoice(parameterNode),
            batch_size=parameterNode.batchSize,
            device=parameterNode.device,
            brain_mask=None if parameterNode.brainMaskMode == "segment" else parameterNode.brainMaskMode,
            bias_correction=parameterNode.biasCorrection,
            redraw_noise_level=parameterNode.redrawNoiseLevel,
            map_reference=parameterNode.mapReference,
        )

    def _volumes(self, parameterNode) -> list:
        card = self.modelCard(parameterNode.modelPath)
        return self.channelVolumes(parameterNode, len(card.channels))

    @staticmethod
    def _brainSegmentation(parameterNode):
        if parameterNode.brainMaskMode != "segment":
            return None
        if parameterNode.brainMaskSegmentation is None:
            raise ValueError(_("Brain mask is 'segment' but no segmentation is chosen: choose the segmentation whose first segment is the brain."))
        return parameterNode.brainMaskSegmentation

    def start(self, parameterNode) -> List[str]:
        """Starts a full detection in a child process; returns notes on the inputs."""
        return self.detectionRun().start(parameterNode.modelPath, self._volumes(parameterNode), self.settings(parameterNode),
                                         map_node=parameterNode.outputMap, segmentation_node=parameterNode.outputSegmentation,
                                         brain_segmentation=self._brainSegmentation(parameterNode))

    def preview(self, parameterNode, previewRas):
        """Translates the axial slice through ``previewRas`` now, into the input's preview nodes."""
        run = self.detectionRun()
        run.start(parameterNode.modelPath, self._volumes(parameterNode), self.settings(parameterNode), preview_ras=previewRas,
                  brain_segmentation=self._brainSegmentation(parameterNode))
        return run.finish()

    def isRunning(self) -> bool:
        return self._run is not None and self._run.running

    def hasResult(self) -> bool:
        return self._run is not None and self._run.latest is not None

    def status(self):
        return self._run.status() if self._run is not None else None

    def cancel(self) -> None:
        if self._run is not None:
            self._run.cancel()

    def finish(self, parameterNode):
        """Writes a finished detection into the output nodes (None if it was cancelled)."""
        outputs = self.detectionRun().finish()
        if outputs is not None and not outputs.is_preview:
            parameterNode.outputMap = outputs.map_node
            parameterNode.outputSegmentation = outputs.segmentation_node
        return outputs

    def process(self, parameterNode, timeout: Optional[float] = None):
        """For scripts: runs a full detection to the end and returns its ``DetectionOutputs``."""
        self.start(parameterNode)
        run = self.detectionRun()
        outputs = run.wait(timeout)
        parameterNode.outputMap = outputs.map_node
        parameterNode.outputSegmentation = outputs.segmentation_node
        return outputs

    def showThreshold(self, threshold) -> None:
        """Moves the shown map's transparent floor with the threshold when its value is known now (cheap; the segmentation follows later)."""
        if self.hasResult():
            value = self.sceneLogic().threshold_value(self._run.latest.map_node, threshold)
            if value is not None:
                self.sceneLogic().show_threshold(self._run.latest.map_node, value)

    def rethreshold(self, parameterNode):
        return self.detectionRun().rethreshold(self.thresholdChoice(parameterNode))


def _pythonExecutable() -> str:
    """Slicer's own interpreter launcher, which sees the packages installed into Slicer."""
    name = "PythonSlicer.exe" if os.name == "nt" else "PythonSlicer"
    candidate = Path(slicer.app.slicerHome) / "bin" / name
    return str(candidate) if candidate.exists() else (shutil.which(name) or name)


def _startProcessJob(request):
    from DiffusionAnomalyLib.process_job import ProcessJob

    return ProcessJob(request, python=_pythonExecutable())


#
# Test
#


class DiffusionAnomalyTest(ScriptedLoadableModuleTest):
    """Loads the bundled sample, runs a short detection and a preview, and checks the outputs.

    ``Slicer --testing`` (the ``py_DiffusionAnomaly`` ctest) has no PyTorch or MONAI unless they were
    installed into that Slicer; the test is then skipped with the reason, as it is on a Slicer too old to run it.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_DetectOnSample()

    def test_DetectOnSample(self):
        logic = DiffusionAnomalyLogic()
        reason = logic.runtimeProblem() or (logic.missingRequirements() and _("needs {missing}: click Detect anomalies once to install them").format(
            missing=logic.missingRequirements()))
        if reason:
            self.skipTest(reason)

        import numpy as np
        import SimpleITK as sitk
        from DiffusionAnomalyLib import resources

        self.delayDisplay("Loading the sample study")
        for path in resources.sample_channels():
            slicer.util.loadVolume(str(path))
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(resources.sample_mask()))) > 0
        parameterNode = logic.getParameterNode()
        parameterNode.modelPath = str(resources.default_model())
        card = logic.modelCard(parameterNode.modelPath)
        logic.applyCardDefaults(parameterNode, card)
        logic.guessChannelVolumes(parameterNode, card)
        flair = logic.channelVolumes(parameterNode, len(card.channels))[card.channels.index("FLAIR")]
        self.assertIn("flair", flair.GetName())

        self.delayDisplay("Detecting with few steps in a background process")
        parameterNode.steps = 4
        outputs = logic.process(parameterNode, timeout=900)
        mapNode, segmentationNode = parameterNode.outputMap, parameterNode.outputSegmentation
        self.assertIs(outputs.map_node, mapNode)
        reference, written = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        logic.channelVolumes(parameterNode, 1)[0].GetIJKToRASMatrix(reference)
        mapNode.GetIJKToRASMatrix(written)
        for row in range(4):
            for column in range(4):
                self.assertAlmostEqual(reference.GetElement(row, column), written.GetElement(row, column), places=5)
        anomalyMap = slicer.util.arrayFromVolume(mapNode)
        self.assertGreater(anomalyMap[truth].mean(), 3 * anomalyMap[~truth].mean())
        self.assertGreater(outputs.anomaly_voxels, 0)
        self.assertEqual(segmentationNode.GetSegmentation().GetNumberOfSegments(), 1)

        self.delayDisplay("Re-thresholding without recomputing")
        parameterNode.threshold = float(np.percentile(anomalyMap[anomalyMap > 0], 99))
        voxels, _value = logic.rethreshold(parameterNode)
        self.assertLess(voxels, outputs.anomaly_voxels)

        self.delayDisplay("A preview goes to its own nodes and leaves the full result alone")
        fullMap = slicer.util.arrayFromVolume(mapNode).copy()
        tumourSlice = int(np.argmax(truth.sum(axis=(1, 2))))
        ijkToRas = vtk.vtkMatrix4x4()
        mapNode.GetIJKToRASMatrix(ijkToRas)
        centre = ijkToRas.MultiplyPoint([truth.shape[2] / 2, truth.shape[1] / 2, tumourSlice, 1.0])[:3]
        preview = logic.preview(parameterNode, centre)
        self.assertEqual(preview.slices_processed, 1)
        self.assertIsNot(preview.map_node, mapNode)
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(mapNode), fullMap)
        count = slicer.mrmlScene.GetNumberOfNodes()
        logic.preview(parameterNode, centre)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), count, "a second preview reuses the preview nodes")
        self.delayDisplay("Test passed")
