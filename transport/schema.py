"""Every message that crosses a process boundary, as tagged `msgspec.Struct`s.

This is the only module that defines wire types. Each type is tagged (the tag is the class
name) so one socket can carry the `Message` union; `transport.codec` encodes them with msgpack
and moves `torch.Tensor` fields as separate zero-copy frames. Fields are plain data: ids,
versions, counts and tensors, named for what they are.
"""

from __future__ import annotations

import msgspec
import torch


class Struct(msgspec.Struct, tag=True, frozen=True, array_like=True, omit_defaults=True):
    """Base of every wire type: tagged by class name, encoded as a msgpack array."""


# --- supervisor <-> role control plane -------------------------------------------------


class Ready(Struct):
    """A role finished start-up and is ready for work."""

    role: str  # role instance name, e.g. "generator-0"
    pid: int
    restart_count: int = 0


class Ping(Struct):
    """Liveness probe from the supervisor; answered by the role's I/O task, not its mailbox."""

    seq: int
    sent_at: float


class Pong(Struct):
    """Answer to a Ping, with the role's live state for the status view."""

    seq: int
    role: str
    state: str  # "starting" | "running" | "stopping"
    mailbox_size: int = 0
    num_handled: int = 0
    num_dropped: int = 0
    busy_s: float = 0.0  # seconds this incarnation spent working (Actor.busy_seconds)


class Shutdown(Struct):
    """Asks a role to stop gracefully."""

    reason: str


class ReissueHeld(Struct):
    """Supervisor -> trainer: the run stalled; re-issue the groups these roles hold
    (supervisor.stall_action = "reissue")."""

    roles: list[str]


class InboxMoved(Struct):
    """Supervisor -> every role: `role` listens at `endpoint` from now on (restarted on another
    node after its own was lost); messages for it go there."""

    role: str
    endpoint: str


class RoleFailed(Struct):
    """A role reports a fatal error before exiting, so the supervisor can say why. retryable
    False: an error in start-up that a restart would repeat (a missing or malformed file, a
    bad value); the supervisor then fails the run at once instead of restarting the role."""

    role: str
    error: str
    retryable: bool = True


class RoleEvent(Struct):
    """A notable event a role wants shown on the supervisor's console (one line)."""

    role: str
    event: str
    fields: dict[str, str | int | float | bool] = {}
    level: str = "info"  # "warning": shown above the supervisor's live view


# --- RL loop: prompts, rollouts, scores ----------------------------------------------------


class PromptGroup(Struct):
    """One prompt to be sampled `num_samples` times (a GRPO group), issued by the trainer."""

    group_id: int  # position in the trainer's data stream; unique per run
    attempt: int  # 0 on first issue, +1 each time the group is re-issued
    prompt_ids: list[int]
    num_samples: int
    policy_version: int  # trainer's version when the group was admitted
    prompt_text: str = ""
    answer: str = ""
    data_source: str = ""


class Rollout(Struct, gc=False):
    """One sampled completion with what the trainer and the drafter learner need."""

    sample_index: int
    completion_ids: list[int]
    behaviour_logprobs: torch.Tensor  # float32 [len(completion_ids)], under the sampling weights
    min_policy_version: int  # version of the weights when generation started
    max_policy_version: int  # version when it finished (weights may be swapped mid-sequence)
    finish_reason: str  # "stop" | "length"
    num_drafted: int = 0
    num_accepted: int = 0
    num_verify_steps: int = 0
    num_decode_steps: int = 0
    drafter_version: int = -1  # actor version the drafter was distilled from, when it finished; -1 = no SD
    # Of the SD counts above, those of steps that drafted from the rollout history (not the drafter).
    num_history_drafted: int = 0
    num_history_accepted: int = 0
    num_history_verify_steps: int = 0


class RolloutGroup(Struct):
    """All samples of one prompt group, from a generator to a reward role."""

    group: PromptGroup
    rollouts: list[Rollout]
    generator: str
    generation_s: float


class ScoredGroup(Struct):
    """A rollout group with its rewards, from a reward role to the trainer (and learner)."""

    group: PromptGroup
    rollouts: list[Rollout]
    rewards: list[float]
    correct: list[bool]
    generator: str
    generation_s: float
    scoring_s: float = 0.0
    num_reward_errors: int = 0  # samples scored 0 because their reward failed ("zero" policy)


