"""What desktop Slicer's runtime does to the module, reproduced here with real processes and real MRML.

- ``PythonSlicer`` is a launcher that starts ``python-real`` as its own child and prints in the
  locale's code page: the job layer is started through such a launcher here.
- Before PyTorch is installed the panel must still read model cards.
- The channel selectors, the version checks and the segmentation's transform.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from DiffusionAnomalyLib.environment import runtime_problem, unmet_requirements
from DiffusionAnomalyLib.imageio import Geometry
from DiffusionAnomalyLib.jobs import DetectionRequest
from DiffusionAnomalyLib.process_job import ProcessJob
from DiffusionAnomalyLib.settings import DetectionSettings

from conftest import brain_phantom

LAUNCHER = textwrap.dedent("""
    # Like CTK's AppLauncher (PythonSlicer): starts the real interpreter as a child and waits for it,
    # after printing in the locale's code page (cp1252 here: not valid UTF-8).
    import subprocess, sys
    sys.stdout.buffer.write("launcher: Caf\\u00e9 \\u2013 na\\u00efve paths\\n".encode("cp1252"))
    sys.stdout.flush()
    sys.exit(subprocess.call([sys.executable] + sys.argv[1:]))
""")


@pytest.fixture
def launcher(tmp_path: Path) -> list:
    script = tmp_path / "PythonSlicer.py"
    script.write_text(LAUNCHER, encoding="utf-8")
    return [sys.executable, str(script)]


def _long_request(model: Path) -> DetectionRequest:
    arrays, _ = brain_phantom(shape=(40, 48, 48), lesion_centre=(20, 24, 24), lesion_radius=6)
    settings = DetectionSettings(noise_level=1.0, steps=1000, guidance_scale=1.0, batch_size=1, device="cpu")
    return DetectionRequest(str(model), list(arrays), Geometry.default(3), settings)


def _children(pid: int) -> list:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text(encoding="utf-8").rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8").rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


@pytest.mark.skipif(sys.platform != "linux", reason="follows the process tree through /proc")
def test_cancel_stops_the_launcher_and_the_interpreter_it_started(tiny_bundle, launcher):
    job = ProcessJob(_long_request(tiny_bundle), python=launcher)
    assert _wait_until(lambda: job.status().done > 0, 60), job.status()
    real = _children(job.pid)
    assert len(real) == 1 and _running(real[0]), "the launcher runs the detection in a child of its own"

    job.cancel()

    assert job.status().state == "cancelled"
    assert _wait_until(lambda: not _running(real[0]), 10), "the detection went on after Cancel"


@pytest.mark.skipif(sys.platform != "linux", reason="follows the process tree through /proc")
def test_the_detection_stops_when_the_application_that_started_it_is_gone(tiny_bundle, launcher, tmp_path):
    request_script = tmp_path / "application.py"
    request_script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_slicer_runtime import _long_request
        from pathlib import Path
        from DiffusionAnomalyLib.process_job import ProcessJob
        job = ProcessJob(_long_request(Path({str(tiny_bundle)!r})), python={launcher!r})
        print(job.pid, flush=True)
        time.sleep(600)
    """), encoding="utf-8")
    application = subprocess.Popen([sys.executable, str(request_script)], stdout=subprocess.PIPE, text=True)
    launcher_pid = int(application.stdout.readline())
    assert _wait_until(lambda: len(_children(launcher_pid)) == 1, 60)
    real = _children(launcher_pid)[0]

    application.send_signal(signal.SIGKILL)  # Slicer crashes, or is killed: no cleanup code runs
    application.wait()

    assert _wait_until(lambda: not _running(real) and not _running(launcher_pid), 15), "the detection outlived the application"


def test_output_that_is_not_utf8_does_not_stop_the_job_from_finishing(tiny_bundle, launcher):
    arrays, _ = brain_phantom()
    job = ProcessJob(DetectionRequest(str(tiny_bundle), list(arrays), Geometry.default(3), DetectionSettings(device="cpu")), python=launcher)
    status = job.wait(180)
    assert status.state == "done", status.message
    assert status.done == status.total > 0
    assert job.result().anomaly_map.shape == arrays[0].shape


def test_a_failing_child_reports_its_error_line(tiny_bundle, launcher):
    (tiny_bundle / "weights.safetensors").write_bytes(b"truncated")
    arrays, _ = brain_phantom()
    status = ProcessJob(DetectionRequest(str(tiny_bundle), list(arrays), Geometry.default(3)), python=launcher).wait(180)
    assert status.state == "failed" and "SHA-256" in status.message


