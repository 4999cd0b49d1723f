"""Datasets: caption folders (text-to-image), edit pairs (control_dir or metadata.csv/jsonl); images are read with every colour mode and EXIF orientation handled."""

from .caption_dataset import (
    CaptionDataset,
    ReferenceRule,
    Sample,
    ScanResult,
    SizeGroupedBatchSampler,
    collate,
    read_caption,
    scan_caption_folder,
    scan_dataset,
    scan_metadata,
)
from .images import BadImageError, load_image, resize_and_crop, resize_exact, resize_views, target_size, to_tensor

__all__ = [
    "BadImageError",
    "CaptionDataset",
    "ReferenceRule",
    "Sample",
    "ScanResult",
    "SizeGroupedBatchSampler",
    "collate",
    "load_image",
    "read_caption",
    "resize_and_crop",
    "resize_exact",
    "resize_views",
    "scan_caption_folder",
    "scan_dataset",
    "scan_metadata",
    "target_size",
    "to_tensor",
]
