"""`python -m udafast.train`: plain mistakes fail at once, before anything is trained or written,
with a one-line error naming the argument."""
import json
import os
from types import SimpleNamespace

import pytest
import torch

from conftest import tiny_run_config
from udafast import train
from udafast.engine.devices import check_device
from udafast.engine.trainer import Trainer
from udafast.methods import METHOD_NAMES, method_class
from udafast.models import build_model, save_checkpoint


def fails(argv, capsys=None):
    """train.main(argv) -> its one-line error (SystemExit's message, or argparse's last stderr line)."""
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    if isinstance(e.value.code, str):
        message = e.value.code
    else:
        assert e.value.code == 2
        message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "\n" not in message and "Traceback" not in message
    return message


@pytest.mark.parametrize("value", ["0", "-3", "x"])
def test_iters_must_be_positive(value, tiny_yaml, tmp_path, capsys):
    out = tmp_path / "run"
    message = fails(["--method", "source_only", "--config", tiny_yaml, "--out", str(out), "--iters", value], capsys)
    assert message.endswith(f"argument --iters: expected a positive integer, got '{value}'")
    assert not out.exists()


def test_train_iters_zero_in_the_config_fails_before_writing(tiny_yaml, tmp_path):
    out = tmp_path / "run"
    message = fails(["--method", "source_only", "--config", tiny_yaml, "--out", str(out), "--set", "train.iters=0"])
    assert message == "udafast.train: error: train.iters: expected a positive int, got 0"
    assert not out.exists()


@pytest.mark.skipif(torch.version.cuda is not None, reason="this torch has CUDA")
def test_device_cuda_on_a_torch_without_cuda(tiny_yaml, tmp_path):
    out = tmp_path / "run"
    message = fails(["--method", "source_only", "--config", tiny_yaml, "--out", str(out), "--device", "cuda"])
    assert message == (f"udafast.train: error: --device: 'cuda' needs CUDA, but this torch ({torch.__version__}) "
                       f"is built without it; use cpu, or install a CUDA build of torch")
    assert not out.exists()
    # the config key, for a run that is not started from the command line
    with pytest.raises(ValueError, match=r"^device: 'cuda:1' needs CUDA"):
        Trainer(tiny_run_config(device="cuda:1"), tmp_path / "direct", progress=False).run()
    assert not (tmp_path / "direct").exists()


def test_device_index_beyond_the_cuda_devices(monkeypatch, tiny_yaml, tmp_path):
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_device("cuda:1", "--device") == torch.device("cuda", 1)
    out = tmp_path / "run"
    message = fails(["--method", "source_only", "--config", tiny_yaml, "--out", str(out), "--device", "cuda:3"])
    assert message == "udafast.train: error: --device: 'cuda:3': this machine has 2 CUDA device(s), cuda:0 to cuda:1"
    assert not out.exists()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"^--device: 'cuda': no CUDA device is visible"):
        check_device("cuda", "--device")


def test_device_that_torch_does_not_know(tiny_yaml, tmp_path):
    message = fails(["--method", "source_only", "--config", tiny_yaml, "--out", str(tmp_path / "r"), "--device", "gpu"])
    assert message == "udafast.train: error: --device: not a torch device: 'gpu' (cpu, cuda, cuda:1, ...)"


def test_unknown_stage_fails_before_the_source_only_pretraining(tiny_yaml, tmp_path):
    out = tmp_path / "run"
    message = fails(["--method", "proda", "--config", tiny_yaml, "--out", str(out), "--stage", "stage9",
                     "--set", "init=@source_only"])
    assert message == ("udafast.train: error: --stage: proda has the stages ['warmup', 'stage1', 'stage2', 'stage3'], "
                       "got 'stage9'")
    assert not out.exists()  # no pretrain_source_only in it
    message = fails(["--method", "cbst", "--config", tiny_yaml, "--out", str(out), "--stage", "round3",
                     "--set", "cbst.rounds=2"])
    assert message == "udafast.train: error: --stage: cbst has the stages ['round0', 'round1'], got 'round3'"


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_stage_names_are_the_stages(name):
    """The names checked before anything is built are those of the built method's stages."""
    config = tiny_run_config(name, cbst={"iters_per_round": 2, "rounds": 2})
    ctx = SimpleNamespace(device=torch.device("cpu"), backend="reference", rank=0, world=1, out_dir="unused")
    method = method_class(name)(config, ctx)
    assert method_class(name).stage_names(config) == [s.name for s in method.stages()]


def test_resume_of_a_finished_run_is_a_no_op_that_says_so(tiny_yaml, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--method", "source_only", "--config", tiny_yaml, "--out", str(out), "--progress", "lines"]
    first = train.main(argv)
    files = ("metrics.json", "config.yaml", "log.csv", "checkpoints/last.pt")
    stamps = {f: os.stat(out / f).st_mtime_ns for f in files}
    capsys.readouterr()
    again = train.main(argv + ["--resume"])
    captured = capsys.readouterr()
    assert again == first == json.loads((out / "metrics.json").read_text())
    assert (f"resume: {out / 'checkpoints' / 'last.pt'} is the end of the run (stage 'train' finished, iteration 2); "
            f"nothing to resume, {out / 'metrics.json'} is left as it is") in captured.err
    assert "source_only: target val mIoU" in captured.out
    assert {f: os.stat(out / f).st_mtime_ns for f in files} == stamps
    # with another config (here more iterations) the run is not over: it continues
    longer = train.main(argv + ["--resume", "--iters", "3"])
    assert longer["iters"] == 3 and "nothing to resume" not in capsys.readouterr().err


def test_resume_of_files_that_are_not_checkpoints_says_what_they_are(tiny_yaml, tmp_path):
    good = tmp_path / "good.pt"
    save_checkpoint(good, build_model({"name": "small", "width": 4, "feature_dim": 32}), iter=1)
    text = tmp_path / "notes.pt"
    text.write_text("epoch: 3\nloss: 0.25\n")
    truncated = tmp_path / "cut.pt"
    truncated.write_bytes(good.read_bytes()[:2000])
    weights = tmp_path / "weights.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, weights)
    out = tmp_path / "run"
    for path, what in [(text, "not a readable checkpoint: a text file, not a torch checkpoint"),
                       (truncated, "not a readable checkpoint: truncated (a zip archive, as torch.save writes, "
                                   "without its end)"),
                       (weights, "not a udafast checkpoint: a torch file without udafast's keys (format_version, "
                                 "config, model, iter); it holds a dict with the keys 'state_dict'")]:
        message = fails(["--method", "source_only", "--config", tiny_yaml, "--out", str(out), "--resume", str(path)])
        assert message == f"udafast.train: error: {path}: {what}"
        assert not out.exists()