class ReturnedGroup(Struct):
    """A group handed back to the trainer unscored (reward failed with on_error = "drop")."""

    group: PromptGroup
    reason: str


# Where a group is on its way (GroupMoved.hop): the trainer's ledger keeps the furthest hop of
# the current attempt, so receipts that overtake each other on different sockets still order.
HOP_TO_GENERATOR = 0  # issued by the trainer, not yet acknowledged
HOP_AT_GENERATOR = 1
HOP_TO_REWARD = 2  # the generator sent the rollouts to a reward role
HOP_AT_REWARD = 3


class GroupMoved(Struct):
    """A role tells the trainer where a group's attempt is: `holder` received it (HOP_AT_*), or
    it was sent on to `holder` (HOP_TO_*). A group that stays between roles too long, or whose
    holder restarts, is re-issued."""

    group_id: int
    attempt: int
    hop: int
    holder: str


class GeneratorHello(Struct):
    """A generator (re)started: the trainer re-issues what it had outstanding there."""

    role: str
    restart_count: int


class RewardHello(Struct):
    """A reward role restarted: the groups it was scoring died with it. The trainer re-issues
    the groups its ledger has at this role (received, or sent to it)."""

    role: str
    restart_count: int


# --- reward servers (`respec reward-serve`, reward.source = "zmq://...") -----------------


class RewardSample(Struct):
    """One rollout to score, in the terms reward functions use."""

    rollout_id: str  # "group_id:attempt:sample_index"
    prompt: str
    response: str  # the decoded completion
    label: str  # the ground-truth answer
    data_source: str = ""


class RewardRequest(Struct):
    """Reward client -> reward server (DEALER -> ROUTER); the reply carries the same call_id."""

    call_id: int
    samples: list[RewardSample]


class RewardResponse(Struct):
    """Reward server -> client: one reward per sample, in order, or `error` for the whole call."""

    call_id: int
    rewards: list[float] = []
    correct: list[bool] = []
    extra: list[dict[str, float | int | str | bool]] = []  # per sample: the function's other keys, logged
    error: str = ""


# --- weight sync ----------------------------------------------------------------------------


class TensorSpec(Struct):
    name: str
    dtype: str
    shape: list[int]


class WeightsJoin(Struct):
    """A receiver asks to be (re)admitted to a weight group owned by the addressee."""

    role: str
    group: str  # "actor" | "drafter"
    token: int  # unique per member incarnation (its pid); stale formations are recognised by it


class WeightsRejoin(Struct):
    """Owner -> member: the owner (re)started; send WeightsJoin again so it can form a group."""

    group: str
    owner: str


class GroupFormation(Struct):
    """Owner -> members: build the group `group` for `epoch`; members[0] is the source.
    tokens[i] is the join token of members[i]; tokens[0] is the owner's own incarnation token."""

    group: str
    epoch: int
    members: list[str]
    tokens: list[int]


class WeightsUpdate(Struct):
    """Owner -> members: enter the broadcast of `version` now; the manifest says what arrives."""

    group: str
    epoch: int
    version: int
    manifest: list[TensorSpec]
    checksum: str = ""  # sha256 of the source's weights (see transport.weights.weights_checksum)


# --- generic payloads used by tests, benchmarks and examples ----------------------------


class Echo(Struct):
    """Request for an actor to send `payload` back to `reply_to` (tests, benchmarks)."""

    seq: int
    reply_to: str = ""
    payload: bytes = b""


class TensorMessage(Struct):
    """Named tensors plus a small header, e.g. for transport tests and benchmarks."""

    seq: int
    names: list[str]
    tensors: list[torch.Tensor]


Message = (
    Ready | Ping | Pong | Shutdown | ReissueHeld | InboxMoved | RoleFailed | RoleEvent
    | PromptGroup | Rollout | RolloutGroup | ScoredGroup | ReturnedGroup | GroupMoved | GeneratorHello | RewardHello
    | TensorSpec | WeightsJoin | WeightsRejoin | GroupFormation | WeightsUpdate
    | RewardSample | RewardRequest | RewardResponse
    | Echo | TensorMessage
)

MESSAGE_TYPES: tuple[type[Struct], ...] = Message.__args__  # type: ignore[attr-defined]
