"""Inputs for verification, generated from a model's signature or supplied by the user.

What each input gets, in order of precedence:

1. A supplied array (``inputs=`` a dict or a ``.npz`` path): used as is for every seed. A supplied float
   array is cast to the input's float dtype and an integer array to the input's integer dtype when the
   values fit; anything else is refused.
2. Otherwise a seeded random tensor, independent per (seed, input name), so adding an input never changes
   the data the others get:

   * floats: standard normal N(0, 1), or uniform ``[lo, hi)`` when ``input_ranges`` names the input.
     Not uniform ``[0, 1)`` (onnxsim's choice): all-positive inputs make every channel's response
     dominated by the sum of its weights, never exercise the negative side of ReLU/abs/sign, and let
     per-channel scale and bias mistakes cancel. Zero-mean, unit-variance data is also what a network
     with BatchNormalization expects to see after its first normalisation.
   * integers: uniform in ``[0, 8)`` (small enough to be a valid index, axis or embedding id in most
     models), or ``[lo, hi)`` from ``input_ranges``. Bound inputs that index something with it.
   * bool: fair coin.

Shapes: a fixed dim is kept. A dynamic dim (symbolic ``dim_param`` or unknown) is resolved from, in
order: ``shapes[input_name]`` (a full shape), the shape of a supplied array, ``shapes[symbol]`` (one int
for every input using that symbol), the value the same symbol already got in this model, and finally a
default: 1 for the first dim (batch), 16 for any other (sequence length, height, width). The same symbol
always gets the same value across inputs. A dim is dynamic when it is a ``dim_param``, has no value, or has
a ``dim_value`` of 0 or below (paddle2onnx writes -1). :func:`bnfold.check.sizes.choose_plan` replaces
the defaults by sizes the original model runs at (what the model states, then a ladder of tries) before a
check uses them.
"""

from __future__ import annotations

import logging
import math
import os
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike

from bnfold.check.inputs import Dim, InputInfo, InputSpec, model_inputs
from bnfold.errors import BadInputError
from bnfold.io.dtypes import is_float

__all__ = [
    "DEFAULT_BATCH",
    "DEFAULT_DIM",
    "DEFAULT_INT_RANGE",
    "FeedPlan",
    "InputInfo",
    "InputSpec",
    "load_npz",
    "model_inputs",
    "plan_feeds",
]

logger = logging.getLogger(__name__)

DEFAULT_BATCH = 1
"""Value of a dynamic first (batch) dim when nothing else fixes it."""
DEFAULT_DIM = 16
"""Value of any other dynamic dim when nothing else fixes it."""
DEFAULT_INT_RANGE: tuple[int, int] = (0, 8)
"""Half-open range of generated integer inputs unless ``input_ranges`` says otherwise."""

InputsArg = str | os.PathLike[str] | Mapping[str, ArrayLike] | None


