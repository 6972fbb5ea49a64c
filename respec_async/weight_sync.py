"""Weight groups as seen from inside an actor: the owner that publishes versions, and the
members that receive them into staging buffers.

Protocol (control messages over the actors' inboxes, bytes over torch.distributed):
  member -> owner   WeightsJoin(token)    on start, on restart, after a failed receive, and when
                                        asked by WeightsRejoin (which a restarted owner sends)
  owner  -> member  GroupFormation        a new epoch, once every expected member has joined
  owner  -> member  WeightsUpdate         version + manifest + checksum, then the broadcast

A member acts only on the formation that carries its current join token, so a formation that
was queued for a dead incarnation is ignored by its successor; it then joins again, so an owner
that took a stale or forged join in its name forms with the live incarnation at its next
attempt (after the failed one times out) instead of waiting for it forever. When a broadcast fails (a
member died), the owner forms a new epoch as soon as every member has (re)joined and sends the
current version again; a restarted generator thus starts from the trainer's current weights.
A member that never reaches a formation's rendezvous within the timeout (alive but stuck) is
dropped with a `weights.member_dropped` event, so the others get their weights; it joins again
once its own attempt times out, and the next formation includes it.

The trainer owns the "actor" group (members: generators, drafter learner); the drafter learner
owns the "drafter" group (members: generators). Each group's collectives run on a worker thread
of their own, and member-side messages are processed by a task of their own, so receiving
drafter weights never blocks the actor broadcast or the engine.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch

from transport.schema import GroupFormation, WeightsJoin, WeightsRejoin, WeightsUpdate
from transport.weights import BroadcastStats, WeightGroup, WeightSyncError, manifest_of, weights_checksum

if TYPE_CHECKING:
    from respec_async.actor import Actor


def incarnation_token() -> int:
    """Unique per incarnation, to tell restarts apart; random (not pid and time), so a sender
    that can reach a role's inbox cannot guess a live member's token."""
    return secrets.randbits(62)


class WeightOwner:
    def __init__(self, actor: Actor, group: str, expected_members: list[str], timeout_s: float,
                 device: str = "cpu") -> None:
        self.actor = actor
        self.group_name = group
        self.expected = list(expected_members)
        self.group = WeightGroup(actor.ctx.endpoints.torch_dist, name=group, timeout_s=timeout_s, device=device)
        self.token = incarnation_token()  # names this owner's epochs in the rendezvous store
        self.tokens: dict[str, int] = {}  # member -> token of its latest join
        self.formed_tokens: dict[str, int] = {}  # the tokens the current epoch was formed with
        self.dropped: set[str] = set()  # members left out until they join again
        self.epoch = -1
        self.lock = asyncio.Lock()
        self.changed = asyncio.Event()
        self.num_broadcasts = 0
        self.last_stats: BroadcastStats | None = None
        self.last_version = -1

    async def announce(self) -> None:
        """Ask every member to (re)join: after an owner restart they do not know it is back."""
        for member in self.expected:
            await self.actor.send(member, WeightsRejoin(group=self.group_name, owner=self.actor.name))

    def on_join(self, message: WeightsJoin) -> None:
        if message.role not in self.expected:
            self.actor.log.warning("weights.unexpected_join", group=self.group_name, role=message.role)
            return
        self.tokens[message.role] = message.token
        self.dropped.discard(message.role)
        self.changed.set()
        self.actor.log.info("weights.join", group=self.group_name, role=message.role,
                            joined=len(self.tokens), expected=len(self.expected))

    @property
    def members(self) -> list[str]:
        """The members the next formation includes: every expected one not dropped."""
        return [m for m in self.expected if m not in self.dropped]

    @property
    def up_to_date(self) -> bool:
        return self.epoch >= 0 and self.formed_tokens == self.tokens and len(self.tokens) == len(self.members)

    async def _form(self) -> None:
        while any(m not in self.tokens for m in self.members):
            self.changed.clear()
            await self.changed.wait()
        self.epoch += 1
        members = [self.actor.name, *self.members]
        tokens = [self.token, *(self.tokens[m] for m in self.members)]
        formation = GroupFormation(group=self.group_name, epoch=self.epoch, members=members, tokens=tokens)
        for member in members[1:]:
            await self.actor.send(member, formation)
        started = time.perf_counter()
        try:
            await self.actor.run_blocking(self.group.form, self.epoch, members, self.actor.name, str(self.token),
                                          thread=self.group_name)
        except WeightSyncError as exc:
            await self._drop(exc.missing, dict(zip(members, tokens)))
            raise
        self.formed_tokens = dict(zip(members[1:], tokens[1:]))
        self.actor.log.info("weights.group_formed", group=self.group_name, epoch=self.epoch, members=members,
                            backend=self.group.backend, seconds=round(time.perf_counter() - started, 3))

    async def _drop(self, missing: list[str], formed_with: dict[str, int]) -> None:
        """Leave out the members that never reached a formation's rendezvous (alive but stuck, or
        gone without a restart), so they cannot keep the others from their weights; one that
        joined again meanwhile (a fresh token) stays. A dropped member's own formation attempt
        times out, and it then joins again, which adds it back."""
        for member in missing:
            if member == self.actor.name or self.tokens.get(member) != formed_with.get(member):
                continue
            del self.tokens[member]
            self.dropped.add(member)
            self.actor.log.warning("weights.member_dropped", group=self.group_name, member=member, epoch=self.epoch)
            await self.actor.notify("weights.member_dropped", level="warning", group=self.group_name, member=member,
                                    epoch=self.epoch)

    async def publish(self, snapshot: Callable[[], tuple[int, Mapping[str, torch.Tensor]]]) -> BroadcastStats | None:
        """Broadcast the (version, weights) that `snapshot()` returns to every member, (re)forming
        the group first when membership changed; retries until it succeeds (each collective has
        a timeout). `snapshot` runs in the compute thread, so it never sees a half-done step."""
        if not self.expected:
            return None
        async with self.lock:
            def copy() -> tuple[int, dict[str, torch.Tensor]]:
                version, state = snapshot()
                return version, {k: v.detach().clone() for k, v in state.items()}

            version, state = await self.actor.run_blocking(copy)
            checksum = weights_checksum(state)
            manifest = manifest_of(state)
            while True:
                if not self.members:
                    # Every member was dropped: nobody to send to until one joins again.
                    self.last_version = version
                    return None
                try:
                    if not self.up_to_date:
                        await self._form()
                    update = WeightsUpdate(group=self.group_name, epoch=self.epoch, version=version,
                                           manifest=manifest, checksum=checksum)
                    for member in self.formed_tokens:
                        await self.actor.send(member, update)
                    # Logged before the broadcast: a sender killed after its members took a
                    # version but before `weights.published` still leaves a record of what it sent.
                    self.actor.log.info("weights.sending", group=self.group_name, version=version,
                                        epoch=self.epoch, checksum=checksum[:12])
                    stats = await self.actor.run_blocking(self.group.broadcast, state, version, thread=self.group_name)
                    break
                except WeightSyncError as exc:
                    self.formed_tokens = {}
                    self.actor.log.error("weights.sync_failed", group=self.group_name, version=version, error=str(exc))
                    await self.actor.notify("weights.sync_failed", level="warning", group=self.group_name,
                                            version=version, error=str(exc)[:200])
                    if exc.missing:
                        continue  # those who never arrived are dropped: form without them now
                    # Give a dead member time to come back and rejoin before the next attempt.
                    self.changed.clear()
                    try:
                        await asyncio.wait_for(self.changed.wait(), timeout=5.0)
                    except TimeoutError:
                        pass
            self.num_broadcasts += 1
            self.last_stats = stats
            self.last_version = version
            self.actor.log.info("weights.published", group=self.group_name, version=version, epoch=self.epoch,
                                bytes=stats.num_bytes, seconds=round(stats.seconds, 4), checksum=checksum[:12])
            return stats


class WeightMember:
    """Receives one group's versions; `take()` hands the newest one to the role at a step boundary."""

    def __init__(self, actor: Actor, group: str, owner: str, timeout_s: float, device: str = "cpu") -> None:
        self.actor = actor
        self.group_name = group
        self.owner = owner
        self.group = WeightGroup(actor.ctx.endpoints.torch_dist, name=group, timeout_s=timeout_s, device=device)
        self.token = incarnation_token()
        self.queue: asyncio.Queue[GroupFormation | WeightsUpdate] = asyncio.Queue()
        self.staged: tuple[int, dict[str, torch.Tensor], str] | None = None  # (version, tensors, checksum)
        self.arrived = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self._rejoined_epoch = -1

    async def join(self) -> None:
        if self.task is None:
            self.task = asyncio.create_task(self._run(), name=f"weights-{self.group_name}")
        await self.actor.send(self.owner, WeightsJoin(role=self.actor.name, group=self.group_name, token=self.token))

    def on_message(self, message: GroupFormation | WeightsUpdate) -> None:
        self.queue.put_nowait(message)

    def take(self) -> tuple[int, dict[str, torch.Tensor], str] | None:
        staged, self.staged = self.staged, None
        self.arrived.clear()
        return staged

    async def _run(self) -> None:
        while True:
            message = await self.queue.get()
            try:
                if isinstance(message, GroupFormation):
                    mine = message.tokens[message.members.index(self.actor.name)]
                    if mine != self.token:
                        # Another incarnation's token: a formation queued for a dead one, or the
                        # owner holds a stale (or forged) join in this role's name and would wait
                        # for a member that never comes. Join again, once per epoch, so the
                        # owner's next attempt forms with this incarnation.
                        if message.epoch > self._rejoined_epoch:
                            self._rejoined_epoch = message.epoch
                            self.actor.log.warning("weights.stale_formation", group=self.group_name,
                                                   epoch=message.epoch)
                            await self.actor.send(self.owner, WeightsJoin(role=self.actor.name, group=self.group_name,
                                                                          token=self.token))
                        continue
                    await self.actor.run_blocking(self.group.form, message.epoch, message.members, self.actor.name,
                                                  str(message.tokens[0]), thread=self.group_name)
                    self.actor.log.info("weights.group_joined", group=self.group_name, epoch=message.epoch,
                                        backend=self.group.backend)
                elif self.group.formed and message.epoch == self.group.epoch:
                    tensors, stats = await self.actor.run_blocking(
                        self.group.receive, message.manifest, message.version, thread=self.group_name)
                    self.staged = (message.version, tensors, message.checksum)
                    self.arrived.set()
                    self.actor.log.info("weights.received", group=self.group_name, version=message.version,
                                        bytes=stats.num_bytes, seconds=round(stats.seconds, 4))
            except WeightSyncError as exc:
                # The owner forms a new epoch once every member has rejoined.
                self.actor.log.error("weights.receive_failed", group=self.group_name, error=str(exc))
                self.group.leave()
                await self.actor.send(self.owner, WeightsJoin(role=self.actor.name, group=self.group_name,
                                                              token=self.token))
