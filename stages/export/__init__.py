"""`export`: the pairs of an output in the layouts the trainers people use read (swift, hf, llava);
the run itself is stages.export.exporter, the pairs it streams stages.export.pairs."""
