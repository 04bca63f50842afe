"""sweep/plan.py: a sweep's cells decided before any model loads — keys from what decides the image, grouped by mix."""

from __future__ import annotations

from lorablend.sweep.plan import SweepSettings, cell_key, group_cells, naive_order, plan_cells, switches

SPEC = SweepSettings("m/", [("a.safetensors", "a"), ("b.safetensors", "b")], [0.0, 1.0], ["a cat", "a dog"], [0, 1],
                     steps=2)


def test_every_prompt_seed_and_mix_is_one_cell_taken_mix_by_mix():
    cells = plan_cells(SPEC)
    assert len(cells) == 2 * 2 * 4 and len({c.key for c in cells}) == len(cells)
    assert {(c.prompt, c.seed, c.mix) for c in cells} == {(c.prompt, c.seed, c.mix) for c in naive_order(SPEC)}
    assert switches(cells) == 4 < switches(naive_order(SPEC))


def test_a_key_changes_with_anything_that_decides_the_image_and_only_then():
    settings = SPEC.settings()
    base = cell_key(settings, "a cat", 0, [1.0, 0.0])
    assert base == cell_key(dict(settings), "a cat", 0, [1.0, 0.0])
    assert len({base, cell_key(settings, "a dog", 0, [1.0, 0.0]), cell_key(settings, "a cat", 1, [1.0, 0.0]),
                cell_key(settings, "a cat", 0, [1.0, 0.5]), cell_key({**settings, "steps": 3}, "a cat", 0, [1.0, 0.0])}) == 5


def test_groups_keep_one_mix_and_cover_every_cell_once():
    cells = plan_cells(SPEC)
    groups = group_cells(cells, workers=2, max_cells=3)
    assert sorted(c.key for g in groups for c in g) == sorted(c.key for c in cells)
    assert all(len({c.mix for c in g}) == 1 and len(g) <= 3 for g in groups)


def test_a_schedule_axis_adds_columns_whose_keys_leave_constant_cells_as_they_were():
    spec = SweepSettings(**{**SPEC.to_dict(), "schedules": ["", "1@0,0@0.5"]})
    cells = plan_cells(spec)
    assert len(cells) == 2 * len(plan_cells(SPEC))
    constant = [c for c in cells if not c.schedule]
    assert [c.key for c in constant] == [c.key for c in plan_cells(SPEC)]  # a sweep from before resumes as it was
    assert "schedules" not in SPEC.settings() and spec.settings()["schedules"] == ["", "1@0,0@0.5"]
    scheduled = [c for c in cells if c.schedule]
    assert all(c.label.endswith(" @ 1@0,0@0.5") and c.record()["schedule"] == "1@0,0@0.5" for c in scheduled)
    assert len({c.file for c in cells}) == len(cells) and switches(cells) == 4  # a schedule is no switch
