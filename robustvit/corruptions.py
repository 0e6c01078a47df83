"""ImageNet-C style corruptions (Hendrycks & Dietterich, 2019) for image batches in ``[0, 1]``.

Every corruption maps a batch ``(B, C, H, W)`` and a severity in ``1..5`` to a batch of the same shape,
dtype and device, clipped to ``[0, 1]``. Random corruptions draw from the given ``torch.Generator``, so
a seeded generator makes them reproducible. Severity tables follow ImageNet-C and sit next to each function.

Example:
    >>> import torch
    >>> from robustvit.corruptions import corrupt, corruption_names
    >>> images = torch.rand(8, 3, 32, 32)
    >>> noisy = corrupt(images, "gaussian_noise", severity=3, generator=torch.Generator().manual_seed(0))
    >>> sorted(corruption_names())[:3]
    ['brightness', 'contrast', 'gaussian_blur']
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from robustvit._utils import check_images
from robustvit.registry import Registry

__all__ = ["CORRUPTIONS", "MAX_SEVERITY", "corrupt", "corruption_names", "register_corruption"]

Corruption = Callable[[torch.Tensor, int, torch.Generator | None], torch.Tensor]

MAX_SEVERITY = 5
CORRUPTIONS: Registry[Corruption] = Registry("corruption")

_PIL_MODES: dict[int, str] = {1: "L", 3: "RGB"}


def register_corruption(name: str) -> Callable[[Corruption], Corruption]:
    """Decorator adding a corruption ``fn(images, severity, generator) -> images`` to :data:`CORRUPTIONS`.

    Example:
        >>> @register_corruption("invert")
        ... def invert(images, severity, generator=None):
        ...     return 1 - images
    """
    return CORRUPTIONS.register(name)


def corruption_names() -> list[str]:
    """Names of all registered corruptions, in registration order.

    Example:
        >>> "jpeg" in corruption_names()
        True
    """
    return CORRUPTIONS.list()


def corrupt(images: torch.Tensor, name: str, severity: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Apply the corruption ``name`` at ``severity`` to a batch of images in ``[0, 1]``.

    Args:
        images: Floating-point batch ``(B, C, H, W)`` with values in ``[0, 1]``.
        name: A registered corruption, see :func:`corruption_names`.
        severity: Strength, from 1 (mild) to 5 (severe).
        generator: Random source for random corruptions; ``None`` uses torch's global generator.

    Returns:
        The corrupted batch, same shape, dtype and device, clipped to ``[0, 1]``.

    Raises:
        KeyError: Unknown name (the message lists the registered ones).
        ValueError: Severity outside ``1..5``, or images not a finite ``(B, C, H, W)`` batch.
        TypeError: Images are not a floating-point tensor.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> out = corrupt(torch.rand(2, 3, 32, 32), "shot_noise", 5, generator=g)
    """
    corruption = CORRUPTIONS[name]
    if isinstance(severity, bool) or not isinstance(severity, int) or not 1 <= severity <= MAX_SEVERITY:
        raise ValueError(f"severity must be an int from 1 to {MAX_SEVERITY}, got {severity!r}")
    check_images(images)
    if not images.is_floating_point():
        raise TypeError(f"images must be a floating-point tensor in [0, 1], got dtype {images.dtype}")
    return corruption(images, severity, generator)


