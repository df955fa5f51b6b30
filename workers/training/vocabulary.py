"""The tokenizer a caption fine-tune writes with, chosen and checked before training.

BLIP's tokenizer is BERT's English WordPiece: it lower-cases, strips accents, splits
Chinese characters apart and turns anything else it lacks into ``[UNK]``; its decoder
joins words with spaces. So ``un chat noir sur un canapé`` comes back as ``canape`` at
best and ``黒い猫`` as ``[UNK]`` or ``黒 い 猫``. Three strategies (docs/finetune.md):

- ``base``: BLIP's tokenizer as it is (its case and accent folding are its convention);
- ``extend``: BLIP's WordPiece plus the dataset's missing characters and frequent
  sub-words, appended after the base ids (``imageq.workers.training.wordpiece``);
- ``replace``: a tokenizer the job gives, every embedding row re-initialised for it.

Whatever the strategy, every caption goes through the tokenizer before any image is
encoded or any step taken; one that cannot be written fails the job as
``invalid_input`` naming it. The rows of new tokens start at the mean of the base rows
of their base spelling ("é" from "e", "canapé" from "can ##ap ##e"), or, for a script
the base has never seen, at the mean of all base rows plus a little noise (Hewitt's
initialisation of new words), so that no new token starts out likelier than the rest.
"""

from __future__ import annotations

import json
import logging
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from imageq.api_client.errors import ImageqError, InvalidInput, ModelError
from imageq.api_client.inputs import VocabularyOptions
from imageq.api_client.languages import BASE_LANGUAGE, primary
from imageq.api_client.settings import Settings
from imageq.workers.io.storage import Storage
from imageq.workers.training.wordpiece import base_spelling, extend_tokenizer, wrap_tokenizer

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

Strategy = Literal["base", "extend", "replace"]
#: Noise on the rows of tokens the base cannot spell, relative to the base rows' spread,
#: so that new tokens do not start as identical twins.
NEW_ROW_NOISE = 0.1
_QUOTED = 60  # characters of a caption quoted in an error
_SHOWN_PROBLEMS = 3


@dataclass
class VocabularyPlan:
    """What the adapter writes with; ``base_rows`` ids keep the base model's rows."""

    strategy: Strategy
    language: str | None
    tokenizer: Any
    base_rows: int
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int
    #: ``extend``: the tokens appended after the base vocabulary, in id order.
    added: list[str] = field(default_factory=list)
    #: ``extend``: whether lower-casing and accent stripping stayed on.
    folding: dict[str, bool] = field(default_factory=dict)
    #: ``base`` without a language: captions holding text BLIP cannot write ([UNK]).
    unknown: int = 0

    @property
    def carries_tokenizer(self) -> bool:
        return self.strategy != "base"

    def special_ids(self) -> dict[str, int]:
        return {
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }

    def info(self) -> dict[str, Any]:
        """What the registry and ``imageq_adapter.json`` say about the vocabulary."""
        out: dict[str, Any] = {"strategy": self.strategy, "tokens": len(self.tokenizer)}
        if self.carries_tokenizer:
            out["base_rows"] = self.base_rows
        if self.strategy == "extend":
            out.update(added=len(self.added), **self.folding)
        if self.unknown:
            out["captions_with_unknown_tokens"] = self.unknown
        return out


# -- the round trip -----------------------------------------------------------------------


def expected_text(text: str) -> str:
    """What an exact round trip gives back: NFC, with each run of whitespace one space."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def round_trip(tokenizer: Any, text: str) -> tuple[list[int], str]:
    """``text`` as token ids and back, decoded as the caption predictor decodes."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids, str(tokenizer.decode(ids, skip_special_tokens=True)).strip()


