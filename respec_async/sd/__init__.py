"""ReSpec's adaptive speculative-decoding server: profiler, solver and per-step scheduler.

Modules, bottom-up: `grid` (SD config names and parsing), `profile` (the measured `Profile`
and clocks), `solver` (`SpeedupModel`), `measure` (the profiler, `run_profile`), `scheduler`
(`AdaptiveScheduler`). The package depends on the engine only; respec_async/profiling.py
builds a run's profile and scheduler from its config.

Speculative decoding (SD) pays off at small active batch sizes and loses at large ones, and an
RL generation phase sweeps through all of them as long-tail sequences finish. Three pieces:

**Profiler** (`measure.run_profile`, `respec profile CONFIG`). For the target + drafter on this
hardware it measures the cost of one decode step of every active sequence, plain and with each
SD config (s = draft steps, t = top-k, n = draft tokens) of a grid, at active batch sizes B =
1, 2, 4, ..., max. The modes are timed round-robin on the same live batches (B sequences
decoding with no stop token, restarted before they outgrow `context_len`), so a load spike on
a shared machine hits every mode alike; each cell is the median of `repeats` steps. Separately
it measures each config's acceptance length L_c (mean tokens emitted per verify step =
accepted drafts + 1) on real rollouts of the task (prompts from the run's data, its sampling
settings, until EOS). Step cost uses the clock named in the profile: "cpu" (this thread's CPU
time, robust on a shared machine; the process's with more than one torch thread) or "wall".

**Solver** (`solver.SpeedupModel`). What is fitted, per mode m (plain, and each SD config):

    T_m(B) = a_m + b_m * B ** p_m          step seconds at active batch size B

with a_m, b_m >= 0 by least squares on the relative error (residuals divided by the measured
time), for each p_m on a grid from 0.25 to 2 (the best p_m is kept). a_m is the per-step
overhead (kernel launches, Python, the drafter's fixed cost), b_m * B ** p_m the work that
grows with the batch (matmuls over B rows x tokens per row; p_m < 1 where the hardware still
has idle width, > 1 where attention or caches start to thrash). Acceptance length is taken per
config and independent of B (it is a property of the drafter and the task, not the batch). The
predicted throughput speedup of config c over plain decoding at batch size B is

    S_c(B) = L_c * T_plain(B) / T_c(B)

and the best choice at B is argmax_c S_c(B) if that exceeds max(1, min_speedup), else SD off
(`generator.sd_min_speedup`, default 1: above it, a margin for the prediction's error). While
requests wait for slots (an RL generation phase before its tail), every sequence that finishes is
replaced and prefilled at the next step, and that admission cost is per step, not per token:
a mode that emits k tokens per row finishes n = B * k / (mean completion length) rows per step
(Poisson), so its step costs T_m(B) + P(n >= 1) * a_adm + n * b_adm on top, with a_adm, b_adm
measured by the profiler (a step admitting 1 and 4 requests minus the same decode without the
admission) and the mean completion length from the acceptance rollouts. SD emits more per
step and so batches admissions into fewer steps, which on this CPU (a prefill costs about one
decode step at B = 64) moves the break-even batch size up. The scheduler keeps one plan for
each case and is told which applies. The fit error
(`SpeedupModel.fit_error`): relative error of the fitted vs measured step time per mode and
of the predicted vs measured speedup per config at each profiled B (mean and max), the
leave-one-out error of the step-time fit at interior batch sizes (how well it predicts a batch
size it was not fitted on), and the regret of the fitted choice: at each profiled B, the
measured speedup of the config the fit picks over the measured best.

**Scheduler** (`scheduler.AdaptiveScheduler`). Before each engine step it reads the active batch size
(and whether requests wait for slots) and returns the planned choice (tables of best choices
for B = 1..max, re-solved only when an estimate changes). Beyond the paper's offline-only profile it re-estimates acceptance online:
per config, the accepted counts of its verify steps are pooled into windows of
`window_rows` sequence-steps; each window's observed L over the profiled L gives a ratio x,
and the config's ratio r_c <- (1 - alpha) r_c + alpha x; every other config's ratio moves by
alpha * coupling toward x as well (the configs share one drafter, so a drop seen through one is
evidence for all, only weaker). Estimates are L_c = profiled L_c * r_c (never below 1). Every
`probe_interval` decode steps it runs one step with a config the plan does not use at that B
(round robin over those predicted within `probe_margin` of the best), so a config whose
estimate went stale (or a drafter that recovers after SD was switched off) is seen again. Where
the plan has SD off, a probe waits for a batch of at most `probe_max_plain_batch` rows (the
tail of a phase): the engine's drafter catches up lazily, so the first SD step after plain ones
runs the drafter over every row's backlog, cheap for a few rows, as costly as the whole
upkeep it saves at B = 64.
`report()` gives the share of steps per mode and the predicted vs observed speedup over plain
decoding, both against the profile's fitted plain step cost: a decode step at batch B that
emitted k tokens per sequence in t seconds (measured) ran at speedup k * T_plain(B) / t
(plain decoding needs T_plain(B) per token per sequence); the window's observed speedup is
the time-weighted mean of that, sum(k * T_plain(B)) / sum(t), and the predicted speedup the
time-weighted mean of the S_choice(B) the scheduler expected when it chose (1 for plain
steps). Steps that also admitted (prefilled) new requests are left out of both.

Nothing here touches roles or sockets; the generator calls `choose` and `observe` around each
`Engine.step`, and the engine switches mode and config per step without reallocating.
"""
