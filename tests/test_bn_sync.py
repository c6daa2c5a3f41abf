"""BatchNorm running statistics synchronised across ranks equal one process's (lightning_meta.functional.bn_sync).

Ranks are simulated by threads in one process: each "rank" owns a copy of the model and runs its
contiguous block of the tasks, and ``gather`` is a barrier that stacks what every thread hands
in (the shape contract of ``all_gather``). The reference is one model running every task in
order with PyTorch's own BatchNorm updates. The real 2-process gloo run is in tests/test_ddp.py.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from lightning_meta.functional import checkpointed, norm_step
from lightning_meta.functional.bn_sync import RunningStatsSync, replay_running_stats, tracked_norm_layers
from lightning_meta.functional.inner_loop import PerStepBatchNorm

DT = torch.float64


class ThreadGather:
    """``all_gather`` across ``world`` threads: each returns ``[world, *shape]`` in rank order."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world, timeout=30)
        self.slots: list[Tensor | None] = [None] * world
        self.calls = [0] * world

    def for_rank(self, rank: int) -> Callable[[Tensor], Tensor]:
        def gather(t: Tensor) -> Tensor:
            self.calls[rank] += 1
            self.slots[rank] = t.detach().clone()
            self.barrier.wait()
            out = torch.stack(self.slots)  # type: ignore[arg-type]
            self.barrier.wait()
            return out

        return gather


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    """Several Python threads each running multi-threaded kernels crawl on a small shared machine."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def run_ranks(world: int, fn: Callable[[int, Callable[[Tensor], Tensor]], None]) -> ThreadGather:
    """Run ``fn(rank, gather)`` in ``world`` threads and re-raise the first failure."""
    g = ThreadGather(world)
    errors: list[BaseException] = []

    def target(r: int) -> None:
        try:
            fn(r, g.for_rank(r))
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)
            g.barrier.abort()

    threads = [threading.Thread(target=target, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return g


def make_net(momentum: float | None, dtype: torch.dtype = DT) -> nn.Module:
    """Conv -> BatchNorm2d, Linear -> BatchNorm1d, and a per-step BatchNorm; non-trivial starting statistics."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3, momentum=momentum), nn.ReLU(), nn.Flatten(),
        nn.Linear(3 * 4 * 4, 5), nn.BatchNorm1d(5, momentum=momentum), PerStepBatchNorm(5, steps=2, momentum=0.3),
    ).to(dtype)
    with torch.no_grad():
        for m in tracked_norm_layers(net):
            m.running_mean.copy_(torch.randn_like(m.running_mean))
            m.running_var.copy_(torch.rand_like(m.running_var) + 0.5)
            if getattr(m, "num_batches_tracked", None) is not None:
                m.num_batches_tracked.fill_(3)
    return net.train()


def make_tasks(n: int, seed: int, dtype: torch.dtype = DT) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shot = dict(generator=g, dtype=dtype)
    return [(torch.randn(6, 2, 4, 4, **shot) * 2 + 1, torch.randn(4, 2, 4, 4, **shot)) for _ in range(n)]


def run_task(net: nn.Module, task: tuple[Tensor, Tensor]) -> None:
    """A MAML-like task: a support forward per inner step (per-step rows 0 and 1), then a query forward."""
    support, query = task
    for step in range(2):
        with norm_step(net, step):
            net(support)
    with norm_step(net, 1):
        net(query)


def buffers(net: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in net.named_buffers()}


def assert_buffers_equal(a: dict[str, Tensor], b: dict[str, Tensor], atol: float = 1e-12, rtol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=k)


# ----------------------------------------------------------------------------- pure functions


