"""Bad input: a clear message naming the problem and the fix, a non-zero exit, no traceback, and nothing
expensive started. Every case runs in-process through the command's own entry point (each fails before a
model or Prefect loads); tests/test_faults.py covers what needs a live run."""

import hashlib
import importlib.util
import json
import math
import os
import shutil

import pytest
import torch

from steer_heal import bf16, export
from steer_heal.cli import main
from steer_heal.config import FOUNDATIONS, Config
from steer_heal.console import script
from steer_heal.diag import barrier, csweep, pareto, stages
from steer_heal.presets import preset
from steer_heal.steering import save_vector
from steer_heal.store import RunLog, WriterLock
from steer_heal.store.__main__ import main as store_main
from steer_heal.tiny import build_tiny

FAST = ["--preset", "fast-dev"]
COMMANDS = {
    "run": main,
    "sql": lambda argv: store_main(["sql", *argv]),
    "export": lambda argv: script(export.PROG, export.main, argv),
    "csweep": lambda argv: script(csweep.PROG, csweep.main, argv),
    "barrier": lambda argv: script(barrier.PROG, barrier.main, argv),
    "stages": lambda argv: script(stages.PROG, stages.main, argv),
    "pareto": lambda argv: script(pareto.PROG, pareto.main, argv),
    "run-dead-api": lambda argv: with_env(main, argv, PREFECT_API_URL="http://127.0.0.1:9/api"),
}


def with_env(body, argv, **env):
    """body(argv) with env set for this call only (a user's PREFECT_API_URL, say)."""
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return body(argv)
    finally:
        for k, v in before.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def fake_run(root, run_id="r1", adapter=b"weights", recorded=None, **config):
    """A stored run with one finished round: its vector and adapter files with their hashes (the adapter's
    recorded hash is `recorded` when given), stage markers, a rounds row."""
    log = RunLog(root, run_id)
    cfg = Config(**preset("fast-dev")).replace(run_id=run_id).to_dict() | config
    log.append("run_info", dict(model="tiny-random", reg="kl_rev", seed=0, n_rounds=2, config=cfg))
    log.append("status", dict(status="running"))
    vec = log.dir / "vectors" / "round_0.safetensors"
    log.append("vectors", dict(round=0, path="vectors/round_0.safetensors",
                               sha256=save_vector({1: torch.ones(8)}, vec)))
    (log.dir / "adapters").mkdir()
    (log.dir / "adapters" / "round_0.safetensors").write_bytes(adapter)
    log.append("adapters", dict(round=0, path="adapters/round_0.safetensors",
                                sha256=recorded or hashlib.sha256(adapter).hexdigest()))
    log.append("stages", [dict(round=0, stage=s) for s in ("extract", "dose", "eval_steered", "heal")])
    log.append("rounds", dict(round=0))
    return log


