"""Checkpoint rotation (last.pt + iter_<N>.pt), bad checkpoint files, and `--resume`'s fallback to
the newest good checkpoint."""
import csv
import os
import pickle
import shutil

import pytest
import torch
import yaml

from conftest import assert_bitwise_equal, tiny_config_file, tiny_run_config
from udafast.engine import checkpoints
from udafast.engine.trainer import Trainer
from udafast.models import build_model
from udafast.models.checkpoint import load_checkpoint, save_checkpoint


def _writer(text):
    """A write(path) that writes `text` atomically, as save_checkpoint does."""
    def write(path):
        with open(path + ".part", "w") as f:
            f.write(text)
        os.replace(path + ".part", path)
    return write


def _listing(folder):
    return sorted(os.listdir(folder))


def test_publish_keeps_last_and_the_k_before_it(tmp_path):
    for n in range(1, 6):
        checkpoints.publish(str(tmp_path), n, 2, _writer(str(n)))
    assert _listing(tmp_path) == ["iter_3.pt", "iter_4.pt", "iter_5.pt", "last.pt"]
    # each file still holds its own iteration: last.pt was replaced, never written in place
    for n in (3, 4, 5):
        assert (tmp_path / f"iter_{n}.pt").read_text() == str(n)
    assert (tmp_path / "last.pt").read_text() == "5"
    assert os.path.samefile(tmp_path / "iter_5.pt", tmp_path / "last.pt")
    checkpoints.publish(str(tmp_path), 6, 9, _writer("6"))  # fewer than `keep` older ones: all stay
    assert _listing(tmp_path) == ["iter_3.pt", "iter_4.pt", "iter_5.pt", "iter_6.pt", "last.pt"]
    checkpoints.publish(str(tmp_path), 7, 0, _writer("7"))
    assert _listing(tmp_path) == ["iter_7.pt", "last.pt"]


def test_publish_leaves_later_iterations_and_removes_stray_temporaries(tmp_path):
    # a run resumed from iteration 2 of a run that had reached 9, whose last write was killed midway
    (tmp_path / "iter_9.pt").write_text("9")
    (tmp_path / "iter_2.pt").write_text("2")
    (tmp_path / ".last.pt.k2j3.tmp").write_text("half a checkp")
    checkpoints.publish(str(tmp_path), 3, 1, _writer("3"))
    assert _listing(tmp_path) == ["iter_2.pt", "iter_3.pt", "iter_9.pt", "last.pt"]
    assert (tmp_path / "iter_9.pt").read_text() == "9"  # replaced once this run reaches it


def test_publish_copies_where_there_are_no_hard_links(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(95, "Operation not supported")
    monkeypatch.setattr(os, "link", no_links)
    checkpoints.publish(str(tmp_path), 1, 1, _writer("1"))
    checkpoints.publish(str(tmp_path), 2, 1, _writer("2"))
    assert _listing(tmp_path) == ["iter_1.pt", "iter_2.pt", "last.pt"]
    assert (tmp_path / "iter_2.pt").read_text() == (tmp_path / "last.pt").read_text() == "2"
    assert not os.path.samefile(tmp_path / "iter_2.pt", tmp_path / "last.pt")


def test_publish_rejects_a_bad_keep_before_writing(tmp_path):
    for keep in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="train.keep_checkpoints"):
            checkpoints.publish(str(tmp_path), 1, keep, _writer("1"))
    assert _listing(tmp_path) == []


class Foreign:
    """Pickled by path: torch.load(weights_only=True) must refuse to import it."""


