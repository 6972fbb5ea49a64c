"""The typed run configuration: one `msgspec.Struct` per section, decoded from TOML.

Every knob a user tunes has one home here, with its default and a short comment. `load_config`
reads a TOML file, applies `--set a.b=c` overrides (dotted paths, TOML-typed values), and
validates everything before anything starts: an unknown key, a wrong type or an out-of-range
value raises `ConfigError` naming the file, the dotted key and what was expected.
"""

from __future__ import annotations

import importlib.util
import os
import re
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
# generator.sd_grid's default, also what `respec profile` and bench_adaptive use unless told
# otherwise: EAGLE chains of 1-6 drafts and three trees, and history chains of 4 and 8 drafts
# (about a minute and a half to profile on the tiny zoo).
DEFAULT_SD_GRID = ("1,1,1", "2,1,2", "3,1,3", "4,1,4", "6,1,6", "3,2,4", "4,2,8", "5,4,16",
                   "history:4,1,4", "history:8,1,8")
PosInt = Annotated[int, msgspec.Meta(ge=1)]
PosFloat = Annotated[float, msgspec.Meta(gt=0)]
NonNegFloat = Annotated[float, msgspec.Meta(ge=0)]


class Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Base of config sections: unknown keys are errors, not silently ignored."""


class RunSection(Section):
    name: str = "run"  # run name; the run directory is <root>/<name>-<timestamp>
    root: str = "runs"  # where run directories are created
    seed: int = 0  # global seed; each role derives its own from it
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    final_eval: bool = True  # after a successful run, measure held-out accuracy before vs after


class SupervisorSection(Section):
    ready_timeout_s: PosFloat = 120.0  # a role that is not Ready by then fails the start, by name
    ping_interval_s: PosFloat = 1.0  # how often each role is pinged
    ping_timeout_s: PosFloat = 20.0  # a role silent for this long is restarted as hung
    max_restarts: NonNegInt = 3  # restarts allowed per role within restart_window_s
    restart_window_s: PosFloat = 300.0
    restart_backoff_s: NonNegFloat = 0.5  # first restart delay; doubles on each further restart
    shutdown_grace_s: PosFloat = 10.0  # after this, roles still alive are killed
    live_status: bool = True  # redraw a status table on the console (off when not a TTY)
    # Progress watchdog: no trainer step for this long while every role is up and answering
    # pings is a stall: a run.stalled event names each role's mailbox, the messages it handled
    # since the last step and the prompt groups it holds (the ledger), then stall_action:
    # "fail" the run with that message; "reissue" the groups the roles hold (new attempts, the
    # stuck roles keep running); or "restart" the roles holding groups (their groups are
    # re-issued; restarts count against max_restarts). Nothing held: the run fails. 0 = off.
    stall_timeout_s: NonNegFloat = 900.0
    stall_action: Literal["fail", "reissue", "restart"] = "fail"
    # "local": every role a subprocess of the supervisor. "ray": every role a process on a node
    # of a running Ray cluster, placed by the [ray] section (respec_async/launchers/ray_cluster.py).
    launcher: Literal["local", "ray"] = "local"
    ray_address: str = "auto"  # ray only: the cluster to join ("auto": the one `ray start` made here)


class TransportSection(Section):
    scheme: Literal["ipc", "tcp"] = "ipc"  # ipc: sockets in the run directory; tcp: host:port
    host: str = "127.0.0.1"  # tcp only: the address roles bind and connect to
    insecure: bool = False  # tcp only: true turns CURVE encryption and authentication off
    hwm: PosInt = 64  # high-water mark (messages) per socket: beyond it senders wait


class RolesSection(Section):
    """How many processes of each role the supervisor starts."""

    generator: NonNegInt = 1
    reward: NonNegInt = 1
    trainer: Annotated[int, msgspec.Meta(ge=0, le=1)] = 1
    drafter_learner: Annotated[int, msgspec.Meta(ge=0, le=1)] = 0
    echo: NonNegInt = 0  # diagnostic role that answers Echo messages (connectivity checks, tests)


class ModelSection(Section):
    path: str = ""  # Hugging Face model directory of the actor; "" = the tiny zoo model (trained on first use)
    drafter_path: str = ""  # EAGLE-3 drafter directory; "" = the zoo drafter (when SD is on)
    dtype: Literal["float32", "bfloat16"] = "float32"
    # "cpu", "cuda" or "cuda:N". Plain "cuda" with 2+ GPUs: trainer on cuda:0, generators on the
    # others, weights over NCCL; roles sharing a GPU (one GPU, or cuda:N) sync over gloo.
    device: str = "cpu"


class SamplingSection(Section):
    temperature: NonNegFloat = 1.0  # 0 = greedy
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] = 1.0
    top_k: NonNegInt = 0  # 0 = off
    max_new_tokens: PosInt = 192


class DataSection(Section):
    # the zoo task, its long-tail variant (up to 44-digit additions, solutions ~20-480 tokens;
    # its own zoo target and drafter), the same sums asked in words for a pretrained chat model
    # (one or two digits, "What is 47 + 38? ...", scored by the reply's last number), or a
    # JSONL file of prompt/answer
    task: Literal["arithmetic", "longtail", "chat-addition", "jsonl"] = "arithmetic"
    path: str = ""  # jsonl only: file with {"prompt": ..., "answer": ...} per line
    # Wrap every prompt as a user message in the tokenizer's chat template (tokenizer_config.json's
    # chat_template or chat_template.jinja), with the assistant's turn opened: instruct models.
    chat_template: bool = False
    group_size: PosInt = 8  # samples per prompt (G of GRPO)
    groups_per_step: PosInt = 8  # prompts per optimizer step
    eval_size: PosInt = 200  # held-out prompts for `respec eval` and the demo's before/after accuracy
    # arithmetic, longtail: 0 = an endless stream of new problems; N = a training set of N problems, each
    # seen once per epoch, in a new order every epoch (as a JSONL file's records are)
    train_size: NonNegInt = 0


class GeneratorSection(Section):
    max_batch_size: PosInt = 64  # KV-cache slots: the most sequences decoded at once
    max_seq_len: PosInt = 256  # prompt + completion tokens per slot
    sd: Literal["off", "static", "adaptive"] = "off"  # speculative decoding mode
    sd_num_steps: PosInt = 4  # static SD config: draft steps (s)
    sd_top_k: PosInt = 1  # static SD config: children per node (t); 1 = chain
    sd_num_draft_tokens: PosInt = 4  # static SD config: draft tokens verified (n)
    # static SD config: where drafts come from: "eagle" (the drafter model) or "history" (earlier
    # rollouts of the same prompt, engine/history.py: no drafter, no model call)
    sd_source: Literal["eagle", "history"] = "eagle"
    # adaptive SD (respec_async/sd/): the profile JSON written by `respec profile CONFIG`;
    # "" = profile at generator start (about 15 s on the tiny zoo, 5 repeats) into <run dir>/sd_profile.json,
    # which a restarted generator, another generator of the run or --resume reuses.
    sd_profile: str = ""
    # adaptive: the SD configs profiled and chosen from (with sd_profile set: the profile's own):
    # "s,t,n" drafts with the EAGLE drafter, "history:s,t,n" from the rollout history
    sd_grid: list[Annotated[str, msgspec.Meta(pattern=r"^(history:)?\d+,\d+(,\d+)?$")]] = msgspec.field(
        default_factory=lambda: list(DEFAULT_SD_GRID))
    # Rollout history (engine/history.py), kept when a history config can be chosen: every
    # rollout this generator samples, per prompt, for history drafts. A restarted generator
    # starts empty. history_max_bytes caps its memory (finished rollouts evicted, least
    # recently used prompt first); history_max_rollouts_per_prompt caps one prompt's share.
    history_max_bytes: NonNegInt = 256 * 2**20
    history_max_rollouts_per_prompt: PosInt = 64
    # a draft source matching this many tokens is preferred to one matching 2 (the short key)
    history_match_depth: Annotated[int, msgspec.Meta(ge=2)] = 5
    # Admit the samples of a wave of groups spread over the groups (a few of each first), so the
    # rest start with siblings ahead of them to draft from (engine/slots.py). With history only;
    # off by default: measured, it helps static history chains but not the adaptive server.
    history_spread_siblings: bool = False
    sd_acceptance_ema: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.2  # adaptive: weight of each new acceptance window
    sd_probe_interval: NonNegInt = 64  # adaptive: every N decode steps try an unplanned config once (0 = never)
    # adaptive: SD only where its predicted speedup exceeds this (1.0 = wherever it is predicted
    # to win at all). Above 1 it is a margin for the prediction's error: a config predicted a few
    # percent faster is as likely slower live, where steps also pay the drafter's catch-ups.
    sd_min_speedup: Annotated[float, msgspec.Meta(ge=1)] = 1.0
    num_threads: PosInt = 1  # torch intra-op threads in this role
    verify_weights: bool = True  # checksum the weights after each swap against the trainer's
    # Relaxed (lossy) SD acceptance, SGLang's threshold_single / threshold_acc: 1.0 and 1.0 (the
    # default) is exact rejection sampling; below 1 more drafts pass and rollouts follow the
    # drafter, not the target (ReSpec's Gap 3). Behaviour log-probs stay the target's.
    sd_relaxed_threshold_single: Annotated[float, msgspec.Meta(gt=0, le=1)] = 1.0
    sd_relaxed_threshold_acc: Annotated[float, msgspec.Meta(gt=0, le=1)] = 1.0


class RewardSection(Section):
    # builtin (the task's rule reward) | python:pkg.mod:fn | python:/path/file.py:fn
    # | http://host:port/path | zmq://host:port (or zmq://ipc:///path). Several http or zmq URLs,
    # comma-separated, shard the load (round robin; a retry goes to the next URL).
    source: str = "builtin"
    # python: the function takes lists, fn(data_sources, solution_strs, ground_truths, extra_infos)
    # -> list, and is called once per group instead of once per rollout.
    batched: bool = False
    # http: "batch" posts one group as {"query", "prompts", "labels"} -> {"rewards": [...]} (OpenRLHF);
    # "sample" posts each rollout as {"prompt", "response", "label"} -> a number or {"reward": ...}.
    http_format: Literal["batch", "sample"] = "batch"
    max_concurrency: PosInt = 16  # requests (http/zmq, async python calls) in flight; also groups scored at once
    num_workers: PosInt = 4  # python: threads that run a sync reward function
    timeout_s: PosFloat = 30.0  # per request / per function call
    max_retries: NonNegInt = 3  # retries after the first try fails (timeout, error, bad response)
    retry_backoff_s: PosFloat = 0.5  # retry n waits uniform(0.5, 1) * min(retry_backoff_s * 2**n, retry_backoff_max_s)
    retry_backoff_max_s: PosFloat = 10.0
    token_env: str = ""  # http: environment variable holding a bearer token ("" = no Authorization header)
    zmq_keys: str = ""  # zmq over tcp: the CURVE keys file of `respec reward-serve --keys` (transport.security)
    zmq_insecure: bool = False  # zmq over tcp: plain tcp, no CURVE (the server must run with --insecure)
    # A reward that still fails after the retries: "drop" returns its whole group to the trainer,
    # which re-issues it; "zero" scores it 0, flagged in ScoredGroup.num_reward_errors.
    on_error: Literal["drop", "zero"] = "drop"


class TrainerSection(Section):
    num_steps: PosInt = 60  # optimizer steps; the policy version counts them
    max_staleness: NonNegInt = 1  # k: a rollout started at version u is trained at version <= u + k
    lr: PosFloat = 1e-4
    weight_decay: NonNegFloat = 0.0
    grad_clip: PosFloat = 1.0
    clip_low: NonNegFloat = 0.2  # PPO clip below 1
    clip_high: NonNegFloat = 0.28  # PPO clip above 1 (clip-higher)
    is_cap: PosFloat = 2.0  # truncation of the behaviour importance weight
    kl_coef: NonNegFloat = 0.0  # KL to the initial policy (0 = off)
    normalize_std: bool = True  # divide group advantages by the group's std
    micro_batch_size: PosInt = 16  # sequences per forward/backward
    # The forward/backward's autocast dtype ("model" = model.dtype; the master weights stay
    # float32 either way). "bfloat16" with float32 generators: on a CPU that multiplies bf16
    # natively (AVX512-BF16, AMX) training gains while bf16 decode may not; on an AVX2-only CPU
    # bf16 matmuls are several times slower than float32. "auto": bfloat16 where the trainer's
    # device multiplies it natively (such a CPU, a CUDA GPU with bf16), float32 elsewhere.
    compute_dtype: Literal["model", "float32", "bfloat16", "auto"] = "model"
    checkpoint_every: NonNegInt = 20  # steps between checkpoints (0 = only at the end)
    # DAPO dynamic sampling: a group whose rewards are all equal carries no GRPO signal; drop it
    # and draw another prompt for its step (same staleness bound), until the step has
    # data.groups_per_step informative groups or has drawn dynamic_sampling_max_factor times
    # that many (then it trains on what it has: uninformative groups get zero advantages).
    dynamic_sampling: bool = False
    dynamic_sampling_max_factor: Annotated[float, msgspec.Meta(ge=1)] = 4.0
    # Every weight group's collective timeout: the trainer's actor group and the drafter learner's
    # drafter group (owners and members alike) read it here.
    weight_sync_timeout_s: PosFloat = 120.0
    # A group sent to a role that has not acknowledged it (GroupMoved) for this long is in no
    # live role's hands: re-issued (0 = never). Longer than a busy reward role's queue can hold it.
    group_transit_timeout_s: NonNegFloat = 60.0
    num_threads: PosInt = 1  # torch intra-op threads in this role


class DrafterSection(Section):
    """The drafter learner (roles.drafter_learner = 1 turns it on): online, reward-weighted
    distillation of the drafter from the evolving actor, pushed to the generators."""

    update_interval: PosInt = 1  # I: publish a new drafter every I actor versions
    lr: PosFloat = 1e-3
    weight_decay: NonNegFloat = 0.0
    grad_clip: PosFloat = 1.0
    batch_size: PosInt = 16  # rollouts per drafter optimizer step
    buffer_size: PosInt = 512  # replay buffer (rollouts); the oldest leave first
    # Drafter optimizer steps are paced by the data: it trains while samples drawn <
    # replay_ratio * rollouts received, then waits for more (bounded CPU, no overfitting a
    # stale buffer while the actor is slow).
    replay_ratio: PosFloat = 2.0
    # Pace by the drafter's use: a rollout adds replay_ratio * max(pace_floor, its share of
    # decode steps that drafted with the drafter; history steps do not) to that budget. 1 (the
    # default) counts every rollout fully; below 1 a learner whose generators mostly decode
    # plainly or from history (the adaptive server found that the drafter does not pay at their
    # batch sizes) trains that much less, down to pace_floor of the full pace, and leaves the
    # CPU to the RL loop.
    pace_floor: Annotated[float, msgspec.Meta(ge=0, le=1)] = 1.0
    unroll_steps: PosInt = 4  # unrolled training-time-test steps of the KD loss (EAGLE-3 uses 7)
    step_decay: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.8  # weight of unrolled step j: step_decay**j
    # "reward": w(r) = min-max normalised reward in the batch, clipped to [w_min, 1] (ReSpec);
    # "none": w = 1, plain KD.
    weighting: Literal["reward", "none"] = "reward"
    w_min: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.05
    num_threads: PosInt = 1  # torch intra-op threads in this role
    # CPU priority of the learner process (os.nice increment, 0-19): above 0 it trains on the
    # CPU time the generator and the trainer leave, so on a machine with fewer cores than roles
    # distillation never slows the RL loop; its drafters then lag more versions behind.
    nice: Annotated[int, msgspec.Meta(ge=0, le=19)] = 0
    metrics_every_s: PosFloat = 5.0  # how often the learner's counters go to its metrics file
    # Checkpoint the drafter, its optimizer and counters into <run dir>/drafter_checkpoints/ when a
    # published drafter's version crosses a multiple of this (in actor versions), and at a clean
    # shutdown; the newest 2 are kept. A restarted learner or --resume continues from the latest
    # one there is. 0 = write none (a restarted learner then starts from the offline drafter again).
    checkpoint_every: NonNegInt = 10


# tracking backend -> (the module it needs, the extra that installs it)
TRACKING_BACKENDS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
                     "mlflow": ("mlflow", "mlflow")}


class TrackingSection(Section):
    """Experiment trackers fed the trainer's per-step metrics (respec_async/tracking.py)."""

    backends: list[Literal["tensorboard", "wandb", "mlflow"]] = []
    dir: str = ""  # "" = <run dir>/tracking/<backend>; else <dir>/<run name> (one tree for many runs)
    project: str = "respec-async"  # the wandb project / the MLflow experiment
    # "offline" writes the run under the tracking dir with no network (`wandb sync DIR` uploads it
    # later); "online" logs to the W&B server you are logged in to.
    wandb_mode: Literal["offline", "online"] = "offline"
    # "" = a file store under the tracking dir (no server); else a tracking server's URI.
    mlflow_uri: str = ""


