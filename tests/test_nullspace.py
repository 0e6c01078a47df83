"""Patch-embedding nullspace, token noise and approximate-nullspace noise synthesis on tiny ViTs."""

from __future__ import annotations

import os

import pytest
import timm
import torch
import torch.nn.functional as F
from accelerate import Accelerator, debug_launcher
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers import DeiTConfig, DeiTForImageClassification, ViTConfig, ViTForImageClassification

import robustvit
from robustvit import UnsupportedModuleError
from robustvit._utils import model_logits
from robustvit.data import load_image_dataset
from robustvit.nullspace import (
    NullspaceNoise,
    approximate_patch_nullspace,
    nullspace_finetuning_loss,
    patch_embedding_nullspace,
    permuted,
    sample_pixel_noise,
    synthesize_noise,
    token_noise,
)
from robustvit.nullspace.synthesis import RANDOM_SHRINK
from robustvit.training import PixelModel

SIZE, PATCH, DIM, CLASSES = 16, 8, 32, 5
PATCH_DIM = 3 * PATCH * PATCH  # 192 > DIM: a 160-dimensional exact nullspace


def _timm(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    args = dict(img_size=SIZE, patch_size=PATCH, embed_dim=DIM, depth=1, num_heads=2, num_classes=CLASSES)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**args, **kwargs}).eval()


def _hf(model_class: type, config_class: type) -> nn.Module:
    torch.manual_seed(0)
    config = config_class(
        image_size=SIZE,
        patch_size=PATCH,
        hidden_size=DIM,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=2 * DIM,
        num_labels=CLASSES,
    )
    return model_class(config).eval()


def _deit() -> nn.Module:
    return _hf(DeiTForImageClassification, DeiTConfig)  # ImageNet std: per-channel scaling differs


# Converted with L2 attention: a converted model with token shift and class-token pooling ignores its input.
VARIANTS = {
    "timm": _timm,
    "timm-converted": lambda: robustvit.convert(_timm(), mixer="l2"),
    "timm-pixel-wrapper": lambda: PixelModel(_timm(), mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.4)),
    "transformers-vit": lambda: _hf(ViTForImageClassification, ViTConfig),
    "transformers-deit": _deit,
    "transformers-deit-converted": lambda: robustvit.convert(_deit(), mixer="l2"),
}


def _images(batch: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _change(model: nn.Module, images: torch.Tensor, noise: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model_logits(model, images + noise) - model_logits(model, images)).abs().max())


@pytest.mark.parametrize("name", list(VARIANTS))
def test_pixel_noise_in_the_exact_nullspace_leaves_outputs_unchanged(name: str) -> None:
    model, images = VARIANTS[name](), _images()
    basis = patch_embedding_nullspace(model)
    assert basis.dtype == torch.float64
    assert basis.shape == (PATCH_DIM, PATCH_DIM - DIM)  # C*P*P - rank, the rank being D for random weights
    torch.testing.assert_close(basis.T @ basis, torch.eye(PATCH_DIM - DIM, dtype=torch.float64))

    noise = sample_pixel_noise(model, images, scale=3.0, generator=torch.Generator().manual_seed(1))
    assert noise.shape == images.shape and noise.dtype == images.dtype
    # A random direction of the same norm does change the outputs; the nullspace noise only by float rounding.
    control = torch.randn(images.shape, generator=torch.Generator().manual_seed(2))
    control = control * noise.norm() / control.norm()
    changed = _change(model, images, control)
    assert changed > 0
    assert _change(model, images, noise) <= 1e-3 * changed


def test_pixel_noise_scale_is_the_rms_per_patch_norm() -> None:
    images = torch.zeros(64, 3, SIZE, SIZE)
    noise = sample_pixel_noise(_timm(), images, scale=2.0, generator=torch.Generator().manual_seed(0))
    patches = noise.unfold(2, PATCH, PATCH).unfold(3, PATCH, PATCH).permute(0, 2, 3, 1, 4, 5).reshape(-1, PATCH_DIM)
    assert patches.norm(dim=1).pow(2).mean().sqrt() == pytest.approx(2.0, rel=0.02)
    assert sample_pixel_noise(_timm(), images[:1], scale=0.0).abs().max() == 0


def test_converted_nullspace_is_in_pixel_space() -> None:
    deit = robustvit.convert(_deit(), mixer="l2")
    conv = deit.deit.embeddings.patch_embeddings.projection
    weight = conv.weight.detach().double().flatten(1)
    pixel_map = weight / conv.input_std.double().flatten().repeat_interleave(PATCH * PATCH)
    basis = patch_embedding_nullspace(deit)
    assert (pixel_map @ basis).abs().max() < 1e-12 * pixel_map.abs().max()
    assert (weight @ basis).abs().max() > 1e-3 * weight.abs().max()  # the normalized-space nullspace differs


