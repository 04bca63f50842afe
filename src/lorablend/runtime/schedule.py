"""LoRA weights that change over the denoising steps: keyframes ``[(position, weight), ...]`` (position in [0, 1]
of the steps, or an absolute step number above 1, as sd-webui-loractl reads ``<lora:name:1.0@0,0@0.6>``), linear
between keyframes and flat beyond the ends. A schedule runs through per-sample weights
(``LoraRuntime.call_sample_weights``): before the first step and after every step only the weight vectors change —
no term is rebuilt, nothing recompiles.

>>> weight_at(parse_keyframes("1.0@0,0@0.6"), step=3, steps=10)
0.5
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

Keyframes = tuple[tuple[float, float], ...]
MAX_KEYFRAMES = 32


def parse_keyframes(value: Any, what: str = "schedule") -> Keyframes:
    """Keyframes from a number (constant), sd-webui-loractl text ``"W@P,W@P"`` or a list of ``[position, weight]``;
    ``ValueError`` naming ``what`` for anything else.

    >>> parse_keyframes([[0.6, 0.0], [0, 1.0]]), parse_keyframes(0.5)
    (((0.0, 1.0), (0.6, 0.0)), ((0.0, 0.5),))
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        points = [(0.0, float(value))]
    elif isinstance(value, str):
        try:
            points = [(float(p), float(w)) for w, _, p in (item.strip().partition("@") for item in value.split(","))]
        except ValueError:
            raise ValueError(f"{what} {value!r}: write WEIGHT@POSITION pairs, e.g. 1.0@0,0@0.6") from None
    elif isinstance(value, Sequence) and value and all(isinstance(p, Sequence) and len(p) == 2 for p in value):
        points = [(float(p), float(w)) for p, w in value]
    else:
        raise ValueError(f"{what} {value!r}: give a weight, or keyframes [[position, weight], ...], "
                         "e.g. [[0, 1.0], [0.6, 0.0]]")
    if not 0 < len(points) <= MAX_KEYFRAMES or any(not (math.isfinite(p) and math.isfinite(w)) or p < 0
                                                   for p, w in points):
        raise ValueError(f"{what} {value!r}: 1 to {MAX_KEYFRAMES} keyframes, finite weights, positions >= 0")
    return tuple(sorted(points))


def takes_sample_weights(adapter: Any) -> bool:
    """Whether every delta of ``adapter`` (an ``Adapter``, not loaded) is one low-rank pair without a bias delta:
    what per-sample weights, and so schedules and mixed batches, need (``LoraRuntime.sample_weight_blockers`` asks
    the same of loaded adapters). LoHa, LoKr, full matrices and bias deltas are dense per layer.

    >>> takes_sample_weights(adapter)                                      # doctest: +SKIP
    True
    """
    return all(d.low_rank_factors() is not None and not d.changes_bias for d in adapter.deltas.values())


def weight_at(points: Keyframes, step: int, steps: int) -> float:
    """The weight of step ``step`` (0-based) of ``steps``: its position is ``step / steps``; a keyframe position
    above 1 is an absolute step number.

    >>> weight_at(((0.0, 1.0), (0.5, 0.0)), 1, 4), weight_at(((0.0, 1.0), (2.0, 3.0)), 1, 4)
    (0.5, 2.0)
    """
    at = step / max(1, steps)
    keys = [(p / steps if p > 1 else p, w) for p, w in points]
    if at <= keys[0][0]:
        return keys[0][1]
    for (p0, w0), (p1, w1) in zip(keys, keys[1:]):
        if at <= p1:
            return w0 + (w1 - w0) * (at - p0) / (p1 - p0) if p1 > p0 else w1
    return keys[-1][1]


class StepSchedule:
    """Each image's schedule: ``rows[b]`` maps adapter names to keyframes (a constant is one keyframe). Writes the
    per-sample weight matrix for a step and gives the step callback that does it between steps.

    >>> StepSchedule([{"a": ((0.0, 1.0), (1.0, 0.0))}]).matrix_at(1, 2, {"a": 0})
    tensor([[0.5000]])
    """

    def __init__(self, rows: Sequence[Mapping[str, Keyframes]]) -> None:
        self.rows = [dict(row) for row in rows]

    def row_at(self, index: int, step: int, steps: int) -> dict[str, float]:
        """Image ``index``'s weights at ``step``."""
        return {name: weight_at(points, step, steps) for name, points in self.rows[index].items()}

    def matrix_at(self, step: int, steps: int, columns: Mapping[str, int]) -> torch.Tensor:
        """The (images, adapters) weights of ``step`` in ``columns`` order (an adapter not in a row: 0)."""
        matrix = torch.zeros(len(self.rows), len(columns))
        for b in range(len(self.rows)):
            for name, w in self.row_at(b, step, steps).items():
                matrix[b, columns[name]] = w
        return matrix

    def callback(self, samples: Any, steps: int, then: Callable | None = None) -> Callable:
        """A ``callback_on_step_end`` that sets the next step's weights in ``samples`` (a ``SampleWeights``), then
        calls ``then`` (the caller's own callback) if given."""
        def on_step_end(pipe: Any, step: int, timestep: Any, tensors: dict) -> dict:
            samples.matrix.copy_(self.matrix_at(step + 1, steps, samples.columns))
            samples.generation += 1
            return then(pipe, step, timestep, tensors) if then is not None else tensors
        return on_step_end


