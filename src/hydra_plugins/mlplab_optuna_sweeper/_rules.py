"""The sweep's rules as plain functions over plain data: no Hydra, MLflow or storage.

    stage 0:  n trials sampled from the space               (study NAME.stage0)
    stage i:  log intervals narrowed to the span of the best top_k of stage i-1
    final:    the best top_m of the last stage retrained, `seeds` seeds each; the best
              mean validation wins (choose_in=last_stage: compared first in the last
              stage's setting with new seeds, study NAME.choose, then only the winner
              retrains with the final overrides)

A stage's budget is its first n_trials counted trials by number: the storage numbers
trials in order, so every worker sees the same set. The final step is not sampled:
each (candidate, seed) is a slot, run until a trial of it completes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
from dataclasses import dataclass

import numpy as np
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from mlplab.engine.checks import positive_int
from mlplab.trial import read_outcome

log = logging.getLogger(__name__)

FINAL, CHOOSE = "final", "choose"  # the final step's labels (choose: compared first)
FAILURE = "failure"  # a trial's user attribute: the job failed or diverged (it counts)
DROPPED = "dropped"  # why a FAIL trial does not count (interrupted, over the budget)
CARRIED = "carried_from"  # copied from an earlier stage: information, not budget
TEST_ACC, PRUNED_AT = "test_acc", "pruned_at"  # kept on a trial for the summary


# --- stages -------------------------------------------------------------------------

@dataclass
class Stage:
    label: str  # "0", "1", ... or "choose", "final": the trials' `stage` tag
    index: int  # position in the sweep: metric step, seed stream
    n_trials: int
    overrides: list[str]

    @property
    def study_suffix(self) -> str:
        return study_suffix(self.label)

    @property
    def retrains(self) -> bool:
        """The final step's (choose, final): slots of chosen trials, not sampled."""
        return self.label in (CHOOSE, FINAL)


def study_suffix(label: str) -> str:
    """A stage's study is NAME.<this>: stage0, stage1, ..., choose, final."""
    return label if label in (CHOOSE, FINAL) else f"stage{label}"


def plan(n_trials: int, stages: list[dict], final: dict | None) -> list[Stage]:
    """The stages of the settings (`stages` as {n_trials, overrides}), the final last."""
    out = []
    for i, st in enumerate(stages or [{"n_trials": None, "overrides": []}]):
        n = n_trials if st["n_trials"] is None else st["n_trials"]
        positive_int(f"stages[{i}].n_trials", n)
        out.append(Stage(str(i), i, n, list(st["overrides"])))
    if final is not None:
        compared, seeds = final["top_m"], final["seeds"]
        if final["choose_in"] == "last_stage":  # then only the winner retrains in final
            out.append(Stage(CHOOSE, len(out), compared * seeds, out[-1].overrides))
            compared = 1
        out.append(Stage(FINAL, len(out), compared * seeds, list(final["overrides"])))
    return out


def trial_seed(seed: int, stage: int, number: int) -> int:
    """A sampler seed per (sweep seed, stage, trial number): a second worker does not
    replay the first one's draws, and one worker is reproducible."""
    return int(np.random.SeedSequence([seed, stage, number]).generate_state(1)[0])


# --- a stage's trials ---------------------------------------------------------------

def first_value(t: FrozenTrial) -> float | None:
    """A trial's value, or its first objective's (FrozenTrial.value refuses several)."""
    return t.values[0] if t.values else None


def counts(t: FrozenTrial) -> bool:
    """Whether a trial counts in its stage's budget: complete, pruned, running (alive),
    or failed with an outcome; not one dropped or carried in."""
    return CARRIED not in t.user_attrs and (
        t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
        or (t.state == TrialState.FAIL and FAILURE in t.user_attrs))


