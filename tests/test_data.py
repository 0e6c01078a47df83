from collections import Counter

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from robustvit.data import HFImageDataset, ImageDataset, TensorImageDataset, load_image_dataset

N_DIGITS = 1797


def _fingerprints(dataset):
    return Counter((image.numpy().tobytes(), label) for image, label in dataset)


def _pil(color=(255, 0, 0), size=8):
    return Image.new("RGB", (size, size), color)


@pytest.fixture(scope="module")
def digits_train():
    return load_image_dataset()


def test_digits_default_items(digits_train):
    ds = digits_train
    assert isinstance(ds, ImageDataset)
    assert (ds.name, ds.split, ds.num_classes) == ("digits", "train", 10)
    assert ds.class_names == [str(d) for d in range(10)]
    image, label = ds[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert isinstance(label, int)
    labels = [label for _, label in ds]
    assert set(labels) == set(range(10))
    images = torch.stack([image for image, _ in ds])
    assert images.min() >= 0.0 and images.max() <= 1.0 and images.max() > 0.9


def test_digits_splits_partition_the_data_stratified_and_deterministic(digits_train):
    test = load_image_dataset(split="test", image_size=8, channels=1)
    train = load_image_dataset(split="train", image_size=8, channels=1)
    assert len(train) + len(test) == N_DIGITS
    assert len(train) == len(digits_train)
    raw = load_digits()
    everything = Counter(
        (torch.from_numpy(img / 16).float().unsqueeze(0).numpy().tobytes(), int(y))
        for img, y in zip(raw.images, raw.target, strict=True)
    )
    # All digits images are distinct, so equal multisets mean the splits are disjoint and cover everything.
    assert _fingerprints(train) + _fingerprints(test) == everything
    test_counts = Counter(label for _, label in test)
    for digit, total in Counter(raw.target.tolist()).items():
        assert abs(test_counts[digit] - 0.2 * total) <= 1
    again = load_image_dataset(split="test", image_size=8, channels=1)
    assert torch.equal(again.images, test.images) and torch.equal(again.labels, test.labels)


@pytest.mark.parametrize("alias", ["validation", "eval"])
def test_digits_split_aliases(alias):
    ds = load_image_dataset(split=alias, image_size=8, channels=1)
    test = load_image_dataset(split="test", image_size=8, channels=1)
    assert ds.split == "test"
    assert torch.equal(ds.images, test.images)


def test_digits_channels_and_size(digits_train):
    gray = load_image_dataset(image_size=16, channels=1)
    assert gray[0][0].shape == (1, 16, 16)
    assert len(gray) == len(digits_train)
    rgb = digits_train[5][0]
    assert torch.equal(rgb[0], rgb[1]) and torch.equal(rgb[1], rgb[2])
    assert load_image_dataset(image_size=8, channels=3)[0][0].shape == (3, 8, 8)


def test_digits_bad_arguments():
    with pytest.raises(ValueError, match=r"unknown split 'dev'.*'eval', 'test', 'train', 'validation'"):
        load_image_dataset(split="dev")
    with pytest.raises(ValueError, match="channels must be one of"):
        load_image_dataset(channels=2)
    with pytest.raises(ValueError, match="image_size must be a positive int"):
        load_image_dataset(image_size=0)


def _write_imagefolder(root, splits=("train", "test"), classes=("cat", "dog"), per_class=2):
    rng = np.random.default_rng(0)
    for split in splits:
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def test_imagefolder_loads_splits_with_class_names(tmp_path):
    root = _write_imagefolder(tmp_path / "images")
    # A solid-colour image checks the conversion: resizing keeps it constant.
    _pil((255, 51, 0)).save(root / "train" / "dog" / "solid.png")
    train = load_image_dataset(str(root), split="train", image_size=16, cache_dir=str(tmp_path / "cache"))
    test = load_image_dataset(str(root), split="test", image_size=16, channels=1, cache_dir=str(tmp_path / "cache"))
    assert isinstance(train, HFImageDataset)
    assert (len(train), len(test)) == (5, 4)
    assert train.num_classes == 2 and train.class_names == ["cat", "dog"]
    assert (train.name, train.split, test.split) == (str(root), "train", "test")
    assert sorted(label for _, label in train) == [0, 0, 1, 1, 1]
    for image, _ in train:
        assert image.shape == (3, 16, 16) and image.dtype == torch.float32
        assert image.min() >= 0 and image.max() <= 1
    assert test[0][0].shape == (1, 16, 16)
    solids = [image for image, _ in train if torch.allclose(image, image[:, :1, :1].expand_as(image))]
    assert len(solids) == 1
    assert solids[0][:, 0, 0].tolist() == pytest.approx([1.0, 0.2, 0.0])


def test_imagefolder_missing_split_names_available(tmp_path):
    root = _write_imagefolder(tmp_path / "images", splits=("train",))
    with pytest.raises(ValueError, match=r"split 'test' not found.*\['train'\]"):
        load_image_dataset(str(root), split="test", cache_dir=str(tmp_path / "cache"))


@pytest.mark.hub
def test_uncached_hub_dataset_offline_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConnectionError, match=r"could not load dataset 'nobody/.*offline.*train/<class>"):
        load_image_dataset("nobody/no-such-dataset", cache_dir=str(tmp_path / "cache"))


