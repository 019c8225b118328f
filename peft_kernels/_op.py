"""One way to define an op family: its input record, its backends, and everything around them.

An op file declares an :class:`OpFamily` (the input record, the forward/backward schemas, what the backward
needs, fake kernels) and registers backends on it with ``@FAMILY.forward(name)`` / ``@FAMILY.backward(name)``.
The family then provides, without more code in the op file:

- two ``torch.library`` custom ops (``peft_kernels::<name>`` and ``peft_kernels::<name>_backward``) with fake
  kernels and autograd, used while ``torch.compile`` traces (``fullgraph=True`` holds them);
- an eager path over the *same* backend functions through one ``torch.autograd.Function``, which skips the
  custom-op dispatcher (its Python overhead is most of a small layer's host time);
- autocast of the declared inputs, the needs mask, None-for-empty gradients;
- dispatch: a forced backend (``use_backend`` / ``PEFT_KERNELS_BACKEND``), else the first backend in the
  preference order that serves the inputs, or the fastest of several where the family has a ``tune_key``
  (measured once per key); a cached lookup per input signature in steady state;
- the rows of ``peft_kernels.info()``, the benchmark variants and the generated backend tests.

Forward and backward backends are registered separately. A forward backend without a backward of its own says
whose backward runs after it (``backward_by=``), and ``info()`` shows it.

Backend functions receive the record's fields positionally: ``forward(*inputs) -> outputs`` and
``backward(*grads_of_public_outputs, *saved, needs) -> one gradient (or None) per differentiable input``.
``why_not(inputs) -> str | None`` says why a backend cannot serve a record (None: it can); the device, dtype
and availability checks are done here from the backend's declaration. Backends check memory safety only: the
public function validates once.
"""

from __future__ import annotations

import contextlib
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from peft_kernels import _backends, _config

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
DIRECTIONS = ("forward", "backward")
# What a backend kind needs loaded, by default.
_DEFAULT_REQUIRES = {"aten": "native", "cpp": "native", "cuda": "native_cuda", "triton": "triton"}
_DEFAULT_DEVICES = {"cpp": ("cpu",), "cuda": ("cuda",), "triton": ("cuda",)}
_CACHE_LIMIT = 4096

FAMILIES: dict[str, OpFamily] = {}


@dataclass
class Backend:
    """One implementation of one direction of an op family."""

    name: str
    direction: str
    run: Callable
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...] | None
    requires: str | None
    backward_by: str | None = None  # forward only: whose backward runs after this forward
    why_not: Callable[[Any], str | None] | None = None
    doc: str = ""
    # forward only: plain differentiable PyTorch, so the eager path lets autograd differentiate it directly
    # (no autograd.Function around it: the least host time there is); the custom-op path uses the backward.
    autograd: bool = False
    # forward only, optional: the whole op as one differentiable callable with its own autograd node (a C++
    # torch::autograd::Function: no Python in its backward), the same math as this forward and its backward.
    # The eager path calls it instead of the forward + _EagerFunction where this backend's own backward runs;
    # it returns the public outputs. torch.compile traces the custom ops instead. For an `autograd` backend: the
    # differentiable forward itself (a public function's steady state then calls it with nothing in between).
    eager: Callable | None = None
    # forward only, optional: the inputs the eager node serves (a node may cover a common subset of what the
    # backend takes, e.g. no mask); the others run the forward + _EagerFunction. None: all of them.
    eager_when: Callable[[Any], bool] | None = None

    def device_reason(self, device_type: str) -> str | None:
        """Why this backend cannot run on `device_type` tensors at all (None: it can)."""
        reason = _backends.availability(self.requires, device_type)
        if reason is not None:
            return reason
        if device_type in self.devices:
            return None
        if self.requires == "triton" and device_type == "cpu" and _backends.triton_interpreting():
            return None
        return f"the {self.name} backend runs on {'/'.join(self.devices)} tensors, got {device_type} tensors"


def _signature(value) -> object:
    """What dispatch depends on, for the lookup cache: metadata of tensors, kind of scalars."""
    if isinstance(value, Tensor):
        return (value.dtype, value.device, value.shape, value.stride(), value.requires_grad)
    if isinstance(value, float):
        return value == 0.0  # a float's value changes per call (a schedule); only "is it off" selects kernels
    return value


