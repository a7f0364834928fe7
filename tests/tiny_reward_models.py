"""Tiny random reward models, built from configs in code and saved with ``save_pretrained``
(nothing is downloaded): the models the reward tests (``test_hf_rewards.py``,
``test_vlm_rewards.py``) and ``benchmarks/rewards.py`` load through the rewards' own paths.

* :func:`save_tiny_clip` — a 2-layer CLIPModel (32×32 inputs, projection 16) and its processor,
  for ``clip_score``, ``pickscore`` and ``aesthetic``;
* :func:`save_tiny_aesthetic_head` — the aesthetic MLP for that CLIP's 16-dim embeddings;
* :func:`save_tiny_llava` — a LLaVA (2-layer CLIP tower on 16×16 inputs, 2-layer Llama) with a
  chat template, where "Yes" and "No" are single tokens, for ``vlm_judge``;
* :func:`save_tiny_owl` — a 1-layer OWLv2 or OWL-ViT (32×32 inputs, 16 patches), and
  :func:`save_tiny_colour_clip` — the CLIP the detector names colours with, for
  ``geneval_detector``.

Every builder seeds torch itself, so a folder's weights are the same on every call. The
tokenizers are word-level (built with ``tokenizers``); a word outside their vocabulary is
``<unk>``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from unigrpo_env.rewards.aesthetic import AestheticHead

__all__ = [
    "CLIP_WORDS",
    "VLM_SPECIAL",
    "VLM_WORDS",
    "VLM_TEMPLATE",
    "DET_SPECIAL",
    "DET_WORDS",
    "BOX_HEAD_SCALE",
    "clip_tokenizer",
    "word_tokenizer",
    "vlm_tokenizer",
    "detector_tokenizer",
    "save_tiny_clip",
    "save_tiny_aesthetic_head",
    "save_tiny_llava",
    "save_tiny_owl",
    "save_tiny_colour_clip",
]

# ---------------------------------------------------------------------------------------------
# tokenizers
# ---------------------------------------------------------------------------------------------

CLIP_WORDS = ["<pad>", "<unk>", "<s>", "</s>", "a", "red", "green", "blue", "circle", "square", "draw"]


def clip_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over :data:`CLIP_WORDS` that adds ``<s> … </s>`` like CLIP's (the
    text model pools at ``</s>``)."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(CLIP_WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=16,
    )


def word_tokenizer(words: list[str], special: list[str], **kwargs) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``special + words`` (whitespace and punctuation split);
    ``post=`` sets its post-processor, the other keywords go to ``PreTrainedTokenizerFast``."""
    vocab = {w: i for i, w in enumerate(dict.fromkeys(special + words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    if "post" in kwargs:
        tok.post_processor = kwargs.pop("post")
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


VLM_SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
VLM_WORDS = (
    "Yes No USER ASSISTANT : Is Are there exactly two a an the in image ? Answer yes or no . dog cat elephant "
    "umbrella umbrellas pink orange red boat wine glass sandwich to right of left is big"
).split()
# A LLaVA-style template: "USER: <image> {text}\nASSISTANT:".
VLM_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() }}: {% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<image> {% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def vlm_tokenizer() -> PreTrainedTokenizerFast:
    """The LLaVA's tokenizer: :data:`VLM_WORDS`, with ``<image>`` as its image token."""
    return word_tokenizer(
        VLM_WORDS,
        VLM_SPECIAL,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
    )


DET_SPECIAL = ["<pad>", "<unk>", "<s>", "</s>"]
DET_WORDS = (
    "a photo of an - colored object dog cat elephant umbrella boat wine glass sandwich red orange yellow green "
    "blue purple pink brown black white"
).split()


def detector_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level over :data:`DET_WORDS`, ``<s> … </s>`` like CLIP's (the text models pool at ``</s>``)."""
    post = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)])
    return word_tokenizer(
        DET_WORDS,
        DET_SPECIAL,
        post=post,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=16,
    )


# ---------------------------------------------------------------------------------------------
# CLIP rewards: clip_score, pickscore, aesthetic
# ---------------------------------------------------------------------------------------------


def save_tiny_clip(folder: str | Path) -> dict[str, str]:
    """A tiny random CLIPModel (2 layers of width 32 per tower, 32×32 inputs in 8×8 patches,
    projection 16; seed 0) with its processor in ``folder/clip``, and the processor alone in
    ``folder/processor``. Returns ``{"clip": ..., "processor": ...}``."""
    root = Path(folder)
    torch.manual_seed(0)
    text = dict(
        vocab_size=len(CLIP_WORDS), hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=16, bos_token_id=2, eos_token_id=3, pad_token_id=0,
    )  # fmt: skip
    vision = dict(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=32, patch_size=8
    )
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=clip_tokenizer(),
    )
    model.save_pretrained(root / "clip")
    processor.save_pretrained(root / "clip")
    processor.save_pretrained(root / "processor")
    return {"clip": str(root / "clip"), "processor": str(root / "processor")}


