"""Training: validated spec -> privacy plan -> pure step -> driver with callbacks.

`spec` declares every config key; `plan` turns a spec and a task into the
run's privacy choices and ledger; `step` is the jitted private step;
`loop` is the driver (`train`: `compile_step`, `fit`); `task` what it trains
(`Task`, evaluation, the checks of a task); `optimizer` the optax optimizer of
a config; `callbacks` its hooks; `rundir` the run directory and checkpoints;
`sharding` the mesh and placements.
"""
