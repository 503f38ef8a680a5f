"""The label space (SPEC part 3): the 19 Cityscapes train ids, 255 = ignore.

Tables of raw label ids -> train ids for Cityscapes/GTA5 (from `cityscapesscripts`) and
SYNTHIA-RAND-CITYSCAPES (SPEC part 3), the class names, the Cityscapes colour palette, the SYNTHIA
evaluation subsets, and `colorize`.
"""
from typing import Dict, Mapping

import numpy as np
import torch
from cityscapesscripts.helpers.labels import labels as _CS_LABELS

IGNORE_INDEX = 255
NUM_CLASSES = 19

_TRAIN_LABELS = sorted((l for l in _CS_LABELS if 0 <= l.trainId < 255), key=lambda l: l.trainId)
assert [l.trainId for l in _TRAIN_LABELS] == list(range(NUM_CLASSES))

#: The 19 class names, indexed by train id.
CLASS_NAMES = tuple(l.name for l in _TRAIN_LABELS)

#: The Cityscapes colour of each train id, uint8 [19, 3] RGB.
PALETTE = np.array([l.color for l in _TRAIN_LABELS], dtype=np.uint8)

#: Cityscapes label id -> train id for every label id of the Cityscapes table (ids without a train
#: id map to 255). GTA5 label PNGs use the same ids.
CITYSCAPES_ID_TO_TRAIN: Dict[int, int] = {
    int(l.id): (int(l.trainId) if 0 <= l.trainId < 255 else IGNORE_INDEX) for l in _CS_LABELS if l.id >= 0
}

#: SYNTHIA-RAND-CITYSCAPES raw class id -> train id (SPEC part 3). Raw ids 0..22 are SYNTHIA's
#: classes; those not listed here (void, parking-slot, road-work, lanemarking, terrain, truck,
#: train) map to 255.
_SYNTHIA_TRAIN = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 1: 10, 10: 11, 17: 12,
                  8: 13, 19: 15, 12: 17, 11: 18}
SYNTHIA_ID_TO_TRAIN: Dict[int, int] = {i: _SYNTHIA_TRAIN.get(i, IGNORE_INDEX) for i in range(23)}

#: Train ids scored on SYNTHIA -> Cityscapes: `miou` over 16 classes, `miou13` without wall,
#: fence and pole.
SYNTHIA_16 = tuple(sorted(_SYNTHIA_TRAIN.values()))
SYNTHIA_13 = tuple(c for c in SYNTHIA_16 if c not in (3, 4, 5))
assert len(SYNTHIA_16) == 16 and len(SYNTHIA_13) == 13


def lookup_table(table: Mapping[int, int], size: int = 65536) -> np.ndarray:
    """A uint8 array `lut` of `size` entries with `lut[raw] = table[raw]`, 255 elsewhere."""
    lut = np.full(size, IGNORE_INDEX, dtype=np.uint8)
    for raw, train in table.items():
        raw, train = int(raw), int(train)
        if not 0 <= raw < size:
            raise ValueError(f"table: raw label value {raw} outside [0, {size})")
        if not (0 <= train < NUM_CLASSES or train == IGNORE_INDEX):
            raise ValueError(f"table: train id {train} (for raw value {raw}) is neither in [0, 19) nor 255")
        lut[raw] = train
    return lut


def colorize(train_ids) -> np.ndarray:
    """Train ids [..., H, W] (numpy or torch, any integer type) -> uint8 RGB [..., H, W, 3] in the
    Cityscapes palette; 255 and any other id outside [0, 19) come out black."""
    if isinstance(train_ids, torch.Tensor):
        train_ids = train_ids.detach().cpu().numpy()
    ids = np.asarray(train_ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"train_ids: expected an integer array, got dtype {ids.dtype}")
    colours = np.concatenate([PALETTE, np.zeros((1, 3), np.uint8)])
    idx = np.where((ids >= 0) & (ids < NUM_CLASSES), ids, NUM_CLASSES)
    return colours[idx]
