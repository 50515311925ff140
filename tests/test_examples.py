"""The README's main job (the fan-out example) runs and stays within its limits."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_fanout_example_completes_every_call_within_the_token_limit() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "llm_fanout.py"), "--calls", "30"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    out = result.stdout
    assert "30 calls in" in out
    assert re.search(r"granted 30, timed out 0", out), out
    elapsed = float(re.search(r"calls in ([\d.]+) s", out).group(1))  # type: ignore[union-attr]
    tokens_per_s = float(re.search(r"tokens/s achieved\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    # Never above what a full bucket plus the refill allows over the run.
    assert tokens_per_s * elapsed <= 1000 + 1000 * elapsed + 1e-6
