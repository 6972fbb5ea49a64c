"""Weight broadcast over torch.distributed: one source (rank 0), many receivers.

The source announces a version with a manifest (names, dtypes, shapes) over ZeroMQ; then
every member of the group enters `broadcast`. Tensors are packed into large flat buckets, one
dtype per bucket, so a model is a handful of collectives rather than one per tensor. Receivers
unpack into staging tensors that the role swaps in at a step boundary.

Groups are formed per membership "epoch": when a receiver (re)joins, the owner bumps the
epoch and every member builds a new process group object on a fresh key prefix of the run's
rendezvous store, so a restarted process can be admitted without restarting the others. The
groups are standalone `ProcessGroupGloo` / `ProcessGroupNCCL` objects, not the default group,
so one process can be in several (a generator receives actor and drafter weights).
Every collective runs under a timeout, and a failure raises `WeightSyncError` naming the group,
epoch, version and members instead of hanging.

Backend: gloo on CPU; on CUDA, NCCL when every member has a GPU of its own. NCCL refuses two
ranks on one GPU ("Duplicate GPU detected"), which is what roles sharing a single GPU are, so
members on CUDA first exchange which physical GPU they hold (host and GPU UUID, through the
rendezvous store) and all take gloo when any two share one: gloo broadcasts CUDA tensors too,
staged through host memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from urllib.parse import urlparse

import torch
import torch.distributed as dist

from transport.codec import DTYPE_NAMES, DTYPES
from transport.schema import TensorSpec

DEFAULT_BUCKET_BYTES = 256 << 20


class WeightSyncError(RuntimeError):
    """A collective of a weight group failed or timed out; the message names who and what.
    `missing`: for a failed formation, the members that never reached its rendezvous."""

    def __init__(self, message: str, missing: list[str] | None = None) -> None:
        super().__init__(message)
        self.missing = list(missing or [])


def manifest_of(state: Mapping[str, torch.Tensor]) -> list[TensorSpec]:
    return [TensorSpec(name=name, dtype=DTYPE_NAMES[t.dtype], shape=list(t.shape)) for name, t in state.items()]


def weights_checksum(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and raw bytes, in name order: equal iff bit-identical."""
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{list(t.shape)}".encode())
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def plan_buckets(manifest: list[TensorSpec], bucket_bytes: int) -> list[list[int]]:
    """Indices of manifest entries per bucket: same dtype, at most bucket_bytes (a larger tensor
    gets a bucket of its own). Source and receivers derive the same plan from the manifest."""
    buckets: list[list[int]] = []
    open_bucket: dict[str, tuple[list[int], int]] = {}
    for i, spec in enumerate(manifest):
        size = _numel(spec.shape) * _itemsize(spec.dtype)
        members, used = open_bucket.get(spec.dtype, ([], 0))
        if members and used + size > bucket_bytes:
            buckets.append(members)
            members, used = [], 0
        members.append(i)
        open_bucket[spec.dtype] = (members, used + size)
    buckets.extend(members for members, _ in open_bucket.values() if members)
    return buckets


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _itemsize(dtype_name: str) -> int:
    return torch.empty((), dtype=DTYPES[dtype_name]).element_size()


def device_identity(device: str | torch.device) -> dict[str, str]:
    """The physical device this process's tensors live on, comparable across processes: the
    host, and for CUDA the GPU's UUID (processes with different CUDA_VISIBLE_DEVICES agree)."""
    device = torch.device(device)
    host = socket.gethostname()
    if device.type != "cuda":
        return {"host": host, "type": device.type, "id": str(os.getpid())}
    index = device.index if device.index is not None else torch.cuda.current_device()
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    gpu = str(uuid) if uuid is not None else f"{os.environ.get('CUDA_VISIBLE_DEVICES', '*')}/{index}"
    return {"host": host, "type": "cuda", "id": gpu}


def choose_backend(identities: list[dict[str, str]]) -> str:
    """NCCL when every member is on a CUDA device of its own, else gloo."""
    if not all(i["type"] == "cuda" for i in identities) or not dist.is_nccl_available():
        return "gloo"
    gpus = [(i["host"], i["id"]) for i in identities]
    return "nccl" if len(set(gpus)) == len(gpus) else "gloo"


