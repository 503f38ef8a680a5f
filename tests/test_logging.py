"""The run logger's progress lines: running losses per stage."""
from udafast.engine.logging import RunLogger


def test_progress_line_shows_only_the_current_stage_losses(tmp_path, capsys):
    logger = RunLogger(str(tmp_path), 2, progress=False, tensorboard=False)
    logger.log_iteration(1, "warmup", 1, {"seg": 1.0, "adv": 0.5}, {"model": 0.1}, 0.01)
    logger.log_iteration(2, "stage1", 1, {"seg": 2.0, "pl": 3.0}, {"model": 0.1}, 0.01)
    logger.close()
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "[stage1] iter 2/2" in last and "pl 3" in last and "seg 2" in last and "adv" not in last
