"""Faults end in a recorded status with a message, finished rounds intact, the run resumable."""

import os
import signal
import subprocess
import sys
import time

import pytest
from test_flow import ARGS, steer_heal

from steer_heal.bake import Stack, lora_config
from steer_heal.config import Config, preset
from steer_heal.heal import HealError, heal
from steer_heal.models import load_model
from steer_heal.store import RunLog


def test_nan_loss_stops_heal_with_a_message(model_cache):
    model, tok = load_model("tiny-random", cache=model_cache)
    st = Stack(model)
    st.add("r0", lora_config(model, 4, 8, (0.0, 1.0)), seed=0)
    cfg = Config(**preset("fast-dev")).replace(lr=1e30, grad_clip=1e30, epochs=3, batch_size=2, val_frac=0.0)
    kept = [dict(prompt="Help?", completion="I would help her now.")] * 4
    with pytest.raises(HealError, match="non-finite loss.*Lower --lr"):
        heal(st, tok, kept, cfg, 0, seed=1, system="")


def test_starved_filter_ends_the_run_as_starved(tmp_path):
    rc, _, se = steer_heal(tmp_path, *ARGS, "--run-id", "s", "--ppl-tau", "1.0")
    assert rc == 3 and "filter starved" in se and "Traceback" not in se
    last = RunLog(tmp_path, "s").read("status")[-1]
    assert last["status"] == "starved" and "kept 0 of" in last["reason"] and "min_train=2" in last["reason"]


def test_ctrl_c_marks_interrupted_and_resume_finishes(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("PREFECT_HOME", None)
    p = subprocess.Popen([sys.executable, "-m", "steer_heal", "--out", str(tmp_path), *ARGS, "--run-id", "c"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    stages = tmp_path / "runs" / "c" / "stages.jsonl"
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (stages.exists() and '"extract"' in stages.read_text()):
            time.sleep(0.1)
        p.send_signal(signal.SIGINT)  # what Ctrl-C sends
        _, se = p.communicate(timeout=120)
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert p.returncode == 130, se[-2000:]
    assert RunLog(tmp_path, "c").read("status")[-1]["status"] == "interrupted"
    assert "just resume c" in se
    rc, _, se = steer_heal(tmp_path, "--resume", "c")
    assert rc == 0, se[-2000:]
    assert RunLog(tmp_path, "c").read("status")[-1]["status"] == "done"

