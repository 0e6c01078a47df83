"""Image classification datasets yielding ``(image, label)`` pairs.

Images are float32 tensors ``(C, H, W)`` in ``[0, 1]`` and labels are ints, whatever the source:
the embedded scikit-learn digits (default, works offline), a local ``imagefolder`` directory, a folder written by
``datasets`` ``save_to_disk``, or a Hugging Face datasets id. Labels are class indices; an evaluation split is read in
the training split's label space with ``test.align_labels(train.class_names)`` (classes matched by name).

Example:
    >>> from robustvit.data import load_image_dataset
    >>> train = load_image_dataset(split="train", image_size=32)
    >>> image, label = train[0]
    >>> image.shape, train.num_classes
    (torch.Size([3, 32, 32]), 10)
"""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from datasets.data_files import SPLIT_KEYWORDS
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from timm.data import Mixup, create_transform
from timm.data.mixup import mixup_target
from torch.utils.data import Dataset, Subset
from torchvision.transforms.functional import to_pil_image

from robustvit.registry import Registry
from robustvit.settings import arg

__all__ = [
    "IMAGE_TRANSFORMS",
    "Augmentation",
    "AugmentedDataset",
    "HFImageDataset",
    "ImageDataset",
    "ImageDatasetView",
    "TensorImageDataset",
    "dataset_labels",
    "load_image_dataset",
    "stratified_subset",
]

_PIL_MODES: dict[int, str] = {1: "L", 3: "RGB"}
_IMAGE_COLUMNS = ("image", "img", "pixel_values")
_LABEL_COLUMNS = ("label", "labels", "fine_label")

_DIGITS_SPLITS: dict[str, str] = {"train": "train", "test": "test", "validation": "test", "eval": "test"}
_DIGITS_TEST_FRACTION = 0.2
_DIGITS_SEED = 0
_DIGITS_MAX_VALUE = 16.0
_SAVED_DICT_MARKER = "dataset_dict.json"  # what DatasetDict.save_to_disk writes at the folder's root
_SAVED_SPLIT_MARKER = "state.json"  # what Dataset.save_to_disk writes
_SPLIT_NAMES = {keyword: str(split) for split, keywords in SPLIT_KEYWORDS.items() for keyword in keywords}


