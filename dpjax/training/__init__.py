"""Training: validated spec -> privacy plan -> pure step -> driver with callbacks.

`spec` declares every config key; `plan` turns a spec and a task into the
run's privacy choices and ledger; `step` is the jitted private step;
`loop` is the driver (`train`); `rundir` the run directory and checkpoints;
`sharding` the mesh and placements.
"""
