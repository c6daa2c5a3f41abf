"""Model-Agnostic Meta-Learning (Finn, Abbeel and Levine, 2017), second and first order."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from lightning_meta.algorithms.base import MetaLearner, TaskKind
from lightning_meta.algorithms.matching import matching_log_probs
from lightning_meta.backbones.adapters import init_head_like
from lightning_meta.episode import Episode
from lightning_meta.errors import MetaConfigError, as_integer, require_int, require_positive
from lightning_meta.functional import BNPolicy, Params, bn_policy, inner_adapt
from lightning_meta.functional.inner_loop import PER_STEP_POLICIES, PerStepBatchNorm, convert_per_step_norm, norm_step
from lightning_meta.functional.norms import decomposed_norms, has_fused_norms
from lightning_meta.functional.precision import (  # bf16: fp32 fast weights
    LOW_PRECISION_DTYPES,
    low_precision_autocast,
    upcast_low_precision,
)

__all__ = ["ADAPT_PRESETS", "MAML", "BackboneWithHead", "EvalMode", "adapt_filter_fn"]

EvalMode = Literal["adapt", "nil"]

ADAPT_PRESETS = ("all", "head", "bias", "film", "lora", "no_norm")

# modules whose weights the "no_norm" preset keeps out of the inner loop
_NORM_TYPES = tuple(t for t in (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
                                 getattr(nn, "RMSNorm", None)) if t is not None)


def adapt_filter_fn(spec: str, norm_names: Collection[str] | None = None) -> Callable[[str], bool]:
    r"""Parameter-name predicate of an ``adapt_filter`` preset or regular expression.

    Presets: ``all``; ``head`` (ANIL: only the task head); ``bias`` (BitFit: every bias);
    ``film`` (parameters whose name contains ``film`` or ``context``, e.g. CAVIA context vectors);
    ``lora`` (parameters whose name contains ``lora_``). Anything else is a regular expression
    searched in the parameter name (``re.search``), e.g. ``"head|encoder\.12"``. ``no_norm`` (every
    weight except those of normalisation layers) depends on module types, not names: pass
    ``norm_names``, the parameter names of the normalisation layers (:class:`MAML` does).

    Example:
        >>> f = adapt_filter_fn("bias")
        >>> f("head.bias"), f("head.weight")
        (True, False)

    """
    if spec == "all":
        return lambda name: True
    if spec == "head":
        return lambda name: name.startswith("head.")
    if spec == "bias":
        return lambda name: name.endswith("bias")
    if spec == "film":
        return lambda name: "film" in name or "context" in name
    if spec == "lora":
        return lambda name: "lora_" in name
    if spec == "no_norm":
        if norm_names is None:
            raise MetaConfigError("adapt_filter='no_norm' depends on module types: pass norm_names, the parameter "
                                  "names of the normalisation layers (MAML collects them from the network)")
        excluded = frozenset(norm_names)
        return lambda name: name not in excluded
    try:
        pattern = re.compile(spec)
    except re.error as e:
        raise MetaConfigError(
            f"adapt_filter={spec!r} is neither a preset {ADAPT_PRESETS} nor a valid regular expression ({e})"
        ) from e
    return lambda name: pattern.search(name) is not None


def parameter_keys(names: Sequence[str]) -> dict[str, str]:
    """``{key: name}``: a :class:`torch.nn.ParameterDict` key for each parameter name (keys cannot hold ``.``).

    Learners that keep one tensor per adapted parameter (Meta-SGD rates, MAML++ per-step rates) store
    them under ``name.replace('.', '__')`` and map back through this dict, never by reversing the
    replacement (a name such as ``hidden_.weight`` does not survive the round trip).

    Example:
        >>> parameter_keys(["head.weight", "body.hidden_.bias"])
        {'head__weight': 'head.weight', 'body__hidden___bias': 'body.hidden_.bias'}

    """
    keys: dict[str, str] = {}
    for name in names:
        key = name.replace(".", "__")
        if key in keys:
            raise MetaConfigError(
                f"parameters {keys[key]!r} and {name!r} map to the same per-parameter key {key!r}; "
                "rename one of the modules (avoid '__' in module attribute names)"
            )
        keys[key] = name
    return keys


def _detach_rates(rates: Any) -> Any:
    """``rates`` (a float, a tensor, a mapping of tensors or a callable ``step -> rates``) without autograd history."""
    if callable(rates):
        return lambda step: _detach_rates(rates(step))
    if isinstance(rates, Mapping):
        return {k: v.detach() for k, v in rates.items()}
    return rates.detach() if isinstance(rates, Tensor) else rates


# --- bf16: float32 fast weights in a low-precision module (lightning_meta.functional.precision) ---
class _TaskHead(nn.Linear):
    """The linear task head; a bf16/fp16 input with float32 (fast) weights runs under autocast (ANIL calls it alone)."""

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        with low_precision_autocast(x):
            return super().forward(x)
# --- end bf16 ---


class BackboneWithHead(nn.Module):
    """A body followed by a linear task head: ``head(backbone(x))``.

    Under DeepSpeed ``bf16`` or ``bf16-true`` the module and its inputs are bf16 while the inner
    loop keeps the adapted weights in float32; the forward then runs under autocast in the
    input's dtype (:func:`~lightning_meta.functional.precision.low_precision_autocast`).

    Args:
        backbone: any module mapping inputs to ``[b, d]``; ``d`` is read from ``backbone.out_features``.
            If it has a method ``init_head(linear)``, the head is initialised with it.
        out_features: head outputs (the way for classification, the target size for regression).

    Example:
        >>> from lightning_meta.backbones import MLP
        >>> net = BackboneWithHead(MLP(1, [40, 40]), out_features=1)
        >>> net(torch.zeros(10, 1)).shape, [n for n, _ in net.head.named_parameters()]
        (torch.Size([10, 1]), ['weight', 'bias'])

    """

    def __init__(self, backbone: nn.Module, out_features: int) -> None:
        super().__init__()
        d = getattr(backbone, "out_features", None)
        if not isinstance(d, int) or d <= 0:
            raise MetaConfigError(
                f"backbone {type(backbone).__name__} has no positive integer attribute 'out_features'; "
                "set backbone.out_features to its embedding size"
            )
        self.backbone = backbone
        self.head = _TaskHead(d, out_features)  # an nn.Linear (bf16: see _TaskHead)
        init_head_like(backbone, self.head)  # the body's initialisation scheme covers the head

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        with low_precision_autocast(x):  # bf16: float32 fast weights in a bf16 module
            features = self.backbone(x)
            if features.shape[-1] != self.head.in_features:
                raise MetaConfigError(
                    f"the backbone {type(self.backbone).__name__} returns {features.shape[-1]} features per input "
                    f"(output shape {list(features.shape)}) but declares out_features={self.head.in_features}; set "
                    f"its out_features to {features.shape[-1]} (or make it flatten to out_features)"
                )
            return self.head(features)


class MAML(MetaLearner):
    """MAML: learn an initialisation from which a few gradient steps solve a new task.

    The inner loop is functional (:func:`lightning_meta.functional.inner_adapt`): fast weights are
    new tensors, the module is never modified, and the outer loss is an ordinary Lightning
    backward. Second order by default; ``first_order=True`` detaches the inner gradients.
    Subclasses (ANIL, Meta-SGD, Reptile) reuse the same pipeline through
    :meth:`task_query_outputs` and :meth:`inner_lrs`.

    Args:
        backbone: the body; a linear head with ``ways`` outputs (1 for regression) is added.
        ways: classes per episode (linked from the datamodule).
        inner_lr: inner-loop step size alpha (> 0), for the mean loss over the support set. The
            MAML authors' classification loss is N times that (summed over the N*K support
            examples, divided by K), so ``inner_lr`` = N x their alpha for the same step: the
            paper's 0.4 for 5-way Omniglot is ``inner_lr=2.0``.
        inner_steps: inner steps during meta-training (>= 1).
        eval_inner_steps: inner steps at validation/test (default: ``inner_steps``).
        first_order: first-order MAML (no second derivatives).
        adapt_filter: which parameters adapt in the inner loop: a preset of
            :func:`adapt_filter_fn` (``all``, ``head``, ``bias``, ``film``, ``lora``, ``no_norm``) or a
            regular expression on parameter names; the others are meta-learned in the outer loop
            only. ``no_norm`` keeps the normalisation layers' weights out of the inner loop, as the
            MAML and MAML++ authors' code does.
        task_batching: ``loop`` adapts tasks one by one; ``vmap`` batches them with ``torch.func.vmap``
            (second order: BatchNorm/LayerNorm/InstanceNorm then run as elementary operations,
            :func:`~lightning_meta.functional.norms.decomposed_norms`, since PyTorch's fused kernels
            give wrong second derivatives under ``vmap``; on a GPU ``vmap`` is the fast choice).
        vmap_chunk_size: tasks per vmap chunk (bounds memory); ``None`` = all at once.
        bn: BatchNorm behaviour in the inner loop, see :func:`lightning_meta.functional.bn_policy`:
            ``transductive`` (batch statistics of each task), ``frozen`` (running statistics, not
            updated), ``per_step`` (MAML++ BNRS + BNWB: every BatchNorm layer is converted to a
            :class:`~lightning_meta.functional.inner_loop.PerStepBatchNorm` with per-step running
            statistics, used at evaluation, and per-step weights and biases, learned in the outer
            loop only) or ``per_step_transductive`` (the same, but evaluation normalises with batch
            statistics like the released MAML++ code). The per-step policies need
            ``task_batching='loop'``.
        eval_report_steps: also report the query score after each of these inner steps at
            evaluation (logged as ``{split}/{acc|mse}_step{k}``); the largest must not exceed
            ``eval_inner_steps``.
        task: ``classification`` or ``regression``.
        per_task_backward: one backward per task (memory flat in the meta-batch size), see
            :class:`~lightning_meta.algorithms.MetaLearner`.
        activation_checkpointing: non-reentrant activation checkpointing of every second-order
            inner step (``torch.utils.checkpoint(..., use_reentrant=False)``): the outer graph keeps
            only each step's input weights and recomputes the step in the outer backward, so
            memory per extra inner step drops from the step's activations to one copy of the
            adapted weights, for about one more forward+backward per step. Identical
            meta-gradients (tested). ``torch.func.grad`` refuses checkpointing's saved-tensor hooks,
            so these steps use ``torch.autograd.grad``; needs ``task_batching='loop'``. Changes
            nothing for first-order steps (they keep no inner graph).
        eval_mode: how validation, test and ``predict`` classify a task. ``adapt`` (the default)
            runs the inner loop, ``eval_inner_steps`` steps on the support set. ``nil`` runs no inner
            loop and drops the head: NIL ("No Inner Loop", Raghu et al. 2020, section 5). The body
            embeds the support and the query images (each set on its own, as in the inner loop);
            a query's class probabilities are the support labels weighted by a softmax, over the
            support, of the cosine similarities between its embedding and theirs, the classifier
            of Matching Networks (:func:`~lightning_meta.algorithms.matching.matching_log_probs`,
            temperature 1). The outputs are log-probabilities. Since the head is not used,
            evaluation episodes may have another number of ways than training. With per-step
            BatchNorm the body uses the first step's statistics and weights. Classification only;
            training is unchanged, and :meth:`adapt` / :meth:`predict` still run the inner loop.
            A trained checkpoint can be tested either way
            (``lightning-meta test ... --model.init_args.eval_mode nil``).

    Example:
        >>> from lightning_meta.backbones import MLP
        >>> from lightning_meta import Episode
        >>> model = MAML(MLP(1, [40, 40]), task="regression", inner_lr=0.01)
        >>> ep = Episode(torch.randn(10, 1), torch.randn(10, 1), torch.randn(10, 1), torch.randn(10, 1),
        ...              torch.zeros(0, dtype=torch.long))
        >>> from lightning_meta import collate_episodes
        >>> model.meta_loss(collate_episodes([ep, ep])).backward()

    """

    _split_tasks_in_training = True  # the meta-loss is the mean of per-task query losses

    def _splits_tasks(self, batch: Episode) -> bool:
        """The per-task loop only: ``vmap`` batches the tasks on purpose (one graph for all)."""
        return self.task_batching == "loop" and super()._splits_tasks(batch)

    def __init__(
        self,
        backbone: nn.Module,
        ways: int = 5,
        inner_lr: float = 0.4,
        inner_steps: int = 1,
        eval_inner_steps: int | None = None,
        first_order: bool = False,
        adapt_filter: str = "all",
        task_batching: Literal["loop", "vmap"] = "loop",
        vmap_chunk_size: int | None = None,
        bn: BNPolicy = "transductive",
        eval_report_steps: Sequence[int] | None = None,
        task: TaskKind = "classification",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        per_task_backward: bool = False,
        activation_checkpointing: bool = False,
        eval_mode: EvalMode = "adapt",
    ) -> None:
        super().__init__(ways=ways, task=task, lr=lr, weight_decay=weight_decay, per_task_backward=per_task_backward)
        if eval_mode not in ("adapt", "nil"):
            raise MetaConfigError(f"eval_mode={eval_mode!r} is not supported; use 'adapt' (the inner loop) or 'nil' "
                                  "(no inner loop: cosine similarity to the support set's features)")
        if eval_mode == "nil" and task != "classification":
            raise MetaConfigError(f"eval_mode='nil' weights the support set's labels, so it needs "
                                  f"task='classification' (got task={task!r}); use eval_mode='adapt' for regression")
        if eval_mode == "nil" and eval_report_steps:
            raise MetaConfigError(f"eval_mode='nil' takes no inner step, so eval_report_steps="
                                  f"{list(eval_report_steps)} has nothing to report; drop eval_report_steps or use "
                                  "eval_mode='adapt'")
        inner_lr = require_positive("inner_lr", inner_lr, "MAML uses 0.4 on Omniglot, 0.01 on sinusoid")
        require_int("inner_steps", inner_steps, 1, "MAML needs at least one inner step")
        eval_inner_steps = inner_steps if eval_inner_steps is None else eval_inner_steps
        require_int("eval_inner_steps", eval_inner_steps, 1)
        if task_batching not in ("loop", "vmap"):
            raise MetaConfigError(f"task_batching={task_batching!r} is not supported; use 'loop' or 'vmap'")
        if vmap_chunk_size is not None:
            require_int("vmap_chunk_size", vmap_chunk_size, 1, "or null: all tasks at once")
        if bn not in ("transductive", "frozen", *PER_STEP_POLICIES):
            raise MetaConfigError(
                f"bn={bn!r} is not supported; use 'transductive', 'frozen', 'per_step' or 'per_step_transductive'"
            )
        if task_batching == "vmap" and bn in PER_STEP_POLICIES:
            raise MetaConfigError(
                f"bn={bn!r} updates per-step running statistics in place, which torch.func.vmap cannot do; "
                "use task_batching='loop', or bn='transductive' / 'frozen' with vmap"
            )
        if task_batching == "vmap" and activation_checkpointing:
            raise MetaConfigError(
                "activation_checkpointing=True does not compose with task_batching='vmap' (torch.func transforms "
                "refuse the saved-tensor hooks checkpointing uses); use task_batching='loop' with checkpointing"
            )
        for s in eval_report_steps or []:
            if as_integer(s) is None:
                raise MetaConfigError(f"eval_report_steps={s!r} must be an integer, not {type(s).__name__} (each an "
                                      f"inner step from 1 to eval_inner_steps={eval_inner_steps})")
        report = sorted({as_integer(s) for s in (eval_report_steps or [])})
        if report and (report[0] < 1 or report[-1] > eval_inner_steps):
            raise MetaConfigError(
                f"eval_report_steps={list(eval_report_steps or [])} must lie in 1..eval_inner_steps={eval_inner_steps}"
            )
        # MAML and subclasses without an __init__ of their own (which would otherwise save nothing);
        # a subclass with its own __init__ calls it itself, with the arguments its signature takes
        if type(self).__init__ is MAML.__init__:
            self.save_hyperparameters(ignore=["backbone"])
        self.model = BackboneWithHead(backbone, ways if task == "classification" else 1)
        per_step_norm: set[str] = set()
        if bn in PER_STEP_POLICIES:
            if not convert_per_step_norm(self.model, inner_steps, eval_running_stats=bn == "per_step"):
                raise MetaConfigError(
                    f"bn={bn!r} needs BatchNorm layers in the backbone but {type(backbone).__name__} has none; "
                    "use bn='transductive' or a backbone with BatchNorm (e.g. Conv4 norm='batch')"
                )
            per_step_norm = {f"{mn}.{pn}" for mn, m in self.model.named_modules() if isinstance(m, PerStepBatchNorm)
                             for pn, _ in m.named_parameters(recurse=False)}
        if bn == "frozen":
            untracked = [name for name, m in self.model.named_modules()
                         if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None]
            if untracked:
                raise MetaConfigError(
                    f"bn='frozen' normalises with running statistics, but the BatchNorm layers {untracked[:4]} of "
                    f"{type(backbone).__name__} keep none (track_running_stats=False); use bn='transductive', or a "
                    "backbone whose BatchNorm tracks statistics (e.g. Conv4 norm='batch')"
                )
        norm_names = [f"{m_name}.{p_name}" if m_name else p_name for m_name, m in self.model.named_modules()
                      if isinstance(m, _NORM_TYPES) for p_name, _ in m.named_parameters(recurse=False)]
        keep = adapt_filter_fn(adapt_filter, norm_names)
        # per-step BatchNorm weights (MAML++ BNWB) are learned in the outer loop only
        self.adapted_names = [n for n, _ in self.model.named_parameters() if keep(n) and n not in per_step_norm]
        if not self.adapted_names and any(keep(n) for n in per_step_norm):
            raise MetaConfigError(
                f"adapt_filter={adapt_filter!r} matches only the per-step BatchNorm weights "
                f"{sorted(n for n in per_step_norm if keep(n))[:4]}, which bn={bn!r} learns in the outer loop only "
                "(MAML++ BNWB) and never adapts; widen adapt_filter (e.g. 'all' or 'head'), or use bn='transductive' "
                "to adapt the BatchNorm weights in the inner loop"
            )
        if not self.adapted_names:
            names = [n for n, _ in self.model.named_parameters()]
            raise MetaConfigError(
                f"adapt_filter={adapt_filter!r} selects no parameter; parameter names are {names[:6]}"
                f"{' ...' if len(names) > 6 else ''}; use a preset {ADAPT_PRESETS} or a matching regular expression"
            )
        self.adapt_filter = adapt_filter
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.eval_inner_steps = eval_inner_steps
        self.first_order = first_order
        self.task_batching = task_batching
        self.vmap_chunk_size = vmap_chunk_size
        self.bn = bn
        self.eval_report_steps = report
        self.activation_checkpointing = activation_checkpointing
        self.eval_mode = eval_mode

    # ------------------------------------------------------------- params
    def meta_parameters(self) -> Params:
        """Every parameter of the network (adapted and outer-only)."""
        return dict(self.model.named_parameters())

    def split_parameters(self, detach: bool = False) -> tuple[Params, Params]:
        """``(adapted, outer_only)`` parameter dicts, following ``adapt_filter``.

        Adapted bf16/fp16 parameters (DeepSpeed ``bf16``, ``bf16-true``) come back as float32
        copies (differentiable casts): fast weights and inner updates stay float32 (DESIGN §5).
        ``detach`` leaves outer-only DeepSpeed ZeRO-3 parameters attached (their partitioned
        storage is gathered only for the parameter objects).
        """
        names = set(self.adapted_names)
        adapted, frozen = {}, {}
        for n, p in self.model.named_parameters():
            # DeepSpeed ZeRO-3 partitions outer-only weights (they carry ``ds_id``); its module hooks
            # gather only the parameter objects themselves, so those are never replaced by a detached view
            p = p.detach() if detach and (n in names or not hasattr(p, "ds_id")) else p
            (adapted if n in names else frozen)[n] = p
        return upcast_low_precision(adapted), frozen  # bf16: float32 fast weights

    def model_buffers(self) -> Params:
        """Buffers of the network (BatchNorm running statistics, if any).

        bf16/fp16 buffers come back as float32 copies, like the fast weights they normalise with
        (``bf16-true``, DeepSpeed bf16), except while per-step running statistics are being
        collected (``bn="per_step"`` in training), which must update the module's own tensors.
        """
        buffers = dict(self.model.named_buffers())
        if self.training and self.bn in PER_STEP_POLICIES:
            return buffers
        return upcast_low_precision(buffers)

    def inner_lrs(self) -> float | Params:
        """Inner step size: a float, or per-parameter tensors (Meta-SGD)."""
        return self.inner_lr

    def _step_rates(self) -> Any:
        """:meth:`inner_lrs`, detached inside :meth:`_fixed_rates` (evaluation: no outer graph to learned rates)."""
        rates = self.inner_lrs()
        return _detach_rates(rates) if self.__dict__.get("_rates_fixed", False) else rates

    @contextlib.contextmanager
    def _fixed_rates(self, fixed: bool = True) -> Iterator[None]:
        """Within the block, learned inner rates (Meta-SGD, MAML++) enter the inner loop detached."""
        previous = self.__dict__.get("_rates_fixed", False)
        self.__dict__["_rates_fixed"] = fixed
        try:
            yield
        finally:
            self.__dict__["_rates_fixed"] = previous

    def forward(self, x: Tensor) -> Tensor:
        """Apply the meta-learned initialisation to ``x`` (no adaptation)."""
        return self.model(x)

    # ------------------------------------------------------------ pipeline
    def forward_fast(self, fast: Params, frozen: Params, buffers: Params, x: Tensor) -> Tensor:
        """Network outputs with adapted weights ``fast`` and outer-only weights ``frozen``."""
        return functional_call(self.model, ({**frozen, **fast}, buffers), (x,))

    def task_query_outputs(
        self,
        adapted: Params,
        frozen: Params,
        buffers: Params,
        sx: Tensor,
        sy: Tensor,
        qx: Tensor,
        steps: int,
        first_order: bool,
        report: Sequence[int] = (),
    ) -> tuple[Tensor, dict[int, Tensor]]:
        """Adapts on one task's support set and returns the query outputs (and those after ``report`` steps).

        Pure in its tensor arguments, so it runs per task or under ``vmap``.
        """
        outs: dict[int, Tensor] = {}

        def monitor(step: int, fast: Params) -> None:
            if step + 1 in report:
                with torch.no_grad():
                    outs[step + 1] = self.forward_fast(fast, frozen, buffers, qx)

        fast = self._inner_loop(adapted, frozen, buffers, sx, sy, steps, first_order, monitor if report else None)
        with norm_step(self.model, steps - 1):  # per-step BatchNorm: the query uses the last step's row
            return self.forward_fast(fast, frozen, buffers, qx), outs

    def _inner_loop(self, adapted: Params, frozen: Params, buffers: Params, sx: Tensor, sy: Tensor, steps: int,
                    first_order: bool, callback: Callable[[int, Params], None] | None = None) -> Params:
        """Return the adapted weights after ``steps`` inner steps on ``(sx, sy)``.

        The one inner loop that training, evaluation and :meth:`adapt` share; a learner with another
        inner problem, such as :class:`~lightning_meta.algorithms.IMAML`, overrides this alone.
        """
        return inner_adapt(self.model, adapted, buffers, sx, sy, self.loss_fn, self._step_rates(), steps, first_order,
                           frozen=frozen, callback=callback, checkpoint=self.activation_checkpointing)

    # --------------------------------------------------------------- hooks
    def adapt(self, episode: Episode, steps: int | None = None, first_order: bool | None = None) -> Params:
        """All weights of the network after ``steps`` inner steps on the support set of one episode.

        In training mode the result is differentiable w.r.t. the meta-parameters (second order
        unless ``first_order``); in evaluation mode the meta-parameters (and learned inner rates)
        are detached first, so no outer graph is kept.
        """
        steps = (self.inner_steps if self.training else self.eval_inner_steps) if steps is None else steps
        first_order = self.first_order if first_order is None else first_order
        adapted, frozen = self.split_parameters(detach=not self.training)
        with bn_policy(self.model, self.bn), self._fixed_rates(not self.training):
            fast = self._inner_loop(adapted, frozen, self.model_buffers(), episode.support_x, episode.support_y,
                                    steps, first_order)
        return {**frozen, **fast}

    def predict(self, state: Params, x: Tensor) -> Tensor:
        """Return the outputs of the adapted network (weights ``state``) on ``x``.

        With per-step BatchNorm the layers use the row of the last inner step that :meth:`adapt`
        runs in the current mode (``inner_steps`` in training, ``eval_inner_steps`` otherwise).
        """
        steps = self.inner_steps if self.training else self.eval_inner_steps
        with bn_policy(self.model, self.bn), norm_step(self.model, steps - 1):
            return functional_call(self.model, (state, self.model_buffers()), (x,))

    def _refuse_hooks_training_ignores(self, owner: type, why: str) -> None:
        """Refuse a subclass overriding adapt/predict whose training (``owner.meta_loss``) never calls them.

        Evaluation goes through the overridden hooks (:meth:`evaluate`), so training and evaluation
        would run different models.
        """
        if self._overrides_hooks_of(MAML) and type(self).meta_loss is owner.meta_loss:
            raise MetaConfigError(
                f"{type(self).__name__} overrides adapt/predict, but {owner.__name__} trains with {why}, which never "
                "calls them (evaluation would, training would not); override meta_loss too, or subclass MAML, "
                "whose training then goes through adapt/predict"
            )

    def check_batch(self, batch: Episode) -> None:
        """Also refuses episodes with another number of ways than the task head's (see :class:`MetaLearner`)."""
        super().check_batch(batch)
        self._check_ways(batch)

    def on_fit_start(self) -> None:
        """Refuses a datamodule whose fixed training or evaluation ways differ from the head's, before any step.

        The per-batch check (:meth:`check_batch`) would otherwise meet evaluation episodes only at the
        first validation, after training steps (or at the test after the whole fit) when the sanity
        check is off.
        """
        super().on_fit_start()
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or self.task != "classification":
            return
        checked = [("ways", "episode_shape", "training")]
        if self.eval_mode != "nil":  # NIL evaluation does not use the head: any number of ways
            checked.append(("eval_ways", "eval_episode_shape", "validation/test"))
        for attr, shape_attr, which in checked:
            ways = getattr(dm, attr, None)
            fixed = getattr(dm, shape_attr, "fixed") == "fixed"
            if isinstance(ways, int) and not isinstance(ways, bool) and ways > 0 and fixed and ways != self.ways:
                raise MetaConfigError(
                    f"the datamodule's {attr}={ways} ({which} episodes are {ways}-way) but {type(self).__name__} was "
                    f"built with ways={self.ways}; link model ways to data ways (the CLI does) and set the "
                    "datamodule's eval_ways to the same value"
                )

    def _nil_evaluation(self) -> bool:
        return self.eval_mode == "nil" and not self.training

    def _check_ways(self, batch: Episode) -> None:
        if self._nil_evaluation():  # NIL does not use the head: any number of ways
            return
        if batch.ways and batch.ways != self.ways:
            raise MetaConfigError(
                f"episodes are {batch.ways}-way but {type(self).__name__} was built with ways={self.ways}; "
                "link model ways to data ways (the CLI does) and set the datamodule's eval_ways to the same value"
            )

    def _vmap_tasks(self, fn: Callable, adapted: Params, frozen: Params, buffers: Params, batch: Episode,
                    first_order: bool):
        """``fn(adapted, frozen, buffers, support_x, support_y, query_x)`` of every task, batched with ``vmap``.

        In second order, normalisation layers run as elementary operations: PyTorch's fused kernels
        differentiate wrongly twice under ``vmap`` (:func:`~lightning_meta.functional.norms.decomposed_norms`).
        So they do in first order with bf16/fp16 inputs or under autocast, where the fused kernels
        return float32 for a bf16 input and float32 per-task weights.
        """
        x = batch.support_x
        low_precision = x.dtype in LOW_PRECISION_DTYPES or torch.is_autocast_enabled(x.device.type)
        # first order too when low precision: the fused kernels then mix the bf16 input and float32 per-task
        # weights under vmap into a float32 output, which the inner torch.func.grad refuses
        try:
            with decomposed_norms((not first_order or low_precision) and has_fused_norms(self.model)):
                return vmap(fn, in_dims=(None, None, None, 0, 0, 0), randomness="different",
                            chunk_size=self.vmap_chunk_size)(adapted, frozen, buffers, batch.support_x,
                                                             batch.support_y, batch.query_x)
        except RuntimeError as e:
            if x.dtype in LOW_PRECISION_DTYPES and "should be the same" in str(e):
                raise MetaConfigError(
                    f"task_batching='vmap' failed on {x.dtype} inputs with float32 fast weights ({e}); PyTorch's "
                    "batched convolution does not mix them (seen with torch 2.13 on CPU under precision='bf16-true'); "
                    "use task_batching='loop', or precision='bf16-mixed' (float32 weights, bf16 products)"
                ) from e
            raise

    def meta_loss(self, batch: Episode) -> Tensor:
        """Mean query loss after adaptation, over the tasks of the meta-batch.

        The batched path below does not call :meth:`adapt` / :meth:`predict`; a subclass that
        overrides either of them gets the generic per-task path (adapt, then predict, each task)
        instead, so its hooks are what trains.
        """
        if self._overrides_hooks_of(MAML):
            return MetaLearner.meta_loss(self, batch)
        if self.task_batching == "loop":
            outs = list(self._each_task_query_outputs(batch))
        else:
            self.check_batch(batch)  # also when called directly; a subclass may relax it
            adapted, frozen = self.split_parameters()
            buffers = self.model_buffers()
            args = (self.inner_steps, self.first_order)
            with bn_policy(self.model, self.bn):
                fn = lambda a, f, b, sx, sy, qx: self.task_query_outputs(a, f, b, sx, sy, qx, *args)[0]  # noqa: E731
                out = self._vmap_tasks(fn, adapted, frozen, buffers, batch, self.first_order)
            losses = self.per_task_loss(out, batch.query_y)
            self._train_scores = self.per_task_score(out.detach(), batch.query_y)
            return losses.mean()
        # equal query counts per task: the mean of per-task means is the mean over all queries
        losses = torch.stack([self.loss_fn(o, batch.query_y[i]) for i, o in enumerate(outs)])
        self._train_scores = torch.stack([self.score_fn(o.detach(), batch.query_y[i]) for i, o in enumerate(outs)])
        return losses.mean()

    def _task_losses(self, batch: Episode) -> Iterator[Tensor]:
        """:meth:`meta_loss`'s per-task terms with its setup (parameter dicts, BatchNorm policy) done once.

        Only for MAML's own :meth:`meta_loss` with the per-task loop (MAML, ANIL, Meta-SGD); otherwise
        (MAML++'s loss, a subclass's ``adapt``/``predict``) one :meth:`meta_loss` call per task.
        """
        if type(self).meta_loss is not MAML.meta_loss or self._overrides_hooks_of(MAML) or self.task_batching != "loop":
            yield from super()._task_losses(batch)
            return
        for out, query_y in zip(self._each_task_query_outputs(batch), batch.query_y, strict=True):
            self._train_scores = self.score_fn(out.detach(), query_y).reshape(1)
            yield self.loss_fn(out, query_y) / batch.num_tasks

    def _each_task_query_outputs(self, batch: Episode) -> Iterator[Tensor]:
        """Each task's query outputs after the inner loop, one at a time (the per-task loop of :meth:`meta_loss`).

        The parameter and buffer dicts and the BatchNorm policy are set up once for the meta-batch.
        """
        self.check_batch(batch)  # also when called directly; a subclass may relax it
        adapted, frozen = self.split_parameters()
        buffers = self.model_buffers()
        with bn_policy(self.model, self.bn):
            for ep in batch.tasks():
                yield self.task_query_outputs(adapted, frozen, buffers, ep.support_x, ep.support_y, ep.query_x,
                                              self.inner_steps, self.first_order)[0]

    def nil_query_outputs(self, batch: Episode) -> Tensor:
        """NIL's log class probabilities ``[B, nq, ways]`` of a meta-batch's queries (see ``eval_mode``).

        No inner loop and no head: the body's features of each task's support and query sets
        (BatchNorm as in the inner loop's first step, in evaluation mode), then Matching Networks'
        cosine-attention classifier over the support set. It can be called in either mode and
        always evaluates (no running statistics are collected, dropout is off); validation and
        test use it when ``eval_mode='nil'``.

        Example:
            >>> from lightning_meta import Episode, collate_episodes
            >>> from lightning_meta.backbones import MLP
            >>> model = MAML(MLP(4, [8]), ways=2, eval_mode="nil").eval()
            >>> ep = Episode(torch.randn(4, 4), torch.tensor([0, 0, 1, 1]), torch.randn(3, 4),
            ...              torch.tensor([0, 1, 1]), torch.tensor([7, 9]))
            >>> out = model.nil_query_outputs(collate_episodes([ep]))
            >>> out.shape, bool(torch.allclose(out.exp().sum(-1), torch.ones(1, 3)))
            (torch.Size([1, 3, 2]), True)

        """
        # the body module itself (no functional weights: nothing adapts), so DeepSpeed ZeRO-3 gathers its
        # partitioned weights and bf16/fp16 weights meet buffers of their own dtype; in evaluation mode
        # whatever the learner's mode, so that no running (or per-step) statistics are collected
        body = self.model.backbone
        was_training = self.model.training
        outs = []
        try:
            self.model.eval()
            with torch.no_grad(), bn_policy(self.model, self.bn), norm_step(self.model, 0):
                for ep in batch.tasks():
                    with low_precision_autocast(ep.support_x):
                        fs, fq = body(ep.support_x), body(ep.query_x)
                    outs.append(matching_log_probs(fq.flatten(1), fs.flatten(1), ep.support_y, ep.ways))
        finally:
            self.model.train(was_training)
        return torch.stack(outs)

    def _batched_query_outputs(self, batch: Episode) -> Tensor | None:
        """NIL's outputs in evaluation with ``eval_mode='nil'`` (what :meth:`evaluate` scores), else None."""
        return self.nil_query_outputs(batch) if self._nil_evaluation() else None

    def evaluate(self, batch: Episode) -> dict[str, Tensor]:
        """Per-episode query scores after ``eval_inner_steps`` (and after each ``eval_report_steps``).

        A subclass that overrides :meth:`adapt` or :meth:`predict` is evaluated with them (the
        generic per-task path; ``eval_report_steps`` are then not reported).
        """
        if self._nil_evaluation():
            self.check_batch(batch)
            return {self.score_name: self.per_task_score(self.nil_query_outputs(batch), batch.query_y)}
        if self._overrides_hooks_of(MAML):
            return MetaLearner.evaluate(self, batch)
        self.check_batch(batch)  # also when called directly; a subclass may relax it
        name = self.score_name
        results: dict[str, list[Tensor]] = {name: []}
        results.update({f"{name}_step{k}": [] for k in self.eval_report_steps})
        adapted, frozen = self.split_parameters(detach=True)
        buffers = self.model_buffers()
        for ep in batch.tasks():
            with bn_policy(self.model, self.bn), self._fixed_rates():
                out, per_step = self.task_query_outputs(adapted, frozen, buffers, ep.support_x, ep.support_y,
                                                        ep.query_x, self.eval_inner_steps, True,
                                                        report=self.eval_report_steps)
            results[name].append(self.score_fn(out.detach(), ep.query_y))
            for k, v in per_step.items():
                results[f"{name}_step{k}"].append(self.score_fn(v, ep.query_y))
        return {k: torch.stack(v) for k, v in results.items()}
