"""The three lwi CLI modules run the way 3D Slicer runs them, by Slicer's own code (PyPI slicer-core, in
.venv-slicer; no Qt, no display), writing one JSON report that tests/python/test_slicer_host.py checks.

Slicer's own: ModuleDescriptionParser::Parse, vtkSlicerCLIModuleLogic (writes the input nodes to temporary files,
composes the command line, runs the module, parses <filter-progress>, reads the outputs back into nodes, cancels),
vtkSlicerVolumesLogic, the segmentation storage node, vtkSlicerTerminologiesModuleLogic. Glue: five ctypes calls to
the plain-C++ ModuleDescription API (the wheel has no Python binding for it; the Qt factory makes the same calls),
the event loop Qt's timers would run, subject-hierarchy items, and the discovery rules of Slicer's Qt module factory
(qSlicerUtils::isCLIExecutable; a sidecar NAME.xml instead of `NAME --xml`), which the wheel does not ship.

Usage: slicer_host.py --modules DIR --work DIR --dataset D.json --arch A.json --init-config I.json
       --tune-config T.json --ct CT.nii.gz --terminology T.term.json --report R.json
"""
import argparse
import ctypes
import json
import os
import re
import shutil
import time

import slicer
import slicer_core
from vtkmodules.vtkCommonCore import reference, vtkOutputWindow, vtkStringOutputWindow
from vtkmodules.vtkCommonMath import vtkMatrix4x4
from vtkmodules.vtkCommonTransforms import vtkTransform

MODULES = ("LwiSegment", "LwiInitTrain", "LwiFineTune")

# ctypes bridge to ModuleDescription / ModuleDescriptionParser (old libstdc++ ABI: `Ss` is the COW std::string).
LIBDIR = os.path.dirname(slicer_core.__file__)
_cxx = ctypes.CDLL("libstdc++.so.6")
_mdp = ctypes.CDLL(os.path.join(LIBDIR, "third_party.libs", "libModuleDescriptionParser.so"))
_baselogic = ctypes.CDLL(os.path.join(LIBDIR, "libvtkSlicerBaseLogic.so"))
_KEEP = []  # buffers the C++ objects live in, kept for the life of the process


def _fn(lib, sym, argtypes, restype=None):
    f = getattr(lib, sym)
    f.argtypes, f.restype = argtypes, restype
    return f


_string_ctor = _fn(_cxx, "_ZNSsC1EPKcRKSaIcE", [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p])
_desc_ctor = _fn(_mdp, "_ZN17ModuleDescriptionC1Ev", [ctypes.c_void_p])
_desc_set_type = _fn(_mdp, "_ZN17ModuleDescription7SetTypeERKSs", [ctypes.c_void_p, ctypes.c_void_p])
_desc_set_target = _fn(_mdp, "_ZN17ModuleDescription9SetTargetERKSs", [ctypes.c_void_p, ctypes.c_void_p])
_parse = _fn(_mdp, "_ZN23ModuleDescriptionParser5ParseERKSsR17ModuleDescription",
             [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p], ctypes.c_int)
_logic_set_default = _fn(_baselogic, "_ZN23vtkSlicerCLIModuleLogic27SetDefaultModuleDescriptionERK17ModuleDescription",
                         [ctypes.c_void_p, ctypes.c_void_p])


def std_string(s):
    obj, data, alloc = ctypes.create_string_buffer(16), ctypes.create_string_buffer(s.encode()), ctypes.create_string_buffer(8)
    _string_ctor(obj, data, alloc)
    _KEEP.extend([obj, data, alloc])
    return obj


def cpp_pointer(vtkobj):
    return int(vtkobj.__this__[1:].split("_p_")[0], 16)


def module_description(xml, target):
    """As qSlicerCLIExecutableModuleFactoryItem::instanciator: SetType, SetTarget, Parse. Returns (desc, rc)."""
    desc = ctypes.create_string_buffer(1 << 16)
    _KEEP.append(desc)
    _desc_ctor(desc)
    _desc_set_type(desc, std_string("CommandLineModule"))
    _desc_set_target(desc, std_string(target))
    rc = _parse(ctypes.create_string_buffer(16), std_string(xml), desc)
    return desc, rc