def expert_keyframes(pipeline: Any, steps: int, high: float = 1.0, low: float = 0.0) -> Keyframes:
    """Wan 2.2's high / low expert split as a schedule: keyframes giving ``high`` on the steps the high-noise
    ``transformer`` runs (timestep at or above ``boundary_ratio × num_train_timesteps``) and ``low`` on the
    low-noise ``transformer_2``'s, read from ``pipeline``'s own scheduler for ``steps`` steps (a copy: the
    pipeline's is untouched). On a one-expert pipeline (no ``boundary_ratio``) every step is ``high``'s.

    >>> pipeline(prompt, num_inference_steps=30,
    ...          lora_schedule={"lightning": expert_keyframes(pipeline, 30, high=1.0, low=0.3)})   # doctest: +SKIP
    """
    import copy

    ratio = getattr(pipeline.config, "boundary_ratio", None)
    if ratio is None:
        return ((0.0, float(high)),)
    scheduler = copy.deepcopy(pipeline.scheduler)
    scheduler.set_timesteps(int(steps))
    boundary = ratio * scheduler.config.num_train_timesteps
    timesteps = [float(t) for t in scheduler.timesteps]
    first_low = next((i for i, t in enumerate(timesteps) if t < boundary), len(timesteps))
    if first_low == 0:
        return ((0.0, float(low)),)
    if first_low == len(timesteps):
        return ((0.0, float(high)),)
    n = len(timesteps)  # (positions as fractions: step k is at k / n, so the change lands between two steps)
    return ((0.0, float(high)), ((first_low - 1) / n, float(high)), (first_low / n, float(low)))


@dataclass(frozen=True)
class ExpertSplit:
    """One LoRA's weight per Wan 2.2 A14B expert, as a request gives it (``{"high": 1.0, "low": 0.3}``, or
    WanGP's phase multipliers ``1.0;0.3``) before the pipeline and step count are known; ``keyframes`` turns it
    into a schedule (:func:`expert_keyframes`), and refuses a pipeline without two experts (``ValueError``)
    rather than silently giving every step ``high``. ``given``: the request field it came from (for errors).

    >>> ExpertSplit(1.0, 0.3).keyframes(pipeline, 30)                        # doctest: +SKIP
    ((0.0, 1.0), (0.8, 1.0), (0.8333333333333334, 0.3))
    """

    high: float
    low: float
    given: str = field(default="loras", compare=False)

    def keyframes(self, pipeline: Any, steps: int) -> Keyframes:
        """The schedule of this split on ``pipeline`` for ``steps`` steps."""
        if getattr(pipeline.config, "boundary_ratio", None) is None:
            raise ValueError(f"a high/low expert split needs Wan 2.2 A14B's two experts (transformer and "
                             f"transformer_2, a boundary_ratio); {type(getattr(pipeline, 'pipe', pipeline)).__name__} "
                             "here has one denoiser: give one weight")
        return expert_keyframes(pipeline, steps, self.high, self.low)


def scheduled_call(runtime: Any, schedule: Mapping[str, Any], call: Callable[..., Any], kwargs: dict,
                   steps: int) -> Any:
    """``call(**kwargs)`` with the active adapters named in ``schedule`` weighted per step (keyframes times their
    ``set_adapters`` weight; the other active adapters as set). What ``pipeline(..., lora_schedule=…)`` runs.

    >>> scheduled_call(pipeline.runtime, {"detail": [[0, 1.0], [0.6, 0.0]]}, pipe, kwargs, 30)  # doctest: +SKIP
    """
    unknown = sorted(set(schedule) - set(runtime.active))
    if unknown:
        raise ValueError(f"lora_schedule names {unknown}, which are not active; set_adapters them first "
                         f"(active: {runtime.active})")
    row = {name: ((0.0, 1.0),) for name in runtime.active}
    row.update({name: parse_keyframes(v, f"lora_schedule[{name!r}]") for name, v in schedule.items()})
    plan = StepSchedule([row])
    with runtime.call_sample_weights([plan.row_at(0, 0, steps)]) as samples:
        kwargs["callback_on_step_end"] = plan.callback(samples, steps, kwargs.get("callback_on_step_end"))
        return call(**kwargs)


__all__ = ["ExpertSplit", "Keyframes", "StepSchedule", "expert_keyframes", "parse_keyframes", "scheduled_call",
           "takes_sample_weights", "weight_at"]
