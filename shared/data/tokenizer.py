"""Tokenizers: a byte-level one for tiny test models, and loading a model directory's own.

The byte tokenizer exists so tests and the 'tiny' preset never download anything: every UTF-8
byte is its own token (id == byte value), so any text round-trips, and three special tokens sit
above them. A tiny model with ``vocab_size=260`` covers it with room to spare.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
BYTE_VOCAB_SIZE = 256 + 3  # ids 0..255 are bytes, then <pad>=256, <bos>=257, <eos>=258


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what ByteLevel pre-tokenization emits).

    Printable Latin-1 bytes map to themselves; the rest are shifted to code points from 256 up,
    so no token string is whitespace or a control character.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shifted = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh byte-level tokenizer, built offline and identical on every call.

    A BPE model with no merges over the 256 byte characters: each byte is one token. No special
    token is added by encoding (no BOS, no EOS): callers append EOS where they want one.
    ``split_special_tokens=True`` makes a literal "<eos>" in user text encode as its 5 bytes, so
    text can never forge a control token.
    """
    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # use_regex=False: no word splitting, just the byte -> character mapping.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (PAD, BOS, EOS)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        padding_side="right",
        split_special_tokens=True,
    )
    if len(fast) != BYTE_VOCAB_SIZE:  # would mean a tokenizers/transformers behaviour change
        raise RuntimeError(f"byte tokenizer has {len(fast)} tokens, expected {BYTE_VOCAB_SIZE}")
    return fast


def load_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved in ``model_dir``, never fetched from a hub, ready for right padding.

    Causal LMs often ship without a pad token; padded positions are masked out of attention and
    labelled -100, so which id fills them does not matter, and EOS is the usual stand-in.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"tokenizer directory {model_dir} does not exist")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer in {model_dir} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer
