"""BYOL's colour augmentation on a batch of views, on any device, with per-sample random parameters.

``gpu_colour(x, view, generator, cfg)`` is the batched counterpart of ``train.views.cpu_colour``: colour jitter
(brightness, contrast, saturation, hue in a per-sample random order, clamped after each op), grayscale, Gaussian blur
(separable, per-sample sigma, torchvision's sampled kernel and reflect border), solarize, each applied to a sample with
its own probability, then ImageNet normalisation. No Python loop over the batch: cheap ops run on the whole batch with
per-sample factors (a sample that skips one gets its identity factor, or keeps its pixels by ``where``); hue and blur,
the costly ones, run once on the sub-batch that draws them (index lists from the host-side parameters); with
``compiled`` (``--compile``) hue runs on every sample inside torch.compile'd kernels instead.
Random parameters come from ``generator`` on its own device and are then moved to ``x``'s device, so a CPU generator
gives the same augmentation whatever device the batch is on.

Ops take float images in [0, 1], ``[B, 3, H, W]``, and per-sample factors ``[B]``; their formulas are torchvision's
(``torchvision.transforms.v2.functional``), which the tests compare against.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from train.views import ViewConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_GRAY = (0.2989, 0.587, 0.114)  # ITU-R 601 luma weights, as torchvision


def _per_sample(f: torch.Tensor) -> torch.Tensor:
    return f.view(-1, 1, 1, 1)


def to_gray(x: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` -> ``[B, 1, H, W]`` luma."""
    return x[:, 0:1] * _GRAY[0] + x[:, 1:2] * _GRAY[1] + x[:, 2:3] * _GRAY[2]


def brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (x * _per_sample(f)).clamp_(0, 1)


def contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    mean = to_gray(x).mean(dim=(1, 2, 3), keepdim=True)
    f = _per_sample(f)
    return (x * f + mean * (1 - f)).clamp_(0, 1)


def saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    f = _per_sample(f)
    return (x * f + to_gray(x) * (1 - f)).clamp_(0, 1)


def hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Rotate hue by ``f`` turns (in [-0.5, 0.5]) through HSV; saturation and value are kept."""
    r, g, b = x.unbind(1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-12), torch.zeros_like(maxc))
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    # hue in sixths of a turn, from whichever channel is the maximum (r first, then g: torchvision's tie order)
    h = torch.where(maxc == r, ((g - b) / safe) % 6, torch.where(maxc == g, (b - r) / safe + 2, (r - g) / safe + 4))
    h = torch.where(delta > 0, h, torch.zeros_like(h))
    h = (h + 6 * f.view(-1, 1, 1)) % 6
    # HSV -> RGB: channel n in (5, 3, 1) for (R, G, B) is v - v s clamp(min(k, 4 - k), 0, 1), k = (n + h) mod 6
    n = torch.arange(5, 0, -2, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)  # 5, 3, 1: made on the device
    k = (n + h.unsqueeze(1)) % 6
    return maxc.unsqueeze(1) * (1 - s.unsqueeze(1) * torch.minimum(k, 4 - k).clamp(0, 1))


def gaussian_kernels(sigma: torch.Tensor, size: int) -> torch.Tensor:
    """``[B]`` sigmas -> ``[B, size]`` normalised 1-D Gaussians sampled at integer offsets (torchvision's kernel)."""
    half = (size - 1) / 2
    t = torch.linspace(-half, half, size, device=sigma.device, dtype=sigma.dtype)
    k = torch.exp(-0.5 * (t / sigma.view(-1, 1)) ** 2)
    return k / k.sum(dim=1, keepdim=True)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, size: int = 23) -> torch.Tensor:
    """Per-sample separable blur: ``x`` ``[B, C, H, W]``, ``sigma`` ``[B]`` (0 or less: no blur) -> ``[B, C, H, W]``.

    One grouped convolution per axis over ``B*C`` channels, reflect padding. ``size`` is capped so the padding
    stays below the image side (reflect padding needs that)."""
    b, c, hh, ww = x.shape
    size = min(size, 2 * (min(hh, ww) - 1) + 1)
    pad = size // 2
    k = gaussian_kernels(sigma.clamp_min(1e-6).to(x.dtype), size)
    delta = torch.zeros_like(k)
    delta[:, pad] = 1  # the identity kernel: exact copy for samples that are not blurred
    k = torch.where((sigma > 0).view(-1, 1), k, delta)
    k = k.repeat_interleave(c, dim=0)  # [B*C, size]
    y = x.reshape(1, b * c, hh, ww)
    y = F.conv2d(F.pad(y, (pad, pad, 0, 0), mode="reflect"), k.view(b * c, 1, 1, size), groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, pad, pad), mode="reflect"), k.view(b * c, 1, size, 1), groups=b * c)
    return y.view(b, c, hh, ww)


