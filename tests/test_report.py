"""report.py: the per-key load report — every key of an input is mapped, unsupported (with why) or unknown."""

from __future__ import annotations

from lorablend.report import LoadReport


def _report():
    r = LoadReport(source="a.safetensors", format="kohya")
    r.add("lora_unet_x.lora_down.weight", "mapped", target="unet.x")
    r.add("lora_unet_x.oft_blocks", "unsupported", reason="OFT is not applied")
    r.add("stray", "unknown", reason="no module named stray")
    return r


def test_counts_and_completeness_follow_the_records():
    r = _report()
    assert r.counts() == {"mapped": 1, "unsupported": 1, "unknown": 1}
    assert not r.complete
    assert [k.key for k in r.mapped] == ["lora_unet_x.lora_down.weight"] and r.mapped[0].target == "unet.x"
    only_mapped = LoadReport(source="b", format="diffusers")
    only_mapped.add("k", "mapped", target="unet.k")
    assert only_mapped.complete


def test_the_summary_and_the_dict_name_what_was_not_applied_and_why():
    r = _report()
    text = r.summary()
    assert "a.safetensors" in text and "OFT is not applied" in text and "stray" in text
    assert "1 unsupported, 1 unknown" in str(r)
    d = r.to_dict()
    assert d["source"] == "a.safetensors" and d["counts"] == r.counts()
