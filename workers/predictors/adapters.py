"""What a job swaps into a warm diffusion pipeline: its scheduler, LoRA weights, an IP-Adapter.

All of it lives in objects that every job shares (the pipeline, the UNet, the text
encoder), so each is set for the jobs that ask for it and undone afterwards, whatever
happens in between: one job's choices must never change the next job's image.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imageq.api_client.errors import ImageqError, InvalidInput, ModelError
from imageq.api_client.inputs import AdapterRef

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# h94/IP-Adapter's SD 1.5 weights; any other single *.safetensors file in the folder works.
IP_ADAPTER_WEIGHT_NAME = "ip-adapter_sd15.safetensors"
IP_IMAGE_ENCODER_FOLDER = "image_encoder"

AdapterResolver = Callable[[str], Path]

# name -> (scheduler class, overrides, AUTOMATIC1111 sampler name)
SCHEDULER_TABLE: dict[str, tuple[str, dict[str, Any], str]] = {
    "ddim": ("DDIMScheduler", {}, "DDIM"),
    "euler": ("EulerDiscreteScheduler", {}, "Euler"),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}, "DPM++ 2M"),
    # Runge-Kutta warm-up steps break runs of a few steps; SD 1.5 ships it skipped too.
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}, "PLMS"),
}
_A1111_BY_CLASS = {cls: a1111 for cls, _, a1111 in SCHEDULER_TABLE.values()}


def job_scheduler(name: str, default_class: str, config: Any) -> Any:
    """A fresh scheduler for one job: schedulers keep per-run state (step index,
    multistep history), so jobs never share one. ``default`` is the checkpoint's own."""
    import diffusers

    if name == "default":
        overrides = SCHEDULER_TABLE["pndm"][1] if default_class == "PNDMScheduler" else {}
        return getattr(diffusers, default_class).from_config(config, **overrides)
    cls_name, overrides, _ = SCHEDULER_TABLE[name]
    return getattr(diffusers, cls_name).from_config(config, **overrides)


def sampler_name(name: str, default_class: str) -> str:
    """The AUTOMATIC1111 name of a scheduler (``default``: the checkpoint's class)."""
    if name == "default":
        return _A1111_BY_CLASS.get(default_class, default_class)
    return SCHEDULER_TABLE[name][2]


def peft_adapter_name(name: str) -> str:
    """A PEFT-safe adapter name for a registry name.

    Registry names may hold "." and "-", which PEFT cannot use (adapter names become
    module keys); the hash keeps two names that sanitise alike apart.
    """
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9_]', '_', name)}_{digest}"


@dataclass
class _Loaded:
    peft_name: str
    # (path, mtime_ns, size) of the weights file, so a re-published adapter (a new
    # version folder, or the file replaced in place) is reloaded.
    fingerprint: tuple[str, int, int]


