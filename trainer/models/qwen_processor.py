"""The Qwen2.5-VL / Qwen3-VL processor (prompt text + condition images -> model inputs) for the Qwen pipelines.

transformers builds `Qwen2VLProcessor` / `Qwen3VLProcessor` only when torchvision is importable (its video half needs it). Where it is
not (CPU-only installs, this project's test machine), `QwenVLImageTextProcessor` does the image + text part the
same way: the image processor gives pixel patches and `image_grid_thw`, and every `<|image_pad|>` in the text is
expanded to one token per merged patch, exactly as `Qwen2VLProcessor.__call__` does.
"""

from __future__ import annotations

import logging

from transformers import AutoTokenizer, BatchFeature, ProcessorMixin

logger = logging.getLogger(__name__)


class QwenVLImageTextProcessor(ProcessorMixin):
    # A ProcessorMixin so that diffusers pipelines accept it as their `processor` component. ProcessorMixin's own
    # __init__ is skipped on purpose: it is what insists on the torchvision-backed video processor.
    image_token = "<|image_pad|>"

    def __init__(self, image_processor, tokenizer, mm_token_type_ids: bool = False):  # noqa: D107
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.chat_template = getattr(tokenizer, "chat_template", None)
        self.return_mm_token_type_ids = mm_token_type_ids  # Qwen3-VL's processor returns them (1 at image tokens)

    def __call__(self, text=None, images=None, padding=True, return_tensors="pt", max_length=None, truncation=None,
                 padding_side=None, **_unused):
        text = [text] if isinstance(text, str) else list(text)
        image_inputs = {}
        if images is not None:
            image_inputs = dict(self.image_processor(images=images, return_tensors="pt"))
            grid = image_inputs["image_grid_thw"]
            merge = self.image_processor.merge_size**2
            index = 0
            for i, t in enumerate(text):
                while self.image_token in t:
                    t = t.replace(self.image_token, "<|placeholder|>" * int(grid[index].prod() // merge), 1)
                    index += 1
                text[i] = t.replace("<|placeholder|>", self.image_token)
        side = {} if padding_side is None else {"padding_side": padding_side}
        text_inputs = dict(self.tokenizer(text, padding=padding, return_tensors=return_tensors, max_length=max_length,
                                          truncation=truncation, **side))
        if self.return_mm_token_type_ids:
            text_inputs["mm_token_type_ids"] = (text_inputs["input_ids"] == self.tokenizer.convert_tokens_to_ids(self.image_token)).int()
        return BatchFeature(data={**text_inputs, **image_inputs}, tensor_type=return_tensors)

    def apply_chat_template(self, conversation, tokenize=False, return_dict=False, **kwargs):
        """The tokenizer's chat template; tokenized, a batch of one (as ProcessorMixin returns it)."""
        text = self.tokenizer.apply_chat_template(conversation, tokenize=False, **kwargs)
        if not tokenize:
            return text
        out = self.tokenizer([text], add_special_tokens=False)
        return out if return_dict else out["input_ids"]


    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)


def load_qwen_processor(name_or_path: str, subfolder: str = "processor", qwen3: bool = False):
    """transformers' Qwen2VLProcessor (Qwen3VLProcessor with qwen3=True) when it can be built here, else the
    equivalent image + text processor."""
    import transformers

    name = "Qwen3VLProcessor" if qwen3 else "Qwen2VLProcessor"
    try:
        return getattr(transformers, name).from_pretrained(name_or_path, subfolder=subfolder)
    except (AttributeError, ImportError, ValueError, TypeError) as e:
        logger.info("%s unavailable (%s); using the image + text processor", name, type(e).__name__)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image_processor = Qwen2VLImageProcessorPil.from_pretrained(name_or_path, subfolder=subfolder)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, subfolder=subfolder)
    return QwenVLImageTextProcessor(image_processor, tokenizer, mm_token_type_ids=qwen3)
