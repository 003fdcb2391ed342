"""The settings of `mergemix-pipeline train`, torch-free: the CLI shows these defaults in --help
without importing torch."""
from __future__ import annotations

from dataclasses import dataclass

from stages.errors import UserError


@dataclass
class TrainConfig:
    shards: str
    output: str
    model: str = "toy"  # toy | llava-hf
    model_path: str | None = None  # llava-hf: model folder or hub id; toy: optional open_clip config JSON
    model_dtype: str = "fp32"  # llava-hf weights: fp32 | bf16
    gradient_checkpointing: bool = False
    steps: int = 100  # optimizer steps in total (a resumed run continues up to this)
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup: int = 10  # steps of linear warm-up before the cosine decay
    max_grad_norm: float = 1.0  # 0 turns clipping off
    log_every: int = 10
    save_every: int = 0  # steps between checkpoints; 0 = only at the end
    beta: float = 1.0
    sft_weight: float = 0.5
    pref_weight: float = 0.5
    two_sided: bool = False  # gradients through the loser too
    margin_from: str = "lam_hat"  # gamma = 1 - lam_hat (stored margin) | 1 - lam
    seed: int = 0
    max_length: int | None = 2048  # tokens per sequence, image tokens included (LLaVA-1.5: 2048); None: no cut
    text_only_rows: bool = False  # also train on the text-only rows of the Parquet metadata (SFT only)
    num_workers: int = 0  # DataLoader workers; may change on resume (the batch order does not depend on it)
    device: str = "auto"
    resume: bool = False
    allow_partial: bool = False  # train on the units committed now of an unfinished output
    storage_options: dict | None = None  # fsspec options when the shards are on an object store
    partial_units: list[int] | None = None  # set at start with allow_partial: the fixed set, kept on resume

    def check(self) -> None:
        positive = {"steps": self.steps, "batch_size": self.batch_size, "grad_accum": self.grad_accum, "log_every": self.log_every}
        for name, value in positive.items():
            if value < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.lr <= 0 or self.warmup < 0 or self.save_every < 0 or self.num_workers < 0:
            raise UserError("--lr must be positive; --warmup, --save-every and --num-workers must not be negative")
        if self.max_length is not None and self.max_length < 2:
            raise UserError(f"--max-length must be at least 2 tokens, got {self.max_length}")
        if self.margin_from not in ("lam_hat", "lam"):
            raise UserError(f"--margin-from must be lam_hat or lam, got {self.margin_from!r}")
