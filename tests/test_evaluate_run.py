"""`python -m udafast.evaluate --checkpoint CKPT` alone: the validation set of the run that made the
checkpoint, from the checkpoint (or, for an older one, the run folder's config.yaml)."""
import json
import shutil

import pytest
import torch

from conftest import tiny_run_config
from udafast import evaluate, predict
from udafast.engine.trainer import Trainer
from udafast.models import build_model, save_checkpoint


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    config = tiny_run_config(train={"iters": 2, "panels": 0})
    Trainer(config, out, progress=False, tensorboard=False).run()
    return out, config


def _old_checkpoint(source, dest):
    """`source` as a checkpoint written before checkpoints carried the run's val split."""
    state = torch.load(source, weights_only=True)
    del state["data_val"], state["eval_classes"]
    torch.save(state, dest)


def test_the_checkpoint_alone_gives_the_runs_score(tiny_run, capsys):
    out, config = tiny_run
    ckpt = out / "checkpoints" / "last.pt"
    state = torch.load(ckpt, weights_only=True)
    assert state["data_val"] == config["data"]["val"] and state["eval_classes"] == 19
    metrics = json.loads((out / "metrics.json").read_text())
    result = evaluate.main(["--checkpoint", str(ckpt), "--device", "cpu"])
    assert result["miou"] == pytest.approx(metrics["miou"], abs=1e-9)
    assert result["num_images"] == config["data"]["val"]["options"]["length"]
    err = capsys.readouterr().err
    assert "evaluating on synthetic val, options {'domain': 'target', 'length': 3" in err


def test_an_older_checkpoint_falls_back_to_the_run_folders_config(tiny_run, tmp_path):
    out, _ = tiny_run
    old = out / "checkpoints" / "old.pt"
    _old_checkpoint(out / "checkpoints" / "last.pt", old)
    try:
        result = evaluate.main(["--checkpoint", str(old), "--device", "cpu", "--quiet"])
        assert result["miou"] == pytest.approx(json.loads((out / "metrics.json").read_text())["miou"], abs=1e-9)
        # outside a run folder nothing says which split: Cityscapes, whose folder must be given
        elsewhere = tmp_path / "old.pt"
        shutil.copy(old, elsewhere)
        with pytest.raises(SystemExit) as e:
            evaluate.main(["--checkpoint", str(elsewhere), "--device", "cpu", "--quiet"])
        assert e.value.code == ("udafast.evaluate: error: --root: the cityscapes dataset is read from a folder; "
                                "give --root DIR")
    finally:
        old.unlink()


def test_a_truncated_checkpoint_is_reported_before_the_dataset(tiny_run, tmp_path):
    out, _ = tiny_run
    cut = tmp_path / "cut.pt"
    cut.write_bytes((out / "checkpoints" / "last.pt").read_bytes()[:4000])
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--checkpoint", str(cut), "--dataset", "cityscapes", "--root", str(tmp_path / "nowhere"),
                       "--quiet"])
    assert e.value.code == (f"udafast.evaluate: error: {cut}: not a readable checkpoint: truncated (a zip archive, "
                            f"as torch.save writes, without its end)")


def _checkpoint(path, **extra):
    save_checkpoint(path, build_model(tiny_run_config()["model"]), iter=1, **extra)
    return path


def test_the_runs_classes_and_a_folder_that_is_not_here(tmp_path):
    val = tiny_run_config()["data"]["val"]
    ckpt = _checkpoint(tmp_path / "synthia.pt", data_val=val, eval_classes=16, eval_input_size=None)
    result = evaluate.main(["--checkpoint", str(ckpt), "--device", "cpu", "--quiet"])
    assert len(result["iou"]) == 16 and "miou13" in result
    assert len(evaluate.main(["--checkpoint", str(ckpt), "--classes", "19", "--quiet"])["iou"]) == 19
    moved = _checkpoint(tmp_path / "moved.pt", data_val={"name": "cityscapes", "root": str(tmp_path / "gone"),
                                                         "split": "val", "options": {}})
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--checkpoint", str(moved), "--quiet"])
    assert e.value.code == (f"udafast.evaluate: error: --root: the run's dataset folder {tmp_path / 'gone'} "
                            f"(data.val.root, stored with the checkpoint) is not here; give --root DIR")


def test_root_only_where_the_dataset_reads_files(tmp_path):
    ckpt = _checkpoint(tmp_path / "m.pt")
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--checkpoint", str(ckpt), "--dataset", "cityscapes", "--quiet"])
    assert e.value.code == ("udafast.evaluate: error: --root: the cityscapes dataset is read from a folder; "
                            "give --root DIR")
    # (the synthetic benchmark reads nothing: test_the_checkpoint_alone_gives_the_runs_score gives no --root)


@pytest.mark.skipif(torch.version.cuda is not None, reason="this torch has CUDA")
def test_device_without_cuda_names_the_flag(tmp_path):
    ckpt = _checkpoint(tmp_path / "m.pt")
    for main in (evaluate.main, lambda argv: predict.main(argv + [str(ckpt), "--out", str(tmp_path / "o")])):
        with pytest.raises(SystemExit) as e:
            main(["--checkpoint", str(ckpt), "--device", "cuda", "--quiet"])
        assert e.value.code.startswith("udafast.") and ": error: --device: 'cuda' needs CUDA" in e.value.code


@pytest.mark.parametrize("module", [evaluate, predict])
def test_help_names_no_internal_documents(module):
    text = module.build_parser().format_help()
    assert "SPEC" not in text and "issue" not in text.lower()
    if module is evaluate:
        assert "`--checkpoint CKPT` alone evaluates on the validation set of the run" in text
