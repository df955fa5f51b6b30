"""BLIP's WordPiece vocabulary extended with what a dataset needs (the ``extend`` strategy).

The base vocabulary stays as it is (ids 0..n-1 keep their meaning); the dataset's missing
characters, then its frequent sub-words, get ids n, n+1, ... Words split on whitespace
alone, so punctuation and the characters of unspaced scripts (Japanese, Chinese, Thai)
become ``##`` pieces of their word, and the decoder joins ``##`` pieces without a space
and "cleans up" nothing: a caption decodes exactly as it was written.
"""

from __future__ import annotations

import heapq
import itertools
import json
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from imageq.api_client.errors import ModelError

#: A frequent sub-word is one that occurs at least this often in the dataset's words.
MIN_FREQUENCY = 2
#: WordPiece turns a longer word into [UNK], and an unspaced caption is one word.
MAX_WORD_CHARS = 256
#: At most this many BPE merges are learned in search of frequent sub-words.
MAX_MERGES = 100_000


#: Names the ids between the base tokenizer's length and ``first_new`` (``extend_tokenizer``).
RESERVED_TOKEN = "[imageq_reserved_{}]"


def extend_tokenizer(
    base: Any, texts: Sequence[str], max_subwords: int, first_new: int = 0
) -> tuple[Any, list[str], dict[str, bool]]:
    """BLIP's WordPiece plus what ``texts`` need: ``(tokenizer, added tokens, folding)``.

    The added tokens take ids from ``first_new`` (at least the base's length) on. Ids
    between the base's length and ``first_new`` are ones the model uses without the
    tokenizer naming them (a ``[DEC]`` start token, padding rows of the embedding
    table): they become special placeholder tokens, so that no new token takes one and
    decoding skips them, as it skips the base's special tokens.
    """
    from tokenizers import Tokenizer

    spec = json.loads(base.backend_tokenizer.to_str())
    model = spec["model"]
    if model.get("type") != "WordPiece":
        raise ModelError(
            f"the extend vocabulary needs a WordPiece base tokenizer, not {model.get('type')}; "
            "use the replace vocabulary"
        )
    prefix = model.get("continuing_subword_prefix") or "##"
    spec["normalizer"], folding = _normalizer(spec.get("normalizer"), texts)
    spec["pre_tokenizer"] = {"type": "WhitespaceSplit"}
    spec["decoder"] = {"type": "WordPiece", "prefix": prefix, "cleanup": False}
    model["max_input_chars_per_word"] = max(
        int(model.get("max_input_chars_per_word") or 0), MAX_WORD_CHARS
    )
    normalizer = Tokenizer.from_str(json.dumps(spec)).normalizer
    words = Counter(w for t in texts for w in normalizer.normalize_str(t).split())
    base_vocab: dict[str, int] = model["vocab"]
    added = missing_pieces(words, base_vocab, prefix)
    subwords = frequent_subwords(words, base_vocab, prefix, max_subwords, exclude=added)
    # Frequent sub-words move word boundaries: what the new boundaries need comes too.
    added += subwords + missing_pieces(
        words, {**base_vocab, **dict.fromkeys(added + subwords, 0)}, prefix
    )
    # Tokens added to the base after its vocabulary (BLIP's [DEC] and [ENC]) join the
    # vocabulary at their ids: tokenizers numbers added tokens it cannot find there after
    # the vocabulary's size, which would give them the new pieces' ids.
    everything = base.get_vocab()
    first = len(base)
    if sorted(everything.values()) != list(range(first)):
        raise ModelError(f"the base tokenizer's ids are not 0..{first - 1}")
    reserved = {RESERVED_TOKEN.format(i): i for i in range(first, max(first, first_new))}
    spec["added_tokens"] = list(spec.get("added_tokens") or []) + [
        dict(id=i, content=token, single_word=False, lstrip=False, rstrip=False)
        | dict(normalized=False, special=True)
        for token, i in reserved.items()
    ]
    first += len(reserved)
    new = {token: first + i for i, token in enumerate(added)}
    model["vocab"] = {**everything, **reserved, **new}
    tokenizer = wrap_tokenizer(Tokenizer.from_str(json.dumps(spec)), base, cleanup=False)
    kept = {**everything, **reserved}
    moved = [t for t, i in kept.items() if tokenizer.convert_tokens_to_ids(t) != i]
    if moved or len(tokenizer) != first + len(added):
        raise ModelError(f"extending the vocabulary moved base tokens: {moved[:5]}")
    return tokenizer, added, folding


def _normalizer(
    spec: dict[str, Any] | None, texts: Sequence[str]
) -> tuple[dict[str, Any], dict[str, bool]]:
    """NFC, then the base's normalizer with each folding kept only where it is lossless."""
    if not spec or spec.get("type") != "BertNormalizer":
        return {"type": "Sequence", "normalizers": [{"type": "NFC"}, *([spec] if spec else [])]}, {}
    lowercase = bool(spec.get("lowercase"))
    strip = spec.get("strip_accents")
    strip = lowercase if strip is None else bool(strip)
    folding = {
        "lowercase": lowercase and all(t.lower() == t for t in texts),
        "strip_accents": strip
        and all(strip_accents(t) == unicodedata.normalize("NFC", t) for t in texts),
    }
    bert = {**spec, "handle_chinese_chars": False, **folding}
    return {"type": "Sequence", "normalizers": [{"type": "NFC"}, bert]}, folding


def strip_accents(text: str) -> str:
    """BERT's accent stripping (NFD without combining marks), recomposed."""
    decomposed = unicodedata.normalize("NFD", text)
    kept = "".join(c for c in decomposed if unicodedata.category(c) != "Mn")
    return unicodedata.normalize("NFC", kept)


