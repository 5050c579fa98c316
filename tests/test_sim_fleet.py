"""bench/sim_fleet.py, the discrete-event check of docs/scaling.md's worked plan, runs as
documented and still says what the doc quotes: the plan holds with its defaults, and a
plan that sells one request per payment saturates (and says which stations)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_sim(*args: str) -> str:
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "sim_fleet.py"), *args],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def busy(text: str, station: str) -> float:
    return float(re.search(rf"{re.escape(station)}\s*:\s*([\d.]+)% busy", text).group(1))


def test_the_worked_plan_holds_as_the_doc_says():
    text = run_sim()                                  # the defaults: the plan as the doc gives it
    assert text.rstrip().endswith("the plan holds"), text
    assert 30 < busy(text, "sidecar CPU") < 70 and busy(text, "node HTLCs (busiest)") < 100
    assert "asks (pool ran dry)     : 0;" in text
    doc = (ROOT / "docs" / "scaling.md").read_text()
    assert "python bench/sim_fleet.py" in doc and "the plan holds" in doc


def test_one_request_per_payment_saturates_and_says_where():
    text = run_sim("--credits", "1", "--seconds", "0.5")
    assert "the plan does NOT hold" in text, text
    saturated = {line.split(":")[0].strip() for line in text.splitlines() if "<-- saturated" in line}
    assert {"sidecar CPU", "node HTLCs (busiest)"} <= saturated, text
    nodes = int(re.search(r"sizing rule \(70% busy\)\s*: \d+ sidecar cores, (\d+) nodes", text).group(1))
    assert nodes > 1000, text
