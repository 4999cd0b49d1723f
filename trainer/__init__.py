"""Shared training core: config schema, flow-matching objective, the training loop, checkpoints and model adapters."""

import logging

# bitsandbytes warns on import that an optional CPU kernel package is missing; it is not used by us.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
