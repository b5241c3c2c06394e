"""Registry of named image defences, spec strings, :class:`Defense` objects and a curriculum.

A defence is written as a *spec string*::

    name[:arg[,arg...]]      arg = value | key=value

for instance ``"jpeg:q=10"``, ``"jpeg:10"``, ``"jpeg_random:qmin=10,qmax=95"``, ``"gray"``,
``"median:k=3"``, ``"blur:sigma=1"``, ``"noise:std=4/255"``, ``"bits:4"``, ``"resize:0.5"``,
``"crop:scale=0.8,pad=4"``, ``"flip"``, ``"none"``. Positional values fill the parameters in declaration order; float values may be
written as fractions (``4/255``). Names and keys are case-insensitive; aliases are resolved
(``none`` -> ``identity``, ``jpg`` -> ``jpeg``, ``quality`` -> ``q``, ...).

:func:`get_defense` turns a spec into a :class:`Defense`, whose ``str`` is the canonical spec
(every parameter spelled out), so ``get_defense(str(d)) == d``. Each defence has two forms:

* :meth:`Defense.differentiable` for training (gradients flow to the input) and
* :meth:`Defense.real` for evaluation (8-bit input, the real operation, 8-bit output).

Users add their own with the :func:`register_defense` decorator::

    @register_defense("posterize", params=[Param("levels", int, 8, low=2, high=256)])
    def posterize(x, *, levels):
        return round_ste(x * (levels - 1)) / (levels - 1)
"""

from __future__ import annotations

import inspect
import math
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from raeg_pl.defenses import ops

__all__ = [
    "Defense",
    "DefenseCurriculum",
    "DefenseInfo",
    "Param",
    "describe_defenses",
    "get_defense",
    "get_defense_info",
    "list_defenses",
    "parse_spec",
    "register_defense",
    "unregister_defense",
]

ParamValue = int | float
DefenseFn = Callable[..., torch.Tensor]

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


# ----------------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """A typed, range-checked parameter of a defence.

    Attributes:
        name: canonical key used in spec strings and passed to the defence functions.
        type: ``int`` or ``float``.
        default: value used when the spec omits the parameter.
        low: smallest allowed value (``None``: unbounded).
        high: largest allowed value (``None``: unbounded).
        low_inclusive: whether ``low`` itself is allowed.
        high_inclusive: whether ``high`` itself is allowed.
        aliases: other keys accepted in spec strings.
        odd: for ``int`` parameters, require an odd value (kernel sizes).
        validator: optional extra check ``fn(value)`` that raises ValueError with a reason.
        doc: one-line description, shown in error messages and :func:`describe_defenses`.
    """

    name: str
    type: type
    default: ParamValue
    low: float | None = None
    high: float | None = None
    low_inclusive: bool = True
    high_inclusive: bool = True
    aliases: tuple[str, ...] = ()
    odd: bool = False
    validator: Callable[[ParamValue], None] | None = None
    doc: str = ""

    def __post_init__(self) -> None:
        if self.type not in (int, float):
            raise TypeError(f"Param {self.name!r}: type must be int or float, got {self.type}")
        if not _NAME_RE.match(self.name):
            raise ValueError(f"Param name {self.name!r} must match {_NAME_RE.pattern}")
        object.__setattr__(self, "aliases", tuple(a.lower() for a in self.aliases))
        # The default must itself be valid.
        object.__setattr__(self, "default", self.check(self.default, context="default"))

    def describe(self) -> str:
        """Human-readable summary, e.g. ``q (int, default 75, in [1, 100])``."""
        lo = "(" if not self.low_inclusive else "["
        hi = ")" if not self.high_inclusive else "]"
        rng = ""
        if self.low is not None or self.high is not None:
            a = "-inf" if self.low is None else _fmt(self.low)
            b = "inf" if self.high is None else _fmt(self.high)
            rng = f", in {lo}{a}, {b}{hi}"
        odd = ", odd" if self.odd else ""
        alias = f", alias {'/'.join(self.aliases)}" if self.aliases else ""
        doc = f": {self.doc}" if self.doc else ""
        return f"{self.name} ({self.type.__name__}, default {_fmt(self.default)}{rng}{odd}{alias}){doc}"

    def parse(self, text: str) -> ParamValue:
        """Parse a value written in a spec string (``"10"``, ``"0.5"``, ``"4/255"``)."""
        text = text.strip()
        try:
            if "/" in text:
                num, den = text.split("/", 1)
                value: float = float(num) / float(den)
            else:
                value = float(text)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"not a number: {text!r}") from None
        return self.check(value)

    def check(self, value: Any, context: str = "value") -> ParamValue:
        """Coerce ``value`` to this parameter's type and validate it; raise ValueError if bad."""
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{context} {value!r} is not a number")
        if not math.isfinite(value):
            raise ValueError(f"{context} {value!r} is not finite")
        if self.type is int:
            if float(value) != int(value):
                raise ValueError(f"{context} {value!r} is not an integer")
            value = int(value)
            if self.odd and value % 2 == 0:
                raise ValueError(f"{context} {value} must be odd")
        else:
            value = float(value)
        if self.low is not None and (
            value < self.low or (not self.low_inclusive and value == self.low)
        ):
            raise ValueError(f"{context} {_fmt(value)} is out of range")
        if self.high is not None and (
            value > self.high or (not self.high_inclusive and value == self.high)
        ):
            raise ValueError(f"{context} {_fmt(value)} is out of range")
        if self.validator is not None:
            self.validator(value)
        return value