def test_rank_deficient_embedding_uses_the_weight_dtype_tolerance() -> None:
    model = _timm(patch_size=4, embed_dim=64)  # 48 inputs per patch < 64: full column rank, trivial nullspace
    assert patch_embedding_nullspace(model).shape == (48, 0)
    with pytest.raises(ValueError, match="trivial nullspace"):
        sample_pixel_noise(model, torch.rand(1, 3, SIZE, SIZE), scale=1.0)
    g = torch.Generator().manual_seed(0)
    low_rank = torch.randn(64, 40, generator=g) @ torch.randn(40, 48, generator=g)  # rank 40, stored in float32
    with torch.no_grad():
        model.patch_embed.proj.weight.copy_(low_rank.view(64, 3, 4, 4))
    assert patch_embedding_nullspace(model).shape == (48, 8)
    assert patch_embedding_nullspace(model, rtol=0.0).shape[1] < 8  # float32 rounding counts as rank without it
    with pytest.raises(ValueError, match="rtol"):
        patch_embedding_nullspace(model, rtol=-1.0)


def test_approximate_nullspace_is_the_weakest_singular_directions() -> None:
    model = _timm(patch_size=4, embed_dim=64)  # trivial exact nullspace, as for ViT-B/16
    basis, singular = approximate_patch_nullspace(model, k=5)
    weight = model.patch_embed.proj.weight.detach().double().flatten(1)
    expected = torch.linalg.svdvals(weight).flip(0)[:5]
    torch.testing.assert_close(singular, expected)
    torch.testing.assert_close((weight @ basis).norm(dim=0), singular)
    torch.testing.assert_close(basis.T @ basis, torch.eye(5, dtype=torch.float64))
    # With a non-trivial nullspace the weakest directions are exact ones, singular value 0.
    basis, singular = approximate_patch_nullspace(_timm(), k=3)
    assert singular.tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="k must be"):
        approximate_patch_nullspace(model, k=49)


@pytest.mark.parametrize(
    "model", [nn.Sequential(nn.Conv2d(3, 8, 4, 4), nn.Flatten()), timm.create_model("resnet10t", num_classes=2)]
)
def test_models_without_a_patch_embedding_are_rejected(model: nn.Module) -> None:
    for call in (
        lambda: patch_embedding_nullspace(model),
        lambda: sample_pixel_noise(model, torch.rand(1, 3, SIZE, SIZE), 1.0),
        lambda: token_noise(model, torch.zeros(1, 4, DIM)).__enter__(),
    ):
        with pytest.raises(UnsupportedModuleError, match="not a supported model"):
            call()


def test_overlapping_patch_embedding_is_rejected() -> None:
    model = _timm()
    model.patch_embed.proj.stride = (4, 4)
    with pytest.raises(UnsupportedModuleError, match="patchify"):
        patch_embedding_nullspace(model)