def batch_statistics(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and unbiased variance, written out (channels on dimension 1)."""
    flat = x.transpose(0, 1).reshape(x.shape[1], -1)
    n = flat.shape[1]
    mean = flat.sum(1) / n
    return mean, ((flat - mean[:, None]) ** 2).sum(1) / (n - 1)


@pytest.mark.parametrize("shape", [(7, 3), (5, 3, 4), (4, 3, 5, 5), (2, 3, 2, 3, 4)])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_recorded_statistics_are_the_batch_statistics(shape, momentum):
    """The statistics read off each update are those of the batch (float64: to rounding)."""
    bn = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[len(shape)](3, momentum=momentum)
    bn = bn.to(DT).train()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.num_batches_tracked.fill_(4)
    sync = RunningStatsSync(bn)
    sync.begin()
    xs = [torch.randn(*shape, dtype=DT) * 3 + 2 for _ in range(3)]
    for x in xs:
        bn(x)
    for rec, x in zip(sync._records[0], xs, strict=True):
        mean, var = batch_statistics(x)
        assert rec[0] == 0
        torch.testing.assert_close(rec[1:4], mean, rtol=0, atol=1e-11)
        torch.testing.assert_close(rec[4:], var, rtol=0, atol=1e-11)
    sync.remove()


@pytest.mark.parametrize("momentum", [0.1, 0.7, None])
def test_replay_equals_sequential_batchnorm_updates(momentum):
    bn = nn.BatchNorm2d(4, momentum=momentum).to(DT).train()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.num_batches_tracked.fill_(5)
    m0, v0, n0 = bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked)
    m0_copy = m0.clone()
    xs = [torch.randn(3 + i, 4, 2, 2, dtype=DT) + i for i in range(6)]
    stats = [batch_statistics(x) for x in xs]
    for x in xs:
        bn(x)
    mean, var, n = replay_running_stats(m0, v0, torch.stack([s[0] for s in stats]), torch.stack([s[1] for s in stats]),
                                        momentum, n0)
    assert n == n0 + 6 == int(bn.num_batches_tracked)
    torch.testing.assert_close(mean, bn.running_mean, rtol=0, atol=1e-13)
    torch.testing.assert_close(var, bn.running_var, rtol=0, atol=1e-13)
    assert not torch.allclose(mean, m0)  # the updates moved the statistics
    assert torch.equal(m0, m0_copy)  # the replay returns new tensors, its inputs are left alone
    if momentum is None:  # cumulative average: with n0 = 0 it is the plain mean of the batch means
        means = torch.stack([s[0] for s in stats])
        mean0, _, _ = replay_running_stats(torch.zeros(4, dtype=DT), torch.ones(4, dtype=DT), means,
                                           torch.stack([s[1] for s in stats]), None, 0)
        torch.testing.assert_close(mean0, means.mean(0), rtol=0, atol=1e-13)


def test_replay_rows_equal_per_step_batchnorm():
    bn = PerStepBatchNorm(3, steps=3, momentum=0.2).to(DT).train()
    m0, v0 = bn.running_mean.clone(), bn.running_var.clone()
    seq = [(s, torch.randn(5, 3, dtype=DT) * (s + 1)) for s in (0, 1, 2, 1, 4, 0)]  # step 4 uses the last row
    for s, x in seq:
        with norm_step(bn, s):
            bn(x)
    stats = [batch_statistics(x) for _, x in seq]
    rows = [min(s, 2) for s, _ in seq]
    mean, var, n = replay_running_stats(m0, v0, torch.stack([a for a, _ in stats]), torch.stack([b for _, b in stats]),
                                        0.2, rows=rows)
    assert n is None
    torch.testing.assert_close(mean, bn.running_mean, rtol=0, atol=1e-13)
    torch.testing.assert_close(var, bn.running_var, rtol=0, atol=1e-13)


def test_replay_rejects_bad_input():
    z = torch.zeros(3, dtype=DT)
    with pytest.raises(ValueError, match="momentum=None"):
        replay_running_stats(z, z, torch.zeros(1, 3), torch.zeros(1, 3), None)
    with pytest.raises(ValueError, match="rows"):
        replay_running_stats(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(1, 3), torch.zeros(1, 3), 0.1)
    with pytest.raises(ValueError, match=r"\[K, C\]"):
        replay_running_stats(z, z, torch.zeros(3), torch.zeros(3), 0.1)


def test_tracked_layers_skip_sync_batchnorm_and_layers_without_statistics():
    net = nn.Sequential(nn.BatchNorm1d(2), nn.BatchNorm1d(2, track_running_stats=False), nn.SyncBatchNorm(2),
                        PerStepBatchNorm(2, steps=2), nn.LayerNorm(2))
    assert tracked_norm_layers(net) == [net[0], net[3]]


# ----------------------------------------------------------------------------- simulated ranks


@pytest.mark.parametrize(("momentum", "world", "dtype"), [(0.1, 2, DT), (None, 2, DT), (0.1, 4, DT),
                                                         (0.1, 2, torch.float32), (None, 4, torch.float32)])
def test_simulated_ranks_end_with_one_process_statistics(momentum, world, dtype):
    init = make_net(momentum, dtype)
    steps = [make_tasks(8, seed=s, dtype=dtype) for s in range(3)]  # three global meta-batches of 8 tasks
    one = copy.deepcopy(init)
    for tasks in steps:
        for t in tasks:
            run_task(one, t)
    nets = [copy.deepcopy(init) for _ in range(world)]
    unsynced = [copy.deepcopy(init) for _ in range(world)]
    per = 8 // world

    def rank_fn(r: int, gather) -> None:
        sync = RunningStatsSync(nets[r])
        for tasks in steps:
            sync.begin()
            for t in tasks[r * per:(r + 1) * per]:
                run_task(nets[r], t)
                run_task(unsynced[r], t)
            assert sync.pending() == per * 3 * 3  # 3 forwards per task through each of the 3 layers
            sync.sync(gather)
        sync.remove()

    g = run_ranks(world, rank_fn)
    assert g.calls == [6] * world  # two collectives per step
    ref = buffers(one)
    # float64: to rounding; float32: a few units in the last place of the statistics (~1e-7 relative)
    for net in nets:
        if dtype == DT:
            assert_buffers_equal(buffers(net), ref)
        else:
            assert_buffers_equal(buffers(net), ref, atol=1e-6, rtol=1e-6)
    assert int(nets[0][1].num_batches_tracked) == 3 + 3 * 8 * 3
    # without the replay each rank's statistics are not those of one process (the check is not empty)
    diff = max((buffers(unsynced[0])[k] - ref[k]).abs().max().item() for k in ref if "running" in k)
    assert diff > 1e-3
    # the hooks are gone after remove(): further forwards record nothing
    sync = RunningStatsSync(nets[0])
    sync.remove()
    sync.begin()
    run_task(nets[0], steps[0][0])
    assert sync.pending() == 0


def test_unequal_task_counts_and_idle_layers():
    """Rank 0 runs two tasks, rank 1 one; a layer one rank never updates still ends as in one process."""
    init = make_net(0.1)
    tasks = make_tasks(3, seed=7)
    one = copy.deepcopy(init)
    for t in tasks:
        run_task(one, t)
    extra = torch.randn(4, 5, dtype=DT)
    one[6](extra)  # the last global forward: rank 1 alone runs it, through the per-step layer only
    nets = [copy.deepcopy(init) for _ in range(2)]

    def rank_fn(r: int, gather) -> None:
        sync = RunningStatsSync(nets[r])
        sync.begin()
        for t in (tasks[:2] if r == 0 else tasks[2:]):
            run_task(nets[r], t)
        if r == 1:
            nets[r][6](extra)
        sync.sync(gather)

    run_ranks(2, rank_fn)
    for net in nets:
        assert_buffers_equal(buffers(net), buffers(one))


def test_nothing_recorded_leaves_statistics_alone():
    nets = [make_net(0.1) for _ in range(2)]
    before = buffers(nets[0])

    def rank_fn(r: int, gather) -> None:
        sync = RunningStatsSync(nets[r])
        sync.begin()
        nets[r].eval()(torch.randn(3, 2, 4, 4, dtype=DT))  # evaluation forwards do not update
        assert sync.sync(gather) == 0

    g = run_ranks(2, rank_fn)
    assert g.calls == [1, 1]  # only the lengths were gathered
    assert_buffers_equal(buffers(nets[0]), before, atol=0)


# ----------------------------------------------------------------------------- what counts as an update


def test_records_only_forwards_that_update_the_layers_own_statistics():
    net = make_net(0.1)
    sync = RunningStatsSync(net)
    x = torch.randn(4, 2, 4, 4, dtype=DT)
    bn2d = net[1]

    net(x)
    assert sync.pending() == 0  # not between begin() and sync()
    sync.begin()
    net.eval()(x)
    assert sync.pending() == 0  # evaluation mode
    net.train()
    bn2d.track_running_stats = False  # MAML's transductive policy
    net[0:2](x)
    bn2d.track_running_stats = True
    assert sync.pending() == 0
    params = dict(net.named_parameters())
    copies = {k: v.clone() for k, v in net.named_buffers()}
    before = buffers(net)
    functional_call(net, (params, copies), (x,))  # the update lands on copies, not on the layers
    assert sync.pending() == 0
    assert_buffers_equal(buffers(net), before, atol=0)
    functional_call(net, (params, dict(net.named_buffers())), (x,))  # the layers' own buffers, as MAML passes them
    assert sync.pending() == 3
    # per-task buffer copies under vmap (the only way BatchNorm can train under vmap) are not the layers' own
    stacked = {k: torch.stack([v, v]) for k, v in net[0:2].named_buffers()}
    vmap(lambda b, xx: functional_call(net[0:2], (dict(net[0:2].named_parameters()), b), (xx,)))(
        stacked, torch.stack([x, x]))
    assert sync.pending() == 3
    sync.remove()


def test_checkpoint_recomputation_of_per_step_layers_is_not_recorded():
    net = nn.Sequential(nn.Linear(3, 4), PerStepBatchNorm(4, steps=2)).to(DT).train()
    sync = RunningStatsSync(net)
    sync.begin()
    x = torch.randn(6, 3, dtype=DT)
    with norm_step(net, 1):
        out = checkpointed(lambda v: net(v).pow(2).sum(), x, module=net)
    assert sync.pending() == 1
    out.backward()  # recomputes the forward; PerStepBatchNorm does not update a second time
    assert sync.pending() == 1
    sync.remove()


# ----------------------------------------------------------------------------- MetaLearner wiring


def _fake_trainer(gather: Callable[[Tensor], Tensor], world: int) -> SimpleNamespace:
    strategy = SimpleNamespace(all_gather=lambda t, group=None, sync_grads=False: gather(t))
    return SimpleNamespace(world_size=world, strategy=strategy, current_epoch=0, fast_dev_run=False)


def _episodes(n: int, seed: int):
    from lightning_meta.episode import Episode, collate_episodes

    g = torch.Generator().manual_seed(seed)
    eps = [Episode(torch.randn(3, 1, 16, 16, generator=g, dtype=DT), torch.arange(3),
                   torch.randn(6, 1, 16, 16, generator=g, dtype=DT), torch.arange(3).repeat(2), torch.arange(3))
           for _ in range(n)]
    return collate_episodes(eps)


def _block(batch, start: int, stop: int):
    from dataclasses import fields

    return type(batch)(*(getattr(batch, f.name)[start:stop] for f in fields(batch)))


def _learners():
    from lightning_meta import algorithms as A
    from lightning_meta.backbones import Conv4

    return {
        "protonet": lambda: A.ProtoNet(Conv4(1, 4, 16), ways=3),
        "mamlpp_per_step": lambda: A.MAMLPlusPlus(Conv4(1, 4, 16), ways=3, inner_lr=0.1, inner_steps=2,
                                                  bn="per_step", msl_anneal_epochs=0),
    }


@pytest.mark.parametrize("name", ["protonet", "mamlpp_per_step"])
def test_meta_learner_hooks_give_ranks_one_process_statistics(name):
    torch.manual_seed(1)
    init = _learners()[name]().to(DT).train()
    batches = [_episodes(4, seed=s) for s in range(2)]
    one = copy.deepcopy(init)
    for b in batches:
        one.meta_loss(b)  # one process: every task, in order (no trainer, so no synchronisation)
    assert "_running_stats_sync" not in one.__dict__
    models = [copy.deepcopy(init) for _ in range(2)]

    def rank_fn(r: int, gather) -> None:
        model = models[r]
        model._trainer = _fake_trainer(gather, 2)
        for i, b in enumerate(batches):
            mine = _block(b, 2 * r, 2 * r + 2)  # the sampler's contiguous block of this rank
            model.on_train_batch_start(mine, i)
            model.meta_loss(mine)
            model.on_train_batch_end(None, mine, i)
        model.on_train_end()
        assert "_running_stats_sync" not in model.__dict__
        model._trainer = None

    run_ranks(2, rank_fn)
    ref = buffers(one)
    assert any("running_mean" in k for k in ref)
    for m in models:
        assert_buffers_equal(buffers(m), ref)


def test_meta_learner_single_process_installs_nothing():
    model = _learners()["protonet"]()
    model._trainer = SimpleNamespace(world_size=1)
    model.on_train_batch_start(None, 0)
    assert "_running_stats_sync" not in model.__dict__
    assert all(not m._forward_pre_hooks for m in model.modules())
    # hooks left by an interrupted 2-process fit are removed by the next single-process one
    model._trainer = SimpleNamespace(world_size=2)
    model.on_train_batch_start(None, 0)
    assert any(m._forward_pre_hooks for m in model.modules())
    model._trainer = SimpleNamespace(world_size=1)
    model.on_train_batch_start(None, 0)
    assert "_running_stats_sync" not in model.__dict__
    assert all(not m._forward_pre_hooks for m in model.modules())
    model._trainer = None


def test_meta_learner_fit_in_one_process_is_untouched(tmp_path):
    """A 1-process fit installs no hook and ends with PyTorch's own running statistics."""
    import lightning as L

    from lightning_meta.data.glyphs import generate_glyphs
    from lightning_meta.datamodules import ShardDataModule

    generate_glyphs(tmp_path / "g", seed=1, alphabets=4, chars_per_alphabet=(3, 4), drawings=4, size=16,
                    splits=(2, 1, 1))
    torch.manual_seed(0)
    model = _learners()["protonet"]()
    seen: list[int] = []
    for m in tracked_norm_layers(model):
        m.register_forward_hook(lambda mod, a, o: seen.append(len(mod._forward_pre_hooks)))
    dm = ShardDataModule(shards=str(tmp_path / "g"), ways=3, shots=1, queries=1, meta_batch_size=2, train_episodes=4,
                         val_episodes=2, eval_meta_batch_size=2, eval_queries=1)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, dm)
    assert seen and set(seen) == {0}
    assert int(model.backbone.encoder[1].num_batches_tracked) == 2 * 2


def test_meta_learner_sync_can_be_switched_off():
    model = _learners()["protonet"]()
    model.sync_running_stats = False
    model._trainer = SimpleNamespace(world_size=2)
    model.on_train_batch_start(None, 0)
    assert "_running_stats_sync" not in model.__dict__
    model._trainer = None
