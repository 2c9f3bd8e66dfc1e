"""One browser session of the web app: Slicer views and the detection panel (trame-slicer).

The panel mirrors the desktop module and drives the same scene logic
(``DiffusionAnomalyScene``); detection runs on a worker thread while the event loop keeps
serving the page. One process holds one session's scene: ``sessions.py`` starts one per
browser.
"""

from __future__ import annotations

import os

# Without a display, VTK's wheel would try X first; go straight to EGL (GPU or Mesa).
if not os.environ.get("DISPLAY"):
    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")

import argparse
import asyncio
import logging
import tempfile
from pathlib import Path
from typing import List, Optional

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
from DiffusionAnomalyLib.bundle import load_card
from DiffusionAnomalyLib.jobs import DONE, RUNNING, ThreadJob
from DiffusionAnomalyScene.logic import AnomalySceneLogic, DetectionSettings

log = logging.getLogger("diffusion-anomaly.web")
IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
POLL_SECONDS = 0.25


def volume_name(path: Path) -> str:
    name = path.name
    return next((name[: -len(suffix)] for suffix in IMAGE_SUFFIXES if name.lower().endswith(suffix)), name)


class AnomalyWebApp(TrameApp):
    """The page: four views on the left of a drawer with the detection panel."""

    def __init__(self, server=None, model: Optional[str] = None) -> None:
        super().__init__(server, client_type="vue3")
        self.model = str(model or resources.default_model())
        self.card = load_card(self.model)
        self.slicer = SlicerApp()
        register_rca_factories(self.slicer.view_manager, self.server)
        self.scene = self.slicer.scene
        self.scene_logic = AnomalySceneLogic(self.scene)
        self.layout_manager = LayoutManager(self.scene, self.slicer.view_manager, self.server)
        self.layout_manager.register_layout("four-up", Layout(LayoutDirection.Vertical, [
            Layout(LayoutDirection.Horizontal, [ViewLayoutDefinition.axial_view(), ViewLayoutDefinition.threed_view()]),
            Layout(LayoutDirection.Horizontal, [ViewLayoutDefinition.sagittal_view(), ViewLayoutDefinition.coronal_view()]),
        ]))
        self.layout_manager.set_layout("four-up")
        self.map_node = None
        self.segmentation_node = None
        self._job = None
        self._pending = None
        self._task = None

        defaults = self.card.defaults
        self.state.update({
            "trame__title": "Diffusion Anomaly",
            "model_summary": self.card.summary(),
            "channel_names": list(self.card.channels),
            "volumes": [],
            **{self._channel_key(i): None for i in range(len(self.card.channels))},
            "noise_level": float(defaults.noise_level),
            "guidance_scale": float(defaults.guidance_scale),
            "threshold": float(defaults.threshold) if defaults.threshold != "otsu" else 0.1,
            "use_otsu": defaults.threshold == "otsu",
            "steps": int(defaults.steps),
            "running": False,
            "progress": 0,
            "progress_text": "",
            "status": "Load the sample study or upload one volume per sequence.",
            "error_msg": "",
            "overlay_shown": False,
            "segmentation_shown": False,
            "anomaly_voxels": 0,
        })
        self._build_ui()
        self.ctrl.on_server_bind.add(self._add_routes)

    @staticmethod
    def _channel_key(index: int) -> str:
        return f"channel_{index}"

    # -- page ---------------------------------------------------------------------------------

    def _build_ui(self) -> None:
        with SinglePageWithDrawerLayout(self.server, width=340) as self.ui:
            self.ui.title.set_text("Diffusion Anomaly")
            self.ui.root.theme = "dark"
            with self.ui.drawer:
                with html.Div(classes="pa-3 d-flex flex-column ga-2"):
                    html.Div("{{ model_summary.join(' ') }}", id="model-summary", classes="text-caption")
                    v3.VBtn("Load sample study", id="load-sample", block=True, click=self.load_sample, disabled=("running",))
                    v3.VFileInput(
                        id="upload", label="Upload NIfTI / NRRD volumes", multiple=True, density="compact", hide_details=True,
                        accept=",".join(IMAGE_SUFFIXES + (".gz",)), disabled=("running",),
                        change=f"trigger('{self.ctrl.trigger_name(self.upload)}', [$event.target.files])",
                    )
                    for index, name in enumerate(self.card.channels):
                        v3.VSelect(
                            id=f"channel-{index}", label=f"{name} volume", v_model=(self._channel_key(index),), items=("volumes",),
                            density="compact", hide_details=True, clearable=True, disabled=("running",),
                        )
                    v3.VSlider(
                        id="noise-level", label="Noise level L", v_model=("noise_level",), min=0.02, max=1.0, step=0.01,
                        thumb_label=True, density="compact", hide_details=True, disabled=("running",),
                        title="How deep the image is encoded into noise: higher removes larger lesions but redraws more healthy anatomy.",
                    )
                    v3.VSlider(
                        id="guidance-scale", label="Guidance s", v_model=("guidance_scale",), min=0, max=200, step=1,
                        thumb_label=True, density="compact", hide_details=True, disabled=("running",),
                        title="How strongly the classifier pushes toward healthy; 0 is a plain reconstruction.",
                    )
                    v3.VSlider(
                        id="threshold", label="Threshold", v_model=("threshold",), min=0.0, max=1.0, step=0.005,
                        thumb_label=True, density="compact", hide_details=True, disabled=("running || use_otsu",),
                        title="Map value above which voxels are segmented; moving it re-cuts the segmentation at once.",
                    )
                    v3.VCheckbox(id="use-otsu", label="Otsu's threshold", v_model=("use_otsu",), density="compact", hide_details=True)
                    v3.VTextField(id="steps", label="Steps", v_model_number=("steps",), type="number", min=2, max=1000,
                                  density="compact", hide_details=True, disabled=("running",))
                    with html.Div(classes="d-flex ga-2"):
                        v3.VBtn("{{ running ? 'Cancel' : 'Detect anomalies' }}", id="detect", color=("running ? 'error' : 'primary'",),
                                click=self.detect_or_cancel, classes="flex-grow-1")
                        v3.VBtn("Preview slice", id="preview", click=self.preview, disabled=("running",))
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

    def _refresh_volumes(self) -> None:
        nodes = self.scene_logic.input_volumes()
        self.state.volumes = [{"title": node.GetName(), "value": node.GetID()} for node in nodes]
        guesses = self.scene_logic.guess_channel_volumes(self.card.channels)
        for index, guess in enumerate(guesses):
            key = self._channel_key(index)
            if (self.state[key] is None or self.scene.GetNodeByID(self.state[key]) is None) and guess is not None:
                self.state[key] = guess.GetID()
        first = next((self.scene.GetNodeByID(self.state[self._channel_key(i)]) for i in range(len(guesses))
                      if self.state[self._channel_key(i)]), None)
        names = [name.lower() for name in self.card.channels]
        flair = self.state[self._channel_key(names.index("flair"))] if "flair" in names else None
        background = self.scene.GetNodeByID(flair) if flair else first
        if background is not None:
            self.slicer.display_manager.show_volume_in_slice_background(background)
            self.slicer.display_manager.reset_views()

    def _load_files(self, paths: List[Path]) -> List[str]:
        """Loads files with Slicer's reader; returns the names that could not be read."""
        failed = []
        for path in paths:
            if not path.name.lower().endswith(IMAGE_SUFFIXES):
                failed.append(f"{path.name} (not a NIfTI or NRRD file)")
                continue
            nodes = self.slicer.io_manager.load_volumes(str(path))
            if not nodes:
                failed.append(f"{path.name} (unreadable as an image volume)")
            for node in nodes:
                node.SetName(volume_name(path))
        self._refresh_volumes()
        return failed

    def load_sample(self) -> None:
        self.state.error_msg = ""
        failed = self._load_files(resources.sample_channels())
        if failed:
            self.state.error_msg = "Cannot load the sample: " + "; ".join(failed)
        else:
            self.state.status = "Sample study loaded: check the channel volumes, then Detect anomalies."

    def upload(self, files) -> None:
        if not files:
            return
        self.state.error_msg = ""
        with tempfile.TemporaryDirectory() as folder:
            paths = []
            for entry in files:
                upload = ClientFile(entry)
                path = Path(folder) / Path(upload.name or "upload").name
                path.write_bytes(upload.content or b"")
                paths.append(path)
            failed = self._load_files(paths)
        if failed:
            self.state.error_msg = "Not loaded: " + "; ".join(failed) + ". Upload .nii, .nii.gz or .nrrd volumes."
        loaded = len(paths) - len(failed)
        if loaded:
            self.state.status = f"Loaded {loaded} volume(s)."

    # -- detection ----------------------------------------------------------------------------

    def _settings(self) -> DetectionSettings:
        return DetectionSettings(
            noise_level=float(self.state.noise_level),
            guidance_scale=float(self.state.guidance_scale),
            steps=int(self.state.steps),
            threshold="otsu" if self.state.use_otsu else float(self.state.threshold),
        )

    def _channel_nodes(self) -> list:
        ids = [self.state[self._channel_key(i)] for i in range(len(self.card.channels))]
        return [self.scene.GetNodeByID(node_id) if node_id else None for node_id in ids]

    def detect_or_cancel(self) -> None:
        if self._job is not None:
            self._job.cancel()
            return
        self._start(preview=False)

    def preview(self) -> None:
        self._start(preview=True)

    def _red_slice_centre(self) -> List[float]:
        slice_to_ras = self.slicer.view_manager.get_view("Red").get_view_node().GetSliceToRAS()
        return [slice_to_ras.GetElement(row, 3) for row in range(3)]

    def _start(self, preview: bool) -> None:
        self.state.error_msg = ""
        try:
            self._pending = self.scene_logic.request(self.model, self._channel_nodes(), self._settings(),
                                                     self._red_slice_centre() if preview else None)
        except Exception as error:
            self.state.error_msg = str(error)
            return
        self._job = ThreadJob(self._pending.request)
        self.state.running = True
        self.state.progress = 0
        self.state.progress_text = "starting..."
        self.state.status = "Previewing the red slice..." if preview else "Detecting anomalies..."
        self._task = asynchronous.create_task(self._follow_job())

    async def _follow_job(self) -> None:
        job, pending = self._job, self._pending
        while job.status().state == RUNNING:
            status = job.status()
            with self.state:
                self.state.progress = round(100 * status.fraction)
                remaining = status.remaining
                self.state.progress_text = f"{status.elapsed:.0f} s; about {remaining:.0f} s left" if remaining is not None else "loading the model..."
            await asyncio.sleep(POLL_SECONDS)
        status = job.status()
        with self.state:
            self._job = self._pending = None
            self.state.running = False
            if status.state == DONE:
                self._show(pending, job.result())
            elif status.state == "cancelled":
                self.state.status = "Cancelled; nothing was changed."
            else:
                self.state.error_msg = f"Detection failed: {status.message}"
                self.state.status = "Detection failed; nothing was changed."

    def _show(self, pending, result) -> None:
        try:
            outputs = self.scene_logic.apply(pending, result, self.map_node, self.segmentation_node)
        except Exception as error:
            self.state.error_msg = f"Could not show the result: {error}"
            return
        self.map_node, self.segmentation_node = outputs.map_node, outputs.segmentation_node
        self.segmentation_node.CreateClosedSurfaceRepresentation()
        self.state.overlay_shown = True
        self.state.segmentation_shown = True
        self.state.anomaly_voxels = outputs.anomaly_voxels
        self.state.status = " ".join(outputs.messages + [f"Done: {outputs.summary()}."])
        for view in self.slicer.view_manager.get_views():
            view.schedule_render()

    @change("threshold", "use_otsu")
    def _rethreshold(self, **_) -> None:
        if self.map_node is None or self._job is not None:
            return
        try:
            voxels, value = self.scene_logic.rethreshold(self.map_node, self.segmentation_node,
                                                         "otsu" if self.state.use_otsu else float(self.state.threshold))
        except Exception as error:
            self.state.error_msg = str(error)
            return
        self.segmentation_node.CreateClosedSurfaceRepresentation()
        self.state.anomaly_voxels = voxels
        self.state.status = f"{voxels} voxels above {value:.3g}."

    # -- scene state for monitoring and tests ---------------------------------------------------

    def scene_status(self) -> dict:
        red = self.slicer.view_manager.get_view("Red")
        foreground = red.get_foreground_volume_id()
        segmentation = self.segmentation_node
        display = segmentation.GetDisplayNode() if segmentation is not None else None
        return {
            "volumes": [node.GetName() for node in self.scene_logic.input_volumes()],
            "background": red.get_background_volume_id(),
            "overlay_shown": bool(self.map_node is not None and foreground == self.map_node.GetID()),
            "overlay_opacity": red.get_foreground_opacity(),
            "segmentation_shown": bool(display is not None and display.GetVisibility()),
            "segments": segmentation.GetSegmentation().GetNumberOfSegments() if segmentation is not None else 0,
            "anomaly_voxels": self.state.anomaly_voxels,
            "running": bool(self.state.running),
            "status": self.state.status,
            "error": self.state.error_msg,
        }

    def _add_routes(self, wslink_server) -> None:
        async def status(_request):
            return web.json_response(self.scene_status())

        wslink_server.app.router.add_get("/api/status", status)


def main(argv: Optional[List[str]] = None) -> None:
    """``python -m DiffusionAnomalyWeb.app --port P --server [--model PATH]``: one session."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--model", default=None)
    parser.add_argument("--timeout", type=int, default=0)
    args, _ = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.WARNING)
    app = AnomalyWebApp(model=args.model)
    app.server.start(timeout=args.timeout)


if __name__ == "__main__":
    main()
