import json
from pathlib import Path

import pytest

from steer_heal import data
from steer_heal.config import FOUNDATIONS, Config
from steer_heal.errors import UserError

CLIFFORD = Path("/work/shared/data/mfv_classic_other_violate.jsonl")


def row(i: int, f: str = "Care", **kw) -> dict:
    r = {"id": f"v{i}", "text": f"You see person {i} do thing {i}.", "foundation_coarse": f}
    r |= {f"human_{g}": (90.0 if g == f else 1.0) for g in FOUNDATIONS}
    return r | kw


def write(tmp_path: Path, rows: list, name: str = "v.jsonl") -> Path:
    p = tmp_path / name
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return p


# ---------------------------------------------------------------- personas, prompts, dilemmas

def test_persona_default_pair_and_overrides():
    p = data.persona(Config())
    assert p["name"] == "care_vs_authority"
    assert all(str(p[k]).strip() for k in data.PERSONA_KEYS)
    assert p["target"] in FOUNDATIONS and p["direction"] in ("down", "up")
    q = data.persona(Config(persona_pos="I help.", persona_neg="I obey.", target="Loyalty", direction="up"))
    assert (q["pos"], q["neg"], q["target"], q["direction"]) == ("I help.", "I obey.", "Loyalty", "up")
    assert q["trait"] == p["trait"] and q["neutral"] == p["neutral"]


def test_persona_unknown_pair_lists_the_bundled_ones():
    with pytest.raises(UserError, match="no_such_pair") as e:
        data.persona(Config(persona="no_such_pair"))
    assert "care_vs_authority" in str(e.value)


def test_persona_empty_text(monkeypatch):
    table = {"p": {"pos": "  ", "neg": "b", "trait": "t", "target": "Care", "direction": "down", "neutral": "n"}}
    monkeypatch.setattr(data, "_bundled", lambda name: table)
    with pytest.raises(UserError, match="empty pos"):
        data.persona(Config(persona="p"))


def test_contexts_prompts_dilemmas():
    assert data.contexts() and all(isinstance(c, str) and c.strip() for c in data.contexts())
    base = data.prompts()
    assert data.prompts(3) == base[:3]
    long = data.prompts(2 * len(base) + 1)
    assert len(long) == 2 * len(base) + 1 and long[len(base)] == base[0]  # cycled
    items = data.dilemmas("care_vs_authority")
    assert items and all(set(data.DILEMMA_KEYS) <= set(it) for it in items)
    items[0]["prompt"] = "mutated"
    assert data.dilemmas("care_vs_authority")[0]["prompt"] != "mutated"  # the cache hands out copies
    with pytest.raises(UserError, match="nope"):
        data.dilemmas("nope")


# ---------------------------------------------------------------- vignettes

def test_bundled_vignettes_cover_every_foundation():
    vs = data.load_vignettes()
    assert {v["foundation"] for v in vs} == set(FOUNDATIONS)
    assert all(set(v) == {"id", "text", "foundation", "human", "frame"} and v["frame"] == "other_violate" for v in vs)
    assert len({v["id"] for v in vs}) == len(vs)


def test_missing_column_names_column_and_line(tmp_path):
    bad = row(2)
    del bad["foundation_coarse"]
    p = write(tmp_path, [row(1), bad])
    with pytest.raises(UserError, match="line 2.*foundation_coarse") as e:
        data.load_vignettes(p)
    assert str(p.name) in str(e.value)
    no_text = row(1)
    del no_text["text"]
    with pytest.raises(UserError, match="line 1.*'text'"):
        data.load_vignettes(write(tmp_path, [no_text], "t.jsonl"))


def test_bad_json_line(tmp_path):
    with pytest.raises(UserError, match="line 3: not valid JSON"):
        data.load_vignettes(write(tmp_path, [row(1), "", "{oops"]))


def test_missing_and_empty_file(tmp_path):
    with pytest.raises(UserError, match=r"not found: .*nothere\.jsonl.*--vignettes PATH"):
        data.load_vignettes(tmp_path / "nothere.jsonl")
    with pytest.raises(UserError, match="empty"):
        data.load_vignettes(write(tmp_path, ["", "  "]))


def test_unknown_foundation(tmp_path):
    with pytest.raises(UserError, match="line 2: unknown foundation 'Purity'"):
        data.load_vignettes(write(tmp_path, [row(1), row(2, "Purity")]))


def test_human_columns_optional_but_all_or_none(tmp_path):
    bare = {"text": "You see a man wearing a hat.", "foundation_coarse": "social norms"}
    vs = data.load_vignettes(write(tmp_path, [bare]))
    assert vs[0]["human"] == {} and vs[0]["foundation"] == "SocialNorms" and vs[0]["id"]
    partial = row(1)
    del partial["human_Liberty"]
    with pytest.raises(UserError, match="human_Liberty"):
        data.load_vignettes(write(tmp_path, [partial], "p.jsonl"))


def test_stratified_subset_covers_every_foundation(tmp_path):
    # 3 of each foundation, grouped as in the Clifford file: a plain head would be all Care
    rows = [row(10 * k + j, f) for k, f in enumerate(FOUNDATIONS) for j in range(3)]
    p = write(tmp_path, rows)
    for n in (7, 9):
        vs = data.load_vignettes(p, n)
        assert len(vs) == n and {v["foundation"] for v in vs} == set(FOUNDATIONS)
        assert vs == data.load_vignettes(p, n)  # deterministic
        ids = [r["id"] for r in rows]
        assert [ids.index(v["id"]) for v in vs] == sorted(ids.index(v["id"]) for v in vs)  # file order
    assert len(data.load_vignettes(p, 100)) == len(rows)


