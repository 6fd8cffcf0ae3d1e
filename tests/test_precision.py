"""medseg.precision: choosing bf16 / channels-last where the hardware computes them natively, and what the
choice does to outputs (channels-last: fp32 rounding only; bf16: masks of a trained model barely move)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import medseg.precision as mp
from medseg.inferers import MixedPrecisionInferer, OverlapTileInferer
from medseg.networks import UNet
from medseg.precision import Precision, cpu_bf16_support, prepare_network, resolve_precision

REPO = Path(__file__).resolve().parent.parent
NUCLEI = REPO / "sample_data" / "nuclei_2d"

torch.set_num_threads(2)


@pytest.fixture
def bf16_cpu(monkeypatch: pytest.MonkeyPatch):
    """Set the CPU's bf16 support by ``MEDSEG_CPU_BF16`` (``"1"``/``"0"``) or leave it detected (None)."""

    def force(value: str | None) -> None:
        if value is None:
            monkeypatch.delenv(mp.ENV_CPU_BF16, raising=False)
        else:
            monkeypatch.setenv(mp.ENV_CPU_BF16, value)
        cpu_bf16_support.cache_clear()

    yield force
    cpu_bf16_support.cache_clear()


# ------------------------------------------------------------------------------------------ selection
def test_auto_on_cpu_with_forced_support(bf16_cpu) -> None:
    bf16_cpu("1")
    plan = resolve_precision("auto", "cpu")
    assert plan == Precision("bf16", "cpu", True)
    assert plan.dtype == torch.bfloat16 and not plan.grad_scaling
    assert "forced" in cpu_bf16_support()[1]


def test_auto_without_support_is_the_fp32_plan(bf16_cpu) -> None:
    """On a CPU without native bf16, ``auto`` is exactly what ``fp32`` is (so never slower than it)."""
    bf16_cpu("0")
    fp32 = Precision("fp32", "cpu", True)
    assert resolve_precision("auto", "cpu") == resolve_precision("fp32", "cpu") == fp32
    assert resolve_precision("auto", "cpu").dtype is None
    # fp32: channels-last for 2D only (oneDNN's fp32 3D convolutions are faster contiguous)
    assert fp32.memory_format(4) == torch.channels_last and fp32.memory_format(5) is None
    assert Precision("bf16", "cpu", True).memory_format(5) == torch.channels_last_3d


def test_explicit_choices_and_aliases(bf16_cpu, caplog: pytest.LogCaptureFixture) -> None:
    bf16_cpu("0")
    with caplog.at_level(logging.WARNING, logger="medseg.precision"):
        assert resolve_precision("bfloat16", "cpu").name == "bf16"  # honoured, with a warning
    assert "emulates bf16" in caplog.text
    assert resolve_precision("float32", "cpu").name == "fp32"
    assert resolve_precision("half", torch.device("cpu")).name == "fp16"
    assert resolve_precision("fp32", "cpu", channels_last=False) == Precision("fp32", "cpu", False)
    plan = Precision("bf16", "cpu", True)
    assert resolve_precision(plan, "cuda") is plan  # an already resolved plan passes through
    with pytest.raises(ValueError, match="unknown precision 'int8'"):
        resolve_precision("int8")
    with pytest.raises(ValueError, match="unknown precision"):
        OverlapTileInferer(64, precision="fp64")


def test_detection_needs_torch_report_and_probe(bf16_cpu, monkeypatch: pytest.MonkeyPatch) -> None:
    bf16_cpu(None)
    monkeypatch.setattr(mp, "_cpu_flags", lambda: None)  # no /proc/cpuinfo: the timed probe decides
    monkeypatch.setattr(mp, "_probe_cpu_bf16", lambda: (False, "probe: bf16 convolution 0.9x"))
    assert not cpu_bf16_support()[0]  # torch's report alone is not enough
    assert resolve_precision("auto", "cpu").name == "fp32"
    cpu_bf16_support.cache_clear()
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    monkeypatch.setattr(mp, "_probe_cpu_bf16", lambda: pytest.fail("probe run without oneDNN"))
    assert cpu_bf16_support() == (False, "oneDNN (mkldnn) is not available in this torch build")


