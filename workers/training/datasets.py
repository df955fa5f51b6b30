"""Fine-tuning datasets: fetch, unpack and validate before any training starts.

A dataset is a zip or tar archive, or a storage prefix (a reference ending in ``/``), of
images plus a ``metadata.jsonl`` whose lines are ``{"file_name": ..., "text": ...}``, the
layout of Hugging Face's ``imagefolder``. The metadata may sit at the top or in one
folder (an archive of a folder). References: ``s3://`` (the deployment's bucket or any
other the worker's credentials read), ``http(s)://`` (archives only, through the same
guarded fetching as images, with ``IMAGEQ_MAX_DATASET_BYTES`` as the cap) and
``file://`` (where local files are allowed, or inside the deployment's own storage).

Archives are hostile input like images: entries that would land outside the folder,
links, devices and hidden files are skipped, and the unpacked size and file count are
capped while reading, whatever the headers claim.
"""

from __future__ import annotations

import json
import shutil
import tarfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, replace
from io import BytesIO
from pathlib import Path, PurePosixPath
from typing import IO

from PIL import Image

from imageq.api_client.errors import ForbiddenUrl, ImageqError, InvalidInput
from imageq.api_client.redact import redact_ref
from imageq.api_client.settings import Settings
from imageq.workers.io.images import decode_image, fetch_bytes
from imageq.workers.io.storage import LocalStorage, S3Storage, Storage, TooLarge, file_uri_path

METADATA = "metadata.jsonl"
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"})
_CHUNK_BYTES = 1024 * 1024
# A message names this many problems at most; the rest are counted.
_MAX_PROBLEMS = 10


@dataclass(frozen=True)
class Example:
    file_name: str
    path: Path
    #: None when the image has no caption yet (``auto_caption`` fills it in).
    text: str | None

    def load(self, settings: Settings) -> Image.Image:
        return decode_image(self.path.read_bytes(), settings)


@dataclass(frozen=True)
class Dataset:
    root: Path
    examples: tuple[Example, ...]

    def __len__(self) -> int:
        return len(self.examples)

    def missing_text(self) -> list[Example]:
        return [e for e in self.examples if e.text is None]

    def with_texts(self, texts: dict[str, str]) -> Dataset:
        """A copy whose captionless examples take their text from ``texts``."""
        filled = tuple(
            replace(e, text=texts.get(e.file_name)) if e.text is None else e for e in self.examples
        )
        return Dataset(self.root, filled)


def load_dataset(
    ref: str, dest: Path, settings: Settings, storage: Storage, *, allow_missing_text: bool
) -> Dataset:
    """Fetch ``ref`` into the empty folder ``dest`` and validate it (``InvalidInput``)."""
    fetch_dataset(ref, dest, settings, storage)
    return read_dataset(dest, settings, allow_missing_text=allow_missing_text)


# -- fetching ---------------------------------------------------------------------------


def fetch_dataset(ref: str, dest: Path, settings: Settings, storage: Storage) -> None:
    scheme = ref.partition("://")[0].lower() if "://" in ref else ""
    if scheme not in ("s3", "http", "https", "file"):
        raise InvalidInput("dataset: use an s3://, http(s):// or file:// reference")
    dest.mkdir(parents=True, exist_ok=True)
    own_key = _own_storage_key(ref, storage)
    try:
        if _is_prefix(ref, scheme, own_key, settings):
            if scheme in ("http", "https"):
                raise InvalidInput("dataset: an http(s) dataset must be a zip or tar archive")
            _download_prefix(ref, scheme, own_key, dest, settings, storage)
        else:
            unpack(_read_archive(ref, own_key, settings, storage), dest, settings)
    except ImageqError as exc:
        if exc.message.startswith("dataset"):
            raise
        raise type(exc)(f"dataset: {redact_ref(ref)}: {exc.message}") from None


def _own_storage_key(ref: str, storage: Storage) -> str | None:
    """The key of ``ref`` inside the deployment's storage, or None if it is elsewhere."""
    root = storage.uri("x")[:-1]
    if ref.startswith(root) and len(ref) > len(root):
        return ref[len(root) :]
    return None


def _is_prefix(ref: str, scheme: str, own_key: str | None, settings: Settings) -> bool:
    if ref.endswith("/"):
        return True
    if scheme == "file" and (own_key is not None or settings.allow_local_files):
        return file_uri_path(ref).is_dir()
    return False