def writing_problem(tokenizer: Any, text: str, *, exact: bool, max_tokens: int) -> str | None:
    """Why ``tokenizer`` cannot write ``text`` (None: it can)."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    if not ids:
        return "it has no tokens"
    unk = tokenizer.unk_token_id
    if unk is not None and unk in ids:
        start, end = encoded["offset_mapping"][ids.index(unk)]
        return f"{text[start:end]!r} becomes {tokenizer.unk_token}"
    if exact:
        back = str(tokenizer.decode(ids, skip_special_tokens=True)).strip()
        if back != expected_text(text):
            return f"it comes back as {_quote(back)}"
        if len(ids) > max_tokens:
            return f"it takes {len(ids)} tokens, more than the {max_tokens} a caption may have"
    return None


def check_captions(
    tokenizer: Any,
    captions: Sequence[tuple[str, str]],
    strategy: str,
    *,
    exact: bool,
    max_tokens: int,
    hint: str = "",
) -> None:
    """``InvalidInput`` naming the first captions (``(file_name, text)``) that fail."""
    problems = []
    for index, (name, text) in enumerate(captions):
        problem = writing_problem(tokenizer, text, exact=exact, max_tokens=max_tokens)
        if problem:
            problems.append(
                f"caption {index} {_quote(text)} ({name}) cannot be written by the "
                f"{strategy} tokenizer: {problem}"
            )
    if problems:
        more = len(problems) - _SHOWN_PROBLEMS
        tail = f"; and {more} more" if more > 0 else ""
        raise InvalidInput("input.dataset: " + "; ".join(problems[:_SHOWN_PROBLEMS]) + tail + hint)


def _quote(text: str) -> str:
    return json.dumps(text if len(text) <= _QUOTED else text[:_QUOTED] + "…", ensure_ascii=False)


# -- where new ids start --------------------------------------------------------------------


def first_new_id(tokenizer_size: int, embedding_rows: int, roles: set[int]) -> int:
    """The first id an ``extend`` vocabulary may give a new token: past the tokenizer,
    past the embedding table (conversions without ``[DEC]`` in the tokenizer, tables
    padded to a multiple of 64) and past every id the config gives a role. Starting at
    the tokenizer's length gave BLIP's start id to the first new token, and every
    caption began with it."""
    if tokenizer_size > embedding_rows:
        raise ModelError(
            f"the caption model's tokenizer has {tokenizer_size} tokens but its embedding "
            f"table only {embedding_rows} rows"
        )
    return max(tokenizer_size, embedding_rows, max(roles, default=-1) + 1)


# -- choosing the strategy ------------------------------------------------------------------


def plan_vocabulary(
    base: Any,
    captions: Sequence[tuple[str, str]],
    *,
    language: str | None,
    options: VocabularyOptions | None,
    base_ids: tuple[int, int, int],
    max_tokens: int,
    replacement: Path | None = None,
    first_new: int = 0,
) -> VocabularyPlan:
    """The vocabulary for ``captions``, checked; ``base_ids`` is the model's (bos, eos, pad)
    and ``first_new`` the first id ``extend`` may give a new token (``first_new_id``).

    Without ``options``: ``base`` for BLIP's own language (or none given) and for a
    dataset the base writes exactly, else ``extend``.
    """
    strategy = options.strategy if options else None
    texts = [text for _, text in captions]
    if strategy is None:
        own_language = language is None or primary(language) == BASE_LANGUAGE
        # Each caption tokenized and decoded only when the language alone does not decide.
        exact = own_language or all(
            writing_problem(base, t, exact=True, max_tokens=max_tokens) is None for t in texts
        )
        strategy = "base" if exact else "extend"
    if strategy == "base":
        bos, eos, pad = base_ids
        plan = VocabularyPlan("base", language, base, len(base), bos, eos, pad)
        if language is None and options is None:
            # A job that names no language trains as it always has, [UNK]s included;
            # the registry entry says how many captions had some.
            plan.unknown = sum(
                writing_problem(base, t, exact=False, max_tokens=max_tokens) is not None
                for t in texts
            )
            if plan.unknown:
                log.warning("%d caption(s) hold text the base tokenizer cannot write", plan.unknown)
            return plan
        # BLIP folds case and accents and spaces punctuation by design: only what it
        # cannot write at all ([UNK]) is refused.
        hint = '; use the "extend" vocabulary'
        check_captions(base, captions, "base", exact=False, max_tokens=max_tokens, hint=hint)
        return plan
    if strategy == "extend":
        limit = (
            options.max_subwords if options else VocabularyOptions(strategy="extend").max_subwords
        )
        tokenizer, added, folding = extend_tokenizer(base, texts, limit, first_new)
        check_captions(tokenizer, captions, "extend", exact=True, max_tokens=max_tokens)
        bos, eos, pad = base_ids
        # Every id below the first new one keeps the base model's row.
        base_rows = len(tokenizer) - len(added)
        return VocabularyPlan(
            "extend", language, tokenizer, base_rows, bos, eos, pad, added, folding
        )
    if replacement is None:
        raise InvalidInput("input.vocabulary.tokenizer: the replace strategy needs a tokenizer")
    tokenizer = load_replacement(replacement)
    check_captions(tokenizer, captions, "replace", exact=True, max_tokens=max_tokens)
    bos, eos, pad = replacement_ids(tokenizer)
    return VocabularyPlan("replace", language, tokenizer, 0, bos, eos, pad)


# -- replace --------------------------------------------------------------------------------


def fetch_tokenizer(ref: str, dest: Path, settings: Settings, storage: Storage) -> Path:
    """Fetch the folder ``ref`` names (as a dataset is fetched) and find the tokenizer in it."""
    from imageq.workers.training.datasets import fetch_dataset

    try:
        fetch_dataset(ref, dest, settings, storage)
    except ImageqError as exc:
        message = exc.message.removeprefix("dataset: ")
        raise type(exc)(f"input.vocabulary.tokenizer: {message}") from None
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        found = sorted(dest.rglob(name), key=lambda p: (len(p.parts), str(p)))
        if found:
            return found[0].parent
    raise InvalidInput(
        "input.vocabulary.tokenizer: no tokenizer.json, tokenizer_config.json or vocab.txt"
    )


def load_replacement(folder: Path) -> Any:
    """The job's tokenizer from ``folder`` (no remote code, no download)."""
    from transformers import AutoTokenizer

    try:
        loaded = AutoTokenizer.from_pretrained(
            str(folder), local_files_only=True, trust_remote_code=False
        )
    except Exception as exc:
        raise InvalidInput(f"input.vocabulary.tokenizer: cannot load it: {exc}") from None
    if getattr(loaded, "backend_tokenizer", None) is None:
        raise InvalidInput("input.vocabulary.tokenizer: needs a tokenizers (fast) tokenizer")
    # Saved with the adapter as tokenizer.json alone, whatever class the folder named.
    return wrap_tokenizer(
        loaded.backend_tokenizer, loaded, cleanup=bool(loaded.clean_up_tokenization_spaces)
    )