def test_cpu_flags_rule_out_and_the_probe_confirms(bf16_cpu, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the ``avx512_bf16`` / ``amx_bf16`` flags bf16 is emulated: no timing. With them the timed
    probe decides, since the instructions alone do not make oneDNN's bf16 convolutions faster."""
    if "AVX512" not in torch.backends.cpu.get_cpu_capability().upper():
        pytest.skip("needs an AVX-512 CPU (torch reports bf16 support only there)")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
    bf16_cpu(None)
    monkeypatch.setattr(mp, "_cpu_flags", lambda: {"avx512f"})
    monkeypatch.setattr(mp, "_probe_cpu_bf16", lambda: pytest.fail("timed probe run without bf16 flags"))
    assert cpu_bf16_support() == (False, f"CPU capability {torch.backends.cpu.get_cpu_capability()}; "
                                  "no avx512_bf16/amx_bf16 CPU flag")  # fmt: skip
    for flags in ({"avx512f", "avx512_bf16"}, {"amx_bf16"}):
        for fast in (True, False):
            bf16_cpu(None)
            monkeypatch.setattr(mp, "_cpu_flags", lambda f=flags: set(f))
            ratio = "2.5x" if fast else "0.5x"
            probe = (fast, f"probe: bf16 convolution {ratio}")
            monkeypatch.setattr(mp, "_probe_cpu_bf16", lambda p=probe: p)
            ok, reason = cpu_bf16_support()
            assert ok is fast and sorted(flags - {"avx512f"})[0] in reason and ratio in reason
            assert resolve_precision("auto", "cpu").name == ("bf16" if fast else "fp32")
    real = mp._cpu_flags()
    assert real is None or isinstance(real, set)


def test_probe_runs_and_reports_a_speed_ratio() -> None:
    ok, reason = mp._probe_cpu_bf16()
    assert isinstance(ok, bool) and reason.startswith("probe: bf16 convolution ") and reason.endswith("fp32")


def test_cuda_choices_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mp, "_cuda_bf16", lambda dev: True)
    assert resolve_precision("auto", "cuda:0") == Precision("bf16", "cuda", False)
    monkeypatch.setattr(mp, "_cuda_bf16", lambda dev: False)
    plan = resolve_precision("auto", "cuda")
    assert plan == Precision("fp16", "cuda", False) and plan.grad_scaling
    assert resolve_precision("auto", "mps").name == "fp32"


# ------------------------------------------------------------------------------------- channels-last
NETS = {
    "valid 2D (paper)": (lambda: UNet(2, 1, 2, features=8, depth=3), (2, 1, 124, 124)),
    "same 2D + batch norm": (lambda: UNet(2, 1, 1, features=8, depth=3, padding="same", norm="batch"),
                             (2, 1, 64, 48)),
    "same 3D + instance norm": (lambda: UNet(3, 1, 2, features=4, depth=2, padding="same", norm="instance"),
                                (1, 1, 24, 16, 20)),
}  # fmt: skip


@pytest.mark.parametrize("name", list(NETS))
def test_channels_last_equals_contiguous_within_fp32_rounding(name: str) -> None:
    make, shape = NETS[name]
    torch.manual_seed(0)
    net = make().eval()
    x = torch.randn(shape)
    with torch.no_grad():
        ref = net(x)
        layout = Precision("bf16", "cpu", True)  # its layout (channels-last 2D and 3D), computed in fp32 here
        layout.prepare(net)
        fmt = layout.memory_format(len(shape))
        for conv in (m for m in net.modules() if isinstance(m, nn.modules.conv._ConvNd)):
            # explicit channels-last strides, also for the first layer's single input channel
            assert conv.weight.stride() == torch.empty_like(conv.weight, memory_format=fmt).stride()
            assert conv.weight.dtype == torch.float32  # master weights stay fp32
        got = net(layout.format_input(x))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_prepare_network_uses_the_parameters_device(bf16_cpu) -> None:
    bf16_cpu("0")
    net = prepare_network(UNet(2, 1, 2, features=4, depth=2, padding="same"), "auto")
    assert net.encoders[0][2].weight.is_contiguous(memory_format=torch.channels_last)
    # a wrapped network is left alone: its replicas' layout must be set before wrapping
    wrapped = nn.DataParallel(UNet(2, 1, 2, features=4, depth=2, padding="same"))
    Precision("fp32", "cpu", True).prepare(wrapped)
    assert not wrapped.module.encoders[0][2].weight.is_contiguous(memory_format=torch.channels_last)


