"""blocks_to_swap: frozen weights of the last N blocks live in host RAM and visit the device only while they run."""

import gc
import weakref

import pytest
import torch
from helpers import base_overrides, read_losses, write_dataset
from peft import LoraConfig
from safetensors.torch import load_file

from trainer.config import ConfigError, load_config
from trainer.loop import train
from trainer.models.flux import FluxAdapter
from trainer.models.qwen_image import QwenImageAdapter
from trainer.offload import plain_tensors
from trainer.models.qwen_image import build_qwen_transformer
from trainer.quantize import place_model

MODES = ["none", "qfloat8", "qint8", "qint4", "nf4"]


def _model(mode: str, swap: int, checkpointing: bool):
    torch.manual_seed(0)
    model = build_qwen_transformer(num_layers=3).requires_grad_(False).eval()
    placement = place_model(model, mode, torch.device("cpu"), torch.float32, swap)
    torch.manual_seed(1)
    lora = LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    with placement.host_weights():
        model.add_adapter(lora)
    model.requires_grad_(False)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    if checkpointing:
        model.enable_gradient_checkpointing()
    return model, placement.swap


def _forward(model):
    g = torch.Generator().manual_seed(2)
    x, text = torch.randn(2, 16, 16, generator=g), torch.randn(2, 5, 32, generator=g)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    return model(hidden_states=x, encoder_hidden_states=text, encoder_hidden_states_mask=mask, timestep=torch.tensor([0.3, 0.7]),
                 img_shapes=[[(1, 4, 4)]] * 2, return_dict=False)[0]


@pytest.mark.parametrize("checkpointing", [False, True], ids=["own-checkpointing", "diffusers-checkpointing"])
@pytest.mark.parametrize("mode", MODES)
def test_swapped_blocks_give_the_same_loss_and_gradients(mode, checkpointing):
    grads = []
    for swap in (0, 2):
        model, block_swap = _model(mode, swap, checkpointing)
        loss = _forward(model).pow(2).mean()
        loss.backward()
        grads.append((loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])))
        if swap:
            # forward + the recompute in backward, for each swapped block
            assert block_swap.onloads == 4
            assert all(not p.requires_grad and p.numel() == 0 for b in model.transformer_blocks[1:] for p in b.parameters(recurse=True) if not p.requires_grad)
            assert all(p.numel() > 0 for p in model.transformer_blocks[0].parameters())
    (l0, g0), (l1, g1) = grads
    assert l0 == l1
    assert torch.equal(g0, g1)


@pytest.mark.parametrize("mode", MODES)
def test_device_copies_do_not_outlive_their_block(mode):
    """The memory saving itself: no copy of a swapped block's weights survives past that block's forward.

    Tracked at the storage level, so views kept by autograd (e.g. bitsandbytes' ctx attributes) count too.
    """
    model, swap = _model(mode, 2, checkpointing=False)
    storages = []
    to_device = swap._to_device

    def tracked(master):
        out = to_device(master)
        storages.extend(weakref.ref(t.untyped_storage()) for t in plain_tensors(out))
        return out

    swap._to_device = tracked
    out = _forward(model)
    gc.collect()
    assert storages and not [s for s in storages if s() is not None], "weights of swapped blocks kept alive until backward"
    n_forward = len(storages)
    out.pow(2).mean().backward()
    gc.collect()
    assert len(storages) == 2 * n_forward  # uploaded again for the recompute
    assert not [s for s in storages if s() is not None]


def test_swap_without_tracking_would_be_caught():
    """Guard for the test above: without checkpointing the swapped block, autograd keeps its weights."""
    from trainer.offload import _SwappedForward

    model, swap = _model("none", 2, checkpointing=False)
    for block in swap.blocks:
        fwd = block.forward
        block.forward = lambda *a, _f=fwd, **k: _f.run(*a, **k)  # no checkpoint around the block
    storages = []
    to_device = swap._to_device
    swap._to_device = lambda m: (lambda o: (storages.extend(weakref.ref(t.untyped_storage()) for t in plain_tensors(o)), o)[1])(to_device(m))
    out = _forward(model)
    gc.collect()
    assert isinstance(fwd, _SwappedForward) and [s for s in storages if s() is not None]
    del out


@pytest.mark.parametrize("mode", ["none", "nf4"])
def test_training_with_blocks_to_swap_matches_training_without(mode, tiny_qwen, tmp_path):
    data = write_dataset(tmp_path / "d", n=2)
    runs = {}
    for swap in (0, 1):
        out = tmp_path / f"swap{swap}"
        cfg = load_config(None, base_overrides(tiny_qwen, data, out, quantize=mode, blocks_to_swap=swap,
                                               **{"data_config.train_batch_size": 2, "gradient_checkpointing": True}))
        train(cfg, QwenImageAdapter)
        runs[swap] = (read_losses(out), load_file(out / "pytorch_lora_weights.safetensors"))
    (l0, w0), (l1, w1) = runs[0], runs[1]
    assert l0 == pytest.approx(l1, abs=1e-6)
    assert w0.keys() == w1.keys() and all(torch.allclose(w0[k], w1[k], atol=1e-6) for k in w0)


def test_blocks_to_swap_config_errors(tiny_qwen, tiny_models, tmp_path):
    data = write_dataset(tmp_path / "d", n=1)
    flux = tiny_models("flux")
    with pytest.raises(ConfigError, match="'blocks_to_swap' is 2, but this transformer has 2 blocks"):
        QwenImageAdapter.check_setup(load_config(None, base_overrides(tiny_qwen, data, tmp_path / "o", blocks_to_swap=2)))
    FluxAdapter.check_setup(load_config(None, base_overrides(flux, data, tmp_path / "o", blocks_to_swap=2)))  # 1 double + 2 single
    with pytest.raises(ConfigError, match="'blocks_to_swap' must be >= 0"):
        load_config(None, base_overrides(tiny_qwen, data, tmp_path / "o", blocks_to_swap=-1))
    with pytest.raises(ConfigError, match="'blocks_to_swap' cannot be combined with torch_compile"):
        load_config(None, base_overrides(tiny_qwen, data, tmp_path / "o", blocks_to_swap=1, torch_compile=True))
    with pytest.raises(ConfigError, match="'blocks_to_swap' does not work with quantize=int8"):
        load_config(None, base_overrides(tiny_qwen, data, tmp_path / "o", blocks_to_swap=1, quantize="int8"))


def test_flux_with_swapped_single_blocks_trains_and_samples(tiny_models, tmp_path):
    """FLUX: the last two blocks are single-stream blocks; no diffusers checkpointing, so the swap checkpoints them
    itself; validation sampling (no grad) runs through the swapped blocks too."""
    flux = tiny_models("flux")
    data = write_dataset(tmp_path / "d", n=2)
    runs = {}
    for swap in (0, 2):
        out = tmp_path / f"swap{swap}"
        extra = {"validation_prompts": "[a red cat]", "validation_num_inference_steps": 2} if swap else {}
        train(load_config(None, base_overrides(flux, data, out, blocks_to_swap=swap, **{"data_config.img_size": 32}, **extra)), FluxAdapter)
        runs[swap] = read_losses(out)
    assert runs[0] == pytest.approx(runs[2], abs=1e-6)
    assert (tmp_path / "swap2" / "samples").is_dir() and list((tmp_path / "swap2" / "samples").glob("*.png"))
