"""The namespace every docstring example runs in (``pytest --doctest-modules``, loaded with ``-p doctest_env``).

Examples in robustvit's docstrings read like a user's session: ``torch``, ``timm`` and ``robustvit`` are imported,
``vit`` is a tiny timm ViT, ``model`` (alias ``lip``) its converted copy, ``images`` / ``labels`` a batch of pixels in
[0, 1], ``loader`` / ``train_set`` / ``test_set`` the embedded digits, ``pil_images`` two PIL images and ``hf_dataset``
a two-item ``datasets.Dataset`` of them, ``accelerator`` a CPU ``Accelerator``. Each example runs in a fresh
temporary folder, so paths like ``"outputs/..."`` are written there.
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def _digits() -> tuple:
    """The embedded digits at 32x32 (train, test), loaded once: examples only read them."""
    from robustvit.data import load_image_dataset

    return load_image_dataset(split="train", image_size=32), load_image_dataset(split="test", image_size=32)


@pytest.fixture(autouse=True)
def _doctest_env(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path, doctest_namespace: dict
) -> None:
    if not isinstance(request.node, pytest.DoctestItem):  # ordinary tests build their own models
        return
    import datasets
    import PIL.Image
    import timm
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from torch import nn

    import robustvit

    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3, num_classes=10
    )
    model = robustvit.convert(vit)
    images, labels = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    train_set, test_set = request.getfixturevalue("_digits")
    loader = torch.utils.data.DataLoader(train_set, batch_size=32)
    pil_images = [PIL.Image.new("RGB", (8, 8), color) for color in ("red", "blue")]
    doctest_namespace.update(
        torch=torch,
        nn=nn,
        F=F,
        timm=timm,
        robustvit=robustvit,
        vit=vit,
        model=model,
        lip=model,
        images=images,
        labels=labels,
        os=os,
        datasets=datasets,
        test_set=test_set,
        train_set=train_set,
        pil_images=pil_images,
        hf_dataset=datasets.Dataset.from_dict({"image": pil_images, "label": [0, 1]}),
        loader=loader,
        accelerator=Accelerator(cpu=True),
        optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
    )
    monkeypatch.chdir(tmp_path)
