import json
from pathlib import Path

import pytest

from steer_heal import data
from steer_heal.config import FOUNDATIONS, Config, ConfigError

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
    with pytest.raises(ConfigError, match="no_such_pair") as e:
        data.persona(Config(persona="no_such_pair"))
    assert "care_vs_authority" in str(e.value)


def test_persona_empty_text(monkeypatch):
    table = {"p": {"pos": "  ", "neg": "b", "trait": "t", "target": "Care", "direction": "down", "neutral": "n"}}
    monkeypatch.setattr(data, "_bundled", lambda name: table)
    with pytest.raises(ConfigError, match="empty pos"):
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
    with pytest.raises(ConfigError, match="nope"):
        data.dilemmas("nope")


# ---------------------------------------------------------------- vignettes

def test_bundled_vignettes_cover_every_foundation():
    vs = data.load_vignettes()
    assert {v["foundation"] for v in vs} == set(FOUNDATIONS)
    assert all(set(v) == {"id", "text", "foundation", "human"} for v in vs)
    assert len({v["id"] for v in vs}) == len(vs)


def test_missing_column_names_column_and_line(tmp_path):
    bad = row(2)
    del bad["foundation_coarse"]
    p = write(tmp_path, [row(1), bad])
    with pytest.raises(ConfigError, match="line 2.*foundation_coarse") as e:
        data.load_vignettes(p)
    assert str(p.name) in str(e.value)
    no_text = row(1)
    del no_text["text"]
    with pytest.raises(ConfigError, match="line 1.*'text'"):
        data.load_vignettes(write(tmp_path, [no_text], "t.jsonl"))


def test_bad_json_line(tmp_path):
    with pytest.raises(ConfigError, match="line 3: not valid JSON"):
        data.load_vignettes(write(tmp_path, [row(1), "", "{oops"]))


def test_missing_and_empty_file(tmp_path):
    with pytest.raises(ConfigError, match=r"not found: .*nothere\.jsonl.*--vignettes PATH"):
        data.load_vignettes(tmp_path / "nothere.jsonl")
    with pytest.raises(ConfigError, match="empty"):
        data.load_vignettes(write(tmp_path, ["", "  "]))


def test_unknown_foundation(tmp_path):
    with pytest.raises(ConfigError, match="line 2: unknown foundation 'Purity'"):
        data.load_vignettes(write(tmp_path, [row(1), row(2, "Purity")]))


def test_human_columns_optional_but_all_or_none(tmp_path):
    bare = {"text": "You see a man wearing a hat.", "foundation_coarse": "social norms"}
    vs = data.load_vignettes(write(tmp_path, [bare]))
    assert vs[0]["human"] == {} and vs[0]["foundation"] == "SocialNorms" and vs[0]["id"]
    partial = row(1)
    del partial["human_Liberty"]
    with pytest.raises(ConfigError, match="human_Liberty"):
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
