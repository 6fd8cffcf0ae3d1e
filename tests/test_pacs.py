"""From and to a real PACS: Orthanc (Debian packages ``orthanc``, ``orthanc-dicomweb``) started here on free
loopback ports with a temporary storage folder. DICOMweb in (QIDO-RS + WADO-RS) and STOW-RS back, C-STORE
back, ``medseg listen`` as the C-STORE SCP Orthanc sends to, failures (a broken instance, a PACS that is
down), kill -9 and restart; the SEG objects checked with ``dciodvfy`` (Debian package ``dicom3tools``).
The CT bundle is the shrunk copy of ``conftest.ct_bundle``."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest

from medseg.cli import main as medseg_main

ROOT = Path(__file__).resolve().parents[1]
SERIES = ROOT / "sample_data" / "ct_3d" / "dicom"
ORTHANC = shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc",) if os.access(p, os.X_OK)), None)
PLUGIN = next(
    (p for p in ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so", "/usr/lib/orthanc/libOrthancDicomWeb.so")
     if os.path.isfile(p)),
    None,
)  # fmt: skip
pytestmark = pytest.mark.skipif(
    ORTHANC is None or PLUGIN is None,
    reason="Orthanc with its DICOMweb plugin is not installed (apt-get install -y orthanc orthanc-dicomweb)",
)
LISTEN_AET = "MEDSEG"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(pred: Any, timeout: float, what: str, step: float = 0.1) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out waiting for {what}")


class Orthanc:
    """A running Orthanc: its REST API, DICOMweb root and DICOM port."""

    def __init__(self, http_port: int, dicom_port: int, listen_port: int) -> None:
        import requests

        self.http, self.dicom_port, self.listen_port = http_port, dicom_port, listen_port
        self.rest = f"http://127.0.0.1:{http_port}"
        self.dicomweb = f"{self.rest}/dicom-web"
        self.dimse = f"dimse://ORTHANC@127.0.0.1:{dicom_port}"
        self.session = requests.Session()

    def get(self, path: str) -> Any:
        r = self.session.get(self.rest + path, timeout=30)
        r.raise_for_status()
        return r.json()

    def post(self, path: str, data: bytes | str) -> Any:
        r = self.session.post(self.rest + path, data=data, timeout=120)
        r.raise_for_status()
        return r.json()

    def clear(self) -> None:
        for p in self.get("/patients"):
            self.session.delete(f"{self.rest}/patients/{p}", timeout=30).raise_for_status()

    def upload(self, folder: Path) -> str:
        """Upload every file of ``folder``; returns Orthanc's series id."""
        ids = {self.post("/instances", f.read_bytes())["ParentSeries"] for f in sorted(folder.iterdir())}
        assert len(ids) == 1
        return ids.pop()

    def segs(self) -> list[dict[str, Any]]:
        """Main DICOM tags of every SEG instance."""
        out = []
        for s in self.get("/series"):
            info = self.get(f"/series/{s}")
            if info["MainDicomTags"].get("Modality") == "SEG":
                out += [self.get(f"/instances/{i}/simplified-tags") for i in info["Instances"]]
        return out

    def seg_file(self, sop_uid: str, dest: Path) -> Path:
        found = self.post("/tools/lookup", sop_uid)
        (inst,) = [f for f in found if f["Type"] == "Instance"]
        r = self.session.get(f"{self.rest}/instances/{inst['ID']}/file", timeout=30)
        r.raise_for_status()
        dest.write_bytes(r.content)
        return dest


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("orthanc")
    server = Orthanc(_free_port(), _free_port(), _free_port())
    config = {
        "Name": "medseg-test", "StorageDirectory": str(root / "db"), "IndexDirectory": str(root / "db"),
        "HttpPort": server.http, "DicomPort": server.dicom_port, "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": [PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "DicomModalities": {"medseg": [LISTEN_AET, "127.0.0.1", server.listen_port]},
        "DicomScuTimeout": 30, "StableAge": 1,
    }  # fmt: skip
    (root / "orthanc.json").write_text(json.dumps(config))
    log = open(root / "orthanc.log", "wb")
    cmd = [ORTHANC, str(root / "orthanc.json")]
    proc = subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT)

    def up() -> bool:
        try:
            return bool(server.get("/system"))
        except Exception:
            assert proc.poll() is None, (root / "orthanc.log").read_text()[-2000:]
            return False

    _wait(up, 60, "Orthanc to start")
    yield server
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture
def pacs(orthanc: Orthanc) -> Orthanc:
    orthanc.clear()
    return orthanc


