"""bench/compare.py: the regression guard over two results files (run as a script, as CI would)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

COMPARE = Path(__file__).resolve().parents[2] / "bench" / "compare.py"


def results(path: Path, **ratios: float) -> Path:
    path.write_text(json.dumps({"ratios": [{"key": k, "ratio": v} for k, v in ratios.items()]}))
    return path


def run(*args: Path | str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(COMPARE), *map(str, args)], capture_output=True, text=True, timeout=30
    )


def test_within_tolerance_passes(tmp_path: Path) -> None:
    old = results(tmp_path / "old.json", a=1.5, b=4.0, gone=2.0)
    new = results(tmp_path / "new.json", a=1.40, b=4.4, added=1.0)  # -6.7%, +10%
    out = run(old, new)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "| a | 1.500 | 1.400 | -6.7% |" in out.stdout
    assert "2 ratios in one file only" in out.stdout


def test_a_drop_over_ten_percent_fails(tmp_path: Path) -> None:
    old = results(tmp_path / "old.json", a=1.5, b=4.0)
    new = results(tmp_path / "new.json", a=1.3, b=4.0)  # -13.3%
    out = run(old, new)
    assert out.returncode == 1
    assert "REGRESSION" in out.stdout and "1 ratio(s) worse" in out.stderr
    assert run(old, new, "--tolerance", "0.2").returncode == 0


def test_bad_input_exit_2(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{not json")
    good = results(tmp_path / "good.json", a=1.0)
    assert run(tmp_path / "bad.json", good).returncode == 2
    assert run(good, results(tmp_path / "other.json", z=1.0)).returncode == 2