def python_signature(*tensors) -> tuple | None:
    """What validation and dispatch read of these tensors (None entries allowed), as a cache key; None when an
    argument is not a plain strided tensor (the public function's full checks then run)."""
    for t in tensors:
        if t is not None and (type(t) not in _PLAIN_TENSOR_TYPES or t.layout != torch.strided or t.is_nested):
            return None  # a subclass may redefine what it reports; sparse and nested tensors have no strides
    try:
        return tuple([None if t is None else (t.shape, t.stride(), t.dtype, t.device, t.requires_grad)
                      for t in tensors])  # a list comprehension: a generator costs more on this per-call path
    except RuntimeError:  # sizes or strides that cannot be read (a functorch wrapper, ...)
        return None


_PLAIN_TENSOR_TYPES = (Tensor, torch.nn.Parameter)
# The same key from the extension (bytes, equal exactly when the fields above are): a fraction of the host time.
# Eager mode only (dynamo cannot trace it): callers compute keys outside torch.compile, where the cache is used.
signature: Callable[..., object] = _backends.native_function("tensor_signature") or python_signature


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast casts to on this device type, or None where it is off (or the device type has no
    autocast at all: meta tensors, whose ``is_autocast_enabled`` raises)."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return None
    return torch.get_autocast_dtype(device_type) if enabled else None


def autocast_applies(t, dtype: torch.dtype) -> bool:
    """Whether autocast to `dtype` casts `t` (a floating tensor of another dtype; float64 is left as it is)."""
    return isinstance(t, Tensor) and t.is_floating_point() and t.dtype != dtype and t.dtype != torch.float64


def steady() -> bool:
    """A public function may take its cached steady-state path: eager, no autocast to apply."""
    return not torch._C._is_any_autocast_enabled() and not torch.compiler.is_compiling()


def _empty_for_none(grads, like: Tensor) -> list[Tensor]:
    return [g if g is not None else like.new_empty(0) for g in grads]


