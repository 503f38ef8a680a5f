"""benchmarks/mic_context.py: its rows run (a few iterations each on tiny scenes), the flags select
what each row says, the masked scores split the val pixels, and finished runs are reused."""
import json

import pytest
import torch
import yaml

from benchmarks import mic_context
from conftest import tiny_config_file
from udafast.config import merge

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_DAFORMER = {"rcs_min_pixels": 0, "ignore_top": 1, "ignore_bottom": 8}


@pytest.fixture
def tiny_file(tmp_path):
    config = merge(tiny_config_file(train={"panels": 0, "iters": 2}),
                   {"methods": {m: {"init": "@source_only", m: dict(TINY_DAFORMER, **extra)}
                                for m, extra in (("daformer", {}), ("mic", {"mask_block_size": 8}))}})
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_rows_change_one_mic_setting_each():
    rows = {key: (method, flags) for key, _, method, flags in mic_context.ROWS}
    assert rows["daformer"] == ("daformer", []) and rows["mic"] == ("mic", [])
    assert rows["mic_bn_kept"] == ("mic", ["mic.mask_bn_update=false"])
    assert all(len(flags) == 1 for key, (method, flags) in rows.items() if key.startswith("mic_"))


def test_masked_scores_split_the_pixels_by_the_mask(tmp_path, monkeypatch):
    """A network that predicts the label where the pixel is visible and class 0 where it is hidden
    scores 100 on the visible pixels and only class 0's share on the hidden ones."""
    label = torch.randint(0, 3, (16, 16))
    dataset = [{"image": torch.rand(3, 16, 16), "label": label}]

    class Oracle(torch.nn.Module):
        normalization = "imagenet"

        def forward(self, x):
            seen = (x != 0).any(1)
            logits = torch.nn.functional.one_hot(torch.where(seen, label, 0), 19).permute(0, 3, 1, 2).float()
            return {"logits": logits}
    monkeypatch.setattr(mic_context, "load_model", lambda path: Oracle())
    scores = mic_context.masked_scores("unused.pt", dataset, 4, 0.5)
    assert scores["masked_visible"] == 100.0
    g = torch.Generator().manual_seed(0)
    hidden = ~mic_context.block_mask(1, (16, 16), 4, 0.5, g)[0, 0].bool()
    truth = label[hidden]
    zero_iou = 100 * float((truth == 0).sum()) / float(hidden.sum())  # class 0 predicted everywhere hidden
    assert scores["masked_hidden"] == pytest.approx(zero_iou / len(torch.unique(truth)))


def test_the_rows_run_and_write_their_table(tmp_path, tiny_file, capsys):
    results = tmp_path / "context.json"
    argv = ["--config", tiny_file, "--seeds", "0", "--rows", "daformer,mic,mic_bn_kept", "--out", str(tmp_path / "runs"),
            "--results", str(results)]
    assert mic_context.main(argv) == 0
    data = json.loads(results.read_text())
    assert [r["key"] for r in data["rows"]] == ["daformer", "mic", "mic_bn_kept"]
    for row in data["rows"]:
        for column, _ in mic_context.COLUMNS:
            assert 0 <= row[f"{column}_mean"] <= 100
    recorded = yaml.safe_load((tmp_path / "runs" / "seed_0" / "mic_bn_kept" / "config.yaml").read_text())
    assert recorded["mic"]["mask_bn_update"] is False
    assert (tmp_path / "runs" / "seed_0" / "mic_target_bn" / "metrics.json").is_file()
    assert "| MIC, its masked pass keeping BatchNorm's running statistics |" in (tmp_path / "context.md").read_text()
    # a second call reuses the finished runs
    done = [p.stat().st_mtime_ns for p in sorted((tmp_path / "runs").rglob("metrics.json"))]
    assert mic_context.main(argv) == 0
    assert [p.stat().st_mtime_ns for p in sorted((tmp_path / "runs").rglob("metrics.json"))] == done
    with pytest.raises(SystemExit):
        mic_context.main(["--rows", "mic,nope"])
    assert "--rows: unknown row(s) nope" in capsys.readouterr().err