def _fmt(value: ParamValue) -> str:
    """Shortest spec text that parses back to exactly ``value``."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    short = f"{value:g}"
    return short if float(short) == value else repr(float(value))


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DefenseInfo:
    """A registered defence: its name, parameters and the two implementations.

    Attributes:
        name: canonical name.
        differentiable_fn: ``fn(x, **params[, generator=g]) -> Tensor``, differentiable.
        real_fn: ``fn(x, **params[, generator=g]) -> Tensor`` on the 8-bit grid.
        params: declared parameters, in positional order.
        aliases: other names accepted in spec strings.
        random: whether the functions take a ``generator`` keyword (random defences).
        doc: one-line description.
        check: optional test of the complete parameter dict, for constraints between
            parameters (``qmin <= qmax``); raises ValueError with a reason.
    """

    name: str
    differentiable_fn: DefenseFn
    real_fn: DefenseFn
    params: tuple[Param, ...]
    aliases: tuple[str, ...] = ()
    random: bool = False
    doc: str = ""
    check: Callable[[Mapping[str, ParamValue]], None] | None = None

    def param(self, key: str) -> Param | None:
        """The parameter called ``key`` (or with that alias), or None."""
        key = key.lower()
        for p in self.params:
            if key == p.name or key in p.aliases:
                return p
        return None

    def describe(self) -> str:
        """Multi-line description of the defence and its parameters."""
        head = self.name + (f" (alias {', '.join(self.aliases)})" if self.aliases else "")
        head += f": {self.doc}" if self.doc else ""
        lines = [head] + [f"    {p.describe()}" for p in self.params]
        return "\n".join(lines)

    def valid_params(self) -> str:
        """Short list of valid parameters for error messages."""
        if not self.params:
            return f"{self.name!r} takes no parameters"
        return f"valid parameters of {self.name!r}: " + "; ".join(p.describe() for p in self.params)

    def resolve(self, values: Mapping[str, Any], spec: str) -> dict[str, ParamValue]:
        """Validate explicit parameter values and fill in defaults; keys may be aliases."""
        out: dict[str, ParamValue] = {}
        for key, value in values.items():
            p = self.param(str(key))
            if p is None:
                raise ValueError(
                    f"defence spec {spec!r}: unknown parameter {key!r}; {self.valid_params()}"
                )
            if p.name in out:
                raise ValueError(f"defence spec {spec!r}: parameter {p.name!r} given twice")
            try:
                out[p.name] = p.parse(value) if isinstance(value, str) else p.check(value)
            except ValueError as err:
                raise ValueError(
                    f"defence spec {spec!r}: bad parameter {p.name!r}: {err}; {self.valid_params()}"
                ) from None
        resolved = {p.name: out.get(p.name, p.default) for p in self.params}
        if self.check is not None:
            try:
                self.check(resolved)
            except ValueError as err:
                raise ValueError(f"defence spec {spec!r}: {err}; {self.valid_params()}") from None
        return resolved


_REGISTRY: dict[str, DefenseInfo] = {}
_ALIASES: dict[str, str] = {}


def _accepts_generator(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` has an explicit ``generator`` parameter (i.e. the defence is random)."""
    try:
        return "generator" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _params_from_signature(fn: Callable[..., Any], name: str) -> tuple[Param, ...]:
    out = []
    for i, (key, p) in enumerate(inspect.signature(fn).parameters.items()):
        if i == 0 or key == "generator" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        default = p.default
        if default is inspect.Parameter.empty or isinstance(default, bool):
            raise TypeError(
                f"register_defense({name!r}): parameter {key!r} needs an int or float default "
                "(or pass params=[Param(...)])"
            )
        if not isinstance(default, int | float):
            raise TypeError(f"register_defense({name!r}): parameter {key!r} must be int or float")
        out.append(Param(key, type(default), default))
    return tuple(out)


