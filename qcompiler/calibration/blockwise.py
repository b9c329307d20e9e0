"""Block-by-block calibration: run a model's repeated blocks one at a time over cached inputs.

Weight-rounding algorithms (GPTQ, AWQ, the ``auto`` search) need more than a sample of rows per
layer (a Hessian, an input mean, the group of layers sharing one input) and want each block's
inputs to come from the blocks before it *as quantized*. Running the whole model at once would
hold every layer's statistics in memory together; here only one block's are alive:

1. the model runs once in floating point (without a KV cache); hooks keep the first block's
   hidden-state input and every block's own other arguments (masks, position embeddings);
2. each block runs over those inputs with hooks on its linears (statistics per input tensor, so
   q/k/v reading one activation share one accumulator), ``handle`` turns the statistics into
   the block's rounded weights, and the block runs again with those weights
   (``torch.func.functional_call``: the user's module is never modified) to make the next
   block's inputs.

The blocks are the entries of the model's largest ``nn.ModuleList`` that holds linears (a
transformer's layers); a model without one is a single block. Linears outside the blocks (an
output head) get their statistics from the floating-point pass of step 1.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor, nn

from qcompiler.calibration.recorder import call_model
from qcompiler.calibration.state import is_linear, stored_weight
from qcompiler.calibration.stats import ActivationStats
from qcompiler.errors import CalibrationError
from qcompiler.model_signature import takes_argument

# a KV cache given to a block would be appended to on every re-run; blocks run without one
_CACHE_KWARGS = ("past_key_value", "past_key_values", "layer_past", "use_cache")


@dataclass
class InputStats:
    """What a block's run saw at one linear input (shared by the linears reading that tensor)."""

    k: int
    need_hessian: bool
    max_rows: int
    name: str
    first_token_weight: float = 1.0       # weight of each sequence's first row in the Hessian
    xtx: Optional[Tensor] = None          # float64 [K, K]: sum of x x^T (GPTQ's Hessian / 2)
    abs_sum: Optional[Tensor] = None      # float64 [K]: sum of |x| (AWQ's input magnitude)
    tokens: int = 0
    rows: ActivationStats = None

    def __post_init__(self):
        self.abs_sum = torch.zeros(self.k, dtype=torch.float64)
        if self.need_hessian:
            self.xtx = torch.zeros(self.k, self.k, dtype=torch.float64)
        self.rows = ActivationStats.empty(self.name, self.k, self.max_rows)

    def update(self, x: Tensor) -> None:
        x = x.detach().to("cpu", torch.float32)
        weighted = x
        if self.first_token_weight != 1.0 and x.dim() >= 3:
            weighted = x.clone()
            weighted[..., 0, :] *= self.first_token_weight ** 0.5
        x, weighted = x.reshape(-1, x.shape[-1]), weighted.reshape(-1, x.shape[-1])
        if not torch.isfinite(x).all():
            raise CalibrationError(f"calibration activation at the input of {self.name!r} contains NaN or Inf; "
                                   "calibrate on clean data (and check the model in FP32)")
        self.abs_sum += x.abs().sum(dim=0, dtype=torch.float64)
        if self.xtx is not None:
            self.xtx += (weighted.t() @ weighted).to(torch.float64)  # float32 GEMM, float64 running sum
        self.tokens += x.shape[0]
        self.rows.update(x)

    @property
    def mean_abs(self) -> Tensor:
        return (self.abs_sum / max(self.tokens, 1)).to(torch.float32)

    @property
    def hessian(self) -> Tensor:
        """``2/n X^T X`` in float32 (what GPTQ minimises ``||(W - Q) X||^2`` against)."""
        return (2.0 * self.xtx / max(self.tokens, 1)).to(torch.float32)


@dataclass
class LinearInput:
    """One linear of the current block and the statistics of its input."""

    name: str
    module: nn.Module               # nn.Linear or Conv1D (state.linear_weight reads either)
    inputs: InputStats
    group: int                      # linears with the same group read the same tensor