def test_overlap_tile_bf16_close_to_fp32_and_outputs_float32() -> None:
    """bf16 tiles on CPU: float32 output, the same tiling as fp32, values within bf16 error."""
    torch.manual_seed(1)
    net = UNet(2, 1, 2, features=8, depth=3).eval()
    x = torch.rand(1, 1, 150, 130)
    with torch.no_grad():
        ref = OverlapTileInferer(124, precision="fp32")(x, net)
        got = OverlapTileInferer(124, sw_batch_size=2, precision="bf16", flip_tta=False)(x, net)
        flipped = OverlapTileInferer(124, precision="bf16", flip_tta=True)(x, net)
        flipped_ref = OverlapTileInferer(124, precision="fp32", flip_tta=True)(x, net)
    assert got.dtype == flipped.dtype == torch.float32 and got.shape == ref.shape
    scale = ref.abs().max().item()
    assert (got - ref).abs().max().item() < 0.05 * scale
    assert (flipped - flipped_ref).abs().max().item() < 0.05 * scale


def test_mixed_precision_inferer_trains_fp32_master_weights() -> None:
    """The trainer's inferer: bf16 forward, float32 prediction for the loss, fp32 gradients and weights."""
    torch.manual_seed(2)
    net = UNet(2, 1, 2, features=8, depth=2)
    inferer = MixedPrecisionInferer("bf16")
    x, target = torch.rand(2, 1, 92, 92), torch.randint(0, 2, (2, 52, 52))
    pred = inferer(x, net)
    assert pred.dtype == torch.float32
    assert net.encoders[1][0].weight.is_contiguous(memory_format=torch.channels_last)
    loss = nn.functional.cross_entropy(pred, target)
    loss.backward()
    assert loss.dtype == torch.float32
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
               for p in net.parameters())  # fmt: skip
    out = MixedPrecisionInferer("bf16")(x, lambda t: {"a": t * 2, "b": (t.int(), t)})
    assert out["a"].dtype == torch.float32 and out["b"][0].dtype == torch.int32


def test_mixed_precision_inferer_runs_the_network_on_plain_tensors() -> None:
    """A MetaTensor batch reaches the network as a plain tensor; the prediction equals the plain-tensor
    one, carries the input's metadata and backpropagates."""
    from monai.data import MetaTensor

    torch.manual_seed(3)
    net = UNet(2, 1, 2, features=8, depth=2).eval()
    seen: list[type] = []
    net.register_forward_pre_hook(lambda m, a: seen.append(type(a[0])))
    x = torch.rand(2, 1, 92, 92)
    affine = torch.diag(torch.tensor([2.0, 3.0, 1.0, 1.0]))
    meta = MetaTensor(x.clone(), affine=affine, meta={"filename_or_obj": "a.png"})
    meta.is_batch = True
    inferer = MixedPrecisionInferer("fp32")
    pred = inferer(meta, net)
    assert seen == [torch.Tensor]
    assert isinstance(pred, MetaTensor) and pred.meta["filename_or_obj"] == "a.png" and pred.is_batch
    assert torch.equal(pred.affine, meta.affine)
    torch.testing.assert_close(pred.as_tensor(), inferer(x, net))
    net.train()
    inferer(meta, net).sum().backward()
    assert all(p.grad is not None for p in net.parameters())


# ------------------------------------------------------------------- parity on a trained sample model
def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())


