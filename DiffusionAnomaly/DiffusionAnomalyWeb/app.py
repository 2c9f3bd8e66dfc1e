"""One browser session of the web app: Slicer views and the detection panel (trame-slicer).

The panel mirrors the desktop module and drives the same detection run of the scene logic
(``DiffusionAnomalyScene``); detection runs on a worker thread while the event loop keeps
serving the page. One process holds one session's scene: ``sessions.py`` starts one per
browser and forwards to it with the session's secret, without which this process answers
nothing (so other users of the machine cannot reach it on its loopback port).
"""

from __future__ import annotations

import os

# Without a display, VTK's wheel would try X first; go straight to EGL (GPU or Mesa).
if not os.environ.get("DISPLAY"):
    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")

import argparse
import asyncio
import logging
import re
import tempfile
from pathlib import Path
from typing import List, Optional

import slicer
from aiohttp import web
from trame.app import TrameApp, asynchronous
from trame.app.file_upload import ClientFile
from trame.decorators import change
from trame.widgets import html
from trame.widgets import vuetify3 as v3
from trame_slicer.core import LayoutManager, SlicerApp
from trame_slicer.rca_view import register_rca_factories
from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition
from trame_vuetify.ui.vuetify3 import SinglePageWithDrawerLayout

from DiffusionAnomalyLib import resources
from DiffusionAnomalyLib.cards import load_card
from DiffusionAnomalyLib.jobs import RUNNING, ThreadJob
from DiffusionAnomalyLib.sequences import guess_sequence
from DiffusionAnomalyLib.settings import (
    BIAS_CORRECTIONS,
    BRAIN_MASK_MODES,
    MAP_REFERENCES,
    PANEL_THRESHOLD_MODES,
    RANGES,
    THRESHOLD_MEANINGS,
    DetectionSettings,
    number_from_text,
    panel_threshold_mode,
    parse_threshold,
    threshold_from_panel,
)
from DiffusionAnomalyScene import outputs
from DiffusionAnomalyScene.logic import AnomalySceneLogic, DetectionRun, background_volume

from .session_secret import SECRET_ENVIRONMENT, require_secret

log = logging.getLogger("diffusion-anomaly.web")
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
POLL_SECONDS = 0.25
# Re-cutting the segmentation imports a whole labelmap: it waits until the slider rests.
RETHRESHOLD_DELAY_SECONDS = 0.3
VOLUME_RENDERING_PRESET = "MR-Default"
# The head is drawn faint, so that the segmentation inside it stays visible in 3D.
VOLUME_RENDERING_OPACITY = 0.12
LEGEND_STOPS = 9
AUTOMATIC = "automatic"
# Channel selectors on the page, as in the desktop panel.
MAX_CHANNELS = 4


def heat_gradient() -> str:
    """A CSS gradient of the map's colour table (the one the views use), for the legend in the panel."""
    rows = [line.split() for line in outputs.HEAT_COLOR_FILE.read_text(encoding="utf-8").splitlines() if line.strip() and not line.startswith("#")]
    picks = [rows[round(i * (len(rows) - 1) / (LEGEND_STOPS - 1))] for i in range(LEGEND_STOPS)]
    return "linear-gradient(to right, " + ", ".join(f"rgb({r[2]}, {r[3]}, {r[4]})" for r in picks) + ")"


def image_suffix(name: str) -> str:
    return next((suffix for suffix in IMAGE_SUFFIXES if name.lower().endswith(suffix)), "")


def volume_name(upload_name: Optional[str], fallback: str) -> str:
    """A display name from an uploaded file's name: no folders, no control characters, no extension."""
    base = re.split(r"[\\/]", upload_name or "")[-1]
    base = base[: -len(image_suffix(base))] if image_suffix(base) else base
    base = re.sub(r"[\x00-\x1f\x7f]", "", base).strip(" .")
    return base[:120] or fallback


