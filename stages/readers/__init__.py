"""Reading an output, from any process: what it holds (output_state), its shards (shards), validate,
inspect, plot, preview, and a sample's turns (conversation). Readers never import stages.output."""