class RayRoleResources(Section):
    """What one instance of a role asks of its Ray node (one placement-group bundle)."""

    num_cpus: NonNegFloat = 1.0
    num_gpus: NonNegFloat = 0.0
    # Custom resources, the way Ray pins work to nodes: start a node with
    # `ray start --resources '{"trainer_node": 1}'` and ask for {trainer_node = 1} here.
    resources: dict[str, PosFloat] = {}
    # Node labels the role's node must carry, each matched exactly (`ray start --labels
    # '{"zone": "a"}'`; Ray also labels nodes itself, e.g. ray.io/node-id).
    labels: dict[str, str] = {}


class RaySection(Section):
    """Placement of the roles on a Ray cluster (supervisor.launcher = "ray")."""

    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # Ray gets every role's bundle within this long, or the run fails naming what is missing.
    placement_timeout_s: PosFloat = 60.0
    # Each machine's own run directory for the roles it runs: <local_dir>/<run>-<hash>/<host>.
    # Logs and metrics are copied back to the supervisor's run directory as they grow;
    # checkpoints stay here, so a trainer restarted on its machine resumes. "" = <system temp
    # dir>/respec-ray.
    local_dir: str = ""
    echo: RayRoleResources = msgspec.field(default_factory=RayRoleResources)
    reward: RayRoleResources = msgspec.field(default_factory=RayRoleResources)
    drafter_learner: RayRoleResources = msgspec.field(default_factory=RayRoleResources)
    generator: RayRoleResources = msgspec.field(default_factory=RayRoleResources)
    trainer: RayRoleResources = msgspec.field(default_factory=RayRoleResources)