def test_from_hf_detects_columns_and_converts_lazily():
    hf = datasets.Dataset.from_dict({"img": [_pil(), _pil((0, 0, 255))], "fine_label": [2, 0], "extra": ["a", "b"]})
    ds = ImageDataset.from_hf(hf, name="toy", split="train", image_size=4, channels=3)
    assert (ds.image_column, ds.label_column) == ("img", "fine_label")
    assert ds.class_names == ["0", "1", "2"]
    image, label = ds[0]
    assert label == 2
    assert torch.allclose(image, torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1).expand(3, 4, 4))
    gray = ImageDataset.from_hf(hf, name="toy", split="train", image_size=4, channels=1)
    assert gray[1][0].shape == (1, 4, 4)
    assert gray[1][0][0, 0, 0].item() == pytest.approx(np.asarray(_pil((0, 0, 255)).convert("L"))[0, 0] / 255)


def test_from_hf_uses_classlabel_names_and_feature_types():
    features = datasets.Features({"picture": datasets.Image(), "kind": datasets.ClassLabel(names=["ant", "bee"])})
    hf = datasets.Dataset.from_dict({"picture": [_pil()], "kind": [1]}, features=features)
    ds = ImageDataset.from_hf(hf, name="bugs", split="test")
    assert (ds.image_column, ds.label_column) == ("picture", "kind")
    assert ds.class_names == ["ant", "bee"] and ds.num_classes == 2
    assert ds[0][1] == 1 and ds[0][0].shape == (3, 32, 32)


def test_from_hf_rejects_unusable_datasets():
    with pytest.raises(ValueError, match="dataset 'unlabelled' has no label column"):
        ImageDataset.from_hf(datasets.Dataset.from_dict({"image": [_pil()]}), name="unlabelled", split="train")
    labelled = datasets.Dataset.from_dict({"image": [_pil()], "label": [0]})
    with pytest.raises(ValueError, match="split 'train' of dataset 'empty' is empty"):
        ImageDataset.from_hf(labelled.select([]), name="empty", split="train")
    with pytest.raises(ValueError, match="no image column"):
        ImageDataset.from_hf(datasets.Dataset.from_dict({"text": ["x"], "label": [0]}), name="text", split="train")
    with pytest.raises(ValueError, match="unlabelled examples"):
        ImageDataset.from_hf(datasets.Dataset.from_dict({"image": [_pil()], "label": [-1]}), name="u", split="test")
    with pytest.raises(ValueError, match="must hold integers"):
        ImageDataset.from_hf(datasets.Dataset.from_dict({"image": [_pil()], "label": ["cat"]}), name="s", split="train")


def test_tensor_dataset_validates_shapes():
    with pytest.raises(ValueError, match="expected images"):
        TensorImageDataset(torch.rand(3, 8, 8), torch.zeros(3), class_names=["a"], name="t", split="train")
    with pytest.raises(ValueError, match="expected images"):
        TensorImageDataset(torch.rand(3, 1, 8, 8), torch.zeros(2), class_names=["a"], name="t", split="train")


