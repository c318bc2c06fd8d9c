"""The speed-ups of issue 17 keep the numbers: a prompt's KV cache shared by its answers gives the full
forward's logits, the probes with and without it agree, and a folded history gives the gated stack's base
bitwise and its students within float rounding."""

from __future__ import annotations

import pytest
import torch

from steer_heal import contrast as C
from steer_heal import mfv as E
from steer_heal.bake import lora_config
from steer_heal.config import FOUNDATIONS
from steer_heal.data import load_vignettes
from steer_heal.models import load_model
from steer_heal.stack import Stack
from steer_heal.tokens import branch_logits, full_attention, left_pad

DILEMMAS = [dict(prompt="A friend asks you to lie for them.", trait="I would tell the truth kindly.",
                 opposite="I would lie as asked."),
            dict(prompt="Your boss orders a shortcut.", trait="I follow the order.", opposite="I follow the order."),
            dict(prompt="A stranger drops a wallet in the busy street by the station.", trait="Return it.",
                 opposite="Keep the money and walk away quickly.")]


def test_branch_logits_equal_the_full_forward(tiny):
    model, tok = tiny
    prefixes = [[5, 6, 7, 8, 9], [11, 12], [3, 4, 5, 6]]
    branches = [[[20, 21, 22], [23]], [[24, 25], [26, 27, 28, 29]], [[30], [31, 32]]]
    got = branch_logits(model, prefixes, branches, tok.pad_token_id)
    last = branch_logits(model, prefixes, branches, tok.pad_token_id, last_only=True)
    with torch.no_grad():
        for i, p in enumerate(prefixes):
            for k, b in enumerate(branches[i]):
                full = model(**left_pad([p + b], tok.pad_token_id, model.device)).logits[0, len(p) - 1:].float()
                assert got[i][k].shape == full.shape
                assert torch.allclose(got[i][k], full, atol=1e-5), (i, k)
                assert torch.allclose(last[i][k][-1], full[-1], atol=1e-5)


def test_mfv_and_contrast_agree_with_and_without_the_shared_prefix(tiny):
    model, tok = tiny
    vig = load_vignettes(n=9)
    a, b = E.mfv(model, tok, vig, batch=4), E.mfv(model, tok, vig, batch=4, reuse_prefix=False)
    for ra, rb in zip(a["rows"], b["rows"], strict=True):
        assert max(abs(ra["p"][f] - rb["p"][f]) for f in FOUNDATIONS) < 1e-5
        assert abs(ra["pmass"] - rb["pmass"]) < 1e-6
    x, y = C.contrast(model, tok, DILEMMAS, batch=2), C.contrast(model, tok, DILEMMAS, batch=2, reuse_prefix=False)
    for rx, ry in zip(x["rows"], y["rows"], strict=True):
        assert abs(rx["trait_lp"] - ry["trait_lp"]) < 1e-5 and abs(rx["opposite_lp"] - ry["opposite_lp"]) < 1e-5
    assert x["rows"][1]["diff"] == 0.0  # identical replies are scored once, so they differ by exactly 0


def test_sliding_window_models_take_the_full_forward(model_cache):
    model, tok = load_model("tiny-random-gemma3", cache=model_cache)
    assert not full_attention(model)
    vig = load_vignettes(n=3)
    assert E.mfv(model, tok, vig)["rows"] == E.mfv(model, tok, vig, reuse_prefix=False)["rows"]
    assert C.contrast(model, tok, DILEMMAS)["rows"] == C.contrast(model, tok, DILEMMAS, reuse_prefix=False)["rows"]


def _stacks(tiny, n: int) -> tuple[Stack, Stack]:
    """The same n rounds of adapters (random B, so each moves the logits) gated and folded."""
    from test_families import random_stack

    lora = lora_config(tiny[0], 4, 8.0, (0.0, 1.0))
    return random_stack(tiny[0], lora, n, fold=False), random_stack(tiny[0], lora, n, fold=True)


def test_a_folded_history_keeps_base_bitwise_and_students_within_rounding(tiny):
    gated, folded = _stacks(tiny, 4)
    assert folded.live == ["r3"] and gated.live == ["r0", "r1", "r2", "r3"]
    x = left_pad([[5, 6, 7, 8, 9, 10], [11, 12, 13]], tiny[1].pad_token_id, "cpu")
    with torch.no_grad():
        logits = lambda st: st.model(**x).logits  # noqa: E731
        with gated.base(), folded.base():
            assert torch.equal(logits(gated), logits(folded))
        plain = tiny[0](**x).logits
        with folded.base():
            assert torch.equal(logits(folded), plain)
        with gated.prev(), folded.prev():
            a, b = logits(gated), logits(folded)
        assert torch.allclose(a, b, atol=1e-5) and not torch.allclose(a, plain, atol=1e-3)
        assert torch.allclose(logits(gated), logits(folded), atol=1e-5)
    # only the live adapter trains: its LoRA weights and nothing else (an empty set would pass an "all" check)
    folded.freeze_history()
    train = [n for n, p in folded.model.named_parameters() if p.requires_grad]
    assert train and all(".r3." in n and "lora_" in n for n in train)
    assert len(train) == len([n for n, _ in folded.model.named_parameters() if ".r3." in n and "lora_" in n])
    folded.model.requires_grad_(False)
    with pytest.raises(Exception, match="folded"):
        folded.truncate(1)