def _bad_files(folder, good):
    """name -> path of a truncated checkpoint and foreign files."""
    data = good.read_bytes()
    files = {
        "truncated.pt": data[: len(data) // 2],
        "empty.pt": b"",
        "text.pt": b"epoch: 3\nloss: 0.25\n",
        "pickle_dict.pt": pickle.dumps({"model": {"w": [1.0, 2.0]}, "iter": 3}),
        "pickle_object.pt": pickle.dumps(Foreign()),
    }
    for name, content in files.items():
        (folder / name).write_bytes(content)
    torch.save(torch.zeros(3), folder / "tensor.pt")
    torch.save({"state_dict": {"w": torch.zeros(3)}}, folder / "other_format.pt")
    return sorted(folder / n for n in [*files, "tensor.pt", "other_format.pt"])


#: what the error says each of `_bad_files` is (rather than the unpickler's own error)
BAD_FILES = {
    "truncated.pt": "not a readable checkpoint: truncated (a zip archive, as torch.save writes, without its end)",
    "empty.pt": "not a readable checkpoint: an empty file",
    "text.pt": "not a readable checkpoint: a text file, not a torch checkpoint",
    "pickle_dict.pt": "not a readable checkpoint: a Python pickle, not a torch checkpoint",
    "pickle_object.pt": "not a readable checkpoint: a Python pickle, not a torch checkpoint",
    "tensor.pt": "not a udafast checkpoint: a torch file without udafast's keys (format_version, config, model, "
                 "iter); it holds a Tensor",
    "other_format.pt": "not a udafast checkpoint: a torch file without udafast's keys (format_version, config, "
                       "model, iter); it holds a dict with the keys 'state_dict'",
}


def test_bad_files_raise_an_error_naming_them_without_the_unpickling_traceback(tmp_path):
    good = tmp_path / "good.pt"
    save_checkpoint(good, build_model({"name": "small", "width": 4, "feature_dim": 32}), iter=1)
    for path in _bad_files(tmp_path, good):
        with pytest.raises(ValueError) as info:
            load_checkpoint(path)
        message = str(info.value)
        assert message == f"{path}: {BAD_FILES[path.name]}"
        # `raise ... from None`: the unpickler's exception is neither the cause nor shown as context
        e = info.value
        assert e.__cause__ is None and (e.__context__ is None or e.__suppress_context__), path


def test_other_unreadable_files_say_what_they_are(tmp_path):
    """torch's legacy format cut short, a torch file holding other objects, a zip or an image."""
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.zeros(100)}, legacy, _use_new_zipfile_serialization=False)
    (tmp_path / "legacy_cut.pt").write_bytes(legacy.read_bytes()[:200])
    torch.save({"w": Foreign()}, tmp_path / "objects.pt")
    import zipfile
    with zipfile.ZipFile(tmp_path / "archive.pt", "w") as z:
        z.writestr("a.txt", "hello")
    (tmp_path / "image.pt").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    expected = {
        "legacy_cut.pt": "a torch file in the legacy format, truncated or damaged (",  # + the unpickler's error
        "objects.pt": "a torch file holding Python objects other than tensors, which udafast does not unpickle",
        "archive.pt": "a zip archive, not a torch checkpoint",
        "image.pt": "binary data starting b'\\x89PNG\\r\\n\\x1a\\n', not a torch checkpoint",
    }
    for name, what in expected.items():
        with pytest.raises(ValueError) as info:
            load_checkpoint(tmp_path / name)
        message = str(info.value)
        assert message.startswith(f"{tmp_path / name}: not a readable checkpoint: {what}") and "\n" not in message
        assert message.endswith(")") if what.endswith("(") else message.endswith(what)


def _training_checkpoint(path, model, iteration, stage, stage_iter):
    save_checkpoint(path, model, iter=iteration, stage=stage, stage_iter=stage_iter, method={}, streams={},
                    rng={}, trainer={})


def test_find_resume_falls_back_to_the_newest_good_file_and_says_so(tmp_path):
    model = build_model({"name": "small", "width": 4, "feature_dim": 32})
    for n in (2, 3, 4):
        _training_checkpoint(tmp_path / f"iter_{n}.pt", model, n, 0, n)
    (tmp_path / "iter_4.pt").write_bytes((tmp_path / "iter_4.pt").read_bytes()[:100])
    (tmp_path / "last.pt").write_text("not a checkpoint")
    notes = []
    ckpt, path = checkpoints.find_resume(str(tmp_path), notes.append)
    assert path == str(tmp_path / "iter_3.pt") and ckpt["iter"] == 3
    assert len(notes) == 3
    assert notes[0].startswith(f"resume: skipping a bad checkpoint: {tmp_path / 'last.pt'}: not a readable")
    assert notes[1].startswith(f"resume: skipping a bad checkpoint: {tmp_path / 'iter_4.pt'}: not a readable")
    assert "resuming from" in notes[2] and "iter_3.pt" in notes[2] and "iteration 3" in notes[2]

    # no iter file is good: the stage checkpoint of the highest iteration
    for n in (2, 3):
        (tmp_path / f"iter_{n}.pt").write_bytes(b"")
    _training_checkpoint(tmp_path / "round0.pt", model, 2, 0, 2)
    _training_checkpoint(tmp_path / "round1.pt", model, 4, 1, 2)
    save_checkpoint(tmp_path / "best.pt", model, iter=9)  # best.pt is never a resume point
    ckpt, path = checkpoints.find_resume(str(tmp_path), notes.append)
    assert path == str(tmp_path / "round1.pt") and ckpt["stage"] == 1

    # nothing good: every file tried is named
    for name in ("round0.pt", "round1.pt"):
        (tmp_path / name).write_bytes(b"PK\x03\x04")
    with pytest.raises(ValueError) as info:
        checkpoints.find_resume(str(tmp_path), notes.append)
    for name in ("last.pt", "iter_2.pt", "iter_3.pt", "iter_4.pt", "round0.pt", "round1.pt"):
        assert str(tmp_path / name) in str(info.value), name