class EchoSection(Section):
    num_rounds: NonNegInt = 0  # echo-0 drives this many round trips, then finishes (0 = serve)


class Config(Section):
    run: RunSection = msgspec.field(default_factory=RunSection)
    supervisor: SupervisorSection = msgspec.field(default_factory=SupervisorSection)
    transport: TransportSection = msgspec.field(default_factory=TransportSection)
    roles: RolesSection = msgspec.field(default_factory=RolesSection)
    echo: EchoSection = msgspec.field(default_factory=EchoSection)
    model: ModelSection = msgspec.field(default_factory=ModelSection)
    sampling: SamplingSection = msgspec.field(default_factory=SamplingSection)
    data: DataSection = msgspec.field(default_factory=DataSection)
    generator: GeneratorSection = msgspec.field(default_factory=GeneratorSection)
    reward: RewardSection = msgspec.field(default_factory=RewardSection)
    trainer: TrainerSection = msgspec.field(default_factory=TrainerSection)
    drafter: DrafterSection = msgspec.field(default_factory=DrafterSection)
    tracking: TrackingSection = msgspec.field(default_factory=TrackingSection)
    ray: RaySection = msgspec.field(default_factory=RaySection)


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and the dotted key."""


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=c` -> (["a", "b"], value), the value read as TOML (bare words become strings)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key):
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE with a dotted key, e.g. supervisor.max_restarts=5")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return raw


def _dotted(validation_message: str) -> tuple[str, str]:
    """Split msgspec's 'what - at `$.a.b`' into ('a.b', what), naming unknown fields too."""
    what, _, where = validation_message.rpartition(" - at `")
    if not _:
        what, where = validation_message, "$`"
    key = where.rstrip("`").removeprefix("$").lstrip(".")
    unknown = re.search(r"unknown field `([^`]+)`", what)
    if unknown:
        key = f"{key}.{unknown.group(1)}" if key else unknown.group(1)
        what = "unknown key"
    missing = re.search(r"missing required field `([^`]+)`", what)
    if missing:
        key = f"{key}.{missing.group(1)}" if key else missing.group(1)
    return key or "<root>", what