@pytest.mark.skipif(not CLIFFORD.is_file(), reason="Clifford vignettes not present")
def test_clifford_file_loads_and_stratifies():
    vs = data.load_vignettes(CLIFFORD)
    assert len(vs) == 132 and all(len(v["human"]) == 7 for v in vs)
    sub = data.load_vignettes(CLIFFORD, 14)
    assert len(sub) == 14 and {v["foundation"] for v in sub} == set(FOUNDATIONS)


# ---------------------------------------------------------------- tinymfv shapes and frames

def old_shape(r: dict) -> dict:
    """r in tinymfv's older label shape: percent strings under the foundation's name, "Not Wrong" for
    SocialNorms, no human_* columns."""
    out = {k: v for k, v in r.items() if not k.startswith("human_")}
    out |= {(f if f != "SocialNorms" else "Not Wrong"): f"{r['human_' + f]:.0f} %" for f in FOUNDATIONS}
    return out


def test_old_tinymfv_labels_are_read_not_dropped(tmp_path):
    rows = [row(i, f) for i, f in enumerate(FOUNDATIONS)]
    new = data.load_vignettes(write(tmp_path, rows, "new.jsonl"))
    old = data.load_vignettes(write(tmp_path, [old_shape(r) for r in rows], "old.jsonl"))
    assert [v["human"] for v in old] == [v["human"] for v in new] and all(len(v["human"]) == 7 for v in old)
    assert old[6]["human"]["SocialNorms"] == 90.0  # "Not Wrong" is SocialNorms
    bare = [{k: v for k, v in old_shape(row(1)).items() if k != "Not Wrong"}]
    with pytest.raises(UserError, match="Not Wrong"):
        data.load_vignettes(write(tmp_path, bare, "partial.jsonl"))
    with pytest.raises(UserError, match="not a number or a percentage"):
        data.load_vignettes(write(tmp_path, [row(1, human_Care="lots")], "bad.jsonl"))


def test_frame_from_the_file_name_the_texts_or_the_flag(tmp_path):
    selfish = [row(i, text=f"You laugh at person {i}.") for i in range(3)]
    assert data.vignette_info(write(tmp_path, [row(1)]))["frame"] == "other_violate"  # "You see ..."
    assert data.vignette_info(write(tmp_path, selfish, "s.jsonl"))["frame"] == "self_violate"
    assert data.vignette_info(write(tmp_path, [row(1)], "vignettes_x_self_violate.jsonl"))["frame"] == "self_violate"
    mixed = write(tmp_path, [row(9), *selfish], "mixed.jsonl")
    assert data.vignette_info(mixed)["frame"] is None and data.load_vignettes(mixed)[0]["frame"] is None
    assert {v["frame"] for v in data.load_vignettes(mixed, frame="self")} == {"self_violate"}
    with pytest.raises(UserError, match="--frame self contradicts"):
        data.load_vignettes(write(tmp_path, [row(1)], "vignettes_x_other_violate.jsonl"), frame="self")


def test_packed_tinymfv_rows_read_the_frame_column(tmp_path):
    packed = [{k: v for k, v in row(i).items() if k != "text"} | {"other_violate": f"You see {i}.",
                                                                   "self_violate": f"You do {i}."} for i in range(2)]
    p = write(tmp_path, packed)
    assert [v["text"] for v in data.load_vignettes(p)] == ["You see 0.", "You see 1."]
    assert data.vignette_info(p)["frame_from"].startswith("packed rows")
    vs = data.load_vignettes(p, frame="self")
    assert [(v["text"], v["frame"]) for v in vs] == [("You do 0.", "self_violate"), ("You do 1.", "self_violate")]


def test_missing_labels_are_said_once(tmp_path):
    from loguru import logger

    said: list[str] = []
    sink = logger.add(lambda m: said.append(str(m)), level="WARNING")
    try:
        info = data.vignette_info(write(tmp_path, [{"text": "You see a hat.", "foundation_coarse": "Care"}]))
    finally:
        logger.remove(sink)
    assert info["labelled"] == 0 and len(said) == 1 and "top1_agree will be NULL" in said[0]


@pytest.mark.skipif(not CLIFFORD.is_file(), reason="Clifford vignettes not present")
def test_clifford_file_is_other_violate_by_its_name():
    info = data.vignette_info(CLIFFORD)
    assert (info["frame"], info["frame_from"], info["labelled"]) == ("other_violate", "the file name", 132)


def test_a_repeated_vignette_id_is_refused_naming_the_id_and_both_lines(tmp_path):
    """One id standing for two texts would pair the wrong items in every interval (issue 23 item 6)."""
    p = write(tmp_path, [row(1), row(2), "", row(1, text="You see another text.")])
    with pytest.raises(UserError, match=r"repeated vignette id 'v1'.*lines? 1 and 4"):
        data.load_vignettes(p)


@pytest.mark.parametrize("bad", [float("nan"), -1.0, 100.5, True, False, "NaN", "-3%"])
def test_labels_outside_0_to_100_nan_or_boolean_are_refused(tmp_path, bad):
    p = tmp_path / "v.jsonl"
    p.write_text(json.dumps(row(1, human_Care=bad)) + "\n")  # json.dumps writes NaN for nan
    with pytest.raises(UserError, match=r"line 1: column 'human_Care' is .*(0 to 100|boolean|NaN)"):
        data.load_vignettes(p)


def test_labels_at_the_bounds_are_kept(tmp_path):
    vs = data.load_vignettes(write(tmp_path, [row(1, human_Care=0), row(2, human_Care="100%")]))
    assert [v["human"]["Care"] for v in vs] == [0.0, 100.0]
