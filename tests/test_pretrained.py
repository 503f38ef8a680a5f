"""Named backbone weights (`model.pretrained: imagenet | imagenet_caffe`) through torch.hub's cache,
offline and with a download; and the loud warning of a DeepLabV2-ResNet101 run from random weights."""
import json
import os
from urllib.error import URLError

import pytest
import torch

from conftest import tiny_run_config
from udafast.engine.context import TrainingContext
from udafast.engine.trainer import RANDOM_INIT_WARNINGS, Trainer
from udafast.models import build_model
from udafast.models.pretrained import PRETRAINED, fetch_pretrained

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "authors")
_BACKBONE = ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4.")


def resnet101_keys():
    """ResNet-101's names and shapes from CRST's model class (tests/fixtures/authors/crst_keys.json,
    dumped from the authors' code, not from udafast's network): torchvision's names, which the Caffe
    conversion carries under `Scale.`. No num_batches_tracked: both files predate it."""
    with open(os.path.join(FIXTURES, "crst_keys.json")) as f:
        dump = json.load(f)["keys"]
    return {k: tuple(s) for k, s in dump if k.startswith(_BACKBONE) and not k.endswith("num_batches_tracked")}


def known_file(name):
    """The key names and shapes of the named file: torchvision's resnet101 adds its ImageNet
    classifier `fc`; the DeepLab init prefixes `Scale.` and adds DeepLab's 21-class ASPP `layer5`."""
    keys = resnet101_keys()
    if name == "imagenet":
        return dict(keys, **{"fc.weight": (1000, 2048), "fc.bias": (1000,)})
    shapes = {"Scale." + k: s for k, s in keys.items()}
    for i in range(4):
        shapes[f"Scale.layer5.conv2d_list.{i}.weight"] = (21, 2048, 3, 3)
        shapes[f"Scale.layer5.conv2d_list.{i}.bias"] = (21,)
    return shapes


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A fresh TORCH_HOME without network: -> (the cache folder, the download calls made)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    calls = []

    def offline(url, dst, hash_prefix=None, progress=True):
        calls.append((url, dst, hash_prefix, progress))
        raise URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return tmp_path / "torch" / "hub" / "checkpoints", calls


def cache_file(hub, name, shapes=None):
    """A random state dict with the named file's keys at its place in the cache -> the state."""
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=g) for k, s in (shapes or known_file(name)).items()}
    folder, _ = hub
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / os.path.basename(PRETRAINED[name][0]))
    return state


@pytest.mark.parametrize("name, layout, normalization, prefix", [("imagenet", "torchvision", "imagenet", ""),
                                                                 ("imagenet_caffe", "deeplab", "caffe", "Scale.")])
def test_named_weights_load_from_the_cache_without_network(hub, name, layout, normalization, prefix):
    state = cache_file(hub, name)
    model = build_model({"name": "deeplabv2_r101", "pretrained": name})
    assert hub[1] == []  # no download
    assert model.config["pretrained"] == name and model.config["weights_format"] == layout
    assert model.backbone.layout == layout and model.normalization == normalization
    own = model.backbone.state_dict()
    for key in resnet101_keys():
        assert torch.equal(own[key], state[prefix + key]), key
    # the 19-class model keeps its own classifier (the init's is 21-class), as the authors' scripts do
    assert getattr(model, "pretrained_heads", []) == []


def test_offline_the_error_says_which_url_to_fetch_and_where_to_put_it(hub):
    folder, calls = hub
    path = folder / "resnet101-5d3b4d8f.pth"
    with pytest.raises(FileNotFoundError) as error:
        build_model({"name": "deeplabv2_r101", "pretrained": "imagenet"})
    assert str(error.value) == (
        "model.pretrained: 'imagenet' is not in torch.hub's cache and could not be downloaded (URLError: <urlopen "
        "error [Errno -3] Temporary failure in name resolution>); download "
        f"https://download.pytorch.org/models/resnet101-5d3b4d8f.pth and put it at {path}")
    assert calls == [("https://download.pytorch.org/models/resnet101-5d3b4d8f.pth", str(path), "5d3b4d8f", True)]
    assert not path.exists()


def test_the_cli_reports_the_offline_error_in_one_line(hub, tmp_path):
    from udafast.train import main
    with pytest.raises(SystemExit) as stop:
        main(["--method", "source_only", "--config", "synthetic", "--model", "deeplabv2_r101", "--iters", "1",
              "--batch-size", "1",
              "--out", str(tmp_path / "run"), "--set", "model.pretrained=imagenet_caffe",
              "--set", "data.source.options.length=2", "--set", "data.val.options.length=1"])
    message = str(stop.value.code)
    path = hub[0] / "DeepLab_resnet_pretrained_init-f81d91e8.pth"
    assert message.startswith("udafast.train: error: model.pretrained: 'imagenet_caffe' is not in torch.hub's cache")
    assert message.endswith("download http://vllab.ucmerced.edu/ytsai/CVPR18/DeepLab_resnet_pretrained_init-f81d91e8"
                            f".pth and put it at {path}")
    assert "\n" not in message