def _lookup(raw: dict[str, Any], dotted_key: str) -> Any:
    node: Any = raw
    for part in dotted_key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def config_from_dict(raw: dict[str, Any], source: str = "<config>") -> Config:
    try:
        config = msgspec.convert(raw, Config)
    except msgspec.ValidationError as exc:
        key, what = _dotted(str(exc))
        given = _lookup(raw, key)
        if given is not None and "got" not in what and what != "unknown key":
            what = f"{what}, got {given!r}"
        raise ConfigError(f"{source}: {key}: {what}") from None
    # "~/..." as in a shell: model caches (`respec models fetch`) live under the home directory.
    for section, key in (("model", "path"), ("model", "drafter_path"), ("data", "path"), ("generator", "sd_profile"),
                         ("tracking", "dir")):
        table = getattr(config, section)
        if getattr(table, key).startswith("~"):
            setattr(table, key, os.path.expanduser(getattr(table, key)))
    check_config(config, source)
    return config


def generator_uses_drafter(config: Config) -> bool:
    """Whether the generators draft with the EAGLE drafter: static SD from it, or an adaptive
    grid with an EAGLE config (or a profile file, whose configs are read later)."""
    g = config.generator
    if g.sd == "static":
        return g.sd_source == "eagle"
    if g.sd == "adaptive":
        return bool(g.sd_profile) or any(not entry.startswith("history:") for entry in g.sd_grid)
    return False