class LoraAdapters:
    """An LRU of LoRA adapters loaded into one pipeline's UNet and text encoder.

    ``pipe`` is the pipeline whose modules every other pipeline of the worker shares
    (``from_pipe`` shares modules), so loading once serves generate, inpaint and style.
    ``resolve(name)`` is the adapter registry: it returns a local directory holding
    ``pytorch_lora_weights.safetensors`` and raises ``InvalidInput`` (or a ``LookupError``
    / ``FileNotFoundError``) for an unknown name. It is asked on every job so that a
    re-published adapter (same name, new file) replaces the stale copy.

    ``capacity`` bounds how many adapters stay loaded; a job that needs more than that
    loads them all anyway, and a later job evicts the extra ones.
    """

    def __init__(self, pipe: Any, resolve: AdapterResolver | None, capacity: int = 4) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._pipe = pipe
        self._resolve = resolve
        self.capacity = capacity
        self._loaded: OrderedDict[str, _Loaded] = OrderedDict()
        self._enabled = False

    @property
    def loaded(self) -> list[str]:
        """Registry names of the loaded adapters, least recently used first."""
        return list(self._loaded)

    @contextmanager
    def applied(self, refs: Sequence[AdapterRef]) -> Iterator[None]:
        """Apply ``refs`` with their scales for the body, then switch every LoRA off."""
        try:
            if refs:
                self._activate(refs)
            yield
        finally:
            self._deactivate()

    def _activate(self, refs: Sequence[AdapterRef]) -> None:
        names = [ref.name for ref in refs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise InvalidInput(f"adapters: {', '.join(map(repr, duplicates))} listed twice")
        # Set before loading: load_lora_weights() activates what it loads, so a job that
        # fails on its second adapter must still switch the first one off.
        self._enabled = True
        peft_names = [self._ensure_loaded(name) for name in names]
        self._evict(keep=set(names))
        # disable_lora() after the last job left the LoRA layers switched off, and
        # set_adapters() alone does not switch them back on.
        self._pipe.enable_lora()
        self._pipe.set_adapters(peft_names, adapter_weights=[ref.scale for ref in refs])

    def _deactivate(self) -> None:
        if self._enabled:
            self._enabled = False
            self._pipe.disable_lora()

    def _weights_file(self, name: str) -> Path:
        if self._resolve is None:
            raise InvalidInput("adapters: this worker has no adapter registry")
        try:
            directory = Path(self._resolve(name))
        except ImageqError:
            raise
        except (LookupError, FileNotFoundError):
            raise InvalidInput(f"adapters: unknown adapter {name!r}") from None
        weights = directory / LORA_WEIGHT_NAME
        if not weights.is_file():
            raise ModelError(f"adapters: {name!r} has no {LORA_WEIGHT_NAME} in the registry")
        return weights

    def _ensure_loaded(self, name: str) -> str:
        weights = self._weights_file(name)
        stat = weights.stat()
        fingerprint = (str(weights), stat.st_mtime_ns, stat.st_size)
        entry = self._loaded.get(name)
        if entry is not None and entry.fingerprint == fingerprint:
            self._loaded.move_to_end(name)
            return entry.peft_name
        if entry is not None:
            self._unload(name)
        peft_name = peft_adapter_name(name)
        try:
            # safetensors only: a pickled checkpoint could run code in the worker.
            self._pipe.load_lora_weights(
                str(weights.parent),
                weight_name=LORA_WEIGHT_NAME,
                adapter_name=peft_name,
                use_safetensors=True,
                local_files_only=True,
            )
        except Exception as exc:
            # A half-injected adapter would otherwise shadow the next load of this name.
            self._forget(peft_name)
            raise ModelError(f"adapters: cannot load {name!r}: {exc}") from exc
        self._loaded[name] = _Loaded(peft_name, fingerprint)
        return peft_name

    def _evict(self, keep: set[str]) -> None:
        for name in list(self._loaded):
            if len(self._loaded) <= self.capacity:
                break
            if name not in keep:
                self._unload(name)

    def _unload(self, name: str) -> None:
        entry = self._loaded.pop(name)
        self._forget(entry.peft_name)

    def _forget(self, peft_name: str) -> None:
        listed = self._pipe.get_list_adapters()
        if any(peft_name in names for names in listed.values()):
            self._pipe.delete_adapters([peft_name])


def ip_adapter_files(location: str | Path) -> tuple[Path, str]:
    """Where the IP-Adapter weights are: ``(folder, weight file name)``.

    ``location`` (``IMAGEQ_IP_ADAPTER``) is a local folder laid out like h94/IP-Adapter's
    ``models/`` folder, the weights file inside one, or a hub repository with that folder
    (``h94/IP-Adapter/models``: fetched once into the hub cache, as model ids are)::

        folder/ip-adapter_sd15.safetensors   (or the folder's only *.safetensors file)
        folder/image_encoder/                CLIPVisionModelWithProjection (config + weights)
    """
    path = Path(location)
    if not path.exists() and _HUB_ID.match(str(location)):
        path = _from_hub(str(location))
    if path.is_file():
        folder, weight_name = path.parent, path.name
    elif path.is_dir():
        folder = path
        candidates = sorted(p.name for p in path.glob("*.safetensors"))
        if IP_ADAPTER_WEIGHT_NAME in candidates:
            weight_name = IP_ADAPTER_WEIGHT_NAME
        elif len(candidates) == 1:
            weight_name = candidates[0]
        else:
            raise ModelError(
                f"ip_adapter: {path} must hold {IP_ADAPTER_WEIGHT_NAME} or exactly one "
                f"*.safetensors file (found {len(candidates)})"
            )
    else:
        raise ModelError(f"ip_adapter: {path} does not exist")
    if not (folder / IP_IMAGE_ENCODER_FOLDER).is_dir():
        raise ModelError(f"ip_adapter: {folder} has no {IP_IMAGE_ENCODER_FOLDER}/ folder")
    return folder, weight_name


# owner/repo or owner/repo/sub/folder: a hub repository (a local path that exists wins).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w.-]+)*$")


def _from_hub(location: str) -> Path:
    from huggingface_hub import snapshot_download

    owner, repo, *sub = location.split("/")
    folder = "/".join(sub)
    try:
        local = snapshot_download(
            f"{owner}/{repo}",
            # The weights and the image encoder only: the repo holds many variants.
            allow_patterns=[f"{folder}/*.safetensors", f"{folder}/image_encoder/*"]
            if folder
            else ["*.safetensors", "image_encoder/*"],
        )
    except Exception as exc:
        raise ModelError(f"ip_adapter: cannot fetch {location!r} from the hub: {exc}") from exc
    return Path(local) / folder if folder else Path(local)


class IpAdapterSwitch:
    """An IP-Adapter kept out of the shared UNet except while a job uses it.

    Once loaded, diffusers' IP-Adapter UNet requires image embeddings on every call, so
    a text-only job would fail, and with the adapter's attention processors merely scaled
    to zero it would still pay for them. The switch keeps both sets of attention
    processors and the image projection, and installs the IP-Adapter ones only inside
    ``active()``; outside it the UNet is exactly the one the checkpoint loaded.
    """

    def __init__(self, unet: Any, plain: dict[str, Any], ip: dict[str, Any], proj: Any) -> None:
        self._unet = unet
        self._plain_processors = plain
        self._ip_processors = ip
        self._ip_projection = proj
        self._plain_projection = unet.encoder_hid_proj
        self._plain_type = unet.config.encoder_hid_dim_type

    @classmethod
    def load(cls, pipe: Any, location: str | Path) -> IpAdapterSwitch:
        """Load the IP-Adapter into ``pipe`` (which gets the image encoder), then detach it."""
        folder, weight_name = ip_adapter_files(location)
        unet = pipe.unet
        plain = dict(unet.attn_processors)
        plain_projection = unet.encoder_hid_proj
        plain_type = unet.config.encoder_hid_dim_type
        pipe.load_ip_adapter(
            str(folder),
            subfolder="",
            weight_name=weight_name,
            image_encoder_folder=IP_IMAGE_ENCODER_FOLDER,
            local_files_only=True,
        )
        ip = dict(unet.attn_processors)
        projection = unet.encoder_hid_proj
        # set_attn_processor() empties the dict it is given: hand it copies.
        unet.set_attn_processor(dict(plain))
        unet.encoder_hid_proj = plain_projection
        unet.register_to_config(encoder_hid_dim_type=plain_type)
        return cls(unet, plain, ip, projection)

    @contextmanager
    def active(self, pipe: Any, scale: float) -> Iterator[None]:
        """Install the IP-Adapter at ``scale`` for the body of the block."""
        unet = self._unet
        try:
            unet.set_attn_processor(dict(self._ip_processors))
            unet.encoder_hid_proj = self._ip_projection
            unet.register_to_config(encoder_hid_dim_type="ip_image_proj")
            pipe.set_ip_adapter_scale(scale)
            yield
        finally:
            unet.set_attn_processor(dict(self._plain_processors))
            unet.encoder_hid_proj = self._plain_projection
            unet.register_to_config(encoder_hid_dim_type=self._plain_type)