def test_auto_training_saves_an_fp32_state_dict(trained_nuclei: Path) -> None:
    sd = torch.load(trained_nuclei / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert sd and all(v.dtype == torch.float32 for v in sd.values() if v.is_floating_point())
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(trained_nuclei / "configs" / "inference.json"))
    parser.get_parsed_content("network_def").load_state_dict(sd)  # strict


def test_predict_bf16_masks_match_fp32(trained_nuclei: Path, tmp_path: Path) -> None:
    """``medseg predict --precision bf16`` vs ``fp32`` on the sample test images: under 0.5% of the pixels
    differ and Dice against the reference labels moves by under 0.005."""
    import nibabel as nib
    from monai.transforms import LoadImage

    from medseg.data.datalist import load_datalist
    from medseg.predict import BatchPredictor

    items = load_datalist(str(NUCLEI), "test") + load_datalist(str(NUCLEI), "validation")
    # one pass per tile: bf16 is emulated, slowly, on CPUs without it
    configs = [str(trained_nuclei / "configs" / n) for n in ("inference.json", "no_flips.json")]
    masks: dict[str, list[np.ndarray]] = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        p = BatchPredictor.from_bundle(
            trained_nuclei, out, config_file=configs, precision=precision, progress=False
        )
        assert p.precision.name == precision
        rows = p.run([{"image": it["image"]} for it in items])
        assert [r.status for r in rows] == ["ok"] * len(items)
        masks[precision] = [
            np.asarray(nib.load(out / f"{r.id}_seg.nii.gz").dataobj).squeeze() > 0
            for r in sorted(rows, key=lambda r: [Path(it["image"]).stem for it in items].index(r.id))
        ]
    labels = [np.asarray(LoadImage(image_only=True)(it["label"])).squeeze() > 0 for it in items]  # same axes
    for a, b, lab in zip(masks["fp32"], masks["bf16"], labels, strict=True):
        assert a.shape == lab.shape
        assert (a != b).mean() < 0.005
        assert _dice(a, lab) > 0.7, "the model is not trained enough for a parity check"
        assert abs(_dice(a, lab) - _dice(b, lab)) < 0.005


def test_cli_precision_flag_and_report(trained_nuclei: Path, tmp_path: Path) -> None:
    """``medseg predict --precision`` overrides the bundle's setting; the report names what ran."""
    from medseg.cli import main
    from medseg.predict import read_report

    image = sorted((NUCLEI / "images").glob("*.png"))[0]
    out = tmp_path / "out"
    argv = ["predict", "--bundle", str(trained_nuclei), "--input", str(image), "--output", str(out),
            "--no-progress", "--workers", "0"]  # fmt: skip
    assert main([*argv, "--precision", "fp32"]) == 0
    summary, rows = read_report(out / "report.json")
    assert summary["precision"] == "fp32 + channels_last on cpu" and rows[0].status == "ok"
    # another precision is another model key: the finished case is redone, not skipped
    assert main([*argv, "--precision", "bf16"]) == 0
    summary, rows = read_report(out / "report.json")
    assert summary["precision"] == "bf16 autocast + channels_last on cpu" and rows[0].status == "ok"
    with pytest.raises(SystemExit):
        main([*argv, "--precision", "int8"])


def _rank_decision(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        decision = mp._agree_across_ranks(rank == 0)  # only rank 0 finds native bf16
        Path(out, f"rank{rank}").write_text(str(decision))
    finally:
        dist.destroy_process_group()


def test_distributed_ranks_agree_on_bf16(tmp_path: Path) -> None:
    """A busy machine can make one rank's probe differ; DDP needs the same layout on every rank."""
    import torch.multiprocessing as tmp

    tmp.spawn(_rank_decision, args=(f"file://{tmp_path / 'store'}", str(tmp_path)), nprocs=2, join=True)
    assert (tmp_path / "rank0").read_text() == (tmp_path / "rank1").read_text() == "False"
    assert mp._agree_across_ranks(True) is True  # no process group: the local answer