def test_the_filter_scores_ppl_and_relevance_on_one_forward_with_the_same_numbers(tiny):
    from steer_heal import filter as F

    model, tok = tiny
    items = [dict(prompt=d["prompt"], completion=d["trait"] + " " + d["opposite"]) for d in DILEMMAS]
    foil = F.foils([x["prompt"] for x in items])
    got = F.score(model, tok, items, system="Be brief.", ppl_tau=1e9, rep_tau=1.0, window=4, batch=2, foil=foil)
    p, c = [x["prompt"] for x in items], [x["completion"] for x in items]
    want = F.relevance(model, tok, p, c, [foil[x] for x in p], "Be brief.", batch=2)  # its own two forwards
    assert [x["relevance"] for x in got] == want
    assert [x["ppl"] for x in got] == F.perplexity(model, tok, p, c, "Be brief.", window=4, batch=2)


def test_merged_gives_the_gated_student_and_base_inside_it_stays_bitwise(tiny):
    gated, folded = _stacks(tiny, 3)
    x = left_pad([[5, 6, 7, 8, 9, 10], [11, 12, 13]], tiny[1].pad_token_id, "cpu")
    plain = tiny[0](**x).logits.detach()
    with torch.no_grad():
        want = gated.model(**x).logits
        with folded.merged():
            assert torch.allclose(folded.model(**x).logits, want, atol=1e-5)
            with folded.base():
                assert torch.equal(folded.model(**x).logits, plain)
            assert torch.allclose(folded.model(**x).logits, want, atol=1e-5)  # base() left the merge in place
            with folded.merged():  # nested: the adapters are added once, not twice
                assert torch.allclose(folded.model(**x).logits, want, atol=1e-5)
        assert torch.allclose(folded.model(**x).logits, want, atol=1e-5)  # and merged() the gates
        w = {n: p.data_ptr() for n, p in folded.model.named_parameters()}
        with folded.merged():
            assert any(p.data_ptr() != w[n] for n, p in folded.model.named_parameters())
        assert all(p.data_ptr() == w[n] for n, p in folded.model.named_parameters())  # the same tensors back


def test_a_folded_run_keeps_the_gated_runs_numbers(tmp_path):
    """Round 0 of a fast-dev seed-0 run with --fold-history (its healed eval on merged weights) gives the gated
    run.s recorded rounds row (tests/golden) to float rounding, and so does round 1, healed on the folded history."""
    import json

    from test_flow import steer_heal
    from test_golden import GOLDEN

    from steer_heal.store import RunLog

    rc, _, se = steer_heal(tmp_path, "--preset", "fast-dev", "--seed", "0", "--run-id", "f", "--fold-history")
    assert rc == 0, se[-3000:]
    rows = sorted(RunLog(tmp_path, "f").read("rounds"), key=lambda r: r["round"])
    assert [r["round"] for r in rows] == [0, 1]
    # round 0 within rounding; round 1 heals on the folded history, where rounding has one round to grow
    # (measured: 1.4e-6 relative at most on the trait nats)
    for row, want, rel, tol in zip(rows, json.loads(GOLDEN.read_text())["rounds"], (1e-6, 1e-5), (1e-7, 1e-6)):
        for k, v in want.items():
            if isinstance(v, float):
                assert row[k] == pytest.approx(v, rel=rel, abs=tol), (row["round"], k, row[k], v)  # ppl ~ 915
            else:
                assert row[k] == v, (row["round"], k)


MIXED = [dict(prompt="Should I help?", completion="Yes.", ended=True),
         dict(prompt="A long question about what a good neighbour does when the fence falls?",
              completion="I would call them first, then offer to share the cost of a new fence and help build it "
                         "over the weekend, because that keeps the peace.", ended=False),
         dict(prompt="Lie for me?", completion="No, I will not.", ended=True),
         dict(prompt="And now?", completion="Still no, but I can help you say it kindly to them.", ended=True)]


def test_completion_rows_are_the_padded_logits_without_the_padding(tiny):
    from steer_heal.tokens import chat, completion_logits, completion_rows, pack

    model, tok = tiny
    b = pack(tok, [chat(tok, k["prompt"]) for k in MIXED], [k["completion"] for k in MIXED], 96, "cpu", eos=True)
    n = int(b["cmask"].sum())
    assert n < b["cmask"].numel()  # mixed lengths: there is padding to leave out
    with torch.no_grad():
        rows, full = completion_rows(model, b), completion_logits(model, b)
    assert rows.shape == (n, full.shape[-1])
    torch.testing.assert_close(rows, full[b["cmask"]], rtol=1e-5, atol=1e-5)


def test_heal_runs_the_head_on_completion_tokens_only(model_cache):
    """Student and reference forwards of a kl_rev heal put exactly the real completion tokens through the LM head
    and its log-softmax, not rows x longest completion: memory is completion tokens x vocabulary."""
    from steer_heal.config import Config
    from steer_heal.heal import heal
    from steer_heal.presets import preset

    model, tok = load_model("tiny-random", cache=model_cache)
    st = Stack(model)
    st.add("r0", lora_config(model, 4, 8, (0.0, 1.0)), seed=1)
    seen = []
    h = model.get_output_embeddings().register_forward_hook(lambda m, a, out: seen.append(out.shape[:-1].numel()))
    cfg = Config(**preset("fast-dev")).replace(reg="kl_rev", lam=1.0, epochs=1, batch_size=4, val_frac=0.0,
                                                ref_cache_mb=0, max_len=96)
    try:
        heal(st, tok, MIXED, cfg, 0, seed=0, system="")
    finally:
        h.remove()
    tokens = sum(len(tok(k["completion"], add_special_tokens=False)["input_ids"]) + k["ended"] for k in MIXED)
    assert seen == [tokens, tokens]  # one student, one reference forward over the single batch of 4
