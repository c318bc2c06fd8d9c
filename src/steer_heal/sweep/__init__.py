"""Sweeps, here or on a Prefect work pool: a grid of runs (grid.py), launching its cells (launch.py: a process
each, in this process, or the pool), the cell and command flows a worker runs (cell.py), submission and the
skip/resume decision on the pool (pool.py), the store's view of a cell (state.py),
`just sweep-status` (status.py), and the server and worker processes (procs.py). docs/scaling.md."""
