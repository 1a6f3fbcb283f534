"""The interleaved A/B machinery of ``benchmarks/overhead.py``: trainers that take turns, block by block, in their own
threads (a turnstile callback times each step and lets a trainer run only during its turn), the schedule of turns,
and the statistics of paired step-time ratios. It knows nothing of supple's configurations; overhead.py builds the
trainers and reads the records."""

from __future__ import annotations

import random
import statistics
import threading
import time

__all__ = ["Finished", "Turn", "bootstrap_median_ci", "make_turnstile_class", "paired_ratios", "peak_from_profile",
           "quantile", "run_interleaved", "schedule", "time_fn"]


# ------------------------------------------------------------------------------------- turn-taking
class Finished(Exception):
    """Raised in a trainer's thread to end its ``train()`` at once, without running one more step."""


class Turn:
    __slots__ = ("config", "kind", "rep", "steps")

    def __init__(self, config: str, kind: str, rep: int, steps: int) -> None:
        self.config, self.kind, self.rep, self.steps = config, kind, rep, steps


def peak_from_profile(prof) -> int:
    """Peak of the running sum of allocator events (bytes) during the profiled window."""
    from torch._C._profiler import _EventType

    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    events.sort()
    live = peak = 0
    for _, size in events:
        live += size
        peak = max(peak, live)
    return peak


def make_turnstile_class():
    from transformers import TrainerCallback

    class Turnstile(TrainerCallback):
        """First callback of a trainer: times its steps and lets it run only during its turns."""

        def __init__(self, name: str) -> None:
            self.name = name
            self.go = threading.Event()
            self.done = threading.Event()
            self.finished = False
            self.turn: Turn | None = None
            self.steps_left = 0
            self.step_in_turn = 0
            self.t_last: float | None = None
            self.records: list[tuple[str, int, int, float]] = []  # (kind, rep, j, seconds)
            self.peaks: list[int] = []
            self._prof = None

        def on_step_begin(self, args, state, control, **kwargs):
            now = time.perf_counter()
            if self.t_last is not None:  # one step of the current turn just ended
                self.records.append((self.turn.kind, self.turn.rep, self.step_in_turn, now - self.t_last))
                self.step_in_turn += 1
                self.steps_left -= 1
                if self._prof is not None:
                    self._prof.stop()
                    self.peaks.append(peak_from_profile(self._prof))
                    self._prof = None
            if self.steps_left <= 0:
                self.t_last = None
                self.done.set()
                self.go.wait()
                self.go.clear()
                if self.finished:
                    raise Finished
            if self.turn is not None and self.turn.kind == "memory":
                from torch.profiler import ProfilerActivity, profile

                self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
                self._prof.start()
            self.t_last = time.perf_counter()
            return control

        def on_train_end(self, args, state, control, **kwargs):
            self.done.set()
            return control

    return Turnstile



def schedule(names: list[str], warmup: int, reps: int, block: int, mem_steps: int, seed: int) -> list[Turn]:
    turns = [Turn(n, "warmup", -1, warmup) for n in names if warmup > 0]
    rng = random.Random(seed)
    for rep in range(reps):
        order = names[rep % len(names) :] + names[: rep % len(names)]  # rotate: no fixed neighbour
        if rep >= len(names):
            rng.shuffle(order)
        turns += [Turn(n, "timed", rep, block) for n in order]
    turns += [Turn(n, "memory", -1, 1) for _ in range(mem_steps) for n in names]
    return turns


def run_interleaved(trainers, turns: list[Turn], log) -> None:
    errors: list[BaseException] = []
    threads = []
    for name, trainer, gate, _ in trainers:

        def target(trainer=trainer, gate=gate):
            try:
                trainer.train()
            except Finished:
                pass
            except BaseException as exc:  # noqa: BLE001 - surfaced in the main thread
                errors.append(exc)
            finally:
                gate.done.set()

        th = threading.Thread(target=target, name=f"train-{name}", daemon=True)
        threads.append(th)

    def wait(gate) -> None:
        while not gate.done.wait(1.0):
            if errors:
                break
        if errors:
            raise RuntimeError(f"a trainer failed: {errors[0]!r}") from errors[0]

    # Start the trainers one at a time: each runs its setup, then blocks at its first step.
    for th, (_, _, gate, _) in zip(threads, trainers):
        th.start()
        wait(gate)
    gates = {name: gate for name, _, gate, _ in trainers}
    t0 = time.perf_counter()
    for i, turn in enumerate(turns):
        gate = gates[turn.config]
        gate.done.clear()
        gate.turn, gate.steps_left, gate.step_in_turn = turn, turn.steps, 0
        gate.go.set()
        wait(gate)
        if (i + 1) % max(len(turns) // 10, 1) == 0:
            log(f"  {i + 1}/{len(turns)} turns, {time.perf_counter() - t0:.0f} s")
    for th, (_, _, gate, _) in zip(threads, trainers):
        gate.done.clear()
        gate.finished = True
        gate.go.set()
        th.join()
    if errors:
        raise RuntimeError(f"a trainer failed: {errors[0]!r}") from errors[0]


# ------------------------------------------------------------------------------------- statistics
def quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    pos = (len(s) - 1) * q
    lo, hi = int(pos), min(int(pos) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def paired_ratios(times: dict[str, dict[int, dict[int, float]]], name: str, skip_first: int) -> dict[int, list[float]]:
    """{rep: [t_config[rep][j] / t_base[rep][j] for j]} over steps j >= skip_first of each block."""
    out = {}
    base = times["baseline"]
    for rep, steps in times[name].items():
        rs = [steps[j] / base[rep][j] for j in sorted(steps) if j >= skip_first and j in base.get(rep, {})]
        if rs:
            out[rep] = rs
    return out


def bootstrap_median_ci(by_rep: dict[int, list[float]], n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    reps = list(by_rep)
    if len(reps) < 2:
        return float("nan"), float("nan")
    rng = random.Random(seed)
    meds = []
    for _ in range(n_boot):
        sample = [x for _ in reps for x in by_rep[rng.choice(reps)]]
        meds.append(statistics.median(sample))
    return quantile(meds, 0.025), quantile(meds, 0.975)


# ------------------------------------------------------------------------------------- own time
def time_fn(fn, reps: int, warmup: int = 3) -> float:
    """Median wall time of ``fn()`` in seconds."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


