"""Trains each shipped few-shot learner on the embedded default and tabulates meta-test results.

Every run is tested on the same fixed 600 test episodes (seed 0) for its shot setting, so the
rows are comparable. Usage (records ``benchmarks/embedded_results.md``)::

    OMP_NUM_THREADS=2 python benchmarks/compare_embedded.py [--only NAME ...] [--out benchmarks/embedded_results.md]

Each row: algorithm, evaluation shape, accuracy ± 95% CI over 600 episodes, training budget
(optimizer steps x meta-batch) and wall time of the whole run (training + validation + test).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> (config, extra overrides); budgets are fixed per family and recorded in the table
RUNS: dict[str, tuple[str, list[str]]] = {
    "protonet-5w1s": ("configs/quickstart.yaml", []),
    "protonet-5w5s": ("configs/protonet_glyphs.yaml", []),
    "maml-5w1s": ("configs/maml_glyphs.yaml", []),
    "fomaml-5w1s": ("configs/maml_glyphs.yaml", ["--model.init_args.first_order", "true"]),
    "maml-5w5s": ("configs/maml_glyphs.yaml", ["--data.init_args.shots", "5", "--data.init_args.queries", "10",
                                               "--data.init_args.eval_queries", "15"]),
}


def run(name: str, config: str, extra: list[str], workdir: Path) -> dict:
    start = time.time()
    cmd = [sys.executable, "-m", "lightning_meta", "fit", "--config", str(ROOT / config),
           "--trainer.enable_progress_bar", "false", *extra]
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
    wall = time.time() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    found = sorted(workdir.glob("lightning_logs/*/version_*/results.json"), key=os.path.getmtime)
    result = json.loads(found[-1].read_text())
    result.update(name=name, config=config, overrides=" ".join(extra), wall_s=round(wall, 1))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", help="run only these names: " + ", ".join(RUNS))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "embedded_results.md"))
    a = p.parse_args()
    names = a.only or list(RUNS)
    rows = []
    for name in names:
        config, extra = RUNS[name]
        with tempfile.TemporaryDirectory() as tmp:
            r = run(name, config, extra, Path(tmp))
        m = r["metrics"]
        rows.append(r)
        print(f"{name}: {100 * m['test/acc']:.2f} ± {100 * m['test/acc_ci95']:.2f} in {r['wall_s']} s", flush=True)
    lines = [
        "# Embedded default: meta-test accuracy of each learner",
        "",
        f"Command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')} python benchmarks/compare_embedded.py"
        + (f" --only {' '.join(names)}" if a.only else "") + "`",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
        f"{os.environ.get('OMP_NUM_THREADS', 'default')}; date {time.strftime('%Y-%m-%d')}.",
        "Test: 600 fixed episodes (data seed 0), 15 queries per class, mean ± 1.96·s/√n.",
        "",
        "| run | algorithm | test shape | accuracy (%) | training budget | wall time (s) | config + overrides |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = r["metrics"]
        shape = f"{r.get('eval_ways')}-way {r.get('eval_shots')}-shot"
        budget = f"{r['global_step']} steps"
        lines.append(
            f"| {r['name']} | {r['algorithm']} | {shape} | {100 * m['test/acc']:.2f} ± {100 * m['test/acc_ci95']:.2f} "
            f"| {budget} | {r['wall_s']} | `{r['config']}` {r['overrides']} |"
        )
    Path(a.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
