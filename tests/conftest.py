import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("OMP_NUM_THREADS", "2")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402

from utils.make_tiny_models import make_tiny_model  # noqa: E402

from helpers import write_dataset  # noqa: E402


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory) -> Path:
    return make_tiny_model("qwen-image", tmp_path_factory.mktemp("models") / "tiny-qwen-image")


@pytest.fixture
def dataset(tmp_path) -> Path:
    return write_dataset(tmp_path / "data")