def would_register(directory):
    """qSlicerAbstractModuleFactoryManager over one module path: its files, not recursively; a loadable CLI is
    ^lib.+Lib\\.(so|dylib)$, an executable CLI an executable file whose name has no '.' (qSlicerUtils.cxx). Returns
    {module name: where its descriptor comes from}: the sidecar NAME.xml when there is one, else `NAME --xml`."""
    found = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            continue
        if re.match(r"^lib.+Lib\.(so|dylib)$", name) or (os.access(path, os.X_OK) and "." not in name):
            found[name] = "sidecar" if os.path.exists(path + ".xml") else "--xml"
    return found


class SlicerHost:
    """The non-Qt half of a Slicer application (what qSlicerCoreApplication sets up), with one CLI logic per module."""

    def __init__(self, tmpdir):
        self.messages = vtkStringOutputWindow()
        vtkOutputWindow.SetInstance(self.messages)
        self.scene = slicer.vtkMRMLScene()
        self.scene.RegisterNodeClass(slicer.vtkMRMLCommandLineModuleNode())
        self.app = slicer.vtkSlicerApplicationLogic()
        self.app.SetMRMLScene(self.scene)
        self.app.SetTemporaryPath(tmpdir)
        self.remote_io = slicer.vtkMRMLRemoteIOLogic()
        self.remote_io.GetCacheManager().SetRemoteCacheDirectory(os.path.join(tmpdir, "..", "cache"))
        self.data_io = slicer.vtkDataIOManagerLogic()
        self.data_io.SetMRMLApplicationLogic(self.app)
        self.data_io.SetAndObserveDataIOManager(self.remote_io.GetDataIOManager())
        self.app.SetMRMLSceneDataIO(self.scene, self.remote_io, self.data_io)
        self.app.CreateProcessingThread()
        self.logics = {}
        for name, cls in (("Colors", slicer.vtkSlicerColorLogic), ("Volumes", slicer.vtkSlicerVolumesLogic),
                          ("SubjectHierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic),
                          ("Terminologies", slicer.vtkSlicerTerminologiesModuleLogic),
                          ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic)):
            logic = cls()
            logic.SetMRMLApplicationLogic(self.app)
            logic.SetMRMLScene(self.scene)
            self.app.SetModuleLogic(name, logic)
            self.logics[name] = logic
        self.app.SetColorLogic(self.logics["Colors"])
        self.cli = {}

    def add_module(self, name, path, xml):
        desc, rc = module_description(xml, path)
        logic = slicer.vtkSlicerCLIModuleLogic()
        logic.SetMRMLApplicationLogic(self.app)
        logic.SetMRMLScene(self.scene)
        _logic_set_default(cpp_pointer(logic), desc)
        self.cli[name] = logic
        return rc

    def events(self):
        self.app.ProcessModified()
        while self.app.GetReadDataQueueSize():
            self.app.ProcessReadData()

    def run(self, module, parameters, cancel_when=None, timeout=600):
        """The Apply button: a node from the module's description, its parameters set, Apply, then the GUI's polling.
        `cancel_when(progress, node)` true: the Cancel button."""
        node = self.cli[module].CreateNodeInScene()
        for k, v in parameters.items():
            node.SetParameterAsString(k, str(v))
        progress = []
        self.cli[module].Apply(node, False)
        t0 = time.time()
        while time.time() - t0 < timeout:
            self.events()
            p = node.GetProgress()
            if not progress or progress[-1] != p:
                progress.append(p)
            if cancel_when is not None and node.GetStatus() == node.Running and cancel_when(p, node):
                node.Cancel()
                cancel_when = None
            if not node.IsBusy() and node.GetStatus() != node.Idle:
                break
            time.sleep(0.02)
        self.events()
        return {"status": node.GetStatusString(), "progress": progress, "seconds": round(time.time() - t0, 2),
                "error_text": node.GetErrorText(), "output_text": node.GetOutputText()}


def matrix(node):
    m = vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return [[m.GetElement(i, j) for j in range(4)] for i in range(4)]


def label_values(node):
    from vtkmodules.util.numpy_support import vtk_to_numpy
    import numpy as np
    return sorted(int(v) for v in np.unique(vtk_to_numpy(node.GetImageData().GetPointData().GetScalars())))