def load_npz(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Arrays of a ``.npz`` file by name (no pickles)."""
    try:
        with np.load(Path(path), allow_pickle=False) as data:
            if not hasattr(data, "files"):
                raise BadInputError(f"{path}: not an .npz archive (save inputs with numpy.savez)")
            return {name: np.asarray(data[name]) for name in data.files}
    except BadInputError:
        raise
    except (OSError, ValueError) as exc:
        raise BadInputError(f"cannot read inputs from {path}: {exc}") from None


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(name.encode())]))


@dataclass(frozen=True)
class FeedPlan:
    """Everything needed to build the feeds for any seed; built once by :func:`plan_feeds`."""

    specs: tuple[InputSpec, ...]
    shapes: Mapping[str, tuple[int, ...]]
    defaulted: Mapping[str, tuple[int, ...]]
    ranges: Mapping[str, tuple[float, float]]
    given: Mapping[str, np.ndarray]
    notes: tuple[str, ...] = field(default=())
    shape_sources: Mapping[str, str] = field(default_factory=dict)
    """Input name -> where its dynamic dims came from (set by :mod:`bnfold.check.sizes`)."""

    @property
    def all_given(self) -> bool:
        return all(s.name in self.given for s in self.specs)

    def feeds(self, seed: int | None) -> dict[str, np.ndarray]:
        """The feed dict for one seed (None only when every input was supplied)."""
        out: dict[str, np.ndarray] = {}
        for spec in self.specs:
            if spec.name in self.given:
                out[spec.name] = self.given[spec.name]
                continue
            if seed is None:
                raise ValueError(f"input {spec.name!r} is generated and needs a seed")
            out[spec.name] = self._generate(spec, seed)
        return out

    def _generate(self, spec: InputSpec, seed: int) -> np.ndarray:
        rng = _rng(seed, spec.name)
        shape = self.shapes[spec.name]
        dtype = spec.dtype
        # np.asarray throughout: a 0-d draw is a numpy scalar (numpy.bool etc.), which onnxruntime refuses
        if dtype == np.bool_:
            return np.asarray(rng.random(shape) < 0.5)
        if dtype.kind == "O":  # STRING: short words, some repeated, so lookups both hit and miss
            words = np.array([f"w{i}" for i in range(8)], dtype=object)
            return np.asarray(words[rng.integers(0, len(words), size=shape)], dtype=object)
        if is_float(dtype):
            if spec.name in self.ranges:
                lo, hi = self.ranges[spec.name]
                return np.asarray(rng.uniform(lo, hi, shape).astype(dtype))
            return np.asarray(rng.standard_normal(shape).astype(dtype))
        lo, hi = self.ranges.get(spec.name, DEFAULT_INT_RANGE)
        return np.asarray(rng.integers(int(lo), int(hi), size=shape, dtype=dtype))

    def source(self, spec: InputSpec) -> str:
        if spec.name in self.given:
            return "supplied"
        if spec.dtype == np.bool_:
            return "bool"
        if spec.dtype.kind == "O":
            return "strings w0..w7"
        if is_float(spec.dtype):
            if spec.name in self.ranges:
                lo, hi = self.ranges[spec.name]
                return f"uniform[{lo:g}, {hi:g})"
            return "normal(0, 1)"
        lo, hi = self.ranges.get(spec.name, DEFAULT_INT_RANGE)
        return f"integers[{int(lo)}, {int(hi)})"

    def info(self) -> tuple[InputInfo, ...]:
        return tuple(
            InputInfo(s.name, s.dtype_name, self.shapes[s.name], self.source(s), self.defaulted.get(s.name, ()),
                      self.shape_sources.get(s.name, ""))
            for s in self.specs
        )

    def describe(self) -> str:
        """``x[1,3,16,16] float32 (dims 2,3 defaulted), ids[1,16] int64`` for error messages."""
        parts = []
        for s in self.specs:
            text = f"{s.name}[{','.join(map(str, self.shapes[s.name]))}] {s.dtype_name}"
            if self.defaulted.get(s.name):
                text += f" (dims {','.join(map(str, self.defaulted[s.name]))} defaulted)"
            parts.append(text)
        return ", ".join(parts)


def _supported(spec: InputSpec) -> None:
    dtype = spec.dtype
    if dtype.kind in "SUc" or dtype.name in ("int4", "uint4", "int2", "uint2"):
        raise BadInputError(
            f"input {spec.name!r} has dtype {spec.dtype_name}, which cannot be generated; supply it with --inputs"
        )


def _coerce(spec: InputSpec, value: object, notes: list[str]) -> np.ndarray:
    arr = np.asarray(value)
    want = spec.dtype
    if arr.dtype == want:
        return arr
    if want.kind == "O" and arr.dtype.kind in "US":  # STRING input: numpy saves str arrays as <U, not object
        return np.asarray(arr.astype(str), dtype=object)
    ok = (is_float(want) and (is_float(arr.dtype) or arr.dtype.kind in "iub")) or (
        want.kind in "iu" and arr.dtype.kind in "iub"
    )
    if want.kind in "iu" and ok and arr.size:
        info = np.iinfo(want)
        ok = bool(arr.min() >= info.min and arr.max() <= info.max)
    if not ok:
        raise BadInputError(f"supplied input {spec.name!r} is {arr.dtype.name} but the model takes {spec.dtype_name}")
    notes.append(f"supplied input {spec.name!r} cast from {arr.dtype.name} to {spec.dtype_name}")
    return arr.astype(want)


def _check_shape(spec: InputSpec, shape: tuple[int, ...], what: str) -> None:
    if spec.dims is None:
        return
    if len(shape) != len(spec.dims):
        raise BadInputError(
            f"{what} for input {spec.name!r} has rank {len(shape)} but the model declares rank "
            f"{len(spec.dims)} ({_fmt_dims(spec.dims)})"
        )
    for i, (have, want) in enumerate(zip(shape, spec.dims, strict=True)):
        if isinstance(want, int) and have != want:
            raise BadInputError(
                f"{what} for input {spec.name!r} has {have} at dim {i} where the model fixes {want} "
                f"({_fmt_dims(spec.dims)})"
            )


MAX_GENERATED_BYTES = 1 << 31
"""Largest input generated for verification (2 GiB): a declared shape beyond it is refused, with a hint,
before anything is allocated."""


def _check_generated_size(spec: InputSpec, shape: tuple[int, ...]) -> None:
    """Refuse a negative dim, or a generated input over :data:`MAX_GENERATED_BYTES`, before allocating it."""
    for i, d in enumerate(shape):
        if d < 0:
            raise BadInputError(f"input {spec.name!r} has dim {d} at position {i}, which no tensor can have; "
                                f"pass a shape with --shape {spec.name}=DIMS")
    nbytes = math.prod(shape) * np.dtype(spec.dtype).itemsize
    if nbytes > MAX_GENERATED_BYTES:
        raise BadInputError(f"input {spec.name!r} of shape {list(shape)} would take {nbytes:,} bytes to generate "
                            f"(at most {MAX_GENERATED_BYTES:,}); pass a smaller one with --shape {spec.name}=DIMS "
                            "or real data with --inputs FILE.npz")


def _fmt_dims(dims: Sequence[Dim]) -> str:
    return "[" + ",".join("?" if d is None else str(d) for d in dims) + "]"


def plan_feeds(
    specs: Sequence[InputSpec],
    *,
    shapes: Mapping[str, Sequence[int] | int] | None = None,
    inputs: InputsArg = None,
    input_ranges: Mapping[str, tuple[float, float]] | None = None,
) -> FeedPlan:
    """Validate the user's shapes, supplied inputs and ranges against ``specs`` and resolve every dim.

    Raises BadInputError (one line, naming the input) on an unknown name, a rank or fixed-dim conflict,
    a dtype that cannot be cast, or an input whose shape cannot be known.
    """
    names = [s.name for s in specs]
    by_name = {s.name: s for s in specs}
    symbols = {d for s in specs if s.dims for d in s.dims if isinstance(d, str)}
    notes: list[str] = []
    listing = ", ".join(names) or "none"

    supplied: Mapping[str, object]
    if inputs is None:
        supplied = {}
    elif isinstance(inputs, (str, os.PathLike)):
        supplied = load_npz(inputs)
    else:
        supplied = inputs
    unknown = [k for k in supplied if k not in by_name]
    if unknown:
        raise BadInputError(f"supplied inputs {unknown} are not inputs of the model (its inputs: {listing})")
    given = {k: _coerce(by_name[k], v, notes) for k, v in supplied.items()}

    input_shapes: dict[str, tuple[int, ...]] = {}
    symbol_values: dict[str, int] = {}
    shapes = dict(shapes or {})
    if "" in shapes:  # a bare shape: the model's only input
        if len(specs) != 1:
            raise BadInputError(f"a --shape without NAME= needs a model with one input; this one has: {listing}")
        shapes[specs[0].name] = shapes.pop("")
    for key, value in shapes.items():
        given_dims = (value,) if isinstance(value, int) else tuple(int(v) for v in value)
        if key in by_name:
            _check_shape(by_name[key], given_dims, "--shape")
            input_shapes[key] = given_dims
        elif key in symbols:
            if len(given_dims) != 1:
                raise BadInputError(f"--shape {key}=N names a symbolic dim and takes one integer, got {given_dims}")
            symbol_values[key] = given_dims[0]
        else:
            sym = f"; symbolic dims: {', '.join(sorted(symbols))}" if symbols else ""
            raise BadInputError(f"--shape names {key!r}, which is not an input of the model (inputs: {listing}{sym})")

    for name, arr in given.items():
        spec = by_name[name]
        _check_shape(spec, arr.shape, "the supplied array")
        if name in input_shapes and input_shapes[name] != arr.shape:
            raise BadInputError(f"--shape {name} conflicts with the supplied array's shape {list(arr.shape)}")
        input_shapes[name] = tuple(arr.shape)

    # Bind symbols from shapes that are already known, so every input using a symbol agrees.
    for name, shape in input_shapes.items():
        dims_decl = by_name[name].dims or ()
        for d, v in zip(dims_decl, shape, strict=False):
            if isinstance(d, str):
                symbol_values.setdefault(d, v)

    for lo_hi_name, (lo, hi) in (input_ranges or {}).items():
        if lo_hi_name not in by_name:
            raise BadInputError(f"--input-range names {lo_hi_name!r}, which is not an input (inputs: {listing})")
        spec = by_name[lo_hi_name]
        if spec.dtype == np.bool_:
            raise BadInputError(f"--input-range does not apply to bool input {lo_hi_name!r}")
        if not lo < hi:
            raise BadInputError(f"--input-range {lo_hi_name}: LO must be below HI, got {lo}, {hi}")
        if spec.dtype.kind in "iu":
            info = np.iinfo(spec.dtype)
            if lo != int(lo) or hi != int(hi) or lo < info.min or hi - 1 > info.max:
                raise BadInputError(
                    f"--input-range {lo_hi_name}: [{lo}, {hi}) must be integers within {spec.dtype_name}"
                )

    resolved: dict[str, tuple[int, ...]] = {}
    defaulted: dict[str, tuple[int, ...]] = {}
    guessed_symbols: set[str] = set()
    for spec in specs:
        if spec.name in input_shapes:
            resolved[spec.name] = input_shapes[spec.name]
            continue
        _supported(spec)
        if spec.dims is None:
            raise BadInputError(
                f"input {spec.name!r} has no shape in the model; pass one with --shape {spec.name}=DIMS"
            )
        dims: list[int] = []
        guessed: list[int] = []
        for i, d in enumerate(spec.dims):
            if isinstance(d, int):
                dims.append(d)
                continue
            if isinstance(d, str) and d in symbol_values:
                dims.append(symbol_values[d])
                if d in guessed_symbols:
                    guessed.append(i)
                continue
            value = DEFAULT_BATCH if i == 0 else DEFAULT_DIM
            if isinstance(d, str):
                symbol_values[d] = value
                guessed_symbols.add(d)
            dims.append(value)
            guessed.append(i)
        resolved[spec.name] = tuple(dims)
        if guessed:
            defaulted[spec.name] = tuple(guessed)
    for spec in specs:
        if spec.name not in given:
            _check_generated_size(spec, resolved[spec.name])
    if defaulted:
        logger.info("dynamic dims defaulted: %s", defaulted)
    return FeedPlan(
        specs=tuple(specs),
        shapes=resolved,
        defaulted=defaulted,
        ranges=dict(input_ranges or {}),
        given=given,
        notes=tuple(notes),
    )
