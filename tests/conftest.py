"""Shared fixtures: the tiny, randomly initialised models the family adapters register (no downloads, milliseconds).

Every factory takes a seed, so two calls with the same seed give bit-identical models (the state-dict round-trip
tests rely on that only through ``load_state_dict``; the seed just keeps failures reproducible).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from torch import nn

from robustvit.conversion import timm_metadata
from robustvit.families import TINY_MODELS, create_tiny_model, family_by_name, registered_families, tiny_models

# Many tiny ops: with two busy shared cores, intra-op threads mostly spin and wait for each other (a 200-step
# attack on a Linear(16, 8) took 7 s with 2 threads and 0.2 s with 1). One thread keeps the suite fast.
torch.set_num_threads(1)


def pytest_configure(config: pytest.Config) -> None:
    """Docstring examples under robustvit/ run with a user's namespace (tests/doctest_env.py)."""
    config.pluginmanager.import_plugin("doctest_env")


IMG = 32
NUM_CLASSES = 10

# The tiny configurations every family adapter registers (robustvit/families/*.py, register_tiny_model): adding a
# family and its tiny models puts it in every test parametrized over these.
ALL_FAMILIES = tuple(tiny_models())
REPRESENTATIVES = tuple(tiny_models(family)[0] for family in registered_families())  # one per family
# The library-specific contracts (timm's, transformers'): every timm family's tiny models.
TIMM_FAMILIES = tuple(name for family in timm_metadata.TIMM_FAMILIES for name in tiny_models(family))
# transformers' own encoders (embeddings, layers, a config of the vision encoder): not a timm model in a TimmWrapper.
HF_ENCODER_FAMILIES = tuple(
    name for name in ALL_FAMILIES if hasattr(family_by_name(TINY_MODELS[name].family), "layers")
)
HF_FAMILIES = tuple(name for name in ALL_FAMILIES if family_by_name(TINY_MODELS[name].family).library == "transformers")


def _perturb_norms(model: nn.Module, generator: torch.Generator) -> None:
    """Random LayerNorm affine parameters: a fresh model has gamma = 1, beta = 0, which hides scale bugs."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm) and module.weight is not None:
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=generator))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))


def build_model(name: str, seed: int = 0, *, channels: int = 3, num_classes: int = NUM_CLASSES) -> nn.Module:
    """A fresh, randomly initialised tiny model of :data:`ALL_FAMILIES` (train mode, like a new model), with random
    LayerNorm affine parameters."""
    torch.manual_seed(seed)
    model = create_tiny_model(name, image_size=IMG, num_classes=num_classes, channels=channels)
    _perturb_norms(model, torch.Generator().manual_seed(seed + 1))
    return model


@pytest.fixture(autouse=True)
def _no_accelerate_state_left_behind() -> Iterator[None]:
    """Each test leaves no Accelerate process state behind: the processes debug_launcher starts would inherit a
    leftover one and see a single process."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@contextlib.contextmanager
def where_the_source_traces(name: str) -> Iterator[None]:
    """Run a torch.export / torch.compile check of a converted tiny model; where dynamo refuses it, skip if dynamo
    refuses the unconverted source the same way on this torch (a host-library limit: torch 2.7's dynamo cannot read
    transformers' composite CLIP / SigLIP configs), and fail otherwise."""
    try:
        yield
    except torch._dynamo.exc.Unsupported:
        pixels = torch.rand(2, 3, IMG, IMG)
        try:
            torch.export.export(build_model(name).eval(), (pixels,))
        except torch._dynamo.exc.Unsupported as err:
            reason = str(err).splitlines()[0]
            pytest.skip(f"dynamo cannot trace the {name} source on torch {torch.__version__} either: {reason}")
        raise


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

    from robustvit.certification.certificate import sha256_file
    from robustvit.persistence import hub

    weights = folder / "model.safetensors"
    safetensors.torch.save_file(
        safetensors.torch.load_file(weights),
        weights,
        metadata={"format": "pt", hub.DIGEST_KEY: hub.claim_digest(certificate)},
    )
    dataclasses.replace(certificate, weights_sha256=sha256_file(weights)).save(folder / "certificate.json")
