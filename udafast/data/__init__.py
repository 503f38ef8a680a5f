"""Datasets in their official layouts, the label space, and image/label transforms.

`build_dataset(name, root, split, transform=None, **options)` for the registered names (gta5,
cityscapes, synthia, folder, and whatever `register_dataset` adds); `python -m udafast.data.check
NAME ROOT` validates a dataset tree.
"""
from udafast.data.datasets import (  # noqa: F401
    Cityscapes, Folder, GTA5, SegmentationDataset, Synthia, build_dataset, dataset_names, register_dataset,
)
from udafast.data.labels import (  # noqa: F401
    CITYSCAPES_ID_TO_TRAIN, CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES, PALETTE, SYNTHIA_13, SYNTHIA_16,
    SYNTHIA_ID_TO_TRAIN, colorize,
)
from udafast.data import transforms  # noqa: F401
from udafast.data import synthetic  # noqa: F401  (registers the embedded benchmark "synthetic")
