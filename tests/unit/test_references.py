"""The walker over input models and the rule on what a tenant's job may name
(api_client.references): one implementation for the gateway and the workers."""

from __future__ import annotations

import re
import types
from typing import Any, Union, get_args, get_origin

import pytest
from pydantic import BaseModel

from imageq.api_client.errors import ForbiddenUrl, InvalidInput
from imageq.api_client.inputs import (
    REFERENCE,
    CaptionInput,
    FinetuneInput,
    InpaintInput,
    StyleInput,
)
from imageq.api_client.kinds import JOB_KINDS
from imageq.api_client.references import (
    allowed,
    check_grant,
    check_references,
    reference_fields,
    references,
)

#: Every reference field, by kind: what the workers hand to a fetch function
#: (workers/kinds/*.py: load_image(s), fetch_dataset, fetch_tokenizer). A field added to
#: an input model that a worker fetches must be marked, and joins this list.
FETCHED = {
    "caption": ["images[]"],
    "match": ["images[]"],
    "generate": [],
    "inpaint": ["image", "mask"],
    "style": ["image", "style_image"],
    "finetune": ["dataset", "vocabulary.tokenizer"],
}
# A str field with such a name is a reference unless it is listed as not one.
_LOOKS_LIKE_A_REF = re.compile(r"image|mask|dataset|tokenizer|url|uri|ref|path|file|folder")
NOT_REFERENCES = {"AdapterRef.name"}  # a name in the adapter registry, not a location


def test_the_walker_finds_every_fetched_field_of_every_kind() -> None:
    assert set(FETCHED) == set(JOB_KINDS)
    for kind, spec in JOB_KINDS.items():
        assert reference_fields(spec.input_model) == FETCHED[kind], kind


def _str_fields(model: type[BaseModel], seen: set[type]) -> list[tuple[str, Any]]:
    found = []
    for name, info in model.model_fields.items():
        stack = [info.annotation]
        while stack:
            tp = stack.pop()
            if isinstance(tp, type) and issubclass(tp, BaseModel):
                if tp not in seen:
                    seen.add(tp)
                    found.extend(_str_fields(tp, seen))
            elif tp is str:
                found.append((f"{model.__name__}.{name}", info))
            elif get_origin(tp) in (list, Union, types.UnionType) or get_args(tp):
                stack.extend(get_args(tp))
    return found


def test_every_field_named_like_a_reference_is_marked() -> None:
    seen: set[type] = set()
    marked = 0
    for spec in JOB_KINDS.values():
        for where, info in _str_fields(spec.input_model, seen):
            field = where.split(".")[1]
            if _LOOKS_LIKE_A_REF.search(field) and where not in NOT_REFERENCES:
                text = repr(info.annotation) + repr(info.metadata)
                assert "REFERENCE" in text, f"{where} looks like a reference but is not marked"
                marked += 1
    assert marked >= 6  # images (caption, match), image, mask, style_image, dataset, ...


def test_references_yield_paths_and_values() -> None:
    caption = CaptionInput(images=["https://x/a.png", "storage://uploads/a/b.png"])
    assert list(references(caption)) == [
        ("input.images[0]", "https://x/a.png"),
        ("input.images[1]", "storage://uploads/a/b.png"),
    ]
    style = StyleInput(image="data:image/png;base64,AA", style_prompt="ink")
    assert list(references(style)) == [("input.image", "data:image/png;base64,AA")]
    inpaint = InpaintInput(image="s3://b/i.png", mask="s3://b/m.png", prompt="p")
    assert [p for p, _ in references(inpaint)] == ["input.image", "input.mask"]
    tune = FinetuneInput(
        target="caption",
        dataset="s3://b/d/",
        name="n",
        vocabulary={"strategy": "replace", "tokenizer": "file:///t/"},
    )
    assert list(references(tune)) == [
        ("input.dataset", "s3://b/d/"),
        ("input.vocabulary.tokenizer", "file:///t/"),
    ]
    assert REFERENCE is not None


GRANTS = ("s3://shared/tenant-a/", "file:///data/a/")


@pytest.mark.parametrize(
    ("ref", "ok"),
    [
        ("storage://uploads/acme/x.png", True),
        ("https://example.com/x.png", True),
        ("http://example.com/x.png", True),
        ("data:image/png;base64,AA", True),
        ("s3://shared/tenant-a/x.png", True),
        ("S3://shared/tenant-a/sub/", True),
        ("file:///data/a/x.png", True),
        ("storage://uploads/globex/x.png", False),
        ("storage://uploads/acme-x/x.png", False),
        ("storage://uploads/acme/", False),
        ("storage://uploads/acme/../globex/x.png", False),
        ("storage://uploads/acme//x.png", False),
        ("storage://uploads/x.png", False),
        ("storage://jobs/123/result.json", False),
        ("s3://shared/tenant-b/x.png", False),
        ("s3://shared/tenant-a/../tenant-b/x.png", False),
        ("s3://shared/tenant-a/%2e%2e/tenant-b/x.png", False),
        ("s3://other/x.png", False),
        ("file:///data/a/../b/x.png", False),
        ("file://localhost/data/b/x.png", False),
        ("file:///data/ab/x.png", False),
        ("ftp://example.com/x.png", False),
        ("/etc/passwd", False),
    ],
)
def test_what_a_tenant_may_name(ref: str, ok: bool) -> None:
    assert allowed(ref, "acme", GRANTS) is ok


def test_the_refusal_names_the_field_and_never_the_object() -> None:
    messages = set()
    for ref in ("s3://b/uploads/globex/real.png", "s3://no-such-bucket/x.png"):
        with pytest.raises(ForbiddenUrl, match=r"^forbidden_url: input\.images\[1\]: ") as caught:
            check_references(CaptionInput(images=["https://x/a.png", ref]), "acme", ())
        messages.add(caught.value.message)
        assert "globex" not in caught.value.message and "bucket" not in caught.value.message
    assert len(messages) == 1


@pytest.mark.parametrize(
    ("prefix", "normal"),
    [
        ("s3://bucket/path/", "s3://bucket/path/"),
        ("S3://bucket/", "s3://bucket/"),
        ("file:///srv/data/", "file:///srv/data/"),
    ],
)
def test_grants_are_checked_and_normalised(prefix: str, normal: str) -> None:
    assert check_grant(prefix) == normal


@pytest.mark.parametrize(
    "prefix",
    [
        "s3://bucket/path",
        "s3:///path/",
        "s3://bucket/a/../b/",
        "file://relative/",
        "file:///",
        "https://example.com/",
        "storage://uploads/",
        "s3://bucket/a%2F/",
    ],
)
def test_bad_grants_are_refused(prefix: str) -> None:
    with pytest.raises(InvalidInput):
        check_grant(prefix)
