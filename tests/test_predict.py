"""Batch prediction (``medseg predict``): discovery, failure isolation, source-grid outputs, DICOM SEG,
kill-and-resume, shards. Runs the real ``unet_ct_3d`` bundle (a tmp copy, shrunk by an override config
so that CPU inference takes a fraction of a second) on the project's sample CT and on pydicom's and
nibabel's bundled test files."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch

from medseg.predict import BatchPredictor, case_id, discover_cases, merge_reports, read_report, select_shard
from medseg.predict.discovery import parse_shard, shard_from_env

ROOT = Path(__file__).resolve().parents[1]
CT = ROOT / "sample_data" / "ct_3d"
BUNDLE = ROOT / "bundles" / "unet_ct_3d"
MAT = ROOT / "sample_data" / "brain_mri_mat" / "1.mat"

pytestmark = pytest.mark.skipif(
    not (BUNDLE / "configs" / "inference.json").is_file() or not CT.is_dir(),
    reason="needs bundles/unet_ct_3d and sample_data/ct_3d",
)


def _temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".tmp" in p.name]


@pytest.fixture(scope="module")
def bundle(ct_bundle: Path) -> Path:
    return ct_bundle


def _configs(bundle: Path) -> list[str]:
    return [str(bundle / "configs" / "inference.json"), str(bundle / "configs" / "tiny.json")]


def _full_predictor(bundle: Path, out: Path, **kwargs: Any) -> BatchPredictor:
    """The predictor of the full run (NIfTI + DICOM SEG + overlays), with ``kwargs`` on top."""
    return BatchPredictor.from_bundle(
        bundle,
        out,
        config_file=_configs(bundle),
        formats=("nifti", "dicom-seg"),
        overlays=True,
        progress=False,
        **kwargs,
    )


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PACS-like mixed input folder: good cases and every kind of bad one."""
    import pydicom.data

    d = tmp_path_factory.mktemp("mixed") / "in"
    series = d / "PAT 1" / "study" / "series_A"
    shutil.copytree(CT / "dicom" / "case_000", series)
    (d / "nifti").mkdir()
    shutil.copy(CT / "images" / "case_001.nii.gz", d / "nifti" / "case_001.nii.gz")
    shutil.copy(MAT, d / "slice.mat")  # 2-D: wrong dimensionality for a 3-D model
    shutil.copy(pydicom.data.get_testdata_file("CT_small.dcm"), d / "single.dcm")  # one slice: too small
    raw = (CT / "dicom" / "case_001" / sorted(os.listdir(CT / "dicom" / "case_001"))[0]).read_bytes()
    (d / "corrupt.dcm").write_bytes(raw[:2000])  # header fine, pixel data cut
    (d / "nifti" / "truncated.nii.gz").write_bytes((CT / "images" / "case_002.nii.gz").read_bytes()[:30000])
    (d / "empty_folder").mkdir()
    (d / "notes.txt").write_text("not an image\n")
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    nan = np.zeros((40, 40, 20), np.float32)
    nan[5, 5, 5] = np.nan
    nib.save(nib.Nifti1Image(nan, affine), d / "nifti" / "nan.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((8, 8, 3), np.int16), affine), d / "nifti" / "tiny.nii.gz")
    four_d = Path(nib.__file__).parent / "tests" / "data" / "example4d.nii.gz"
    shutil.copy(four_d, d / "nifti" / "four_d.nii.gz")
    (d / "README.md").write_text("ignored sidecar")
    return d


EXPECTED = {
    "PAT-1__study__series_A": ("ok", ""),
    "nifti__case_001": ("ok", ""),
    "slice": ("failed", "wrong dimensionality"),
    "single": ("failed", "too small"),
    "corrupt": ("failed", "corrupt.dcm"),
    "nifti__truncated": ("failed", "truncated.nii.gz"),
    "empty_folder": ("failed", "empty folder"),
    "notes-txt": ("failed", "not a supported image file"),
    "nifti__nan": ("failed", "NaN"),
    "nifti__tiny": ("failed", "too small"),
    "nifti__four_d": ("failed", "channels"),
}


@pytest.fixture(scope="module")
def full_run(bundle: Path, mixed: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    out = tmp_path_factory.mktemp("out_full")
    predictor = _full_predictor(bundle, out)
    predictor.run(mixed)
    return out, int(predictor.exit_code)


# ------------------------------------------------------------------------------------------- discovery
def test_case_ids_are_sanitised_and_stable() -> None:
    assert case_id("PAT 1/study/series_A") == "PAT-1__study__series_A"
    assert case_id("a/b.nii.gz") == "a__b"
    assert case_id("x/Müller, Hans.dcm") == "x__M-ller-Hans"
    long = case_id("d/" + "x" * 300 + ".nii")
    assert len(long) <= 120 and long == case_id("d/" + "x" * 300 + ".nii")


def test_discovery_splits_multi_series_folders_without_tags_in_ids(tmp_path: Path) -> None:
    import pydicom
    import pydicom.data

    base = Path(pydicom.data.get_testdata_file("CT_small.dcm")).parent / "dicomdirtests" / "98892003"
    cases = discover_cases(base)
    assert [c.id for c in cases] == sorted(c.id for c in cases)
    mr2 = [c for c in cases if c.id.startswith("MR2")]
    uids = {
        pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID
        for f in os.listdir(base / "MR2")
        for f in [str(base / "MR2" / f)]
    }
    assert {c.series_uid for c in mr2} == uids and len(mr2) == len(uids) > 1  # one case per series
    names = {pydicom.dcmread(f, stop_before_pixels=True).PatientName for c in cases for f in c.files}
    for c in cases:
        assert all(str(n).split("^")[0].lower() not in c.id.lower() for n in names if str(n))
    assert discover_cases(base) == cases  # deterministic


def test_discovery_of_list_file_and_datalist(tmp_path: Path) -> None:
    lst = tmp_path / "cases.txt"
    lst.write_text(
        f"# two cases\n{CT / 'images' / 'case_000.nii.gz'}\n{CT / 'dicom' / 'case_001'}\nmissing.nii\n"
    )
    cases = discover_cases(lst)
    kinds = {c.kind for c in cases}
    assert len(cases) == 3 and {"image", "dicom-series", "unknown"} <= kinds
    assert next(c for c in cases if c.kind == "unknown").error.endswith("no such file or folder")
    items = [{"image": str(CT / "images" / f"case_00{i}.nii.gz")} for i in range(3)]
    assert [c.id for c in discover_cases(items)] == ["case_000", "case_001", "case_002"]


def test_shards_cover_every_case_once(mixed: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cases = discover_cases(mixed)
    for n in (1, 2, 3, 5):
        parts = [select_shard(cases, (i, n)) for i in range(n)]
        ids = [c.id for p in parts for c in p]
        assert sorted(ids) == sorted(c.id for c in cases) and len(ids) == len(set(ids))
    assert parse_shard("1/4") == (1, 4)
    with pytest.raises(ValueError):
        parse_shard("4/4")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "2")
    assert shard_from_env() == (2, 3)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert shard_from_env() is None


# ------------------------------------------------------------------------------------------ full run
def test_mixed_folder_rows_and_exit_status(full_run: tuple[Path, int]) -> None:
    out, code = full_run
    assert code == 1  # some cases failed
    summary, rows = read_report(str(out / "report.json"))
    got = {r.id: r for r in rows}
    assert set(got) == set(EXPECTED)  # README.md ignored, everything else is a row
    for cid, (status, words) in EXPECTED.items():
        assert got[cid].status == status, (cid, got[cid].error)
        assert words.lower() in got[cid].error.lower(), (cid, got[cid].error)
        if status == "failed":
            assert "Traceback" not in got[cid].error and "\n" not in got[cid].error
            assert not list(out.glob(f"{cid}_*")), f"failed case {cid} left outputs"
    assert summary["ok"] == 2 and summary["failed"] == len(EXPECTED) - 2
    csv_lines = (out / "report.csv").read_text().splitlines()
    assert len(csv_lines) == len(EXPECTED) + 1 and csv_lines[0].startswith("id,input,status,error,seconds")
    ok = got["nifti__case_001"]
    assert ok.seconds > 0 and ok.infer_s > 0
    assert set(ok.voxels) == set(ok.volume_ml) and ok.voxels  # per label (channel_def)
    name, n = next(iter(ok.voxels.items()))
    spacing = np.abs(np.diag(nib.load(CT / "images" / "case_001.nii.gz").affine)[:3])
    assert ok.volume_ml[name] == pytest.approx(n * np.prod(spacing) / 1000, rel=1e-3)
    assert not _temp_files(out)


def test_masks_on_source_grid(full_run: tuple[Path, int], mixed: Path) -> None:
    import SimpleITK as sitk

    out, _ = full_run
    src = nib.load(mixed / "nifti" / "case_001.nii.gz")
    mask = nib.load(out / "nifti__case_001_seg.nii.gz")
    assert mask.shape == src.shape and np.allclose(mask.affine, src.affine, atol=1e-4)
    assert np.issubdtype(mask.get_data_dtype(), np.integer)
    # DICOM series: SimpleITK's geometry of the series (LPS) == the mask's (nibabel, RAS)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(mixed / "PAT 1" / "study" / "series_A")))
    img = reader.Execute()
    m = sitk.ReadImage(str(out / "PAT-1__study__series_A_seg.nii.gz"))
    assert m.GetSize() == img.GetSize()
    np.testing.assert_allclose(m.GetOrigin(), img.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(m.GetSpacing(), img.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(m.GetDirection(), img.GetDirection(), atol=1e-5)
    png = out / "nifti__case_001_overlay.png"
    from PIL import Image

    with Image.open(png) as im:
        assert im.mode == "RGB" and im.size[1] == src.shape[1]


def test_dicom_seg_references_source_series(full_run: tuple[Path, int], mixed: Path) -> None:
    import highdicom as hd
    import pydicom

    out, _ = full_run
    seg = hd.seg.segread(out / "PAT-1__study__series_A_seg.dcm")
    folder = mixed / "PAT 1" / "study" / "series_A"
    src = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.iterdir())]
    assert seg.Modality == "SEG"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == src[0].SeriesInstanceUID
    refs = {r.ReferencedSOPInstanceUID for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert refs == {ds.SOPInstanceUID for ds in src}
    assert not (out / "nifti__case_001_seg.dcm").exists()  # SEG only for DICOM input


def test_rerun_skips_finished_cases_and_new_model_redoes_them(
    full_run: tuple[Path, int], bundle: Path, mixed: Path, tmp_path: Path
) -> None:
    out, _ = full_run
    work = tmp_path / "out"
    shutil.copytree(out, work)
    mtimes = {p.name: p.stat().st_mtime_ns for p in work.glob("*_seg.nii.gz")}
    p = _full_predictor(bundle, work)
    rows = {r.id: r for r in p.run(mixed)}
    assert rows["nifti__case_001"].status == "skipped" and rows["nifti__case_001"].voxels
    assert rows["corrupt"].status == "failed"  # failed cases are retried, not skipped
    assert {q.name: q.stat().st_mtime_ns for q in work.glob("*_seg.nii.gz")} == mtimes
    # a new checkpoint changes the model key: the case is redone
    ckpt = tmp_path / "other.pt"
    net = torch.load(bundle / "models" / "model.pt", weights_only=True)
    torch.save({k: v + 0.01 if v.is_floating_point() else v for k, v in net.items()}, ckpt)
    p2 = _full_predictor(bundle, work, checkpoint=ckpt)
    items = [{"image": str(mixed / "nifti" / "case_001.nii.gz")}]
    assert [r.status for r in p2.run(items)] == ["ok"]


def test_two_shards_equal_one_run(
    full_run: tuple[Path, int], bundle: Path, mixed: Path, tmp_path: Path
) -> None:
    out, _ = full_run
    shard_out = tmp_path / "sharded"
    for i in range(2):
        p = _full_predictor(bundle, shard_out, shard=(i, 2))
        p.run(mixed)
        assert (shard_out / f"report.shard-{i}-of-2.json").is_file()
    code, problems = merge_reports(str(shard_out))
    assert code == 1 and not problems
    _, merged = read_report(str(shard_out / "report.json"))
    _, single = read_report(str(out / "report.json"))
    assert [(r.id, r.status, r.voxels) for r in merged] == [(r.id, r.status, r.voxels) for r in single]

    def outputs(d: Path) -> set[str]:
        return {q.name for q in d.iterdir() if q.is_file() and not q.name.startswith("report")}

    assert outputs(shard_out) == outputs(out)
    a = nib.load(out / "nifti__case_001_seg.nii.gz").get_fdata()
    b = nib.load(shard_out / "nifti__case_001_seg.nii.gz").get_fdata()
    np.testing.assert_array_equal(a, b)


def test_failure_while_writing_leaves_no_output(
    bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import medseg.data.writers as writers

    src = tmp_path / "in"
    shutil.copytree(CT / "dicom" / "case_002", src / "series")

    def broken(*args: object, **kwargs: object) -> str:
        raise OSError("disk full (injected)")

    monkeypatch.setattr(writers, "write_dicom_seg", broken)
    out = tmp_path / "out"
    p = BatchPredictor.from_bundle(
        bundle, out, config_file=_configs(bundle), formats=("nifti", "dicom-seg"), workers=0, progress=False
    )
    (row,) = p.run(src)
    assert row.status == "failed" and "disk full (injected)" in row.error and p.exit_code == 1
    assert sorted(q.name for q in out.iterdir() if q.name != ".medseg") == ["report.csv", "report.json"]
    assert not (out / ".medseg").is_dir() or not list((out / ".medseg").iterdir())


# --------------------------------------------------------------------------------------- kill / resume
def _run_cli(argv: list[str]) -> None:
    from medseg.cli import main

    torch.set_num_threads(1)  # forked from a process whose OpenMP pool is already up
    main(argv)


def _is_marker(path: Path) -> bool:
    """A finished case's marker (not the temporary file a marker is written to first)."""
    return path.suffix == ".json" and not path.name.startswith(".")


def test_sigkill_then_resume(bundle: Path, tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    for i in range(4):
        shutil.copy(CT / "images" / f"case_00{i}.nii.gz", src / f"c{i}.nii.gz")
    out = tmp_path / "out"
    argv = [
        "predict",
        "--bundle",
        str(bundle),
        "--input",
        str(src),
        "--output",
        str(out),
        "--config-file",
        *_configs(bundle),
        "--workers",
        "1",
        "--no-progress",
    ]
    # the run to kill: a forked child (no second interpreter start-up), SIGKILLed after its first case
    proc = multiprocessing.get_context("fork").Process(target=_run_cli, args=(argv,))
    proc.start()
    marker_dir = out / ".medseg"
    deadline = time.time() + 120
    while time.time() < deadline and proc.is_alive():
        if marker_dir.is_dir() and any(_is_marker(q) for q in marker_dir.iterdir()):
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert proc.exitcode == -signal.SIGKILL
    done_first = {q.stem for q in marker_dir.iterdir() if _is_marker(q)}
    assert done_first and not (out / "report.json").exists(), "killed too late: nothing left to resume"
    before = {q.name: q.stat().st_mtime_ns for q in out.glob("*_seg.nii.gz")}
    from medseg.cli import main

    assert main(argv) == 0
    _, rows = read_report(str(out / "report.json"))
    status = {r.id: r.status for r in rows}
    assert set(status) == {f"c{i}" for i in range(4)}
    assert {k for k, s in status.items() if s == "skipped"} == done_first
    assert all(s == "ok" for k, s in status.items() if k not in done_first)
    for k in done_first:  # not rewritten: each case was produced exactly once
        assert (out / f"{k}_seg.nii.gz").stat().st_mtime_ns == before[f"{k}_seg.nii.gz"]
    assert not _temp_files(out)
    for i in range(4):
        m, s = nib.load(out / f"c{i}_seg.nii.gz"), nib.load(src / f"c{i}.nii.gz")
        assert m.shape == s.shape and np.allclose(m.affine, s.affine, atol=1e-4)


def test_cli_setup_errors_exit_2(bundle: Path, tmp_path: Path) -> None:
    from medseg.cli import main

    def predict(bundle_dir: Path, inp: Path) -> int:
        out = tmp_path / "o"
        return main(["predict", "--bundle", str(bundle_dir), "--input", str(inp), "--output", str(out)])

    assert predict(bundle, tmp_path / "nope") == 2  # no such input
    (tmp_path / "emptyin").mkdir()
    assert predict(bundle, tmp_path / "emptyin") == 2  # no cases
    assert predict(tmp_path, CT / "images") == 2  # not a bundle
    assert main(["predict", "--output", str(tmp_path / "o"), "--merge-reports"]) == 3


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_run_matches_cpu(bundle: Path, tmp_path: Path) -> None:
    items = [{"image": str(CT / "images" / "case_003.nii.gz")}]
    res = {}
    for dev in ("cpu", "cuda"):
        p = BatchPredictor.from_bundle(
            bundle, tmp_path / dev, config_file=_configs(bundle), device=dev, precision="fp32", progress=False
        )
        assert [r.status for r in p.run(items)] == ["ok"]
        res[dev] = nib.load(tmp_path / dev / "case_003_seg.nii.gz").get_fdata()
    assert (res["cpu"] != res["cuda"]).mean() < 1e-3


def test_foreground_threshold_equals_argmax_of_inverted_probabilities(bundle: Path, tmp_path: Path) -> None:
    """unet_ct_3d inverts only the foreground probability and keeps voxels where it is >= 0.5: on a real
    case that is the label map of the usual chain (both probabilities inverted, then argmax) except where
    the model is undecided (the two probabilities tie), which the threshold gives to the foreground."""
    from medseg.transforms import InvertToLabelsd
    from monai.transforms import Activationsd, AsDiscreted, Compose, Lambdad, SaveImaged

    from medseg.predict.discovery import discover_cases

    predictor = BatchPredictor.from_bundle(bundle, tmp_path, config_file=_configs(bundle), progress=False)
    steps = predictor.postprocessing.transforms
    # SaveImaged dropped, Invertd + AsDiscreted fused
    assert [type(t) for t in steps] == [Activationsd, Lambdad, InvertToLabelsd]
    assert not any(isinstance(t, SaveImaged) for t in steps)
    act, _, fused = steps
    inv = fused.invert
    case = next(c for c in discover_cases(CT / "images") if c.id.startswith("case_001"))
    prep = predictor.loader.load(case, "")
    pred, _ = predictor._infer(prep)
    ours = predictor.postprocessing({**prep.data, "pred": pred.clone()})["pred"]
    probs = Compose([act, inv])({**prep.data, "pred": pred.clone()})["pred"]  # both, on the source grid
    ref = AsDiscreted("pred", argmax=True, dtype=torch.uint8)({"pred": probs})["pred"]
    assert ours.dtype == torch.uint8 and ours.shape == ref.shape == (1, *nib.load(case.path).shape)
    assert torch.equal(ours.affine, ref.affine)
    differ = (ours != ref).as_tensor()[0]
    undecided = ((probs[1] - probs[0]).abs() <= 1e-6).as_tensor()
    assert not (differ & ~undecided).any()  # every difference is a (near) tie of the two probabilities
    assert 0 < int(ref.sum()) < ref.numel()  # both labels present: the comparison can fail


def test_engine_postprocessing_drops_savers_and_speeds_up_argmax(tmp_path: Path) -> None:
    """SaveImage(d) are dropped (the engine writes atomically itself) and AsDiscrete(d)'s argmax becomes
    channel_argmax: the same labels as MONAI's, ties included, in the transform's dtype."""
    from monai.data import MetaTensor
    from monai.transforms import AsDiscrete, AsDiscreted, Compose, SaveImaged

    from medseg.predict.sinks import prepare_postprocessing

    saver = SaveImaged("pred", output_dir=tmp_path)
    original = Compose([AsDiscreted("pred", argmax=True, dtype=torch.uint8), saver])
    fast = prepare_postprocessing(original)
    assert len(fast.transforms) == 1 and type(fast.transforms[0].converter) is not AsDiscrete
    assert type(original.transforms[0].converter) is AsDiscrete and len(original.transforms) == 2  # untouched
    x = torch.randn(2, 20, 21, 22, generator=torch.Generator().manual_seed(0))
    x[:, :5] = 0.25  # ties
    ours = fast({"pred": MetaTensor(x.clone())})["pred"]
    ref = AsDiscrete(argmax=True, dtype=torch.uint8)(MetaTensor(x.clone()))
    assert ours.dtype == ref.dtype == torch.uint8 and torch.equal(ours.as_tensor(), ref.as_tensor())
    assert not list(tmp_path.iterdir())  # nothing saved


@pytest.mark.parametrize("channels", [1, 2, 3, 5])
def test_channel_argmax_equals_torch_argmax(channels: int) -> None:
    from medseg.predict.sinks import channel_argmax

    x = torch.randn(channels, 9, 8, 7, generator=torch.Generator().manual_seed(channels))
    x[:, :3] = 0.5  # exact ties: the first maximal channel wins
    for dim in range(x.ndim):
        for keepdim in (True, False):
            out = channel_argmax(x, dim=dim, keepdim=keepdim)
            ref = torch.argmax(x, dim=dim, keepdim=keepdim)
            assert out.dtype == ref.dtype and torch.equal(out, ref)


def test_memory_policy_holds_for_the_run_only(
    bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``retain_freed_memory``: the run keeps freed memory (``medseg.allocator``) and the default policy is
    restored when it ends, also when it fails; the bundle's config id sets it, an argument overrides it."""
    import medseg.predict.engine as engine

    calls: list[bool] = []
    monkeypatch.setattr(engine, "retain_freed_memory", lambda enable=True: calls.append(enable) or True)
    override = tmp_path / "retain.json"
    override.write_text('{"retain_freed_memory": true}')
    configs = [*_configs(bundle), str(override)]
    plain = BatchPredictor.from_bundle(bundle, tmp_path / "a", config_file=_configs(bundle))
    assert plain.retain_freed_memory is False
    predictor = BatchPredictor.from_bundle(bundle, tmp_path / "b", config_file=configs, progress=False)
    assert predictor.retain_freed_memory is True
    explicit = BatchPredictor.from_bundle(
        bundle, tmp_path / "c", config_file=configs, retain_freed_memory=False, progress=False
    )
    assert explicit.retain_freed_memory is False

    seen: list[list[bool]] = []
    real_run = predictor._run
    monkeypatch.setattr(predictor, "_run", lambda *a: seen.append(list(calls)) or real_run(*a))
    rows = predictor.run(CT / "images" / "case_001.nii.gz")
    assert [r.status for r in rows] == ["ok"]
    assert seen == [[True]] and calls == [True, False]  # retained while the cases ran, then restored

    calls.clear()
    monkeypatch.setattr(predictor, "_run", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        predictor.run(CT / "images")
    assert calls == [True, False]
    calls.clear()
    explicit.run(CT / "images" / "case_001.nii.gz")
    assert calls == []  # off: the policy is left alone


def test_cli_memory_option_overrides_the_bundle(
    bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from medseg.cli import main
    from medseg.predict.engine import SetupError

    got: list[object] = []

    def fake_from_bundle(*_a: object, **kw: object) -> None:
        got.append(kw["retain_freed_memory"])
        raise SetupError("stop here")

    monkeypatch.setattr(BatchPredictor, "from_bundle", fake_from_bundle)
    for policy in ("bundle", "retain", "release"):
        argv = ["predict", "--bundle", str(bundle), "--input", str(CT / "images"),
                "--output", str(tmp_path / "o"), "--memory", policy]  # fmt: skip
        assert main(argv) == 2
    assert got == [None, True, False]
    got.clear()
    for policy in ("bundle", "retain", "release"):  # the DICOM listener takes the same option
        argv = ["listen", "--bundle", str(bundle), "--ae-title", "MEDSEG", "--port", "0",
                "--output", str(tmp_path / "l"), "--memory", policy]  # fmt: skip
        assert main(argv) == 2
    assert got == [None, True, False]
