"""Shared training core: config schema, flow-matching objective, the training loop, checkpoints and model adapters."""