class OpFamily:
    """An op family: see the module doc. ``Inputs`` is a NamedTuple of the forward's inputs in schema order."""

    def __init__(
        self,
        name: str,
        Inputs: type,  # noqa: N803  (a class)
        *,
        schema: str,
        backward_schema: str,
        differentiable: Sequence[str],
        save: Callable[[Any, tuple], tuple],
        fake: Callable[[Any], Any],
        backward_fake: Callable[..., tuple],
        public_outputs: int = 1,
        primary: str | None = None,
        preference: dict[str, Sequence[str] | Callable[[Any], Sequence[str]]] | None = None,
        autocast: Sequence[str] = (),
        tune_key: Callable[[Any], object] | None = None,
        doc: str = "",
    ) -> None:
        if name in FAMILIES:
            raise ValueError(f"op family {name!r} is defined twice")
        self.name, self.Inputs, self.doc = name, Inputs, doc
        self.fields: tuple[str, ...] = Inputs._fields
        self.differentiable = tuple(differentiable)
        self._diff_idx = tuple(self.fields.index(n) for n in self.differentiable)
        self._primary = self.fields.index(primary or self.fields[0])
        self._save_fn, self._fake, self._backward_fake = save, fake, backward_fake
        self.public_outputs = public_outputs
        # device type -> backend names, or a function of the input record returning them (a rule a benchmark
        # justifies, e.g. "on CPU tensors the plain ATen composite wins unless dropout needs the C++ mask").
        self.preference = {k: v if callable(v) else tuple(v) for k, v in (preference or {}).items()}
        self.autocast = tuple(autocast)
        self.tune_key = tune_key
        self.forward_backends: dict[str, Backend] = {}
        self.backward_backends: dict[str, Backend] = {}
        self._cache: dict[tuple, tuple[str, str]] = {}
        # The steady-state cache of the public function: (switches, validated signature) -> (fwd, bwd, node).
        self._calls: dict[tuple, tuple[str, str, Callable | None]] = {}
        _config._DISPATCH_CACHES.extend((self._cache, self._calls))
        self._warned: set[str] = set()
        self._define_custom_ops(schema, backward_schema)
        FAMILIES[name] = self

    # ----------------------------------------------------------------------------------------------
    # Declaring backends
    # ----------------------------------------------------------------------------------------------
    def forward(self, name: str, **kwargs) -> Callable:
        return self._register("forward", name, **kwargs)

    def backward(self, name: str, **kwargs) -> Callable:
        return self._register("backward", name, **kwargs)

    def _register(self, direction, name, *, devices=None, dtypes=FLOAT_DTYPES, requires="default",
                  backward_by=None, why_not=None, doc="", autograd=False, eager=None, eager_when=None):
        if (backward_by is not None or eager is not None) and direction != "forward":
            raise ValueError("backward_by= and eager= are for forward backends")
        if eager_when is not None and eager is None:
            raise ValueError("eager_when= needs eager=")

        def decorator(fn: Callable) -> Callable:
            kind = name.split(":")[0]
            table = self.forward_backends if direction == "forward" else self.backward_backends
            table[name] = Backend(
                name=name, direction=direction, run=fn,
                devices=tuple(devices or _DEFAULT_DEVICES.get(kind, ("cpu", "cuda"))),
                dtypes=None if dtypes is None else tuple(dtypes),
                requires=_DEFAULT_REQUIRES.get(kind) if requires == "default" else requires,
                backward_by=backward_by, why_not=why_not, doc=doc or (fn.__doc__ or "").strip().split("\n")[0],
                autograd=autograd, eager=eager, eager_when=eager_when,
            )
            self._clear()
            return fn

        return decorator

    def _clear(self) -> None:
        self._cache.clear()
        self._calls.clear()

    def why_not(self, name: str, direction: str = "forward", *, both: bool = False) -> Callable:
        """Decorator: ``why_not(inputs) -> str | None`` for backend `name` (both directions with ``both=True``)."""

        def decorator(fn: Callable) -> Callable:
            for d in DIRECTIONS if both else (direction,):
                table = self.forward_backends if d == "forward" else self.backward_backends
                if name not in table:
                    raise KeyError(f"{self.name}: declare the {d} backend {name!r} before its why_not")
                table[name].why_not = fn
            self._clear()
            return fn

        return decorator

    def unregister(self, name: str) -> None:
        """Remove a backend (both directions); for tests that declare one."""
        self.forward_backends.pop(name, None)
        self.backward_backends.pop(name, None)
        self._clear()

    # ----------------------------------------------------------------------------------------------
    # Dispatch
    # ----------------------------------------------------------------------------------------------
    def device_type(self, inputs) -> str:
        return inputs[self._primary].device.type

    def why_not_reason(self, name: str, inputs, direction: str = "forward") -> str | None:
        """Why backend `name` cannot serve these inputs in `direction` (None: it can)."""
        table = self.forward_backends if direction == "forward" else self.backward_backends
        backend = table.get(name)
        if backend is None:
            return f"{self.name} has no {direction} backend {name!r} (it has: {', '.join(table)})"
        primary = inputs[self._primary]
        reason = backend.device_reason(primary.device.type)
        if reason is None and backend.dtypes is not None and primary.dtype not in backend.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in backend.dtypes)
            reason = f"{self.fields[self._primary]} has dtype {primary.dtype}; the {name} backend takes ({names})"
        if reason is None and backend.why_not is not None:
            reason = backend.why_not(inputs)
        return reason

    def order(self, device_type: str, inputs=None) -> list[str]:
        """Backends in preference order: the declared order (for these inputs), then the others, reference last.
        The reference is a contender only where the preference names it; otherwise it is the last resort."""
        pref = self.preference.get(device_type, ())
        if callable(pref):
            pref = pref(inputs) if inputs is not None else ()
        preferred = [n for n in pref if n in self.forward_backends]
        rest = [n for n in self.forward_backends if n not in preferred and n != "reference"]
        tail = ["reference"] if "reference" in self.forward_backends and "reference" not in preferred else []
        return [*preferred, *rest, *tail]

    def backward_for(self, forward_name: str, inputs) -> str:
        """The backward backend that runs after `forward_name`'s forward on these inputs."""
        wanted = self.forward_backends[forward_name].backward_by or forward_name
        if self.why_not_reason(wanted, inputs, "backward") is None:
            return wanted
        for name in self.order(self.device_type(inputs), inputs):
            if name in self.backward_backends and self.why_not_reason(name, inputs, "backward") is None:
                return name
        return "reference"

    def select(self, inputs, key=None) -> tuple[str, str]:
        """(forward backend, backward backend) for these inputs: a cached lookup in steady state. `key`, where the
        caller has one, must capture everything the choice depends on (the default: every input's signature)."""
        if torch.compiler.is_compiling():
            return self._select(inputs, _config.forced_backend())
        switches = _config.dispatch_switches()
        forced = switches[0]
        key = (switches, *map(_signature, inputs)) if key is None else (switches, key)
        hit = self._cache.get(key)
        if hit is None:
            hit = self._select(inputs, forced)
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[key] = hit
        return hit

    def _select(self, inputs, forced) -> tuple[str, str]:
        device_type = self.device_type(inputs)
        if forced is not None:
            name, strict = forced
            _backends.check_backend_name(name)
            reason = self.why_not_reason(name, inputs)
            if reason is None:
                return name, self.backward_for(name, inputs)
            if strict:
                raise NotImplementedError(
                    f"peft_kernels.{self.name}: backend {name!r} cannot serve these inputs: {reason}"
                )
            if name not in self._warned:
                self._warned.add(name)
                warnings.warn(f"peft_kernels.{self.name}: backend {name!r} cannot serve these inputs ({reason}); "
                              "falling back", stacklevel=4)
        # The reference is the fallback, not a contender (unless the preference names it).
        order = self.order(device_type, inputs)
        named = self.preference.get(device_type, ())
        if callable(named):  # (a rule per input: what it names for these)
            named = named(inputs)
        contenders = order if "reference" in named else [n for n in order if n != "reference"]
        candidates = [n for n in contenders if self.why_not_reason(n, inputs) is None]
        if not candidates:
            name = "reference"
        elif len(candidates) > 1 and self.tune_key is not None and _config.tune_dispatch(device_type):
            name = self._fastest(candidates, inputs)
        else:
            name = candidates[0]
        return name, self.backward_for(name, inputs)

    def _fastest(self, candidates: list[str], inputs) -> str:
        """Times each candidate once per tune key and remembers the winner. While tracing (no timing possible) a
        remembered winner is used, else the first candidate: ``peft_kernels.warm_up`` fills the table first."""
        key = (self.name, self.device_type(inputs), self.tune_key(inputs))
        if key in _config.TUNED:
            return _config.TUNED[key]
        if torch.compiler.is_compiling():
            return candidates[0]
        times = {}
        for name in candidates:
            try:
                times[name] = _time(lambda n=name: self.run_once(n, inputs), inputs[self._primary].device)
            except Exception as exc:  # a backend that fails here (compile error, out of resources) is not chosen
                warnings.warn(f"peft_kernels.{self.name}: backend {name!r} failed while being timed ({exc!r})",
                              stacklevel=5)
        if not times:
            return candidates[0]
        _config.TUNED[key] = min(times, key=times.get)
        return _config.TUNED[key]

    def run_once(self, name: str, inputs) -> None:
        """One forward, and backward where anything needs a gradient, of backend `name` (dispatch timing, bench)."""
        needs = [isinstance(inputs[i], Tensor) and inputs[i].requires_grad for i in self._diff_idx]
        inputs = self.Inputs(*(t.detach() if isinstance(t, Tensor) else t for t in inputs))
        with torch.no_grad():
            outs = _as_tuple(self.forward_backends[name].run(*inputs))
            if any(needs):
                saved = self._save_fn(inputs, outs)
                with _eager_backward():  # timed as the eager training step runs it
                    self.backward_backends[self.backward_for(name, inputs)].run(*outs[: self.public_outputs], *saved,
                                                                                needs)

    # ----------------------------------------------------------------------------------------------
    # Calling
    # ----------------------------------------------------------------------------------------------
    def __call__(self, inputs, key=None):
        """Run the op on a validated input record: dispatch, autograd, autocast. Returns the public outputs.
        `key`: see ``select``."""
        if self.autocast:
            cast = self._autocast(inputs)
            if cast is not inputs:
                inputs, key = cast, None  # the caller's key described the inputs before the cast
        return self.run(inputs, *self.select(inputs, key))

    def run(self, inputs, fwd: str, bwd: str):
        """Run backends already selected (``select``) on a validated record: autograd; the public outputs."""
        if not torch.compiler.is_compiling():
            return self.run_eager(inputs, fwd, bwd)
        return self._public(self._fwd_op(*inputs, fwd, bwd))

    def run_eager(self, inputs, fwd: str, bwd: str):
        """``run`` outside torch.compile (the caller knows it is not tracing)."""
        node = self.eager_call(fwd, bwd, inputs)
        if node is not None:
            return node(*inputs)
        backend = self.forward_backends[fwd]
        if not backend.autograd and torch.is_grad_enabled() and self._any_requires_grad(inputs):
            return _EagerFunction.apply(self, fwd, bwd, *inputs)  # the public outputs only
        return self._public(backend.run(*inputs))

    def eager_call(self, fwd: str, bwd: str, inputs) -> Callable | None:
        """The callable ``run_eager`` ends in for these backends and inputs when it is one call over the record's
        fields (a backend's ``eager`` node), else None: a public function may cache it beside its dispatch choice
        (under a key that decides ``eager_when``)."""
        backend = self.forward_backends[fwd]
        if backend.eager is None or (bwd != fwd and not backend.autograd):  # autograd: no backend's backward runs
            return None
        return backend.eager if backend.eager_when is None or backend.eager_when(inputs) else None

    # The steady state of a public function: validate and dispatch once per signature, then only look up.
    #     hit = FAMILY.steady_hit(extra, *tensors)   # or FAMILY.cached(key): key = (extra, signature(*tensors))
    #     if hit is None: validate(...); hit = FAMILY.remember(key, inputs)
    #     fwd, bwd, node = hit                # node: one callable over the record's fields, or None (run_eager)
    def cached(self, key) -> tuple[str, str, Callable | None] | None:
        return None if key is None else self._calls.get((_config.dispatch_switches(), key))

    def steady_hit(self, extra, *tensors) -> tuple[str, str, Callable | None] | None:
        """``steady()`` and ``cached((extra, signature(*tensors)))`` in one call (each Python call on this path
        costs host time per layer): `extra` is the hashable non-tensor part of the key, as the public function's
        cold path builds it."""
        if torch._C._is_any_autocast_enabled() or torch.compiler.is_compiling():  # dynamo: before the C key
            return None
        sig = signature(*tensors)
        return None if sig is None else self._calls.get((_config.dispatch_switches(), (extra, sig)))

    def remember(self, key, inputs) -> tuple[str, str, Callable | None]:
        """Dispatch a validated record and, where `key` is not None, keep the choice for ``cached``."""
        fwd, bwd = self.select(inputs)
        hit = (fwd, bwd, self.eager_call(fwd, bwd, inputs))
        if key is not None and not torch.compiler.is_compiling():
            if len(self._calls) >= _CACHE_LIMIT:
                self._calls.clear()
            self._calls[(_config.dispatch_switches(), key)] = hit
        return hit

    def call_checked(self, inputs, key):
        """A public function's path for a signature not in ``cached``: the record is validated; dispatch it (kept
        under `key` where that can be reused: eager, no autocast) and run it."""
        if key is not None and steady():
            fwd, bwd, _ = self.remember(key, inputs)
            return self.run_eager(inputs, fwd, bwd)
        return self(inputs)

    def _public(self, outs):
        if self.public_outputs == 1:
            return outs[0] if isinstance(outs, (tuple, list)) else outs
        return tuple(outs[: self.public_outputs])

    def _any_requires_grad(self, inputs) -> bool:
        for i in self._diff_idx:
            t = inputs[i]
            if t is not None and t.requires_grad:
                return True
        return False

    def _autocast(self, inputs):
        dtype = autocast_dtype(self.device_type(inputs))
        if dtype is None:
            return inputs
        cast = {}
        for name in self.autocast:
            t = getattr(inputs, name)
            if autocast_applies(t, dtype):
                cast[name] = t.to(dtype)
        return inputs._replace(**cast) if cast else inputs

    # Saving for backward: tensors through save_for_backward, everything else on ctx.
    def _save(self, ctx, inputs, outs: tuple, bwd: str) -> None:
        constants = list(self._save_fn(inputs, outs))
        slots = [i for i, a in enumerate(constants) if isinstance(a, Tensor)]
        ctx.save_for_backward(*[constants[i] for i in slots])
        for i in slots:
            constants[i] = None  # no tensor kept on ctx itself: save_for_backward checks versions, frees early
        ctx.pk_constants, ctx.pk_slots, ctx.pk_bwd = constants, slots, bwd

    @staticmethod
    def _saved_args(ctx) -> list:
        args = list(ctx.pk_constants)
        for i, t in zip(ctx.pk_slots, ctx.saved_tensors):
            args[i] = t
        return args

    def _needs(self, ctx, offset: int) -> list[bool]:
        return [bool(ctx.needs_input_grad[offset + i]) for i in self._diff_idx]

    def _grads_to_inputs(self, grads, needs, offset: int, trailing: int) -> tuple:
        result: list = [None] * (offset + len(self.fields) + trailing)
        for i, g, need in zip(self._diff_idx, grads, needs):
            result[offset + i] = g if need else None
        return tuple(result)

    # ----------------------------------------------------------------------------------------------
    # torch.library custom ops (the torch.compile path)
    # ----------------------------------------------------------------------------------------------
    def _define_custom_ops(self, schema: str, backward_schema: str) -> None:
        args, _, returns = schema.partition("->")
        args = args.strip()
        if not (args.startswith("(") and args.endswith(")")) or not returns.strip():
            raise ValueError(f"{self.name}: schema must look like '(Tensor x, ...) -> Tensor', got {schema!r}")
        fwd_schema = f"{args[:-1]}, str fwd_backend, str bwd_backend) -> {returns.strip()}"
        bargs = backward_schema.strip()
        if not (bargs.startswith("(") and bargs.endswith(")")) or "->" in bargs:
            raise ValueError(f"{self.name}: backward_schema lists the backward's inputs only: '(Tensor dy, ...)'")
        bwd_schema = f"{bargs[:-1]}, bool[] needs, str backend) -> Tensor[]"
        n, family = len(self.fields), self

        def forward_impl(*args):
            outs = family.forward_backends[args[n]].run(*args[:n])
            return _no_alias(outs, args[:n])

        def forward_fake(*args):
            return family._fake(family.Inputs(*args[:n]))

        def backward_impl(*args):
            *bargs, needs, backend = args
            grads = family.backward_backends[backend].run(*bargs, needs)
            like = next(a for a in bargs if isinstance(a, Tensor))
            return _no_alias(_empty_for_none(grads, like), bargs)

        def backward_fake(*args):
            *bargs, needs, backend = args
            like = next(a for a in bargs if isinstance(a, Tensor))
            return _empty_for_none(family._backward_fake(*bargs, needs), like)

        lib = "peft_kernels::"
        self._fwd_op = torch.library.custom_op(lib + self.name, forward_impl, mutates_args=(), schema=fwd_schema)
        self._fwd_op.register_fake(forward_fake)
        self._bwd_op = torch.library.custom_op(lib + self.name + "_backward", backward_impl, mutates_args=(),
                                               schema=bwd_schema)
        self._bwd_op.register_fake(backward_fake)

        def setup_context(ctx, inputs, output):
            family._save(ctx, family.Inputs(*inputs[:n]), _as_tuple(output), inputs[n + 1])

        def backward(ctx, *grad_outs):
            needs = family._needs(ctx, 0)
            if not any(needs):
                return (None,) * (n + 2)
            grads = family._bwd_op(*grad_outs[: family.public_outputs], *family._saved_args(ctx), needs, ctx.pk_bwd)
            return family._grads_to_inputs(grads, needs, 0, 2)

        self._fwd_op.register_autograd(backward, setup_context=setup_context)

    @property
    def custom_ops(self):
        """(forward, backward) custom ops, e.g. for ``torch.library.opcheck``."""
        return self._fwd_op, self._bwd_op


