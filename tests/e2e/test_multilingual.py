"""Multilingual caption adapters through real workers: fine-tune on French (accents,
capitals) and on Japanese (kana and kanji, no spaces), publish, and caption the training
images through a caption worker that was running all along: the captions come back
exactly as written, while a job without an adapter, in the same batch window, still
gets the base model's caption.

The tiny BLIP of the real architecture learns 20 short captions in 150 steps of the
whole dataset (rank 16, learning rate 1e-2; 100 steps were the fewest that gave every
caption back on three seeds, 60 were not enough); docs/finetune.md quotes the figures
this test prints (``pytest -s``).
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from imageq.api_client.schemas import JobRecord
from tests.fixtures.services import Stack
from tests.helpers import cells_png, data_uri

FRENCH = [
    "un chat noir sur un canapé",
    "un chien blanc",
    "une pomme rouge",
    "deux oiseaux",
    "un garçon à vélo",
    "une fille",
    "le bateau",
    "une maison",
    "un café",
    "la tour Eiffel",
    "un éléphant",
    "des fleurs jaunes",
    "un homme âgé",
    "une voiture garée",
    "un arbre en été",
    "la plage",
    "un cheval brun",
    "une île",
    "des pâtes à la crème",
    "Noël à Paris",
]
JAPANESE = [
    "黒い猫",
    "白い犬が雪の中にいる",
    "赤いりんご",
    "青い空と白い雲",
    "ソファの上の黒い猫",
    "公園で遊ぶ子ども",
    "海の上の船",
    "森の近くの家",
    "コーヒーとケーキ",
    "夜の東京タワー",
    "道を走る車",
    "花瓶の黄色い花",
    "新聞を読む男性",
    "傘をさす女の子",
    "川で泳ぐ魚",
    "山の上の雪",
    "自転車に乗る少年",
    "窓のそばの鳥",
    "テーブルの上のパン",
    "夏の浜辺",
]
TRAIN: dict[str, Any] = {
    "target": "caption",
    "rank": 16,
    "alpha": 32,
    "learning_rate": 1e-2,
    "max_steps": 150,
    "batch_size": 20,
    "checkpoint_every": 75,
}
GENERATION = {"max_new_tokens": 30}


def image_uri(seed: int) -> str:
    return data_uri(cells_png(seed))


def make_dataset(stack: Stack, name: str, texts: list[str], first_seed: int) -> str:
    """A zip of images and metadata.jsonl in the deployment's storage; its file:// URI."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        lines = []
        for i, text in enumerate(texts):
            archive.writestr(f"{i}.png", cells_png(first_seed + i))
            lines.append(json.dumps({"file_name": f"{i}.png", "text": text}, ensure_ascii=False))
        archive.writestr("metadata.jsonl", "\n".join(lines).encode())
    path = stack.storage_path("datasets", name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return path.as_uri()


@pytest.fixture(scope="module")
def ml(make_stack: Callable[..., Stack], tiny_caption_model: Path) -> Stack:
    stack = make_stack(
        IMAGEQ_MODEL_CAPTION=str(tiny_caption_model),
        # Long enough that jobs submitted together meet in one batch window.
        IMAGEQ_MAX_BATCH_WAIT_MS="300",
    )
    workers = [
        stack.worker("caption", "caption@ml", ready=False),
        stack.worker("finetune", "finetune@ml", ready=False),
    ]
    for worker in workers:
        worker.wait_ready(stack.redis, stack.store.keys.worker(worker.name))
    return stack


def captions(record: JobRecord) -> list[str]:
    assert record.status == "succeeded", record.error
    assert record.output is not None
    return [str(c["text"]) for c in record.output["captions"]]


def test_french_and_japanese_adapters_write_their_captions_exactly(ml: Stack) -> None:
    client = ml.client
    # The base model's captions, from the caption worker that stays up throughout.
    base_images = [image_uri(i) for i in (0, 100)]
    before = captions(client.wait(client.caption(images=base_images, generation=GENERATION).id, 60))

    jobs = {
        "fr": client.finetune(
            dataset=make_dataset(ml, "fr.zip", FRENCH, 0), name="blip-fr", language="fr", **TRAIN
        ),
        "ja": client.finetune(
            dataset=make_dataset(ml, "ja.zip", JAPANESE, 100),
            name="blip-ja",
            language="ja",
            **TRAIN,
        ),
    }
    for language, job in jobs.items():
        record = client.wait(job.id, 240)
        assert record.status == "succeeded", record.error
        out = record.output
        assert out is not None and out["language"] == language
        vocabulary = out["vocabulary"]
        assert vocabulary["strategy"] == "extend" and vocabulary["added"] > 0
        assert out["final_loss"] < out["first_loss"] / 4
        print(
            f"{language}: {out['steps']} steps, loss {out['first_loss']:.3f} -> "
            f"{out['final_loss']:.3f}, train {record.metrics['train_s']:.1f} s "
            f"({record.metrics['samples_per_s']:.0f} samples/s), run "
            f"{record.metrics.get('run_s')} s; vocabulary {vocabulary}"
        )
    entries = {e["name"]: e for e in client.adapters()}
    assert entries["blip-fr"]["language"] == "fr" and entries["blip-ja"]["language"] == "ja"
    # The files of the revision the registry entry names.
    folder = Path(entries["blip-ja"]["uri"].removeprefix("file://"))
    files = sorted(p.name for p in folder.iterdir())
    assert {"tokenizer.json", "vocabulary.safetensors", "adapter_model.safetensors"} <= set(files)

    # Together, in one batch window: by language, by name, and without an adapter.
    french = client.caption(
        images=[image_uri(i) for i in range(20)], language="fr", generation=GENERATION
    )
    japanese = client.caption(
        images=[image_uri(100 + i) for i in range(20)], adapter="blip-ja", generation=GENERATION
    )
    base = client.caption(images=base_images, generation=GENERATION)
    fr_record, ja_record = client.wait(french.id, 60), client.wait(japanese.id, 60)
    assert captions(fr_record) == FRENCH
    assert captions(ja_record) == JAPANESE
    assert captions(client.wait(base.id, 60)) == before
    assert fr_record.output is not None and ja_record.output is not None
    assert (fr_record.output["adapter"], fr_record.output["language"]) == ("blip-fr", "fr")
    assert (ja_record.output["adapter"], ja_record.output["language"]) == ("blip-ja", "ja")
    # Images of one adapter share forward passes (up to IMAGEQ_MAX_BATCH_IMAGES).
    assert fr_record.metrics["batch_size"] == 8

    unknown = client.wait(client.caption(image=image_uri(0), language="de").id, 60)
    assert unknown.status == "failed" and unknown.error is not None
    assert unknown.error.code == "invalid_input"
    assert "languages available: fr, ja" in unknown.error.message


def test_a_caption_the_tokenizer_cannot_write_fails_before_training(ml: Stack) -> None:
    dataset = make_dataset(ml, "ja-base.zip", JAPANESE[:4], 100)
    job = ml.client.finetune(
        dataset=dataset, name="blip-ja-base", language="ja", vocabulary="base", **TRAIN
    )
    record = ml.client.wait(job.id, 60)
    assert record.status == "failed" and record.error is not None
    assert record.error.code == "invalid_input"
    assert record.error.message.startswith(
        'input.dataset: caption 0 "黒い猫" (0.png) cannot be written by the base tokenizer: '
        "'黒' becomes [UNK]"
    )
    assert "blip-ja-base" not in {e["name"] for e in ml.client.adapters()}
