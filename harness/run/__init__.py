"""The machinery: the settings, grid files, grid expansion and validation, the preflight, the plan,
the shard runner, the executors (in process and Ray) and the Parquet store."""