_EAGER_BACKWARD = threading.local()


def grads_may_be_views() -> bool:
    """Whether the backward backend running now was called by the eager path (the autograd.Function, or dispatch
    timing it): its gradients may then be views of a larger buffer (autograd takes any strides); a custom op's must
    be laid out as its fake says."""
    return getattr(_EAGER_BACKWARD, "active", False)


@contextlib.contextmanager
def _eager_backward():
    previous = grads_may_be_views()
    _EAGER_BACKWARD.active = True
    try:
        yield
    finally:
        _EAGER_BACKWARD.active = previous


class _EagerFunction(torch.autograd.Function):
    """The eager path: the same backend functions as the custom ops, without the custom-op dispatcher. It
    returns only the public outputs (auxiliary ones are saved, not returned: fewer autograd outputs to wrap)."""

    @staticmethod
    def forward(ctx, family: OpFamily, fwd: str, bwd: str, *args):
        inputs = family.Inputs(*args)
        outs = _as_tuple(family.forward_backends[fwd].run(*inputs))
        family._save(ctx, inputs, outs, bwd)
        ctx.pk_family = family
        public = family.public_outputs
        return outs[0] if public == 1 else outs[:public]

    @staticmethod
    def backward(ctx, *grad_outs):
        family: OpFamily = ctx.pk_family
        needs = family._needs(ctx, 3)
        if not any(needs):
            return (None,) * (3 + len(family.fields))
        args = family._saved_args(ctx)  # (may recompute a checkpointed forward: outside the flag)
        with _eager_backward():
            grads = family.backward_backends[ctx.pk_bwd].run(*grad_outs, *args, needs)
        return family._grads_to_inputs(grads, needs, 3, 0)


