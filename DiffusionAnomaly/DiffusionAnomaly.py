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
    for line in (RESOURCES / "SampleData" / "SHA256SUMS").read_text().splitlines():
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
    modelPath - the model bundle folder.
    noiseLevel, guidanceScale, steps, threshold, useOtsu, device, batchSize - detection settings.
    outputMap - the anomaly-map volume; outputSegmentation - its thresholded segmentation.
    """

    channel0Volume: vtkMRMLScalarVolumeNode
    channel1Volume: vtkMRMLScalarVolumeNode
    channel2Volume: vtkMRMLScalarVolumeNode
    channel3Volume: vtkMRMLScalarVolumeNode
    modelPath: str = ""
    noiseLevel: Annotated[float, WithinRange(0.02, 1.0)] = 0.1
    guidanceScale: Annotated[float, WithinRange(0.0, 200.0)] = 40.0
    threshold: Annotated[float, WithinRange(0.0, 1.0)] = 0.1
    useOtsu: bool = False
    steps: Annotated[int, WithinRange(2, 1000)] = 10
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    batchSize: Annotated[int, WithinRange(1, 512)] = 32
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
        self._models = []
        self._card = None
        self._defaultsPending = False

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
        self.ui.thresholdSlider.connect("valueChanged(double)", self.onThresholdChanged)
        self.ui.otsuCheckBox.connect("toggled(bool)", self.onThresholdChanged)
        self.initializeParameterNode()
        self._fillModelSelector()

    def cleanup(self) -> None:
        self.logic.cancel()
        self._timer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
        self.logic.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def onNodeAdded(self, caller, event, node) -> None:
        # Volumes loaded while the panel is open fill the empty channel selectors; wait until
        # the node is complete (name, image) before looking at it.
        if self._card is not None and node.IsA("vtkMRMLScalarVolumeNode") and not node.IsA("vtkMRMLLabelMapVolumeNode"):
            qt.QTimer.singleShot(0, lambda: self._parameterNode and self.logic.guessChannelVolumes(self._parameterNode, self._card))

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode: Optional[DiffusionAnomalyParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
            self._updateButtons()

    # -- model ---------------------------------------------------------------------------

    def _fillModelSelector(self) -> None:
        self._models = self.logic.availableModels()
        current = self._parameterNode.modelPath if self._parameterNode else ""
        if current and current not in self._models:
            self._models.append(current)
        self.ui.modelSelector.blockSignals(True)
        self.ui.modelSelector.clear()
        for path in self._models:
            self.ui.modelSelector.addItem(Path(path).name, path)
        self.ui.modelSelector.blockSignals(False)
        index = self._models.index(current) if current in self._models else 0
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
        path = self._models[index]
        if not self.logic.dependenciesInstalled():
            self.ui.modelSummaryLabel.text = _("Detection needs PyTorch and MONAI; they are installed when you first click Detect anomalies.")
            self._defaultsPending = self._defaultsPending or self._parameterNode.modelPath != path
            self._parameterNode.modelPath = path
            return
        try:
            card = self.logic.modelCard(path)
        except Exception as error:
            self.ui.modelSummaryLabel.text = _("Cannot use this model: {error}").format(error=error)
            return
        firstChoice = self._parameterNode.modelPath != path or self._defaultsPending
        self._defaultsPending = False
        self._card = card
        self._parameterNode.modelPath = path
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
        if firstChoice:
            self.logic.applyCardDefaults(self._parameterNode, card)
        self.logic.guessChannelVolumes(self._parameterNode, card)

    # -- detection ------------------------------------------------------------------------

    def _updateButtons(self, caller=None, event=None) -> None:
        running = self.logic.isRunning()
        ready = bool(self._parameterNode and self._parameterNode.modelPath and self._parameterNode.channel0Volume)
        self.ui.detectButton.text = _("Cancel") if running else _("Detect anomalies")
        self.ui.detectButton.enabled = running or ready
        self.ui.previewButton.enabled = ready and not running
        self.ui.thresholdSlider.enabled = not (self._parameterNode and self._parameterNode.useOtsu)

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
        if self._card is None:  # the model could not be read before the packages were installed
            self.onModelSelected(self.ui.modelSelector.currentIndex)
        with slicer.util.tryWithErrorDisplay(_("Anomaly detection could not start."), waitCursor=True):
            messages = self.logic.start(self._parameterNode, previewRas=self._redSliceCentre() if preview else None)
            self.ui.statusLabel.text = "\n".join(messages + [_("Preview of the red slice...") if preview else _("Detecting...")])
            self.ui.progressBar.value = 0
            self.ui.progressBar.visible = True
            self._timer.start()
        self._updateButtons()

    def _ensureDependencies(self) -> bool:
        """Installs PyTorch (PyTorch extension) and MONAI after asking; False if the user declined."""
        if self.logic.dependenciesInstalled():
            return True
        if importlib.util.find_spec("torch") is None:
            try:
                import PyTorchUtils
            except ImportError:
                slicer.util.errorDisplay(_("Diffusion Anomaly needs the PyTorch extension: install it from the Extensions Manager and restart Slicer."))
                return False
            if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True) is None:
                return False
        packaging = getattr(slicer, "packaging", None)
        if packaging is not None and hasattr(packaging, "pip_ensure"):  # Slicer >= 5.10 asks, installs and reports
            packaging.pip_ensure(packaging.load_requirements(str(REQUIREMENTS)), requester="Diffusion Anomaly")
        else:
            if not slicer.util.confirmOkCancelDisplay(
                _("Diffusion Anomaly needs these Python packages, which will now be installed:\n\n{packages}").format(packages=REQUIREMENTS.read_text().strip())
            ):
                return False
            with slicer.util.WaitCursor():
                slicer.util.pip_install(["-r", str(REQUIREMENTS)])
        importlib.invalidate_caches()
        return self.logic.dependenciesInstalled()

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

    def onThresholdChanged(self, *unused) -> None:
        if not self._parameterNode or self.logic.isRunning() or not self._parameterNode.outputMap:
            return
        with slicer.util.tryWithErrorDisplay(_("Could not update the segmentation.")):
            voxels, value = self.logic.rethreshold(self._parameterNode)
            self.ui.statusLabel.text = _("{voxels} voxels above {value:.3g}.").format(voxels=voxels, value=value)


#
# Logic
#


class DiffusionAnomalyLogic(ScriptedLoadableModuleLogic):
    """Runs detection for the panel and for scripts; the scene work is ``AnomalySceneLogic``'s.

    Full detections run in a child ``PythonSlicer`` process so the application stays
    responsive and Cancel stops the work at once; previews run on a thread of this process,
    which keeps the model loaded between previews.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._job = None
        self._pending = None
        self._sceneLogic = None

    def getParameterNode(self):
        return DiffusionAnomalyParameterNode(super().getParameterNode())

    @staticmethod
    def dependenciesInstalled() -> bool:
        return all(importlib.util.find_spec(name) is not None for name in ("torch", "monai", "einops", "safetensors"))

    # -- models -------------------------------------------------------------------------------

    @staticmethod
    def availableModels() -> List[str]:
        models = RESOURCES / "Models"
        return sorted(str(folder) for folder in models.iterdir() if (folder / "card.json").is_file()) if models.is_dir() else []

    @staticmethod
    def modelCard(path: str):
        from DiffusionAnomalyLib.bundle import load_card

        return load_card(path)

    @staticmethod
    def applyCardDefaults(parameterNode, card) -> None:
        defaults = card.defaults
        parameterNode.noiseLevel = float(defaults.noise_level)
        parameterNode.guidanceScale = float(defaults.guidance_scale)
        parameterNode.steps = int(defaults.steps)
        parameterNode.batchSize = int(defaults.batch_size)
        parameterNode.useOtsu = defaults.threshold == "otsu"
        if defaults.threshold != "otsu":
            parameterNode.threshold = float(defaults.threshold)

    @staticmethod
    def channelVolumes(parameterNode, count: int) -> list:
        return [getattr(parameterNode, f"channel{i}Volume") for i in range(count)]

    def guessChannelVolumes(self, parameterNode, card) -> None:
        """Fills empty channel selectors from the loaded volumes' names (``*flair*`` → FLAIR, ...)."""
        for i, guess in enumerate(self.sceneLogic().guess_channel_volumes(card.channels[:MAX_CHANNELS])):
            if guess is not None and getattr(parameterNode, f"channel{i}Volume") is None:
                setattr(parameterNode, f"channel{i}Volume", guess)

    # -- running ------------------------------------------------------------------------------

    def sceneLogic(self):
        from DiffusionAnomalyScene.logic import AnomalySceneLogic

        if self._sceneLogic is None or self._sceneLogic.scene is not slicer.mrmlScene:
            self._sceneLogic = AnomalySceneLogic(slicer.mrmlScene)
        return self._sceneLogic

    @staticmethod
    def settings(parameterNode):
        from DiffusionAnomalyScene.logic import DetectionSettings

        return DetectionSettings(
            noise_level=parameterNode.noiseLevel,
            guidance_scale=parameterNode.guidanceScale,
            steps=parameterNode.steps,
            threshold="otsu" if parameterNode.useOtsu else parameterNode.threshold,
            batch_size=parameterNode.batchSize,
            device=parameterNode.device,
        )

    def start(self, parameterNode, previewRas=None) -> List[str]:
        """Starts a detection (a preview of the slice through ``previewRas`` if given); returns notes."""
        from DiffusionAnomalyLib.jobs import ProcessJob, ThreadJob

        if self.isRunning():
            raise RuntimeError(_("a detection is already running"))
        card = self.modelCard(parameterNode.modelPath)
        volumes = self.channelVolumes(parameterNode, len(card.channels))
        self._pending = self.sceneLogic().request(parameterNode.modelPath, volumes, self.settings(parameterNode), previewRas)
        if previewRas is not None:
            self._job = ThreadJob(self._pending.request)
        else:
            self._job = ProcessJob(self._pending.request, python=_pythonExecutable(), launch=_launchInSlicer)
        return list(self._pending.messages)

    def isRunning(self) -> bool:
        return self._job is not None and self._job.status().state == "running"

    def status(self):
        return self._job.status() if self._job is not None else None

    def cancel(self) -> None:
        if self._job is not None:
            self._job.cancel()
        self._job = self._pending = None

    def finish(self, parameterNode):
        """Writes a finished job's result into the output nodes (None if it was cancelled)."""
        job, pending = self._job, self._pending
        self._job = self._pending = None
        if job is None or job.status().state == "cancelled":
            return None
        outputs = self.sceneLogic().apply(pending, job.result(), parameterNode.outputMap, parameterNode.outputSegmentation)
        parameterNode.outputMap = outputs.map_node
        parameterNode.outputSegmentation = outputs.segmentation_node
        return outputs

    def process(self, parameterNode, previewRas=None, timeout: Optional[float] = None):
        """For scripts: runs a detection to the end and returns its ``DetectionOutputs``."""
        self.start(parameterNode, previewRas)
        status = self._job.wait(timeout)
        if status.state == "running":
            self.cancel()
            raise TimeoutError(_("detection did not finish within {s} s").format(s=timeout))
        return self.finish(parameterNode)

    def rethreshold(self, parameterNode):
        threshold = "otsu" if parameterNode.useOtsu else parameterNode.threshold
        return self.sceneLogic().rethreshold(parameterNode.outputMap, parameterNode.outputSegmentation, threshold)


