"""Drop-in plugins: every module in this folder is imported by :func:`zoo.import_plugins`,
which a run calls on the driver before it validates its grid and on every worker before its
first shard, so the models and solvers a module here registers are usable in any grid without
an edit elsewhere."""
