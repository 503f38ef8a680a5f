"""Datasets in their official layouts, the label space, and image/label transforms.

`build_dataset(name, root, split, transform=None, **options)` for the registered names (gta5,
cityscapes, synthia, folder, and whatever `register_dataset` adds); `python -m udafast.data.check
NAME ROOT` validates a dataset tree. A sample that cannot be trained on (a file that does not
decode, a label of another size than its image, label values outside the dataset's table) raises
`BadSampleError` (a ValueError) naming the file.
"""
from udafast.data.datasets import (  # noqa: F401
    Cityscapes, Folder, GTA5, SegmentationDataset, Synthia, build_dataset, dataset_names, register_dataset,
)
from udafast.data.io import BadSampleError  # noqa: F401
from udafast.data.labels import (  # noqa: F401
    CITYSCAPES_ID_TO_TRAIN, CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES, PALETTE, SYNTHIA_13, SYNTHIA_16,
    SYNTHIA_ID_TO_TRAIN, colorize,
)
from udafast.data import strong_view, transforms  # noqa: F401
from udafast.data import synthetic  # noqa: F401  (registers the embedded benchmark "synthetic")
