"""The store's schema, in one place: every table, its columns and types, where it lives, and which
rows each stage of the flow owns (what resume drops when that stage crashed half way).

Add a column or a table to TABLES and the writer (log.py), the views (views.py), the catalog and
docs/store.md (checked against this by tests/test_store.py) all follow.
"""

from __future__ import annotations

import datetime as dt

DEFAULT_ROOT = "out"

_ROUND_COLS = ["kappa DOUBLE", "walk VARCHAR", "n_gen BIGINT", "n_kept BIGINT", "kept_frac DOUBLE",
               "ppl_mean DOUBLE", "ppl_median DOUBLE"]
_ROUND_DOUBLES = (
    "care_nats fairness_nats loyalty_nats auth_nats sanctity_nats liberty_nats social_nats "
    "target_nats trait_nats coherence cos_v0 student_cos retain retain_trait coh_cost"
).split()


def _cols(spec: str | list[str]) -> dict[str, str]:
    """'a TYPE, b TYPE' -> {'a': 'TYPE', 'b': 'TYPE'} (keeps TABLES readable)."""
    items = spec.split(",") if isinstance(spec, str) else spec
    return dict(item.split() for item in items)


# table -> {column: duckdb type}. The first column is the owner's id and decides
# where the table lives: run_id -> runs/, diag_id -> diagnostics/.
TABLES: dict[str, dict[str, str]] = {
    "run_info": _cols(
        "run_id VARCHAR, created TIMESTAMP, model VARCHAR, preset VARCHAR, reg VARCHAR,"
        "seed BIGINT, n_rounds BIGINT, config_hash VARCHAR, config JSON, env JSON,"
        "resumed_from VARCHAR, resolved JSON, control VARCHAR"),
    "status": _cols(
        "run_id VARCHAR, ts TIMESTAMP, status VARCHAR, round BIGINT, reason VARCHAR"),
    "rounds": _cols(
        ["run_id VARCHAR", "round BIGINT", *_ROUND_COLS]
        + [f"{c} DOUBLE" for c in _ROUND_DOUBLES]
        + ["surgical BOOLEAN", "heal_nll DOUBLE", "val_nll DOUBLE",
           "steered_target_nats DOUBLE", "steered_trait_nats DOUBLE",
           "steered_coherence DOUBLE", "adapter_ppl DOUBLE", "steered_adapter_ppl DOUBLE",
           "kl_steer DOUBLE", "broken BOOLEAN", "steered_broken BOOLEAN", "broken_reason VARCHAR",
           "sec_extract DOUBLE", "sec_dose DOUBLE",
           "sec_heal DOUBLE", "sec_eval DOUBLE", "sec_total DOUBLE"]),
    "stage_metrics": _cols(
        "run_id VARCHAR, round BIGINT, stage VARCHAR, evaluator VARCHAR,"
        "foundation VARCHAR, prob DOUBLE, nats DOUBLE, coherence DOUBLE,"
        "top1_agree DOUBLE, n BIGINT, coef DOUBLE, ppl DOUBLE, kl DOUBLE"),
    "eval_items": _cols(
        "run_id VARCHAR, round BIGINT, stage VARCHAR, evaluator VARCHAR, item VARCHAR,"
        "frame VARCHAR, option_order VARCHAR, p JSON, p_target DOUBLE, pmass DOUBLE,"
        "trait_lp DOUBLE, opposite_lp DOUBLE, diff DOUBLE, ppl DOUBLE, kl DOUBLE, coef DOUBLE"),
    "intervals": _cols(
        "run_id VARCHAR, round BIGINT, stage VARCHAR, metric VARCHAR, ref VARCHAR,"
        "ref_round BIGINT, n BIGINT, delta DOUBLE, lo DOUBLE, hi DOUBLE, boot BIGINT, ns BOOLEAN"),
    "probe_info": _cols(
        "run_id VARCHAR, round BIGINT, probe VARCHAR, informative BOOLEAN, mass DOUBLE, separation DOUBLE,"
        "lo DOUBLE, hi DOUBLE, chance DOUBLE, n BIGINT, reason VARCHAR"),
    "completions": _cols(
        "run_id VARCHAR, round BIGINT, phase VARCHAR, step BIGINT, idx BIGINT,"
        "alpha DOUBLE, kappa DOUBLE, coef DOUBLE, prompt VARCHAR, completion VARCHAR,"
        "ppl DOUBLE, rep_word DOUBLE, rep_char DOUBLE, narration BOOLEAN,"
        "refusal BOOLEAN, keep BOOLEAN, reason VARCHAR, relevance DOUBLE, ended BOOLEAN, distinct DOUBLE"),
    "heal_steps": _cols(
        "run_id VARCHAR, round BIGINT, step BIGINT, epoch BIGINT, nll DOUBLE,"
        "div DOUBLE, barrier DOUBLE, loss DOUBLE, gnorm_sft DOUBLE,"
        "gnorm_barrier DOUBLE, lr DOUBLE, val_nll DOUBLE"),
    "dose_steps": _cols(
        "run_id VARCHAR, round BIGINT, step BIGINT, kappa DOUBLE, n BIGINT,"
        "n_kept BIGINT, rate DOUBLE, accepted BOOLEAN, phase VARCHAR"),
    "stages": _cols(
        "run_id VARCHAR, round BIGINT, stage VARCHAR, seconds DOUBLE, ts TIMESTAMP"),
    "yoke": _cols(
        "run_id VARCHAR, round BIGINT, treatment VARCHAR, coef DOUBLE, n BIGINT, scale DOUBLE, kl DOUBLE,"
        "kl_target DOUBLE, iters BIGINT"),
    "adapters": _cols("run_id VARCHAR, round BIGINT, path VARCHAR, sha256 VARCHAR"),
    "vectors": _cols("run_id VARCHAR, round BIGINT, path VARCHAR, sha256 VARCHAR"),
    "diagnostics": _cols(
        "diag_id VARCHAR, kind VARCHAR, source_run VARCHAR, round BIGINT,"
        "created TIMESTAMP, config JSON, status VARCHAR"),
    "diag_rows": _cols(
        "diag_id VARCHAR, kind VARCHAR, source_run VARCHAR, round BIGINT, row JSON"),
}

# kind (= top-level folder) -> the id column that marks its tables.
KINDS = {"runs": "run_id", "diagnostics": "diag_id"}
# Timestamp columns filled with the current UTC time when a row leaves them out,
# so that "latest status" ordering never meets a NULL ts.
AUTO_NOW = ("ts", "created")
# One line over read_json's maximum_object_size fails every query on the view
# (ignore_errors does not cover it), so the writer refuses such rows up front
# and the views allow 4x that.
MAX_LINE_BYTES = 16 << 20


def tables_of(kind: str) -> list[str]:
    return [t for t, cols in TABLES.items() if next(iter(cols)) == KINDS[kind]]


def utcnow() -> dt.datetime:
    """Naive UTC: DuckDB's TIMESTAMP parser drops a '+hh:mm' offset rather than
    applying it, so the store only ever holds UTC without an offset."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)