def remote_code_model(tmp):
    """A model dir whose config asks transformers to import its own evil.py, which would leave a marker."""
    d = tmp / "remote-model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": {
        "AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}}))
    (d / "tokenizer_config.json").write_text("{}")
    (d / "evil.py").write_text(f"open({str(tmp / 'code-ran')!r}, 'w').write('ran')\n")
    return d


def cases(tmp):
    (tmp / "empty.jsonl").write_text("")
    (tmp / "bad.jsonl").write_text('{"id": "a", "text": "You see x.", "foundation_coarse": "Care"}\n{"id": "b", "text": "y"}\n')
    (tmp / "notjson.jsonl").write_text("{oops\n")
    (tmp / "latin1.jsonl").write_bytes('{"text": "Caf\u00e9 owner", "foundation_coarse": "Care"}\n'.encode("latin-1"))
    v = '{"id": "%s", "text": "You see %s.", "foundation_coarse": "Care"%s}\n'
    (tmp / "twice.jsonl").write_text(v % ("a", "x", "") + v % ("b", "y", "") + v % ("a", "z", ""))
    labels = "".join(f', "human_{f}": {x}' for f, x in zip(FOUNDATIONS, ["NaN", 1, 1, 1, 1, 1, 1]))
    (tmp / "nanlabel.jsonl").write_text(v % ("a", "x", labels))
    (tmp / "afile").write_text("")
    (tmp / "emptymodel").mkdir()
    (tmp / "notok").mkdir()
    (tmp / "notok" / "config.json").write_text("{}")
    (tmp / "full").mkdir()
    (tmp / "full" / "x").write_text("")
    fake_run(tmp, "corrupt", recorded="0" * 64)
    fake_run(tmp, "missing").dir.joinpath("adapters", "round_0.safetensors").unlink()
    fake_run(tmp, "ok")
    flipped = fake_run(tmp, "flipped").dir / "vectors" / "round_0.safetensors"
    data = bytearray(flipped.read_bytes())
    data[-1] ^= 1
    flipped.write_bytes(bytes(data))
    fake_run(tmp, "novec").dir.joinpath("vectors", "round_0.safetensors").unlink()
    fake_run(tmp, "oldvec").path("vectors").write_text("")  # a run stored before vectors were hashed
    fake_run(tmp, "nanlam", lam=math.nan)  # the store writes NaN as null
    fake_run(tmp, "remote", model=str(remote_code_model(tmp)), trust_remote_code=True)
    busy = fake_run(tmp, "busy")
    base = tmp / "base-model"  # a model whose tokenizer has no chat template, as a base GGUF
    shutil.copytree(build_tiny("qwen3", 0, tmp / "models"), base)
    (base / "chat_template.jinja").unlink()
    (tmp / ".tmp").mkdir()  # DuckDB lets a query read <cwd>/.tmp/ (its spill folder); the table runs in tmp
    (tmp / ".tmp" / "x").write_text("outside the store")
    (tmp / "store2").mkdir()
    (tmp / "vignettes_x_other_violate.jsonl").write_text('{"text": "You see x.", "foundation_coarse": "Care"}\n')
    bf16.save_rates(tmp, dict(fp32=61.7, bf16=0.97))  # this machine, as if it had no bf16 units (issue 31)
    dam = tmp / "damaged"  # a store of its own: its damage refuses every query over it
    cut = fake_run(dam, "cut").path("stage_metrics")
    cut.write_bytes(b'{"run_id": "cut", "rou\n{"run_id": "cut", "round": 0, "stage": "healed"}\n')
    d = ["--out", str(dam)]
    o = ["--out", str(tmp)]
    return busy, [
        # a damaged line in the middle of a table (issue 23 item 4): every reader names file:line
        ("sql", ["SELECT count(*) FROM stage_metrics"] + d, 2, "stage_metrics.jsonl:1: not a whole JSON line"),
        ("stages", ["cut"] + d, 2, "stage_metrics.jsonl:1: not a whole JSON line"),
        ("run", ["--resume", "cut"] + d, 2, "stage_metrics.jsonl:1: not a whole JSON line"),
        # the run: models and data
        ("run", FAST + o + ["--model", str(tmp / "no-such-model")], 2, "unknown model"),
        ("run", FAST + o + ["--model", "some-org/not-a-real-model"], 2, "not in the Hugging Face cache"),
        ("run", FAST + o + ["--model", str(tmp / "m.gguf")], 2, "GGUF file not found"),
        ("run", FAST + o + ["--model", "tiny-random-gpt9"], 2, "unknown tiny-random arch"),
        ("run", FAST + o + ["--model", str(tmp / "emptymodel")], 2, "has no config.json"),
        ("run", FAST + o + ["--model", str(tmp / "notok")], 2, "has no tokenizer"),
        ("run", FAST + o + ["--model", str(tmp / "remote-model")], 2, "ships its own Python code"),
        ("run", FAST + o + ["--vignettes", str(tmp / "none.jsonl")], 2, "--vignettes PATH"),
        ("run", FAST + o + ["--vignettes", str(tmp / "empty.jsonl")], 2, "empty"),
        ("run", FAST + o + ["--vignettes", str(tmp / "bad.jsonl")], 2, "line 2"),
        ("run", FAST + o + ["--vignettes", str(tmp / "notjson.jsonl")], 2, "line 1"),
        ("run", FAST + o + ["--vignettes", str(tmp / "latin1.jsonl")], 2, "is not UTF-8 (byte 0xe9 on line 1)"),
        ("run", FAST + o + ["--vignettes", str(tmp / "twice.jsonl")], 2, "repeated vignette id 'a' on lines 1 and 3"),
        ("run", FAST + o + ["--vignettes", str(tmp / "nanlabel.jsonl")], 2, "column 'human_Care' is NaN"),
        ("run", FAST + o + ["--target", "Purity"], 2, "invalid choice: 'Purity'"),
        ("run", FAST + o + ["--persona", "nope"], 2, "not a bundled pair"),
        ("run", FAST + o + ["--persona-pos", "kind person", "--persona-neg", " "], 2, "persona_neg"),
        ("run", FAST + o + ["--steer-system", "{persona}{foo}"], 2, "no other {field}"),
        ("run", FAST + o + ["--attn-impl", "bogus"], 2, "invalid choice: 'bogus'"),
        ("run", FAST + o + ["--device", "cuda:x"], 2, "is not a torch device"),
        ("run", FAST + o + ["--bf16", "eval"], 2, "0.97 GFLOP/s against fp32's 61.7 on this CPU"),
        ("run", FAST + o + ["--bf16", "heal"], 2, "63.6x slower. Pass --bf16 off (or --bf16-force"),
        ("run", FAST + o + ["--bf16", "fast"], 2, "invalid choice: 'fast'"),
        ("run", FAST + o + ["--bf16-force=yes"], 2, "--bf16-force/--no-bf16-force: ignored explicit argument 'yes'"),
        *([("run", FAST + o + ["--device", "cuda"], 2, "sees no CUDA GPU")] if not torch.cuda.is_available() else []),
        # the run: model families (chat template, LoRA targets, frame)
        ("run", FAST + o + ["--model", str(base)], 2, "has no chat template (its tokenizer defines none), so its "
                                                      "prompts would be guessed: pass --chat-template plain"),
        ("run", FAST + o + ["--chat-template", str(tmp / "none.jinja")], 2,
         "not auto, chatml, plain or an existing Jinja file"),
        ("run", FAST + o + ["--lora-targets", "query_key_value"], 2, "--lora-targets query_key_value: no linear named"),
        ("run", FAST + o + ["--lora-targets", "auto", "q_proj"], 2, "lora_targets"),
        ("run", FAST + o + ["--frame", "self", "--vignettes", str(tmp / "vignettes_x_other_violate.jsonl")], 2,
         "--frame self contradicts"),
        # the run: numbers (finite, in range, storable)
        ("run", FAST + o + ["--steer-layers", "0.5", "1.5"], 2, "steer_layers"),
        ("run", FAST + o + ["--steer-layers", "0.7", "0.2"], 2, "steer_layers"),
        ("run", FAST + o + ["--steer-layers", "nan", "0.5"], 2, "must be 2 finite numbers"),
        ("run", FAST + o + ["--alphas"], 2, "expected at least one argument"),
        ("run", FAST + o + ["--alphas", "1", "0"], 2, "alphas"),
        ("run", FAST + o + ["--alphas", "nan"], 2, "alphas=(nan,) is invalid"),
        ("run", FAST + o + ["--alphas", "1e30"], 2, "positive numbers up to 1000"),
        ("run", FAST + o + ["--lam", "nan"], 2, "lam=nan is invalid: must be a finite number"),
        ("run", FAST + o + ["--lam", "inf"], 2, "lam=inf is invalid"),
        ("run", FAST + o + ["--lr", "nan"], 2, "lr=nan is invalid"),
        ("run", FAST + o + ["--temperature", "nan"], 2, "temperature=nan is invalid"),
        ("run", FAST + o + ["--top-p", "5"], 2, "top_p=5.0 is invalid: must be a fraction in [0, 1]"),
        ("run", FAST + o + ["--betas", "0.9", "nan"], 2, "betas"),
        ("run", FAST + o + ["--grad-clip", "0"], 2, "grad_clip=0.0"),
        ("run", FAST + o + ["--max-len", "1"], 2, "max_len=1 is invalid"),
        ("run", FAST + o + ["--seed", "1e21"], 2, "invalid int value: '1e21'"),
        ("run", FAST + o + ["--seed", str(10**23)], 2, "seed=100000000000000000000000 is invalid"),
        ("run", FAST + o + ["--seed", "-1"], 2, "an integer in [0, 2**63)"),
        ("run", FAST + o + ["--n-keep", "2", "--min-train", "4"], 2, "min_train"),
        ("run", FAST + o + ["--log-level", "loud"], 2, "log_level='loud'"),
        ("run", FAST + o + ["--bogus-flag"], 2, "unrecognized arguments: --bogus-flag; see"),
        ("run", FAST + o + ["--lamda", "2"], 2, "did you mean --lam?"),
        ("run", FAST + o + ["--run-id", "a/b"], 2, "run_id='a/b' is invalid"),
        ("run", FAST + o + ["--run-id", ".."], 2, "run_id='..' is invalid"),
        ("run", FAST + ["--out", str(tmp / "afile" / "store")], 2, "not writable"),
        # resume
        ("run", o + ["--resume", "nope"], 2, "no run 'nope'"),
        ("run", o + ["--resume", "../ok"], 2, "resume='../ok' is invalid"),
        ("run", o + ["--resume", "corrupt"], 2, "adapter of round 0 at"),
        ("run", o + ["--resume", "missing"], 2, "adapter of round 0 is missing"),
        ("run", o + ["--resume", "flipped"], 2, "vector of round 0 at"),
        ("run", o + ["--resume", "novec"], 2, "vector of round 0 is missing"),
        ("run", o + ["--resume", "oldvec"], 2, "its vector has no recorded sha256"),
        ("run", o + ["--resume", "nanlam"], 2, "run nanlam: its stored config lam=None is invalid"),
        ("run", o + ["--resume", "remote"], 2, "just resume remote --trust-remote-code"),
        ("run", o + ["--resume", "busy"], 2, "run busy is being written by pid"),
        ("run", o + ["--resume", "ok", "--reg", "nll"], 2, "refuses overrides that change the experiment: --reg"),
        ("run", o + ["--resume", "ok", "--n-rounds", "1"], 2, "may only grow"),
        # a user's Prefect server that does not answer
        ("run-dead-api", FAST + o, 2, "PREFECT_API_URL=http://127.0.0.1:9/api does not answer"),
        # the query path
        ("sql", ["--out", str(tmp), "COPY (SELECT 1 AS x) TO '" + str(tmp / "runs" / "ok" / "rounds.jsonl") + "'"],
         2, "COPY statements are refused"),
        ("sql", ["--out", str(tmp), f"ATTACH '{tmp / 'x.db'}'"], 2, "ATTACH statements are refused"),
        ("sql", ["--out", str(tmp), "SELECT 1; DROP VIEW rounds"], 2, "2 statements are refused"),
        ("sql", ["--out", str(tmp), f"EXPLAIN ANALYZE COPY (SELECT 1) TO '{tmp / 'e.json'}'"], 2,
         "EXPLAIN COPY statements are refused"),
        ("sql", ["--out", str(tmp), "SET threads = 1"], 2, "SET statements are refused"),
        ("sql", ["--out", str(tmp), f"COPY (PIVOT rounds ON round USING count(*)) TO '{tmp / 'pv.json'}'"], 2,
         "MULTI statements are refused"),
        ("sql", ["--out", str(tmp), "INSTALL httpfs"], 2, "statements are refused"),
        ("sql", ["--out", str(tmp), "PRAGMA table_info('rounds')"], 2, "PRAGMA statements are refused"),
        ("sql", ["--out", str(tmp), "SELECT * FROM read_text('/etc/hostname')"], 2, "only under the store root"),
        ("sql", ["--out", str(tmp), "SELEC 1"], 1, "syntax error"),
        ("sql", ["--out", str(tmp), "UPDATE EXTENSIONS"], 2, "UPDATE EXTENSIONS statements are refused"),
        ("sql", ["--out", str(tmp / "store2"), "SELECT content FROM read_text('.tmp/x')"], 2,
         "only under the store root"),
        ("sql", ["--out", str(tmp), "--timeout", "1", "SELECT count(*) FROM range(1000000000) a, range(1000000000) b"],
         1, "ran past --timeout 1 s"),
        ("pareto", ["--out", str(tmp), "--sql", f"COPY (SELECT 1) TO '{tmp / 'p.json'}'"], 2, "COPY statements"),
        # export and the diagnostics
        ("export", ["ok", str(tmp / "full"), "--out", str(tmp)], 2, "is not empty"),
        ("export", ["ok", str(tmp / "afile" / "sub"), "--out", str(tmp)], 2, "is not a writable directory"),
        ("export", ["nope", str(tmp / "exp-nope"), "--out", str(tmp)], 2, "no run 'nope'"),
        ("export", ["remote", str(tmp / "exp-remote"), "--out", str(tmp)], 2, "export remote"),
        ("csweep", ["ok", "99", "--out", str(tmp)], 2, "rounds 0..1; pick one of those"),
        ("csweep", ["ok", "-1", "--out", str(tmp)], 2, "rounds 0..1"),
        ("csweep", ["flipped", "0", "--out", str(tmp)], 2, "does not match its recorded sha256"),
        ("csweep", ["novec", "0", "--out", str(tmp)], 2, "vector of round 0 is missing"),
        ("csweep", ["remote", "0", "--out", str(tmp)], 2, "add --trust-remote-code to this command"),
        ("csweep", ["ok", "--coefz", "1"], 2, "did you mean --coefs?"),
        ("barrier", ["ok", "0", "--lam", "nan", "--out", str(tmp)], 2, "lam=nan is invalid"),
        ("stages", ["a/b", "--out", str(tmp)], 2, "is not a plain name"),
    ]


def test_bad_inputs_fail_clearly(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    busy, table = cases(tmp_path)
    assert len(table) >= 70
    capsys.readouterr()  # building the fixtures' tiny models prints progress bars
    with WriterLock(busy.dir):  # a live writer of run "busy" (flock conflicts across descriptors, same process too)
        for cmd, argv, want, fragment in table:
            try:
                code = COMMANDS[cmd](argv)
            except SystemExit as e:  # argparse's own errors
                code = e.code
            err = capsys.readouterr().err
            assert code == want, (cmd, argv, code, err)
            assert fragment in err, (cmd, argv, err)
            assert "Traceback" not in err and len(err.strip().splitlines()) == 1, (cmd, argv, err)
    assert not (tmp_path / "code-ran").exists()  # no model dir's own code ran without the flag
    assert not (tmp_path / "exp-nope").exists() and not (tmp_path / "exp-remote").exists()  # no empty dirs left
    assert not any((tmp_path / f).exists() for f in ("e.json", "p.json", "pv.json", "x.db"))
    assert (tmp_path / "runs" / "ok" / "rounds.jsonl").read_text().count("\n") == 1
    assert {p.name for p in (tmp_path / "runs").iterdir()} == {
        "corrupt", "missing", "ok", "flipped", "novec", "oldvec", "nanlam", "remote", "busy"}  # no run dir from a refusal
    assert not (tmp_path / "store2" / "runs").exists()


def test_gguf_needs_the_gguf_package(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "gguf" else real(n, *a))
    assert main(FAST + ["--out", str(tmp_path), "--model", str(tmp_path / "m.gguf")]) == 2
    assert "pip install gguf" in capsys.readouterr().err


def test_checkpoints_never_unpickle_and_remote_code_is_opt_in():
    import pathlib

    src = pathlib.Path(__file__).parents[1] / "src" / "steer_heal"
    text = "\n".join(p.read_text() for p in src.rglob("*.py"))
    assert "torch.load(" not in text and "import pickle" not in text
    assert Config().trust_remote_code is False


def test_trust_remote_code_comes_from_the_command_never_the_store(tmp_path):
    from steer_heal.errors import UserError
    from steer_heal.student import allow_remote_code, stored_config

    cfg = stored_config(fake_run(tmp_path, "remote", model="x", trust_remote_code=True))
    with pytest.raises(UserError, match="trust that code: just export"):
        allow_remote_code(cfg, False, "just export remote D --trust-remote-code")
    assert allow_remote_code(cfg, True, "export it").trust_remote_code is True
    plain = stored_config(fake_run(tmp_path, "plain"))
    assert allow_remote_code(plain, False, "x").trust_remote_code is False


@pytest.mark.parametrize("sql", [
    "COPY (SELECT run_id, round, 999.0 AS coherence FROM rounds) TO '{rounds}' (FORMAT json)",
    "COPY rounds TO '{root}/runs/x/extra.jsonl'", "ATTACH '{root}/runs/x/db.duckdb' AS w",
    "DELETE FROM rounds", "DROP VIEW rounds; SELECT 1", "INSERT INTO rounds (round) VALUES (5)",
    "CREATE TABLE t AS SELECT 1", "EXPLAIN ANALYZE COPY rounds TO '{root}/runs/x/e.jsonl'",
    "EXPORT DATABASE '{root}/runs/x/dump'", "SET enable_external_access = true",
])
def test_sql_cannot_change_the_store(tmp_path, capsys, sql):
    log = fake_run(tmp_path, "x")
    before = {p.name: p.read_bytes() for p in log.dir.rglob("*") if p.is_file()}
    code = store_main(["sql", "--root", str(tmp_path), sql.format(rounds=log.path("rounds"), root=tmp_path)])
    assert code == 2 and "refused" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in log.dir.rglob("*") if p.is_file()} == before
    assert store_main(["sql", "--out", str(tmp_path), "SELECT count(*) AS n FROM rounds"]) == 0
    assert "1" in capsys.readouterr().out


def test_max_len_must_hold_the_longest_chat_prompt(tiny):
    """Checked once the tokenizer is known (the run's first step): a max_len that leaves a completion fewer
    than 8 tokens is refused with the size to pass; one under prompt + max_new_tokens only warns."""
    from steer_heal.data import prompts
    from steer_heal.errors import UserError
    from steer_heal.tokens import MIN_COMPLETION, chat, check_room

    _, tok = tiny
    ps = prompts(6)
    longest = max(len(tok(chat(tok, p, "Be brief."), add_special_tokens=False)["input_ids"]) for p in ps)
    with pytest.raises(UserError, match=f"longest chat prompt is {longest} tokens.*--max-len {longest + 16}"):
        check_room(tok, ps, "Be brief.", longest + MIN_COMPLETION - 1, 16)
    check_room(tok, ps, "Be brief.", longest + MIN_COMPLETION, 16)  # cut completions: a warning, no error
