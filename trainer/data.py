"""The dataset check that runs before any model loads; `utils/validate_dataset.py --config` runs the same one."""

from __future__ import annotations

from image_datasets import ScanResult, scan_dataset
from trainer.config import TrainConfig


def scan_for_training(cfg: TrainConfig, adapter, decode: bool = True) -> ScanResult:
    """Every sample of cfg.data_config as the adapter's family will train it: references sized as its pipeline sizes
    them and counted against what the model takes; every unusable file or row is one problem line."""
    return scan_dataset(cfg.data_config, decode, adapter.reference_sizes, adapter.reference_rule(), adapter.size_multiple)
