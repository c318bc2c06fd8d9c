"""Bad input: a clear message naming the problem and the fix, a non-zero exit, no traceback,
and nothing expensive started (each case returns before the model or Prefect load)."""

import hashlib
import importlib.util
import shutil

from steer_heal.cli import main
from steer_heal.config import Config, preset
from steer_heal.store import RunLog
from steer_heal.tiny import build_tiny

FAST = ["--preset", "fast-dev"]


def fake_run(root, run_id="r1", adapter=b"weights", recorded=None):
    """A stored run with one baked round whose adapter hash is `recorded` (default: correct)."""
    log = RunLog(root, run_id)
    log.append("run_info", dict(model="tiny-random", reg="kl_rev", seed=0, n_rounds=2,
                                config=Config(**preset("fast-dev")).replace(run_id=run_id).to_dict()))
    log.append("status", dict(status="running"))
    (log.dir / "adapters").mkdir()
    (log.dir / "adapters" / "round_0.safetensors").write_bytes(adapter)
    log.append("adapters", dict(round=0, path="adapters/round_0.safetensors",
                                sha256=recorded or hashlib.sha256(adapter).hexdigest()))
    log.append("rounds", dict(round=0))
    return log


def cases(tmp):
    (tmp / "empty.jsonl").write_text("")
    (tmp / "bad.jsonl").write_text('{"id": "a", "text": "You see x.", "foundation_coarse": "Care"}\n{"id": "b", "text": "y"}\n')
    (tmp / "notjson.jsonl").write_text("{oops\n")
    (tmp / "afile").write_text("")
    fake_run(tmp, "corrupt", recorded="0" * 64)
    fake_run(tmp, "missing").dir.joinpath("adapters", "round_0.safetensors").unlink()
    fake_run(tmp, "ok")
    base = tmp / "base-model"  # a model whose tokenizer has no chat template, as a base GGUF
    shutil.copytree(build_tiny("qwen3", 0, tmp / "models"), base)
    (base / "chat_template.jinja").unlink()
    (tmp / "vignettes_x_other_violate.jsonl").write_text('{"text": "You see x.", "foundation_coarse": "Care"}\n')
    o = ["--out", str(tmp)]
    return [
        (FAST + o + ["--model", str(tmp / "no-such-model")], "unknown model"),
        (FAST + o + ["--model", "some-org/not-a-real-model"], "not in the Hugging Face cache"),
        (FAST + o + ["--model", str(tmp / "m.gguf")], "GGUF file not found"),
        (FAST + o + ["--model", "tiny-random-gpt9"], "unknown tiny-random arch"),
        (FAST + o + ["--vignettes", str(tmp / "none.jsonl")], "--vignettes PATH"),
        (FAST + o + ["--vignettes", str(tmp / "empty.jsonl")], "empty"),
        (FAST + o + ["--vignettes", str(tmp / "bad.jsonl")], "line 2"),
        (FAST + o + ["--vignettes", str(tmp / "notjson.jsonl")], "line 1"),
        (FAST + o + ["--target", "Purity"], "invalid choice: 'Purity'"),
        (FAST + o + ["--persona", "nope"], "not a bundled pair"),
        (FAST + o + ["--persona-pos", "kind person", "--persona-neg", " "], "persona_neg"),
        (FAST + o + ["--steer-layers", "0.5", "1.5"], "steer_layers"),
        (FAST + o + ["--steer-layers", "0.7", "0.2"], "steer_layers"),
        (FAST + o + ["--alphas"], "expected at least one argument"),
        (FAST + o + ["--alphas", "1", "0"], "alphas"),
        (FAST + o + ["--n-keep", "2", "--min-train", "4"], "min_train"),
        (o + ["--resume", "nope"], "no run 'nope'"),
        (o + ["--resume", "corrupt"], "does not match its recorded sha256"),
        (o + ["--resume", "missing"], "is missing"),
        (o + ["--resume", "ok", "--reg", "nll"], "refuses overrides that change the experiment: --reg"),
        (o + ["--resume", "ok", "--n-rounds", "1"], "may only grow"),
        (FAST + ["--out", str(tmp / "afile" / "store")], "not writable"),
        (FAST + o + ["--model", str(base)], "has no chat template (its tokenizer defines none), so its prompts would "
                                            "be guessed: pass --chat-template plain"),
        (FAST + o + ["--chat-template", str(tmp / "none.jinja")], "not auto, chatml, plain or an existing Jinja file"),
        (FAST + o + ["--lora-targets", "query_key_value"], "--lora-targets query_key_value: no linear named"),
        (FAST + o + ["--lora-targets", "auto", "q_proj"], "lora_targets"),
        (FAST + o + ["--frame", "self", "--vignettes", str(tmp / "vignettes_x_other_violate.jsonl")],
         "--frame self contradicts"),
    ]


def test_bad_inputs_fail_clearly(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for argv, fragment in cases(tmp_path):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's own errors
            code = e.code
        err = capsys.readouterr().err
        assert code not in (0, None), (argv, err)
        assert fragment in err, (argv, err)
        assert "Traceback" not in err, (argv, err)


def test_gguf_needs_the_gguf_package(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "gguf" else real(n, *a))
    assert main(FAST + ["--out", str(tmp_path), "--model", str(tmp_path / "m.gguf")]) == 2
    assert "pip install gguf" in capsys.readouterr().err


def test_checkpoints_never_unpickle_and_remote_code_is_opt_in():
    import pathlib

    src = pathlib.Path(__file__).parents[1] / "src" / "steer_heal"
    text = "\n".join(p.read_text() for p in src.glob("*.py"))
    assert "torch.load(" not in text and "import pickle" not in text
    assert Config().trust_remote_code is False


def test_sql_cannot_change_the_store(tmp_path):
    import subprocess
    import sys

    log = fake_run(tmp_path, "x")
    before = (log.dir / "rounds.jsonl").read_bytes()
    for sql in ("DELETE FROM rounds", "DROP VIEW rounds; SELECT 1", "INSERT INTO rounds (round) VALUES (5)"):
        r = subprocess.run([sys.executable, "-m", "steer_heal.store", "sql", "--root", str(tmp_path), sql],
                           capture_output=True, text=True)
        assert "Traceback" not in r.stderr
    assert (log.dir / "rounds.jsonl").read_bytes() == before
