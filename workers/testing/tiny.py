"""Tiny, randomly initialised models of the real architectures, for tests and ``--tiny``.

Nothing here downloads anything: the models are built from code, saved with
``save_pretrained`` (safetensors) and then loaded by the predictors through the same
``from_pretrained(local_dir)`` path production uses for hub checkpoints.

The weights are random, so **the captions these models produce are meaningless** word
salad and the match scores carry no information. They are only good for exercising the
plumbing: shapes, batching, determinism, attention maps, adapters, error handling.

``blip_base_caption_config`` gives the full-size BLIP-base captioning architecture for
benchmarks with random weights (the numbers measure speed, never quality).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import BlipConfig, BlipProcessor

# Token ids follow the layout of the real BLIP tokenizer, only renumbered: BERT's
# specials first, then [DEC] (BLIP's decoder bos token) and [ENC] (its encoder token).
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]")
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID, DEC_ID, ENC_ID = range(len(SPECIAL_TOKENS))
# 48 px in 8 px patches: a 6x6 attention grid, small but not square-of-two trivial.
TINY_IMAGE_SIZE = 48

# Real words, so that a tiny model's caption decodes to something that looks like text.
_WORD_LIST = """
a an the of in on at with and or to from by for near under over behind next into up down
out off through across along around between above below beside while is are was be being
has have there this that it its his her their two three four several many some one man
woman person people boy girl child children baby player men women dog cat horse bird cow
sheep elephant bear zebra giraffe animal fish duck car bus truck train bike bicycle
motorcycle boat plane airplane street road sidewalk building house city sign light pole
tree trees grass field park beach sand water ocean sea lake river wave waves snow
mountain hill sky cloud clouds sun table chair couch bed room kitchen bathroom window
door wall floor desk shelf plate bowl cup glass bottle food pizza sandwich cake fruit
banana apple orange bread meat salad dish phone laptop computer book clock vase flowers
umbrella bag kite frisbee ball bat racket skateboard surfboard skis board tennis
baseball soccer game shirt hat jacket dress uniform glasses tie picture photo
photography image painting view close front top side group pair couple line row sitting
standing walking running riding holding playing eating looking flying lying laying
parked driving waiting smiling talking watching carrying wearing hanging covered filled
topped made taking using doing getting going red blue green yellow white black brown
gray orange pink purple dark bright large small big little tall old young new empty full
open wooden metal
"""
_WORDS = _WORD_LIST.split()
_LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)]


def tiny_vocabulary() -> dict[str, int]:
    """The tiny models' vocabulary: specials, then words, then single letters."""
    tokens = list(SPECIAL_TOKENS)
    for word in (*_WORDS, *_LETTERS):
        if word not in tokens:
            tokens.append(word)
    # Punctuation lets BERT's pre-tokeniser split "a dog." into known pieces.
    tokens.extend(p for p in ".,!?'-" if p not in tokens)
    return {token: i for i, token in enumerate(tokens)}


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch for one build without changing the caller's random state."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _tiny_processor(image_size: int) -> BlipProcessor:
    from transformers import BertTokenizer, BlipImageProcessorPil, BlipProcessor

    # transformers 5 takes the vocabulary as a dict; a ``vocab_file=`` would be ignored.
    tokenizer = BertTokenizer(vocab=tiny_vocabulary(), do_lower_case=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    tokenizer.model_max_length = 512
    if (tokenizer.bos_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id) != (
        DEC_ID,
        SEP_ID,
        PAD_ID,
    ):
        raise RuntimeError("tiny tokenizer special token ids drifted from the model config")
    # The PIL backend needs no torchvision and gives the same pixels on every machine.
    image_processor = BlipImageProcessorPil(size={"height": image_size, "width": image_size})
    return BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)


def tiny_blip_config(image_size: int = TINY_IMAGE_SIZE, patch_size: int = 8) -> BlipConfig:
    """A BLIP config small enough that setup and predict take milliseconds on a CPU."""
    from transformers import BlipConfig

    vocab_size = len(tiny_vocabulary())  # [DEC] and [ENC] included, as in BLIP
    # A wider initialisation than BLIP's defaults (1e-10 for the vision embeddings)
    # makes different images give different features and decisive next-token logits,
    # so greedy captions do not hinge on rounding noise.
    init_range = 0.1
    text: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "encoder_hidden_size": 32,
        "intermediate_size": 64,
        "projection_dim": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 512,
        "bos_token_id": DEC_ID,
        # BLIP's generate stops on sep; eos only fills the unused second slot of the
        # default prompt, so pointing it at sep too keeps the two from disagreeing.
        "eos_token_id": SEP_ID,
        "sep_token_id": SEP_ID,
        "pad_token_id": PAD_ID,
        "initializer_range": init_range,
    }
    vision: dict[str, Any] = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "projection_dim": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": image_size,
        "patch_size": patch_size,
        "initializer_range": init_range,
    }
    return BlipConfig(
        text_config=text,
        vision_config=vision,
        projection_dim=32,
        image_text_hidden_size=32,
        initializer_range=init_range,
    )