def save_tiny_aesthetic_head(path: str | Path, input_size: int = 16, seed: int = 1) -> str:
    """A random aesthetic MLP for ``input_size``-dim embeddings (the tiny CLIP's 16), seeded
    with ``seed``, written to the safetensors file ``path``; returns ``str(path)``."""
    torch.manual_seed(seed)
    AestheticHead(input_size).save_safetensors(path)
    return str(path)


# ---------------------------------------------------------------------------------------------
# vlm_judge
# ---------------------------------------------------------------------------------------------


def save_tiny_llava(folder: str | Path) -> str:
    """A tiny random LLaVA in ``folder``: a 2-layer CLIP vision tower on 16×16 inputs (patch 8:
    4 image tokens) and a 2-layer Llama, with a word-level tokenizer where "Yes" and "No" are
    single tokens and a LLaVA-style chat template. Its ``lm_head`` is scaled ×20 so that P(yes)
    differs visibly between pairs. Returns ``str(folder)``."""
    tokenizer = vlm_tokenizer()
    vocab = tokenizer.get_vocab()
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}),
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token, which "default" drops
        chat_template=VLM_TEMPLATE,
    )
    text = dict(
        model_type="llama", vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=2,
        eos_token_id=3,
    )  # fmt: skip
    vision = dict(
        model_type="clip_vision_model", hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, image_size=16, patch_size=8, projection_dim=16,
    )  # fmt: skip
    config = LlavaConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=vocab["<image>"],
        image_seq_length=4,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    with torch.no_grad():  # a larger lm_head, so that P(yes) differs visibly between pairs
        model.lm_head.weight.mul_(20)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


# ---------------------------------------------------------------------------------------------
# geneval_detector
# ---------------------------------------------------------------------------------------------

#: The random box head's weights are scaled by this, so that boxes stay around their patch priors.
BOX_HEAD_SCALE = 0.5

_DET_TEXT = dict(
    vocab_size=len(DET_SPECIAL) + len(DET_WORDS), hidden_size=32, intermediate_size=37, num_attention_heads=4,
    num_hidden_layers=1, max_position_embeddings=16, bos_token_id=2, eos_token_id=3, pad_token_id=0,
)  # fmt: skip
_DET_VISION = dict(
    hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=1, image_size=32, patch_size=8
)
_DET_SIZE = {"height": 32, "width": 32}


def save_tiny_owl(folder: str | Path, v2: bool = True) -> str:
    """A tiny random OWLv2 (``v2``; seed 0) or OWL-ViT (seed 1) detector with its processor in
    ``folder``: one layer of width 32 per tower, 32×32 inputs in 8×8 patches (16 boxes), the box
    head ×:data:`BOX_HEAD_SCALE` and the class head ×0.05 (boxes around their patch priors,
    scores not saturated). Returns ``str(folder)``."""
    from transformers import (
        Owlv2Config,
        Owlv2ForObjectDetection,
        Owlv2Processor,
        OwlViTConfig,
        OwlViTForObjectDetection,
        OwlViTProcessor,
    )
    from transformers.models.owlv2.image_processing_pil_owlv2 import Owlv2ImageProcessorPil
    from transformers.models.owlvit.image_processing_pil_owlvit import OwlViTImageProcessorPil

    if v2:
        config_class, model_class, processor_class = Owlv2Config, Owlv2ForObjectDetection, Owlv2Processor
        image_processor, seed = Owlv2ImageProcessorPil(size=_DET_SIZE), 0
    else:
        config_class, model_class, processor_class = OwlViTConfig, OwlViTForObjectDetection, OwlViTProcessor
        image_processor, seed = OwlViTImageProcessorPil(size=_DET_SIZE, crop_size=_DET_SIZE), 1
    torch.manual_seed(seed)
    # projection_dim = the text width: the class head maps patches to the text embedding's size
    model = model_class(config_class(text_config=_DET_TEXT, vision_config=_DET_VISION, projection_dim=32))
    with torch.no_grad():  # tame the random heads: boxes around their patch priors, scores not saturated
        for head, scale in ((model.box_head, BOX_HEAD_SCALE), (model.class_head, 0.05)):
            for p in head.parameters():
                p.mul_(scale)
    model.save_pretrained(folder)
    processor_class(image_processor=image_processor, tokenizer=detector_tokenizer()).save_pretrained(folder)
    return str(folder)


def save_tiny_colour_clip(folder: str | Path) -> str:
    """The tiny random CLIPModel (2 layers of width 32 per tower, 32×32 inputs, projection 16;
    seed 7) the detector names colours with, on the detector's tokenizer, in ``folder``.
    Returns ``str(folder)``."""
    torch.manual_seed(7)
    clip = CLIPModel(
        CLIPConfig(
            text_config=dict(_DET_TEXT, num_hidden_layers=2),
            vision_config=dict(_DET_VISION, num_hidden_layers=2),
            projection_dim=16,
        )
    )
    clip.save_pretrained(folder)
    CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=_DET_SIZE),
        tokenizer=detector_tokenizer(),
    ).save_pretrained(folder)
    return str(folder)