@pytest.mark.parametrize("name", sorted(PRETRAINED))
def test_a_missing_file_is_downloaded_once_with_its_hash_checked(hub, monkeypatch, name):
    """torchvision's hash prefix is checked; the DeepLab init's and open-mmlab's names are not confirmed hashes."""
    url = PRETRAINED[name][0]
    calls = []

    def download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, hash_prefix, progress))
        with open(dst, "wb") as f:
            f.write(b"weights")
    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    path = fetch_pretrained(name)
    assert path == str(hub[0] / os.path.basename(url)) and open(path, "rb").read() == b"weights"
    assert calls == [(url, {"imagenet": "5d3b4d8f", "imagenet_caffe": None, "imagenet_v1c": None}[name], True)]
    assert fetch_pretrained(name) == path and len(calls) == 1  # from the cache the second time


def test_a_hash_mismatch_is_reported_with_the_url(hub, monkeypatch):
    def corrupt(url, dst, hash_prefix=None, progress=True):
        raise RuntimeError(f'invalid hash value (expected "{hash_prefix}", got "0123abcd")')
    monkeypatch.setattr(torch.hub, "download_url_to_file", corrupt)
    with pytest.raises(FileNotFoundError, match=r"RuntimeError: invalid hash value .*download https://download"
                                                r"\.pytorch\.org/models/resnet101-5d3b4d8f\.pth and put it at "):
        fetch_pretrained("imagenet")


def test_a_cached_file_with_other_keys_is_an_error_naming_them(hub):
    shapes = known_file("imagenet_caffe")
    del shapes["Scale.layer2.1.bn2.running_var"]
    shapes["Scale.conv1.weight"] = (64, 3, 3, 3)
    shapes["Scale.layer9.weight"] = (1,)
    cache_file(hub, "imagenet_caffe", shapes)
    with pytest.raises(ValueError, match=r"DeepLab_resnet_pretrained_init-f81d91e8\.pth: backbone weights do not fit "
                                         r"the ResNet-101 \(deeplab format\): missing keys: Scale\.layer2\.1\.bn2\."
                                         r"running_var; shape mismatches: Scale\.conv1\.weight \(64, 3, 3, 3\) \(model "
                                         r"\(64, 3, 7, 7\)\); unexpected keys: Scale\.layer9\.weight"):
        build_model({"name": "deeplabv2_r101", "pretrained": "imagenet_caffe"})


def test_a_named_file_fixes_the_layout(hub):
    with pytest.raises(ValueError, match=r"config\['weights_format'\]: 'deeplab', but pretrained 'imagenet' is "
                                         r"torchvision weights"):
        build_model({"name": "deeplabv2_r101", "pretrained": "imagenet", "weights_format": "deeplab"})
    # a model rebuilt from its config (checkpoints) needs neither the file nor the network
    rebuilt = build_model({"name": "deeplabv2_r101", "pretrained": "imagenet_caffe"}, load_pretrained=False)
    assert rebuilt.config["weights_format"] == "deeplab" and rebuilt.normalization == "caffe"
    assert hub[1] == []


@pytest.fixture
def start_only(monkeypatch):
    """Trainer.run stops once the run's set-up begins (after the start-up messages)."""
    def stop(*args, **kwargs):
        raise RuntimeError("stopped at the set-up")
    monkeypatch.setattr(TrainingContext, "__init__", stop)


@pytest.mark.parametrize("model, init, warned", [({"name": "deeplabv2_r101"}, None, True),
                                                 ({"name": "deeplabv2_r101", "pretrained": "imagenet"}, None, False),
                                                 ({"name": "deeplabv2_r101"}, "source.pt", False),
                                                 ({"name": "mit_b5_daformer"}, None, True),
                                                 ({"name": "mit_b5_daformer"}, "source.pt", False),
                                                 ({}, None, False)])  # the small CPU model: no pretrained weights
def test_a_run_from_random_weights_warns_once(tmp_path, start_only, capsys, model, init, warned):
    config = tiny_run_config("source_only", init=init)
    if model:  # the network in place of the small one (whose keys the others do not take)
        config["model"] = {"num_classes": 19, **model}
    with pytest.raises(RuntimeError, match="stopped at the set-up"):
        Trainer(config, tmp_path, progress=False, tensorboard=False).run()
    err = capsys.readouterr().err
    warnings = [w for w in RANDOM_INIT_WARNINGS.values() if w in err]
    assert warnings == ([RANDOM_INIT_WARNINGS[model["name"]]] if warned else [])
    if warned:
        assert err.count(warnings[0]) == 1
    assert "model.pretrained: imagenet" in RANDOM_INIT_WARNINGS["deeplabv2_r101"]
    assert "mit_b5.pth" in RANDOM_INIT_WARNINGS["mit_b5_daformer"]
    assert all("init: a checkpoint" in w for w in RANDOM_INIT_WARNINGS.values())


def test_metrics_record_the_start_weights(tmp_path):
    metrics = Trainer(tiny_run_config("source_only", train={"iters": 1, "panels": 0}), tmp_path,
                      progress=False, tensorboard=False).run()
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["pretrained"] is None and saved["random_init"] is True and metrics["random_init"] is True