@dataclass
class _Recorder:
    linears: dict                   # module -> name
    need_hessian: bool
    max_rows: int
    first_token_weight: float = 1.0
    found: dict = field(default_factory=dict)      # name -> LinearInput
    # id(x) -> (x, InputStats) within one call; holding x keeps its id from being reused
    _by_tensor: dict = field(default_factory=dict)
    handles: list = field(default_factory=list)

    def __enter__(self):
        for mod, name in self.linears.items():
            self.handles.append(mod.register_forward_pre_hook(lambda m, a, _n=name: self._see(_n, m, a[0])))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def new_call(self):
        self._by_tensor = {}

    def _see(self, name, module, x):
        if name in self.found:
            li = self.found[name]
            if id(x) not in self._by_tensor:
                self._by_tensor[id(x)] = (x, li.inputs)
                li.inputs.update(x)
            return
        _, stats = self._by_tensor.get(id(x), (None, None))
        if stats is None:
            stats = InputStats(x.shape[-1], self.need_hessian, self.max_rows, name, self.first_token_weight)
            self._by_tensor[id(x)] = (x, stats)
            stats.update(x)
        self.found[name] = LinearInput(name, module, stats, id(stats))


def find_blocks(model: nn.Module, is_layer: Callable = is_linear) -> list:
    """[(prefix, block)]: the entries of the largest ModuleList whose every entry holds a module
    ``is_layer`` accepts (a linear), else the model."""
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 1 and \
                all(any(is_layer(m) for m in b.modules()) for b in mod):
            if best is None or len(mod) > len(best[1]):
                best = (name, mod)
    if best is None:
        return [("", model)]
    prefix = best[0] + "." if best[0] else ""
    return [(f"{prefix}{i}", b) for i, b in enumerate(best[1])]


def _linears(module: nn.Module, prefix: str) -> dict:
    return {m: (f"{prefix}.{n}" if prefix and n else prefix or n)
            for n, m in module.named_modules() if is_linear(m)}


def _strip_cache(kwargs: dict) -> dict:
    return {k: (False if k == "use_cache" else None) if k in _CACHE_KWARGS else v for k, v in kwargs.items()}


def call_without_cache(model: nn.Module, batch):
    """``call_model`` with ``use_cache=False`` when the model takes it: the blocks are replayed
    without a cache, so the masks the model builds must be the ones for no cache (a cache-sized
    sliding-window mask does not fit the replayed sequence)."""
    if not takes_argument(model, "use_cache"):
        return call_model(model, batch)
    if isinstance(batch, dict):
        return model(**{**batch, "use_cache": False})
    args = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
    return model(*args, use_cache=False)


def _primary(args: tuple, kwargs: dict):
    """Where a block's hidden-state input is: its first positional argument, else ``hidden_states``
    or the first tensor among its keyword arguments."""
    if args:
        return 0
    if isinstance(kwargs.get("hidden_states"), Tensor):
        return "hidden_states"
    return next((k for k, v in kwargs.items() if isinstance(v, Tensor)), None)


def _with_input(args: tuple, kwargs: dict, where, x: Tensor) -> tuple:
    """The block's call with its hidden-state input (at ``where``) set to ``x``."""
    if isinstance(where, int):
        return (x, *args[1:]), kwargs
    return args, {**kwargs, where: x}


def _hidden_output(out):
    """The hidden states a block returns: a tensor, the first item of a tuple / list / ModelOutput,
    or the first value of a dict."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, dict):
        return next(iter(out.values()))
    return out[0]


@dataclass
class _BlockCall:
    """One batch's call of one block, as the floating-point pass made it, less its hidden-state
    input: each block keeps its own masks and position arguments (a model whose layers mix
    sliding-window and full attention hands them different masks)."""

    args: tuple
    kwargs: dict
    where: object      # position or keyword of the hidden-state input

    def replay(self, block: nn.Module, x: Tensor, params: Optional[dict] = None) -> Tensor:
        """The block's hidden-state output for input ``x`` (with ``params`` in place of its own
        parameters, by ``torch.func.functional_call``, when given)."""
        args, kwargs = _with_input(self.args, self.kwargs, self.where, x)
        if params is None:
            return _hidden_output(block(*args, **kwargs))
        return _hidden_output(torch.func.functional_call(block, params, args, kwargs, strict=False))


@dataclass
class BlockCalls:
    """What one floating-point pass over the batches recorded: the blocks, the first block's
    hidden-state input per batch, and every block's own call per batch."""

    blocks: list        # [(prefix, block)]
    inputs: list        # per batch: the first block's hidden-state input
    calls: list         # per block, per batch: _BlockCall
    whole_model: bool   # no repeated blocks: the model is the one block


