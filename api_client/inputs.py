"""The inputs of every job kind (DESIGN §2): what a job document's ``input`` holds.

Each kind's model is named in its ``KindSpec`` (api_client/kinds.py); a job document is
validated against it once, and handlers receive the model, never a dict.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from imageq.api_client.languages import language_tag

# storage://uploads/... names an upload in the deployment's own storage (api_client.uploads).
IMAGE_SCHEMES = ("s3://", "https://", "http://", "data:image/", "file://", "storage://uploads/")
SCHEDULERS = ("ddim", "euler", "euler_ancestral", "dpmpp_2m", "pndm", "default")
# The display names (AUTOMATIC1111's, diffusers') are accepted too, in any case.
SCHEDULER_ALIASES = {
    "euler a": "euler_ancestral",
    "euler_a": "euler_ancestral",
    "dpm-solver++": "dpmpp_2m",
    "dpm++ 2m": "dpmpp_2m",
    "plms": "pndm",
}


#: An adapter's name: no "/" (a tenant's registry field is ``{tenant}/{name}``, so a name
#: holding one could name another tenant's adapter) and no leading "." or "_".
ADAPTER_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


class Reference:
    """Marks a string field whose value a worker fetches (``Annotated[str, REFERENCE]``):
    what a tenant's job may name there is checked (api_client.references)."""

    def __repr__(self) -> str:
        return "REFERENCE"


REFERENCE = Reference()


def _check_image_ref(value: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("an image reference must be a non-empty string")
    if not value.startswith(IMAGE_SCHEMES):
        raise ValueError(
            "unsupported image reference: use s3://, https://, http://, data:image/..., "
            "storage://uploads/... (an upload) or file:// (where the deployment allows "
            "local files)"
        )
    if len(value) > 4096 and not value.startswith("data:"):
        raise ValueError("image URL longer than 4096 characters")
    return value


ImageRef = Annotated[str, Field(min_length=1), AfterValidator(_check_image_ref), REFERENCE]
#: A dataset or a tokenizer folder: an archive or a storage prefix (``.../``).
DataRef = Annotated[str, Field(min_length=1, max_length=4096), REFERENCE]
#: A BCP 47 language tag, stored in canonical case ("fr", "ja", "pt-BR", "zh-Hant").
LanguageTag = Annotated[str, Field(min_length=1, max_length=64), AfterValidator(language_tag)]


class Strict(BaseModel):
    """Unknown fields are refused: a typo in a job must not be silently ignored."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)


class JobInput(Strict):
    """The base of every kind's input model."""


class AdapterRef(Strict):
    name: str = Field(min_length=1, max_length=128, pattern=ADAPTER_NAME)
    scale: float = Field(default=1.0, ge=-2.0, le=4.0)


class Resize(StrEnum):
    """How caption and match fit an image to the model's square input (docs/design.md).

    Unset: the model processor's own way (BLIP's stretches, so a 4:1 panorama is seen
    squashed); ``center_crop``: the centred box of the input's shape; ``letterbox``:
    the whole image, padded with the processor's mean colour.
    """

    STRETCH = "stretch"
    CENTER_CROP = "center_crop"
    LETTERBOX = "letterbox"


class GenerationOptions(Strict):
    max_new_tokens: int = Field(default=30, ge=1, le=256)
    min_new_tokens: int = Field(default=0, ge=0, le=256)
    num_beams: int = Field(default=1, ge=1, le=10)
    do_sample: bool = False
    top_k: int = Field(default=50, ge=0, le=1000)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    temperature: float = Field(default=1.0, gt=0.0, le=10.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    num_return_sequences: int = Field(default=1, ge=1, le=10)
    #: With ``do_sample``: the same seed, image and options give the same caption, alone
    #: or batched (same model, device type, dtype and library versions). None: random.
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)

    @model_validator(mode="after")
    def _consistent(self) -> GenerationOptions:
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError("min_new_tokens must not exceed max_new_tokens")
        if not self.do_sample and self.num_return_sequences > self.num_beams:
            raise ValueError(
                "num_return_sequences must not exceed num_beams unless do_sample is true"
            )
        return self


class _ImagesInput(JobInput):
    """Accepts ``image`` as shorthand for a one-element ``images`` list."""

    images: list[ImageRef] = Field(min_length=1, max_length=512)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, dict) and "image" in data:
            if "images" in data:
                raise ValueError("give either image or images, not both")
            data = dict(data)
            data["images"] = [data.pop("image")]
        return data


class CaptionInput(_ImagesInput):
    prompt: str | None = Field(default=None, max_length=512)
    generation: GenerationOptions = Field(default_factory=GenerationOptions)
    attention: bool = False
    adapter: str | None = Field(default=None, min_length=1, max_length=128, pattern=ADAPTER_NAME)
    #: Without ``adapter``: the newest published caption adapter for this language.
    language: LanguageTag | None = None
    #: None: the model processor's own resize (BLIP's stretches).
    resize: Resize | None = None