def _read_archive(ref: str, own_key: str | None, settings: Settings, storage: Storage) -> bytes:
    if own_key is not None:
        # Storage stops reading past the cap: an oversized archive is never read whole.
        return storage.get(own_key, settings.max_dataset_bytes)
    # The image fetcher's guards (URL checks, deadline, byte cap) with the dataset's cap.
    capped = settings.with_(max_image_bytes=settings.max_dataset_bytes)
    return fetch_bytes(ref, capped, storage, deadline_s=settings.dataset_fetch_timeout_s)


def _download_prefix(
    ref: str,
    scheme: str,
    own_key: str | None,
    dest: Path,
    settings: Settings,
    storage: Storage,
) -> None:
    source: Storage
    if own_key is not None:
        source, prefix = storage, own_key.rstrip("/") + "/"
    elif scheme == "s3":
        bucket, _, key_prefix = ref[len("s3://") :].partition("/")
        source, prefix = S3Storage(bucket, key_prefix, settings), ""
    else:
        if not settings.allow_local_files:
            raise ForbiddenUrl("file:// datasets are not allowed in this deployment")
        source, prefix = LocalStorage(file_uri_path(ref), settings), ""
    keys = source.list(prefix)
    writer = _Writer(dest, settings)
    fetched = 0
    for key in keys:
        name = key[len(prefix) :]
        writer.count(name)
        if writer.accepts(name):
            # What is left of the byte cap: storage stops reading one chunk past it.
            try:
                data = source.get(key, settings.max_dataset_bytes - fetched)
            except TooLarge:
                raise InvalidInput(
                    f"the files add up to more than {settings.max_dataset_bytes} bytes"
                ) from None
            fetched += len(data)
            writer.write(name, BytesIO(data))
    if not writer.files:
        raise InvalidInput("no files under this prefix")


def unpack(data: bytes, dest: Path, settings: Settings) -> None:
    """Unpack a zip or tar (plain, gz, bz2 or xz) archive into ``dest``."""
    writer = _Writer(dest, settings)
    try:
        if zipfile.is_zipfile(BytesIO(data)):
            with zipfile.ZipFile(BytesIO(data)) as archive:
                for info in archive.infolist():
                    writer.count(info.filename)
                    # The high bits of external_attr carry Unix modes: skip links.
                    is_link = (info.external_attr >> 16) & 0o170000 == 0o120000
                    if info.is_dir() or is_link or not writer.accepts(info.filename):
                        continue
                    with archive.open(info) as member:
                        writer.write(info.filename, member)
            return
        # "r|*": a stream, one entry after the other; tarfile never lists the whole
        # archive first, so a tar of millions of entries stops at the entry cap.
        with tarfile.open(fileobj=BytesIO(data), mode="r|*") as tar:
            for entry in tar:
                writer.count(entry.name)
                if not entry.isfile() or not writer.accepts(entry.name):
                    continue
                handle = tar.extractfile(entry)
                if handle is not None:
                    with handle:
                        writer.write(entry.name, handle)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, ValueError) as exc:
        if isinstance(exc, tarfile.ReadError) and not writer.files:
            raise InvalidInput("not a zip or tar archive (or a corrupt one)") from None
        raise InvalidInput(f"corrupt archive: {type(exc).__name__}: {exc}") from None


def safe_name(name: str) -> PurePosixPath | None:
    """``name`` as a relative path that stays inside the dataset, or None."""
    if not name or "\\" in name or "\x00" in name or name.startswith("/"):
        return None
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or any(p == ".." or p.startswith(".") or p == "__MACOSX" for p in parts):
        return None
    return PurePosixPath(*parts)


