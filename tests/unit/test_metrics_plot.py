"""loss.png (job.train.metrics.Metrics.plot): drawn when something was logged since the last
plot, and only then (the end of a run that evaluated at its last step draws nothing new)."""

from job.train.metrics import Metrics


def events(metrics: Metrics, steps: range) -> None:
    for step in steps:
        metrics.log({"event": "train", "step": step, "loss": 5.0 - step / 10})
    metrics.log({"event": "eval", "step": steps[-1], "eval_loss": 4.0, "perplexity": 54.6})


def test_plot_is_drawn_again_only_after_new_events(tmp_path):
    metrics = Metrics(str(tmp_path / "run"), resume_step=None)
    events(metrics, range(1, 13))
    first = metrics.plot()
    png = tmp_path / "run" / "loss.png"
    assert first[:4] == b"\x89PNG" and png.read_bytes() == first
    png.write_bytes(b"not redrawn")
    assert metrics.plot() is first  # nothing logged since: neither drawn nor written
    assert png.read_bytes() == b"not redrawn"
    events(metrics, range(13, 25))
    second = metrics.plot()
    assert second != first and png.read_bytes() == second