def _pythonExecutable() -> str:
    """Slicer's own interpreter, which sees the packages installed into Slicer."""
    name = "PythonSlicer.exe" if os.name == "nt" else "PythonSlicer"
    candidate = Path(slicer.app.slicerHome) / "bin" / name
    return str(candidate) if candidate.exists() else (shutil.which(name) or name)


def _launchInSlicer(arguments, environment):
    return slicer.util.launchConsoleProcess(arguments, useStartupEnvironment=False, updateEnvironment=environment)


#
# Test
#


class DiffusionAnomalyTest(ScriptedLoadableModuleTest):
    """Loads the bundled sample, runs a short detection and a preview, and checks the outputs."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_DetectOnSample()

    def test_DetectOnSample(self):
        import numpy as np
        import SimpleITK as sitk
        from DiffusionAnomalyLib import resources

        self.delayDisplay("Loading the sample study")
        for path in resources.sample_channels():
            slicer.util.loadVolume(str(path))
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(resources.sample_mask()))) > 0
        logic = DiffusionAnomalyLogic()
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

        self.delayDisplay("Previewing one slice updates the same nodes")
        count = slicer.mrmlScene.GetNumberOfNodes()
        tumourSlice = int(np.argmax(truth.sum(axis=(1, 2))))
        ijkToRas = vtk.vtkMatrix4x4()
        mapNode.GetIJKToRASMatrix(ijkToRas)
        centre = ijkToRas.MultiplyPoint([truth.shape[2] / 2, truth.shape[1] / 2, tumourSlice, 1.0])[:3]
        preview = logic.process(parameterNode, previewRas=centre, timeout=300)
        self.assertEqual(preview.slices_processed, 1)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), count)
        self.delayDisplay("Test passed")