def test_find_resume_with_last_missing_uses_the_newest_iter_file(tmp_path):
    model = build_model({"name": "small", "width": 4, "feature_dim": 32})
    _training_checkpoint(tmp_path / "iter_7.pt", model, 7, 0, 7)
    notes = []
    _, path = checkpoints.find_resume(str(tmp_path), notes.append)
    assert path == str(tmp_path / "iter_7.pt") and "last.pt is not there" in notes[-1]
    with pytest.raises(FileNotFoundError, match="last.pt"):
        checkpoints.find_resume(str(tmp_path / "nothing"), notes.append)


def _config(**train):
    return tiny_run_config("source_only", deterministic=True,
                           train={"iters": 6, "ckpt_every": 1, "keep_checkpoints": 2, "panels": 0, **train})


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_true_falls_back_from_a_truncated_last_and_continues_exactly(tmp_path, capsys):
    config = _config()
    full = tmp_path / "full"
    Trainer(config, full, progress=False, tensorboard=False).run()
    assert _listing(full / "checkpoints") == ["iter_4.pt", "iter_5.pt", "iter_6.pt", "last.pt"]
    # the folder of a run killed after iteration 5, whose last.pt then lost its second half
    run = tmp_path / "run"
    shutil.copytree(full, run)
    ckpts = run / "checkpoints"
    for name in ("iter_6.pt", "last.pt", "iter_5.pt"):
        os.unlink(ckpts / name)
    (ckpts / "last.pt").write_bytes((full / "checkpoints" / "iter_5.pt").read_bytes()[:5000])
    capsys.readouterr()
    Trainer(config, run, resume=True, progress=False, tensorboard=False).run()
    err = capsys.readouterr().err
    assert f"skipping a bad checkpoint: {ckpts / 'last.pt'}: not a readable checkpoint" in err
    assert f"resuming from {ckpts / 'iter_4.pt'}" in err and "Traceback" not in err
    _assert_same_weights(load_checkpoint(full / "checkpoints" / "last.pt")["model"],
                         load_checkpoint(ckpts / "last.pt")["model"])
    # the log continues where the checkpoint was: iterations 5 and 6 once each, as in the full run
    rows = list(csv.DictReader(open(run / "log.csv")))
    full_rows = list(csv.DictReader(open(full / "log.csv")))
    assert [r["iter"] for r in rows] == [str(i) for i in range(1, 7)]
    assert [r["loss_seg"] for r in rows] == [r["loss_seg"] for r in full_rows]


def test_resume_refuses_bad_or_unfit_checkpoints_naming_them(tmp_path):
    config = _config(iters=2, eval_every=1)
    Trainer(config, tmp_path / "full", progress=False, tensorboard=False).run()
    ckpts = tmp_path / "full" / "checkpoints"
    # a path given explicitly is used or refused, never replaced by another
    bad = tmp_path / "bad.pt"
    bad.write_bytes((ckpts / "last.pt").read_bytes()[:3000])
    with pytest.raises(ValueError, match=f"^{bad}: not a readable checkpoint"):
        Trainer(config, tmp_path / "a", resume=bad, progress=False).run()
    model_only = tmp_path / "model_only.pt"
    save_checkpoint(model_only, build_model(config["model"]), iter=3)
    with pytest.raises(ValueError, match=f"^{model_only}: a model checkpoint without the training state"):
        Trainer(config, tmp_path / "b", resume=model_only, progress=False).run()
    with pytest.raises(ValueError, match="best-on-val checkpoint holds no training position"):
        Trainer(config, tmp_path / "c", resume=ckpts / "best.pt", progress=False).run()
    other = dict(config, method="dann")
    with pytest.raises(ValueError, match=f"^{ckpts / 'iter_1.pt'}: a checkpoint of the source_only method"):
        Trainer(other, tmp_path / "d", resume=ckpts / "iter_1.pt", progress=False).run()
    shorter = dict(config, train=dict(config["train"], iters=1))
    with pytest.raises(ValueError, match="iteration 2 of stage 'train', which has 1 iterations"):
        Trainer(shorter, tmp_path / "e", resume=ckpts / "last.pt", progress=False).run()
    wider = dict(config, model=dict(config["model"], width=8))
    with pytest.raises(ValueError, match=f"^{ckpts / 'iter_1.pt'}: does not fit this run"):
        Trainer(wider, tmp_path / "f", resume=ckpts / "iter_1.pt", progress=False).run()