def _as_tuple(outs) -> tuple:
    return tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)


def _no_alias(outs, inputs):
    """Custom ops may not return an input, a view of one, or two views of one buffer (a backend may: a slice of
    one buffer, an input passed through); those are copied. A view of a fresh buffer (SDPA returns its outputs as
    transposed views) is returned as it is: copying it would cost a pass over the output."""
    seen = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, Tensor) and t.untyped_storage().nbytes()}

    def fix(t):
        if not isinstance(t, Tensor) or not t.untyped_storage().nbytes():
            return t
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            return t.clone()
        seen.add(ptr)
        return t

    if isinstance(outs, (tuple, list)):
        return type(outs)(fix(t) for t in outs)
    return fix(outs)


def _time(run: Callable[[], object], device: torch.device, reps: int = 3) -> float:
    run()  # warm-up: Triton compiles and autotunes here, cuBLAS picks its algorithms
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        run()
    return (time.perf_counter() - t0) * 1e3 / reps


def families() -> dict[str, OpFamily]:
    """Every defined op family (importing peft_kernels.ops defines the library's)."""
    import peft_kernels.ops  # noqa: F401

    return dict(FAMILIES)


def known_backends() -> set[str]:
    return {name for f in FAMILIES.values() for name in (*f.forward_backends, *f.backward_backends)}