def check_config(config: Config, source: str) -> None:
    """Cross-field rules that a single field's type cannot express."""
    if (config.data.task == "chat-addition" or config.data.chat_template) and not config.model.path:
        what = "data.chat_template" if config.data.chat_template else "data.task = \"chat-addition\""
        raise ConfigError(f"{source}: model.path: {what} needs a pretrained chat model (the zoo's character "
                          f"tokenizer has neither words nor a chat template), e.g. `respec models fetch smollm2-135m`")
    if config.data.task == "jsonl" and config.data.train_size:
        raise ConfigError(f"{source}: data.train_size: only for the arithmetic tasks (a JSONL file's records "
                          f"are its training set)")
    if config.data.task == "jsonl" and not config.data.path:
        raise ConfigError(f"{source}: data.path: required when data.task = \"jsonl\"")
    if config.data.task == "jsonl" and config.run.final_eval and config.roles.trainer:
        raise ConfigError(f"{source}: run.final_eval: the held-out evaluation needs the arithmetic task's held-out "
                          f"split; with data.task = \"jsonl\" set run.final_eval = false")
    g = config.generator
    if g.sd != "off" and g.sd_num_draft_tokens < g.sd_num_steps and g.sd_top_k == 1:
        raise ConfigError(f"{source}: generator.sd_num_draft_tokens: a chain verifies all sd_num_steps drafts, "
                          f"so it must be >= sd_num_steps ({g.sd_num_draft_tokens} < {g.sd_num_steps})")
    if config.roles.drafter_learner and config.generator.sd != "off" and config.roles.generator \
            and not generator_uses_drafter(config):
        raise ConfigError(f"{source}: roles.drafter_learner: the generators draft from history only "
                          f"(generator.sd_source / generator.sd_grid name no EAGLE config), so no one uses the "
                          f"drafter it trains; set roles.drafter_learner = 0")
    if config.roles.drafter_learner and config.generator.sd == "off" and config.roles.generator:
        raise ConfigError(f"{source}: roles.drafter_learner: the drafter learner trains the drafter the generators "
                          f"draft with; it needs generator.sd = \"static\" or \"adaptive\" (got \"off\")")
    for role in ("generator", "reward"):
        if config.roles.trainer and getattr(config.roles, role) == 0:
            raise ConfigError(f"{source}: roles.{role}: the trainer needs at least one {role} role (got 0)")
    if config.roles.drafter_learner and not config.roles.trainer:
        raise ConfigError(f"{source}: roles.drafter_learner: needs roles.trainer = 1 (it follows the trainer's actor)")
    for backend in config.tracking.backends if config.roles.trainer else ():
        module, extra = TRACKING_BACKENDS[backend]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"{source}: tracking.backends: {backend} needs the {module} package: "
                              f"pip install 'respec-async[{extra}]'")
    try:
        source_kind(config.reward.source)
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    s = config.supervisor
    if s.launcher == "ray":
        if config.transport.scheme != "tcp":
            raise ConfigError(f"{source}: transport.scheme: supervisor.launcher = \"ray\" runs roles on several "
                              f"machines, which ipc sockets cannot reach; set transport.scheme = \"tcp\"")
        if importlib.util.find_spec("ray") is None:
            raise ConfigError(f"{source}: supervisor.launcher: \"ray\" needs the ray package: "
                              f"pip install 'respec-async[ray]'")
        for kind in config.ray.__struct_fields__:
            wants = getattr(config.ray, kind)
            if not isinstance(wants, RayRoleResources):
                continue
            if not (wants.num_cpus or wants.num_gpus or wants.resources):
                raise ConfigError(f"{source}: ray.{kind}: asks for no resource at all; Ray needs at least one "
                                  f"(num_cpus, num_gpus or resources) to place a role")
            for name in {"CPU", "GPU"} & set(wants.resources):
                raise ConfigError(f"{source}: ray.{kind}.resources: {name} is set by "
                                  f"ray.{kind}.num_{name.lower()}s, not as a custom resource")
    if s.ping_timeout_s <= s.ping_interval_s:
        raise ConfigError(
            f"{source}: supervisor.ping_timeout_s: must be greater than supervisor.ping_interval_s "
            f"({s.ping_timeout_s} <= {s.ping_interval_s})"
        )


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """A config file, the files it `extends` under it, then the --set overrides."""
    path = Path(path)
    source = f"{path}" + (" (with --set overrides)" if overrides else "")
    return config_from_dict(apply_overrides(_read_toml(path, ()), overrides), source)


