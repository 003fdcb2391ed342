"""The training side: reads the shards a run wrote and trains on them; nothing in generation
imports it.

- config.py: the settings of `train`, torch-free
- loader.py: ShardDataset / ShardBatches / collate_pairs, the shards in any torch trainer
- losses.py: the mixed SimPO + SFT loss (mergemix_loss and its parts)
- vlm.py: model adapters (the toy VLM, llava-hf) that turn images + turns into logits and labels
- train.py: `mergemix-pipeline train`, the one-process training loop with exact resume
- hf_trainer.py: the same loss on the transformers Trainer (DDP / FSDP / DeepSpeed)
"""