@pytest.mark.parametrize("name", ["timm", "timm-converted", "timm-pixel-wrapper", "transformers-vit"])
def test_token_noise_changes_outputs_and_removes_its_hook(name: str) -> None:
    model, images = VARIANTS[name](), _images()
    embedding = robustvit.families.get_family(getattr(model, "model", model))
    embed_module = embedding.patch_embedding(getattr(model, "model", model))
    clean = model_logits(model, images)
    noise = torch.randn(1, (SIZE // PATCH) ** 2, DIM, requires_grad=True)
    with token_noise(model, noise):
        noisy = model_logits(model, images)
    assert not torch.allclose(noisy, clean)
    assert not embed_module._forward_hooks
    torch.testing.assert_close(model_logits(model, images), clean)
    (grad,) = torch.autograd.grad(noisy.sum(), noise)
    assert grad.abs().sum() > 0
    with pytest.raises(RuntimeError, match="boom"), token_noise(model, noise):
        raise RuntimeError("boom")
    assert not embed_module._forward_hooks


def test_token_noise_checks_shapes_and_is_lipschitz_neutral() -> None:
    model = robustvit.convert(_timm(), mixer="l2")
    with pytest.raises(ValueError, match="noise must be"):
        token_noise(model, torch.zeros(4, DIM)).__enter__()
    with pytest.raises(ValueError, match="does not fit"), token_noise(model, torch.zeros(1, 9, DIM)):
        model(_images())
    bound = robustvit.lipschitz_bound(model)
    with token_noise(model, torch.ones(1, 4, DIM)):
        assert robustvit.lipschitz_bound(model) == bound  # adding a constant: the engine accepts the hook


def test_finetuning_loss_is_clean_plus_noisy_cross_entropy() -> None:
    model, images, labels = _timm(), _images(), torch.tensor([0, 1, 2, 3])
    noise = torch.randn(1, 4, DIM)
    with token_noise(model, noise):
        noisy = F.cross_entropy(model(images), labels)
    expected = F.cross_entropy(model(images), labels) + noisy
    torch.testing.assert_close(nullspace_finetuning_loss(model, images, labels, noise), expected)


def _confident_model() -> nn.Module:
    """A random tiny ViT with large logits, so that token noise visibly moves its probabilities."""
    model = _timm(depth=2)
    with torch.no_grad():
        model.head.weight.mul_(50.0)
    return PixelModel(model)


def _loader(count: int = 32, batch_size: int = 16) -> DataLoader:
    images = torch.rand(count, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    return DataLoader(TensorDataset(images, torch.zeros(count, dtype=torch.long)), batch_size=batch_size)


@pytest.fixture(scope="module")
def digits_vit() -> tuple[PixelModel, torch.Tensor]:
    """A tiny ViT trained on 16-pixel digits for 8 quick epochs (~85% train accuracy), and the digit images.

    A random ViT is nearly isotropic, so only a trained one shows the paper's effect.
    """
    digits = load_image_dataset(split="train", image_size=SIZE)
    model = PixelModel(_timm(num_classes=10))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loader = DataLoader(digits, batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(0))
    for _ in range(8):
        for images, labels in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(images), labels).backward()
            optimizer.step()
    model.zero_grad(set_to_none=True)
    return model, digits.images


def test_synthesized_noise_meets_eps_and_beats_a_same_norm_control(digits_vit) -> None:
    model, images = digits_vit
    model.train()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    loader = DataLoader(TensorDataset(images[:256]), batch_size=64)
    result = synthesize_noise(
        model, loader, tolerance=0.03, rounds=30, progress=False, generator=torch.Generator().manual_seed(0)
    )
    assert result.reached_tolerance and result.prob_mse < 0.03 and result.steps > 0
    assert result.noise.shape == (1, (SIZE // PATCH) ** 2, DIM)
    assert result.l2_norm == pytest.approx(float(result.noise.norm()))
    # The model is untouched: same weights, no gradients, training mode restored.
    assert all(module.training for module in model.modules())
    for name, p in model.named_parameters():
        assert p.grad is None and torch.equal(p, before[name])

    held_out = images[256:512]
    with torch.no_grad():
        model.eval()
        clean = F.softmax(model(held_out), -1)

        def prob_mse(noise: torch.Tensor) -> float:
            with token_noise(model, noise):
                return float((F.softmax(model(held_out), -1) - clean).pow(2).sum(-1).mean())

        control = permuted(result.noise, torch.Generator().manual_seed(0))
        torch.testing.assert_close(control.norm(), result.noise.norm())
        # Same norm, random direction: far larger effect (measured ~15x); the input space is not isotropic.
        assert prob_mse(result.noise) < 0.06
        assert prob_mse(control) > 5 * prob_mse(result.noise)


def test_random_control_shrinks_gaussian_noise_until_within_eps() -> None:
    generator = torch.Generator().manual_seed(0)
    result = synthesize_noise(
        _confident_model(), _loader(), tolerance=0.01, kind="random", rounds=20, progress=False, generator=generator
    )
    assert result.kind == "random" and result.reached_tolerance and result.steps > 0 and result.lr_range is None
    start = torch.randn(result.noise.shape, generator=torch.Generator().manual_seed(0))  # the same draw
    torch.testing.assert_close(result.noise, start * RANDOM_SHRINK**result.steps)
    # One step less would not have been within eps: it stops at the first noise that is.
    assert result.prob_mse < 0.01


def test_noise_learning_rate_stays_near_constant_as_in_the_paper() -> None:
    result = synthesize_noise(_confident_model(), _loader(), tolerance=1e-9, rounds=3, lr=0.1, progress=False)
    assert result.kind == "nullspace" and result.steps == 6 and not result.reached_tolerance
    first, last = result.lr_range
    assert first == pytest.approx(0.1) and 0.97 * first < last < first  # cosine over 10x the planned steps
    decaying = synthesize_noise(
        _confident_model(), _loader(), tolerance=1e-9, rounds=3, schedule_steps=6, progress=False
    )  # a cosine over the steps used, what the recipe did before, ends near 0
    assert decaying.lr_range[1] < 0.01


def test_synthesis_continues_from_a_given_noise() -> None:
    start = torch.full((1, (SIZE // PATCH) ** 2, DIM), 0.01)
    result = synthesize_noise(_confident_model(), _loader(), tolerance=10.0, init=start, progress=False)
    assert result.steps == 0 and torch.equal(result.noise, start)
    with pytest.raises(ValueError, match="kind"):
        synthesize_noise(_confident_model(), _loader(), kind="uniform", progress=False)


def test_synthesis_stops_at_once_when_the_initial_noise_is_within_eps() -> None:
    result = synthesize_noise(_confident_model(), _loader(), tolerance=10.0, progress=False)
    assert result.reached_tolerance and result.steps == 0
    assert result.noise.abs().max() <= 3.0


def test_synthesis_reports_noise_that_did_not_reach_eps() -> None:
    result = synthesize_noise(_confident_model(), _loader(), tolerance=1e-9, rounds=1, max_batches=1, progress=False)
    assert not result.reached_tolerance and result.steps == 1 and result.prob_mse >= 1e-9


def test_synthesis_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="empty"):
        synthesize_noise(_confident_model(), DataLoader(TensorDataset(torch.zeros(0, 3, SIZE, SIZE))), progress=False)
    with pytest.raises(ValueError, match="tolerance"):
        synthesize_noise(_confident_model(), _loader(), tolerance=0.0)
    with pytest.raises(TypeError, match="unknown setting.*'epsilon'.*its fields: .*tolerance"):
        synthesize_noise(_confident_model(), _loader(), epsilon=0.03)
    with pytest.warns(DeprecationWarning, match="eps= is now tolerance="), pytest.raises(ValueError, match="tolerance"):
        synthesize_noise(_confident_model(), _loader(), eps=0.0)  # the 0.1 keyword, checked as the tolerance
    with pytest.raises(ValueError, match="images"):
        synthesize_noise(_confident_model(), [[torch.zeros(3)]], progress=False)
    with pytest.raises(UnsupportedModuleError):
        synthesize_noise(nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 2)), _loader(), progress=False)


def test_noise_save_load_round_trip(tmp_path) -> None:
    result = NullspaceNoise(torch.randn(1, 4, DIM), 1.5, 0.02, 0.9, 7, True, 0.03, "nullspace", [0.1, 0.099])
    loaded = NullspaceNoise.load(result.save(tmp_path / "noise.safetensors"))
    torch.testing.assert_close(loaded.noise, result.noise)
    assert loaded.stats() == result.stats()
    from safetensors.torch import save_file

    save_file({"noise": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a NullspaceNoise"):
        NullspaceNoise.load(tmp_path / "other.safetensors")


def test_a_noise_file_written_before_the_tolerance_had_its_own_name_still_loads(tmp_path) -> None:
    import json

    from safetensors.torch import save_file

    old_stats = {"l2_norm": 1.5, "prob_mse": 0.02, "top1_agreement": 0.9, "steps": 7, "reached_eps": True,
                 "eps": 0.03, "kind": "nullspace", "lr_range": [0.1, 0.099]}  # fmt: skip
    metadata = {"format": "pt", "robustvit.nullspace_noise": json.dumps(old_stats)}
    save_file({"noise": torch.ones(1, 4, DIM)}, str(tmp_path / "old.safetensors"), metadata=metadata)
    loaded = NullspaceNoise.load(tmp_path / "old.safetensors")
    assert loaded.reached_tolerance is True and loaded.tolerance == 0.03 and loaded.steps == 7
    assert "eps" not in loaded.stats() and loaded.stats()["tolerance"] == 0.03  # written back with today's names


def _distributed_synthesis() -> None:
    # One thread per forked worker, or two processes oversubscribe the CPU (Accelerate reads the variable).
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    model = _confident_model()
    # Each rank sees different images, and the generator differs per rank: only reduction makes them agree.
    loader = accelerator.prepare(_loader(count=64))
    generator = torch.Generator().manual_seed(accelerator.process_index)
    result = synthesize_noise(
        model, loader, tolerance=0.01, rounds=3, accelerator=accelerator, progress=False, generator=generator
    )
    gathered = accelerator.gather(result.noise)
    assert accelerator.num_processes == 2 and result.steps > 0
    torch.testing.assert_close(gathered[0], gathered[1], rtol=0, atol=0)
    accelerator.end_training()


@pytest.mark.distributed
def test_synthesis_agrees_across_processes() -> None:
    debug_launcher(_distributed_synthesis, num_processes=2)
