"""Writing an output: the lease (one run at a time), the cleanup of leftovers, the shard writer (write
task), the run files and the dataset card (driver)."""