class MatchInput(_ImagesInput):
    texts: list[Annotated[str, Field(min_length=1, max_length=2000)]] = Field(
        min_length=1, max_length=64
    )
    #: As caption's ``resize``.
    resize: Resize | None = None

    @field_validator("texts")
    @classmethod
    def _non_blank(cls, value: list[str]) -> list[str]:
        for i, text in enumerate(value):
            if not text.strip():
                raise ValueError(f"texts[{i}] is blank")
        return value


class _DiffusionCommon(JobInput):
    prompt: str = Field(default="", max_length=2000)
    negative_prompt: str = Field(default="", max_length=2000)
    steps: int = Field(default=25, ge=1, le=150)
    guidance_scale: float = Field(default=7.5, ge=0.0, le=30.0)
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)
    num_images: int = Field(default=1, ge=1, le=8)
    scheduler: Literal["ddim", "euler", "euler_ancestral", "dpmpp_2m", "pndm", "default"] = (
        "default"
    )
    adapters: list[AdapterRef] = Field(default_factory=list, max_length=8)
    #: Step previews of this job (progress.preview, the ``preview`` SSE event,
    #: ``job.preview`` webhooks); the worker's IMAGEQ_PREVIEWS=false turns them all off.
    previews: bool = True

    @field_validator("scheduler", mode="before")
    @classmethod
    def _scheduler_name(cls, value: Any) -> Any:
        if isinstance(value, str):
            name = value.strip().lower()
            return SCHEDULER_ALIASES.get(name, name)
        return value


class GenerateInput(_DiffusionCommon):
    prompt: str = Field(min_length=1, max_length=2000)
    width: int = Field(default=512, ge=64, le=2048)
    height: int = Field(default=512, ge=64, le=2048)

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError("must be a multiple of 8")
        return value


class InpaintInput(_DiffusionCommon):
    image: ImageRef
    mask: ImageRef
    prompt: str = Field(min_length=1, max_length=2000)
    strength: float = Field(default=1.0, gt=0.0, le=1.0)
    #: The input's own pixels outside the mask in the output (OpenAI's edits keep them;
    #: the pipeline alone re-encodes the whole image and changes every pixel a little).
    keep_unmasked: bool = False


class StyleInput(_DiffusionCommon):
    image: ImageRef
    style_image: ImageRef | None = None
    style_prompt: str | None = Field(default=None, min_length=1, max_length=2000)
    style_scale: float = Field(default=0.6, ge=0.0, le=2.0)
    strength: float = Field(default=0.6, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _some_style(self) -> StyleInput:
        if not (self.style_image or self.style_prompt or self.adapters):
            raise ValueError("give at least one of style_image, style_prompt or adapters")
        return self


class VocabularyOptions(Strict):
    """How a caption adapter writes its language (docs/finetune.md, "Vocabulary").

    ``base``: BLIP's own tokenizer; ``extend``: BLIP's WordPiece plus the dataset's
    missing characters and frequent sub-words; ``replace``: the tokenizer in the folder
    ``tokenizer`` names, with embeddings re-initialised for it. A plain string is
    shorthand for ``{"strategy": ...}``.
    """

    strategy: Literal["base", "extend", "replace"]
    #: ``replace`` only: a tokenizer folder (a storage prefix, or a zip/tar archive of
    #: one), referenced like a dataset.
    tokenizer: DataRef | None = None
    #: ``extend`` only: at most this many frequent sub-words join the missing characters.
    max_subwords: int = Field(default=1000, ge=0, le=100_000)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"strategy": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _tokenizer_for_replace(self) -> VocabularyOptions:
        if (self.strategy == "replace") != (self.tokenizer is not None):
            raise ValueError("give a tokenizer with the replace strategy, and only with it")
        return self


class FinetuneInput(JobInput):
    target: Literal["diffusion", "caption"]
    dataset: DataRef
    name: str = Field(min_length=1, max_length=128, pattern=ADAPTER_NAME)
    rank: int = Field(default=8, ge=1, le=256)
    alpha: float = Field(default=8.0, gt=0.0, le=1024.0)
    learning_rate: float = Field(default=1e-4, gt=0.0, le=1.0)
    max_steps: int = Field(default=500, ge=1, le=1_000_000)
    batch_size: int = Field(default=1, ge=1, le=256)
    resolution: int = Field(default=512, ge=64, le=2048)
    checkpoint_every: int = Field(default=100, ge=1, le=1_000_000)
    auto_caption: bool = False
    overwrite: bool = False
    seed: int = Field(default=0, ge=0, le=2**32 - 1)
    #: Caption fine-tunes: the language the captions are in (kept with the adapter).
    language: LanguageTag | None = None
    #: Caption fine-tunes: how the adapter's tokenizer writes that language; by default
    #: ``extend`` when BLIP's vocabulary cannot write the captions exactly, else ``base``.
    vocabulary: VocabularyOptions | None = None

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError("must be a multiple of 8")
        return value

    @model_validator(mode="after")
    def _caption_only(self) -> FinetuneInput:
        if self.target != "caption" and (self.language or self.vocabulary):
            raise ValueError("language and vocabulary apply to caption fine-tunes only")
        return self
