"""Drop-in plugins: every module in this folder is imported before a run validates its grid,
on the driver and on every worker, so the models and solvers it registers are usable in any
grid without an edit elsewhere."""