def replacement_ids(tokenizer: Any) -> tuple[int, int, int]:
    """(bos, eos, pad) for BLIP's decoder: bos or [CLS] starts, [SEP] or eos ends."""
    bos = _first_id(tokenizer, "bos_token_id", "cls_token_id")
    eos = _first_id(tokenizer, "sep_token_id", "eos_token_id")
    if bos is None or eos is None:
        raise InvalidInput(
            "input.vocabulary.tokenizer: needs a start token (bos or [CLS]) and an end token "
            "([SEP] or eos)"
        )
    pad = _first_id(tokenizer, "pad_token_id")
    return bos, eos, eos if pad is None else pad


def _first_id(tokenizer: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return None


# -- the new rows ---------------------------------------------------------------------------


def initial_rows(
    plan: VocabularyPlan,
    base: Any,
    embedding: torch.Tensor,
    bias: torch.Tensor,
    ids: Sequence[int],
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and output biases for the adapter's ``ids``, from the base model's: a base
    token of ``extend`` starts as itself, a new one from its base spelling."""
    import torch

    vocab = base.get_vocab()
    prefix = (
        json.loads(base.backend_tokenizer.to_str())["model"].get("continuing_subword_prefix")
        or "##"
    )
    tokens = plan.tokenizer.convert_ids_to_tokens(list(ids))
    roles = _special_rows(plan, base) if plan.strategy == "replace" else {}
    table = embedding.float()
    known = table[: len(base)]
    mean, spread = known.mean(0), known.std(0)
    generator = torch.Generator().manual_seed(seed)
    rows, biases = [], []
    for token_id, token in zip(ids, tokens, strict=True):
        sources = roles.get(token_id)
        if sources is None and plan.strategy == "extend" and token_id < plan.base_rows:
            # A base id (the start id and padding rows included) starts as itself.
            sources = [token_id]
        if sources is None:
            sources = [vocab[token]] if token in vocab else base_spelling(token, vocab, prefix)
        if sources:
            rows.append(table[sources].mean(0))
            biases.append(bias[sources].float().mean())
        else:
            noise = torch.randn(known.shape[1], generator=generator) * spread * NEW_ROW_NOISE
            rows.append(mean + noise.to(mean.device))
            biases.append(bias[: len(base)].float().mean())
    return torch.stack(rows), torch.stack(biases)


def _special_rows(plan: VocabularyPlan, base: Any) -> dict[int, list[int]]:
    """A replacement tokenizer's special tokens start from the base's, role by role."""
    pairs: list[tuple[Any, Any]] = [
        (plan.bos_token_id, base.bos_token_id),
        (plan.eos_token_id, base.sep_token_id),
    ]
    pairs += [
        (getattr(plan.tokenizer, f"{role}_token_id", None), getattr(base, f"{role}_token_id", None))
        for role in ("pad", "unk", "cls", "sep", "mask")
    ]
    return {new: [old] for new, old in pairs if isinstance(new, int) and isinstance(old, int)}
