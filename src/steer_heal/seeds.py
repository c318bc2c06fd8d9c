"""Seeds derived from (seed, round, stage): a resumed stage draws exactly what it would have."""

import hashlib


def seed_for(seed: int, round_: int, stage: str) -> int:
    h = hashlib.sha256(f"{seed}/{round_}/{stage}".encode()).digest()
    return int.from_bytes(h[:4], "little")  # < 2**32: fits every RNG's seed
