"""Adapters that change from one denoising step to the next, through diffusers' ``callback_on_step_end``.

A schedule is one ``(names, weights)`` per step; :class:`StepAdapters` activates step 0's before the call and
each next step's after a step ends (only when it differs, so a constant run costs nothing). LoRA Switch
(arXiv 2402.16843) alternates the LoRAs every ``every`` steps; K-LoRA's runtime mode uses one adapter per
distinct per-layer selection (:mod:`lorablend.merge.klora`).

>>> lora_switch_schedule(["sks", "stripes"], steps=4)
[(['sks'], [1.0]), (['stripes'], [1.0]), (['sks'], [1.0]), (['stripes'], [1.0])]
"""

from __future__ import annotations

from typing import Any, Sequence

Step = tuple[list[str], list[float]]


def lora_switch_schedule(names: Sequence[str], steps: int, *, every: int = 1, weights: Sequence[float] | None = None) -> list[Step]:
    """LoRA Switch: one LoRA at a time, in turn, each for ``every`` steps.

    >>> lora_switch_schedule(["a", "b"], steps=3, every=2)
    [(['a'], [1.0]), (['a'], [1.0]), (['b'], [1.0])]
    """
    if not names or every < 1 or steps < 1:
        raise ValueError(f"LoRA Switch needs at least one LoRA, steps >= 1 and every >= 1 (got {list(names)}, "
                         f"steps={steps}, every={every})")
    ws = [1.0] * len(names) if weights is None else [float(w) for w in weights]
    return [([names[(i // every) % len(names)]], [ws[(i // every) % len(names)]]) for i in range(steps)]


def klora_schedule(pipe: Any, plan: Any, steps: int, *, prefix: str = "klora") -> list[Step]:
    """K-LoRA at runtime: load one adapter per distinct selection the steps make (``progress = i / (steps - 1)``)
    into ``pipe`` and return the schedule that activates step i's. The adapters are named ``{prefix}-<n>``.

    >>> schedule = klora_schedule(pipe, klora_plan(subject, style), steps=20)   # doctest: +SKIP
    """
    schedule: list[Step] = []
    loaded: dict[tuple, str] = {}
    for i in range(steps):
        progress = i / max(1, steps - 1)
        picks = tuple(sorted(plan.choose(progress).items()))
        if picks not in loaded:
            name = f"{prefix}-{len(loaded)}"
            pipe.load_lora_weights(plan.adapter(progress, name), adapter_name=name)
            loaded[picks] = name
        schedule.append(([loaded[picks]], [1.0]))
    return schedule


class StepAdapters:
    """Drive a pipeline's active adapters by a per-step schedule; pass the object as ``callback_on_step_end``.

    >>> switch = StepAdapters(pipe, lora_switch_schedule(["sks", "stripes"], steps=20))   # doctest: +SKIP
    >>> image = pipe(prompt, num_inference_steps=20, callback_on_step_end=switch.start())  # doctest: +SKIP
    """

    def __init__(self, pipe: Any, schedule: Sequence[Step]) -> None:
        if not schedule:
            raise ValueError("a step schedule needs one (names, weights) per step; got none")
        self.pipe = pipe
        self.schedule = list(schedule)
        self.current: Step | None = None
        self.seen: list[Step] = []

    def _activate(self, step: Step) -> None:
        if step != self.current:
            self.pipe.set_adapters(step[0], adapter_weights=step[1])
            self.current = step
        self.seen.append(step)

    def start(self) -> "StepAdapters":
        """Activate step 0's adapters; returns self, to pass as the callback."""
        self.current, self.seen = None, []
        self._activate(self.schedule[0])
        return self

    def __call__(self, _pipe: Any, step: int, _timestep: Any, callback_kwargs: dict) -> dict:
        if step + 1 < len(self.schedule):
            self._activate(self.schedule[step + 1])
        return callback_kwargs
