"""Trains each shipped few-shot learner on the embedded default and tabulates meta-test results.

Every run is tested on the same fixed 600 test episodes (seed 0) for its shot setting, so the
rows are comparable. Usage (records ``benchmarks/embedded_results.md``)::

    OMP_NUM_THREADS=1 python benchmarks/compare_embedded.py [--only NAME ...] [--rerun]

Finished runs are kept in ``benchmarks/embedded_results.json`` (so an interrupted comparison
resumes where it stopped) and the table is rewritten after every run.

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

# name -> (config, extra overrides); budgets are the configs' own and are recorded in the table.
# The 5-shot rows train a separate model at 5 shots (papers match training and test shots);
# sequence learners need room for 25 support examples + 1 query (max_len 26).
_FIVE = ["--data.init_args.shots", "5", "--data.init_args.eval_shots", "5"]
_SEQ5 = [*_FIVE, "--model.init_args.max_len", "26"]
RUNS: dict[str, tuple[str, list[str]]] = {
    "protonet-5w1s": ("configs/quickstart.yaml", []),
    "protonet-5w5s": ("configs/protonet_glyphs.yaml", []),
    "maml-5w1s": ("configs/maml_glyphs.yaml", []),
    "maml-5w5s": ("configs/maml_glyphs.yaml", _FIVE),
    "fomaml-5w1s": ("configs/maml_glyphs.yaml", ["--model.init_args.first_order", "true"]),
    "fomaml-5w5s": ("configs/maml_glyphs.yaml", ["--model.init_args.first_order", "true", *_FIVE]),
    "anil-5w1s": ("configs/anil_glyphs.yaml", []),
    "anil-5w5s": ("configs/anil_glyphs.yaml", _FIVE),
    "metasgd-5w1s": ("configs/maml_glyphs.yaml", ["--model.class_path", "lightning_meta.algorithms.MetaSGD"]),
    "metasgd-5w5s": ("configs/maml_glyphs.yaml", ["--model.class_path", "lightning_meta.algorithms.MetaSGD", *_FIVE]),
    "reptile-5w1s": ("configs/reptile_glyphs.yaml", []),
    "reptile-5w5s": ("configs/reptile_glyphs.yaml", _FIVE),
    # 50 meta-batches per epoch, so the 2-epoch multi-step-loss annealing fits any budget >= 150 steps
    "mamlpp-5w1s": ("configs/mamlpp_glyphs.yaml", ["--data.init_args.train_episodes", "400"]),
    "mamlpp-5w5s": ("configs/mamlpp_glyphs.yaml", ["--data.init_args.train_episodes", "400", *_FIVE]),
    "imaml-5w1s": ("configs/imaml_glyphs.yaml", []),
    "imaml-5w5s": ("configs/imaml_glyphs.yaml", _FIVE),
    "matchingnet-5w1s": ("configs/matchingnet_glyphs.yaml", []),
    "matchingnet-5w5s": ("configs/matchingnet_glyphs.yaml", _FIVE),
    "relationnet-5w1s": ("configs/relationnet_glyphs.yaml", []),
    "relationnet-5w5s": ("configs/relationnet_glyphs.yaml", _FIVE),
    "metaoptnet-5w1s": ("configs/metaoptnet_glyphs.yaml", []),
    "metaoptnet-5w5s": ("configs/metaoptnet_glyphs.yaml", ["--data.init_args.eval_shots", "5"]),
    "snail-5w1s": ("configs/snail_glyphs.yaml", []),
    "snail-5w5s": ("configs/snail_glyphs.yaml", _SEQ5),
    "transformer-5w1s": ("configs/transformer_glyphs.yaml", []),
    "transformer-5w5s": ("configs/transformer_glyphs.yaml", _SEQ5),
    "mann-5w1s": ("configs/mann_glyphs.yaml", []),
    "mann-5w5s": ("configs/mann_glyphs.yaml", _SEQ5),
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
    saved = found[-1].parent / "config.yaml"
    if saved.exists():
        import yaml

        cfg = yaml.safe_load(saved.read_text())
        result["meta_batch_size"] = cfg.get("data", {}).get("init_args", {}).get("meta_batch_size")
    result.update(name=name, config=config, overrides=" ".join(extra), wall_s=round(wall, 1))
    return result


def table(rows: list[dict], command: str) -> str:
    """The markdown report of ``rows`` (stored run records) in ``RUNS`` order."""
    order = {name: i for i, name in enumerate(RUNS)}
    rows = sorted(rows, key=lambda r: order.get(r["name"], len(order)))
    lines = [
        "# Embedded default: meta-test accuracy of each learner",
        "",
        f"Command: `{command}`",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
        f"{os.environ.get('OMP_NUM_THREADS', 'default')}; dates {', '.join(sorted({r['date'] for r in rows}))}.",
        "Test: the same 600 fixed episodes (data seed 0) for every row of a shot setting, 15 queries per",
        "class, mean ± 1.96·s/√n over episodes. Wall time covers training, validation and test of the",
        "whole run on a shared machine (other jobs were running), so it is indicative only.",
        "",
        "| run | algorithm | test shape | accuracy (%) | training budget | wall time (s) | config + overrides |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = r["metrics"]
        shape = f"{r.get('eval_ways')}-way {r.get('eval_shots')}-shot"
        budget = f"{r['global_step']} steps x {r.get('meta_batch_size', '?')} tasks"
        lines.append(
            f"| {r['name']} | {r['algorithm']} | {shape} | {100 * m['test/acc']:.2f} ± {100 * m['test/acc_ci95']:.2f} "
            f"| {budget} | {r['wall_s']} | `{r['config']}` {r['overrides']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", help="run only these names: " + ", ".join(RUNS))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "embedded_results.md"))
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "embedded_results.json"),
                   help="run records kept between invocations; names already there are skipped unless --rerun")
    p.add_argument("--rerun", action="store_true", help="run names that already have a record again")
    p.add_argument("--max-steps", type=int, default=None,
                   help="one training budget for every run (optimizer steps) instead of each config's own; "
                        "intermediate validation is then switched off (the test uses the final weights either way)")
    a = p.parse_args()
    unknown = [n for n in a.only or [] if n not in RUNS]
    if unknown:
        p.error(f"unknown run names {unknown}; choose from {list(RUNS)}")
    names = a.only or list(RUNS)
    store = Path(a.results)
    records: dict[str, dict] = json.loads(store.read_text()) if store.exists() else {}
    command = f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')} python benchmarks/compare_embedded.py"
    if a.max_steps is not None:
        command += f" --max-steps {a.max_steps}"
    for name in names:
        if name in records and not a.rerun:
            print(f"{name}: kept from {store}", flush=True)
            continue
        config, extra = RUNS[name]
        if a.max_steps is not None:
            extra = [*extra, "--trainer.max_steps", str(a.max_steps), "--trainer.limit_val_batches", "0"]
        with tempfile.TemporaryDirectory() as tmp:
            try:
                r = run(name, config, extra, Path(tmp))
            except RuntimeError as err:  # one failing learner must not stop the comparison
                print(f"{name}: FAILED\n{err}", flush=True)
                continue
        r["date"] = time.strftime("%Y-%m-%d")
        records[name] = r
        tmp_store = store.with_suffix(".json.tmp")
        tmp_store.write_text(json.dumps(records, indent=1))
        os.replace(tmp_store, store)  # a kill never loses the finished runs
        Path(a.out).write_text(table(list(records.values()), command))
        m = r["metrics"]
        print(f"{name}: {100 * m['test/acc']:.2f} ± {100 * m['test/acc_ci95']:.2f} in {r['wall_s']} s", flush=True)
    Path(a.out).write_text(table(list(records.values()), command))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
