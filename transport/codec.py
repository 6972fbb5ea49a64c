"""Frames <-> messages: msgpack header plus one zero-copy frame per tensor.

A message becomes `[header, tensor_0, tensor_1, ...]`. Every `torch.Tensor` field is encoded in
the header as `[dtype, shape, frame_index]` and its bytes travel as their own frame, taken from
the tensor's memory without a copy (ZeroMQ sends the buffer as is). On receive, tensors are
`torch.frombuffer` views over the received frames, again without a copy. Nothing is pickled.

Anything that does not decode cleanly (bad msgpack, unknown tag, a tensor whose frame is
missing or whose length disagrees with dtype x shape, an unknown dtype) raises `DecodeError`,
which channels count and drop; its `reason` (empty, malformed, unknown_type, invalid,
tensor_header, tensor_frame, tensor_size, dtype) labels the metric.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import msgspec
import torch

from transport.schema import MESSAGE_TYPES, Message

# Wire names for the dtypes we carry; anything else is refused on both ends.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

Frame = bytes | memoryview  # what encode returns; decode also takes zmq.Frames as received


class DecodeError(Exception):
    """A received message could not be decoded; `reason` is a short label for metrics."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def tensor_frame(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes as a flat memoryview, without a copy when it is contiguous on CPU."""
    # Each torch call here costs about a microsecond, so the common case (a contiguous CPU
    # tensor without grad) takes the fewest.
    t = tensor.detach() if tensor.requires_grad else tensor
    if not t.is_cpu:
        t = t.cpu()
    t = t.contiguous().view(-1)
    if t.numel() == 0:
        return memoryview(b"")
    # Viewing as uint8 handles every dtype, bfloat16 included, which numpy cannot represent.
    return memoryview(t.view(torch.uint8).numpy())


def tensor_from_frame(buffer: Frame, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
    """A tensor viewing `buffer` (no copy); raises DecodeError when the sizes disagree."""
    numel = math.prod(shape)
    expected = numel * dtype.itemsize
    if len(buffer) != expected:
        raise DecodeError(
            "tensor_size", f"frame has {len(buffer)} bytes, {DTYPE_NAMES[dtype]}{list(shape)} needs {expected}"
        )
    try:
        if numel == 0:
            return torch.empty(tuple(shape), dtype=dtype)
        if isinstance(buffer, memoryview) and not buffer.readonly:  # zmq frames: the hot path
            return torch.frombuffer(buffer, dtype=dtype).view(tuple(shape))
        with warnings.catch_warnings():
            # torch warns about read-only buffers (bytes); such tensors are read-only views.
            warnings.simplefilter("ignore", UserWarning)
            return torch.frombuffer(buffer, dtype=dtype).view(tuple(shape))
    except RuntimeError as exc:  # e.g. an empty shape whose strides overflow: [0, 2**62, 2**62]
        raise DecodeError("tensor_header", f"{DTYPE_NAMES[dtype]}{list(shape)}: {exc}") from None


_KNOWN_TAGS = frozenset(t.__struct_config__.tag for t in MESSAGE_TYPES)


def _invalid_reason(header: Frame) -> str:
    """"unknown_type" when the header names no type we know (a newer peer, or garbage), else
    "invalid"; only runs on the error path, so decoding the header twice costs nothing."""
    try:
        tag = msgspec.msgpack.decode(header)[0]
    except Exception:
        return "invalid"
    # A mutated header can carry any msgpack value as its tag, a list (unhashable) too.
    return "invalid" if isinstance(tag, str) and tag in _KNOWN_TAGS else "unknown_type"


class Codec:
    """Encodes and decodes the `Message` union. One instance per channel; not thread-safe."""

    def __init__(self, message_type: Any = Message) -> None:
        self._encoder = msgspec.msgpack.Encoder(enc_hook=self._enc_hook)
        self._decoder = msgspec.msgpack.Decoder(message_type, dec_hook=self._dec_hook)
        self._out_frames: list[memoryview] = []
        self._in_frames: Sequence[Frame] = ()

    def encode(self, msg: msgspec.Struct) -> list[Frame]:
        self._out_frames = []
        try:
            header = self._encoder.encode(msg)
            return [header, *self._out_frames]
        finally:
            self._out_frames = []

    def decode(self, frames: Sequence[Frame]) -> Any:
        if not frames or len(frames[0]) == 0:
            raise DecodeError("empty", "no frames" if not frames else "empty header frame")
        self._in_frames = frames
        try:
            msg = self._decoder.decode(frames[0])
        except DecodeError:
            raise
        except msgspec.ValidationError as exc:
            # dec_hook errors arrive wrapped; keep our own reason label when there is one.
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, DecodeError):
                raise DecodeError(cause.reason, str(exc)) from None
            raise DecodeError(_invalid_reason(frames[0]), str(exc)) from None
        except msgspec.DecodeError as exc:
            raise DecodeError("malformed", str(exc)) from None
        except Exception as exc:  # whatever a peer sends, the receive loop must survive it
            raise DecodeError("invalid", repr(exc)[:200]) from None
        finally:
            self._in_frames = ()
        return msg

    def _enc_hook(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            name = DTYPE_NAMES.get(obj.dtype)
            if name is None:
                raise TypeError(f"tensor dtype {obj.dtype} is not supported on the wire")
            self._out_frames.append(tensor_frame(obj))
            return (name, list(obj.shape), len(self._out_frames))
        raise TypeError(f"cannot encode {type(obj).__name__}")

    def _dec_hook(self, expected: type, obj: Any) -> Any:
        if expected is torch.Tensor:
            try:
                dtype_name, shape, index = obj
                if not all(type(d) is int for d in shape):  # int() would accept 2.7, "3", True
                    raise TypeError
            except (TypeError, ValueError):
                raise DecodeError("tensor_header", f"bad tensor reference {obj!r}"[:200]) from None
            dtype = DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
            if dtype is None:
                raise DecodeError("dtype", f"unsupported dtype {dtype_name!r}")
            if any(d < 0 for d in shape):
                raise DecodeError("tensor_header", f"negative shape {shape}")
            if type(index) is not int or not 1 <= index < len(self._in_frames):
                raise DecodeError("tensor_frame", f"tensor frame {index} missing ({len(self._in_frames)} frames)")
            buffer = self._in_frames[index]
            if not isinstance(buffer, (bytes, memoryview)):
                buffer = buffer.buffer  # zmq.Frame
            return tensor_from_frame(buffer, dtype, shape)
        raise NotImplementedError(f"cannot decode {expected}")