def counted(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    return sorted((t for t in trials if counts(t)), key=lambda t: t.number)


def within_budget(trials: list[FrozenTrial], n_trials: int, asked: list[int]) -> list[int]:
    """Of the trial numbers this worker just asked, those among the stage's first
    n_trials counted trials (the others are over the budget: another worker took it)."""
    allowed = {t.number for t in counted(trials)[:n_trials]}
    return [n for n in asked if n in allowed]


@dataclass
class StageRecord:
    """What a stage left: its label, the space it searched, its counted finished
    trials, and (the final step's) the params it retrained."""

    label: str
    params: list  # [_space.Param]
    trials: list[FrozenTrial]
    candidates: list[dict] | None = None

    def _in(self, state) -> list[FrozenTrial]:
        return [t for t in self.trials if t.state == state]

    def complete(self) -> list[FrozenTrial]:
        return self._in(TrialState.COMPLETE)

    def pruned(self) -> list[FrozenTrial]:
        return self._in(TrialState.PRUNED)

    def failed(self) -> list[FrozenTrial]:
        return self._in(TrialState.FAIL)

    def top(self, k: int, maximize: bool, distinct: bool = False) -> list[FrozenTrial]:
        """The best k complete trials; `distinct`: the best of each configuration."""
        ranked = sorted(self.complete(), key=first_value, reverse=maximize)
        if distinct:  # a categorical space can repeat a configuration
            first: dict = {}
            for t in ranked:
                first.setdefault(slot_key(t.params), t)
            ranked = list(first.values())
        return ranked[:k]


def is_log(d) -> bool:
    return bool(getattr(d, "log", False))


def is_numeric(d) -> bool:
    return isinstance(d, (FloatDistribution, IntDistribution))


def narrow(params: list, best: list[dict], margin: float) -> list:
    """Coarse to fine: each log-scaled numeric parameter's interval becomes the span of
    its values in `best`, widened by `margin` decades each side, inside the old one."""
    out = []
    for p in params:
        d, values = p.distribution, [b[p.name] for b in best if p.name in b]
        if not (is_log(d) and is_numeric(d) and values):
            out.append(p)
            continue
        widen = 10.0 ** margin
        low, high = max(d.low, min(values) / widen), min(d.high, max(values) * widen)
        if isinstance(d, IntDistribution):
            d = IntDistribution(max(d.low, math.floor(low)), min(d.high, math.ceil(high)),
                                log=True)
        else:
            d = FloatDistribution(low, high, log=True)
        out.append(dataclasses.replace(p, distribution=d))
    return out


def narrowed(last: StageRecord, top_k: int, margin: float, maximize: bool) -> list:
    """The next stage's space: the span of the last stage's best top_k; its own space
    when fewer than two completed (one point is no span to search)."""
    top = last.top(top_k, maximize)
    if len(top) < min(top_k, 2):
        log.warning("stage %s: %d complete trial(s), the rest pruned or failed: the next "
                    "stage searches the same space (prune less: e.g. the median pruner's "
                    "n_startup_trials)", last.label, len(top))
        return last.params
    if top_k > 1 and last.pruned() and len(top) == len(last.complete()):
        log.warning("stage %s: top_k=%d takes all %d complete trials (%d pruned), a poor "
                    "one too: set hydra.sweeper.top_k below the number the pruner lets "
                    "finish", last.label, top_k, len(top), len(last.pruned()))
    return narrow(last.params, [t.params for t in top], margin)


def alike(records: list[StageRecord], overrides_of: dict[str, list[str]],
          overrides: list[str]) -> list[StageRecord]:
    """The earlier searched stages that trained as a stage with `overrides` does: their
    trials scored the same objective, so its sampler may learn from them."""
    return [r for r in records if r.label not in (CHOOSE, FINAL)
            and overrides_of[r.label] == overrides]


# --- a job's outcome ----------------------------------------------------------------

@dataclass
class Verdict:
    """How a trial ends: its values, or why it failed; `fatal`: every trial would fail
    alike (the sweep stops, the trial is dropped rather than counted)."""

    values: list[float] | None = None
    failure: str | None = None
    fatal: str | None = None
    test_acc: float | None = None
    pruned_at: int | None = None


def verdict(returned, objectives: list[str]) -> Verdict:
    """A job's return value (a number, numbers, or an mlplab.trial.Outcome) judged."""
    try:
        outcome = read_outcome(returned, objectives)
    except ValueError as err:
        return Verdict(failure=str(err), fatal=str(err))
    if outcome.failure is not None:
        return Verdict(failure=outcome.failure)
    missing = [o for o in objectives if o not in outcome.final]
    if missing:
        return Verdict(failure=f"no objective {missing} in the task's outcome",
                       fatal=f"the task's outcome has {sorted(outcome.final)}")
    values = [outcome.final[o] for o in objectives]
    if not all(isinstance(v, (int, float)) for v in values):
        return Verdict(failure=f"objectives {objectives} are {values}: not numbers",
                       fatal=f"the task's outcome has {values}; allowed numeric metrics")
    if not all(math.isfinite(v) for v in values):
        return Verdict(failure=f"diverged: the objective is {values}")
    return Verdict(values, test_acc=outcome.final.get(TEST_ACC), pruned_at=outcome.pruned_at)


# --- resume -------------------------------------------------------------------------

def resume_diffs(stored: dict, wanted: dict, started: set[str]) -> list[str]:
    """What keeps a study started with `stored` settings from resuming with `wanted`
    (empty: it may). A stage's n_trials may grow until the next stage (`started`:
    labels of stages whose study exists) has started; the final step's retrains are
    slots, so its top_m, seeds and choose_in may change."""
    diffs = [f"{k} {stored.get(k)!r} -> {v!r}" for k, v in wanted.items()
             if k != "stages" and stored.get(k) != v]
    old, new = ([st for st in stages if st["stage"] != CHOOSE]
                for stages in (stored.get("stages", []), wanted["stages"]))
    if [st["stage"] for st in old] != [st["stage"] for st in new]:
        return diffs + [f"stages {[st['stage'] for st in old]} -> "
                        f"{[st['stage'] for st in new]}"]
    for i, (was, now) in enumerate(zip(old, new, strict=True)):
        label, before, after = now["stage"], was["n_trials"], now["n_trials"]
        if was["overrides"] != now["overrides"]:
            diffs.append(f"stage {label} overrides {was['overrides']} -> {now['overrides']}")
        if label == FINAL:
            continue
        if after < before:
            diffs.append(f"stage {label} n_trials {before} -> {after} (a budget may grow, "
                         "not shrink)")
        elif after > before and i + 1 < len(new):
            nxt = new[i + 1]["stage"]
            begun = [a for a in ([CHOOSE, FINAL] if nxt == FINAL else [nxt]) if a in started]
            if begun:
                diffs.append(f"stage {label} n_trials {before} -> {after} (stage "
                             f"{begun[0]} already started from its trials)")
    return diffs


# --- the final step -----------------------------------------------------------------

def slot_key(params: dict) -> tuple:
    return tuple(sorted(params.items()))


def retrain_plan(records: list[StageRecord], label: str, top_m: int, seeds: int,
                 base_seed: int, directions: list[str], tolerance: float
                 ) -> tuple[StageRecord, list[dict], list[int]]:
    """The last searched stage, the candidates (params) and the seeds the step `label`
    retrains: choose: the best top_m (several objectives: the front member the rule
    picks) with new seeds; final: the choose step's winner, or those candidates."""
    last = next(r for r in reversed(records) if r.label != CHOOSE)
    maximize = directions[0] == "maximize"
    top = last.top(top_m, maximize, distinct=True)
    if len(directions) > 1:
        picked = front_pick(pareto_front(last.trials, directions), directions, tolerance)
        top = [picked] if picked is not None else []
    candidates = [t.params for t in top]
    chosen = [base_seed + i for i in range(seeds)]
    if label == CHOOSE:  # not the stage's seed: its draw put these trials on top
        chosen = [s + 1 for s in chosen] if len(top) > 1 else []
    elif records[-1].label == CHOOSE:
        candidates = [winner(records[-1], maximize)]
    return last, candidates, chosen


def free_slots(keys: list[tuple], taken: set[tuple]) -> list[int]:
    """Indices of the slots no trial holds (complete, running, or tried by this worker)."""
    return [i for i, key in enumerate(keys) if key not in taken]


def first_of_their_slot(asked: list[int], trials: list[FrozenTrial],
                        keys: set[str]) -> list[int]:
    """Of the trial numbers asked, those that are the lowest-numbered complete or
    running trial of their slot (two workers may pick the same free slot at once)."""
    holder: dict = {}
    for t in sorted(trials, key=lambda t: t.number):
        if t.state in (TrialState.COMPLETE, TrialState.RUNNING) and set(t.params) >= keys:
            holder.setdefault(slot_key(t.params), t.number)
    by_number = {t.number: t for t in trials}
    return [n for n in asked if holder.get(slot_key(by_number[n].params)) == n]


@dataclass
class Candidate:
    """A configuration of the final step and its retrains' accuracies, one per seed."""

    params: dict
    val: list[float]
    test: list[float]

    @staticmethod
    def spread(values: list[float]) -> float | None:
        return statistics.stdev(values) if len(values) > 1 else None


def candidates(final: StageRecord) -> list[Candidate]:
    """The final step's candidates with their complete retrains (the newest per seed)."""
    newest = {slot_key(t.params): t for t in sorted(final.complete(), key=lambda t: t.number)}
    out = []
    for params in final.candidates or []:
        runs = [t for t in newest.values()
                if all(t.params.get(k) == v for k, v in params.items())]
        out.append(Candidate(params, [first_value(t) for t in runs],
                             [t.user_attrs[TEST_ACC] for t in runs if TEST_ACC in t.user_attrs]))
    return out


def choose(cands: list[Candidate], maximize: bool) -> Candidate | None:
    """The best mean validation among the candidates with the most complete retrains
    (one that lost a retrain is compared only when every one did); test plays no part."""
    most = max((len(c.val) for c in cands), default=0)
    scored = [c for c in cands if c.val and len(c.val) == most]
    sign = 1 if maximize else -1
    return max(scored, key=lambda c: sign * statistics.fmean(c.val)) if scored else None


def winner(compared: StageRecord, maximize: bool) -> dict:
    """The params a choose step chose (a lone candidate is chosen uncompared)."""
    chosen = choose(candidates(compared), maximize)
    return chosen.params if chosen is not None else compared.candidates[0]


def _signs(directions: list[str]) -> list[int]:
    """+1 per objective to maximise, -1 per one to minimise: larger signed is better."""
    return [1 if d == "maximize" else -1 for d in directions]


def pareto_front(trials: list[FrozenTrial], directions: list[str]) -> list[FrozenTrial]:
    """The complete trials no other beats in every objective, best first objective first."""
    signs = _signs(directions)
    scored = [(t, [s * v for s, v in zip(signs, t.values, strict=True)])
              for t in trials if t.state == TrialState.COMPLETE]

    def beaten(a):
        return any(all(x >= y for x, y in zip(b, a, strict=True)) and b != a
                   for _, b in scored)

    front = [t for t, a in scored if not beaten(a)]
    return sorted(front, key=lambda t: (-signs[0] * t.values[0], t.number))


def front_pick(front: list[FrozenTrial], directions: list[str],
               tolerance: float) -> FrozenTrial | None:
    """Among the front members within `tolerance` of the best first objective, the
    best in the second (then the third, ...)."""
    if not front:
        return None
    signs, best = _signs(directions), front[0].values[0]
    # a hair of slack: 0.55 - 0.54 is 0.0100000001 in floats, and within 0.01
    near = [t for t in front if signs[0] * (best - t.values[0]) <= tolerance + 1e-12]
    return max(near, key=lambda t: ([s * v for s, v in zip(signs[1:], t.values[1:],
                                                           strict=True)], -t.number))