def _predict(bundle: Path, *args: str) -> int:
    configs = [str(bundle / "configs" / "inference.json"), str(bundle / "configs" / "tiny.json")]
    return medseg_main(["predict", "--bundle", str(bundle), "--config-file", *configs, "--no-progress",
                        *args])  # fmt: skip


def _rows(out: Path) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in json.loads((out / "report.json").read_text())["cases"]}


def _broken_series(tmp: Path) -> Path:
    """case_002 with one instance whose pixel data holds half the bytes Rows x Columns x 16 bits need."""
    dst = tmp / "broken"
    shutil.copytree(SERIES / "case_002", dst)
    f = sorted(dst.iterdir())[len(list(dst.iterdir())) // 2]
    ds = pydicom.dcmread(f)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    ds.save_as(f)
    return dst


def _study(folder: Path) -> str:
    return str(pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True).StudyInstanceUID)


def _dciodvfy_errors(path: Path) -> list[str]:
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("Error")]


# ------------------------------------------------------------------------------------ DICOMweb
def test_dicomweb_in_stow_back_equals_folder_mode(pacs: Orthanc, ct_bundle: Path, tmp_path: Path) -> None:
    for case in ("case_000", "case_001"):
        pacs.upload(SERIES / case)
    pacs.upload(_broken_series(tmp_path))
    out = tmp_path / "out"
    args = ["--input", pacs.dicomweb, "--output", str(out), "--formats", "nifti,dicom-seg",
            "--store", pacs.dicomweb]  # fmt: skip
    assert _predict(ct_bundle, *args) == 1  # the broken series fails, the others go through
    rows = _rows(out)
    assert len(rows) == 3 and all(i.startswith("series-") for i in rows)
    failed = [r for r in rows.values() if r["status"] == "failed"]
    assert len(failed) == 1 and "/series/" in failed[0]["input"] and failed[0]["error"]
    oks = [r for r in rows.values() if r["status"] == "ok"]
    assert len(oks) == 2
    segs = pacs.segs()
    assert len(segs) == 2  # one SEG per good series, none for the failed one

    # folder mode on the same series gives the same mask
    folder_out = tmp_path / "folder"
    assert _predict(ct_bundle, "--input", str(SERIES / "case_000"), "--output", str(folder_out),
                    "--formats", "nifti,dicom-seg") == 0  # fmt: skip
    (folder_row,) = _rows(folder_out).values()
    src = pydicom.dcmread(sorted((SERIES / "case_000").iterdir())[0], stop_before_pixels=True)
    (web_row,) = [r for r in oks if r["input"].endswith(str(src.SeriesInstanceUID))]
    web_mask = nib.load(out / f"{web_row['id']}_seg.nii.gz")
    folder_mask = nib.load(folder_out / f"{folder_row['id']}_seg.nii.gz")
    assert np.array_equal(np.asarray(web_mask.dataobj), np.asarray(folder_mask.dataobj))
    assert np.allclose(web_mask.affine, folder_mask.affine)

    # the SEG in the PACS: under the source study, referencing the source series, equal to folder mode's
    (stored,) = [s for s in segs if s["StudyInstanceUID"] == src.StudyInstanceUID]
    seg_path = pacs.seg_file(stored["SOPInstanceUID"], tmp_path / "from_pacs.dcm")
    seg = pydicom.dcmread(seg_path)
    folder_seg = pydicom.dcmread(folder_out / f"{folder_row['id']}_seg.dcm")
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == src.SeriesInstanceUID
    source_uids = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
                   for f in (SERIES / "case_000").iterdir()}  # fmt: skip
    ref_series = seg.ReferencedSeriesSequence[0]
    refs = {str(i.ReferencedSOPInstanceUID) for i in ref_series.ReferencedInstanceSequence}
    assert refs and refs <= source_uids
    segment = seg.SegmentSequence[0]
    assert segment.SegmentLabel == "liver"  # the bundle's channel_def, and its SNOMED CT code
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"
    assert seg.NumberOfFrames == folder_seg.NumberOfFrames and seg.PixelData == folder_seg.PixelData
    if shutil.which("dciodvfy"):
        assert _dciodvfy_errors(seg_path) == []

    # a second run skips the finished series and stores nothing twice
    assert _predict(ct_bundle, *args) == 1
    assert sorted(r["status"] for r in _rows(out).values()) == ["failed", "skipped", "skipped"]
    assert len(pacs.segs()) == 2


