"""The shipped family data agrees with the real module trees, and the configs they are built from with the real
config.json files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorablend.naming import STANDARD_FAMILIES, build_standard_index, standard_index
from lorablend.naming.configs import CLIP_L, OPENCLIP_BIGG, SD1_UNET, SDXL_UNET
from lorablend.naming.family_data import COLUMNS, index_to_data
from realdata import CONFIGS, requires_realdata

ROOT = Path(__file__).resolve().parents[2]
LIVE_PATH = COLUMNS.index("live_path")


def _comparable(data: dict) -> dict:
    """The data without its provenance line, text-encoder live paths without the ``text_model.`` prefix that
    transformers 5 drops (the target keys, which the aliases come from, keep it either way)."""
    rows = []
    for row in data["modules"]:
        row = list(row)
        if row[1] != "unet":
            row[LIVE_PATH] = row[LIVE_PATH].removeprefix("text_model.")
        rows.append(row)
    return {**{k: v for k, v in data.items() if k != "made_by"}, "modules": rows}


@pytest.mark.parametrize("family", STANDARD_FAMILIES)
def test_shipped_data_equals_the_meta_device_models(family):
    shipped = index_to_data(standard_index(family), made_by="")
    built = index_to_data(build_standard_index(family), made_by="")
    assert _comparable(shipped) == _comparable(built), (
        f"naming/families/{family}.json is stale: run scripts/make_family_data.py"
    )
    # the name tables readers use are derived from the rows, so they agree too
    live = build_standard_index(family)
    assert {k: standard_index(family).lookup_kohya(k) for k in live._kohya} == live._kohya


def test_family_files_are_package_data():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["lorablend.naming"]
    shipped = sorted(p.relative_to(ROOT / "src/lorablend/naming").as_posix()
                     for g in globs for p in (ROOT / "src/lorablend/naming").glob(g))
    assert shipped == [f"families/{f}.json" for f in sorted(STANDARD_FAMILIES)]


def _real(model: str, component: str) -> dict:
    return json.loads((CONFIGS / model / component / "config.json").read_text())


@requires_realdata
@pytest.mark.parametrize(
    "ours, model, component",
    [
        (SD1_UNET, "stable-diffusion-v1-5", "unet"),
        (CLIP_L, "stable-diffusion-v1-5", "text_encoder"),
        (SDXL_UNET, "stable-diffusion-xl-base-1.0", "unet"),
        (CLIP_L, "stable-diffusion-xl-base-1.0", "text_encoder"),
        (OPENCLIP_BIGG, "stable-diffusion-xl-base-1.0", "text_encoder_2"),
    ],
)
def test_configs_hold_the_published_numbers(ours, model, component):
    real = _real(model, component)
    assert {k: real[k] for k in ours if k in real} == {k: v for k, v in ours.items() if k in real}
    # a field we set that the published file leaves to its default would be a number of our own making
    assert set(ours) <= set(real), sorted(set(ours) - set(real))


# family -> the real configs of ../shared/realdata/newfamily_loras/2026/configs it stands for
_CONFIGS_2026 = CONFIGS.parent / "newfamily_loras" / "2026" / "configs"
_REAL_2026 = {
    "qwen-image": ["qwen-image"], "wan-1.3b": ["wan2.1-t2v-1.3b"],
    "wan-14b": ["wan2.1-t2v-14b", "wan2.2-t2v-a14b", "wan2.2-i2v-a14b"],
    "wan-i2v-14b": ["wan2.1-i2v-14b-480p", "wan2.1-i2v-14b-720p", "wan2.1-flf2v-14b-720p"],
    "wan-5b": ["wan2.2-ti2v-5b"], "flux2-dev": ["flux2-dev"], "flux2-klein-4b": ["flux2-klein-4b"],
    "flux2-klein-9b": ["flux2-klein-9b"], "z-image": ["z-image"],
}


@pytest.mark.skipif(not _CONFIGS_2026.is_dir(), reason="2026 configs not in ../shared")
@pytest.mark.parametrize("family", sorted(_REAL_2026))
def test_2026_configs_are_the_real_ones(family):
    from lorablend.naming.configs import NEW_TRANSFORMERS

    ours, _ = NEW_TRANSFORMERS[family]
    for name in _REAL_2026[family]:
        real = json.loads((_CONFIGS_2026 / name / "config.json").read_text())
        # Wan 2.2 I2V A14B's patch embedding reads 36 channels: a Conv3d, no LoRA layout's layer, same Linear tree
        skip = {"in_channels"} if name == "wan2.2-i2v-a14b" else set()
        differ = {k: (v, real.get(k)) for k, v in ours.items() if k not in skip and real.get(k, v) != v}
        assert not differ, (name, differ)
        assert all(k in real or k in ("guidance_embeds", "cross_attn_norm", "freq_dim") for k in ours), name