def _default_real(fn: DefenseFn, is_random: bool) -> DefenseFn:
    """Real form of a user defence: 8-bit input, ``fn`` without gradients, 8-bit output."""
    if is_random:

        def real(x: torch.Tensor, generator: torch.Generator | None = None, **kw: Any):
            with torch.no_grad():
                return ops.quantize_8bit(fn(ops.quantize_8bit(x), generator=generator, **kw))

    else:

        def real(x: torch.Tensor, **kw: Any):
            with torch.no_grad():
                return ops.quantize_8bit(fn(ops.quantize_8bit(x), **kw))

    real.__name__ = f"{getattr(fn, '__name__', 'defense')}_real"
    return real


def register_defense(
    name: str,
    *,
    params: Iterable[Param] | None = None,
    real: DefenseFn | None = None,
    aliases: Sequence[str] = (),
    doc: str | None = None,
    overwrite: bool = False,
    check: Callable[[Mapping[str, ParamValue]], None] | None = None,
) -> Callable[[DefenseFn], DefenseFn]:
    """Decorator that registers a differentiable defence function under ``name``.

    The decorated function is called as ``fn(x, **params)`` (plus ``generator=g`` if it has an
    explicit ``generator`` parameter, which marks the defence as random), with ``x`` of shape (B, C, H, W), float in [0, 1], and must return
    a tensor of the same shape in [0, 1] through which gradients flow to ``x``.

    Args:
        name: canonical name (lower case, ``[a-z][a-z0-9_]*``).
        params: declared parameters in positional order. If None they are inferred from the
            function's keyword parameters with int/float defaults (no range checks).
        real: the evaluation form, same call convention, output on the 8-bit grid. Default:
            quantise the input to 8 bit, apply the decorated function, quantise the output.
        aliases: other names accepted in spec strings.
        doc: one-line description; default: the first line of the function's docstring.
        overwrite: allow replacing an existing defence of that name.
        check: optional test of the complete parameter dict (constraints between
            parameters); raises ValueError with a reason, reported with the spec.

    Returns:
        The decorator; it returns the function unchanged.

    Raises:
        ValueError: on an invalid or already registered name/alias (without ``overwrite``).
    """
    name = name.lower()
    alias_list = tuple(a.lower() for a in aliases)
    for n in (name, *alias_list):
        if not _NAME_RE.match(n):
            raise ValueError(f"defence name {n!r} must match {_NAME_RE.pattern}")

    def decorator(fn: DefenseFn) -> DefenseFn:
        declared = tuple(params) if params is not None else _params_from_signature(fn, name)
        keys = [k for p in declared for k in (p.name, *p.aliases)]
        if len(set(keys)) != len(keys):
            raise ValueError(f"register_defense({name!r}): duplicate parameter names {keys}")
        for n in (name, *alias_list):
            taken_by = _ALIASES.get(n, n if n in _REGISTRY else None)
            if taken_by is not None and not (overwrite and taken_by == name):
                raise ValueError(
                    f"defence {n!r} is already registered"
                    + (" (pass overwrite=True to replace it)" if taken_by == name else "")
                )
        is_random = _accepts_generator(fn)
        real_fn = real if real is not None else _default_real(fn, is_random)
        if is_random != _accepts_generator(real_fn):
            raise ValueError(
                f"register_defense({name!r}): both forms must take `generator`, or neither"
            )
        if name in _REGISTRY:  # overwrite: drop the old definition and its aliases
            unregister_defense(name)
        text = doc if doc is not None else (inspect.getdoc(fn) or "").split("\n", 1)[0]
        _REGISTRY[name] = DefenseInfo(
            name=name,
            differentiable_fn=fn,
            real_fn=real_fn,
            params=declared,
            aliases=alias_list,
            random=is_random,
            doc=text,
            check=check,
        )
        for a in alias_list:
            _ALIASES[a] = name
        return fn

    return decorator