def test_model_cards_and_settings_are_read_without_pytorch(tiny_bundle):
    """The panel shows the model's channels and checks settings before PyTorch and MONAI are installed."""
    script = textwrap.dedent(f"""
        import sys
        class NoTorch:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "monai", "numpy", "SimpleITK"):
                    raise ImportError("not installed: " + name)
        sys.meta_path.insert(0, NoTorch())
        from DiffusionAnomalyLib.cards import load_card
        from DiffusionAnomalyLib.environment import describe_unmet, unmet_requirements
        from DiffusionAnomalyLib.settings import DetectionSettings
        card = load_card({str(tiny_bundle)!r})
        print(",".join(card.channels), DetectionSettings(steps=6).resolve(card).steps)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["T1,FLAIR", "6"]


def test_versions_are_checked_not_only_presence():
    import monai

    assert unmet_requirements(["monai>=1.6,<1.7"]) == [], f"MONAI {monai.__version__} is installed"
    assert unmet_requirements(["monai>=99"]) == [("monai>=99", monai.__version__)]
    assert unmet_requirements(["no-such-package-at-all>=1"]) == [("no-such-package-at-all>=1", None)]


def test_unsupported_slicers_are_named():
    assert "Slicer 5.10 or newer" in runtime_problem((3, 9), "Linux", "x86_64")
    assert "Intel Macs" in runtime_problem((3, 12), "Darwin", "x86_64")
    assert runtime_problem((3, 12), "Darwin", "arm64") is None
    assert runtime_problem((3, 12), "Windows", "AMD64") is None


# -- on Slicer's MRML core (the ``scene`` fixture skips without slicer-core) -------------------

def _volume(scene, name: str, array=None):
    import slicer

    return slicer.util.addVolumeFromArray(np.zeros((2, 2, 2), np.float32) if array is None else array, name=name)


def test_guesses_keep_the_users_choice_and_a_volume_is_never_used_twice(scene):
    from DiffusionAnomalyScene.logic import AnomalySceneLogic
    from DiffusionAnomalyScene.volumes import channel_inputs

    t1, t1ce, t2, flair = (_volume(scene, f"case_{name}") for name in ("t1", "t1ce", "t2", "flair"))
    logic = AnomalySceneLogic(scene)
    channels = ("T1", "T1ce", "T2", "FLAIR")
    # The user picked the FLAIR as "Channel 1" before the packages (and the card's names) were there.
    guessed = logic.guess_channel_volumes(channels, [flair, None, None, None])
    assert guessed == [flair, t1ce, t2, None], "the FLAIR is not guessed a second time"
    with pytest.raises(ValueError, match="'case_flair' is chosen for both T1 and FLAIR"):
        channel_inputs(channels, [flair, t1ce, t2, flair])
    assert logic.guess_channel_volumes(channels) == [t1, t1ce, t2, flair]


def test_the_segmentation_follows_the_inputs_transform(scene, tmp_path, tiny_bundle):
    import slicer
    import vtk

    from DiffusionAnomalyScene import outputs
    from DiffusionAnomalyScene.logic import AnomalySceneLogic, DetectionRun
    from DiffusionAnomalyScene.volumes import load_volume

    from conftest import write_image

    arrays, _ = brain_phantom(lesion_centre=(6, 10, 9))
    nodes = [load_volume(scene, write_image(array, tmp_path / f"case_{name}.nii.gz")) for array, name in zip(arrays, ("t1", "flair"))]
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(0, 3, 25.0)
    transform.SetMatrixTransformToParent(shift)
    for node in nodes:
        node.SetAndObserveTransformNodeID(transform.GetID())

    run = DetectionRun(AnomalySceneLogic(scene))
    run.start(str(tiny_bundle), nodes, DetectionSettings(threshold=0.05))
    result = run.wait(120)

    segmentation = result.segmentation_node
    assert segmentation.GetTransformNodeID() == transform.GetID() == result.map_node.GetTransformNodeID()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    labelmap.SetAndObserveTransformNodeID(transform.GetID())
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segmentation.GetSegmentation().GetSegmentIdBySegmentName(outputs.SEGMENT_NAME))
    assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(segmentation, ids, labelmap, nodes[0])
    anomaly_map = slicer.util.arrayFromVolume(result.map_node)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(labelmap) > 0, anomaly_map > 0.05)


@pytest.mark.skipif(not Path("/usr/share/mricron/templates/ch2.nii.gz").is_file() and "MRICRON_TEMPLATES" not in os.environ,
                    reason="Colin27 comes with Debian's mricron-data")
def test_the_brain_found_is_shown_as_an_outline_and_kept_for_the_next_preview(scene, tmp_path, tiny_bundle):
    import slicer
    import vtk

    from DiffusionAnomalyLib import synth
    from DiffusionAnomalyLib.synth_domains import DOMAINS
    from DiffusionAnomalyScene import outputs
    from DiffusionAnomalyScene.logic import AnomalySceneLogic, DetectionRun
    from DiffusionAnomalyScene.volumes import load_volume

    subject = synth.make_subject(3, True, anatomy="colin27", acquisition=DOMAINS["skull"], spacing_mm=3.0)
    folder = synth.write_subject(subject, tmp_path, sequences=("t1", "flair"))
    nodes = [load_volume(scene, folder / f"{subject.name}_{s}.nii.gz") for s in ("t1", "flair")]
    logic = AnomalySceneLogic(scene)
    run = DetectionRun(logic)
    run.start(str(tiny_bundle), nodes, DetectionSettings(device="cpu"))
    full = run.wait(300)
    assert full.brain_source.startswith("extracted by deepbet")
    brain = logic.brain_node(nodes[0])
    assert brain is full.brain_node and brain.GetDisplayNode().GetOpacity2DFill() == 0 and not brain.GetDisplayNode().GetVisibility3D()
    shown = outputs.segment_as_mask(scene, brain, nodes[0])
    assert 2 * (shown & subject.brain_mask).sum() / (shown.sum() + subject.brain_mask.sum()) > 0.85, "the outline is the head's brain"

    ijk_to_ras = vtk.vtkMatrix4x4()
    nodes[0].GetIJKToRASMatrix(ijk_to_ras)
    shape = slicer.util.arrayFromVolume(nodes[0]).shape
    ras = ijk_to_ras.MultiplyPoint([shape[2] / 2, shape[1] / 2, shape[0] / 2, 1.0])[:3]
    run.start(str(tiny_bundle), nodes, DetectionSettings(device="cpu"), preview_ras=ras)
    preview = run.wait(120)
    assert preview.brain_source == "as found by the earlier detection", "a preview does not extract the brain again"
    assert logic.brain_node(nodes[0]) is brain

    nodes[1].GetImageData().Modified()  # the FLAIR was edited: the brain kept is no longer trusted
    run.start(str(tiny_bundle), nodes, DetectionSettings(device="cpu"), preview_ras=ras)
    assert run.wait(120).brain_source.startswith("extracted by deepbet")
