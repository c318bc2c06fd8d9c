"""Diagnostics: each reads a run from the store, measures something, and writes what it found back as a
diagnostic record (record.py): one `diagnostics` row and its `diag_rows` under
<root>/diagnostics/<diag_id>/, next to its plots and a report.md. Like a run, a diagnostic only appends
whole lines, so it works while a training run writes to the same store.

  csweep.py    dose sweep of one round against equal-norm random vectors   (just csweep)
  stages.py    base / prompted / steered / healed per round, seed intervals (just stages)
  barrier.py   re-heal one round over a grid of barrier settings           (just barrier-sweep)
  pareto.py    trait moved vs coherence, the front per round               (just pareto)
  plot_run.py  one run by round                                            (just plot)

Shared: runs.py (store queries about runs), stats.py (intervals, the front), model.py (a round's model),
plots.py (figures). Each command module's `main(argv)` is what scripts/ and the justfile call.
"""