def segments(seg_node, terminologies):
    """(name, label value, terminology type code or None, resolved by Slicer's terminology logic?) per segment."""
    out = []
    s = seg_node.GetSegmentation()
    for i in range(s.GetNumberOfSegments()):
        segment = s.GetNthSegment(i)
        tag = reference("")
        segment.GetTag(segment.GetTerminologyEntryTagName(), tag)
        tag = str(tag)
        entry = slicer.vtkSlicerTerminologyEntry()
        parsed = bool(tag) and terminologies.DeserializeTerminologyEntry(tag, entry)
        code = entry.GetTypeObject().GetCodeValue() if parsed and entry.GetTypeObject() else None
        modifier = entry.GetTypeModifierObject().GetCodeValue() if parsed and entry.GetTypeModifierObject() else None
        out.append({"name": segment.GetName(), "value": segment.GetLabelValue(), "type": code,
                    "modifier": modifier or None, "color": [round(c, 4) for c in segment.GetColor()]})
    return out


def temp_leftovers(tmpdir):
    return sorted(f for f in os.listdir(tmpdir))


def main():
    ap = argparse.ArgumentParser()
    for a in ("modules", "work", "ct", "report"):
        ap.add_argument("--" + a, required=True)
    for a in ("dataset", "arch", "init-config", "tune-config", "terminology"):
        ap.add_argument("--" + a)
    ap.add_argument("--model", help="segment with this model only (no training, no other cases)")
    a = ap.parse_args()
    report = {}
    tmpdir = os.path.join(a.work, "SlicerTemp")
    shutil.rmtree(tmpdir, ignore_errors=True)
    os.makedirs(tmpdir)
    host = SlicerHost(tmpdir)

    # Discovery and descriptors, as Slicer reads them at start-up.
    found = would_register(a.modules)
    report["registered"] = found
    report["descriptors"] = {}
    for name in found:
        path = os.path.join(a.modules, name)
        xml = open(path + ".xml").read()
        rc = host.add_module(name, path, xml)
        node = host.cli[name].CreateNodeInScene()
        params = [node.GetParameterName(g, p) for g in range(node.GetNumberOfParameterGroups())
                  for p in range(node.GetNumberOfParametersInGroup(g))]
        report["descriptors"][name] = {"parse_rc": rc, "title": node.GetModuleTitle(), "parameters": params}
        host.scene.RemoveNode(node)

    if a.model:
        segment_only(host, a, report)
        return

    # Training through the modules: init-train, then fine-tune from it.
    model_dir = os.path.join(a.work, "models")
    shutil.rmtree(model_dir, ignore_errors=True)
    os.makedirs(model_dir)
    init, model = os.path.join(model_dir, "init.safetensors"), os.path.join(model_dir, "model.safetensors")
    common = {"dataset": a.dataset, "archConfig": a.arch, "epochs": 2, "device": "cpu", "seed": 7}
    report["init_train"] = host.run("LwiInitTrain", {**common, "outputModel": init, "config": a.init_config})
    report["init_train"]["model_written"] = os.path.exists(init)
    # No architecture config: the module's default architecture ("auto") is the initial weights'.
    tune = {k: v for k, v in common.items() if k != "archConfig"}
    report["fine_tune"] = host.run("LwiFineTune", {**tune, "outputModel": model, "config": a.tune_config,
                                                   "init": init})
    report["fine_tune"]["model_written"] = os.path.exists(model)
    # Cancel a long fine-tune once its first epoch's checkpoint is on disk.
    cancelled = os.path.join(model_dir, "cancelled.safetensors")
    report["cancel_training"] = host.run(
        "LwiFineTune", {**common, "epochs": 500, "outputModel": cancelled, "config": a.tune_config},
        cancel_when=lambda p, node: os.path.exists(cancelled + ".ckpt"))
    report["cancel_training"].update(model_written=os.path.exists(cancelled),
                                     checkpoint=cancelled + ".ckpt" if os.path.exists(cancelled + ".ckpt") else None)

    # Segmentation of a real CT, loaded as Slicer loads a file; then an oblique copy; outputs as a label map and as a
    # segmentation (the two node types Slicer offers for a `type="label"` image).
    volumes, terminologies = host.logics["Volumes"], host.logics["Terminologies"]
    report["terminology_loaded"] = bool(terminologies.LoadTerminologyFromFile(a.terminology))
    ct = volumes.AddArchetypeVolume(a.ct, "CT", 0)
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(host.scene)
    study = sh.CreateStudyItem(sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient"), "Study")
    sh.CreateItem(study, ct)
    oblique = volumes.CloneVolume(host.scene, ct, "CT oblique")
    rot = vtkTransform()
    rot.RotateZ(20)
    rot.RotateX(10)
    m = vtkMatrix4x4()
    vtkMatrix4x4.Multiply4x4(rot.GetMatrix(), _ijk(ct), m)
    oblique.SetIJKToRASMatrix(m)
    report["segment"] = {}
    for case, source in (("nrrd", ct), ("oblique", oblique)):
        for kind in ("vtkMRMLLabelMapVolumeNode", "vtkMRMLSegmentationNode"):
            out = host.scene.AddNewNodeByClass(kind, f"{case} {kind}")
            sh.CreateItem(sh.GetSceneItemID(), out)  # Slicer's subject-hierarchy plugins do this for a new node
            run = host.run("LwiSegment", {"inputVolume": source.GetID(), "outputVolume": out.GetID(), "model": model,
                                          "device": "cpu"})
            run["input_ijk_to_ras"], run["input_dims"] = matrix(source), list(source.GetImageData().GetDimensions())
            if kind == "vtkMRMLLabelMapVolumeNode" and out.GetImageData() is not None:
                run["ijk_to_ras"], run["dims"] = matrix(out), list(out.GetImageData().GetDimensions())
                run["values"] = label_values(out)
                run["geometry_differs"] = volumes.CompareVolumeGeometry(source, out)
                run["sh_parent_is_input_parent"] = sh.GetItemParent(sh.GetItemByDataNode(out)) == \
                    sh.GetItemParent(sh.GetItemByDataNode(source))
            if kind == "vtkMRMLSegmentationNode":
                run["segments"] = segments(out, terminologies)
                labelmap = host.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "exported")
                host.logics["Segmentations"].ExportVisibleSegmentsToLabelmapNode(out, labelmap, source)
                run["exported_ijk_to_ras"] = matrix(labelmap)
                run["exported_dims"] = list(labelmap.GetImageData().GetDimensions())
            report["segment"][f"{case}/{kind}"] = run
    # NIfTI: the same descriptor with .nii.gz first, so Slicer writes and reads NIfTI files.
    xml = open(os.path.join(a.modules, "LwiSegment.xml")).read().replace('fileExtensions=".nrrd,.nii.gz"',
                                                                          'fileExtensions=".nii.gz,.nrrd"')
    host.add_module("LwiSegmentNifti", os.path.join(a.modules, "LwiSegment"), xml)
    out = host.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "nifti")
    run = host.run("LwiSegmentNifti", {"inputVolume": ct.GetID(), "outputVolume": out.GetID(), "model": model,
                                       "device": "cpu"})
    run.update(ijk_to_ras=matrix(out), dims=list(out.GetImageData().GetDimensions()), input_ijk_to_ras=matrix(ct),
               input_dims=list(ct.GetImageData().GetDimensions()), geometry_differs=volumes.CompareVolumeGeometry(ct, out))
    report["segment"]["nifti"] = run
    # A cancel mid-way, and a model file that is not one.
    out = host.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "cancelled")
    run = host.run("LwiSegment", {"inputVolume": ct.GetID(), "outputVolume": out.GetID(), "model": model,
                                  "device": "cpu"}, cancel_when=lambda p, node: p >= 10)
    run["output_loaded"] = out.GetImageData() is not None
    report["cancel_segment"] = run
    bad = os.path.join(a.work, "not-a-model.safetensors")
    open(bad, "wb").write(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    out = host.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "bad")
    report["bad_model"] = host.run("LwiSegment", {"inputVolume": ct.GetID(), "outputVolume": out.GetID(),
                                                  "model": bad, "device": "cpu"})
    report["bad_model"]["bad_path"] = bad
    report["model_labels"] = json.loads(os.popen(f"{os.environ.get('LWI_CLI', 'lwi')} info {model}").read())["labels"]
    host.events()
    report["temp_leftovers"] = temp_leftovers(tmpdir)
    json.dump(report, open(a.report, "w"), indent=1)


def segment_only(host, a, report):
    """LwiSegment on the CT, loaded as Slicer loads a file, into a label map: its geometry and values."""
    volumes = host.logics["Volumes"]
    ct = volumes.AddArchetypeVolume(a.ct, "CT", 0)
    out = host.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    run = host.run("LwiSegment", {"inputVolume": ct.GetID(), "outputVolume": out.GetID(), "model": a.model,
                                  "device": "cpu"})
    if out.GetImageData() is not None:
        run.update(values=label_values(out), geometry_differs=volumes.CompareVolumeGeometry(ct, out))
    report["segment"] = run
    json.dump(report, open(a.report, "w"), indent=1)


def _ijk(node):
    m = vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return m


if __name__ == "__main__":
    main()
