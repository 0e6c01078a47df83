"""Shared fixtures: tiny, randomly initialised timm and transformers ViTs (no downloads), built in milliseconds.

Every factory takes a seed, so two calls with the same seed give bit-identical models (the state-dict round-trip
tests rely on that only through ``load_state_dict``; the seed just keeps failures reproducible).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

# Many tiny ops: with two busy shared cores, intra-op threads mostly spin and wait for each other (a 200-step
# attack on a Linear(16, 8) took 7 s with 2 threads and 0.2 s with 1). One thread keeps the suite fast.
torch.set_num_threads(1)


def pytest_configure(config: pytest.Config) -> None:
    """Docstring examples under robustvit/ run with a user's namespace (tests/doctest_env.py)."""
    config.pluginmanager.import_plugin("doctest_env")


IMG = 32
NUM_CLASSES = 10

# Small configurations of each supported family (random init, no downloads).
TIMM_CONFIGS: dict[str, tuple[str, dict]] = {
    # class-token pooling, the plain ViT
    "timm_token": (
        "vit_tiny_patch16_224",
        dict(img_size=IMG, patch_size=8, depth=2, embed_dim=48, num_heads=3),
    ),
    # average pooling + fc_norm + LayerScale + register tokens
    "timm_avg_ls_reg": (
        "vit_tiny_patch16_224",
        dict(
            img_size=IMG,
            patch_size=8,
            depth=2,
            embed_dim=48,
            num_heads=4,
            global_pool="avg",
            fc_norm=True,
            init_values=0.3,
            reg_tokens=2,
        ),
    ),
    # DeiT with a distillation token and head
    "timm_distilled": (
        "deit_tiny_distilled_patch16_224",
        dict(img_size=IMG, patch_size=8, depth=2, embed_dim=48, num_heads=3),
    ),
    # more tokens (8x8 grid of 4-pixel patches), one block
    "timm_patch4": (
        "vit_tiny_patch16_224",
        dict(img_size=IMG, patch_size=4, depth=1, embed_dim=64, num_heads=2),
    ),
}

HF_KWARGS = dict(
    image_size=IMG,
    patch_size=8,
    hidden_size=48,
    num_hidden_layers=2,
    num_attention_heads=3,
    intermediate_size=96,
    num_labels=NUM_CLASSES,
)

HF_FAMILIES = ("hf_vit", "hf_deit")
ALL_FAMILIES = (*TIMM_CONFIGS, *HF_FAMILIES)


def _perturb_norms(model: nn.Module, generator: torch.Generator) -> None:
    """Random LayerNorm affine parameters: a fresh model has gamma = 1, beta = 0, which hides scale bugs."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm) and module.weight is not None:
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=generator))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))


def build_model(name: str, seed: int = 0) -> nn.Module:
    """A fresh, randomly initialised source model of one of :data:`ALL_FAMILIES` (train mode, like a new model)."""
    torch.manual_seed(seed)
    if name in TIMM_CONFIGS:
        arch, kwargs = TIMM_CONFIGS[name]
        model = timm.create_model(arch, pretrained=False, num_classes=NUM_CLASSES, **kwargs)
    elif name == "hf_vit":
        from transformers import ViTConfig, ViTForImageClassification

        model = ViTForImageClassification(ViTConfig(**HF_KWARGS))
    elif name == "hf_deit":
        from transformers import DeiTConfig, DeiTForImageClassification

        model = DeiTForImageClassification(DeiTConfig(**HF_KWARGS))
    else:
        raise KeyError(name)
    _perturb_norms(model, torch.Generator().manual_seed(seed + 1))
    return model


def logits_of(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


@pytest.fixture
def make_model() -> Callable[..., nn.Module]:
    """Factory fixture: ``make_model("timm_token", seed=0)``."""
    return build_model


@pytest.fixture
def images() -> torch.Tensor:
    """Four images with pixels in [0, 1]."""
    return torch.rand(4, 3, IMG, IMG, generator=torch.Generator().manual_seed(1234))


def forge_certificate(folder: Path, certificate) -> None:
    """Write ``certificate`` into a saved model folder and rewrite the weights header *consistently* (claim digest
    and weights_sha256 updated), as a careful forger would: only checks that do not rely on the stored hashes can
    catch what remains."""
    import safetensors.torch

    from robustvit import hub
    from robustvit.certify.certificate import sha256_file

    weights = folder / "model.safetensors"
    safetensors.torch.save_file(
        safetensors.torch.load_file(weights),
        weights,
        metadata={"format": "pt", hub.DIGEST_KEY: hub.claim_digest(certificate)},
    )
    dataclasses.replace(certificate, weights_sha256=sha256_file(weights)).save(folder / "certificate.json")
