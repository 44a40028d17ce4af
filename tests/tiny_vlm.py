"""A tiny random-weight vision-language model (LLaVA architecture: CLIP vision tower + Llama text model)
saved as a transformers image-text-to-text model folder, as users keep them in ComfyUI's models/LLM:
config.json + model.safetensors + tokenizer.json + processor config + chat_template.jinja.

Its answers are gibberish made of its small vocabulary, which includes the format's own tokens ("&",
"(foreground)", ...) and vocabulary words, so a test sees the parser reject near-misses too.
"""
from __future__ import annotations

from pathlib import Path

import torch

SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
WORDS = ["user", "assistant", ":", "&", "(foreground)", "(background)", "dog", "cat", "bright", "dim", "summer",
         "winter", "the", "a", "picture", "composite", "object", "magenta", "outline"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} {% endif %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}assistant : {% endif %}"
)
IMAGE_SIZE, PATCH = 28, 14


def save_tiny_llava(folder: str | Path, seed: int = 0) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor, PreTrainedTokenizerFast)

    try:
        from transformers import CLIPImageProcessorPil as ImageProcessor  # no torchvision needed
    except ImportError:  # older transformers
        from transformers import CLIPImageProcessor as ImageProcessor

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins word tokens with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                        bos_token="<s>", eos_token="</s>",
                                        extra_special_tokens={"image_token": "<image>"})
    image_processor = ImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                     crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                               vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
                               num_additional_image_tokens=1)
    processor.save_pretrained(folder)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=PATCH,
                                       projection_dim=16),
        text_config=LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
                                pad_token_id=0, bos_token_id=2, eos_token_id=3),
        image_token_id=vocab["<image>"], vision_feature_layer=-1, vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    return folder
