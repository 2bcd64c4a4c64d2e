"""The machinery: grid expansion and validation, the preflight, the shard runner, the
executors (in process and Ray) and the Parquet store."""
