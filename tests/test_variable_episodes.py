"""Meta-Dataset variable-way variable-shot episodes (REFERENCE §5) and learners that consume them."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from test_streaming import SIDE, chi2_sf, ids_of, write_set  # shared fixture helpers
from torch import nn

from lightning_meta.algorithms import MAML, MatchingNet, MetaOptNet, ProtoNet
from lightning_meta.backbones import MLP
from lightning_meta.data.sampling import episode_rng
from lightning_meta.data.variable import VariableShape, check_variable, sample_variable, usable_groups
from lightning_meta.datamodules import ShardDataModule
from lightning_meta.episode import collate_episodes
from lightning_meta.errors import MetaConfigError
from lightning_meta.functional import prototypes


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_META_CACHE", str(tmp_path / "cache"))


def reference_plan(rng: np.random.Generator, n_images: list[int], groups: list[list[int]] | None = None):
    """REFERENCE §5 transcribed step by step (drawing in the order the steps are listed)."""
    if groups is None:
        candidates = list(range(len(n_images)))
    else:
        candidates = groups[rng.integers(0, len(groups))]  # pick an alphabet first
    way = rng.integers(5, min(50, len(candidates)) + 1)  # 1. N ~ U{5 .. min(50, classes)}
    chosen = [candidates[i] for i in rng.choice(len(candidates), size=way, replace=False)]
    sizes = [n_images[c] for c in chosen]
    q = min(10, min(s // 2 for s in sizes))  # 2. same query count for every class
    beta = 1.0 - rng.random()  # 3. beta ~ U(0, 1]
    support = min(500, sum(math.ceil(beta * min(100, s - q)) for s in sizes))
    alphas = rng.uniform(math.log(0.5), math.log(2.0), size=way)  # 4. shots
    w = [s * math.exp(a) for s, a in zip(sizes, alphas, strict=True)]
    shots = [min(math.floor(wi / sum(w) * (support - way)) + 1, s - q) for wi, s in zip(w, sizes, strict=True)]
    return [(c, k, q) for c, k in zip(chosen, shots, strict=True)], support


COUNTS = [20, 21, 34, 60, 7, 9, 250, 600, 1300, 45] * 7  # 70 classes, small to ImageNet-sized


# --------------------------------------------------------------------------- the sampler
def test_sampler_equals_the_reference_transcription():
    shape = VariableShape()
    groups = [list(range(g, 70, 4)) for g in range(4)]
    for seed in range(300):
        plan = sample_variable(np.random.default_rng(seed), COUNTS, shape)
        assert plan == reference_plan(np.random.default_rng(seed), COUNTS)[0]
        hier = sample_variable(np.random.default_rng(seed), COUNTS, shape, [np.asarray(g) for g in groups])
        assert hier == reference_plan(np.random.default_rng(seed), COUNTS, groups)[0]


def test_way_shot_and_query_statistics_follow_reference():
    shape = VariableShape()
    n = 4000
    ways, totals = Counter(), []
    for i in range(n):
        plan = sample_variable(episode_rng(0, "train", 0, i), COUNTS, shape)
        way = len(plan)
        ways[way] += 1
        sizes = [COUNTS[c] for c, _, _ in plan]
        assert len({c for c, _, _ in plan}) == way  # without replacement
        assert {q for _, _, q in plan} == {min(10, min(s // 2 for s in sizes))}
        for (_, k, q), s in zip(plan, sizes, strict=True):
            assert 1 <= k <= s - q
        totals.append(sum(k for _, k, _ in plan))
        assert totals[-1] <= 500
    assert set(ways) <= set(range(5, 51))
    counts = np.array([ways[w] for w in range(5, 51)], dtype=float)  # uniform way: chi-square goodness of fit
    assert chi2_sf(float(((counts - n / 46) ** 2 / (n / 46)).sum()), 45) > 1e-3
    assert max(totals) >= 450  # the 500 cap binds for large ways with big classes


def test_equal_classes_give_the_expected_support_size():
    # all classes of 20 images: q = 10, each class adds ceil(10 beta), E = 5.5 per class; shots lose < 1 each
    shape = VariableShape()
    per_class = []
    for i in range(3000):
        plan = sample_variable(episode_rng(1, "train", 0, i), [20] * 40, shape)
        assert {q for _, _, q in plan} == {10}
        per_class.append(sum(k for _, k, _ in plan) / len(plan))
    assert 4.5 - 0.1 < np.mean(per_class) < 5.5 + 0.05


def test_bigger_classes_get_more_shots():
    counts = [40] * 20 + [400] * 20
    small, big = [], []
    for i in range(2000):
        for c, k, _ in sample_variable(episode_rng(2, "train", 0, i), counts, VariableShape()):
            (small if counts[c] == 40 else big).append(k)
    assert np.mean(big) > 3 * np.mean(small)  # weights are proportional to class size


def test_hierarchy_draws_one_group_uniformly_then_its_classes():
    group_of = [f"a{c % 6}" for c in range(40)] + ["tiny"] * 3  # 'tiny' has fewer than 5 classes
    groups = usable_groups(group_of, 5)
    assert len(groups) == 6
    seen, n = Counter(), 3000
    for i in range(n):
        plan = sample_variable(episode_rng(0, "train", 0, i), [20] * 43, VariableShape(), groups)
        names = {group_of[c] for c, _, _ in plan}
        assert len(names) == 1 and "tiny" not in names
        g = names.pop()
        assert 5 <= len(plan) <= sum(1 for x in group_of if x == g)
        seen[g] += 1
    counts = np.array(list(seen.values()), dtype=float)
    assert chi2_sf(float(((counts - n / 6) ** 2 / (n / 6)).sum()), 5) > 1e-3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_ways": 1}, "min_ways=1 must be >= 2"),
        ({"max_ways": 4}, "max_ways=4 is smaller than min_ways=5"),
        ({"max_queries": 0}, "max_queries=0 must be >= 1"),
        ({"max_support": 20}, "max_support=20 is smaller than max_ways=50"),
        ({"max_support_per_class": 0}, "max_support_per_class=0 must be >= 1"),
    ],
)
def test_bad_variable_shapes_are_refused(kwargs, message):
    with pytest.raises(MetaConfigError, match=message):
        VariableShape(**kwargs)


def test_class_sets_that_cannot_give_an_episode_are_refused():
    shape = VariableShape()
    with pytest.raises(MetaConfigError, match="at least min_ways=5 classes but the split has 4"):
        check_variable([10] * 4, shape, None)
    with pytest.raises(MetaConfigError, match=r"class 'b' in the split has 1 example"):
        check_variable([10, 1, 10, 10, 10], shape, None, ["a", "b", "c", "d", "e"])
    with pytest.raises(MetaConfigError, match="need a group with at least min_ways=5"):
        check_variable([10] * 8, shape, [])


# --------------------------------------------------------------------------- datamodule
@pytest.fixture(scope="module")
def big_groups(tmp_path_factory) -> Path:
    # 12 training classes in 2 groups of 6 (hierarchy 'auto' applies), 6 + 6 evaluation classes
    return write_set(tmp_path_factory.mktemp("v") / "s", train=12, val=6, test=6, sizes=(6, 30), groups=2, ext="npy")


def _vdm(spec, **kw) -> ShardDataModule:
    args = dict(episode_shape="variable", meta_batch_size=1, eval_meta_batch_size=1, train_episodes=6,
                val_episodes=4, test_episodes=4, verify="size", min_ways=3, max_ways=8, retry_delay=0.0)
    args.update(kw)
    return ShardDataModule(shards=spec, **args)


@pytest.mark.parametrize("reader", ["indexed", "streaming"])
def test_variable_episodes_from_both_readers(big_groups, reader):
    dm = _vdm(str(big_groups), reader=reader)
    dm.setup("fit")
    src = dm.sources["train"]
    index = src.reader.index
    group = {c.id: c.group for c in index.classes}
    count = {c.id: c.count for c in index.classes}
    shapes = set()
    for i in range(30):
        ep = src.episode("train", 0, i)
        plan = src.plan(episode_rng(0, "train", 0, i))
        way = len(plan)
        assert 3 <= way <= 6 and ep.classes.numel() == way
        assert len({group[int(c)] for c in ep.classes}) == 1  # hierarchy 'auto': one group per episode
        shots = torch.bincount(ep.support_y, minlength=way)
        queries = torch.bincount(ep.query_y, minlength=way)
        assert shots.tolist() == [k for _, k, _ in plan] and (shots >= 1).all()
        assert queries.tolist() == [q for _, _, q in plan] and len(set(queries.tolist())) == 1
        assert torch.equal(ep.support_y, ep.support_y.sort().values)  # grouped by label
        q = int(queries[0])
        assert q == min(10, min(count[int(c)] // 2 for c in ep.classes))
        seen = ids_of(ep)
        assert len({(c, m) for c, m, _ in seen}) == len(seen)
        shapes.add((way, tuple(shots.tolist())))
    assert len(shapes) > 10  # the shape really varies


def test_both_readers_share_the_plan(big_groups):
    a = _vdm(str(big_groups))
    b = _vdm(str(big_groups), reader="streaming")
    a.setup("fit")
    b.setup("fit")
    for i in range(20):
        x, y = a.sources["train"].episode("train", 1, i), b.sources["train"].episode("train", 1, i)
        assert torch.equal(x.classes, y.classes) and torch.equal(x.support_y, y.support_y)
        assert torch.equal(x.query_y, y.query_y)


def test_hierarchy_none_mixes_groups_and_group_requires_them(big_groups, tmp_path):
    dm = _vdm(str(big_groups), hierarchy="none")
    dm.setup("fit")
    index = dm.sources["train"].reader.index
    group = {c.id: c.group for c in index.classes}
    mixed = sum(len({group[int(c)] for c in dm.sources["train"].episode("train", 0, i).classes}) > 1
                for i in range(20))
    assert mixed > 5
    # the validation split has groups of 3 < min_ways=5 here: 'auto' falls back to flat, 'group' refuses
    auto = _vdm(str(big_groups), min_ways=5)
    auto.setup("validate")
    assert auto.sources["val"].groups is None
    with pytest.raises(MetaConfigError, match="need a group with at least min_ways=5"), pytest.warns(UserWarning):
        _vdm(str(big_groups), min_ways=5, hierarchy="group").setup("validate")


def test_variable_episodes_need_one_episode_per_device(big_groups):
    dm = _vdm(str(big_groups), meta_batch_size=2)
    dm.setup("fit")
    with pytest.raises(MetaConfigError, match=r"meta_batch_size=2 gives 2 episodes per device .* meta_batch_size=1"):
        dm.train_dataloader()
    two = _vdm(str(big_groups), meta_batch_size=2)  # two devices: one episode each is fine
    two.trainer = SimpleNamespace(global_rank=1, world_size=2)
    two.setup("fit")
    batch = next(iter(two.train_dataloader()))
    assert batch.num_tasks == 1
    mixed = _vdm(str(big_groups), eval_episode_shape="fixed", eval_meta_batch_size=4, ways=3, eval_ways=3)
    mixed.setup("fit")  # variable training with fixed, stacked evaluation episodes
    assert next(iter(mixed.val_dataloader())).support_x.shape[:2] == (4, 3)


def test_models_with_a_fixed_head_are_refused(big_groups):
    dm = _vdm(str(big_groups))
    dm.trainer = SimpleNamespace(global_rank=0, world_size=1, lightning_module=MAML(MLP(SIDE * SIDE, [8])),
                                 callbacks=[])
    with pytest.raises(MetaConfigError, match=r"MAML cannot train or evaluate on variable-way episodes"):
        dm.setup("fit")
    for model in (ProtoNet(nn.Flatten()), MatchingNet(nn.Flatten()), MetaOptNet(nn.Flatten())):
        dm.trainer.lightning_module = model
        dm.setup("fit")


# --------------------------------------------------------------------------- learners
def test_prototypes_are_per_class_means_with_unequal_shots():
    torch.manual_seed(0)
    emb = torch.randn(9, 4)
    labels = torch.tensor([0, 0, 0, 0, 1, 2, 2, 3, 3])
    protos = prototypes(emb, labels, 4)
    for c in range(4):
        rows = [emb[i] for i in range(9) if int(labels[i]) == c]
        torch.testing.assert_close(protos[c], sum(rows) / len(rows))


def test_learners_consume_a_variable_episode(big_groups):
    dm = _vdm(str(big_groups))
    dm.setup("fit")
    batch = collate_episodes([dm.sources["train"].episode("train", 0, 3)])
    ep = batch.task(0)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(SIDE * SIDE, 8))
    model = ProtoNet(net)
    emb_s, emb_q = net(ep.support_x), net(ep.query_x)
    means = torch.stack([emb_s[ep.support_y == c].mean(0) for c in range(ep.ways)])
    manual = -((emb_q[:, None, :] - means[None]) ** 2).sum(-1)
    torch.testing.assert_close(model._batched_logits(batch)[0], manual, rtol=1e-4, atol=1e-4)
    for learner in (model, MatchingNet(net), MetaOptNet(net)):
        loss = learner.meta_loss(batch)
        assert loss.isfinite() and learner.evaluate(batch)[learner.score_name].shape == (1,)


def test_protonet_trains_on_variable_episodes(big_groups, tmp_path):
    torch.manual_seed(0)
    model = ProtoNet(nn.Sequential(nn.Flatten(), nn.Linear(SIDE * SIDE, 16)), lr=1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    dm = _vdm(str(big_groups), reader="streaming", train_episodes=8)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 8
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert 0.0 <= float(trainer.callback_metrics["val/acc"]) <= 1.0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    result = trainer.test(model, datamodule=dm, verbose=False)[0]
    assert result["test/episodes"] == 4