@dataclass
class BroadcastStats:
    version: int
    num_bytes: int
    num_buckets: int
    seconds: float

    @property
    def gbytes_per_s(self) -> float:
        return self.num_bytes / max(self.seconds, 1e-9) / 1e9


class WeightGroup:
    """This process's membership in the run's weight-broadcast group (rank 0 is the source).

    All methods block; roles call them from a worker thread, never on the event loop.
    """

    def __init__(self, rendezvous: str, name: str = "weights", backend: str | None = None,
                 timeout_s: float = 60.0, device: str | torch.device = "cpu") -> None:
        self.rendezvous = parse_rendezvous(rendezvous)
        self.name = name
        self.device = torch.device(device)
        self.requested_backend = backend  # None: gloo on CPU, chosen per formation on CUDA
        self.backend = backend or "gloo"  # the current formation's
        self.timeout = timedelta(seconds=timeout_s)
        self.epoch = -1
        self.rank = -1
        self.members: list[str] = []
        self._store: dist.Store | None = None
        self._pg: dist.ProcessGroup | None = None

    def describe(self, version: int | None = None) -> str:
        who = ", ".join(f"{m} (rank {i})" for i, m in enumerate(self.members))
        v = f" version {version}" if version is not None else ""
        return f"group {self.name!r} epoch {self.epoch}{v} [{who}]"

    def form(self, epoch: int, members: list[str], me: str, namespace: str = "") -> None:
        """(Re)build the group for `epoch` with `members` (members[0] is the source); blocks until
        every member has joined or the timeout passes."""
        if me not in members:
            raise ValueError(f"{me} is not a member of {members}")
        self.leave()
        if self._store is None:
            self._store = open_rendezvous_store(self.rendezvous, self.timeout)
        self.epoch, self.members, self.rank = epoch, list(members), members.index(me)
        # `namespace` tells incarnations of the owner apart: a restarted owner counts epochs
        # from 0 again and must not meet the keys its predecessor left in the store.
        store = dist.PrefixStore(f"{self.name}/{namespace}/epoch{epoch}", self._store)
        try:
            # Each member marks its arrival first, so a failed formation can name who never came.
            store.set(f"arrived/{self.rank}", me)
            self.backend = self._agree_on_backend(store)
            if self.backend == "nccl":
                options = dist.ProcessGroupNCCL.Options()
                options._timeout = self.timeout
                self._pg = dist.ProcessGroupNCCL(store, self.rank, len(members), options)
            else:
                self._pg = dist.ProcessGroupGloo(store, self.rank, len(members), self.timeout)
        except Exception as exc:
            described = self.describe()
            self.epoch = -1
            missing = self._not_arrived(store)
            who = f" (never arrived: {', '.join(missing)})" if missing else ""
            raise WeightSyncError(f"forming {described} failed as {me}{who}: {exc}", missing=missing) from exc

    def _not_arrived(self, store: dist.Store) -> list[str]:
        try:
            return [m for rank, m in enumerate(self.members) if not store.check([f"arrived/{rank}"])]
        except Exception:  # the store itself is unreachable: nobody can be named
            return []

    def _agree_on_backend(self, store: dist.Store) -> str:
        """The backend of this formation; on CUDA every member derives the same one from the
        devices all members announced in the epoch's store."""
        if self.requested_backend is not None:
            return self.requested_backend
        if self.device.type != "cuda":
            return "gloo"
        devices = dist.PrefixStore("devices", store)
        devices.set(str(self.rank), json.dumps(device_identity(self.device)))
        return choose_backend([json.loads(devices.get(str(rank))) for rank in range(len(self.members))])

    def leave(self) -> None:
        self._pg = None
        self.epoch = -1

    @property
    def formed(self) -> bool:
        return self._pg is not None

    def broadcast(self, state: Mapping[str, torch.Tensor], version: int,
                  bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> BroadcastStats:
        """Source side: send `state` (in manifest order) to every receiver."""
        manifest = manifest_of(state)
        tensors = list(state.values())
        started = time.perf_counter()
        num_bytes = 0
        plan = plan_buckets(manifest, bucket_bytes)
        for bucket in plan:
            flat = torch.cat([tensors[i].detach().reshape(-1).to(self.device) for i in bucket])
            num_bytes += flat.numel() * flat.element_size()
            self._collective(flat, version)
        return BroadcastStats(version, num_bytes, len(plan), time.perf_counter() - started)

    def receive(self, manifest: list[TensorSpec], version: int,
                bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> tuple[dict[str, torch.Tensor], BroadcastStats]:
        """Receiver side: fresh staging tensors for `manifest`, filled from the source."""
        started = time.perf_counter()
        staged: dict[str, torch.Tensor] = {}
        num_bytes = 0
        plan = plan_buckets(manifest, bucket_bytes)
        for bucket in plan:
            dtype = DTYPES[manifest[bucket[0]].dtype]
            sizes = [_numel(manifest[i].shape) for i in bucket]
            flat = torch.empty(sum(sizes), dtype=dtype, device=self.device)
            self._collective(flat, version)
            num_bytes += flat.numel() * flat.element_size()
            for i, part in zip(bucket, torch.split(flat, sizes)):
                staged[manifest[i].name] = part.view(manifest[i].shape)
        return staged, BroadcastStats(version, num_bytes, len(plan), time.perf_counter() - started)

    def _collective(self, flat: torch.Tensor, version: int) -> None:
        if not self.formed:
            raise WeightSyncError(f"{self.describe(version)}: not formed")
        options = dist.BroadcastOptions()
        options.rootRank = 0
        options.timeout = self.timeout
        try:
            self._pg.broadcast([flat], options).wait()  # type: ignore[union-attr]
            if flat.is_cuda:
                # NCCL's wait() only orders the current stream: finish here, so the bytes are
                # in place and the stats time the transfer, and a failure surfaces in this call.
                torch.cuda.current_stream(flat.device).synchronize()
        except Exception as exc:
            raise WeightSyncError(f"broadcast failed in {self.describe(version)} at rank {self.rank}: {exc}") from exc


def parse_rendezvous(rendezvous: str) -> tuple[str, str, int]:
    """("file", path, 0) or ("tcp", host, port); anything else is refused by name."""
    url = urlparse(rendezvous)
    if url.scheme == "file" and not url.netloc and url.path.startswith("/"):
        return "file", url.path, 0
    if url.scheme == "tcp" and url.hostname and url.port:
        return "tcp", url.hostname, url.port
    raise ValueError(f"weight group rendezvous must be file:///absolute/path or tcp://host:port, got {rendezvous!r}")


def open_rendezvous_store(where: tuple[str, str, int], timeout: timedelta) -> dist.Store:
    """A member's connection to the run's rendezvous store (hosted by the supervisor)."""
    kind, place, port = where
    if kind == "file":
        store = dist.FileStore(place, -1)  # -1: nobody deletes the file when a member exits
        store.set_timeout(timeout)
        return store
    return dist.TCPStore(place, port, is_master=False, timeout=timeout, wait_for_workers=False)


def host_rendezvous_store(rendezvous: str, timeout_s: float = 60.0) -> dist.Store:
    """The run's rendezvous store, hosted by the supervisor for the whole run.

    file:// (what a run on one host uses): a FileStore in the run directory, which is mode 0700,
    so only the run's user can read or write its keys. tcp://: a TCPStore listening on the
    rendezvous address only (a TCPStore binds every interface unless handed a bound socket);
    it takes no credentials, so whoever reaches that address can read and overwrite its keys."""
    kind, host, port = parse_rendezvous(rendezvous)
    if kind == "file":
        os.close(os.open(host, os.O_CREAT | os.O_WRONLY, 0o600))
        return open_rendezvous_store((kind, host, 0), timedelta(seconds=timeout_s))
    family, sock_type, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    listener = socket.socket(family, sock_type, proto)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(socket.SOMAXCONN)
    except OSError:
        listener.close()
        raise
    # The store owns the descriptor from here on (detach: the socket object must not close it).
    return dist.TCPStore(host, port, is_master=True, timeout=timedelta(seconds=timeout_s),
                         wait_for_workers=False, master_listen_fd=listener.detach())