class ImageDataset(Dataset, ABC):
    """A classification dataset of ``(image, label)`` pairs with its class metadata.

    Subclasses decide how items are stored; every item is a float32 tensor ``(C, H, W)`` in ``[0, 1]``
    and an int label in ``range(num_classes)``.

    Attributes:
        num_classes: Number of classes.
        class_names: Human-readable name of each class, indexed by label.
        name: Where the data came from (``"digits"``, a directory or a Hugging Face id).
        split: The split held, e.g. ``"train"`` or ``"test"``.

    Example:
        >>> ds = ImageDataset.from_hf(hf_dataset, name="my-images", split="train", image_size=32)
        >>> image, label = ds[0]
        >>> image.shape, label, ds.num_classes
        (torch.Size([3, 32, 32]), 0, 2)
    """

    def __init__(self, *, class_names: Sequence[str], name: str, split: str) -> None:
        self.class_names = [str(c) for c in class_names]
        self.num_classes = len(self.class_names)
        self.name = name
        self.split = split

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]: ...

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, "
            f"len={len(self)}, num_classes={self.num_classes})"
        )

    def align_labels(self, class_names: Sequence[str]) -> ImageDataset:
        """This split with its labels mapped by class name into ``class_names`` (the training split's).

        A test split holding only some of the classes keeps each class's training label; one holding a class the
        training split lacks is refused, since no label of the model means it.

        Raises:
            ValueError: a class of this split is not in ``class_names``; the message names both sets.

        Example:
            >>> test = TensorImageDataset(torch.rand(2, 3, 8, 8), torch.tensor([0, 1]), class_names=["8", "9"],
            ...                           name="toy", split="test")
            >>> aligned = test.align_labels([str(d) for d in range(10)])
            >>> [label for _, label in aligned], aligned.num_classes
            ([8, 9], 10)
        """
        target = [str(c) for c in class_names]
        if len(set(target)) != len(target):
            raise ValueError(f"class names must be distinct, got {target}")
        unknown = [c for c in self.class_names if c not in target]
        if unknown:
            raise ValueError(
                f"split {self.split!r} of {self.name!r} has classes the training split does not: {unknown}. "
                f"Its classes: {self.class_names}; the training split's: {target}"
            )
        return self._relabelled([target.index(c) for c in self.class_names], target)

    @abstractmethod
    def _relabelled(self, label_map: list[int], class_names: list[str]) -> ImageDataset:
        """A copy whose label ``i`` reads ``label_map[i]``, with ``class_names``."""

    def stratified(self, count: int, *, seed: int = 0) -> ImageDataset:
        """A seeded, class-stratified subset of ``count`` items (:func:`stratified_subset`), still an
        ImageDataset (this one if ``count`` covers it): e.g. a low-data training split.

        Example:
            >>> few = load_image_dataset(split="train").stratified(144, seed=0)
            >>> len(few), few.num_classes, torch.bincount(dataset_labels(few)).min().item()
            (144, 10, 14)
        """
        chosen = stratified_subset(self, count, seed=seed)
        return self if chosen is self else ImageDatasetView(self, indices=chosen.indices)

    def transformed(self, name: str) -> ImageDataset:
        """Every image through ``IMAGE_TRANSFORMS[name]``, the labels kept: a shifted copy of the data.

        Example:
            >>> test = load_image_dataset(split="test", image_size=16)
            >>> torch.equal(test.transformed("rot90")[0][0], torch.rot90(test[0][0], 1, dims=(-2, -1)))
            True
        """
        return ImageDatasetView(self, transform=name)

    @classmethod
    def from_hf(
        cls,
        hf_dataset: datasets.Dataset,
        *,
        name: str,
        split: str,
        image_size: int = 32,
        channels: int = 3,
    ) -> HFImageDataset:
        """Wrap an in-memory Hugging Face ``datasets.Dataset``, detecting its image and label columns.

        The image column is the first of ``image``, ``img``, ``pixel_values``, else the first ``datasets.Image``
        column; the label column is the first of ``label``, ``labels``, ``fine_label``, else the first
        ``datasets.ClassLabel`` column. Class names come from the ``ClassLabel`` feature when there is one;
        plain integer labels get names ``"0"`` to the largest label present in this split.

        Args:
            hf_dataset: One split of a Hugging Face dataset.
            name: Name recorded on the result (the dataset id or path).
            split: Split name recorded on the result.
            image_size: Side length images are resized to.
            channels: 3 for RGB, 1 for grayscale.

        Returns:
            A dataset converting images lazily, one item at a time.

        Raises:
            ValueError: The dataset is empty, has no image or label column, or has negative (missing) labels.

        Example:
            >>> hf = datasets.Dataset.from_dict({"image": pil_images, "label": [0, 1]})
            >>> ds = ImageDataset.from_hf(hf, name="toy", split="train", image_size=16, channels=1)
            >>> len(ds), ds[1][0].shape, ds[1][1]
            (2, torch.Size([1, 16, 16]), 1)
        """
        _check_image_format(image_size, channels)
        if len(hf_dataset) == 0:
            raise ValueError(f"split {split!r} of dataset {name!r} is empty")
        features = hf_dataset.features
        image_column = _find_column(features, _IMAGE_COLUMNS, datasets.Image)
        if image_column is None:
            raise ValueError(f"dataset {name!r} has no image column; columns are {list(features)}")
        label_column = _find_column(features, _LABEL_COLUMNS, datasets.ClassLabel)
        if label_column is None:
            raise ValueError(
                f"dataset {name!r} has no label column: expected one of {list(_LABEL_COLUMNS)} or a ClassLabel "
                f"feature, columns are {list(features)}"
            )
        labels = hf_dataset.unique(label_column)
        if not all(isinstance(label, (int, np.integer)) for label in labels):
            raise ValueError(f"label column {label_column!r} of dataset {name!r} must hold integers or a ClassLabel")
        if min(labels) < 0:
            raise ValueError(f"split {split!r} of dataset {name!r} has unlabelled examples (label {min(labels)})")
        label_feature = features[label_column]
        if isinstance(label_feature, datasets.ClassLabel):
            class_names = label_feature.names
        else:
            class_names = [str(i) for i in range(max(labels) + 1)]
        return HFImageDataset(
            hf_dataset,
            image_column=image_column,
            label_column=label_column,
            class_names=class_names,
            name=name,
            split=split,
            image_size=image_size,
            channels=channels,
        )