def test_augmentation_is_timm_transforms_and_mixup_in_pixel_space():
    from robustvit.data import Augmentation, AugmentedDataset

    digits = load_image_dataset(split="test", image_size=16)
    assert not Augmentation().per_image and Augmentation().batch_transform(10) is None  # all off by default
    paper = Augmentation("rand-m9-mstd0.5-inc1", 0.4, 0.5, 0.08, 0.25, 0.8, 1.0, 0.1)
    torch.manual_seed(0)
    augmented = AugmentedDataset(digits, paper, mean=(0.5,) * 3, std=(0.5,) * 3)
    image, label = augmented[3]
    assert image.shape == (3, 16, 16) and label == digits[3][1]
    assert not torch.equal(image, digits[3][0])
    # Back in pixel scale: apart from erased pixels (noise drawn in the normalized space) values lie in [0, 1].
    unerased = AugmentedDataset(digits, Augmentation(hflip=0.99), mean=(0.5,) * 3, std=(0.5,) * 3)
    flipped = unerased[0][0]
    assert flipped.min() >= -1e-6 and flipped.max() <= 1 + 1e-6
    torch.testing.assert_close(flipped, digits[0][0].flip(-1), atol=2 / 255, rtol=0)
    mix = paper.batch_transform(num_classes=10)
    images, targets = mix(torch.rand(5, 3, 16, 16), torch.arange(5))
    assert images.shape == (4, 3, 16, 16) and targets.shape == (4, 10)  # odd batch: the last image is dropped
    torch.testing.assert_close(targets.sum(-1), torch.ones(4))
    _, smoothed = Augmentation(label_smoothing=0.1).batch_transform(3)(torch.rand(2, 3, 4, 4), torch.tensor([0, 2]))
    torch.testing.assert_close(smoothed[0], torch.tensor([0.1 / 3 + 0.9, 0.1 / 3, 0.1 / 3]))
    with pytest.raises(ValueError, match="crop_scale"):
        Augmentation(crop_scale=0.0)
    with pytest.raises(ValueError, match="RandAugment"):
        Augmentation(rand_augment="augmix-m5")


def test_drop_path_is_set_per_block_and_refused_where_absent():
    import timm
    from timm.layers import DropPath
    from torch import nn

    from robustvit.training import set_drop_path

    model = set_drop_path(timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, depth=3), 0.2)
    rates = [block.drop_path1.drop_prob if isinstance(block.drop_path1, DropPath) else 0.0 for block in model.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2])  # timm's linear rule
    assert isinstance(model.blocks[2].drop_path2, DropPath)
    with pytest.raises(ValueError, match="drop_path1"):
        set_drop_path(nn.Linear(2, 2), 0.1)
    with pytest.raises(ValueError, match="rate"):
        set_drop_path(model, 1.0)


def _rows(labels, size=8):
    rng = np.random.default_rng(len(labels))
    images = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in labels]
    return {"image": images, "label": list(labels)}


def test_save_to_disk_folders_load_with_any_split_names(tmp_path):
    names = datasets.ClassLabel(names=["ant", "bee", "cow"])
    features = datasets.Features({"image": datasets.Image(), "label": names})
    splits = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(_rows([0, 1, 2, 1]), features=features),
            "holdout": datasets.Dataset.from_dict(_rows([2, 0]), features=features),
        }
    )
    splits.save_to_disk(tmp_path / "dict")
    holdout = load_image_dataset(str(tmp_path / "dict"), split="holdout", image_size=8, channels=1)
    assert (len(holdout), holdout.class_names, holdout.split) == (2, ["ant", "bee", "cow"], "holdout")
    assert [label for _, label in holdout] == [2, 0] and holdout[0][0].shape == (1, 8, 8)
    expected = np.asarray(splits["holdout"][0]["image"].convert("L"), dtype=np.float32) / 255
    torch.testing.assert_close(holdout[0][0][0], torch.from_numpy(expected))
    with pytest.raises(ValueError, match=r"split 'test' not found in a save_to_disk folder.*\['holdout', 'train'\]"):
        load_image_dataset(str(tmp_path / "dict"), split="test")
    # A lone Dataset is one split, named "train" when it records no name.
    splits["holdout"].save_to_disk(tmp_path / "one")
    assert len(load_image_dataset(str(tmp_path / "one"), split="train", image_size=8)) == 2
    with pytest.raises(ValueError, match=r"available splits are \['train'\]"):
        load_image_dataset(str(tmp_path / "one"), split="test")


def test_imagefolder_splits_are_its_sub_folders_whatever_their_names(tmp_path):
    root = _write_imagefolder(tmp_path / "images", splits=("train", "val", "ood", "corrupted"), per_class=1)
    _write_imagefolder(root, splits=("a_dogs_only",), classes=("dog",), per_class=1)  # first, and one class
    cache = str(tmp_path / "cache")
    for split in ("train", "validation", "ood", "corrupted"):  # val/ is "validation", as datasets names it
        ds = load_image_dataset(str(root), split=split, image_size=8, cache_dir=cache)
        assert (len(ds), ds.class_names, ds.split) == (2, ["cat", "dog"], split)
    dogs = load_image_dataset(str(root), split="a_dogs_only", image_size=8, cache_dir=cache)
    assert (dogs.class_names, dogs[0][1]) == (["cat", "dog"], 1)
    flat = _write_imagefolder(tmp_path / "flat", splits=("",), per_class=1)  # root/<class>/*.png: one train split
    assert load_image_dataset(str(flat), image_size=8, cache_dir=cache).class_names == ["cat", "dog"]


