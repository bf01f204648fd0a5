"""benchmarks/seed_groups.py: runs grouped by variant, mean ± standard error over the seeds, JSON and plot."""

import json
import math
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_groups_repeated_names_and_reports_mean_and_standard_error(tmp_path):
    specs = []
    for group, accuracies in {"with": [99.0, 97.0, 98.0], "without": [70.0]}.items():
        for seed, accuracy in enumerate(accuracies):
            folder = tmp_path / f"{group}{seed}"
            folder.mkdir()
            (folder / "all_results.json").write_text(
                json.dumps({"eval_vqa_accuracy": accuracy, "ood_auroc_fitting": 0.5 + seed / 10})
            )
            specs.append(f"{group}={folder}")
    out = tmp_path / "summary"
    subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "seed_groups.py"), *specs, "--out", str(out)],
        check=True,
        capture_output=True,
    )
    written = json.loads(out.with_suffix(".json").read_text())
    accuracy = written["groups"]["with"]["eval_vqa_accuracy"]
    assert accuracy["values"] == [99.0, 97.0, 98.0] and math.isclose(accuracy["mean"], 98.0)
    assert math.isclose(accuracy["sem"], 1.0 / math.sqrt(3))  # sample deviation 1, three seeds
    assert written["groups"]["without"]["eval_vqa_accuracy"]["sem"] == 0.0
    assert math.isclose(written["groups"]["with"]["ood_auroc_fitting"]["mean"], 0.6)
    assert "ood_kept_fraction_fitting" not in written["groups"]["with"]  # absent metrics are not invented
    assert len(written["runs"]["with"]) == 3
    assert out.with_suffix(".png").stat().st_size > 0
