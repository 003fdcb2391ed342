"""The shard contract: Arrow schema, per-sample JSON record and version. Imports nothing of ours."""
