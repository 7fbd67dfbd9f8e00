"""EfficientNet-Lite0 backbone: the packaged ImageNet weights load strictly, the three feature maps sit at
strides 4/8/16, the teacher is really pretrained, and a tiny model exports to ONNX with parity."""
import numpy as np
import pytest
import torch

from dcam.backbones import BACKBONES, build_backbone, build_teacher, find_packaged_weights
from dcam.calibrate import calibrate
from dcam.data import load_train_val
from dcam.efficientnet_lite import EfficientNetLite0, Renormalize
from dcam.evaluate import predict
from dcam.export import check_contract, export_onnx, read_metadata, run_onnx
from dcam.config import variant_config
from dcam.constants import IMAGENET_MEAN, IMAGENET_STD
from dcam.torch_model import DistillModel, Normalize
from dcam.train import train

NAME = "efficientnet_lite0"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """On a busy 2-core box, 2 spin-waiting OpenMP threads ran this backbone's many small ops far slower
    than 1 thread (a 2x64x64 forward: 1.4 s vs 5 ms; see --threads in __main__.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def teacher():
    return build_teacher(NAME)


def test_registered():
    assert NAME in BACKBONES


def test_packaged_weights_load_strictly():
    path = find_packaged_weights(NAME)
    assert path.name == "efficientnet-lite0-57934424.pth"
    net = EfficientNetLite0()
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    assert sum(p.numel() for p in net.parameters()) == 4_652_008  # the published Lite0 size


def test_strides_and_channels(teacher):
    student = build_backbone(NAME)
    assert teacher.channels == student.channels == [24, 40, 112]
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        for net in (teacher, student.eval()):
            feats = net(x)
            assert [tuple(f.shape) for f in feats] == [(1, 24, 64, 64), (1, 40, 32, 32), (1, 112, 16, 16)]


def test_teacher_is_pretrained_frozen_and_finite(teacher):
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    torch.manual_seed(0)
    rand = build_backbone(NAME).eval()
    x = Normalize()(torch.randint(0, 256, (2, 128, 128, 3), dtype=torch.uint8))
    with torch.no_grad():
        ft, fr = teacher(x), rand(x)
    for t, r in zip(ft, fr):
        assert torch.isfinite(t).all() and t.abs().sum() > 0
        # not the random init: different activations, and BN statistics that are not the defaults
        assert (t - r).abs().mean() > 0.1 * r.abs().mean()
    bn = teacher.stages[0][1].bn
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))


def test_renormalize_maps_imagenet_to_half():
    """Model.Normalize gives ImageNet-normalised input; the Lite weights expect (x/255 - 0.5) / 0.5."""
    u8 = torch.randint(0, 256, (1, 8, 8, 3), dtype=torch.uint8)
    got = Renormalize(IMAGENET_MEAN, IMAGENET_STD)(Normalize()(u8))
    want = (u8.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    assert torch.allclose(got, want, atol=1e-5)


def test_tiny_export_parity(teacher, mvtec_root, tmp_path):
    s = 64
    tr, va = load_train_val(mvtec_root, ["widget"], s, val_fraction=0.25, seed=0, progress=False)
    model = DistillModel(variant_config("stfpm", input_size=s, backbone=NAME), teacher=teacher)
    info = train(model, tr.images, va.images, epochs=1, batch_size=4, max_steps=1, progress=False, log=lambda *_: None)
    assert np.isfinite(info["history"][0]["train_loss"])
    maps, scores = predict(model, va.images, progress=False)
    path = export_onnx(model, tmp_path / "lite0.onnx", ["widget"], calibrate(scores, va.classes), {}, {})
    assert check_contract(path) == [] and read_metadata(path)["dcam.backbone"] == NAME
    m_ort, s_ort = run_onnx(path, va.images, batch_size=2)
    assert np.abs(s_ort - scores).max() <= 1e-4 and np.abs(m_ort - maps).max() <= 1e-3