def test_query_study_and_modality_filters(pacs: Orthanc, ct_bundle: Path, tmp_path: Path) -> None:
    from medseg.predict.dicomweb import DicomwebSource

    pacs.upload(SERIES / "case_000")
    pacs.upload(SERIES / "case_001")
    study = _study(SERIES / "case_001")
    only = DicomwebSource(pacs.dicomweb, str(tmp_path), modality="CT", studies=[study]).list_series()
    assert [s.study_uid for s in only] == [study]
    assert DicomwebSource(pacs.dicomweb, str(tmp_path), modality="MR").list_series() == []
    assert len(DicomwebSource(pacs.dicomweb, str(tmp_path), modality="CT").list_series()) == 2
    none = DicomwebSource(pacs.dicomweb, str(tmp_path), query={"StudyDate": "19000101"}).list_series()
    assert none == []


def test_wado_cache_resumes_and_follows_the_pacs(
    pacs: Orthanc, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A retrieval killed half-way: the next run fetches only the missing instances, drops the ones gone
    from the PACS and the temporary files of the killed writes."""
    from medseg.predict.dicomweb import DicomwebSource

    pacs.upload(SERIES / "case_001")
    src = DicomwebSource(pacs.dicomweb, str(tmp_path), modality="CT")
    (case,) = src.cases()
    assert case.error is None and len(case.files) == 48 and case.id.startswith("series-")
    folder = Path(case.path)
    files = sorted(folder.iterdir())
    for f in files[:5]:
        f.unlink()
    kept = {f.name: f.stat().st_mtime_ns for f in files[5:]}
    (folder / "0000stale.dcm").write_bytes(b"gone from the PACS")
    (folder / f".{files[0].name}.abc.tmp.dcm").write_bytes(b"half written")
    urls: list[str] = []
    retrieve = DicomwebSource._retrieve

    def counted(self: Any, url: str, *a: Any) -> Any:
        urls.append(url)
        return retrieve(self, url, *a)

    monkeypatch.setattr(DicomwebSource, "_retrieve", counted)
    (again,) = src.cases(shard=None)
    assert len(urls) == 5 and all("/instances/" in u for u in urls)  # only the missing ones, one by one
    assert sorted(p.name for p in folder.iterdir()) == sorted(f.name for f in files)
    assert all(folder.joinpath(n).stat().st_mtime_ns == t for n, t in kept.items())
    assert again.error is None and len(again.files) == 48


# ------------------------------------------------------------------------------ store failures
def test_pacs_down_is_a_failed_row_then_retried(pacs: Orthanc, ct_bundle: Path, tmp_path: Path) -> None:
    src = tmp_path / "in"
    shutil.copytree(SERIES / "case_001", src / "case_001")
    out = tmp_path / "out"
    dead = _free_port()
    base = ["--input", str(src), "--output", str(out), "--formats", "nifti,dicom-seg"]
    for store in (f"dimse://ORTHANC@127.0.0.1:{dead}", f"http://127.0.0.1:{dead}/dicom-web"):
        assert _predict(ct_bundle, *base, "--store", store) == 1
        (row,) = _rows(out).values()
        assert row["status"] == "failed" and f"store to {store}" in row["error"], row
        assert (out / f"{row['id']}_seg.dcm").is_file()  # nothing lost: the SEG waits for the next run
    assert pacs.segs() == []
    # the PACS is back: the next run stores it (without redoing the inference), exactly once
    assert _predict(ct_bundle, *base, "--store", pacs.dimse) == 0
    (row,) = _rows(out).values()
    assert row["status"] in ("ok", "skipped")
    assert len(pacs.segs()) == 1
    assert _predict(ct_bundle, *base, "--store", pacs.dicomweb) == 0  # same SEG over STOW-RS: kept once
    assert len(pacs.segs()) == 1


def test_kill9_then_restart_one_seg_per_series(pacs: Orthanc, ct_bundle: Path, tmp_path: Path) -> None:
    for case in ("case_000", "case_001", "case_003"):
        pacs.upload(SERIES / case)
    out = tmp_path / "out"
    args = ["--input", pacs.dicomweb, "--output", str(out), "--formats", "dicom-seg",
            "--store", pacs.dicomweb]  # fmt: skip
    cmd = [sys.executable, "-m", "medseg", "predict", "--bundle", str(ct_bundle), "--config-file",
           str(ct_bundle / "configs" / "inference.json"), str(ct_bundle / "configs" / "tiny.json"),
           "--no-progress", *args]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})  # fmt: skip
    try:  # kill as soon as the first SEG reached the PACS: the others are in flight or not started
        _wait(lambda: len(pacs.segs()) >= 1 or proc.poll() is not None, 120, "the first SEG", step=0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert _predict(ct_bundle, *args) == 0
    rows = _rows(out)
    assert len(rows) == 3 and all(r["status"] in ("ok", "skipped") for r in rows.values())
    segs = pacs.segs()
    assert len(segs) == 3 and len({s["SeriesInstanceUID"] for s in segs}) == 3


# ---------------------------------------------------------------------------------- listener
def _listen(bundle: Path, out: Path, port: int, store: str, timeout: float) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "medseg", "listen", "--bundle", str(bundle), "--config-file",
           str(bundle / "configs" / "inference.json"), str(bundle / "configs" / "tiny.json"),
           "--ae-title", LISTEN_AET, "--port", str(port), "--host", "127.0.0.1", "--output", str(out),
           "--store", store, "--series-timeout", str(timeout), "--calling-ae", "ORTHANC"]  # fmt: skip
    log = open(out.parent / f"listen-{time.monotonic_ns()}.log", "wb")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)

    def up() -> bool:
        assert proc.poll() is None, Path(log.name).read_text()[-3000:]
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    _wait(up, 90, "medseg listen to accept connections")
    return proc


def _echo(port: int, called: str, calling: str) -> bool:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    ok = assoc.is_established
    if ok:
        assoc.release()
    return ok


def test_listener_cstore_in_and_back_restart_sigterm(pacs: Orthanc, ct_bundle: Path, tmp_path: Path) -> None:
    first = pacs.upload(SERIES / "case_000")
    second = pacs.upload(SERIES / "case_001")
    out = tmp_path / "out"
    out.mkdir()
    port = pacs.listen_port
    # 1) receive a series, then kill -9 before it is complete (long series timeout)
    proc = _listen(ct_bundle, out, port, pacs.dimse, timeout=3600)
    try:
        assert pacs.post("/modalities/medseg/store", first)["InstancesCount"] == 52
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    received = list((out / ".medseg" / "received").iterdir())
    assert len(received) == 1 and len(list(received[0].iterdir())) == 52  # written before acknowledged
    # 2) restart: the received series is picked up; a new one arrives and is processed too
    proc = _listen(ct_bundle, out, port, pacs.dimse, timeout=1)
    try:
        assert not _echo(port, "SOMEONE", "ORTHANC")  # not our AE title: rejected
        assert not _echo(port, LISTEN_AET, "STRANGER")  # not an allowed calling AE title: rejected
        assert _echo(port, LISTEN_AET, "ORTHANC")
        _wait(lambda: len(pacs.segs()) == 1, 90, "the SEG of the received series")
        pacs.post("/modalities/medseg/store", second)
        _wait(lambda: len(pacs.segs()) == 2, 90, "the SEG of the second series")
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
    assert rc == 0
    rows = _rows(out)
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows.values()), rows
    segs = pacs.segs()
    assert {s["StudyInstanceUID"] for s in segs} == {_study(SERIES / c) for c in ("case_000", "case_001")}


def test_listener_stop_lets_the_current_case_finish(tmp_path: Path) -> None:
    """SIGTERM sets ``stop``: the series being segmented is finished and recorded, then ``serve`` returns 0.
    (No PACS needed: an engine stand-in receives the stop request in the middle of its case.)"""
    from medseg.predict.listener import Listener
    from medseg.predict.report import CaseResult

    received = tmp_path / ".medseg" / "received"
    for name in ("series-a", "series-b"):
        shutil.copytree(SERIES / "case_001", received / name)

    class Engine:
        output_dir, summary, runs = str(tmp_path), {}, []

        def run(self, source: str, cases: list[Any]) -> list[CaseResult]:
            listener.stop.set()  # the signal arrives during the case
            time.sleep(0.2)
            self.runs.append(cases[0].id)
            return [CaseResult(cases[0].id, cases[0].input, "ok")]

    listener = Listener(Engine(), LISTEN_AET, _free_port(), host="127.0.0.1", series_timeout=0, poll=0.01)
    assert listener.serve() == 0
    assert Engine.runs == ["series-a"]  # finished; the next one waits for the next start
    assert list(_rows(tmp_path)) == ["series-a"]
