"""The user-facing message channel: once, on rank 0, and through the progress bar while it shows."""

from mmpo_megatron.config import LoggingConfig
from mmpo_megatron.messages import say, write_through
from mmpo_megatron.train.logger import MetricsLogger


def test_say_prints_on_rank_0_only_and_through_a_writer_while_one_is_set(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    say("from rank 1")
    monkeypatch.setenv("RANK", "0")
    say("from rank 0")
    assert capsys.readouterr().out == "from rank 0\n"
    written = []
    write_through(written.append)
    try:
        say("through the bar")
    finally:
        write_through(None)
    say("plain again")
    assert written == ["through the bar"] and capsys.readouterr().out == "plain again\n"


def test_the_metrics_logger_routes_messages_through_its_bar_and_lets_go_when_closed(tmp_path, monkeypatch):
    from mmpo_megatron import messages

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(messages, "_writer", None)
    shown = LoggingConfig(tensorboard=False, progress_bar=True)
    logger = MetricsLogger(tmp_path / "a", shown, 10, enabled=True)
    try:
        assert messages._writer == logger._bar.write  # tqdm.write: the line goes above the bar
    finally:
        logger.close()
    assert messages._writer is None
    # A run that fails before closing its logger leaves no writer to the next one without a bar.
    MetricsLogger(tmp_path / "crashed", shown, 10, enabled=True)
    assert messages._writer is not None
    quiet = MetricsLogger(tmp_path / "quiet", LoggingConfig(tensorboard=False, progress_bar=False), 10, enabled=True)
    assert messages._writer is None
    quiet.close()
