"""2-process DDP (CPU, gloo) ends with the same weights and metrics as 1 process, same global meta-batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).with_name("ddp_script.py")


def _shards(tmp_path: Path) -> str:
    from lightning_meta.data.glyphs import generate_glyphs

    out = tmp_path / "glyphs"
    generate_glyphs(out, seed=3, alphabets=6, chars_per_alphabet=(4, 5), drawings=6, size=16, splits=(4, 1, 1))
    return str(out)


def _run(algo: str, world: int, out: Path, shards: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_PORT=str(29500 + (os.getpid() % 1000) + world))
    proc = subprocess.run([sys.executable, str(SCRIPT), algo, str(world), str(out), shards], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = np.load(out)
    return {k: data[k] for k in data.files}


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["maml", "maml_pertask", "maml_conv", "protonet"])
def test_two_ranks_equal_one_rank(tmp_path, algo):
    shards = _shards(tmp_path) if algo in ("maml_conv", "protonet") else ""
    one = _run(algo, 1, tmp_path / "one.npz", shards)
    two = _run(algo, 2, tmp_path / "two.npz", shards)
    assert int(one["world"]) == 1 and int(two["world"]) == 2
    assert one["weights"].shape == two["weights"].shape
    np.testing.assert_allclose(two["weights"], one["weights"], rtol=0, atol=1e-5)
    assert float(one["n"]) == float(two["n"]) == 6.0  # every validation episode counted exactly once
    np.testing.assert_allclose(two["val"], one["val"], rtol=0, atol=1e-6)
