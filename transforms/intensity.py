"""Intensity normalisation for U-Net inputs: masked z-score and CT windowing, as MONAI transforms.

What MONAI already does correctly is used as is and not wrapped here:

- z-score over the whole image or over its nonzero voxels: ``monai.transforms.NormalizeIntensity(d)``
  (``nonzero=True``, ``channel_wise=True``; a constant image gives zeros, not NaN);
- percentile clipping + scaling to [0, 1]: ``monai.transforms.ScaleIntensityRangePercentiles(d)``
  (``lower=0.5, upper=99.5, b_min=0, b_max=1, clip=True``; a constant image gives zeros).

Added here: :class:`ZScoreNormalize` (z-score over a *mask*, e.g. a body or brain mask given as another
key, with a safe floor on the standard deviation), :class:`CTWindow` (Hounsfield window given as centre
and width, a preset name or several windows stacked as channels, mapped to [0, 1]) and
:class:`DarkBackground` (inverts images whose background is bright, e.g. bright-field among fluorescence
micrographs, so that one network sees one contrast polarity).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.data.meta_obj import get_track_meta
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends, convert_to_dst_type, convert_to_tensor

__all__ = [
    "CT_WINDOWS",
    "CTWindow",
    "CTWindowd",
    "CTWindowD",
    "CTWindowDict",
    "DarkBackground",
    "DarkBackgroundd",
    "DarkBackgroundD",
    "DarkBackgroundDict",
    "ZScoreNormalize",
    "ZScoreNormalized",
    "ZScoreNormalizeD",
    "ZScoreNormalizeDict",
]

#: Common radiology windows as (centre, width) in Hounsfield units.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),
    "stroke": (40.0, 40.0),
    "soft_tissue": (50.0, 400.0),
    "abdomen": (50.0, 400.0),
    "mediastinum": (50.0, 350.0),
    "liver": (30.0, 150.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
}


def _float(img: torch.Tensor) -> torch.Tensor:
    return img if img.dtype.is_floating_point else img.to(torch.float32)


class ZScoreNormalize(Transform):
    """Z-score normalisation ``(x - mean) / std`` with statistics over a region (nnU-Net's
    ``use_mask_for_norm``): the whole image, its nonzero voxels, or a mask.

    Args:
        nonzero: statistics over the nonzero voxels (of each channel) when no mask is given.
        channel_wise: statistics per channel (else over all channels).
        eps: a standard deviation below ``eps`` (constant region) is replaced by 1, so a constant image
            becomes zeros instead of NaN/inf; an empty region leaves the image unchanged.
        outside: value written outside the region (``None`` keeps the original values there; the default 0
            is the region's mean after normalisation).

    ``__call__(img, mask=None)``: ``mask`` broadcastable to ``img`` (``(1, *spatial)`` or ``(C, *spatial)``),
    nonzero = inside. Integer input gives float32 output; metadata is kept.
    """

    backend = [TransformBackends.TORCH]

    def __init__(
        self, nonzero: bool = False, channel_wise: bool = True, eps: float = 1e-8, outside: float | None = 0.0
    ) -> None:
        self.nonzero = nonzero
        self.channel_wise = channel_wise
        self.eps = eps
        self.outside = outside

    def __call__(self, img: NdarrayOrTensor, mask: NdarrayOrTensor | None = None) -> NdarrayOrTensor:
        img_t = convert_to_tensor(img, track_meta=get_track_meta())
        x = _float(img_t.as_tensor() if hasattr(img_t, "as_tensor") else img_t)
        if mask is not None:
            m = convert_to_tensor(mask, track_meta=False, device=x.device) != 0
            try:
                region = torch.broadcast_to(m, x.shape)
            except RuntimeError as e:
                raise ValueError(
                    f"mask of shape {tuple(m.shape)} does not broadcast to image {tuple(x.shape)}."
                ) from e
        elif self.nonzero:
            region = x != 0
        else:
            region = None
        groups = [slice(c, c + 1) for c in range(x.shape[0])] if self.channel_wise else [slice(None)]
        out = x.clone()
        for sl in groups:
            xs = x[sl]
            if region is None:
                vals = xs.reshape(-1)
            else:
                vals = xs[region[sl]]
            if vals.numel() == 0:
                continue
            v64 = vals.to(torch.float64)
            mean = v64.mean()
            std = v64.std(unbiased=False)
            std = torch.where(std < self.eps, torch.ones_like(std), std)
            normed = (xs - mean.to(x.dtype)) / std.to(x.dtype)
            if region is None:
                out[sl] = normed
            elif self.outside is None:
                out[sl] = torch.where(region[sl], normed, xs)
            else:
                out[sl] = torch.where(
                    region[sl], normed, torch.as_tensor(self.outside, dtype=x.dtype, device=x.device)
                )
        return convert_to_dst_type(out, dst=img_t, dtype=out.dtype)[0]


class ZScoreNormalized(MapTransform):
    """Dictionary twin of :class:`ZScoreNormalize`; ``mask_key`` names the region mask (e.g. a brain or
    body mask), otherwise ``nonzero`` or the whole image is used."""

    backend = ZScoreNormalize.backend

    def __init__(
        self,
        keys: KeysCollection,
        mask_key: Hashable | None = None,
        nonzero: bool = False,
        channel_wise: bool = True,
        eps: float = 1e-8,
        outside: float | None = 0.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mask_key = mask_key
        self.normalizer = ZScoreNormalize(
            nonzero=nonzero, channel_wise=channel_wise, eps=eps, outside=outside
        )

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        mask = None
        if self.mask_key is not None:
            if self.mask_key not in d:
                raise KeyError(f"mask_key {self.mask_key!r} not in the data (keys: {list(d)}).")
            mask = d[self.mask_key]
        for key in self.key_iterator(d):
            d[key] = self.normalizer(d[key], mask)
        return d


def _resolve_windows(
    window: str | tuple[float, float] | Sequence[str | tuple[float, float]] | None,
    center: float | None,
    width: float | None,
    a_min: float | None,
    a_max: float | None,
) -> list[tuple[float, float]]:
    """Windows as (low, high) HU bounds."""
    given = [
        window is not None,
        center is not None or width is not None,
        a_min is not None or a_max is not None,
    ]
    if sum(given) != 1:
        raise ValueError(
            "give exactly one of: window (preset name or (center, width)), center+width, a_min+a_max."
        )
    if given[2]:
        if a_min is None or a_max is None:
            raise ValueError("a_min and a_max must be given together.")
        pairs = [(float(a_min), float(a_max))]
    else:
        if given[1]:
            if center is None or width is None:
                raise ValueError("center and width must be given together.")
            items: list = [(center, width)]
        elif isinstance(window, str) or (
            isinstance(window, Sequence)
            and len(window) == 2
            and all(isinstance(v, (int, float)) for v in window)
        ):
            items = [window]
        else:
            items = list(window)  # type: ignore[arg-type]
        pairs = []
        for item in items:
            if isinstance(item, str):
                if item.lower() not in CT_WINDOWS:
                    raise ValueError(f"unknown CT window {item!r}; presets: {sorted(CT_WINDOWS)}.")
                item = CT_WINDOWS[item.lower()]
            c, w = (float(v) for v in item)
            pairs.append((c - w / 2.0, c + w / 2.0))
    for lo, hi in pairs:
        if not hi > lo:
            raise ValueError(f"CT window must have positive width, got [{lo}, {hi}] HU.")
    return pairs


class CTWindow(Transform):
    """CT windowing: clip Hounsfield units to a window and map it linearly to [0, 1].

    Give the window as ``window="lung"`` (a :data:`CT_WINDOWS` preset), ``window=(center, width)``,
    ``center=..., width=...`` or ``a_min=..., a_max=...``. Several windows (``window=["brain", "bone"]``)
    are stacked along the channel axis (channels of window 1, then of window 2, ...), a common multi-window
    input. Output float32 (float64 stays float64); metadata is kept. Equivalent, for one window, to MONAI's
    ``ScaleIntensityRange(a_min, a_max, 0, 1, clip=True)`` (done here in one clamp + affine pass).
    """

    backend = [TransformBackends.TORCH]

    def __init__(
        self,
        window: str | tuple[float, float] | Sequence[str | tuple[float, float]] | None = None,
        center: float | None = None,
        width: float | None = None,
        a_min: float | None = None,
        a_max: float | None = None,
        clip: bool = True,
    ) -> None:
        self.windows = _resolve_windows(window, center, width, a_min, a_max)
        self.clip = clip

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        img_t = convert_to_tensor(img, track_meta=get_track_meta())
        x = _float(img_t.as_tensor() if hasattr(img_t, "as_tensor") else img_t)
        outs = []
        for lo, hi in self.windows:
            y = x.clamp(lo, hi) if self.clip else x
            outs.append((y - lo) * (1.0 / (hi - lo)))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
        return convert_to_dst_type(out, dst=img_t, dtype=out.dtype)[0]


class CTWindowd(MapTransform):
    """Dictionary twin of :class:`CTWindow` (same window for every key)."""

    backend = CTWindow.backend

    def __init__(
        self,
        keys: KeysCollection,
        window: str | tuple[float, float] | Sequence[str | tuple[float, float]] | None = None,
        center: float | None = None,
        width: float | None = None,
        a_min: float | None = None,
        a_max: float | None = None,
        clip: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.windower = CTWindow(
            window=window, center=center, width=width, a_min=a_min, a_max=a_max, clip=clip
        )

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.windower(d[key])
        return d


ZScoreNormalizeD = ZScoreNormalizeDict = ZScoreNormalized
CTWindowD = CTWindowDict = CTWindowd


class DarkBackground(Transform):
    """Invert an image whose background is bright, so that objects are bright on a dark background.

    The background is taken to be the bulk of the pixels: an image is inverted (``x -> min + max - x``, the
    range kept) when its median lies in the upper half of its ``[lower, upper]`` percentile range. Objects
    that cover most of the image would flip this decision; the transform is meant for sparse objects such as
    nuclei, where fluorescence (dark background) and bright-field (bright background) images are mixed.
    Decided per channel; metadata is kept; ``inverted`` holds the last decisions.
    """

    backend = [TransformBackends.TORCH]

    def __init__(self, lower: float = 1.0, upper: float = 99.0) -> None:
        if not 0.0 <= lower < upper <= 100.0:
            raise ValueError(f"need 0 <= lower < upper <= 100, got {lower}, {upper}")
        self.lower = lower
        self.upper = upper
        self.inverted: list[bool] = []

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        img_t = convert_to_tensor(img, track_meta=get_track_meta())
        x = _float(img_t.as_tensor() if hasattr(img_t, "as_tensor") else img_t)
        out = x.clone()
        self.inverted = []
        q = torch.tensor([self.lower / 100, 0.5, self.upper / 100], dtype=torch.float64, device=x.device)
        for c in range(x.shape[0]):
            vals = x[c].reshape(-1)
            if vals.numel() > 1 << 24:  # torch.quantile's size limit; a strided subsample is enough
                vals = vals[:: vals.numel() // (1 << 24) + 1]
            vals = vals.to(torch.float64)
            lo, med, hi = torch.quantile(vals, q).tolist()
            flip = hi > lo and med > (lo + hi) / 2
            self.inverted.append(bool(flip))
            if flip:
                out[c] = x[c].min() + x[c].max() - x[c]
        return convert_to_dst_type(out, dst=img_t, dtype=out.dtype)[0]


class DarkBackgroundd(MapTransform):
    """Dictionary twin of :class:`DarkBackground`."""

    backend = DarkBackground.backend

    def __init__(
        self, keys: KeysCollection, lower: float = 1.0, upper: float = 99.0, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = DarkBackground(lower, upper)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key])
        return d


DarkBackgroundD = DarkBackgroundDict = DarkBackgroundd
