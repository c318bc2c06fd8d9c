"""The held-out contrast probe (data/heldout_dilemmas.json, issue 14), the one trait probe (data.dilemmas):
enough items per persona pair, disjoint from everything the model is trained or steered on, and with no
length or opener signal that separates the trait reply from the opposite one. Data only: no model, runs in well under a second.

Every failure names the offending item(s) and the number that broke the rule, so a maintainer can
rewrite just those items.
"""

import json
import re
from collections import Counter
from functools import cache
from itertools import combinations

import pytest

from steer_heal.data import DATA, DILEMMA_KEYS, DILEMMAS

HELDOUT = DILEMMAS
MIN_ITEMS = 64  # per persona pair
REPLY_WORDS = (6, 20)  # short first-person answers, inclusive, whitespace words
MAX_J_TRAIN = 0.3  # item prompt vs every string in prompts.json and contexts.json
MAX_J_SELF = 0.5  # item prompt vs every other held-out prompt: no near-duplicates
LONGER_FRAC = (0.4, 0.6)  # share of items whose trait reply has more words than its opposite
MAX_MEAN_GAP = 1.5  # |mean words(trait) - mean words(opposite)|, per pair
# lexical giveaways: a side's replies must not be recognisable by how they open or by a word
MAX_OPENER_GAP = 0.25  # |share of trait replies opening with word w - share of opposite ones|
MAX_WORD_GAP = 0.35  # |share of trait replies containing word w - share of opposite ones|


@cache
def words(text: str) -> frozenset[str]:
    return frozenset(re.findall(r"[a-z']+", text.lower()))


