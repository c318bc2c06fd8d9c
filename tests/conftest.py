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