def unregister_defense(name: str) -> None:
    """Remove a registered defence and its aliases (mainly for tests); ValueError if unknown."""
    info = get_defense_info(name)
    del _REGISTRY[info.name]
    for a in info.aliases:
        _ALIASES.pop(a, None)


def list_defenses() -> list[str]:
    """Canonical names of all registered defences, sorted."""
    return sorted(_REGISTRY)


def _valid_names() -> str:
    aliases = ", ".join(f"{a}->{n}" for a, n in sorted(_ALIASES.items()))
    return f"valid names: {', '.join(list_defenses())} (aliases: {aliases})"


def get_defense_info(name: str) -> DefenseInfo:
    """The registry entry for ``name`` (or an alias); ValueError listing valid names if unknown."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        raise ValueError(f"unknown defence {name!r}; {_valid_names()}")
    return _REGISTRY[key]


def describe_defenses() -> str:
    """Multi-line description of every registered defence and its parameters."""
    return "\n".join(_REGISTRY[n].describe() for n in list_defenses())


def parse_spec(spec: str) -> tuple[str, dict[str, ParamValue]]:
    """Parse a spec string into a canonical name and a complete, validated parameter dict.

    Args:
        spec: e.g. ``"jpeg:q=10"``, ``"bits:4"``, ``"crop:0.8,pad=4"``, ``"none"``.

    Returns:
        ``(name, params)`` with aliases resolved and every declared parameter present.

    Raises:
        ValueError: naming the spec, for an unknown name (listing valid names) or a bad,
            unknown, repeated or surplus parameter (listing the valid parameters).
    """
    if not isinstance(spec, str):
        raise ValueError(f"defence spec must be a string, got {type(spec).__name__}: {spec!r}")
    text = spec.strip()
    name, sep, rest = text.partition(":")
    name = name.strip().lower()
    if not name:
        raise ValueError(f"empty defence name in spec {spec!r}; {_valid_names()}")
    key = _ALIASES.get(name, name)
    if key not in _REGISTRY:
        raise ValueError(f"unknown defence {name!r} in spec {spec!r}; {_valid_names()}")
    info = _REGISTRY[key]
    values: dict[str, str] = {}
    if sep:
        args = [a.strip() for a in rest.split(",")]
        if any(not a for a in args):
            raise ValueError(f"defence spec {spec!r}: empty argument; {info.valid_params()}")
        seen_keyword = False
        for i, arg in enumerate(args):
            if "=" in arg:
                k, _, v = arg.partition("=")
                k = k.strip().lower()
                p = info.param(k)
                canon = p.name if p is not None else k
                if canon in values:
                    raise ValueError(
                        f"defence spec {spec!r}: parameter {canon!r} given twice; "
                        f"{info.valid_params()}"
                    )
                values[canon] = v.strip()
                seen_keyword = True
            else:
                if seen_keyword:
                    raise ValueError(
                        f"defence spec {spec!r}: positional value {arg!r} after a keyword one; "
                        f"{info.valid_params()}"
                    )
                if i >= len(info.params):
                    raise ValueError(
                        f"defence spec {spec!r}: too many values ({len(args)}); "
                        f"{info.valid_params()}"
                    )
                values[info.params[i].name] = arg
    return info.name, info.resolve(values, spec)


# ----------------------------------------------------------------------------------------------
# Defense objects
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Defense:
    """A named, parameterised image defence with a differentiable and a real form.

    Construct with :func:`get_defense` (from a spec string) or directly as
    ``Defense("jpeg", {"q": 10})``; parameters are validated and defaults filled in, and the name
    is canonicalised. ``str(defense)`` is the canonical spec; ``get_defense(str(d)) == d``.
    Instances are immutable, hashable, comparable and picklable (by spec; a user defence must be
    registered in the unpickling process too).

    Attributes:
        name: canonical registered name.
        params: read-only mapping of every parameter to its typed value.
    """

    name: str
    params: Mapping[str, ParamValue] = field(default_factory=dict)

    def __post_init__(self) -> None:
        info = get_defense_info(self.name)
        spec = f"{self.name}:" + ",".join(f"{k}={v}" for k, v in dict(self.params).items())
        resolved = info.resolve(dict(self.params), spec)
        object.__setattr__(self, "name", info.name)
        object.__setattr__(self, "params", MappingProxyType(resolved))

    @property
    def info(self) -> DefenseInfo:
        """The registry entry."""
        return get_defense_info(self.name)

    @property
    def spec(self) -> str:
        """Canonical spec string, e.g. ``"jpeg:q=10"`` (every parameter written out)."""
        if not self.params:
            return self.name
        return self.name + ":" + ",".join(f"{k}={_fmt(v)}" for k, v in self.params.items())

    @property
    def is_identity(self) -> bool:
        """Whether this is the no-op defence."""
        return self.name == "identity"

    @property
    def is_random(self) -> bool:
        """Whether the defence draws random numbers (accepts a generator)."""
        return self.info.random

    def _call(self, fn: DefenseFn, x: torch.Tensor, generator: torch.Generator | None):
        if self.info.random:
            return fn(x, generator=generator, **self.params)
        return fn(x, **self.params)

    def differentiable(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Training form: apply the simulated defence, keeping gradients w.r.t. ``x``.

        Args:
            x: (B, C, H, W) float in [0, 1].
            generator: RNG for random defences (ignored by deterministic ones).

        Returns:
            (B, C, H, W) float in [0, 1], same device and dtype.
        """
        return self._call(self.info.differentiable_fn, x, generator)

    def real(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Evaluation form: the real operation on the 8-bit image, stored as 8-bit.

        Args:
            x: (B, C, H, W) float in [0, 1] (rounded to 8 bit first).
            generator: RNG for random defences (ignored by deterministic ones); the same seed
                gives the same random choices as :meth:`differentiable`.

        Returns:
            (B, C, H, W) float in [0, 1] on the 8-bit grid ``k / 255``; no gradient.
        """
        with torch.no_grad():
            return self._call(self.info.real_fn, x, generator)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Same as :meth:`differentiable`."""
        return self.differentiable(x, generator)

    def __str__(self) -> str:
        return self.spec

    def __repr__(self) -> str:
        return f"Defense({self.spec!r})"

    def __hash__(self) -> int:
        return hash(self.spec)

    def __reduce__(self):
        return (get_defense, (self.spec,))


def get_defense(spec: str | Defense) -> Defense:
    """Build a :class:`Defense` from a spec string (a Defense is returned unchanged).

    Args:
        spec: e.g. ``"jpeg:q=10"``; see the module docstring for the grammar.

    Returns:
        The validated Defense.

    Raises:
        ValueError: for an unknown name or a bad parameter (the message names the spec and
            lists the valid names or parameters).
    """
    if isinstance(spec, Defense):
        return spec
    name, params = parse_spec(spec)
    return Defense(name, params)


# ----------------------------------------------------------------------------------------------
# Curriculum
# ----------------------------------------------------------------------------------------------


class DefenseCurriculum:
    """Per-batch sampler of training defences whose choice widens as training progresses.

    Identity is always available. At training progress ``p`` in [0, 1], the first
    ``ceil(min(p / full_at, 1) * N)`` of the ``N`` non-identity defences (in the given order) are
    available too, so training starts with identity only and ends with all of them; each call to
    :meth:`sample` picks one available defence uniformly.

    Args:
        specs: defence specs or Defense objects, easiest first. Identity entries are dropped
            (identity is always included); duplicates are kept (they weight the sampling).
        full_at: progress at which every defence is available, in (0, 1].
        parse: turns one entry of ``specs`` into a defence object (default
            :func:`get_defense`); a caller whose curriculum holds other kinds of defences
            (the protector's label-using ones) passes its own. The objects need ``str`` and
            an ``is_identity`` attribute.

    Example:
        >>> cur = DefenseCurriculum(["jpeg:q=90", "blur:sigma=1", "jpeg:q=50"])
        >>> [str(d) for d in cur.available(0.0)]
        ['identity']
        >>> [str(d) for d in cur.available(0.5)]
        ['identity', 'jpeg:q=90', 'blur:sigma=1,k=0']
    """

    def __init__(
        self,
        specs: Iterable[str | Defense],
        full_at: float = 1.0,
        parse: Callable[[Any], Any] = get_defense,
    ) -> None:
        if not 0 < full_at <= 1:
            raise ValueError(f"full_at must be in (0, 1], got {full_at}")
        self.identity = get_defense("identity")
        self.defenses: list[Any] = [d for d in (parse(s) for s in specs) if not d.is_identity]
        self.full_at = float(full_at)

    def __len__(self) -> int:
        return len(self.defenses) + 1

    def __repr__(self) -> str:
        specs = [str(d) for d in self.defenses]
        return f"DefenseCurriculum({specs}, full_at={self.full_at})"

    def num_available(self, progress: float) -> int:
        """How many non-identity defences are available at ``progress`` (clamped to [0, 1])."""
        if not math.isfinite(progress):
            raise ValueError(f"progress must be finite, got {progress}")
        p = min(max(progress, 0.0) / self.full_at, 1.0)
        # The small slack keeps 0.3 * 10 = 3.0000000000000004 from rounding up to 4.
        return min(len(self.defenses), math.ceil(p * len(self.defenses) - 1e-9))

    def available(self, progress: float) -> list[Defense]:
        """Identity followed by the defences available at ``progress``."""
        return [self.identity, *self.defenses[: self.num_available(progress)]]

    def sample(
        self,
        progress: float,
        generator: torch.Generator | random.Random | None = None,
    ) -> Defense:
        """Pick one available defence uniformly at random.

        Args:
            progress: training progress in [0, 1] (e.g. ``step / total_steps``).
            generator: ``torch.Generator`` or ``random.Random`` for reproducibility; None uses
                torch's global RNG (seeded by ``torch.manual_seed`` / Lightning's seed_everything).

        Returns:
            The chosen defence (a Defense, or what the curriculum's ``parse`` made).
        """
        choices = self.available(progress)
        n = len(choices)
        if isinstance(generator, random.Random):
            i = generator.randrange(n)
        elif generator is None or isinstance(generator, torch.Generator):
            device = generator.device if generator is not None else "cpu"
            i = int(torch.randint(n, (1,), generator=generator, device=device))
        else:
            raise TypeError(
                f"generator must be torch.Generator or random.Random, got {generator!r}"
            )
        return choices[i]


# ----------------------------------------------------------------------------------------------
# Built-in defences
# ----------------------------------------------------------------------------------------------


def _zero_or_odd(value: ParamValue) -> None:
    if value != 0 and value % 2 == 0:
        raise ValueError(f"value {value} must be 0 (automatic) or odd")


def _register_builtins() -> None:
    register_defense(
        "identity",
        params=(),
        real=lambda x: ops.identity_real(x),
        aliases=("none", "clean"),
        doc="no defence (real form: 8-bit storage only)",
    )(lambda x: ops.identity(x))

    register_defense(
        "jpeg",
        params=(Param("q", int, 75, low=1, high=100, aliases=("quality",), doc="JPEG quality"),),
        real=lambda x, *, q: ops.jpeg_real(x, q),
        aliases=("jpg",),
        doc="JPEG compression (differentiable: kornia codec; real: Pillow libjpeg)",
    )(lambda x, *, q: ops.jpeg_differentiable(x, q))

    register_defense(
        "jpeg_ste",
        params=(Param("q", int, 75, low=1, high=100, aliases=("quality",), doc="JPEG quality"),),
        real=lambda x, *, q: ops.jpeg_real(x, q),
        doc="JPEG with a libjpeg-faithful forward pass and straight-through gradients",
    )(lambda x, *, q: ops.jpeg_ste(x, q))

    def _quality_range(params: Mapping[str, ParamValue]) -> None:
        if params["qmin"] > params["qmax"]:
            raise ValueError(f"qmin {params['qmin']} must not exceed qmax {params['qmax']}")

    register_defense(
        "jpeg_random",
        params=(
            Param("qmin", int, 10, low=1, high=100, doc="lowest JPEG quality drawn"),
            Param("qmax", int, 95, low=1, high=100, doc="highest JPEG quality drawn"),
        ),
        real=lambda x, *, qmin, qmax, generator=None: ops.jpeg_random_real(
            x, qmin, qmax, generator
        ),
        aliases=("jpeg_rand",),
        check=_quality_range,
        doc="JPEG at a quality drawn uniformly from qmin..qmax per batch "
        "(differentiable: jpeg_ste's straight-through codec; real: Pillow libjpeg)",
    )(lambda x, *, qmin, qmax, generator=None: ops.jpeg_ste_random(x, qmin, qmax, generator))

    register_defense(
        "gray",
        params=(),
        real=lambda x: ops.grayscale_real(x),
        aliases=("grey", "grayscale", "greyscale"),
        doc="grayscale: BT.601 luma replicated to every channel",
    )(lambda x: ops.grayscale_differentiable(x))

    register_defense(
        "median",
        params=(
            Param(
                "k",
                int,
                3,
                low=1,
                high=31,
                odd=True,
                aliases=("size", "kernel_size"),
                doc="window side",
            ),
        ),
        real=lambda x, *, k: ops.median_filter_real(x, k),
        doc="median filter, k x k window, reflect border",
    )(lambda x, *, k: ops.median_filter(x, k))

    register_defense(
        "blur",
        params=(
            Param(
                "sigma",
                float,
                1.0,
                low=0.0,
                low_inclusive=False,
                high=20.0,
                aliases=("s", "std"),
                doc="Gaussian standard deviation in pixels",
            ),
            Param(
                "k",
                int,
                0,
                low=0,
                high=63,
                aliases=("kernel_size", "size"),
                validator=_zero_or_odd,
                doc="odd kernel side, 0 = 2*ceil(3*sigma)+1",
            ),
        ),
        real=lambda x, *, sigma, k: ops.gaussian_blur_real(x, sigma, k),
        aliases=("gaussian_blur",),
        doc="Gaussian blur, reflect border",
    )(lambda x, *, sigma, k: ops.gaussian_blur(x, sigma, k))

    register_defense(
        "noise",
        params=(
            Param(
                "std",
                float,
                4.0 / 255.0,
                low=0.0,
                high=1.0,
                aliases=("sigma", "s"),
                doc="noise std in [0, 1] units",
            ),
        ),
        real=lambda x, *, std, generator=None: ops.gaussian_noise_real(x, std, generator),
        aliases=("gaussian_noise",),
        doc="additive Gaussian noise, clamped to [0, 1]",
    )(lambda x, *, std, generator=None: ops.gaussian_noise(x, std, generator))

    register_defense(
        "bits",
        params=(Param("bits", int, 4, low=1, high=8, aliases=("b", "depth"), doc="bits/channel"),),
        real=lambda x, *, bits: ops.bits_real(x, bits),
        aliases=("bit_depth", "quantize"),
        doc="bit-depth reduction (feature squeezing), straight-through rounding",
    )(lambda x, *, bits: ops.bits_differentiable(x, bits))

    register_defense(
        "resize",
        params=(
            Param(
                "factor",
                float,
                0.5,
                low=0.0,
                low_inclusive=False,
                high=1.0,
                aliases=("f", "scale"),
                doc="down-scaling factor",
            ),
        ),
        real=lambda x, *, factor: ops.resize_real(x, factor),
        aliases=("rescale",),
        doc="bilinear down-scale (antialiased) and up-scale back",
    )(lambda x, *, factor: ops.resize_differentiable(x, factor))

    register_defense(
        "crop",
        params=(
            Param(
                "scale",
                float,
                0.8,
                low=0.0,
                low_inclusive=False,
                high=1.0,
                doc="smallest kept area fraction (1 = no resized crop)",
            ),
            Param("pad", int, 0, low=0, high=64, doc="pad-and-crop shift range (0 = off)"),
        ),
        real=lambda x, *, scale, pad, generator=None: ops.crop_real(x, scale, pad, generator),
        doc="random crop: pad-and-crop shift, then resized crop back to H x W",
    )(lambda x, *, scale, pad, generator=None: ops.crop_differentiable(x, scale, pad, generator))

    register_defense(
        "flip",
        params=(Param("p", float, 0.5, low=0.0, high=1.0, doc="flip probability per image"),),
        real=lambda x, *, p, generator=None: ops.flip_real(x, p, generator),
        aliases=("hflip",),
        doc="random horizontal flip",
    )(lambda x, *, p, generator=None: ops.flip_differentiable(x, p, generator))


_register_builtins()
