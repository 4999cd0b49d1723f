import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402

from utils.make_tiny_models import make_tiny_model  # noqa: E402

from helpers import write_dataset  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """family -> folder of a tiny pipeline, built on first use and shared by the whole session."""
    root = tmp_path_factory.mktemp("models")
    return lambda family: make_tiny_model(family, root / f"tiny-{family}")


@pytest.fixture(scope="session")
def tiny_qwen(tiny_models) -> Path:
    return tiny_models("qwen-image")


@pytest.fixture
def dataset(tmp_path) -> Path:
    return write_dataset(tmp_path / "data")


@pytest.fixture
def fresh_state():
    """accelerate keeps one process-wide state (mixed precision included); a bf16 run in this process needs a reset."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)
