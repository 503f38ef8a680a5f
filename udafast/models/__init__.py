"""Segmentation networks and the methods' extra heads.

`build_model(config)` builds "deeplabv2_r101" (DeepLabV2-ResNet101 at output stride 8, optionally
from torchvision- or DeepLab-format backbone weights), "small" (a CPU-sized network with the same
outputs) or "mit_b5_daformer" (DAFormer's SegFormer MiT-B5 + context-aware fusion head, output
stride 4, no aux head); `model(images)` returns {"logits"[, "aux"][, "features"][, "backbone"]}, `model.config` the
resolved config, `model.normalization` the input normalisation, `model.param_groups(lr)` the
optimiser groups (heads x10). Checkpoints: `save_checkpoint`, `load_checkpoint`,
`model_from_checkpoint`; the authors' released models (ProDA, AdaptSegNet, CRST, DAFormer/MIC) load through
`model_from_checkpoint(path)` / `load_model_checkpoint` and as `pretrained` (udafast.models.authors).
"""
from udafast.models.build import MODEL_NAMES, build_model  # noqa: F401
from udafast.models.authors import AUTHORS_FORMATS, read_authors_checkpoint  # noqa: F401
from udafast.models.checkpoint import (  # noqa: F401
    load_checkpoint, load_model_checkpoint, model_from_checkpoint, save_checkpoint,
)
from udafast.models.heads import (  # noqa: F401
    ClassSelectors, Discriminator, DomainClassifier, PredictionHead, ProjectionHead,
)
from udafast.models.resnet import ResNetBackbone, load_backbone_weights, read_backbone_weights  # noqa: F401
from udafast.models.segmentation import ASPPClassifier, DeepLabV2, SegmentationModel, SmallSegNet  # noqa: F401