def _randn(images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    # Drawn on the generator's device so a CPU generator also works for GPU images.
    device = generator.device if generator is not None else images.device
    return torch.randn(images.shape, generator=generator, device=device).to(images)


def _rand(images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else images.device
    return torch.rand(images.shape, generator=generator, device=device).to(images)


def _gaussian_kernel1d(sigma: float, max_radius: int) -> torch.Tensor:
    radius = max(1, min(math.ceil(4 * sigma), max_radius))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


_GAUSSIAN_NOISE_SIGMA = (0.08, 0.12, 0.18, 0.26, 0.38)


@register_corruption("gaussian_noise")
def gaussian_noise(images: torch.Tensor, severity: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Add zero-mean Gaussian noise with standard deviation ``(0.08, 0.12, 0.18, 0.26, 0.38)[severity - 1]``."""
    sigma = _GAUSSIAN_NOISE_SIGMA[severity - 1]
    return (images + sigma * _randn(images, generator)).clamp(0.0, 1.0)


_SHOT_NOISE_PHOTONS = (60, 25, 12, 5, 3)


@register_corruption("shot_noise")
def shot_noise(images: torch.Tensor, severity: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Poisson noise: each value becomes ``Poisson(x * photons) / photons``; fewer photons are noisier."""
    photons = _SHOT_NOISE_PHOTONS[severity - 1]
    device = generator.device if generator is not None else images.device
    rate = (images.to(device=device, dtype=torch.float32) * photons).clamp_min(0.0)
    counts = torch.poisson(rate, generator=generator).to(images)
    return (counts / photons).clamp(0.0, 1.0)


_IMPULSE_NOISE_AMOUNT = (0.03, 0.06, 0.09, 0.17, 0.27)


@register_corruption("impulse_noise")
def impulse_noise(images: torch.Tensor, severity: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Salt-and-pepper noise: a fraction ``amount`` of values (per channel) is set to 0 or 1, half each."""
    amount = _IMPULSE_NOISE_AMOUNT[severity - 1]
    u = _rand(images, generator)
    out = images.masked_fill(u < amount / 2, 0.0)
    return out.masked_fill((u >= amount / 2) & (u < amount), 1.0).clamp(0.0, 1.0)


# Published sigmas keyed by the image side they were made for: CIFAR-10-C (32 px) and ImageNet-C (224 px).
_GAUSSIAN_BLUR_SIGMA: dict[int, tuple[float, ...]] = {32: (0.4, 0.6, 0.7, 0.8, 1.0), 224: (1.0, 2.0, 3.0, 4.0, 6.0)}


@register_corruption("gaussian_blur")
def gaussian_blur(images: torch.Tensor, severity: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Separable Gaussian blur, sigma from the published table made for the closest image size.

    Sigmas are ``(0.4, 0.6, 0.7, 0.8, 1)`` (CIFAR-10-C) for 32-pixel images and ``(1, 2, 3, 4, 6)`` (ImageNet-C)
    for 224-pixel ones. Other sizes use the table whose size is closest in ratio, scaled by ``side / size``,
    so the blur stays the same relative to the image; a single ImageNet-C table scaled down to 32 pixels
    would make severities 1 and 2 no-ops. Borders replicate edge pixels.
    """
    height, width = images.shape[-2:]
    side = max(height, width)
    reference = min(_GAUSSIAN_BLUR_SIGMA, key=lambda size: abs(math.log(side / size)))
    sigma = _GAUSSIAN_BLUR_SIGMA[reference][severity - 1] * side / reference
    kernel = _gaussian_kernel1d(sigma, max_radius=side).to(images)
    radius = kernel.numel() // 2
    channels = images.shape[1]
    flat = images.reshape(-1, 1, height, width)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return flat.reshape(-1, channels, height, width).clamp(0.0, 1.0)


_CONTRAST_FACTOR = (0.4, 0.3, 0.2, 0.1, 0.05)


@register_corruption("contrast")
def contrast(images: torch.Tensor, severity: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Shrink each channel towards its per-image mean by ``(0.4, 0.3, 0.2, 0.1, 0.05)[severity - 1]``."""
    factor = _CONTRAST_FACTOR[severity - 1]
    means = images.mean(dim=(-2, -1), keepdim=True)
    return ((images - means) * factor + means).clamp(0.0, 1.0)


_BRIGHTNESS_SHIFT = (0.1, 0.2, 0.3, 0.4, 0.5)


@register_corruption("brightness")
def brightness(images: torch.Tensor, severity: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Add ``(0.1, 0.2, 0.3, 0.4, 0.5)[severity - 1]`` to the HSV value, keeping hue and saturation.

    With hue and saturation fixed every channel is proportional to the value ``V = max_c x_c``, so the
    shift is a per-pixel rescale by ``min(V + shift, 1) / V``; black pixels (no hue) become grey. This is
    exactly ImageNet-C's HSV round trip, without the conversion. One-channel images just get ``x + shift``.
    """
    shift = _BRIGHTNESS_SHIFT[severity - 1]
    value = images.amax(dim=1, keepdim=True)
    new_value = (value + shift).clamp(max=1.0)
    scale = new_value / value.clamp_min(torch.finfo(images.dtype).tiny)
    return torch.where(value > 0, images * scale, new_value).clamp(0.0, 1.0)


_JPEG_QUALITY = (25, 18, 15, 10, 7)


@register_corruption("jpeg")
def jpeg(images: torch.Tensor, severity: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """JPEG-compress each image with PIL at quality ``(25, 18, 15, 10, 7)[severity - 1]`` and decode it.

    Only 1- and 3-channel images are supported, like JPEG itself.
    """
    channels = images.shape[1]
    if channels not in _PIL_MODES:
        raise ValueError(f"jpeg supports 1 or 3 channels, got {channels}")
    quality = _JPEG_QUALITY[severity - 1]
    pixels = (images.detach().float().clamp(0.0, 1.0) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    decoded = []
    for array in pixels:
        buffer = io.BytesIO()
        Image.fromarray(array.squeeze(-1) if channels == 1 else array).save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        decoded.append(np.asarray(Image.open(buffer).convert(_PIL_MODES[channels])).reshape(array.shape))
    out = torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2).to(images) / 255
    return out.clamp(0.0, 1.0)


_PIXELATE_SCALE = (0.6, 0.5, 0.4, 0.3, 0.25)


@register_corruption("pixelate")
def pixelate(images: torch.Tensor, severity: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Downsample by ``(0.6, 0.5, 0.4, 0.3, 0.25)[severity - 1]`` with box averaging, then upsample nearest."""
    scale = _PIXELATE_SCALE[severity - 1]
    height, width = images.shape[-2:]
    small = (max(1, int(height * scale)), max(1, int(width * scale)))
    out = F.interpolate(F.adaptive_avg_pool2d(images, small), size=(height, width), mode="nearest")
    return out.clamp(0.0, 1.0)
