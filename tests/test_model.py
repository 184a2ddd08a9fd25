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
    p, o, _ = model.online_forward(v1, b1)
    z, t = model.target_forward(v2, b2)
    assert p.shape == z.shape == (B, 16) and o.shape == t.shape == (B, K, 16)
    assert p.requires_grad and o.requires_grad and not z.requires_grad and not t.requires_grad
    if mode == "crop":
        assert model.online.instance_crops(v1, b1).shape == (B * K, 3, CROP, CROP)
    out = model(v1, v2, b1, b2)
    assert set(out) == {"scene", "scene_instance", "instance", "total", "z_std"}
    assert all(torch.isfinite(v) and v.dim() == 0 for v in out.values())
    assert out["total"].item() == pytest.approx(
        sum(out[k].item() for k in ("scene", "scene_instance", "instance")), abs=1e-5
    )


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
    for po, pt in zip(model.online.parameters(), model.target.parameters(), strict=True):
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
    for old, th, new in zip(before_t, online, model.target.parameters(), strict=True):
        assert torch.allclose(new, 0.9 * old + 0.1 * th, atol=1e-6)
    for bo, bt in zip(model.online.buffers(), model.target.buffers(), strict=True):
        assert torch.equal(bo, bt)
    update_target(model, 0.0)  # tau 0: the target becomes the online branch
    assert all(torch.equal(po, pt) for po, pt in zip(model.online.parameters(), model.target.parameters(), strict=True))


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
    assert any(not torch.equal(a, b) for a, b in zip(online_before, model.online.parameters(), strict=True))
    assert not torch.equal(linear_before, model.linear.weight)
    assert all(torch.equal(a, b) for a, b in zip(target_before, model.target.parameters(), strict=True))


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


# ---- wiring: which output meets which (docs/method.md, "Losses") ----------------------------------------------------
def crops_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, K, 3, CROP, CROP, generator=g), torch.randn(B, K, 3, CROP, CROP, generator=g)


def branches(model, v1, v2, b1, b2, c1=None, c2=None):
    p1, o1, y1 = model.online_forward(v1, b1, c1)
    p2, o2, y2 = model.online_forward(v2, b2, c2)
    z1, t1 = model.target_forward(v1, b1, c1)
    z2, t2 = model.target_forward(v2, b2, c2)
    return p1, o1, y1, p2, o2, y2, z1, t1, z2, t2


@pytest.mark.parametrize("with_crops", [False, True])
def test_forward_pairs_each_online_view_with_the_other_target_view(with_crops):
    """scene: p1-z2 and p2-z1; instance OT: o1 with t2 and o2 with t1; both values change when t1/t2 (z1/z2) swap.
    The OT masses use the online PREDICTIONS (f_o = p) and target projections (f_t = z)."""
    from train.losses import byol_loss, instance_ot_loss

    model = make(seed=8)
    v1, v2, b1, b2 = batch(6)
    c1, c2 = crops_batch(1) if with_crops else (None, None)
    out = model(v1, v2, b1, b2, crops1=c1, crops2=c2)
    p1, o1, y1, p2, o2, y2, z1, t1, z2, t2 = branches(model, v1, v2, b1, b2, c1, c2)
    f_o, f_t = torch.stack([p1, p2], 1), torch.stack([z1, z2], 1)
    eps, iters = model.cfg.ot_eps, model.cfg.ot_iters
    right = instance_ot_loss(o1, t2, f_o, f_t, eps, iters) + instance_ot_loss(o2, t1, f_o, f_t, eps, iters)
    swapped = instance_ot_loss(o1, t1, f_o, f_t, eps, iters) + instance_ot_loss(o2, t2, f_o, f_t, eps, iters)
    f_y = torch.stack([y1, y2], 1)  # projections instead of predictions
    projections = instance_ot_loss(o1, t2, f_y, f_t, eps, iters) + instance_ot_loss(o2, t1, f_y, f_t, eps, iters)
    assert out["instance"].item() == pytest.approx(right.item(), abs=1e-6)
    assert abs(right.item() - swapped.item()) > 1e-3
    assert abs(right.item() - projections.item()) > 1e-6
    scene = byol_loss(p1, z2) + byol_loss(p2, z1)
    assert out["scene"].item() == pytest.approx(scene.item(), abs=1e-6)
    assert abs(scene.item() - (byol_loss(p1, z1) + byol_loss(p2, z2)).item()) > 1e-3


def test_crops_from_the_pipeline_replace_the_view_cut():
    """Given crops, the instances are the crops' features (the boxes only matter without them)."""
    model = make(seed=9)
    v1, v2, b1, b2 = batch(7)
    c1, c2 = crops_batch(2)
    _, o_crops, _ = model.online_forward(v1, b1, c1)
    _, o_other_boxes, _ = model.online_forward(v1, b2, c1)
    _, o_view, _ = model.online_forward(v1, b1)
    assert torch.allclose(o_crops, o_other_boxes) and not torch.allclose(o_crops, o_view, atol=1e-3)


def test_gradients_reach_online_predictor_and_linear_never_the_target():
    model = make(seed=10)
    out = model(*batch(8), crops1=crops_batch(3)[0], crops2=crops_batch(3)[1])
    out["total"].backward()
    for name, module in (("online", model.online), ("predictor", model.predictor), ("linear", model.linear)):
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads), name
        assert sum(g.abs().sum().item() for g in grads) > 0, name
    assert all(p.grad is None for p in model.target.parameters())
    assert not out["z_std"].requires_grad


def test_collapse_signal():
    from train.model import embedding_std

    d = 256
    spread = embedding_std(torch.randn(4096, d))
    assert spread.item() == pytest.approx(1 / d**0.5, rel=0.05)
    assert embedding_std(torch.randn(1, d).expand(64, d) + 1e-7 * torch.randn(64, d)).item() < 1e-5
    # a network whose projector outputs a constant (collapsed): the signal its forward reports is ~0
    model = make(seed=11)
    with torch.no_grad():
        model.online.projector[-1].weight.zero_()
        model.online.projector[-1].bias.normal_()
    assert model(*batch(9))["z_std"].item() < 1e-6
    assert make(seed=11)(*batch(9))["z_std"].item() > 0.1 / 16**0.5  # D = 16 in these tiny models
