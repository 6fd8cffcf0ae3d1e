"""Run medseg's readers, transforms and writers on the sample data; print a JSON summary.

``tests/test_monailabel.py`` runs this with medseg's own interpreter and with MONAI Label's (pydicom
2.4, numpy 1.26) and compares the two summaries: the same code must give the same numbers on both
stacks. Usage: ``python compat_check.py SAMPLE_DATA_DIR OUT_DIR``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def _summary(x: object) -> dict[str, object]:
    a = np.asarray(x, dtype=np.float64)
    return {"shape": list(a.shape), "sum": float(a.sum()), "abs_sum": float(np.abs(a).sum())}


def main(samples: Path, out: Path) -> dict[str, object]:
    import medseg.transforms as T
    import nibabel as nib
    import pydicom
    import torch
    from monai.transforms import LoadImage
    from monai.utils import set_determinism

    import medseg.data

    result: dict[str, object] = {"versions": {"numpy": np.__version__, "pydicom": pydicom.__version__,
                                              "torch": torch.__version__}}
    series = samples / "ct_3d" / "dicom" / "case_000"
    ct = LoadImage(image_only=True, reader=medseg.data.DicomReader())(str(series))
    result["dicom_series"] = {**_summary(ct), "affine": np.asarray(ct.affine).round(4).tolist()}
    png = LoadImage(image_only=True)(str(samples / "nuclei_2d" / "images" / "nuclei_00.png"))
    result["png"] = _summary(png)
    mat = LoadImage(image_only=True, reader=medseg.data.MatReader(field="cjdata/image"))(
        str(samples / "brain_mri_mat" / "1.mat")
    )
    result["mat"] = _summary(mat)
    result["ct_window"] = _summary(T.CTWindow(center=50, width=400)(ct[None]))

    instances = LoadImage(image_only=True)(str(samples / "nuclei_2d" / "labels" / "nuclei_00.png"))
    result["weight_map"] = _summary(T.UNetWeightMap()(instances[None]))

    set_determinism(0)
    elastic = T.RandElasticGrid(prob=1.0)
    elastic.set_random_state(0)
    result["elastic"] = {"shape": list(elastic(png[None].float()).shape)}

    mask = (ct > 0).to(torch.uint8)
    nifti = medseg.data.write_nifti_mask(mask, ct, out / "mask.nii.gz")
    img = nib.load(nifti)
    result["nifti_mask"] = {**_summary(img.dataobj), "affine": img.affine.round(4).tolist()}
    files = ct.meta[medseg.data.DICOM_SOURCE_FILES_KEY]
    seg = medseg.data.write_dicom_seg(mask, files, out / "mask.dcm", {1: "body"}, reference=ct)
    ds = pydicom.dcmread(seg)
    result["dicom_seg"] = {"frames": int(ds.NumberOfFrames), "segments": len(ds.SegmentSequence)}
    return result


if __name__ == "__main__":
    out_dir = Path(sys.argv[2])
    out_dir.mkdir(parents=True, exist_ok=True)
    print(json.dumps(main(Path(sys.argv[1]), out_dir)))
