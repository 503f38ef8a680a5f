"""The named backbone weights `model.pretrained` accepts besides a path, kept in torch.hub's cache.

- "imagenet": torchvision's ImageNet ResNet-101 (`resnet101-5d3b4d8f.pth`, what ProDA's network
  loads), torchvision layout and key names (plus its `fc` classifier, left out).
- "imagenet_caffe": the Caffe-converted DeepLab init `DeepLab_resnet_pretrained_init-f81d91e8.pth`
  that AdaptSegNet and CRST start from: DeepLab layout, every key prefixed `Scale.`, and a 21-class
  ASPP classifier `layer5` (loaded only into a model of that shape).
- "imagenet_v1c": open-mmlab's ImageNet ResNet-101-V1c (`resnet101_v1c-e67eebb6.pth`, mmcv's
  `open-mmlab://resnet101_v1c`, what lhoyer/DAFormer's DeepLabV2 runs start from): the "v1c"
  layout (deep stem), keys `stem.*`, `layer*` under mmcv's `state_dict`.

A file is downloaded once, with a progress bar, into `<torch.hub.get_dir()>/checkpoints/` (the
folder `torch.hub.load_state_dict_from_url` uses; TORCH_HOME moves it); later runs read it from
there without network. torchvision's file is checked against the SHA-256 prefix its name carries.
The DeepLab init's and open-mmlab's names also end in eight hex digits, but AdaptSegNet and mmcv load
them without a hash check, and we could not confirm they are their SHA-256 prefixes, so they are not
checked.
"""
import os
from urllib.parse import urlparse

import torch.hub

__all__ = ["PRETRAINED", "pretrained_layout", "cache_path", "fetch_pretrained"]

#: name -> (URL, weights layout, SHA-256 prefix checked after the download or None)
PRETRAINED = {
    "imagenet": ("https://download.pytorch.org/models/resnet101-5d3b4d8f.pth", "torchvision", "5d3b4d8f"),
    "imagenet_caffe": ("http://vllab.ucmerced.edu/ytsai/CVPR18/DeepLab_resnet_pretrained_init-f81d91e8.pth",
                       "deeplab", None),
    "imagenet_v1c": ("https://download.openmmlab.com/pretrain/third_party/resnet101_v1c-e67eebb6.pth", "v1c", None),
}


def pretrained_layout(name: str) -> str:
    """The network layout ("torchvision", "deeplab" or "v1c") the named weights were trained in."""
    return PRETRAINED[name][1]


def cache_path(name: str) -> str:
    """Where torch.hub keeps the named weights file (whether or not it is there yet)."""
    url = PRETRAINED[name][0]
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))


def fetch_pretrained(name: str) -> str:
    """The path of the named weights file in torch.hub's cache, downloaded first when it is not
    there. FileNotFoundError saying which URL to fetch and where to put it when the download fails
    (no network, or a file whose hash does not match its name); nothing is left at the path then."""
    url, _, hash_prefix = PRETRAINED[name]
    path = cache_path(name)
    if os.path.isfile(path):
        return path
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # torch.hub's own download: a temporary file renamed into place once its hash is checked
        torch.hub.download_url_to_file(url, path, hash_prefix, progress=True)
    except (OSError, RuntimeError) as e:  # URLError and timeouts are OSErrors; a hash mismatch a RuntimeError
        reason = str(e).splitlines()[0] if str(e) else ""
        raise FileNotFoundError(f"model.pretrained: {name!r} is not in torch.hub's cache and could not be downloaded "
                                f"({type(e).__name__}: {reason}); download {url} and put it at {path}") from None
    return path
