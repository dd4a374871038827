"""What the bench scripts share: GPU timing, the CPU-check tally, and writing the Markdown table."""

from __future__ import annotations

import statistics
from pathlib import Path


def cuda_median_us(fn, repeats: int, warmup: int = 3) -> float:
    """Median wall time of ``fn()`` on the GPU in microseconds, timed with CUDA events."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return statistics.median(times)


class Checks:
    """``--cpu-check`` tally: one printed line a check, exit status 1 if any failed."""

    def __init__(self):
        self.failures: list[str] = []

    def __call__(self, ok: bool, what: str) -> None:
        print(("ok    " if ok else "FAIL  ") + what, flush=True)
        if not ok:
            self.failures.append(what)

    def exit_status(self) -> int:
        print(f"{len(self.failures)} failure(s)")
        return 1 if self.failures else 0


def emit_table(lines: list[str], out: str | None) -> None:
    """Print the Markdown table and, with ``--out``, write it to that file too."""
    table = "\n".join(lines) + "\n"
    print(table)
    if out:
        Path(out).write_text(table)
