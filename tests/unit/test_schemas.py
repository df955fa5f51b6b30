"""The contract's validation: every field limit refused with a message naming the field."""

from __future__ import annotations

import pytest

from imageq.api_client.errors import InvalidInput
from imageq.api_client.job_ids import job_id_for
from imageq.api_client.schemas import parse_input, parse_job

IMG = "https://example.com/a.png"


def test_caption_shorthand_and_defaults() -> None:
    inp = parse_input("caption", {"image": IMG})
    assert inp.images == [IMG]
    assert inp.generation.num_beams == 1 and inp.attention is False


@pytest.mark.parametrize(
    ("kind", "data", "field"),
    [
        ("caption", {"images": []}, "input.images"),
        ("caption", {"images": [IMG] * 513}, "input.images"),
        ("caption", {"image": IMG, "images": [IMG]}, "input"),
        ("caption", {"image": "gopher://x/y"}, "input.images[0]"),
        ("caption", {"image": IMG, "generation": {"num_beams": 11}}, "input.generation.num_beams"),
        ("caption", {"image": IMG, "generation": {"num_return_sequences": 3}}, "input.generation"),
        ("caption", {"image": IMG, "colour": "red"}, "input.colour"),
        ("caption", {"image": 7}, "input.images[0]"),
        ("match", {"image": IMG, "texts": []}, "input.texts"),
        ("match", {"image": IMG, "texts": ["ok", "  "]}, "input.texts"),
        ("match", {"image": IMG, "texts": ["t"] * 65}, "input.texts"),
        ("generate", {"prompt": "x", "width": 500}, "input.width"),
        ("generate", {"prompt": "x", "num_images": 9}, "input.num_images"),
        ("generate", {"prompt": "x", "steps": 0}, "input.steps"),
        ("generate", {"prompt": "x", "scheduler": "magic"}, "input.scheduler"),
        ("generate", {"prompt": ""}, "input.prompt"),
        ("inpaint", {"image": IMG, "prompt": "x"}, "input.mask"),
        ("style", {"image": IMG}, "input"),
        ("finetune", {"target": "audio", "dataset": "s3://b/d.zip", "name": "n"}, "input.target"),
        (
            "finetune",
            {"target": "caption", "dataset": "s3://b/d.zip", "name": "../x"},
            "input.name",
        ),
    ],
)
def test_invalid_inputs_name_the_field(kind: str, data: dict, field: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_input(kind, data)
    assert info.value.code == "invalid_input"
    assert field in info.value.message


def test_every_kind_has_a_valid_minimal_input() -> None:
    parse_input("match", {"images": [IMG], "texts": ["a dog"]})
    parse_input("generate", {"prompt": "a cat", "width": 64, "height": 72})
    parse_input("inpaint", {"image": IMG, "mask": IMG, "prompt": "a hat"})
    parse_input("style", {"image": IMG, "style_prompt": "van gogh"})
    parse_input("finetune", {"target": "diffusion", "dataset": "s3://b/d.zip", "name": "mine"})


def test_job_document_checks() -> None:
    doc = {"id": "abc-1", "kind": "caption", "input": {"image": IMG}}
    assert parse_job(doc).priority == 5
    with pytest.raises(InvalidInput, match="priority"):
        parse_job({**doc, "priority": 10})
    with pytest.raises(InvalidInput, match="kind"):
        parse_job({**doc, "kind": "teleport"})
    with pytest.raises(InvalidInput, match=r"webhook\.url"):
        parse_job({**doc, "webhook": {"url": "ftp://x"}})
    with pytest.raises(InvalidInput, match="metadata"):
        parse_job({**doc, "metadata": {"blob": "x" * 5000}})
    with pytest.raises(InvalidInput, match="document"):
        parse_job(["not", "a", "dict"])
    with pytest.raises(InvalidInput, match=r"input\.images"):
        parse_job({**doc, "input": {}})


def test_idempotency_key_derives_a_stable_id() -> None:
    assert job_id_for("order-1") == job_id_for("order-1")
    assert job_id_for("order-1") != job_id_for("order-2")
    assert job_id_for(None) != job_id_for(None)