class _Writer:
    """Writes a dataset's files under a folder, within the file count and size caps."""

    def __init__(self, dest: Path, settings: Settings) -> None:
        self.dest = dest
        self.settings = settings
        self.files = 0
        self.bytes = 0
        self.entries = 0

    def count(self, name: str) -> None:
        """Count one entry, whatever it is (file, folder, link, skipped), against the cap.

        Skipped entries cost reading their headers too: an archive of a million links
        must fail at the cap, not be walked to its end.
        """
        self.entries += 1
        limit = self.settings.max_dataset_files
        if self.entries > limit:
            raise InvalidInput(
                f"more than {limit} files (every entry counts: folders, links, skipped ones; "
                f"the {self.entries}th is {name[:80]!r})"
            )

    def accepts(self, name: str) -> bool:
        return safe_name(name) is not None

    def write(self, name: str, source: IO[bytes]) -> None:
        rel = safe_name(name)
        if rel is None:
            return
        self.files += 1
        path = self.dest.joinpath(*rel.parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        limit = self.settings.max_dataset_unpacked_bytes
        with path.open("wb") as out:
            # Counted while reading: an archive's declared sizes may lie.
            while chunk := source.read(_CHUNK_BYTES):
                self.bytes += len(chunk)
                if self.bytes > limit:
                    raise InvalidInput(f"the dataset unpacks to more than {limit} bytes")
                out.write(chunk)


# -- validation -------------------------------------------------------------------------


def find_root(dest: Path) -> Path | None:
    """The folder holding the shallowest ``metadata.jsonl`` (None: there is none)."""
    found = sorted(dest.rglob(METADATA), key=lambda p: (len(p.relative_to(dest).parts), str(p)))
    if not found:
        return None
    depth = len(found[0].relative_to(dest).parts)
    top = [p for p in found if len(p.relative_to(dest).parts) == depth]
    if len(top) > 1:
        names = ", ".join(str(p.relative_to(dest)) for p in top[:3])
        raise InvalidInput(f"dataset: several {METADATA} files at the same level ({names})")
    return found[0].parent


def read_dataset(dest: Path, settings: Settings, *, allow_missing_text: bool) -> Dataset:
    """Validate every line and image; ``InvalidInput`` names each bad file."""
    root = find_root(dest)
    if root is None and not allow_missing_text:
        raise InvalidInput(f"dataset: no {METADATA} (lines of {{'file_name', 'text'}})")
    root = root or dest
    problems: list[str] = []
    examples: list[Example] = []
    listed: set[str] = set()
    metadata = root / METADATA
    lines = metadata.read_text(encoding="utf-8", errors="replace") if metadata.is_file() else ""
    for number, line in enumerate(lines.splitlines(), 1):
        if line.strip():
            example = _parse_line(line, number, root, listed, allow_missing_text, problems)
            if example is not None:
                examples.append(example)
    if allow_missing_text:
        # Images the metadata does not list are captioned too.
        for rel in _unlisted_images(root, listed):
            examples.append(Example(rel, root / rel, None))
    if len(examples) > settings.max_dataset_files:
        raise InvalidInput(f"dataset: more than {settings.max_dataset_files} examples")
    for example in examples:
        problem = _check_image(example.path, settings)
        if problem:
            problems.append(f"{example.file_name}: {problem}")
    if problems:
        more = len(problems) - _MAX_PROBLEMS
        tail = f"; and {more} more" if more > 0 else ""
        raise InvalidInput("dataset: " + "; ".join(problems[:_MAX_PROBLEMS]) + tail)
    if not examples:
        raise InvalidInput(f"dataset: no examples ({METADATA} lists no images)")
    return Dataset(root, tuple(examples))


def _parse_line(
    line: str,
    number: int,
    root: Path,
    listed: set[str],
    allow_missing_text: bool,
    problems: list[str],
) -> Example | None:
    where = f"{METADATA} line {number}"
    try:
        entry = json.loads(line)
    except ValueError:
        problems.append(f"{where}: not valid JSON")
        return None
    name = entry.get("file_name") if isinstance(entry, dict) else None
    if not isinstance(name, str) or not name.strip():
        problems.append(f"{where}: needs a JSON object with a file_name")
        return None
    rel = safe_name(name)
    if rel is None:
        problems.append(f"{name}: not a relative path inside the dataset ({where})")
        return None
    if str(rel) in listed:
        problems.append(f"{name}: listed twice ({where})")
        return None
    listed.add(str(rel))
    text = entry.get("text")
    if text is not None and not isinstance(text, str):
        problems.append(f"{name}: text must be a string ({where})")
        return None
    text = (text or "").strip()
    if not text and not allow_missing_text:
        problems.append(f"{name}: empty text ({where})")
        return None
    return Example(name, root.joinpath(*rel.parts), text or None)


def _unlisted_images(root: Path, listed: set[str]) -> Iterable[str]:
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        image = path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES
        if image and rel not in listed and safe_name(rel) is not None:
            yield rel


def _check_image(path: Path, settings: Settings) -> str | None:
    if not path.is_file():
        return "file missing"
    if path.stat().st_size > settings.max_image_bytes:
        return f"larger than the limit of {settings.max_image_bytes} bytes"
    try:
        decode_image(path.read_bytes(), settings)
    except ImageqError as exc:
        return f"unreadable image: {exc.message}"
    return None


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
