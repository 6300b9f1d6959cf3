"""LLM2Vec conversion training on llm2vec_fast kernels: MNTP, SimCSE and supervised contrastive, with LoRA.

    from llm2vec_fast.training import load_config, train
    config = load_config("mntp", "mntp-mistral", {"train_files": ["wiki.txt"], "output_dir": "out/mntp"})
    train(config)          # also: llm2vec-fast train mntp --config mntp-mistral --train-files wiki.txt ...

Batches are packed (no padded token is computed), the MNTP loss only evaluates the LM head at
masked positions, runs resume exactly from checkpoints, and several processes (``torchrun``)
train data-parallel, replicated (DDP) or sharded (``distributed_strategy="fsdp"``, FSDP2), with
contrastive negatives gathered across processes.
"""

from .config import MNTPConfig, SimCSEConfig, SupervisedConfig, TrainConfig, load_config, preset_names
from .loop import TrainingInterrupted, TrainingResult
from .objectives import train

__all__ = [
    "MNTPConfig",
    "SimCSEConfig",
    "SupervisedConfig",
    "TrainConfig",
    "TrainingInterrupted",
    "TrainingResult",
    "load_config",
    "preset_names",
    "train",
]