def wordpiece(
    word: str, vocab: dict[str, int] | set[str], prefix: str, *, inside: bool = False
) -> list[str | None]:
    """Greedy longest-match-first WordPiece of ``word``; None for a character that no
    piece covers (where WordPiece itself gives up on the whole word)."""
    pieces: list[str | None] = []
    i = 0
    while i < len(word):
        for end in range(len(word), i, -1):
            piece = (prefix if i or inside else "") + word[i:end]
            if piece in vocab:
                pieces.append(piece)
                i = end
                break
        else:
            pieces.append(None)
            i += 1
    return pieces


def missing_pieces(words: Iterable[str], vocab: dict[str, int], prefix: str) -> list[str]:
    """The single characters, word-initial or ``##``, that writing ``words`` needs and
    ``vocab`` lacks, in order of first need."""
    added: dict[str, int] = {}
    for word in words:
        i = 0
        while i < len(word):
            for end in range(len(word), i, -1):
                piece = (prefix if i else "") + word[i:end]
                if piece in vocab or piece in added:
                    i = end
                    break
            else:
                added[(prefix if i else "") + word[i]] = 0
                i += 1
    return list(added)


def frequent_subwords(
    words: Counter[str], vocab: dict[str, int], prefix: str, limit: int, exclude: Sequence[str] = ()
) -> list[str]:
    """Up to ``limit`` sub-words that WordPiece training (BPE merges over the words) finds
    at least ``MIN_FREQUENCY`` times and that the base cannot spell, most frequent first."""
    if limit <= 0 or not words:
        return []
    skip = set(exclude)
    candidates = [
        token
        for token in bpe_merges(words, prefix)
        if token not in vocab
        and token not in skip
        and None
        in wordpiece(token.removeprefix(prefix), vocab, prefix, inside=token.startswith(prefix))
    ]
    counts = {token: _occurrences(token, words, prefix) for token in candidates}
    ranked = sorted(candidates, key=lambda t: (-counts[t], -len(t.removeprefix(prefix)), t))
    return [t for t in ranked if counts[t] >= MIN_FREQUENCY][:limit]


def bpe_merges(words: Counter[str], prefix: str, max_merges: int = MAX_MERGES) -> list[str]:
    """The tokens BPE learns from ``words`` (what tokenizers' WordPiece trainer does), in
    merge order, while a pair occurs ``MIN_FREQUENCY`` times. Ties go to the
    alphabetically first token: tokenizers' trainer breaks them in no fixed order, and a
    job resumed on another worker must build the same vocabulary."""
    splits = {w: [w[0], *(prefix + c for c in w[1:])] for w in words}
    counts: Counter[tuple[str, str]] = Counter()
    where: dict[tuple[str, str], set[str]] = defaultdict(set)
    for word, n in words.items():
        for pair in itertools.pairwise(splits[word]):
            counts[pair] += n
            where[pair].add(word)

    def entry(pair: tuple[str, str]) -> tuple[int, str, str, str]:
        return (-counts[pair], pair[0] + pair[1][len(prefix) :], *pair)

    heap = [entry(pair) for pair in counts]
    heapq.heapify(heap)
    learned: list[str] = []
    while heap and len(learned) < max_merges:
        negative, merged, a, b = heapq.heappop(heap)
        if counts.get((a, b), 0) != -negative:
            continue  # a stale entry: the pair's count changed since it was pushed
        if -negative < MIN_FREQUENCY:
            break
        learned.append(merged)
        touched: set[tuple[str, str]] = set()
        for word in sorted(where.pop((a, b), ())):
            old, n = splits[word], words[word]
            new: list[str] = []
            i = 0
            while i < len(old):
                if i + 1 < len(old) and (old[i], old[i + 1]) == (a, b):
                    new.append(merged)
                    i += 2
                else:
                    new.append(old[i])
                    i += 1
            for pair in itertools.pairwise(old):
                counts[pair] -= n
                where[pair].discard(word)
                touched.add(pair)
            for pair in itertools.pairwise(new):
                counts[pair] += n
                where[pair].add(word)
                touched.add(pair)
            splits[word] = new
        counts.pop((a, b), None)
        for pair in touched:
            if counts.get(pair, 0) > 0:
                heapq.heappush(heap, entry(pair))
    return learned


def _occurrences(token: str, words: Counter[str], prefix: str) -> int:
    if not token.startswith(prefix):
        return sum(n for w, n in words.items() if w.startswith(token))
    body = token.removeprefix(prefix)
    return sum(n * w.count(body, 1) for w, n in words.items())


def wrap_tokenizer(backend: Any, base: Any, *, cleanup: bool) -> Any:
    """A transformers tokenizer around ``backend`` with ``base``'s special tokens."""
    from transformers import PreTrainedTokenizerFast

    extra = list(getattr(base, "extra_special_tokens", None) or [])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        clean_up_tokenization_spaces=cleanup,
        model_max_length=base.model_max_length,
        extra_special_tokens=extra,
        **base.special_tokens_map,
    )


def base_spelling(token: str, vocab: dict[str, int], prefix: str) -> list[int]:
    """Base ids spelling ``token`` with case and accents folded ("##é" -> "##e"); a piece
    inside a word falls back to word-initial pieces ("##x" -> "x") where those are all
    the base has. Partial spellings count; an empty list means none at all."""
    body = token.removeprefix(prefix)
    forms = list(dict.fromkeys((body, body.lower(), strip_accents(body).lower())))
    insides = [True, False] if token.startswith(prefix) else [False]
    partial: list[int] = []
    for inside in insides:
        for form in forms:
            pieces = wordpiece(form, vocab, prefix, inside=inside)
            found = [vocab[p] for p in pieces if p is not None]
            if found and len(found) == len(pieces):
                return found
            partial = partial or found
    return partial
