"""The trainer end to end on tiny synthetic runs: outputs, checkpoints, resume, label hygiene."""
import csv
import json
import os

import pytest
import torch

from conftest import tiny_run_config
from udafast.engine.runs import run_method
from udafast.engine.trainer import Trainer
from udafast.evaluate import load_model
from udafast.methods.base import Method, Stage
from udafast.models.checkpoint import load_checkpoint


def test_run_writes_every_output(tmp_path):
    config = tiny_run_config("source_only", train={"iters": 3, "eval_every": 2}, eval={"input_size": [64, 32]})
    metrics = Trainer(config, tmp_path, progress=False).run()
    for name in ("config.yaml", "metrics.json", "log.csv", "panels/train.png", "checkpoints/last.pt",
                 "checkpoints/best.pt"):
        assert (tmp_path / name).is_file(), name
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    assert set(on_disk) >= {"method", "miou", "per_class_iou", "iters", "backend", "sec_per_iter", "best", "last"}
    assert on_disk["method"] == "source_only" and on_disk["iters"] == 3 and on_disk["backend"] == "auto"
    assert 0 <= on_disk["miou"] <= 100 and len(on_disk["per_class_iou"]) == 19
    assert on_disk["best"]["checkpoint"] == "checkpoints/best.pt"
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert [int(r["iter"]) for r in rows] == [1, 2, 3]
    assert all(float(r["loss_seg"]) > 0 for r in rows)
    lrs = [float(r["lr_model"]) for r in rows]
    assert lrs[0] == pytest.approx(1e-3) and lrs[0] > lrs[1] > lrs[2]  # poly
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ckpt["iter"] == 3 and ckpt["eval_input_size"] == [64, 32] and ckpt["method_name"] == "source_only"
    model = load_model(tmp_path / "checkpoints" / "last.pt")
    assert model.eval_input_size == (64, 32)


def final_weights(folder):
    return load_checkpoint(os.path.join(folder, "checkpoints", "last.pt"))["model"]


def test_resume_continues_exactly(tmp_path):
    config = tiny_run_config("source_only", deterministic=True,
                             train={"iters": 5, "ckpt_every": 2, "keep_checkpoints": 1, "panels": 0})
    full = tmp_path / "full"
    Trainer(config, full, progress=False).run()
    kept = sorted(os.listdir(full / "checkpoints"))
    # last.pt is the final checkpoint, also named iter_5.pt, and the keep_checkpoints=1 before it stays
    assert kept == ["iter_4.pt", "iter_5.pt", "last.pt"]
    assert os.path.samefile(full / "checkpoints" / "iter_5.pt", full / "checkpoints" / "last.pt")
    # a run started over from iteration 4's checkpoint ends with the same weights, bit for bit
    resumed = tmp_path / "resumed"
    Trainer(config, resumed, resume=full / "checkpoints" / "iter_4.pt", progress=False).run()
    a, b = final_weights(full), final_weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = list(csv.DictReader(open(resumed / "log.csv")))
    assert [int(r["iter"]) for r in rows] == [5]


def test_resume_missing_checkpoint_names_it(tmp_path):
    config = tiny_run_config("source_only")
    with pytest.raises(FileNotFoundError, match="last.pt"):
        Trainer(config, tmp_path, resume=True, progress=False).run()


@pytest.mark.parametrize("name, labelled", [("oracle", True), ("source_only", None), ("adapting", False)])
def test_target_labels_reach_only_the_oracle(tmp_path, name, labelled):
    from udafast.engine.logging import RunLogger
    from udafast.engine.context import TrainingContext
    from udafast.methods import method_class
    from udafast.methods.base import Method

    class Adapting(Method):  # any adaptation method: draws target batches, never their labels
        name = "adapting"

    cls = Adapting if name == "adapting" else method_class(name)
    config = tiny_run_config("oracle" if name == "adapting" else name)
    ctx = TrainingContext(config, str(tmp_path), "cpu", RunLogger(str(tmp_path), 1, progress=False, tensorboard=False), cls)
    if labelled is None:
        assert ctx.target is None and ctx.target_stream is None
    else:
        assert ctx.target.labelled is labelled
        batch = next(ctx.target_stream)
        assert ("label" in batch) is labelled
        assert ("truth" in batch) is (not labelled)  # an adapting method's pseudo-labels are scored against it
        frames = next(ctx.target_frames(2))
        assert "label" not in frames and frames["index"].tolist() == [0, 1]


def test_init_at_source_only_trains_it_first(tmp_path):
    config = tiny_run_config("oracle", init="@source_only", pretrain={"iters": 1}, train={"iters": 1, "panels": 0})
    metrics = run_method(config, tmp_path, log=lambda *_: None)
    pre = tmp_path / "pretrain_source_only"
    assert (pre / "metrics.json").is_file()
    assert json.loads((pre / "metrics.json").read_text())["iters"] == 1
    assert metrics["method"] == "oracle"


def test_bad_method_option_and_stage(tmp_path):
    with pytest.raises(ValueError, match="unknown key source_only.weight; source_only takes no keys"):
        Trainer(tiny_run_config("source_only", source_only={"weight": 1}), tmp_path, progress=False).run()
    with pytest.raises(ValueError, match="--stage"):
        Trainer(tiny_run_config("source_only"), tmp_path, stage="stage9", progress=False).run()


class _TwoStages(Method):
    """Two stages; the first hands on its best-on-val network."""
    name = "two_stages"

    def stages(self):
        return [Stage("first", 4, next_from="best"), Stage("second", 1)]

    def start_stage(self, stage, model, resume=False):
        super().start_stage(stage, model, resume)
        self.started_from = {k: v.clone() for k, v in model.state_dict().items()}

    def step(self, batch, it, iters):
        with torch.no_grad():  # every iteration a different network
            for p in self.model.parameters():
                p.add_(0.01)
        return {"loss": 0.0}


def test_a_stage_hands_on_its_best_on_val_network(tmp_path, monkeypatch):
    """ProDA's stages pass on their best_model.pkl: the next stage starts from the network of the
    stage's best validation (here the one after iteration 2 of 4), kept as checkpoints/first_best.pt."""
    import udafast.engine.trainer as trainer_module
    from udafast.methods import METHODS
    monkeypatch.setitem(METHODS, "two_stages", f"{__name__}:_TwoStages")
    scores = iter([10.0, 30.0, 20.0, 25.0])  # after iterations 1, 2, 3 and the end of stage "first"
    seen = []

    def fake_evaluate(model, *args, **kwargs):
        if len(seen) < 4:
            seen.append({k: v.clone() for k, v in model.state_dict().items()})
            miou = next(scores)
        else:
            miou = 0.0
        return {"miou": miou, "iou": {}}

    monkeypatch.setattr(trainer_module, "evaluate_model", fake_evaluate)
    config = tiny_run_config("source_only", train={"eval_every": 1, "panels": 0})
    config["method"] = "two_stages"
    trainer = Trainer(config, tmp_path, progress=False)
    metrics = trainer.run()
    kept = load_checkpoint(tmp_path / "checkpoints" / "first_best.pt")
    assert kept["trainer"]["stage_best"]["first"] == {"miou": 30.0, "iter": 2}
    assert metrics["stages"]["first"]["best"] == {"miou": 30.0, "iter": 2}
    last_of_first = load_checkpoint(tmp_path / "checkpoints" / "first.pt")["model"]
    started = trainer.method.started_from
    assert all(torch.equal(started[k], seen[1][k]) for k in started)
    assert not all(torch.equal(started[k], last_of_first[k]) for k in started)
