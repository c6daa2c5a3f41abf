"""2-process DDP (CPU, gloo) ends with the same weights and metrics as 1 process, same global meta-batch.

Every algorithm shipped so far is trained by tests/ddp_script.py, once with 1 process and once with
2 (one launch each: the script trains the models in turn), in float64; each test compares one of
them. Known limitation, checked by an expected failure: BatchNorm *running statistics* are per
rank (each rank updates them with its own tasks; DDP broadcasts rank 0's at every forward), so
they differ from one process, and evaluation that normalises with them (metric-based learners
with ``norm="batch"``, MAML++ ``bn="per_step"``) can differ although the weights are the same.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).with_name("ddp_script.py")

#: MAML second order (batched and per-task backward, MLP and Conv-4), ANIL and ProtoNet (named by issue 6)
#: and every other algorithm (tests/ddp_script.py builds each)
NAMES = ["maml", "maml_pertask", "maml_conv", "anil", "protonet", "metasgd", "reptile", "mamlpp", "mamlpp_conv",
         "imaml", "matchingnet", "matchingnet_pertask", "relationnet", "metaoptnet", "snail", "transformer", "mann"]
#: models with BatchNorm running statistics used at evaluation (see the module docstring)
RUNNING_STATS = ["protonet", "mamlpp_conv", "matchingnet", "matchingnet_pertask", "relationnet", "metaoptnet"]


def _run(world: int, out: Path, shards: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_PORT=str(29500 + (os.getpid() % 1000) + world))
    for k in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, str(SCRIPT), ",".join(NAMES), str(world), str(out), shards], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = np.load(out)
    return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[dict, dict]:
    from lightning_meta.data.glyphs import generate_glyphs

    tmp = tmp_path_factory.mktemp("ddp")
    shards = tmp / "glyphs"
    generate_glyphs(shards, seed=3, alphabets=6, chars_per_alphabet=(4, 5), drawings=6, size=16, splits=(4, 1, 1))
    one = _run(1, tmp / "one.npz", str(shards))
    two = _run(2, tmp / "two.npz", str(shards))
    assert int(one["world"]) == 1 and int(two["world"]) == 2
    return one, two


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_two_ranks_equal_one_rank(runs, name):
    one, two = runs
    w1, w2 = one[f"{name}/weights"], two[f"{name}/weights"]
    assert w1.shape == w2.shape and np.isfinite(w2).all()
    assert int(one[f"{name}/step"]) == int(two[f"{name}/step"]) > 0
    assert np.abs(w1 - one[f"{name}/init"]).max() > 1e-4  # training moved the weights (else the check is empty)
    np.testing.assert_allclose(w2, w1, rtol=0, atol=1e-5)
    assert float(one[f"{name}/n"]) == float(two[f"{name}/n"]) == 6.0  # every validation episode counted exactly once
    if name not in RUNNING_STATS:
        np.testing.assert_allclose(two[f"{name}/val"], one[f"{name}/val"], rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(
    reason="BatchNorm running statistics are per rank under DDP (rank 0's are broadcast), not those of one "
           "process that saw every task; weights are exact")) for n in RUNNING_STATS])
def test_batchnorm_running_statistics_match_one_rank(runs, name):
    one, two = runs
    s1, s2 = one[f"{name}/running_stats"], two[f"{name}/running_stats"]
    assert s1.size > 0
    np.testing.assert_allclose(s2, s1, rtol=0, atol=1e-5)