class AnomalyWebApp(TrameApp):
    """The page: four views on the left of a drawer with the detection panel.

    Args:
        model: the model bundle; by default the bundled model that fits the loaded volumes
            is chosen automatically (the panel offers every bundled model too).
        secret: when given, every request must carry it in the ``X-Diffusion-Anomaly-Session``
            header (the front server adds it); others get 403.
    """

    def __init__(self, server=None, model: Optional[str] = None, secret: Optional[str] = None) -> None:
        super().__init__(server, client_type="vue3")
        self.models = {name: str(path) for name, path in resources.bundled_models().items()}
        if model is not None:
            self.models = {load_card(model).name: str(model), **self.models}
        self.model = str(model) if model is not None else next(iter(self.models.values()))
        self.card = load_card(self.model)
        self.secret = secret
        self.slicer = SlicerApp()
        register_rca_factories(self.slicer.view_manager, self.server)
        self.scene = self.slicer.scene
        # trame-slicer sets up the scene with vtkMRMLColorLogic, which (unlike Slicer's
        # vtkSlicerColorLogic) does not register the colour-legend node class.
        if not self.scene.IsNodeClassRegistered("vtkMRMLColorLegendDisplayNode"):
            self.scene.RegisterNodeClass(slicer.vtkMRMLColorLegendDisplayNode())
        self.scene_logic = AnomalySceneLogic(self.scene)
        self.run = DetectionRun(self.scene_logic, ThreadJob)
        self.layout_manager = LayoutManager(self.scene, self.slicer.view_manager, self.server)
        self.layout_manager.register_layout("four-up", Layout(LayoutDirection.Vertical, [
            Layout(LayoutDirection.Horizontal, [ViewLayoutDefinition.axial_view(), ViewLayoutDefinition.threed_view()]),
            Layout(LayoutDirection.Horizontal, [ViewLayoutDefinition.sagittal_view(), ViewLayoutDefinition.coronal_view()]),
        ]))
        self.layout_manager.set_layout("four-up")
        self._rendered_volume = None
        self._recut = None

        self.state.update({
            "trame__title": "Diffusion Anomaly",
            "model_choices": [{"title": "Automatic: fits the loaded volumes", "value": AUTOMATIC}]
                             + [{"title": name, "value": name} for name in self.models],
            "model_choice": AUTOMATIC if model is None else self.card.name,
            "model_note": "",
            "volumes": [],
            **{self._channel_key(i): None for i in range(MAX_CHANNELS)},
            "threshold_modes": [{"title": mode, "value": mode} for mode in PANEL_THRESHOLD_MODES],
            "threshold_meanings": THRESHOLD_MEANINGS,
            "brain_mask_modes": list(BRAIN_MASK_MODES),
            "bias_corrections": list(BIAS_CORRECTIONS),
            "map_references": list(MAP_REFERENCES),
            "running": False,
            "progress": 0,
            "progress_text": "",
            "status": "Load the sample study or upload one volume per sequence.",
            "error_msg": "",
            "overlay_shown": False,
            "segmentation_shown": False,
            "anomaly_voxels": 0,
            "legend_max": 1.0,
            "threshold_used": None,
        })
        self._show_model(self.model)
        self._build_ui()
        self.ctrl.on_server_bind.add(self._add_routes)

    @staticmethod
    def _channel_key(index: int) -> str:
        return f"channel_{index}"

    def _show_model(self, path: str, note: str = "") -> None:
        """Fits the panel to a model: its card, its channels, its default settings."""
        changed = path != self.model or "channel_names" not in self.state
        self.model, self.card = path, load_card(path)
        defaults = self.card.defaults
        self.state.model_summary = [self.card.name] + self.card.summary()[1:]
        self.state.model_note = note
        self.state.channel_names = list(self.card.channels[:MAX_CHANNELS])
        self.state.threshold_max = float(len(self.card.channels))
        if changed:
            self.state.update({
                "noise_level": float(defaults.noise_level),
                "guidance_scale": float(defaults.guidance_scale),
                "threshold_mode": panel_threshold_mode(defaults.threshold),
                "threshold": float(defaults.threshold) if not isinstance(defaults.threshold, str) else 0.1,
                "steps": str(defaults.steps),
                "default_steps": int(defaults.steps),
                "brain_mask": defaults.brain_mask,
                "bias_correction": defaults.bias_correction,
                "redraw_noise_level": float(defaults.redraw_noise_level),
                "map_reference": defaults.map_reference,
            })

    def _choose_model(self) -> None:
        """The bundled model that fits the loaded volumes (automatic), or the one chosen."""
        if self.state.model_choice != AUTOMATIC:
            self._show_model(self.models[self.state.model_choice])
            return
        nodes = self.scene_logic.input_volumes()
        if not nodes:
            self._show_model(self.model, "Automatic: the model is chosen from the sequences of the volumes you load.")
            return
        try:
            path, order = resources.model_for_sequences([guess_sequence(node.GetName()) for node in nodes])
        except ValueError as error:
            self._show_model(self.model, f"Automatic: {error}")
            return
        card = load_card(path)
        used = ", ".join(f"{channel}: {nodes[index].GetName()}" for channel, index in zip(card.channels, order))
        self._show_model(str(path), f"Automatic: {card.name} fits the loaded volumes ({used}).")
        for index, node_index in enumerate(order[:MAX_CHANNELS]):
            self.state[self._channel_key(index)] = nodes[node_index].GetID()

    @change("model_choice")
    def _on_model_choice(self, **_) -> None:
        self._choose_model()
        self._refresh_volumes()

    # -- page ---------------------------------------------------------------------------------

    def _build_ui(self) -> None:
        noise_low, noise_high = RANGES["noise_level"]
        guidance_low, guidance_high = RANGES["guidance_scale"]
        steps_low, steps_high = RANGES["steps"]
        redraw_low, redraw_high = RANGES["redraw_noise_level"]
        with SinglePageWithDrawerLayout(self.server, width=360) as self.ui:
            self.ui.title.set_text("Diffusion Anomaly")
            self.ui.root.theme = "dark"
            with self.ui.drawer:
                with html.Div(classes="pa-3 d-flex flex-column ga-2"):
                    v3.VSelect(id="model", label="Model", v_model=("model_choice",), items=("model_choices",), density="compact",
                               hide_details=True, disabled=("running",))
                    html.Div("{{ model_note }}", id="model-note", v_if="model_note", classes="text-caption text-amber")
                    html.Div("{{ model_summary.join(' ') }}", id="model-summary", classes="text-caption")
                    v3.VBtn("Load sample study", id="load-sample", block=True, click=self.load_sample, disabled=("running",))
                    v3.VFileInput(
                        id="upload", label="Upload NIfTI / NRRD volumes", multiple=True, density="compact", hide_details=True,
                        accept=",".join(IMAGE_SUFFIXES + (".gz",)), disabled=("running",),
                        change=f"trigger('{self.ctrl.trigger_name(self.upload)}', [$event.target.files])",
                    )
                    for index in range(MAX_CHANNELS):
                        v3.VSelect(
                            id=f"channel-{index}", v_if=f"channel_names.length > {index}", label=(f"channel_names[{index}] + ' volume'",),
                            v_model=(self._channel_key(index),), items=("volumes",),
                            density="compact", hide_details=True, clearable=True, disabled=("running",),
                        )
                    html.Div("{{ 'Noise level L = ' + Number(noise_level).toFixed(2) + ' (' + Math.round(noise_level * 1000) + ' of 1000 steps)' }}",
                             id="noise-level-value", classes="text-body-2 mt-2")
                    v3.VSlider(
                        id="noise-level", v_model=("noise_level",), min=max(noise_low, 0.02), max=noise_high, step=0.01,
                        density="compact", hide_details=True, disabled=("running",),
                        title="How deep the image is encoded into noise: higher removes larger lesions but redraws more healthy anatomy.",
                    )
                    html.Div("{{ 'Guidance scale s = ' + Number(guidance_scale).toFixed(0) + (guidance_scale == 0 ? ' (plain reconstruction)' : '') }}",
                             id="guidance-scale-value", classes="text-body-2")
                    v3.VSlider(
                        id="guidance-scale", v_model=("guidance_scale",), min=guidance_low, max=min(guidance_high, 200), step=1,
                        density="compact", hide_details=True, disabled=("running",),
                        title="How strongly the classifier pushes toward healthy; 0 is a plain reconstruction.",
                    )
                    html.Div("{{ Number(redraw_noise_level) > Number(noise_level) ? 'Redraw lesions from L = ' + Number(redraw_noise_level).toFixed(2) "
                             ": 'Redraw lesions: off (at most L)' }}", id="redraw-noise-level-value", classes="text-body-2")
                    v3.VSlider(
                        id="redraw-noise-level", v_model=("redraw_noise_level",), min=redraw_low, max=redraw_high, step=0.01,
                        density="compact", hide_details=True, disabled=("running",),
                        title="Above L, what the first translation segments is translated again from this deeper level, the rest kept: "
                              "large lesions are removed more completely, at the cost of time and a wider segmentation around small ones.",
                    )
                    v3.VSelect(id="threshold-mode", label="Threshold", v_model=("threshold_mode",), items=("threshold_modes",),
                               density="compact", hide_details=True)
                    html.Div("{{ threshold_meanings[threshold_mode] }}", id="threshold-meaning", classes="text-caption")
                    html.Div("{{ 'Fixed threshold = ' + Number(threshold).toFixed(3) + ' (map units, 0 to ' + threshold_max + ')' }}",
                             id="threshold-value", v_if="threshold_mode == 'fixed'", classes="text-body-2")
                    v3.VSlider(
                        id="threshold", v_model=("threshold",), min=0.005, max=("threshold_max",), step=0.005, v_if="threshold_mode == 'fixed'",
                        density="compact", hide_details=True, disabled=("running",),
                        title="Map value above which voxels are segmented; moving it re-cuts the segmentation.",
                    )
                    v3.VSelect(id="brain-mask", label="Brain mask", v_model=("brain_mask",), items=("brain_mask_modes",), density="compact",
                               hide_details=True, disabled=("running",),
                               title="auto: extract the brain unless the images are skull-stripped; extract: always; none: the images are skull-stripped. "
                                     "Only the brain is analysed; its outline is shown in green.")
                    v3.VSelect(id="bias-correction", label="Bias correction", v_model=("bias_correction",), items=("bias_corrections",),
                               density="compact", hide_details=True, disabled=("running",),
                               title="n4: divide out each sequence's bias field (coil shading), fitted inside the brain, before detection; "
                                     "none: the intensities as loaded (scans corrected already, as BraTS is).")
                    v3.VSelect(id="map-reference", label="Map compared with", v_model=("map_reference",), items=("map_references",),
                               density="compact", hide_details=True, disabled=("running",),
                               title="input: the scan against its healthy translation (the paper's map); reconstruction: the healthy "
                                     "translation against the same encoding decoded without guidance, so only what guidance removed "
                                     "shows; one more decoding, about a third longer.")
                    with html.Div(id="legend", v_if="overlay_shown", classes="text-caption"):
                        html.Div("Anomaly map (colours in the views)")
                        with html.Div(style=f"position: relative; height: 14px; border-radius: 2px; background: {heat_gradient()}"):
                            html.Div(id="legend-threshold", v_if="threshold_used !== null",
                                     style=("{position: 'absolute', top: '-3px', bottom: '-3px', width: '2px', background: '#00d9ff', "
                                            "left: Math.min(100, 100 * threshold_used / legend_max) + '%'}",),
                                     title="the threshold")
                        with html.Div(classes="d-flex justify-space-between"):
                            html.Span("0")
                            html.Span("{{ (legend_max / 2).toFixed(2) }}")
                            html.Span("{{ legend_max.toFixed(2) }}", id="legend-max")
                    v3.VTextField(id="steps", label=(f"'Steps ({steps_low}–{steps_high}; this model\\'s default: ' + default_steps + ')'",),
                                  v_model=("steps",), density="compact", hide_details=True, disabled=("running",),
                                  title="DDIM network evaluations per direction: fewer is faster, with more reconstruction error in the map.")
                    v3.VBtn("{{ running ? 'Cancel' : 'Detect anomalies' }}", id="detect", color=("running ? 'error' : 'primary'",),
                            click=self.detect_or_cancel, block=True)
                    v3.VBtn("Preview slice", id="preview", click=self.preview, disabled=("running",), block=True, variant="tonal",
                            title="Runs only the axial slice shown in the red view, into a preview map of its own.")
                    v3.VProgressLinear(id="progress", v_if="running", model_value=("progress",), height=18, color="amber")
                    html.Div("{{ progress_text }}", id="progress-text", v_if="running", classes="text-caption")
                    v3.VAlert(id="error", v_if="error_msg", type="error", density="compact", text=("error_msg",),
                              closable=True, click_close="error_msg = ''")
                    html.Div("{{ status }}", id="status", classes="text-body-2")
                    html.Div(
                        "{{ JSON.stringify({overlay_shown, segmentation_shown, running, anomaly_voxels}) }}",
                        id="result-state", style="display: none",
                    )
            with self.ui.content:
                with v3.VContainer(fluid=True, classes="pa-0 fill-height"):
                    self.layout_manager.initialize_layout_grid(self.ui)

    # -- loading ------------------------------------------------------------------------------

    def _channel_nodes(self) -> list:
        ids = [self.state[self._channel_key(i)] for i in range(min(len(self.card.channels), MAX_CHANNELS))]
        return [self.scene.GetNodeByID(node_id) if node_id else None for node_id in ids]

    def _refresh_volumes(self) -> None:
        nodes = self.scene_logic.input_volumes()
        self.state.volumes = [{"title": node.GetName(), "value": node.GetID()} for node in nodes]
        if self.state.model_choice == AUTOMATIC:
            self._choose_model()
        for index, guess in enumerate(self.scene_logic.guess_channel_volumes(self.card.channels[:MAX_CHANNELS], self._channel_nodes())):
            self.state[self._channel_key(index)] = guess.GetID() if guess is not None else None
        chosen = self._channel_nodes()
        if any(node is not None for node in chosen):
            background = background_volume(self.card, chosen) or next(node for node in chosen if node is not None)
            self.slicer.display_manager.show_volume_in_slice_background(background)
            self._render_in_3d(background)
            self.slicer.display_manager.reset_views()

    def _render_in_3d(self, volume) -> None:
        """Volume rendering of the shown study in the 3D view, so that the segmentation has the head around it."""
        if volume is None or volume is self._rendered_volume:
            return
        rendering = self.slicer.volume_rendering
        if self._rendered_volume is not None and rendering.has_vr_display_node(self._rendered_volume):
            rendering.get_vr_display_node(self._rendered_volume).SetVisibility(False)
        if rendering.has_vr_display_node(volume):
            display = rendering.get_vr_display_node(volume)
        else:
            display = rendering.create_display_node(volume, VOLUME_RENDERING_PRESET)
            opacity = display.GetVolumePropertyNode().GetScalarOpacity()
            for index in range(opacity.GetSize()):
                point = [0.0] * 4
                opacity.GetNodeValue(index, point)
                point[1] *= VOLUME_RENDERING_OPACITY
                opacity.SetNodeValue(index, point)
        display.SetVisibility(True)
        self._rendered_volume = volume

    def _load_files(self, files: List[tuple]) -> List[str]:
        """Loads (path, display name) pairs with Slicer's reader; returns what could not be read."""
        failed = []
        for path, name in files:
            nodes = self.slicer.io_manager.load_volumes(str(path))
            if not nodes:
                failed.append(f"{name} (unreadable as an image volume)")
            for node in nodes:
                node.SetName(name)
        self._refresh_volumes()
        return failed

    def load_sample(self) -> None:
        self.state.error_msg = ""
        paths = resources.sample_channels()
        failed = self._load_files([(path, volume_name(path.name, path.name)) for path in paths])
        if failed:
            self.state.error_msg = "Cannot load the sample: " + "; ".join(failed)
        else:
            self.state.status = "Sample study loaded: check the channel volumes, then Detect anomalies."

    def upload(self, files) -> None:
        """Loads uploaded volumes. Files are stored under neutral names, so that no patient's
        file name reaches a log; the volume keeps the uploaded name for the user."""
        if not files:
            return
        self.state.error_msg = ""
        failed = []
        with tempfile.TemporaryDirectory() as folder:
            readable = []
            for index, entry in enumerate(files):
                try:
                    upload = ClientFile(entry)
                    name = volume_name(upload.name, f"upload {index + 1}")
                    suffix = image_suffix(upload.name or "")
                    if not suffix:
                        failed.append(f"{name} (not a NIfTI .nii/.nii.gz, NRRD .nrrd or .mha file)")
                        continue
                    path = Path(folder) / f"upload-{index}{suffix}"
                    path.write_bytes(upload.content or b"")
                    readable.append((path, name))
                except Exception:  # a malformed upload message must not end the session
                    failed.append(f"file {index + 1} (the upload could not be received)")
            unreadable = self._load_files(readable)
            failed += unreadable
            loaded = len(readable) - len(unreadable)
        if failed:
            self.state.error_msg = "Not loaded: " + "; ".join(failed) + ". Upload .nii, .nii.gz, .nrrd or .mha volumes."
        if loaded:
            self.state.status = f"Loaded {loaded} volume(s)."

    # -- detection ----------------------------------------------------------------------------

    def threshold(self):
        return threshold_from_panel(self.state.threshold_mode, parse_threshold(self.state.threshold))

    def settings(self) -> DetectionSettings:
        """The panel's settings; raises ``ValueError`` with the allowed range for a bad entry."""
        return DetectionSettings(
            noise_level=number_from_text("noise_level", self.state.noise_level),
            guidance_scale=number_from_text("guidance_scale", self.state.guidance_scale),
            steps=number_from_text("steps", self.state.steps),
            threshold=self.threshold(),
            brain_mask=self.state.brain_mask,
            bias_correction=self.state.bias_correction,
            redraw_noise_level=number_from_text("redraw_noise_level", self.state.redraw_noise_level),
            map_reference=self.state.map_reference,
        ).resolve(self.card)

    def detect_or_cancel(self) -> None:
        if self.run.running:
            self.run.cancel()
            return
        self._start(preview=False)

    def preview(self) -> None:
        self._start(preview=True)

    def _red_slice_centre(self) -> List[float]:
        slice_to_ras = self.slicer.view_manager.get_view("Red").get_view_node().GetSliceToRAS()
        return [slice_to_ras.GetElement(row, 3) for row in range(3)]

    def _start(self, preview: bool) -> None:
        self.state.error_msg = ""
        full = self.run.full
        targets = (full.map_node, full.segmentation_node) if full is not None and self.scene.GetNodeByID(full.map_node.GetID()) else (None, None)
        try:
            notes = self.run.start(self.model, self._channel_nodes(), self.settings(),
                                   self._red_slice_centre() if preview else None, *targets)
        except (ValueError, RuntimeError) as error:
            self.state.error_msg = str(error)
            return
        self.state.running = True
        self.state.progress = 0
        self.state.progress_text = "starting..."
        self.state.status = " ".join(notes + ["Previewing the red slice..." if preview else "Detecting anomalies..."])
        asynchronous.create_task(self._follow_run())

    async def _follow_run(self) -> None:
        while True:
            status = self.run.status()
            if status is None or status.state != RUNNING:
                break
            with self.state:
                self.state.progress = round(100 * status.fraction)
                remaining = status.remaining
                self.state.progress_text = f"{status.elapsed:.0f} s; about {remaining:.0f} s left" if remaining is not None else "loading the model..."
            await asyncio.sleep(POLL_SECONDS)
        with self.state:
            self.state.running = False
            try:
                result = self.run.finish()
            except Exception as error:
                self.state.error_msg = f"Detection failed: {error}"
                self.state.status = "Detection failed; nothing was changed."
                return
            if result is None:
                self.state.status = "Cancelled; nothing was changed."
                return
            self._show(result)

    def _show(self, result) -> None:
        result.segmentation_node.CreateClosedSurfaceRepresentation()
        self.state.legend_max = float(result.map_node.GetDisplayNode().GetWindowLevelMax())
        self.state.overlay_shown = True
        self.state.segmentation_shown = True
        self.state.anomaly_voxels = result.anomaly_voxels
        self.state.threshold_used = result.threshold
        self.state.status = " ".join(result.messages + [f"Done: {result.summary()}."])
        self._schedule_render()

    def _schedule_render(self) -> None:
        for view in self.slicer.view_manager.get_views():
            view.schedule_render()

    @change("threshold", "threshold_mode")
    def _rethreshold(self, **_) -> None:
        """Moves the map's transparent floor at once; re-cuts the segmentation once the slider rests."""
        latest = self.run.latest
        if latest is None or self.run.running:
            return
        try:
            value = self.scene_logic.threshold_value(latest.map_node, self.threshold())
        except ValueError as error:
            self.state.error_msg = str(error)
            return
        if value is not None:
            AnomalySceneLogic.show_threshold(latest.map_node, value)
            self._schedule_render()
        if self._recut is not None:
            self._recut.cancel()
        self._recut = asynchronous.create_task(self._recut_later())

    async def _recut_later(self) -> None:
        await asyncio.sleep(RETHRESHOLD_DELAY_SECONDS)
        with self.state:
            try:
                voxels, value = self.run.rethreshold(self.threshold())
            except ValueError as error:
                self.state.error_msg = str(error)
                return
            self.run.latest.segmentation_node.CreateClosedSurfaceRepresentation()
            self.state.anomaly_voxels = voxels
            self.state.threshold_used = value
            self.state.status = f"{voxels} voxels above {value:.3g}."
            self._schedule_render()

    # -- scene state for monitoring and tests ---------------------------------------------------

    def scene_status(self) -> dict:
        red = self.slicer.view_manager.get_view("Red")
        foreground = red.get_foreground_volume_id()
        latest, full = self.run.latest, self.run.full
        display = latest.segmentation_node.GetDisplayNode() if latest is not None else None
        full_map = slicer.util.arrayFromVolume(full.map_node) if full is not None else None
        threed = self.slicer.view_manager.get_view("ThreeD")
        rendering = self.slicer.volume_rendering
        return {
            "volumes": [node.GetName() for node in self.scene_logic.input_volumes()],
            "background": red.get_background_volume_id(),
            "overlay_shown": bool(latest is not None and foreground == latest.map_node.GetID()),
            "overlay_is_preview": bool(latest is not None and latest.is_preview),
            "overlay_opacity": red.get_foreground_opacity(),
            "segmentation_shown": bool(display is not None and display.GetVisibility()),
            "segments": latest.segmentation_node.GetSegmentation().GetNumberOfSegments() if latest is not None else 0,
            "anomaly_voxels": self.state.anomaly_voxels,
            "full_result_slices_with_map": int((full_map.reshape(full_map.shape[0], -1) > 0).any(axis=1).sum()) if full_map is not None else 0,
            "volume_rendering_in_3d": bool(threed is not None and self._rendered_volume is not None
                                           and rendering.get_vr_display_node(self._rendered_volume).GetVisibility()),
            "running": bool(self.state.running),
            "status": self.state.status,
            "error": self.state.error_msg,
        }

    def _add_routes(self, wslink_server) -> None:
        if self.secret:
            # Registered before the server starts, so it guards every route, the WebSocket included.
            wslink_server.app.middlewares.append(require_secret(self.secret))

        async def status(_request):
            return web.json_response(self.scene_status())

        wslink_server.app.router.add_get("/api/status", status)


def main(argv: Optional[List[str]] = None) -> None:
    """``python -m DiffusionAnomalyWeb.app --port P --server [--model PATH]``: one session (started by ``sessions.py``)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--model", default=None)
    parser.add_argument("--timeout", type=int, default=0)
    args, _ = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.WARNING)
    app = AnomalyWebApp(model=args.model, secret=os.environ.pop(SECRET_ENVIRONMENT, None))
    app.server.start(timeout=args.timeout)


if __name__ == "__main__":
    main()
