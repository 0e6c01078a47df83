"""evaluate_robustness and evaluate_accuracy on models whose answers are known, and the methods table and chart."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import timm
import torch
from accelerate import Accelerator, debug_launcher
from torch import nn
from torch.utils.data import DataLoader, Dataset

from robustvit.data import TensorImageDataset, dataset_labels
from robustvit.evaluation import (
    RobustnessResult,
    SeedSummary,
    aggregate_seeds,
    evaluate_accuracy,
    evaluate_robustness,
    format_methods,
    plot_methods,
    summary_rows,
    within_spread,
)
from robustvit.training import PixelModel

SIZE = 16
FAST = {
    "linf_radii": (2 / 255,),
    "l2_radii": (0.5,),
    "corruptions": ["contrast", "jpeg"],
    "severities": (1, 5),
    "pgd_steps": 3,
    "pgd_restarts": 2,
}


class ConstantClassifier(nn.Module):
    """Always predicts class 0, whatever the image: attacks and corruptions cannot change anything."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = torch.tensor([5.0, 0.0, 0.0], device=images.device).expand(images.shape[0], -1)
        return logits + 0.0 * self.scale * images.mean()  # differentiable in the pixels, zero gradient


def _dataset(count: int = 10) -> TensorImageDataset:
    images = torch.rand(count, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 0, 0, 1, 0, 2, 0, 1][:count])
    return TensorImageDataset(images, labels, class_names=["a", "b", "c"], name="toy", split="test")


def _vit() -> PixelModel:
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=SIZE,
        patch_size=8,
        embed_dim=32,
        depth=1,
        num_heads=2,
        num_classes=3,
    )
    return PixelModel(model)


def test_constant_classifier_is_exactly_as_robust_as_it_is_accurate() -> None:
    result = evaluate_robustness(ConstantClassifier(), _dataset(), eval_batch_size=4, **FAST)
    share_of_class_0 = 0.5
    assert result.num_images == 10
    assert result.clean_accuracy == pytest.approx(share_of_class_0)
    assert set(result.adversarial) == {"fgsm_linf@2/255", "pgd_linf@2/255", "fgsm_l2@0.5", "pgd_l2@0.5"}
    assert all(value == pytest.approx(share_of_class_0) for value in result.adversarial.values())
    assert result.corruptions["jpeg"] == pytest.approx({"1": 0.5, "5": 0.5, "mean": 0.5})
    assert result.corruption_accuracy == pytest.approx(share_of_class_0)
    assert result.noise_agreement is None and "noise_agreement" not in result.to_dict()
    assert result.pgd_weaker_than_fgsm == []  # the masking check: equal accuracies are fine
    assert result.settings["pgd_steps"] == 3 and result.settings["pgd_restarts"] == 2


def test_max_images_is_a_stratified_random_subset_not_the_first_images() -> None:
    # A class-sorted split: the first 6 images would all be class 0.
    labels = torch.tensor([0] * 6 + [1] * 6 + [2] * 6)
    images = torch.rand(18, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    data = TensorImageDataset(images, labels, class_names=["a", "b", "c"], name="sorted", split="test")
    result = evaluate_robustness(
        ConstantClassifier(), data, max_eval_images=6, corruptions=[], linf_radii=(), l2_radii=()
    )
    assert result.num_images == 6
    assert result.clean_accuracy == pytest.approx(1 / 3)  # 2 images of each class; the constant says class 0
    from robustvit.data import stratified_subset

    subset = stratified_subset(data, 6, seed=1)
    assert torch.bincount(dataset_labels(subset)).tolist() == [2, 2, 2]
    assert subset.indices != stratified_subset(data, 6, seed=2).indices  # random, seeded


def test_vit_results_are_consistent_and_respect_max_images() -> None:
    model = _vit()
    model.train()
    zero_noise = torch.zeros(1, 4, 32)
    result = evaluate_robustness(model, _dataset(), noise=zero_noise, max_eval_images=7, eval_batch_size=3, **FAST)
    assert model.training  # modes restored
    assert result.num_images == 7
    assert result.noise_agreement == 1.0 and result.noise_accuracy == result.clean_accuracy
    # Attacks only count images that were also correct clean.
    assert all(value <= result.clean_accuracy for value in result.adversarial.values())
    # A DataLoader contributes its dataset and batch size; results are identical.
    from_loader = evaluate_robustness(
        model, DataLoader(_dataset(), batch_size=3), noise=zero_noise, max_eval_images=7, **FAST
    )
    assert dataclasses.replace(from_loader, seconds=0.0) == dataclasses.replace(result, seconds=0.0)


def test_token_noise_lowers_agreement() -> None:
    noise = 50 * torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(0))
    result = evaluate_robustness(_vit(), _dataset(), noise=noise, corruptions=[], linf_radii=(), l2_radii=())
    assert result.noise_agreement < 1.0
    assert result.adversarial == {} and result.corruptions == {} and result.corruption_accuracy is None
    assert "corruption_accuracy" not in result.to_dict()