def tokens(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def jaccard(a: str, b: str) -> float:
    wa, wb = words(a), words(b)
    return len(wa & wb) / len(wa | wb) if wa | wb else 0.0


def nwords(text: str) -> int:
    return len(text.split())


@cache
def load(name: str):
    return json.loads((DATA / name).read_text())


def heldout() -> dict:
    return load(HELDOUT)


def items_of(pair: str) -> list[dict]:
    return heldout().get(pair, [])


def where(pair: str, i: int, it: dict) -> str:
    return f"{pair}[{i}] {it['prompt']!r}"


def nearest(prompt: str, others: list[str]) -> tuple[float, str]:
    return max((jaccard(prompt, o), o) for o in others)


PAIRS = list(load("personas.json"))


# ---------------------------------------------------------------- shape and coverage

def test_every_persona_pair_has_heldout_items():
    table = heldout()
    assert isinstance(table, dict)
    missing = [p for p in PAIRS if not table.get(p)]
    assert not missing, f"{HELDOUT} has no items for persona pair(s) {missing}"
    unknown = sorted(set(table) - set(PAIRS))
    assert not unknown, f"{HELDOUT} has pair(s) {unknown} that personas.json does not define"


@pytest.mark.parametrize("pair", PAIRS)
def test_items_are_well_formed_and_enough(pair):
    items = items_of(pair)
    assert len(items) >= MIN_ITEMS, f"{pair}: {len(items)} held-out items, need at least {MIN_ITEMS}"
    bad = []
    lo, hi = REPLY_WORDS
    for i, it in enumerate(items):
        if not isinstance(it, dict) or set(it) != set(DILEMMA_KEYS):
            bad.append(f"{pair}[{i}] keys {sorted(it) if isinstance(it, dict) else type(it)}: want {DILEMMA_KEYS}")
            continue
        if not all(isinstance(it[k], str) and it[k].strip() for k in DILEMMA_KEYS):
            bad.append(f"{where(pair, i, it)}: empty or non-string field")
            continue
        if it["trait"].strip().lower() == it["opposite"].strip().lower():
            bad.append(f"{where(pair, i, it)}: trait and opposite are the same reply")
        for side in ("trait", "opposite"):
            n = nwords(it[side])
            if not lo <= n <= hi:
                bad.append(f"{where(pair, i, it)}: {side} reply has {n} words, want {lo}-{hi}: {it[side]!r}")
    assert not bad, "\n".join(bad)


def test_items_are_distinct():
    seen: dict[str, str] = {}
    dup = []
    for pair, items in heldout().items():
        for i, it in enumerate(items):
            key = " ".join(it["prompt"].lower().split())
            if key in seen:
                dup.append(f"{pair}[{i}] repeats {seen[key]}: {it['prompt']!r}")
            seen.setdefault(key, f"{pair}[{i}]")
    assert not dup, "\n".join(dup)


# ---------------------------------------------------------------- disjoint from the training side

@pytest.mark.parametrize("pair", PAIRS)
def test_disjoint_from_generation_prompts_and_contexts(pair):
    train = list(load("prompts.json")) + list(load("contexts.json"))
    bad = []
    for i, it in enumerate(items_of(pair)):
        j, other = nearest(it["prompt"], train)
        if j > MAX_J_TRAIN:
            bad.append(f"{where(pair, i, it)}: max Jaccard {j:.3f} > {MAX_J_TRAIN} against {other!r}")
    assert not bad, f"{len(bad)} held-out prompt(s) overlap prompts.json/contexts.json:\n" + "\n".join(bad)


def test_no_near_duplicate_heldout_prompts():
    flat = [(pair, i, it) for pair, items in heldout().items() for i, it in enumerate(items)]
    bad = []
    for (pa, ia, a), (pb, ib, b) in combinations(flat, 2):
        j = jaccard(a["prompt"], b["prompt"])
        if j > MAX_J_SELF:
            bad.append(f"{where(pa, ia, a)} ~ {where(pb, ib, b)}: Jaccard {j:.3f} > {MAX_J_SELF}")
    assert not bad, "near-duplicate held-out prompts:\n" + "\n".join(bad)


# ---------------------------------------------------------------- length is not the signal

@pytest.mark.parametrize("pair", PAIRS)
def test_length_balance(pair):
    items = items_of(pair)
    assert items
    lt = [nwords(it["trait"]) for it in items]
    lo = [nwords(it["opposite"]) for it in items]
    longer = [i for i, (a, b) in enumerate(zip(lt, lo)) if a > b]
    frac = len(longer) / len(items)
    gap = sum(lt) / len(lt) - sum(lo) / len(lo)
    lo_f, hi_f = LONGER_FRAC
    assert lo_f <= frac <= hi_f, (
        f"{pair}: trait reply is longer in {len(longer)}/{len(items)} = {frac:.3f} of items, want "
        f"{lo_f}-{hi_f}; trait-longer items: {longer}")
    assert abs(gap) <= MAX_MEAN_GAP, (
        f"{pair}: mean trait reply {sum(lt) / len(lt):.2f} words vs opposite {sum(lo) / len(lo):.2f} "
        f"(gap {gap:+.2f}, want |gap| <= {MAX_MEAN_GAP})")


@pytest.mark.parametrize("pair", PAIRS)
def test_no_lexical_giveaway(pair):
    """Neither side may open in its own way, or carry a word the other side lacks, across the board."""
    items = items_of(pair)
    assert items
    n = len(items)
    bad = []
    for what, feature in (("opens with", lambda t: {tokens(t)[0]}), ("contains", words)):
        limit = MAX_OPENER_GAP if what == "opens with" else MAX_WORD_GAP
        ct = Counter(w for it in items for w in feature(it["trait"]))
        co = Counter(w for it in items for w in feature(it["opposite"]))
        for w in sorted(set(ct) | set(co)):
            gap = (ct[w] - co[w]) / n
            if abs(gap) > limit:
                side = "trait" if gap > 0 else "opposite"
                ex = [i for i, it in enumerate(items) if w in feature(it[side])][:8]
                bad.append(f"{pair}: {ct[w]}/{n} trait vs {co[w]}/{n} opposite replies {what} {w!r} "
                           f"(gap {gap:+.2f}, limit {limit}); e.g. {side} of items {ex}")
    assert not bad, "\n".join(bad)
