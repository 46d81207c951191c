"""scripts/gpu_check.sh on a CPU: it parses, keeps to its time budget and always writes its report."""

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"


def test_the_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


def test_a_spent_budget_skips_every_step_and_still_writes_the_report(tmp_path):
    env = os.environ | {"GPU_CHECK_BUDGET": "0", "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(SCRIPT), str(tmp_path)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    steps = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert len(steps) >= 10 and all(s["rc"] == -1 and s["skipped"] for s in steps)
    assert {"env", "cuda_tests", "step_bench", "edge_resume"} <= {s["step"] for s in steps}
    assert "| cuda_tests | -1 | 0 |" in (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "report.json").read_text())["steps"] == steps
