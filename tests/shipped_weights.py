"""The check every bundle's shipped weights pass (imported by the bundles' test modules)."""

from __future__ import annotations

from pathlib import Path

import torch


def assert_fp16_weights_load_strictly(bundle: Path, max_mib: float = 5) -> None:
    """``models/model.pt`` is an fp16 state dict of at most ``max_mib`` MiB that loads strictly (every key,
    every shape) into the bundle's ``network_def``, whose parameters stay fp32."""
    from monai.bundle import ConfigParser

    path = bundle / "models" / "model.pt"
    assert path.stat().st_size <= max_mib * 2**20  # stored as fp16 to keep the repository small
    sd = torch.load(path, map_location="cpu", weights_only=True)
    assert all(v.dtype == torch.float16 for v in sd.values() if v.is_floating_point())
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(sd)  # strict=True: every key, every shape
    assert all(p.dtype == torch.float32 for p in net.parameters())  # computed with fp32 master weights