def solarize(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Invert pixels >= ``threshold`` (same scale as ``x``)."""
    return torch.where(x >= threshold, 1 - x, x)


@functools.cache
def _mean_std(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The ImageNet mean and std ``[1, 3, 1, 1]`` on ``device``, made once: a tensor built from host values is a
    blocking host-to-device copy, which would make every training step wait for the device."""
    with torch.inference_mode(False):  # ordinary tensors, even when the first call comes from inference mode
        mean = torch.tensor(IMAGENET_MEAN, device=device, dtype=dtype).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=device, dtype=dtype).view(1, 3, 1, 1)
    return mean, std


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` (0..255) or float (0..1) -> float normalised by the ImageNet mean and std."""
    if x.dtype == torch.uint8:
        x = x.float().div_(255)
    mean, std = _mean_std(x.device, x.dtype)
    return (x - mean) / std


def sample_params(batch: int, view: int, generator: torch.Generator, cfg: ViewConfig) -> dict[str, torch.Tensor]:
    """Per-sample random parameters on ``generator``'s device. Keys: ``jitter``, ``gray``, ``blur``, ``solarize``
    (bool ``[B]``: apply?), ``factors`` ``[B, 4]`` (brightness, contrast, saturation, hue), ``order`` ``[B, 4]``
    (a permutation of 0..3 per sample), ``sigma`` ``[B]``."""
    dev = generator.device

    def u(*shape):
        return torch.rand(*shape, generator=generator, device=dev)

    apply = u(batch, 4)
    bj, cj, sj, hj = cfg.jitter
    lo = torch.tensor([max(0.0, 1 - bj), max(0.0, 1 - cj), max(0.0, 1 - sj), -hj], device=dev)
    hi = torch.tensor([1 + bj, 1 + cj, 1 + sj, hj], device=dev)
    factors = lo + (hi - lo) * u(batch, 4)
    order = u(batch, 4).argsort(dim=1)
    s0, s1 = cfg.blur_sigma
    sigma = s0 + (s1 - s0) * u(batch)
    return {
        "jitter": apply[:, 0] < cfg.jitter_p,
        "gray": apply[:, 1] < cfg.gray_p,
        "blur": apply[:, 2] < cfg.blur_p[view],
        "solarize": apply[:, 3] < cfg.solarize_p[view],
        "factors": factors,
        "order": order,
        "sigma": sigma,
    }


def _affine_step(x: torch.Tensor, op: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Brightness (op 0), contrast (1) or saturation (2) per sample as one fused map
    ``clamp(a x + b gray(x) + c mean(gray(x)))`` with per-sample (a, b, c); any other op: identity (1, 0, 0)."""
    one, zero = torch.ones_like(f), torch.zeros_like(f)
    a = torch.where((op >= 0) & (op <= 2), f, one)
    b = torch.where(op == 2, 1 - f, zero)
    c = torch.where(op == 1, 1 - f, zero)
    g = to_gray(x)
    return (x * _per_sample(a) + g * _per_sample(b) + g.mean(dim=(1, 2, 3), keepdim=True) * _per_sample(c)).clamp_(0, 1)


def _on_subset(x: torch.Tensor, mask: torch.Tensor, fn) -> torch.Tensor:
    """Apply ``fn(x[idx], idx)`` to the samples where ``mask`` (on the parameters' device) holds, in place in ``x``.
    The index list is built where the parameters live: from a CPU generator that costs no device synchronisation,
    and the op runs only on the samples that need it (hue is the costliest op; blur applies to 10 % in view 1)."""
    idx = mask.nonzero().squeeze(1)
    if idx.numel() == 0:
        return x
    idx = idx.to(x.device, non_blocking=True)
    return x.index_copy_(0, idx, fn(x.index_select(0, idx), idx))


def _jitter_and_gray(x: torch.Tensor, p: dict[str, torch.Tensor], host: dict[str, torch.Tensor] | None) -> torch.Tensor:
    """Colour jitter (per-sample order) then grayscale: uint8 or float ``x`` -> a float32 copy in [0, 1].

    ``host`` (the parameters where the generator made them): hue runs on the sub-batch that draws it at each position
    (index lists, eager). None: hue runs on every sample and ``where`` keeps it where drawn: the same numbers with
    static shapes, which torch.compile fuses into the pointwise chain (``_compiled``)."""
    # a float32 copy we own (the in-place steps below must not touch the caller's tensor)
    x = x.float().div_(255) if x.dtype == torch.uint8 else x.to(torch.float32, copy=True)
    for pos in range(4):
        # at position pos each sample runs its op order[:, pos]
        op = torch.where(p["jitter"], p["order"][:, pos], torch.full_like(p["order"][:, pos], -1))
        f = p["factors"].gather(1, p["order"][:, pos : pos + 1]).squeeze(1)
        x = _affine_step(x, op, f)
        if host is None:
            drawn = p["jitter"] & (p["order"][:, pos] == 3)
            x = torch.where(_per_sample(drawn), hue(x, p["factors"][:, 3]), x)
        else:
            hue_mask = host["jitter"] & (host["order"][:, pos] == 3)
            x = _on_subset(x, hue_mask, lambda xs, idx: hue(xs, p["factors"][idx, 3]))
    return torch.where(_per_sample(p["gray"]), to_gray(x).expand_as(x), x)


def _solarize_and_normalize(
    x: torch.Tensor, p: dict[str, torch.Tensor], threshold: float, mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    return (torch.where(_per_sample(p["solarize"]), solarize(x, threshold), x) - mean) / std


@functools.cache
def _compiled() -> tuple:
    """torch.compile'd jitter + grayscale and solarize + normalisation (made once per process; static shapes: one
    graph for the views' size and one for the instances'). Default mode, never CUDA graphs: the four calls of a step
    (two views, two instance sets) would replay one graph over each other's outputs."""
    return (
        torch.compile(functools.partial(_jitter_and_gray, host=None), dynamic=False),
        torch.compile(_solarize_and_normalize, dynamic=False),
    )


def gpu_colour(
    x: torch.Tensor,
    view: int,
    generator: torch.Generator | None = None,
    cfg: ViewConfig | None = None,
    params: dict[str, torch.Tensor] | None = None,
    compiled: bool = False,
) -> torch.Tensor:
    """BYOL colour augmentation of view index ``view`` (0 or 1: asymmetric blur/solarize probabilities) on a batch.

    x: uint8 (0..255) or float (0..1) ``[B, 3, H, W]`` on any device -> float32 ``[B, 3, H, W]`` normalised by the
    ImageNet mean/std. ``params`` (from ``sample_params``) overrides the random draw. Use a CPU generator: the
    per-sample choices then stay on the host and the batch is processed without device synchronisations.

    ``compiled`` (``--compile``): the pointwise chains before and after the blur run as torch.compile'd kernels (hue
    on every sample, kept where drawn; a few fused kernels instead of ~440 eager operations, dozens of them passes
    over the batch); the blur stays an eager grouped convolution on the sub-batch that draws it. Same numbers up to
    float rounding."""
    cfg = cfg or ViewConfig()
    if view not in (0, 1):
        raise ValueError(f"view must be 0 or 1, got {view}")
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected [B, 3, H, W] images, got shape {tuple(x.shape)}")
    if params is None:
        if generator is None:
            raise ValueError("gpu_colour needs a torch.Generator (or params)")
        params = sample_params(x.shape[0], view, generator, cfg)
    host = params  # masks for index lists, where the generator made them
    p = {k: v.to(x.device, non_blocking=True) for k, v in params.items()}
    mean, std = _mean_std(x.device, torch.float32)
    if compiled:
        jitter_and_gray, solarize_and_normalize = _compiled()
        x = jitter_and_gray(x, p)
    else:
        jitter_and_gray, solarize_and_normalize = _jitter_and_gray, _solarize_and_normalize
        x = jitter_and_gray(x, p, host)
    x = _on_subset(x, host["blur"], lambda xs, idx: gaussian_blur(xs, p["sigma"][idx], cfg.blur_kernel))
    return solarize_and_normalize(x, p, cfg.solarize_threshold / 255, mean, std)
