"""The authors' released checkpoints, read into udafast's networks, heads included.

Four formats, told apart by their keys (each the `state_dict()` of the authors' model class; key
names and shapes in tests/fixtures/authors/<format>_keys.json, dumped from those classes):

- "proda": microsoft/ProDA `.pkl` files, `torch.save({"ResNet101": {"model_state": ...}, ...})`
  (train.py; the network is models/deeplabv2.py `ResNet101`): the ResNet-101 (`conv1.`, `bn1.`,
  `layer1-4.`), its feature head `layer5.conv2d_list.*`/`layer5.bottleneck.*` and classifier
  `layer5.head.1.weight`, and, for the distilled (stage 2/3) models trained with `--bn_clr`,
  `bn_pretrain.*`, a BatchNorm on the layer4 features. No aux classifier. Inputs: RGB in [0, 1]
  (data/cityscapes_dataset.py: mean 0, / 255).
- "adaptsegnet": wasidennis/AdaptSegNet's multi-level model (model/deeplab_multi.py `ResNetMulti`,
  saved as a plain state dict; the DeepLab init files carry a `Scale.` prefix): `layer5.*` the ASPP
  classifier on layer3 (udafast's aux head), `layer6.*` the one on layer4 (the main head). Its ASPP
  sums only the dilations 6 and 12 (`Classifier_Module.forward` returns inside its loop), so the
  model is built with `aspp: two`, the network these weights were trained in. Inputs: Caffe (BGR,
  0-255, minus the mean).
- "crst": yzou2/CRST's `src_model.pth` (deeplab/model.py `Res_Deeplab` = `ResNet`, a plain state
  dict): `layer5.*` the four-branch ASPP classifier on layer4. No aux classifier. Inputs: RGB,
  ImageNet mean/std (deeplab/datasets.py, crst_seg.py IMG_MEAN/IMG_STD).

- "daformer": lhoyer/DAFormer's and lhoyer/MIC's checkpoints (mmcv's `{"state_dict": ...}`): a UDA
  run's state dict holds the segmentor three times, `model.` (the student, what their tools/test.py
  evaluates and what is read here), `ema_model.` (the teacher) and `imnet_model.` (the frozen
  ImageNet network), each as `backbone.*` and `decode_head.*`. MiT-B5 runs
  (tests/fixtures/authors/daformer_keys.json; DAFormerHead's `decode_head.conv_seg`): udafast's
  "mit_b5_daformer" has those names. DeepLabV2 runs ('dlv2red' on ResNet-101-V1c,
  tests/fixtures/authors/dlv2red_r101_v1c.json): mmseg's ResNetV1c names are udafast's "v1c"
  backbone's, and DLV2Head's `decode_head.aspp_modules.<i>.conv.*` (dilations 6, 12) are the first
  two branches of the ASPP classifier (`aspp: two`; the other two, unused, keep their
  initialisation). A segmentor's own state dict (no prefix) reads too. Inputs: ImageNet mean/std.

The first three are the DeepLab layout (stride in the bottleneck's first 1x1 conv, ceil-mode max-pool).
A `module.` prefix (DataParallel) is stripped. A file whose keys do not fit is a one-line
ValueError naming the file and the keys.
"""
import os
from collections.abc import Mapping

import numpy as np
import torch

from udafast.models.resnet import first_names, key_problems

__all__ = ["AUTHORS_FORMATS", "AUTHORS_NORMALIZATION", "load_fitting_heads", "read_state_file", "detect_format", "convert_state", "read_authors_checkpoint",
           "strip_prefixes"]

AUTHORS_FORMATS = ("proda", "adaptsegnet", "crst", "daformer")
AUTHORS_NORMALIZATION = _NORMALIZATION = {"proda": "unit", "adaptsegnet": "caffe", "crst": "imagenet",
                                          "daformer": "imagenet"}
_BACKBONE = ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4.")
# DAFormer's UDA checkpoints: the copies of the segmentor besides the student `model.`, not read
_OTHER_COPIES = {"daformer": ("ema_model.", "imnet_model.")}
# DLV2Head's branches (DeepLabV2 runs), and the key that tells each head apart: DAFormerHead's
# classifier (MiT-B5 runs), DLV2Head's first branch
_DLV2_HEAD = "decode_head.aspp_modules."
_MIT_HEAD_KEY = "decode_head.conv_seg.weight"
_DLV2_HEAD_KEY = _DLV2_HEAD + "0.conv.weight"


