"""2-process DDP (CPU, gloo) ends with the same weights and metrics as 1 process, same global meta-batch.

Every algorithm shipped so far is trained by tests/ddp_script.py, once with 1 process and once with
2 (one launch each: the script trains the models in turn), in float64; each test compares one of
them. BatchNorm *running statistics* (metric-based learners with ``norm="batch"``, MAML++
``bn="per_step"``) match too: each rank records the updates its own tasks make and, after every
training step, replays every rank's in rank order (lightning_meta.functional.bn_sync), so the
validation that normalises with them matches as well.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ports import launch_env

SCRIPT = Path(__file__).with_name("ddp_script.py")

#: MAML second order (batched and per-task backward, MLP and Conv-4), ANIL and ProtoNet (named by issue 6)
#: and every other algorithm (tests/ddp_script.py builds each)
NAMES = ["maml", "maml_pertask", "maml_conv", "anil", "protonet", "metasgd", "reptile", "reptile_paper", "mamlpp",
         "mamlpp_conv", "imaml", "matchingnet", "matchingnet_pertask", "relationnet", "metaoptnet", "snail",
         "transformer", "mann"]
#: models with BatchNorm running statistics used at evaluation (synchronised across ranks after each step)
RUNNING_STATS = ["protonet", "mamlpp_conv", "matchingnet", "matchingnet_pertask", "relationnet", "metaoptnet"]


def _run(world: int, out: Path, shards: str) -> dict:
    env = {**launch_env(), "DDP_SCRIPT_DIR": str(out.parent)}
    proc = subprocess.run([sys.executable, str(SCRIPT), ",".join([*NAMES, "ensemble_top_k"]), str(world), str(out),
                           shards], env=env,
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
    np.testing.assert_allclose(two[f"{name}/val"], one[f"{name}/val"], rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", RUNNING_STATS)
def test_batchnorm_running_statistics_match_one_rank(runs, name):
    one, two = runs
    s1, s2 = one[f"{name}/running_stats"], two[f"{name}/running_stats"]
    assert s1.size > 0 and s1.shape == s2.shape
    assert np.abs(s1 - one[f"{name}/init_stats"]).max() > 1e-3  # training moved the statistics
    np.testing.assert_allclose(s2, s1, rtol=0, atol=1e-6)
    # both ranks end with the same statistics (rank 1's are saved too), and every update was counted
    np.testing.assert_allclose(two[f"{name}/running_stats_rank1"], s2, rtol=0, atol=0)
    # checkpoint callbacks (which run before the module's on_train_batch_end) see the synchronised statistics
    np.testing.assert_allclose(two[f"{name}/stats_at_batch_end"], s2, rtol=0, atol=0)
    np.testing.assert_array_equal(two[f"{name}/batches_tracked"], one[f"{name}/batches_tracked"])


@pytest.mark.slow
def test_checkpoint_ensemble_two_ranks_equal_one_rank(runs):
    """The test score of an ensemble (initial + trained MAML weights) with 2 processes equals 1 process."""
    one, two = runs
    assert float(one["maml/ensemble_size"]) == float(two["maml/ensemble_size"]) == 2.0
    assert float(one["maml/ensemble_n"]) == float(two["maml/ensemble_n"]) == 6.0  # every test episode once
    np.testing.assert_allclose(two["maml/ensemble_test"], one["maml/ensemble_test"], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_checkpoint_ensemble_of_the_best_two_ranks_equal_one_rank(runs):
    """CheckpointEnsemble(top_k=2) picks the same checkpoints and scores the same with 2 processes as with 1."""
    one, two = runs
    assert list(one["ensemble_top_k/members"]) == list(two["ensemble_top_k/members"])
    assert len(one["ensemble_top_k/members"]) == 2
    assert float(one["ensemble_top_k/n"]) == float(two["ensemble_top_k/n"]) == 6.0
    np.testing.assert_allclose(two["ensemble_top_k/mse"], one["ensemble_top_k/mse"], rtol=0, atol=1e-6)
