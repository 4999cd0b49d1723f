"""Shared training core: config schema, flow-matching objective, the training loop, checkpoints and model adapters."""

import logging
import os

# bitsandbytes warns on import that an optional CPU kernel package is missing; it is not used by us.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
# DeepSpeed (imported by accelerate when installed) warns "Setting accelerator to CPU" on every machine without a GPU;
# naming the CPU accelerator where there is no GPU device file says the same without the warning. A GPU machine
# (or DS_ACCELERATOR set by the user) is left to DeepSpeed's own detection.
if "DS_ACCELERATOR" not in os.environ and not any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/kfd", "/dev/dxg")):
    os.environ["DS_ACCELERATOR"] = "cpu"
# transformers' notices at import (e.g. "requires torchvision (not installed); falling back to ...PIL") come before
# the tools set its verbosity; errors still show. TRANSFORMERS_VERBOSITY=warning brings them back.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
