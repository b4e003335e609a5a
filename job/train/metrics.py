"""metrics.jsonl, summary.json and the loss/perplexity PNG (rank 0 only).

On resume, events after the checkpoint's step are dropped (the resumed run logs them
again), so a resumed run's file equals an uninterrupted one's. A local file grows by
appending; an S3 object is replaced whole, at evaluations, checkpoints and the end.
"""

from __future__ import annotations

import io
import json

from job import jsonio, storage


class Metrics:
    def __init__(self, run_output: str, resume_step: int | None):
        self.uri = storage.join(run_output, "metrics.jsonl")
        self.run_output = run_output
        self.events: list[dict] = []
        self.written = 0  # events already in the file
        self.plotted: tuple[int, bytes] | None = None  # (events then, the PNG) of the last plot
        if resume_step is not None:
            try:
                lines = storage.read_text(self.uri).splitlines()
            except FileNotFoundError:
                lines = []
            self.events = [e for e in _parse(lines) if e["step"] <= resume_step]
        self._rewrite()

    def log(self, event: dict) -> None:
        self.events.append(event)

    def flush(self) -> None:
        """Local files grow by appending (a long run must not rewrite them at every log);
        an S3 object can only be replaced whole, so callers flush it less often."""
        if storage.is_s3(self.uri):
            self._rewrite()
            return
        storage.fenced(self.uri)  # appending bypasses storage's writes: fence it here
        with open(storage.local_path(self.uri), "a") as f:
            f.write("".join(jsonio.dumps(e) + "\n" for e in self.events[self.written :]))
        self.written = len(self.events)

    def _rewrite(self) -> None:
        storage.write_text(self.uri, "".join(jsonio.dumps(e) + "\n" for e in self.events))
        self.written = len(self.events)

    def plot(self) -> bytes:
        """loss.png: training loss, eval loss and eval perplexity against the step. Returns
        the PNG's bytes (the trackers get the same file without reading it back). Drawn
        again only when something was logged since (the end of a run that evaluated at its
        last step: the file is current); a plot costs about 0.1 s of CPU."""
        if self.plotted and self.plotted[0] == len(self.events):
            return self.plotted[1]
        # a Figure of its own, no pyplot: nothing global, and 0.3 s less to import
        from matplotlib.figure import Figure

        train = [e for e in self.events if e["event"] == "train"]
        evals = [e for e in self.events if e["event"] == "eval"]
        fig = Figure(figsize=(11, 4))
        ax1, ax2 = fig.subplots(1, 2)
        ax1.plot([e["step"] for e in train], [e["loss"] for e in train], label="train loss")
        ax1.plot(
            [e["step"] for e in evals], [e["eval_loss"] for e in evals], "o-", label="eval loss"
        )
        ax1.set_xlabel("step")
        ax1.set_ylabel("masked-LM loss")
        ax1.legend()
        ax1.grid(alpha=0.3)
        ax2.plot([e["step"] for e in evals], [e["perplexity"] for e in evals], "o-", color="C2")
        ax2.set_xlabel("step")
        ax2.set_ylabel("eval perplexity")
        ax2.set_yscale("log")
        ax2.grid(alpha=0.3)
        fig.suptitle(self.run_output)
        # fixed margins for the fixed size: tight_layout draws the figure once more to
        # measure it (twice the time of the plot)
        fig.subplots_adjust(left=0.07, right=0.98, bottom=0.12, top=0.9, wspace=0.22)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        png = buf.getvalue()
        storage.write_bytes(storage.join(self.run_output, "loss.png"), png)
        self.plotted = (len(self.events), png)
        return png


def _parse(lines: list[str]) -> list[dict]:
    """Events of a metrics file; a last line cut by a crash mid-append is dropped."""
    events = []
    for line in lines:
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return events


def write_summary(run_output: str, summary: dict) -> None:
    storage.commit(storage.join(run_output, "summary.json"), jsonio.dumps(summary, indent=2) + "\n")
