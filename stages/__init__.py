"""One module per step of the pipeline. Stages import schemas, never pipeline."""
