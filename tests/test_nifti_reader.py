"""NiftiReader (MONAI NibabelReader + one-call gzip inflation + C-ordered arrays) and the gzip codec."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import NibabelReader
from monai.transforms import LoadImage

import medseg.data.gzip_codec as codec
from medseg.data import NiftiReader, ReadError

NIB_DATA = Path(nib.__file__).parent / "tests" / "data"
CT = Path(__file__).resolve().parents[1] / "sample_data" / "ct_3d" / "images"
FILES = [
    CT / "case_000.nii.gz",  # int16 CT, 3-D
    NIB_DATA / "example4d.nii.gz",  # 4-D, scaled
    NIB_DATA / "example_nifti2.nii.gz",  # NIfTI-2 header
    NIB_DATA / "standard.nii.gz",
    NIB_DATA / "anatomical.nii",  # uncompressed: NibabelReader's own path
]
META_KEYS = ("affine", "original_affine", "spatial_shape", "pixdim", "dim", "original_channel_dim")


def _same_meta(a: dict, b: dict) -> None:
    assert a["space"] == b["space"]
    for key in META_KEYS:
        va, vb = np.asarray(a[key], dtype=np.float64), np.asarray(b[key], dtype=np.float64)
        assert va.shape == vb.shape and np.allclose(va, vb, equal_nan=True), key


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
@pytest.mark.parametrize("kwargs", [{}, {"as_closest_canonical": True}, {"channel_dim": "no_channel"}])
def test_equals_monai_nibabel_reader(path: Path, kwargs: dict) -> None:
    ours = LoadImage(reader=NiftiReader(**kwargs), image_only=True)(path)
    ref = LoadImage(reader=NibabelReader(**kwargs), image_only=True)(path)
    assert ours.dtype == ref.dtype and torch.equal(ours.as_tensor(), ref.as_tensor())
    _same_meta(ours.meta, ref.meta)
    assert ours.meta["filename_or_obj"] == ref.meta["filename_or_obj"] == str(path)


def test_3d_arrays_come_c_ordered_and_both_codecs_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    path = CT / "case_001.nii.gz"
    reader = NiftiReader()
    arr, _ = reader.get_data(reader.read(path))
    assert arr.flags.c_contiguous and np.array_equal(arr, np.asanyarray(nib.load(path).dataobj))
    monkeypatch.setattr(codec, "_igzip", None)  # the standard-library fallback
    arr2, _ = reader.get_data(reader.read(path))
    assert np.array_equal(arr, arr2)


def test_bad_files_raise_read_error_naming_the_file(tmp_path: Path) -> None:
    good = (CT / "case_002.nii.gz").read_bytes()
    cases = {
        "truncated.nii.gz": (good[:30000], "truncated gzip stream"),
        "garbage.nii.gz": (b"\x1f\x8bnot really gzip" * 10, "gzip stream"),
        "notnifti.nii.gz": (gzip.compress(b"hello world, no NIfTI header here" * 20), "not a NIfTI-1/2 file"),
        "tiny.nii.gz": (gzip.compress(b"ab"), "not a NIfTI file"),
    }
    for name, (payload, reason) in cases.items():
        path = tmp_path / name
        path.write_bytes(payload)
        with pytest.raises(ReadError, match=reason) as err:
            NiftiReader().read(path)
        assert str(path) in str(err.value)


@pytest.mark.parametrize("isal", [True, False])
def test_gzip_codec_round_trip_is_plain_gzip(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, isal: bool
) -> None:
    if isal and not codec.HAS_ISAL:
        pytest.skip("isal not installed")
    if not isal:
        monkeypatch.setattr(codec, "_igzip", None)

    def inflate(packed: bytes) -> bytes:  # the reader's streamed path
        path = tmp_path / "x.gz"
        path.write_bytes(packed)
        with codec.gzip_open(path) as fh:
            return fh.read()

    data = np.random.default_rng(0).integers(0, 3, 200_000).astype(np.uint8).tobytes()
    for level in (0, 1, 6, 9):
        packed = codec.gzip_compress(data, level)
        assert gzip.decompress(packed) == data and inflate(packed) == data
    two_members = gzip.compress(data) + gzip.compress(b"second member")
    assert inflate(two_members) == data + b"second member"