def test_cli_resume_error_names_the_file_without_a_traceback(tmp_path, capsys):
    from udafast import train
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "last.pt").write_bytes(pickle.dumps({"iter": 3}))
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config_file()))
    with pytest.raises(SystemExit) as info:
        train.main(["--config", str(config), "--method", "source_only", "--out", str(tmp_path / "run"), "--resume"])
    message = str(info.value.code)
    assert message.startswith(f"udafast.train: error: no checkpoint to resume from in {folder}: {folder / 'last.pt'}")
    assert "Traceback" not in message + capsys.readouterr().err


@pytest.fixture(scope="module")
def source_network(tmp_path_factory):
    out = tmp_path_factory.mktemp("source_only")
    Trainer(tiny_run_config("source_only", train={"iters": 2, "panels": 0}), out, progress=False,
            tensorboard=False).run()
    return str(out / "checkpoints" / "last.pt")


# method -> (config sections, the checkpoints to resume from: in every stage, and a stage's own)
EVERY_METHOD = {
    "dann": ({"dann": {"hidden": 8}}, ["iter_2.pt"]),
    "adaptsegnet": ({"adaptsegnet": {"ndf": 4}}, ["iter_2.pt"]),
    "oracle": ({}, ["iter_2.pt"]),
    "adabn": ({}, ["iter_2.pt"]),
    "cbst": ({"init": "source", "cbst": {"rounds": 2, "iters_per_round": 2}}, ["iter_1.pt", "iter_3.pt", "round0.pt"]),
    "proda": ({"init": "source", "train": {"stage_iters": 2}, "proda": {"disc_ndf": 4},
               "data": {"target": {"options": {"length": 6}}}},
              ["iter_1.pt", "iter_3.pt", "iter_5.pt", "iter_7.pt", "stage1.pt"]),
}


@pytest.mark.parametrize("method", sorted(EVERY_METHOD))
def test_every_method_resumes_bitwise(tmp_path, source_network, method):
    """Resumed from a checkpoint in each of its stages, a run ends with the checkpoint of the run not
    interrupted, every tensor bit for bit: network, modules, optimisers, generator, extra state
    (thresholds, prototypes), streams, RNGs and counters."""
    sections, starts = EVERY_METHOD[method]
    sections = dict(sections)
    if sections.get("init") == "source":
        sections["init"] = source_network
    train = {"iters": 4 if method != "cbst" else 2, "ckpt_every": 1, "keep_checkpoints": 8, "panels": 0,
             **sections.pop("train", {})}
    config = tiny_run_config(method, deterministic=True, train=train, **sections)
    full = tmp_path / "full"
    Trainer(config, full, progress=False, tensorboard=False).run()
    expected = load_checkpoint(full / "checkpoints" / "last.pt")
    for start in starts:
        # a copy of the run folder (pseudo-labels, soft labels, stage networks) as it was at `start`
        run = tmp_path / start
        shutil.copytree(full, run, ignore=shutil.ignore_patterns("iter_*", "last.pt", "metrics.json"))
        Trainer(config, run, resume=full / "checkpoints" / start, progress=False, tensorboard=False).run()
        assert_bitwise_equal(expected, load_checkpoint(run / "checkpoints" / "last.pt"), f"{method} from {start}")


def test_rng_state_round_trips_with_the_gaussian_caches():
    import random

    import numpy as np

    from udafast.engine.rng import get_rng_state, set_rng_state

    def draws():
        return (random.gauss(0, 1), random.random(), float(np.random.standard_normal()), float(np.random.rand()),
                torch.rand(3).tolist())

    random.gauss(0, 1), np.random.standard_normal()  # each leaves the second value of its pair cached
    saved = torch.load(_save_to_bytes(get_rng_state()), weights_only=True)
    expected = draws()
    set_rng_state(saved)
    assert draws() == expected


def _save_to_bytes(obj):
    import io
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer
