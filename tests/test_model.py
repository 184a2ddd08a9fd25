"""train.model: shapes, the target branch, the EMA update, loss terms and weights. Tiny ResNet-18 on 64 px views."""

import pytest
import torch

from train.model import MLP, ModelConfig, ResNetEncoder, UniVIP, boxes_to_rois, update_target

B, K, S, CROP = 2, 3, 64, 32


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def tiny(**kw) -> ModelConfig:
    base = dict(arch="resnet18", proj_hidden=32, proj_dim=16, pred_hidden=32, k=K, instance_size=CROP)
    return ModelConfig(**{**base, **kw})


def make(seed=0, **kw) -> UniVIP:
    torch.manual_seed(seed)
    return UniVIP(tiny(**kw))


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    v1, v2 = torch.randn(B, 3, S, S, generator=g), torch.randn(B, 3, S, S, generator=g)
    xy = torch.rand(B, K, 2, generator=g) * (S - 20)
    wh = 8 + torch.rand(B, K, 2, generator=g) * 12
    boxes1 = torch.cat([xy, xy + wh], dim=-1)
    return v1, v2, boxes1, boxes1.flip(0) * 0.5 + 4  # any valid boxes will do for view 2


@pytest.mark.parametrize("mode", ["crop", "roi"])
def test_shapes_and_finite_losses(mode):
    model = make(instance_mode=mode)
    v1, v2, b1, b2 = batch()
    p, o = model.online_forward(v1, b1)
    z, t = model.target_forward(v2, b2)
    assert p.shape == z.shape == (B, 16) and o.shape == t.shape == (B, K, 16)
    assert p.requires_grad and o.requires_grad and not z.requires_grad and not t.requires_grad
    if mode == "crop":
        assert model.online.instance_crops(v1, b1).shape == (B * K, 3, CROP, CROP)
    out = model(v1, v2, b1, b2)
    assert set(out) == {"scene", "scene_instance", "instance", "total"}
    assert all(torch.isfinite(v) and v.dim() == 0 for v in out.values())
    assert out["total"].item() == pytest.approx(sum(out[k].item() for k in ("scene", "scene_instance", "instance")),
                                                abs=1e-5)


def test_encoder_dims_and_mlp():
    enc = ResNetEncoder("resnet18")
    x = torch.randn(2, 3, 64, 64)
    assert enc(x).shape == (2, 512) and enc.feature_map(x).shape == (2, 512, 2, 2)
    assert torch.allclose(enc(x), enc.feature_map(x).mean((2, 3)), atol=1e-5)
    assert not hasattr(enc.net.fc, "weight")  # the classifier is gone
    assert [type(m).__name__ for m in MLP(8, 16, 4)] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]


def test_rois_and_crop_content():
    boxes = torch.tensor([[[0.0, 0, 4, 4], [2, 2, 6, 8]], [[1, 1, 3, 3], [0, 0, 8, 8]]])
    rois = boxes_to_rois(boxes)
    assert rois[:, 0].tolist() == [0, 0, 1, 1] and torch.equal(rois[:, 1:], boxes.reshape(4, 4))
    # A crop of a constant-colour rectangle is that colour: box m really cuts box m out of view b.
    view = torch.zeros(2, 3, 16, 16)
    view[1, :, 4:12, 2:10] = 1.0
    model = make(instance_size=8)
    crops = model.online.instance_crops(view, torch.tensor([[[4.0, 4, 8, 8]], [[2.0, 4, 10, 12]]]))
    assert torch.allclose(crops[0], torch.zeros(3, 8, 8)) and torch.allclose(crops[1], torch.ones(3, 8, 8))


def test_target_is_frozen_copy():
    model = make()
    assert all(not p.requires_grad for p in model.target.parameters())
    for po, pt in zip(model.online.parameters(), model.target.parameters()):
        assert torch.equal(po, pt) and po.data_ptr() != pt.data_ptr()


def test_ema_update_moves_target_by_the_right_amount():
    model = make()
    with torch.no_grad():
        for p in model.online.parameters():
            p.add_(torch.randn_like(p))
        for buf in model.online.buffers():
            if buf.is_floating_point():
                buf.add_(1.0)
    before_t = [p.clone() for p in model.target.parameters()]
    online = [p.clone() for p in model.online.parameters()]
    update_target(model, 0.9)
    for old, th, new in zip(before_t, online, model.target.parameters()):
        assert torch.allclose(new, 0.9 * old + 0.1 * th, atol=1e-6)
    for bo, bt in zip(model.online.buffers(), model.target.buffers()):
        assert torch.equal(bo, bt)
    update_target(model, 0.0)  # momentum 0: the target becomes the online branch
    assert all(torch.equal(po, pt) for po, pt in zip(model.online.parameters(), model.target.parameters()))


def test_byol_method_is_scene_only():
    v1, v2, b1, b2 = batch(1)
    byol, univip = make(seed=3, method="byol"), make(seed=3)
    assert byol.linear is None
    out_b = byol(v1, v2, b1, b2)
    out_u = univip(v1, v2, b1, b2, weights={"scene": 1.0, "scene_instance": 0.0, "instance": 0.0})
    assert out_b["scene_instance"].item() == out_b["instance"].item() == 0.0
    assert out_b["total"].item() == pytest.approx(out_b["scene"].item(), abs=1e-6)
    assert out_b["total"].item() == pytest.approx(out_u["total"].item(), abs=1e-6)
    with pytest.raises(ValueError, match="byol"):
        byol(v1, v2, b1, b2, weights={"scene": 1, "scene_instance": 1})


def test_weights_scale_terms():
    v1, v2, b1, b2 = batch(2)
    model = make(seed=4)
    full = model(v1, v2, b1, b2)
    half = model(v1, v2, b1, b2, weights={"scene": 0.5, "scene_instance": 2.0, "instance": 0.0})
    assert half["instance"].item() == 0.0
    want = 0.5 * full["scene"].item() + 2.0 * full["scene_instance"].item()
    assert half["total"].item() == pytest.approx(want, abs=1e-5)


def test_sgd_step_changes_online_not_target():
    model = make(seed=5)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    online_before = [p.clone() for p in model.online.parameters()]
    target_before = [p.clone() for p in model.target.parameters()]
    linear_before = model.linear.weight.clone()
    out = model(*batch(3))
    out["total"].backward()
    assert all(p.grad is None for p in model.target.parameters())
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(online_before, model.online.parameters()))
    assert not torch.equal(linear_before, model.linear.weight)
    assert all(torch.equal(a, b) for a, b in zip(target_before, model.target.parameters()))


def test_channels_last_and_syncbn_conversion_keep_results():
    v1, v2, b1, b2 = batch(4)
    model = make(seed=6)
    ref = model(v1, v2, b1, b2)["total"].item()
    model = model.to(memory_format=torch.channels_last)
    assert model(v1, v2, b1, b2)["total"].item() == pytest.approx(ref, abs=1e-4)
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(make(seed=6))
    shapes = lambda m: [p.shape for p in m.parameters()]  # noqa: E731
    assert shapes(synced.online) == shapes(synced.target)  # update_target still pairs them
    update_target(synced, 0.99)


def test_bf16_autocast_forward():
    model = make(seed=7, instance_mode="roi")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(*batch(5))
    assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in out.values())


def test_config_errors():
    with pytest.raises(ValueError, match="instance_mode"):
        ModelConfig(instance_mode="mask")
    with pytest.raises(ValueError, match="arch"):
        ModelConfig(arch="vit")