def _save(model: Any, processor: BlipProcessor, path: Path) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    return path


def build_tiny_caption(path: Path, seed: int = 0) -> Path:
    """Save a tiny random ``BlipForConditionalGeneration`` and its processor to ``path``.

    The same seed gives the same weights. Captions are meaningless (random weights).
    """
    from transformers import BlipForConditionalGeneration

    config = tiny_blip_config()
    with _seeded(seed):
        model = BlipForConditionalGeneration(config).eval()
    return _save(model, _tiny_processor(TINY_IMAGE_SIZE), path)


#: ``build_tiny_caption_padded``'s embedding table: a multiple of this many rows, as
#: vocabularies padded for tensor cores are.
PADDED_ROWS_MULTIPLE = 64


def build_tiny_caption_padded(path: Path, seed: int = 0) -> Path:
    """A tiny BLIP as some conversions ship one: the tokenizer lists no ``[DEC]`` (nor
    ``[ENC]``), the decoder's start id lies past the tokenizer's length, and the
    embedding table is padded to a multiple of ``PADDED_ROWS_MULTIPLE`` rows.

    An adapter vocabulary that numbered its new tokens from the tokenizer's length would
    give the first of them the start id (docs/finetune.md, "Vocabulary").
    """
    from transformers import BertTokenizer, BlipForConditionalGeneration, BlipProcessor

    words = [t for t in tiny_vocabulary() if t not in ("[DEC]", "[ENC]")]
    tokenizer = BertTokenizer(vocab={t: i for i, t in enumerate(words)}, do_lower_case=True)
    tokenizer.model_max_length = 512
    size = len(tokenizer)
    config = tiny_blip_config()
    text: Any = config.text_config
    rows = -(-(size + 2) // PADDED_ROWS_MULTIPLE) * PADDED_ROWS_MULTIPLE
    text.vocab_size = rows
    # [DEC] one past the tokenizer, as BLIP's would be; [SEP] and [PAD] keep their ids.
    text.bos_token_id = size
    text.sep_token_id = text.eos_token_id = words.index("[SEP]")
    text.pad_token_id = words.index("[PAD]")
    with _seeded(seed):
        model = BlipForConditionalGeneration(config).eval()
    base = _tiny_processor(TINY_IMAGE_SIZE)
    processor = BlipProcessor(image_processor=base.image_processor, tokenizer=tokenizer)
    return _save(model, processor, path)


def build_tiny_match(path: Path, seed: int = 0) -> Path:
    """Save a tiny random ``BlipForImageTextRetrieval`` and its processor to ``path``."""
    from transformers import BlipForImageTextRetrieval

    config = tiny_blip_config()
    with _seeded(seed):
        model = BlipForImageTextRetrieval(config).eval()
    return _save(model, _tiny_processor(TINY_IMAGE_SIZE), path)


def blip_base_caption_config() -> BlipConfig:
    """The architecture of ``Salesforce/blip-image-captioning-base``, built from code.

    ViT-B/16 at 384 px (a 24x24 patch grid) and a BERT-base text decoder with the
    30524-token vocabulary (BERT's 30522 plus [DEC] and [ENC]). For benchmarks with
    random weights; no download.
    """
    from transformers import BlipConfig

    text: dict[str, Any] = {
        "vocab_size": 30524,
        "hidden_size": 768,
        "encoder_hidden_size": 768,
        "intermediate_size": 3072,
        "projection_dim": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 512,
        "bos_token_id": 30522,
        "eos_token_id": 2,
        "sep_token_id": 102,
        "pad_token_id": 0,
    }
    vision: dict[str, Any] = {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "projection_dim": 512,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "image_size": 384,
        "patch_size": 16,
        "layer_norm_eps": 1e-5,
    }
    return BlipConfig(
        text_config=text, vision_config=vision, projection_dim=512, image_text_hidden_size=256
    )


# ---------------------------------------------------------------------------------------
# Diffusion (UNet / VAE / CLIP text encoder) builders are added below by their owner.
# ---------------------------------------------------------------------------------------