class _Unlabelled(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.rand(3, SIZE, SIZE)


def test_bad_input_gives_clear_errors() -> None:
    model = ConstantClassifier()
    empty = TensorImageDataset(
        torch.zeros(0, 3, SIZE, SIZE), torch.zeros(0, dtype=torch.long), class_names=["a"], name="empty", split="test"
    )
    with pytest.raises(ValueError, match="empty"):
        evaluate_robustness(model, empty)
    with pytest.raises(ValueError, match="Labelled data is needed"):
        evaluate_robustness(model, _Unlabelled())
    with pytest.raises(ValueError, match="corruptions must be one of"):
        evaluate_robustness(model, _dataset(), corruptions=["fog"])
    with pytest.raises(ValueError, match="severities"):
        evaluate_robustness(model, _dataset(), severities=(6,))
    with pytest.raises(ValueError, match="radii"):
        evaluate_robustness(model, _dataset(), linf_radii=(-1.0,))


def _two_process_evaluation(expected: RobustnessResult) -> None:
    # One thread per forked worker, or two processes oversubscribe the CPU (Accelerate reads the variable).
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    # 10 images over 2 processes in batches of 4: the last batch is padded, gather_for_metrics drops the padding.
    result = evaluate_robustness(ConstantClassifier(), _dataset(), eval_batch_size=4, accelerator=accelerator, **FAST)
    assert accelerator.num_processes == 2
    assert result.num_images == 10
    assert result.clean_accuracy == pytest.approx(expected.clean_accuracy)
    assert result.corruption_accuracy == pytest.approx(expected.corruption_accuracy)
    accelerator.end_training()


@pytest.mark.distributed
def test_results_are_gathered_across_processes() -> None:
    expected = evaluate_robustness(ConstantClassifier(), _dataset(), eval_batch_size=4, **FAST)
    debug_launcher(_two_process_evaluation, args=(expected,), num_processes=2)


def test_accuracy_on_a_subset_of_the_classes_restricts_the_logits() -> None:
    class Fixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(()))

        def forward(self, images: torch.Tensor) -> torch.Tensor:  # prefers class 0, then 2, then 1
            return torch.tensor([3.0, 1.0, 2.0]).expand(images.shape[0], -1) + self.weight

    images = torch.rand(4, 3, SIZE, SIZE)
    # A two-class test set whose classes are the model's classes 2 and 1, in that order: restricted to them the
    # model always answers its class 2, i.e. the set's label 0.
    subset = TensorImageDataset(images, torch.tensor([0, 0, 0, 1]), class_names=["c", "b"], name="r", split="test")
    assert evaluate_accuracy(Fixed(), subset, class_indices=[2, 1]) == pytest.approx(0.75)
    full = TensorImageDataset(images, torch.tensor([0, 0, 1, 2]), class_names=["a", "b", "c"], name="f", split="t")
    assert evaluate_accuracy(Fixed(), full, eval_batch_size=3) == pytest.approx(0.5)


def _result(clean: float, pgd: float) -> RobustnessResult:
    return RobustnessResult(
        num_images=100,
        clean_accuracy=clean,
        adversarial={"pgd_linf@2/255": pgd},
        pgd_weaker_than_fgsm=[],
        corruptions={"contrast": {"1": 0.5, "mean": 0.5}},
        seconds=1.0,
        settings={},
        corruption_accuracy=0.5,
    )


def test_methods_table_marks_differences_within_the_spread_as_noise(tmp_path) -> None:
    baseline = _result(0.9, 0.4)
    assert list(summary_rows(baseline)) == [
        "clean accuracy",
        "pgd linf@2/255",
        "contrast (mean)",
        "corruption accuracy (mean)",
    ]
    ce = aggregate_seeds([_result(0.90, 0.50), _result(0.92, 0.52)])
    assert ce.mean["clean accuracy"] == pytest.approx(0.91)
    assert ce.std["clean accuracy"] == pytest.approx(0.02 / 2**0.5)  # sample std
    assert ce.num_seeds == 2 and ce.num_images == 100
    nullspace = aggregate_seeds([_result(0.905, 0.60), _result(0.915, 0.61)])
    table = format_methods(baseline, {"ce": ce, "nullspace": nullspace})
    assert "| metric | baseline | ce (2 seeds) | nullspace (2 seeds) | nullspace - ce |" in table
    assert "| clean accuracy | 90.00 | 91.00 +- 1.41 | 91.00 +- 0.71 | +0.00 (noise) |" in table
    assert "| pgd linf@2/255 | 40.00 | 51.00 +- 1.41 | 60.50 +- 0.71 | +9.50 |" in table
    assert "one image is 1.00 points" in table
    assert "nullspace - ce" not in format_methods(baseline, {"nullspace": nullspace})  # no reference, no column
    assert aggregate_seeds([_result(0.9, 0.4)]).std["clean accuracy"] == 0.0
    path = plot_methods(baseline, {"ce": ce, "nullspace": nullspace}, tmp_path / "sub" / "chart.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_within_spread() -> None:
    assert within_spread(0.50, 0.01, 0.515, 0.01, num_images=1000)  # intervals overlap
    assert not within_spread(0.50, 0.01, 0.53, 0.01, num_images=1000)
    assert within_spread(0.50, 0.0, 0.505, 0.0, num_images=100)  # under one image


def test_results_are_dataclasses_whose_dicts_are_the_report_records() -> None:
    result = evaluate_robustness(ConstantClassifier(), _dataset(), noise=None, eval_batch_size=4, **FAST)
    result.eval_sets = {"imagenet_r": 0.25}
    record = json.loads(json.dumps(result.to_dict()))  # JSON-ready
    assert list(record) == [
        "num_images", "clean_accuracy", "adversarial", "pgd_weaker_than_fgsm", "corruptions", "corruption_accuracy",
        "seconds", "settings", "eval_sets",
    ]  # fmt: skip
    assert record["adversarial"]["pgd_l2@0.5"] == result.adversarial["pgd_l2@0.5"]
    assert RobustnessResult.from_dict(record) == result
    assert summary_rows(result)["imagenet_r accuracy"] == 0.25
    summary = aggregate_seeds([result, result])
    report_entry = {"seeds": [record, record], **summary.to_dict()}  # how the recipe's report.json holds a method
    assert SeedSummary.from_dict(json.loads(json.dumps(report_entry))) == summary