class TensorImageDataset(ImageDataset):
    """Images already converted to one tensor ``(N, C, H, W)``, with int labels ``(N,)``.

    Example:
        >>> ds = TensorImageDataset(torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 0, 1]),
        ...                         class_names=["a", "b"], name="toy", split="train")
        >>> ds[1][1]
        1
    """

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, *, class_names: Sequence[str], name: str, split: str
    ) -> None:
        super().__init__(class_names=class_names, name=name, split=split)
        if images.dim() != 4 or labels.shape != images.shape[:1]:
            raise ValueError(
                f"expected images (N, C, H, W) and labels (N,), got {tuple(images.shape)} and {tuple(labels.shape)}"
            )
        self.images = images.to(torch.float32)
        self.labels = labels.to(torch.int64)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])

    def _relabelled(self, label_map: list[int], class_names: list[str]) -> TensorImageDataset:
        labels = torch.as_tensor(label_map, dtype=torch.int64)[self.labels]
        return TensorImageDataset(self.images, labels, class_names=class_names, name=self.name, split=self.split)


IMAGE_TRANSFORMS: Registry[Callable[[torch.Tensor], torch.Tensor]] = Registry("image transform")
"""Label-preserving image transforms by name (:meth:`ImageDataset.transformed`, ``--image_transform``): each maps
an image ``(C, H, W)`` in ``[0, 1]`` to another in ``[0, 1]``."""
IMAGE_TRANSFORMS.register(
    "rot90", lambda image: torch.rot90(image, 1, dims=(-2, -1))
)  # a quarter turn, counter-clockwise
IMAGE_TRANSFORMS.register("invert", lambda image: 1.0 - image)  # dark strokes on a light background


class ImageDatasetView(ImageDataset):
    """Some items of an ImageDataset (``indices``, default all), each image through ``IMAGE_TRANSFORMS[transform]``
    (default none), with the dataset's class metadata (a torch ``Subset`` keeps none).

    Example:
        >>> view = ImageDatasetView(load_image_dataset(split="test"), indices=[3, 1], transform="invert")
        >>> len(view), view[0][1] == load_image_dataset(split="test")[3][1]
        (2, True)
    """

    def __init__(
        self, dataset: ImageDataset, *, indices: Sequence[int] | None = None, transform: str | None = None
    ) -> None:
        super().__init__(class_names=dataset.class_names, name=dataset.name, split=dataset.split)
        self.dataset = dataset
        self.indices = list(range(len(dataset))) if indices is None else [int(index) for index in indices]
        self.transform = transform
        self._apply = (lambda image: image) if transform is None else IMAGE_TRANSFORMS[transform]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.dataset[self.indices[index]]
        return self._apply(image), label

    def _relabelled(self, label_map: list[int], class_names: list[str]) -> ImageDatasetView:
        relabelled = self.dataset._relabelled(label_map, class_names)
        return ImageDatasetView(relabelled, indices=self.indices, transform=self.transform)


