"""The dataset check that runs before any model loads; `utils/validate_dataset.py --config` runs the same one."""

from __future__ import annotations

from image_datasets import ScanResult, scan_dataset
from trainer.config import TrainConfig


def scan_for_training(cfg: TrainConfig, adapter, decode: bool = True) -> ScanResult:
    """Every sample of cfg.data_config (of each of its datasets, in order) as the adapter's family will train it:
    references sized as its pipeline sizes them and counted against what the model takes; every unusable file or row
    is one problem line. Each sample knows its dataset and loss weight."""
    d = cfg.data_config
    total = ScanResult()
    masked, coverage = 0, 0.0
    for i, (part, weight) in enumerate(zip(d.parts(), d.loss_weights())):
        scan = scan_dataset(part, decode, adapter.reference_sizes, adapter.reference_rule(), adapter.size_multiple)
        for s in scan.samples:
            s.dataset, s.loss_weight, s.control_mode = i, weight, part.control_mode
        if d.datasets and not scan.samples and not scan.problems:
            scan.problems.append(f"data_config.datasets[{i}]: no samples")
        total.samples += scan.samples
        total.problems += scan.problems
        total.warnings += scan.warnings
        if scan.masks:
            masked, coverage = masked + scan.masks[0], coverage + scan.masks[0] * scan.masks[1]
    total.masks = (masked, coverage / masked) if masked else None
    return total