def capture(model: nn.Module, batches: list, *, to_the_end: bool = False,
            each_batch: Callable = lambda: None, is_layer: Callable = is_linear) -> BlockCalls:
    """Run ``model`` once over ``batches`` without a KV cache (no gradients) and record its blocks'
    calls (blocks: ``find_blocks(model, is_layer)``). The pass stops at the last block unless
    ``to_the_end`` (the linears after the blocks want their inputs); ``each_batch()`` is called
    before each batch."""
    blocks = find_blocks(model, is_layer)
    whole_model = blocks[0][1] is model
    calls = [[] for _ in blocks]    # per block, per batch: _BlockCall
    inputs = []                     # per batch: the first block's hidden-state input

    def keeper(i):
        def keep(module, args, kwargs):
            where = _primary(args, kwargs)
            if where is None:
                raise CalibrationError(f"block {blocks[i][0] or type(model).__name__!r} was called without a "
                                       "tensor input; block-wise calibration replays blocks on hidden states")
            if i == 0:
                inputs.append(args[where] if isinstance(where, int) else kwargs[where])
            rest = (None, *args[1:]) if isinstance(where, int) else args
            calls[i].append(_BlockCall(rest, _strip_cache({k: v for k, v in kwargs.items() if k != where}), where))
            if whole_model or (i == len(blocks) - 1 and not to_the_end):
                raise _Stop
        return keep

    handles = [block.register_forward_pre_hook(keeper(i), with_kwargs=True) for i, (_, block) in enumerate(blocks)]
    try:
        with torch.no_grad():
            for batch in batches:
                each_batch()
                try:
                    (call_model if whole_model else call_without_cache)(model, batch)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
    if not inputs:
        raise CalibrationError("calibration saw no data: pass a non-empty list of batches as `data`")
    if any(len(c) != len(inputs) for c in calls):
        raise CalibrationError("the model did not call each of its blocks once per batch; block-wise calibration "
                               f"replays the blocks of {type(model).__name__} in order and needs that")
    return BlockCalls(blocks, inputs, calls, whole_model)


def run(model: nn.Module, batches: list, handle: Callable, *, need_hessian: bool, max_rows: int,
        progress: bool = True, on_outside: Optional[Callable] = None, ignore: set = frozenset(),
        first_token_weight: float = 1.0) -> dict:
    """Run ``model`` block by block over ``batches``; return ``{weight: ActivationStats}``.

    ``handle(block_name, [LinearInput]) -> {module: effective float weight}`` is called once per
    block after its statistics are complete; the returned weights (what the quantized layer
    computes, as a float matrix) feed the next block. ``on_outside([LinearInput])`` receives
    the linears outside the blocks (except those in ``ignore``), with statistics from a
    floating-point pass of the whole model; when there are none, that pass stops at the last
    block. The returned statistics (every linear that ran) are what ``calibrate`` records.
    """
    from tqdm.auto import tqdm

    blocks = find_blocks(model)
    in_blocks = set()
    for prefix, block in blocks:
        in_blocks.update(_linears(block, prefix))
    outside = {m: n for m, n in _linears(model, "").items() if m not in in_blocks and m not in ignore}
    outside_rec = _Recorder(outside, need_hessian, max_rows, first_token_weight)
    with outside_rec:
        recorded = capture(model, batches, to_the_end=bool(outside), each_batch=outside_rec.new_call)
    inputs, calls, whole_model = recorded.inputs, recorded.calls, recorded.whole_model

    seen = {}
    bar = tqdm(blocks, desc="qcompile block-wise calibration", unit="block", disable=not progress, leave=False)
    for i, (prefix, block) in enumerate(bar):
        rec = _Recorder(_linears(block, prefix), need_hessian, max_rows, first_token_weight)
        with rec, torch.no_grad():
            for x, call in zip(inputs, calls[i]):
                rec.new_call()
                call.replay(block, x)
        seen.update({li.module.weight: dataclasses.replace(li.inputs.rows, module=li.name)
                     for li in rec.found.values()})
        new_weights = handle(prefix, list(rec.found.values()))
        if whole_model:
            continue
        params = {}
        for mod, name in _linears(block, "").items():
            if mod in new_weights:
                weight = stored_weight(mod, new_weights[mod])
                params[f"{name}.weight" if name else "weight"] = weight.to(mod.weight.dtype)
        with torch.no_grad():
            inputs = [call.replay(block, x, params) for x, call in zip(inputs, calls[i])]
    bar.close()
    seen.update({li.module.weight: dataclasses.replace(li.inputs.rows, module=li.name)
                 for li in outside_rec.found.values()})
    if on_outside is not None and outside_rec.found:
        on_outside(list(outside_rec.found.values()))
    return seen


class _Stop(Exception):
    """Ends the floating-point pass once a whole-model 'block' has its inputs."""


def materialize(data: Iterable) -> list:
    batches = list(data)
    if not batches:
        raise CalibrationError("calibration saw no data: pass a non-empty list of batches as `data`")
    return batches