def _numpy_globals():
    """numpy scalars and dtypes a ProDA `.pkl` holds (`best_iou` is a numpy float64), under both
    numpy 1's (`numpy.core`) and numpy 2's (`numpy._core`) names."""
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy 1
        from numpy.core.multiarray import scalar
    allowed = [np.dtype, (scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar")]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return allowed


def strip_prefixes(state, prefixes=("module.", "Scale.")):
    """Drop a `module.` (DataParallel) and a `Scale.` (the DeepLab Caffe conversion) prefix that
    every key carries."""
    for prefix in prefixes:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def read_state_file(path, prefixes=("module.", "Scale.")):
    """The named tensors of a weights file: a plain state dict, `{"state_dict": ...}`, or ProDA's
    `{"ResNet101": {"model_state": ...}}`; `prefixes` stripped. -> (state, container) with container
    "proda_pkl", "state_dict" or "plain". ValueError naming the file when it is not readable."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights not found: {path}")
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which, not a raw unpickling error
        reason = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"{path}: cannot read the weights ({type(e).__name__}: {reason})") from None
    container = "plain"
    if isinstance(obj, Mapping) and isinstance(obj.get("ResNet101"), Mapping) and \
            isinstance(obj["ResNet101"].get("model_state"), Mapping):
        obj, container = obj["ResNet101"]["model_state"], "proda_pkl"  # ProDA train.py
    elif isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj, container = obj["state_dict"], "state_dict"
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()):
        raise ValueError(f"{path}: expected a state dict of named tensors")
    return strip_prefixes(dict(obj), prefixes), container


def detect_format(state):
    """"proda", "adaptsegnet", "crst", "daformer" from the head keys of a prefix-stripped state
    dict, else None."""
    if any(prefix + key in state for prefix in ("model.", "") for key in (_MIT_HEAD_KEY, _DLV2_HEAD_KEY)):
        return "daformer"
    if "layer5.head.1.weight" in state:
        return "proda"
    if "layer6.conv2d_list.0.weight" in state:
        return "adaptsegnet"
    w = state.get("layer5.conv2d_list.0.weight")
    if torch.is_tensor(w) and w.dim() == 4 and w.shape[1] == 2048:
        return "crst"  # DeepLab's classifier on layer4 (also the DeepLab init files' layer5)
    return None


def _rename(key, fmt):
    """The udafast name of an authors' key (None: not a key of that format)."""
    if fmt == "daformer":
        key = key[len("model."):] if key.startswith("model.") else key
        if key.startswith(_DLV2_HEAD):  # aspp_modules.<i>.conv.<weight|bias>
            branch, conv, what = key[len(_DLV2_HEAD):].split(".", 2)
            return f"classifier.conv2d_list.{branch}.{what}" if conv == "conv" else None
        return key if key.startswith(("backbone.", "decode_head.")) else None
    if key.startswith(_BACKBONE):
        return "backbone." + key
    if fmt == "proda":
        if key.startswith(("layer5.conv2d_list.", "layer5.bottleneck.")):
            return "feature_head." + key[len("layer5."):]
        if key == "layer5.head.1.weight":
            return "classifier.weight"
        if key.startswith("bn_pretrain."):
            return "backbone_norm." + key[len("bn_pretrain."):]
    elif fmt == "adaptsegnet":
        if key.startswith("layer5."):
            return "aux_classifier." + key[len("layer5."):]
        if key.startswith("layer6."):
            return "classifier." + key[len("layer6."):]
    elif fmt == "crst":
        if key.startswith("layer5."):
            return "classifier." + key[len("layer5."):]
    return None


def load_fitting_heads(model, heads):
    """Copy the heads of an authors' state dict (`heads` = (format, state) from
    udafast.models.resnet.read_weights) into `model` where a whole head module has the same keys
    and shapes -> the names of the modules loaded (the others keep their initialisation)."""
    fmt, state = heads[0], heads[1]
    own = model.state_dict()
    converted = {}
    for k, v in state.items():
        name = _rename(k, fmt)
        if name is not None and not name.startswith("backbone."):
            converted[name] = v
    loaded = []
    for module in ("classifier", "aux_classifier", "feature_head", "backbone_norm"):
        theirs = {k: v for k, v in converted.items() if k.split(".")[0] == module}
        ours = {k: v for k, v in own.items() if k.split(".")[0] == module and not k.endswith("num_batches_tracked")}
        if ours and set(ours) <= set(theirs) and all(tuple(theirs[k].shape) == tuple(v.shape) for k, v in ours.items()):
            model.load_state_dict({k: theirs[k] for k in theirs if k in own}, strict=False)
            loaded.append(module)
    return loaded


def model_config(state, fmt):
    """The udafast model config of the network the authors' weights were trained in."""
    if fmt == "daformer":
        prefix = "model." if any(k.startswith("model.") for k in state) else ""
        w = state.get(prefix + _MIT_HEAD_KEY)
        if w is None:  # configs/_base_/models/deeplabv2red_r50-d8.py at depth 101: no auxiliary head
            w = state[prefix + _DLV2_HEAD_KEY]
            return {"name": "deeplabv2_r101", "weights_format": "v1c", "aspp": "two", "aux_head": False,
                    "num_classes": int(w.shape[0]), "normalization": _NORMALIZATION[fmt]}
        return {"name": "mit_b5_daformer", "num_classes": int(w.shape[0]), "feature_dim": int(w.shape[1]),
                "normalization": _NORMALIZATION[fmt]}
    config = {"name": "deeplabv2_r101", "weights_format": "deeplab", "normalization": _NORMALIZATION[fmt]}
    if fmt == "proda":
        w = state["layer5.head.1.weight"]
        config.update(num_classes=int(w.shape[0]), head="proda", feature_dim=int(w.shape[1]), aux_head=False,
                      head_dropout=0.1,  # models/deeplabv2.py Classifier_Module2 droprate
                      bn_clr="bn_pretrain.weight" in state)
    elif fmt == "adaptsegnet":
        config.update(num_classes=int(state["layer6.conv2d_list.0.weight"].shape[0]), head="deeplabv2",
                      aspp="two")  # model/deeplab_multi.py Classifier_Module.forward: returns after two branches
    else:
        config.update(num_classes=int(state["layer5.conv2d_list.0.weight"].shape[0]), head="deeplabv2",
                      aspp="four", aux_head=False)  # deeplab/model.py Classifier_Module sums all four
    return config


def convert_state(state, fmt, model, where):
    """The authors' `state` in udafast's names, checked against `model`'s state dict: every key
    maps, none is missing (BatchNorm's `num_batches_tracked`, absent from files of torch < 0.4.1,
    excepted) and every shape agrees; else one ValueError line naming `where` and the keys (in the
    file's naming)."""
    own = model.state_dict()
    back = {}
    converted, unexpected, mismatched = {}, [], []
    for k, v in state.items():
        if k.startswith(_OTHER_COPIES.get(fmt, ())):
            continue
        name = _rename(k, fmt)
        if name is None or name not in own:
            unexpected.append(k)
            continue
        back[name] = k
        if tuple(v.shape) != tuple(own[name].shape):
            mismatched.append(f"{k} {tuple(v.shape)} (udafast {tuple(own[name].shape)})")
        converted[name] = v
    # DLV2Head has only the branches aspp "two" sums: the others keep the model's initialisation
    classifier = getattr(model, "classifier", None)
    if fmt == "daformer" and hasattr(classifier, "unused_state_keys"):
        converted.update({k: own[k] for k in classifier.unused_state_keys("classifier.") if k not in converted})
    missing = [k for k in own if k not in converted and not k.endswith("num_batches_tracked")]
    problems = key_problems([_authors_name(k, fmt) for k in missing], mismatched, unexpected)
    if problems:
        raise ValueError(f"{where}: the {fmt} weights do not fit udafast's network: {problems}")
    return converted


def _authors_name(name, fmt):
    """udafast name -> the authors' key, for error messages."""
    if fmt == "daformer":
        if name.startswith("classifier.conv2d_list."):
            branch, what = name[len("classifier.conv2d_list."):].split(".")
            return f"model.{_DLV2_HEAD}{branch}.conv.{what}"
        return "model." + name
    if name.startswith("backbone."):
        return name[len("backbone."):]
    table = {"proda": (("feature_head.", "layer5."), ("classifier.weight", "layer5.head.1.weight"),
                       ("backbone_norm.", "bn_pretrain.")),
             "adaptsegnet": (("aux_classifier.", "layer5."), ("classifier.", "layer6.")),
             "crst": (("classifier.", "layer5."), ("aux_classifier.", "(no aux head) aux_classifier."))}[fmt]
    for ours, theirs in table:
        if name.startswith(ours):
            return theirs + name[len(ours):]
    return name


def read_authors_checkpoint(path, state=None):
    """An authors' released checkpoint -> a udafast checkpoint dict {"format_version", "config",
    "model", "iter": 0, "authors": format} that `model_from_checkpoint` and the trainer's `init`
    load. ValueError naming the file when it is none of AUTHORS_FORMATS or its keys do not fit."""
    from udafast.models.build import build_model
    from udafast.models.checkpoint import FORMAT_VERSION

    path = os.fspath(path)
    if state is None:
        state, _ = read_state_file(path)
    fmt = detect_format(state)
    if fmt is None:
        raise ValueError(f"{path}: not a udafast checkpoint nor one of the authors' ({', '.join(AUTHORS_FORMATS)}); "
                         f"first keys: {first_names(list(state))}")
    config = model_config(state, fmt)
    model = build_model(config, load_pretrained=False)
    converted = convert_state(state, fmt, model, path)
    return {"format_version": FORMAT_VERSION, "config": model.config, "model": converted, "iter": 0, "authors": fmt}