def table(device_type: str | None = None) -> list[dict[str, str]]:
    """One row per (op, direction, backend): where it runs, what it takes, whether it can run here and why not."""
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for op, family in sorted(families().items()):
        order = family.order(device_type)
        for direction in DIRECTIONS:
            table_ = family.forward_backends if direction == "forward" else family.backward_backends
            for name, b in table_.items():
                reason = b.device_reason(device_type)
                note = f"backward by {b.backward_by}" if b.backward_by else ""
                rows.append({
                    "op": op, "direction": direction, "backend": name, "device": device_type,
                    "preference": str(order.index(name) + 1) if direction == "forward" and name in order else "-",
                    "devices": "/".join(b.devices),
                    "dtypes": _dtype_names(b.dtypes),
                    "status": "ok" if reason is None else f"unavailable: {reason}",
                    "note": note,
                })
    return rows


_SHORT = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


def _dtype_names(dtypes) -> str:
    if dtypes is None:
        return "any"
    return ",".join(_SHORT.get(d, str(d).replace("torch.", "")) for d in dtypes)


def warm_up(model: torch.nn.Module, *args, **kwargs) -> dict[tuple, str]:
    """Run `model` forward and backward once on an example batch with measured dispatch on, so that every layer's
    choice is measured now (not in the first training step, nor while torch.compile traces). Returns the choices."""
    with _config.tuning(True):
        out = model(*args, **kwargs)
        loss = out if isinstance(out, Tensor) else getattr(out, "loss", None)
        if loss is None and hasattr(out, "logits"):
            loss = out.logits
        if isinstance(loss, Tensor) and loss.requires_grad:
            loss.float().sum().backward()
            model.zero_grad(set_to_none=True)
    return _config.tuned_choices()