def _read_toml(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    """The file's tables over those of the file its top-level `extends = "base.toml"` names
    (relative to it; bases may extend further): tables merge key by key, any other value (an
    array included) replaces the base's."""
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        where = f" (extended by {chain[-1]})" if chain else ""
        raise ConfigError(f"{path}: no such config file{where}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    base = raw.pop("extends", None)
    if base is None:
        return raw
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: extends: expected the path of a config file, got {base!r}")
    base_path = (path.parent / base).resolve()
    chain = (*chain, path.resolve())
    if base_path in chain:
        names = " -> ".join(str(p) for p in (*chain, base_path))
        raise ConfigError(f"{path}: extends: a circle of config files: {names}")
    return _merge(_read_toml(base_path, chain), raw)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def config_to_dict(config: Config) -> dict[str, Any]:
    return msgspec.to_builtins(config)


def config_to_toml(config: Config) -> str:
    """The resolved config as TOML text (what `respec config show` prints)."""
    lines: list[str] = []

    def emit(prefix: str, table: dict[str, Any]) -> None:
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
        if prefix and scalars:
            lines.append(f"[{prefix}]")
        for k, v in scalars.items():
            lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
        if scalars:
            lines.append("")
        for k, v in table.items():
            if isinstance(v, dict):
                emit(f"{prefix}.{_toml_key(k)}" if prefix else _toml_key(k), v)

    emit("", config_to_dict(config))
    return "\n".join(lines).rstrip() + "\n"


def _toml_key(key: str) -> str:
    """A bare key where TOML allows one, else quoted (Ray's resource names hold ':' and '.')."""
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else msgspec.json.encode(key).decode()


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return msgspec.json.encode(value).decode()
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def source_urls(source: str) -> list[str]:
    return [u.strip() for u in source.split(",") if u.strip()]


def source_kind(source: str) -> str:
    """"builtin" | "python" | "http" | "zmq" for a valid `reward.source`, else ValueError. Cheap
    (imports nothing, reads no file), so a config can be checked before anything starts."""
    source = source.strip()
    if source == "builtin":
        return "builtin"
    if source.startswith("python:"):
        target, sep, name = source.removeprefix("python:").rpartition(":")
        if sep and target and name.isidentifier():
            return "python"
    urls = source_urls(source)
    schemes = {u.split("://", 1)[0] for u in urls}
    if urls and all("://" in u for u in urls):
        if schemes <= {"http", "https"}:
            return "http"
        if schemes == {"zmq"}:
            return "zmq"
    raise ValueError(f"reward.source: unsupported source {source!r} (builtin | python:pkg.mod:fn | "
                     "python:/path/file.py:fn | http://host:port/path | zmq://host:port; several URLs of one "
                     "scheme, comma-separated)")