def test_test_split_labels_map_by_class_name_from_the_training_split(tmp_path):
    """An ImageFolder whose test split holds only "8" and "9": labels 8 and 9, not 0 and 1."""
    digits = load_image_dataset(split="test", image_size=8)
    root = tmp_path / "eights_and_nines" / "test"
    for index in range(len(digits)):
        image, label = digits[index]
        if label in (8, 9) and len(list(root.glob(f"{label}/*.png"))) < 2:
            (root / str(label)).mkdir(parents=True, exist_ok=True)
            Image.fromarray((image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(root / f"{label}/{index}.png")
    source, cache = str(root.parent), str(tmp_path / "cache")
    alone = load_image_dataset(source, split="test", image_size=8, cache_dir=cache)
    assert sorted(label for _, label in alone) == [0, 0, 1, 1]  # the folder's own labels: not the model's
    train = load_image_dataset(split="train", image_size=8)
    aligned = load_image_dataset(source, split="test", image_size=8, cache_dir=cache).align_labels(train.class_names)
    assert sorted(label for _, label in aligned) == [8, 8, 9, 9]
    assert aligned.class_names == train.class_names and aligned.num_classes == 10
    from robustvit.data import dataset_labels

    assert sorted(dataset_labels(aligned).tolist()) == [8, 8, 9, 9]  # read without decoding, mapped the same
    # Aligning again composes the maps; the digits (tensors) are mapped too.
    reversed_names = train.class_names[::-1]
    assert sorted(label for _, label in aligned.align_labels(reversed_names)) == [0, 0, 1, 1]
    assert load_image_dataset(split="test", image_size=8).align_labels(reversed_names)[0][1] == 9 - digits[0][1]
    with pytest.raises(
        ValueError,
        match=r"classes the training split does not: \['8', '9'\].*"
        r"Its classes: \['8', '9'\]; the training split's: \['cat', 'dog'\]",
    ):
        alone.align_labels(["cat", "dog"])


def test_a_run_can_train_on_a_stratified_subset_of_transformed_images() -> None:
    # RunConfig.max_train_images / image_transform, as the recipes' load_splits reads them: the low-data and the
    # other-data settings of bench/bench_transfer.py.
    from accelerate import Accelerator

    from robustvit.configs import RunConfig
    from robustvit.data import dataset_labels
    from robustvit.workflows.phases import load_splits

    accelerator = Accelerator(cpu=True)
    plain_train, plain_test = load_splits(accelerator, RunConfig(image_size=16))
    train, test = load_splits(accelerator, RunConfig(image_size=16, max_train_images=144, image_transform="invert"))
    assert len(train) == 144 and len(test) == len(plain_test) == 360 and train.num_classes == 10
    counts = torch.bincount(dataset_labels(train), minlength=10)
    assert counts.min() >= 14 and counts.max() <= 15  # 10 % of each class
    assert all(torch.equal(test[i][0], 1.0 - plain_test[i][0]) and test[i][1] == plain_test[i][1] for i in (0, 99))
    # The subset is seeded: another --seed, other images; the same seed, the same ones.
    again, _ = load_splits(accelerator, RunConfig(image_size=16, max_train_images=144, image_transform="invert"))
    other, _ = load_splits(accelerator, RunConfig(image_size=16, max_train_images=144, seed=1))
    assert again.indices == train.indices != other.indices
    assert torch.equal(train[0][0], 1.0 - plain_train[train.indices[0]][0])
    rotated, _ = load_splits(accelerator, RunConfig(image_size=16, image_transform="rot90"))
    assert torch.equal(rotated[5][0], torch.rot90(plain_train[5][0], 1, dims=(-2, -1)))
    with pytest.raises(KeyError, match="rot90"):  # an unknown transform names the known ones
        load_splits(accelerator, RunConfig(image_size=16, image_transform="rot45"))
    with pytest.raises(ValueError, match="max_train_images"):
        RunConfig(max_train_images=0)
