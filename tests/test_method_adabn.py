"""AdaBN: BatchNorm running statistics become the average over the target batches; nothing else moves."""
import torch

from conftest import tiny_run_config
from udafast.data.transforms import normalize
from udafast.engine.data import BatchStream, TrainView, build_split
from udafast.engine.trainer import Trainer
from udafast.models.checkpoint import load_checkpoint, save_checkpoint
from udafast.models import build_model


def test_running_statistics_are_the_target_average(tmp_path):
    torch.manual_seed(0)
    source = build_model({"name": "small", "num_classes": 19, "width": 4, "feature_dim": 32})
    save_checkpoint(tmp_path / "src.pt", source, iter=0)
    config = tiny_run_config("adabn", init=str(tmp_path / "src.pt"), train={"iters": 3, "panels": 0})
    Trainer(config, tmp_path / "run", progress=False).run()
    adapted = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["model"]
    # the same three target batches, through the first BatchNorm's input
    stream = BatchStream(build_split(config["data"]["target"], with_labels=False), 2,
                         TrainView.from_config(config["data"]["target_view"], align=8), seed=config["seed"] * 2 + 2)
    conv = source.backbone.stem[0][0]
    means = [conv(normalize(next(stream)["image"])).mean((0, 2, 3)) for _ in range(3)]
    expected = torch.stack(means).mean(0)
    torch.testing.assert_close(adapted["backbone.stem.0.1.running_mean"], expected.detach(), rtol=1e-5, atol=1e-6)
    assert int(adapted["backbone.stem.0.1.num_batches_tracked"]) == 3
    # weights untouched
    for k, v in source.state_dict().items():
        if "running" not in k and "num_batches" not in k:
            assert torch.equal(adapted[k], v), k
