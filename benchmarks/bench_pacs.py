"""Benchmark: ``medseg predict`` from a PACS (DICOMweb) vs from a folder, on the same DICOM series.

Makes ``--n`` series from the sample CT series (``sample_data/ct_3d/dicom``; new Study/Series/SOP
Instance UIDs per copy, so each is a series of its own), starts Orthanc with its DICOMweb plugin on
free loopback ports (temporary storage), uploads them, then times, alternating, ``--repeats`` times with
fresh output folders:

1. *folder*: ``medseg predict --input <folder of the series> --formats nifti,dicom-seg``;
2. *dicomweb*: ``medseg predict --input http://127.0.0.1:<port>/dicom-web --formats nifti,dicom-seg``
   (QIDO-RS listing, WADO-RS retrieval into the cache included: a cold cache every time);
3. *dicomweb + STOW*: the same with ``--store`` to the same Orthanc (the SEG objects are deleted
   from Orthanc between repeats).

Each run is one in-process ``medseg predict`` call (bundle parsing and model loading included, the same
for all three). Prints the medians and the best runs, and their ratios to folder mode (the best run is
the steadier figure on a machine that runs other work).
Run: ``python benchmarks/bench_pacs.py [--n 10] [--repeats 3] [--tiny]``. Uses ``bundles/unet_ct_3d``
(random weights when ``models/model.pt`` is absent: timing only); ``--tiny``: the small test network.
Needs the ``orthanc`` and ``orthanc-dicomweb`` Debian packages.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import pydicom
import requests
import torch

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
TINY = {"network_def#features": 4, "network_def#depth": 2, "target_spacing": [6.0, 6.0, 8.0],
        "tile_size": [64, 64, 32]}  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_series(folder: Path, n: int) -> list[Path]:
    """``n`` series: copies of the sample CT series with new UIDs."""
    from pydicom.uid import generate_uid

    src = sorted(p for p in (ROOT / "sample_data" / "ct_3d" / "dicom").iterdir() if p.is_dir())
    out = []
    for i in range(n):
        dst = folder / f"series_{i:02d}"
        dst.mkdir(parents=True)
        study, series, frame = generate_uid(), generate_uid(), generate_uid()
        for f in sorted(src[i % len(src)].iterdir()):
            ds = pydicom.dcmread(f)
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.save_as(dst / f.name)
        out.append(dst)
    return out


def bundle_copy(tmp: Path, tiny: bool) -> tuple[Path, list[str]]:
    """A tmp copy of unet_ct_3d with weights (the shipped ones, else random) and its config files."""
    from monai.bundle import ConfigParser

    dst = tmp / "unet_ct_3d"
    shutil.copytree(ROOT / "bundles" / "unet_ct_3d" / "configs", dst / "configs")
    (dst / "models").mkdir()
    configs = [str(dst / "configs" / "inference.json")]
    if tiny:
        (dst / "configs" / "tiny.json").write_text(json.dumps(TINY))
        configs.append(str(dst / "configs" / "tiny.json"))
    shipped = ROOT / "bundles" / "unet_ct_3d" / "models" / "model.pt"
    if shipped.is_file() and not tiny:
        shutil.copy(shipped, dst / "models" / "model.pt")
    else:
        parser = ConfigParser()
        parser.read_config(configs)
        torch.manual_seed(0)
        torch.save(parser.get_parsed_content("network_def").state_dict(), dst / "models" / "model.pt")
    return dst, configs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="the small test network (I/O-dominated worst case)")
    args = ap.parse_args()

    from medseg.predict.command import add_predict_parser

    sub = argparse.ArgumentParser(prog="medseg").add_subparsers()
    add_predict_parser(sub)
    parser = sub.choices["predict"]

    def medseg(argv: list[str]) -> int:
        args = parser.parse_args(argv[1:])
        return int(args.func(args))

    tmp = Path(tempfile.mkdtemp(prefix="bench_pacs_"))
    http, dicom = free_port(), free_port()
    config = {"Name": "bench", "StorageDirectory": str(tmp / "db"), "IndexDirectory": str(tmp / "db"),
              "HttpPort": http, "DicomPort": dicom, "RemoteAccessAllowed": False,
              "AuthenticationEnabled": False, "Plugins": [PLUGIN],
              "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}  # fmt: skip
    (tmp / "orthanc.json").write_text(json.dumps(config))
    orthanc = subprocess.Popen(["Orthanc", str(tmp / "orthanc.json")], cwd=tmp,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    rest = f"http://127.0.0.1:{http}"
    try:
        for _ in range(300):
            try:
                requests.get(rest + "/system", timeout=1).raise_for_status()
                break
            except requests.RequestException:
                time.sleep(0.1)
        series = make_series(tmp / "series", args.n)
        for folder in series:
            for f in sorted(folder.iterdir()):
                requests.post(rest + "/instances", data=f.read_bytes(), timeout=30).raise_for_status()
        bundle, configs = bundle_copy(tmp, args.tiny)
        url = rest + "/dicom-web"
        common = ["predict", "--bundle", str(bundle), "--config-file", *configs,
                  "--formats", "nifti,dicom-seg", "--no-progress"]  # fmt: skip
        modes = {
            "folder": ["--input", str(tmp / "series")],
            "dicomweb": ["--input", url],
            "dicomweb + STOW": ["--input", url, "--store", url],
        }
        times: dict[str, list[float]] = {m: [] for m in modes}
        for r in range(args.repeats + 1):  # the first round warms up (imports, page cache)
            for mode, extra in modes.items():
                out = tmp / "out" / f"{mode.replace(' ', '')}-{r}"
                t0 = time.perf_counter()
                code = medseg([*common, *extra, "--output", str(out)])
                wall = time.perf_counter() - t0
                assert code == 0, (mode, code)
                if r:
                    times[mode].append(wall)
                for s in requests.get(rest + "/series", timeout=30).json():  # drop the stored SEG objects
                    info = requests.get(f"{rest}/series/{s}", timeout=30).json()
                    if info["MainDicomTags"].get("Modality") == "SEG":
                        requests.delete(f"{rest}/series/{s}", timeout=30).raise_for_status()
                shutil.rmtree(out)
        base, base_min = statistics.median(times["folder"]), min(times["folder"])
        print(f"{args.n} series ({sum(len(list(s.iterdir())) for s in series)} instances), "
              f"{'tiny' if args.tiny else 'unet_ct_3d'} network, torch threads {torch.get_num_threads()}, "
              f"medians of {args.repeats}:")  # fmt: skip
        for mode, ts in times.items():
            med, low = statistics.median(ts), min(ts)
            print(f"  {mode:16s} median {med:6.2f} s ({med / base:.2f}x folder), best {low:6.2f} s "
                  f"({low / base_min:.2f}x)  runs: " + ", ".join(f"{t:.2f}" for t in ts))  # fmt: skip
    finally:
        orthanc.terminate()
        orthanc.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
