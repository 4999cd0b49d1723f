"""Loading a checkpoint never runs code.

Our own files are safetensors, JSON / YAML and `training_state.pt` (torch.load weights_only). Two engines write
pickles of their own that their loaders unpickle unrestricted: torch.distributed.checkpoint (DCP, FSDP2 runs) pickles
its `.metadata` and loads non-tensor items with `torch.load(weights_only=False)`; DeepSpeed loads its `*.pt` files
with `weights_only=False`. Here every such piece is read through an allow-list of the classes it may hold:

- DCP: `SafeReader` reads `.metadata` with a restricted unpickler (DCP's metadata dataclasses, torch.Size, dtypes,
  paths), `SafePlanner` loads the non-tensor items with `weights_only=True`;
- DeepSpeed: `check_pickles` reads every pickle of its folder with the same kind of unpickler, building nothing
  (each allowed class is replaced by an inert stand-in), before DeepSpeed's own loader is let at it.

Anything else refuses with one line naming the file and the class it wanted.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import torch

from trainer.config import ConfigError

DCP_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
                                              "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint.planner": {"WriteItemType", "LoadItemType"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "slice", "complex", "range"},
}
TENSOR_CLASSES = {  # what torch.save writes for tensors (the weights_only loader's own list)
    "torch._utils": {"_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
                     "_rebuild_parameter_with_state", "_rebuild_qtensor", "_rebuild_sparse_tensor", "_rebuild_wrapper_subclass",
                     "_rebuild_device_tensor_from_numpy", "_rebuild_meta_tensor_no_storage", "_rebuild_from_type_v2"},
    "torch.storage": {"UntypedStorage", "TypedStorage"},
    "torch.nn.parameter": {"Parameter"},
    "torch.serialization": {"_get_layout"},
    "collections": {"OrderedDict", "defaultdict"},
    "builtins": {"set", "frozenset", "slice", "complex", "range", "list", "dict", "tuple", "int", "float", "bool", "str", "bytes"},
}
DEEPSPEED_CLASSES = {  # what DeepSpeed's engine and ZeRO optimizers put into their checkpoint files
    "deepspeed.runtime.zero.config": {"ZeroStageEnum"},
    "deepspeed.runtime.fp16.loss_scaler": {"LossScaler", "DynamicLossScaler"},
    "deepspeed.utils.tensor_fragment": {"fragment_address"},
    "deepspeed.runtime.zero.offload_config": {"OffloadDeviceEnum"},
    "deepspeed.checkpoint.constants": set(),
    "argparse": {"Namespace"},
}


class UnsafeCheckpoint(ConfigError):
    """A checkpoint file holds something other than data (a pickle that would build or call other objects)."""


def _torch_attribute_ok(name: str) -> bool:
    """torch.<name> that is plain data: a dtype, layout, memory format, Size, device, or a typed storage class."""
    value = getattr(torch, name, None)
    return (isinstance(value, (torch.dtype, torch.layout, torch.memory_format)) or name in ("Size", "device")
            or name.endswith("Storage") and isinstance(value, type))


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the allowed (module, name) pairs; anything else raises UnsafeCheckpoint. `inert`: every
    non-builtin allowed class becomes `_Inert` (a check that builds nothing)."""

    def __init__(self, file, allowed: dict[str, set[str]], where: str, inert: bool = False):
        super().__init__(file)
        self.allowed, self.where, self.inert = allowed, where, inert

    def find_class(self, module: str, name: str):
        ok = name in self.allowed.get(module, ()) or module == "torch" and _torch_attribute_ok(name)
        if not ok:
            raise UnsafeCheckpoint(f"{self.where} holds a pickled {module}.{name}, which no checkpoint of this trainer holds; "
                                   "refusing to load it (it could run code). Resume from a checkpoint you wrote yourself")
        if self.inert and module not in ("builtins", "collections"):
            return _Inert
        return super().find_class(module, name)

    def persistent_load(self, pid):
        if self.inert:  # torch.save's storages: (tag, storage class, key, location, size)
            return None
        raise pickle.UnpicklingError("persistent ids are not supported here")


class _Inert:
    """Stands in for every allowed object during a check: accepts whatever the pickle does to it."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _Inert()

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass


def restricted_load(data: bytes, allowed: dict[str, set[str]], where: str, inert: bool = False):
    try:
        return RestrictedUnpickler(io.BytesIO(data), allowed, where, inert).load()
    except UnsafeCheckpoint:
        raise
    except Exception as e:
        raise UnsafeCheckpoint(f"{where} is damaged or not a checkpoint file ({type(e).__name__}: {e}); resume from another checkpoint") from None


def check_pickles(folder: Path, allowed: dict[str, set[str]]) -> int:
    """Read every pickle under `folder` (torch.save zip files and plain pickles) through the allow-list without
    building anything; raises UnsafeCheckpoint on the first that holds anything else. Returns how many were read."""
    n = 0
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        raw = path.read_bytes()
        if zipfile.is_zipfile(io.BytesIO(raw)):
            with zipfile.ZipFile(io.BytesIO(raw)) as z:
                for member in z.namelist():
                    if member.endswith(".pkl"):
                        restricted_load(z.read(member), allowed, f"{path} ({member})", inert=True)
                        n += 1
        elif raw[:1] == b"\x80":  # a pickle protocol header (legacy torch.save or plain pickle)
            restricted_load(raw, allowed, str(path), inert=True)
            n += 1
    return n


def _merge(*tables: dict[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for t in tables:
        for k, v in t.items():
            out.setdefault(k, set()).update(v)
    return out


DEEPSPEED_ALLOWED = _merge(TENSOR_CLASSES, DEEPSPEED_CLASSES)


def dcp_reader(folder: str | Path):
    """A torch.distributed.checkpoint FileSystemReader whose `.metadata` goes through the allow-list."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            path = Path(str(self.path)) / ".metadata"
            if kwargs.get("rank") is not None and hasattr(self, "_get_metadata_path"):
                path = Path(str(self._get_metadata_path(kwargs["rank"])))
            metadata = restricted_load(path.read_bytes(), DCP_CLASSES, str(path))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(folder))


def dcp_planner(**kwargs):
    """DCP's default load planner, loading the non-tensor items (optimizer hyper-parameters) with weights_only."""
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            try:
                obj = torch.load(value, weights_only=True)
            except Exception as e:
                raise UnsafeCheckpoint(f"a non-tensor item ({read_item.dest_index.fqn}) of the sharded checkpoint is not plain data "
                                       f"({type(e).__name__}); refusing to load it") from None
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafePlanner(**kwargs)


def dcp_load(state: dict, folder: str | Path, **planner_kwargs) -> None:
    """torch.distributed.checkpoint.load through `dcp_reader` and `dcp_planner`; a refused piece raises
    UnsafeCheckpoint (DCP wraps each rank's error in a CheckpointException with its traceback as text)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.load(state, storage_reader=dcp_reader(folder), planner=dcp_planner(**planner_kwargs))
    except CheckpointException as e:
        for exc, _trace in e.failures.values():
            if isinstance(exc, UnsafeCheckpoint):
                raise UnsafeCheckpoint(f"{folder}: {exc}") from None
        raise