class HFImageDataset(ImageDataset):
    """A Hugging Face dataset whose images are converted lazily, one item at a time.

    Prefer :meth:`ImageDataset.from_hf`, which detects the columns and class names.

    Example:
        >>> hf = datasets.Dataset.from_dict({"img": pil_images, "label": [0, 1]})
        >>> ds = HFImageDataset(hf, image_column="img", label_column="label", class_names=["a", "b"],
        ...                     name="toy", split="train", image_size=32, channels=3)
        >>> ds[0][0].shape, ds.class_names
        (torch.Size([3, 32, 32]), ['a', 'b'])
    """

    def __init__(
        self,
        hf_dataset: datasets.Dataset,
        *,
        image_column: str,
        label_column: str,
        class_names: Sequence[str],
        name: str,
        split: str,
        image_size: int = 32,
        channels: int = 3,
        label_map: Sequence[int] | None = None,
    ) -> None:
        super().__init__(class_names=class_names, name=name, split=split)
        _check_image_format(image_size, channels)
        self.hf_dataset = hf_dataset
        self.image_column = image_column
        self.label_column = label_column
        self.image_size = image_size
        self.channels = channels
        self.label_map = None if label_map is None else [int(label) for label in label_map]

    def __len__(self) -> int:
        return len(self.hf_dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        row = self.hf_dataset[index]
        image = _pil_to_tensor(row[self.image_column], self.image_size, self.channels)
        label = int(row[self.label_column])
        return image, label if self.label_map is None else self.label_map[label]

    def labels(self) -> torch.Tensor:
        """Every item's label, read from the label column without decoding images."""
        labels = torch.as_tensor(self.hf_dataset[self.label_column], dtype=torch.int64)
        return labels if self.label_map is None else torch.as_tensor(self.label_map, dtype=torch.int64)[labels]

    def _relabelled(self, label_map: list[int], class_names: list[str]) -> HFImageDataset:
        if self.label_map is not None:
            label_map = [label_map[label] for label in self.label_map]
        return HFImageDataset(
            self.hf_dataset,
            image_column=self.image_column,
            label_column=self.label_column,
            class_names=class_names,
            name=self.name,
            split=self.split,
            image_size=self.image_size,
            channels=self.channels,
            label_map=label_map,
        )


def load_image_dataset(
    source: str | None = None,
    *,
    split: str = "train",
    image_size: int = 32,
    channels: int = 3,
    cache_dir: str | None = None,
) -> ImageDataset:
    """Load one split of an image classification dataset.

    Args:
        source: ``None`` for the embedded scikit-learn digits (1797 8x8 images, 10 classes, a fixed stratified
            80/20 train/test split); a folder written by ``datasets``' ``save_to_disk`` (a ``DatasetDict``: any
            split names; a single ``Dataset``: its one split, named ``"train"`` unless it records another); a
            directory in ``imagefolder`` layout, either ``root/<split>/<class>/*.png`` with any split names
            (``val/``, ``dev/`` are ``"validation"`` and ``eval/`` is ``"test"``, as ``datasets`` names them) or
            ``root/<class>/*.png`` (one ``"train"`` split); otherwise a Hugging Face datasets id, which must
            already be cached when offline.
        split: Split to load. For digits: ``"train"`` or ``"test"`` (``"validation"`` and ``"eval"`` alias
            ``"test"``).
        image_size: Side length images are resized to.
        channels: 3 for RGB, 1 for greyscale (digits are replicated across channels; other images are converted
            with PIL's ``"L"`` mode, ITU-R 601-2 luma).
        cache_dir: Hugging Face datasets cache directory; unused for digits and ``save_to_disk`` folders.

    Returns:
        The dataset; items are ``(float32 image (channels, image_size, image_size) in [0, 1], int label)``, labels
        indexing this split's own ``class_names``: read an evaluation split through the training split's classes
        with :meth:`ImageDataset.align_labels`.

    Raises:
        ValueError: Unknown split, unsupported ``image_size``/``channels``, or a dataset without labels.
        ConnectionError: A Hugging Face id that is neither cached nor reachable.

    Example:
        >>> test = load_image_dataset(split="test", image_size=16, channels=1)
        >>> len(test), test[0][0].shape
        (360, torch.Size([1, 16, 16]))
        >>> from PIL import Image
        >>> for i, cls in enumerate(["cat", "dog"] * 2):  # a folder laid out as root/train/<class>/*.png
        ...     os.makedirs(f"images/train/{cls}", exist_ok=True)
        ...     Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(f"images/train/{cls}/{i}.png")
        >>> folder = load_image_dataset("images", split="train", image_size=16)
        >>> len(folder), folder.class_names
        (4, ['cat', 'dog'])
        >>> os.makedirs("images/test/dog")  # a test split holding only one of the classes
        >>> Image.new("RGB", (8, 8)).save("images/test/dog/0.png")
        >>> dogs = load_image_dataset("images", split="test", image_size=16).align_labels(folder.class_names)
        >>> dogs[0][1], dogs.class_names
        (1, ['cat', 'dog'])
    """
    _check_image_format(image_size, channels)
    if source is None:
        return _load_digits(split, image_size, channels)
    if _is_saved_dataset(source):
        return _load_saved(source, split, image_size, channels)
    if os.path.isdir(source):
        return _load_imagefolder(source, split, image_size, channels, cache_dir)
    return _load_hub(source, split, image_size, channels, cache_dir)


def _load_digits(split: str, image_size: int, channels: int) -> TensorImageDataset:
    if split not in _DIGITS_SPLITS:
        raise ValueError(f"unknown split {split!r} for digits; valid splits are {sorted(_DIGITS_SPLITS)}")
    split = _DIGITS_SPLITS[split]
    digits = load_digits()
    train_idx, test_idx = train_test_split(
        np.arange(len(digits.target)),
        test_size=_DIGITS_TEST_FRACTION,
        stratify=digits.target,
        random_state=_DIGITS_SEED,
    )
    # Sorted so each split keeps the source order; shuffling is the DataLoader's job.
    index = np.sort(train_idx if split == "train" else test_idx)
    images = torch.from_numpy(digits.images[index] / _DIGITS_MAX_VALUE).to(torch.float32).unsqueeze(1)
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = images.clamp(0.0, 1.0).expand(-1, channels, -1, -1).contiguous()
    return TensorImageDataset(
        images,
        torch.from_numpy(digits.target[index]),
        class_names=[str(name) for name in digits.target_names],
        name="digits",
        split=split,
    )


def _is_saved_dataset(source: str) -> bool:
    """A folder ``save_to_disk`` wrote: a ``DatasetDict`` (``dataset_dict.json``) or a ``Dataset`` (``state.json``)."""
    return any(os.path.isfile(os.path.join(source, marker)) for marker in (_SAVED_DICT_MARKER, _SAVED_SPLIT_MARKER))


def _load_saved(source: str, split: str, image_size: int, channels: int) -> HFImageDataset:
    saved = datasets.load_from_disk(source)
    # A lone Dataset is one split: the name it was saved with, or "train" (Dataset.from_dict records none).
    splits = saved if isinstance(saved, datasets.DatasetDict) else {str(saved.split or "train"): saved}
    return ImageDataset.from_hf(
        _pick_split(splits, split, source, "a save_to_disk folder"),
        name=source,
        split=split,
        image_size=image_size,
        channels=channels,
    )


def _load_imagefolder(source: str, split: str, image_size: int, channels: int, cache_dir: str | None) -> HFImageDataset:
    split_dirs = _split_directories(source)
    if split_dirs:  # one split per sub-folder, whatever its name (data_dir alone keeps only train/test/validation)
        data_files: dict[str, list[str]] = {}
        for folder in split_dirs:  # named as datasets names them: val/ and dev/ are "validation", eval/ is "test"
            split_name = _SPLIT_NAMES.get(folder.lower(), folder)
            data_files.setdefault(split_name, []).append(os.path.join(source, folder, "**"))
        # drop_labels=False: by default datasets labels a split only once it has seen two class folders in it or
        # the splits before it, so a first split holding one class would come back unlabelled.
        splits = datasets.load_dataset("imagefolder", data_files=data_files, drop_labels=False, cache_dir=cache_dir)
    else:  # root/<class>/*.png: datasets makes it one "train" split
        splits = datasets.load_dataset("imagefolder", data_dir=source, cache_dir=cache_dir)
    hf_split = _pick_split(splits, split, source, "image folder (splits are its sub-folders root/<split>/<class>/)")
    return ImageDataset.from_hf(hf_split, name=source, split=split, image_size=image_size, channels=channels)


def _split_directories(source: str) -> list[str]:
    """The sub-folders of an ``imagefolder`` root that are splits (they hold class folders), else ``[]``."""
    entries = [entry for entry in os.scandir(source) if not entry.name.startswith(".")]
    folders = [entry for entry in entries if entry.is_dir()]
    if not folders or len(folders) != len(entries):
        return []
    holds_folders = [any(child.is_dir() for child in os.scandir(folder.path)) for folder in folders]
    return sorted(folder.name for folder in folders) if all(holds_folders) else []


def _pick_split(splits: Mapping[str, datasets.Dataset], split: str, source: str, kind: str) -> datasets.Dataset:
    if split not in splits:
        raise ValueError(f"split {split!r} not found in {kind} {source!r}; available splits are {sorted(splits)}")
    return splits[split]


def _load_hub(source: str, split: str, image_size: int, channels: int, cache_dir: str | None) -> HFImageDataset:
    try:
        hf_dataset = datasets.load_dataset(source, split=split, cache_dir=cache_dir)
    except ConnectionError as err:
        raise ConnectionError(
            f"could not load dataset {source!r}: it is not in the local cache and the Hugging Face Hub is "
            f"unreachable (offline?). No local directory named {source!r} exists either. To use local images, "
            f"pass a directory laid out as root/train/<class>/*.png (and optionally root/test/<class>/...)."
        ) from err
    return ImageDataset.from_hf(hf_dataset, name=source, split=split, image_size=image_size, channels=channels)


def _check_image_format(image_size: int, channels: int) -> None:
    if channels not in _PIL_MODES:
        raise ValueError(f"channels must be one of {sorted(_PIL_MODES)}, got {channels!r}")
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")


def _find_column(features: datasets.Features, names: Sequence[str], feature_type: type) -> str | None:
    for name in names:
        if name in features:
            return name
    return next((column for column, feature in features.items() if isinstance(feature, feature_type)), None)


def _pil_to_tensor(image: Image.Image, image_size: int, channels: int) -> torch.Tensor:
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image in the image column, got {type(image).__name__}")
    image = image.convert(_PIL_MODES[channels]).resize((image_size, image_size), Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.float32) / 255.0
    # "L" images come back (H, W) and "RGB" ones (H, W, C); both end up (C, H, W).
    return torch.from_numpy(array.reshape(image_size, image_size, channels)).permute(2, 0, 1).contiguous()


def stack_examples(dataset: Dataset, count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` (all when ``None``) examples of ``dataset`` as ``(images, labels)`` tensors.

    Always the same images, so certificates computed on them can be re-checked.

    Example:
        >>> images, labels = stack_examples(load_image_dataset(split="test"), 100)
        >>> images.shape, labels.shape
        (torch.Size([100, 3, 32, 32]), torch.Size([100]))
    """
    count = len(dataset) if count is None else min(count, len(dataset))
    if count < 1:
        raise ValueError("the dataset is empty")
    items = [dataset[i] for i in range(count)]
    return torch.stack([image for image, _ in items]), torch.tensor([int(label) for _, label in items])


def dataset_labels(dataset: Dataset) -> torch.Tensor:
    """The int label of every item, read without decoding images where the dataset allows it.

    Example:
        >>> dataset_labels(load_image_dataset(split="test"))[:3]
        tensor([1, 4, 8])
    """
    if isinstance(dataset, TensorImageDataset):
        return dataset.labels.clone()
    if isinstance(dataset, HFImageDataset):
        return dataset.labels()
    if isinstance(dataset, (Subset, ImageDatasetView)):
        return dataset_labels(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.int64)]
    return torch.tensor([int(dataset[index][1]) for index in range(len(dataset))], dtype=torch.int64)


def stratified_subset(dataset: Dataset, count: int, *, seed: int = 0) -> Dataset:
    """A random subset of ``count`` items with each class in proportion to its share (the whole dataset if smaller).

    Evaluation splits are often sorted by class, so their first N items would test a few classes only. Within
    each class the order is a seeded shuffle; item ``i`` of a class of ``n`` gets the key ``(i + u) / n`` (``u``
    uniform), and the ``count`` smallest keys are kept: proportional allocation, random in every other respect.
    The indices are returned in dataset order.

    Example:
        >>> subset = stratified_subset(load_image_dataset(split="test"), 100, seed=0)
        >>> torch.bincount(dataset_labels(subset))
        tensor([10, 10,  9, 11, 10, 10, 10, 10, 10, 10])
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be an int >= 1, got {count!r}")
    if count >= len(dataset):
        return dataset
    labels = dataset_labels(dataset)
    generator = torch.Generator().manual_seed(seed)
    keys = torch.empty(len(labels), dtype=torch.float64)
    for label in labels.unique():
        members = (labels == label).nonzero().flatten()
        shuffled = members[torch.randperm(len(members), generator=generator)]
        jitter = torch.rand(len(members), generator=generator, dtype=torch.float64)
        keys[shuffled] = (torch.arange(len(members), dtype=torch.float64) + jitter) / len(members)
    chosen = torch.sort(torch.argsort(keys)[:count]).values
    return Subset(dataset, chosen.tolist())


@dataclass(frozen=True)
class Augmentation:
    """timm's training augmentation, as the nullspace paper finetunes (timm's train script); all off by default.

    Image-level parts run in :class:`AugmentedDataset` through ``timm.data.create_transform``; batch-level parts
    (mixup, cutmix, label smoothing) through ``timm.data.Mixup`` in :meth:`batch_transform`, which turns labels into
    soft targets that ``F.cross_entropy`` takes as they are. The defaults suit small data such as the embedded
    8x8 digits: every part off (a flip changes a digit, RandAugment and crops destroy 8x8 strokes).

    Attributes:
        rand_augment: timm RandAugment spec, e.g. ``"rand-m9-mstd0.5-inc1"`` (the paper); ``None`` for none.
        color_jitter: Colour-jitter strength (the paper: 0.4; timm applies it only without RandAugment).
        hflip: Horizontal flip probability.
        crop_scale: Smallest area fraction of the random resized crop; 1.0 keeps the whole image (no crop).
        random_erasing: Random-erasing probability (the paper: 0.25).
        mixup: Mixup alpha (the paper: 0.8); 0 for none.
        cutmix: CutMix alpha (the paper: 1.0); 0 for none.
        label_smoothing: Label smoothing (the paper: 0.1).

    Example:
        >>> paper = Augmentation("rand-m9-mstd0.5-inc1", 0.4, 0.5, 0.08, 0.25, 0.8, 1.0, 0.1)
        >>> train = AugmentedDataset(train_set, paper, mean=(0.5,) * 3, std=(0.5,) * 3)
        >>> train[0][0].shape
        torch.Size([3, 32, 32])
        >>> mix = paper.batch_transform(num_classes=10)
        >>> images, targets = mix(images, labels)  # targets (B, 10), soft
        >>> targets.shape, bool(torch.allclose(targets.sum(-1), torch.ones(8)))
        (torch.Size([8, 10]), True)
    """

    rand_augment: str | None = arg(None, "timm RandAugment spec (paper: rand-m9-mstd0.5-inc1)")
    color_jitter: float = arg(0.0, "colour-jitter strength (paper: 0.4; unused with RandAugment)")
    hflip: float = arg(0.0, "horizontal flip probability (paper: 0.5)")
    crop_scale: float = arg(1.0, "smallest area fraction of the random resized crop (paper: 0.08; 1: no crop)")
    random_erasing: float = arg(0.0, "random-erasing probability (paper: 0.25)")
    mixup: float = arg(0.0, "mixup alpha (paper: 0.8)")
    cutmix: float = arg(0.0, "cutmix alpha (paper: 1.0)")
    label_smoothing: float = arg(0.0, "label smoothing (paper: 0.1)")

    def __post_init__(self) -> None:
        for name in ("color_jitter", "mixup", "cutmix"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)!r}")
        for name in ("hflip", "random_erasing", "label_smoothing"):
            if not 0 <= getattr(self, name) < 1 or (name == "hflip" and getattr(self, name) > 1):
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if not 0 < self.crop_scale <= 1:
            raise ValueError(f"crop_scale must be in (0, 1], got {self.crop_scale!r}")
        if self.rand_augment is not None and not self.rand_augment.startswith("rand"):
            raise ValueError(
                f"rand_augment must be a timm RandAugment spec like 'rand-m9-mstd0.5-inc1', got {self.rand_augment!r}"
            )

    @property
    def per_image(self) -> bool:
        """Whether any image-level part is on (else the training set is used as it is)."""
        return bool(self.rand_augment or self.color_jitter or self.hflip or self.random_erasing) or self.crop_scale < 1

    def image_transform(self, image_size: int, mean: Sequence[float], std: Sequence[float]) -> Callable:
        """timm's training transform (PIL in, normalized tensor out), or raise if no image-level part is on."""
        if not self.per_image:
            raise ValueError("no image-level augmentation is enabled")
        return create_transform(
            image_size,
            is_training=True,
            scale=(self.crop_scale, 1.0),
            ratio=(3 / 4, 4 / 3) if self.crop_scale < 1 else (1.0, 1.0),
            hflip=self.hflip,
            color_jitter=self.color_jitter,
            auto_augment=self.rand_augment,
            interpolation="bicubic",
            re_prob=self.random_erasing,
            re_mode="pixel",
            mean=tuple(mean),
            std=tuple(std),
        )

    def batch_transform(self, num_classes: int) -> Callable[[torch.Tensor, torch.Tensor], tuple] | None:
        """``(images, labels) -> (images, soft targets (B, num_classes))``, or ``None`` when nothing mixes or smooths.

        timm's batch mixup needs an even batch: an odd batch loses its last image.
        """
        if self.mixup or self.cutmix:
            mix = Mixup(
                mixup_alpha=self.mixup,
                cutmix_alpha=self.cutmix,
                label_smoothing=self.label_smoothing,
                num_classes=num_classes,
            )

            def mixed(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                even = images.shape[0] - images.shape[0] % 2
                if even == 0:
                    raise ValueError("mixup / cutmix need batches of at least 2 images")
                return mix(images[:even], labels[:even])

            return mixed
        if self.label_smoothing:

            def smoothed(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                return images, mixup_target(labels, num_classes, smoothing=self.label_smoothing)

            return smoothed
        return None


class AugmentedDataset(Dataset):
    """A pixel dataset passed through :meth:`Augmentation.image_transform` item by item; pixels in, pixels out.

    The image goes to PIL and through timm's transform, normalized with the model's ``mean`` / ``std`` so that
    random erasing fills with noise of the model's input statistics, and back to the pixel scale (erased pixels
    may leave ``[0, 1]``, as in timm, where they are drawn in the normalized space).

    Example:
        >>> train = AugmentedDataset(load_image_dataset(split="train"), Augmentation(hflip=0.5),
        ...                          mean=(0.5,) * 3, std=(0.5,) * 3)
    """

    def __init__(
        self, dataset: Dataset, augmentation: Augmentation, *, mean: Sequence[float], std: Sequence[float]
    ) -> None:
        image = dataset[0][0]
        if not isinstance(image, torch.Tensor) or image.dim() != 3:
            raise ValueError("AugmentedDataset needs (image tensor (C, H, W), label) items")
        if image.shape[1] != image.shape[2]:
            raise ValueError(f"AugmentedDataset needs square images, got {tuple(image.shape)}")
        self.dataset = dataset
        self.transform = augmentation.image_transform(image.shape[-1], mean, std)
        self.mean = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.dataset[index]
        pil = to_pil_image(image.clamp(0, 1))
        return self.transform(pil) * self.std + self.mean, label
