"""Run by .ci/run from outside the checkout, in a fresh environment where only the built wheel provides robustvit:
convert, certify, save and load a certified model (the model card template must ship as package data)."""

import sys
import tempfile
from pathlib import Path

import timm
import torch

import robustvit

assert "site-packages" in robustvit.__file__ and sys.prefix in robustvit.__file__, robustvit.__file__
torch.manual_seed(0)
source = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=48, num_classes=4)
model = robustvit.convert(source)
images, labels = torch.rand(8, 3, 32, 32), torch.randint(0, 4, (8,))
certificate = robustvit.certify(model, images, labels).to_certificate(model, dataset="random", split="test")
with tempfile.TemporaryDirectory() as folder:
    robustvit.save_pretrained(model, folder, certificate)
    assert "robustvit" in (Path(folder) / "README.md").read_text()
    loaded = robustvit.from_pretrained(folder)
    torch.testing.assert_close(loaded(images), model(images))
print(f"wheel smoke test passed: {robustvit.__file__}")
