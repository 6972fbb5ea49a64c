"""Test helpers for the wire: hypothesis strategies built from the schema's annotations, and an
equality that compares tensors bit for bit (so NaN payloads and -0.0 count)."""

from __future__ import annotations

import types
import typing
from typing import Any

import msgspec
import torch
from hypothesis import strategies as st

from transport.codec import DTYPES

MAX_SIZE = 4  # list / dict / tensor-dimension sizes: enough structure, small examples


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The tensor's raw bytes in logical (row-major) order, for any dtype."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@st.composite
def tensors(draw: st.DrawFn, dtypes: list[torch.dtype] | None = None) -> torch.Tensor:
    """Any wire dtype, 0-d to 3-d, empty dims allowed, arbitrary bit patterns (NaNs, bools
    that are neither 0 nor 1 excluded: torch normalises those), sometimes non-contiguous."""
    dtype = draw(st.sampled_from(dtypes or list(DTYPES.values())))
    shape = draw(st.lists(st.integers(0, MAX_SIZE), max_size=3))
    numel = 1
    for d in shape:
        numel *= d
    itemsize = torch.empty((), dtype=dtype).element_size()
    if dtype is torch.bool:
        raw = bytes(draw(st.lists(st.integers(0, 1), min_size=numel, max_size=numel)))
    else:
        raw = draw(st.binary(min_size=numel * itemsize, max_size=numel * itemsize))
    t = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape) if numel else \
        torch.empty(shape, dtype=dtype)
    if t.dim() >= 2 and draw(st.booleans()):
        t = t.transpose(0, 1)  # a non-contiguous view: the codec must send its logical order
    return t


def strategy_for(annotation: Any) -> st.SearchStrategy[Any]:
    """A strategy for a schema annotation; raises TypeError for one it does not know, so a new
    wire type with a new kind of field fails the tests until this learns it."""
    if annotation is torch.Tensor:
        return tensors()
    if isinstance(annotation, type) and issubclass(annotation, msgspec.Struct):
        return struct_strategy(annotation)
    if annotation is bool:
        return st.booleans()
    if annotation is int:
        return st.integers(-(2**63), 2**64 - 1)  # what msgpack carries
    if annotation is float:
        return st.floats(allow_nan=False)
    if annotation is str:
        return st.text(max_size=20)
    if annotation is bytes:
        return st.binary(max_size=64)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is list:
        return st.lists(strategy_for(args[0]), max_size=MAX_SIZE)
    if origin is dict:
        return st.dictionaries(strategy_for(args[0]), strategy_for(args[1]), max_size=MAX_SIZE)
    if origin in (typing.Union, types.UnionType):
        return st.one_of([strategy_for(a) for a in args])
    raise TypeError(f"no strategy for the wire annotation {annotation!r}")


def struct_strategy(cls: type[msgspec.Struct]) -> st.SearchStrategy[msgspec.Struct]:
    fields = {f.name: strategy_for(f.type) for f in msgspec.structs.fields(cls)}
    return st.builds(cls, **fields)


def assert_wire_equal(got: Any, want: Any, path: str = "$") -> None:
    """Structural equality with tensors compared by dtype, shape and raw bytes."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), f"{path}: {type(got).__name__} is not a tensor"
        assert got.dtype == want.dtype, f"{path}: dtype {got.dtype} != {want.dtype}"
        assert got.shape == want.shape, f"{path}: shape {tuple(got.shape)} != {tuple(want.shape)}"
        assert tensor_bytes(got) == tensor_bytes(want), f"{path}: tensor bytes differ"
        # equal_nan: the byte comparison above already pins NaN payloads down.
        assert torch.equal(got, want) or got.dtype.is_floating_point, f"{path}: torch.equal is False"
        return
    assert type(got) is type(want), f"{path}: {type(got).__name__} != {type(want).__name__}"
    if isinstance(want, msgspec.Struct):
        for f in msgspec.structs.fields(want):
            assert_wire_equal(getattr(got, f.name), getattr(want, f.name), f"{path}.{f.name}")
    elif isinstance(want, list):
        assert len(got) == len(want), f"{path}: length {len(got)} != {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_wire_equal(g, w, f"{path}[{i}]")
    elif isinstance(want, dict):
        assert got.keys() == want.keys(), f"{path}: keys differ"
        for k in want:
            assert_wire_equal(got[k], want[k], f"{path}[{k!r}]")
    else:
        assert got == want, f"{path}: {got!r} != {want!r}"
