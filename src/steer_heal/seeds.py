"""Named seed streams, each derived from (seed, round, stage): a resumed stage draws exactly what it
would have, and a diagnostic that re-runs a stage (the barrier sweep's run cell) draws the same numbers
by calling the same helper, never by spelling the label again."""

import hashlib


def seed_for(seed: int, round_: int, stage: str) -> int:
    h = hashlib.sha256(f"{seed}/{round_}/{stage}".encode()).digest()
    return int.from_bytes(h[:4], "little")  # < 2**32: fits every RNG's seed


def lora_init(seed: int, round_: int) -> int:
    """The fresh adapter's A matrices (B = 0) of round `round_`."""
    return seed_for(seed, round_, "lora_init")


def heal_shuffle(seed: int, round_: int) -> int:
    """The heal's train/val split and its per-epoch shuffles."""
    return seed_for(seed, round_, "heal")


def slot(seed: int, round_: int, phase: str, step: int, idx: int) -> int:
    """The sampling of one completion slot: dose-walk batch `step` (phase probe or collect), row `idx` (the
    walk's cursor). Its own generator, so the text does not depend on its batch or on gen_batch."""
    return seed_for(seed, round_, f"dose.{phase}.{step}.{idx}")


def random_vector(seed: int, round_: int, k: int) -> int:
    """The k-th equal-norm random control vector of a round (c-sweep)."""
    return seed_for(seed, round_, f"csweep.random.{k}")


def bootstrap(seed: int, round_: int, what: str) -> int:
    """The resampling of one paired bootstrap interval (intervals.py): `what` names the stages and metric."""
    return seed_for(seed, round_, f"bootstrap.{what}")


def control_vector(seed: int) -> int:
    """The random control's direction (--control random): one per run, the same in every round."""
    return seed_for(seed, 0, "control.random")
