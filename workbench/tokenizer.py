"""Text <-> token ids for a GGUF model, matching llama.cpp's tokenizer id for id.

The GGUF file carries no ``tokenizer.json``; it stores the vocabulary (and merges or scores) as
metadata under llama.cpp's key names.  This module rebuilds, from that metadata, a tokenizer on
top of Hugging Face's Rust ``tokenizers`` library that reproduces what llama.cpp does when it
tokenizes a prompt with ``parse_special=True``:

1. **Special-token partition.**  Every token the file marks CONTROL, USER_DEFINED or UNKNOWN
   (after llama.cpp's own text-based fix-ups, see ``_adjust_types``) is matched literally in the
   raw text and becomes one token (``<|im_start|>``, ``<start_of_turn>``, Gemma's ``"\\n\\n"`` or
   ``"    "``).  They are added as non-normalized added tokens, so ``tokenizers`` cuts them out
   before anything else runs, exactly like llama.cpp's ``tokenizer_st_partition``.
2. **The text between them**, fragment by fragment:

   * ``tokenizer.ggml.model == "gpt2"`` (byte-level BPE): split with the regex list that
     llama.cpp picks for ``tokenizer.ggml.pre`` (each regex isolates its matches inside the
     pieces left by the previous one -- ``Split(..., "isolated")``), map bytes to GPT-2's
     printable alphabet, then BPE with the file's merges, lowest rank first.
   * ``tokenizer.ggml.model == "llama"`` (SentencePiece-style, llama.cpp's SPM tokenizer): prefix
     a space when ``tokenizer.ggml.add_space_prefix`` (default True) says so, replace ``" "`` by
     ``"▁"``, then merge adjacent pieces greedily, always the pair whose concatenation is the
     vocabulary token with the highest score; characters that never become a token fall back to
     ``<0xNN>`` byte tokens.  That is a BPE whose merge list is "every split of every token into
     two tokens, ranked by the score of the whole", with ``byte_fallback=True`` -- built here from
     the scores.  (A Unigram model would not do: it picks the best-scoring *segmentation*
     (Viterbi), which is not what llama.cpp computes.)

Decoding does not go through ``tokenizers``: every id maps to the bytes llama.cpp's
``token_to_piece`` gives it (byte-level alphabet undone, ``▁`` -> space, ``<0xNN>`` -> that byte,
control tokens as their text), and the bytes are joined and decoded as UTF-8.  That makes
``IncrementalDecoder`` a plain UTF-8 incremental decoder over the same bytes.

Known, deliberate gaps (none affects the bundled models; each is a corner llama.cpp itself
handles by accident of implementation):

* llama.cpp matches special tokens longest-token-first over the whole text, ``tokenizers`` uses
  leftmost-longest.  They differ only when two special tokens *partially* overlap in the text.
* In the SPM merge, llama.cpp breaks a tie between two equal-scoring candidate pairs by position
  (leftmost); a ranked merge list breaks it by rank.  Ties need two different splits of the same
  token to overlap (``[aa][a][aa]`` with ``aaa`` in the vocabulary), or a vocabulary with equal
  scores (Gemma's are all distinct).
* In SentencePiece vocabularies a literal ``▁`` in the text is indistinguishable from an escaped
  space (in llama.cpp and SentencePiece too), so it decodes as a space.
* LSTRIP/RSTRIP attributes that llama.cpp sets by model name (Phi-3, Jina) are not applied.
* ``tokenizer.ggml.add_eos_token`` is not honoured by ``encode``: this is a prompt tokenizer for a
  generation engine, and an EOS at the end of a prompt would end the turn before it starts.
"""

from __future__ import annotations

import codecs
import hashlib
import inspect
import math
import numbers
import operator
import os
import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from workbench.errors import InputError, ModelError, UnsupportedError
from workbench.models import cache_dir

__all__ = ["IncrementalDecoder", "Tokenizer"]

# GGUF / llama.cpp token types (llama_token_type).
_UNDEFINED, _NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 0, 1, 2, 3, 4, 5, 6
_SPECIAL_TYPES = (_CONTROL, _USER_DEFINED, _UNKNOWN)  # cut out of the text whole
_SKIPPABLE_TYPES = (_CONTROL, _UNKNOWN)  # dropped by decode(skip_special=True), like llama.cpp

_SPM_SPACE = "\u2581"  # '▁'
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")

# --- pre-tokenizer regexes, as llama.cpp's llm_tokenizer_bpe uses them --------------------------
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class _Pre:
    """How llama.cpp pre-tokenizes one family of ``tokenizer.ggml.pre`` values."""

    def __init__(self, regexes: tuple[str, ...], ignore_merges: bool = False, add_bos: bool = False):
        self.regexes = regexes
        self.ignore_merges = ignore_merges  # whole word looked up in the vocabulary first
        self.add_bos = add_bos  # llama.cpp's default when tokenizer.ggml.add_bos_token is absent


_PRE_DEFAULT = _Pre((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"))
_PRE_GPT2 = _Pre((_GPT2,))
_PRE_LLAMA3 = _Pre((_LLAMA3,), ignore_merges=True, add_bos=True)
_PRE_DBRX = _Pre((_LLAMA3,))
_PRE_QWEN2 = _Pre((_QWEN2,))
_PRE_SMOLLM = _Pre((r"\p{N}", _GPT2))  # every digit on its own, then GPT-2's split
_PRE_FALCON = _Pre((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"))

PRE_BY_NAME: dict[str, _Pre] = {
    "default": _PRE_DEFAULT,
    **dict.fromkeys(
        ("gpt-2", "gpt2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de",
         "a.x-4.0", "mellum", "mpt", "olmo", "jais", "trillion", "granite-docling", "exaone4"),
        _PRE_GPT2,
    ),
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"),
        _PRE_LLAMA3,
    ),
    **dict.fromkeys(("dbrx", "smaug-bpe"), _PRE_DBRX),
    **dict.fromkeys(
        ("qwen2", "deepseek-r1-qwen", "kormo", "megrez", "stablelm2", "hunyuan"), _PRE_QWEN2
    ),
    **dict.fromkeys(
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
        _PRE_SMOLLM,
    ),
    "falcon": _PRE_FALCON,
}
"""``tokenizer.ggml.pre`` -> pre-tokenizer, following llama.cpp's ``llama_vocab::impl::load``.

``"gpt2"`` is not a name llama.cpp writes (its converter says ``"gpt-2"``); it is accepted as the
obvious alias.  A *missing* key means ``"default"``, as in llama.cpp (files older than the key).
An *unknown* name raises ``UnsupportedError``: older llama.cpp refused such files and newer ones
fall back to ``"default"`` with a warning, but the split decides which merges can ever apply, so
a guessed split gives plausible-looking, wrong ids -- worse than a clear refusal.
"""

# --- llama.cpp's text-based special-token detection (llama_vocab::impl::load) ----------------
_EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
              "<|end_of_text|>", "<EOT>", "_<EOT>", "[EOT]", "<end_of_utterance>")
_EOM_TEXTS = ("<|eom_id|>",)
_FIM_TEXTS = {
    "pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<PRE>", "<|code_prefix|>", "<|prefix|>"),
    "suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<SUF>", "<|code_suffix|>", "<|suffix|>"),
    "mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<MID>", "<|code_middle|>", "<|middle|>"),
    "pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "sep": ("<|file_sep|>",),
}
_EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>",
              "<|calls|>", "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>",
              "[EOT]", "[EOS]", "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>",
              "<|tool_response>")
_FORCED_USER_DEFINED = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE vocabularies are spelled in it)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_TO_CHAR = bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}


def _hex_bytes(error: UnicodeDecodeError) -> tuple[str, int]:
    bad = error.object[error.start : error.end]
    return "".join(f"<0x{b:02X}>" for b in bad), error.end


codecs.register_error("workbench.tokenizer.hexbytes", _hex_bytes)


def _kind(value: Any) -> str:
    return "an array" if isinstance(value, (list, tuple)) else f"{type(value).__name__} {value!r:.40}"


def _scalar(metadata: Mapping[str, Any], key: str, kind: type[str] | type[bool]) -> Any:
    """A string or bool key, or None when absent; any other type (an int for a bool too, as in llama.cpp)
    is a ModelError naming the key."""
    value = metadata.get(key)
    if value is None or isinstance(value, kind):
        return value
    raise ModelError(f"GGUF metadata {key} should be a {'string' if kind is str else 'boolean'} but is {_kind(value)}.")


def _array(metadata: Mapping[str, Any], key: str, items: tuple[type, ...], what: str, n: int | None = None) -> list | None:
    """An array whose items are all of `items` (bools never count as numbers), of length `n` when given."""
    value = metadata.get(key)
    if value is None:
        return None
    if not isinstance(value, (list, tuple)):
        raise ModelError(f"GGUF metadata {key} should be an array of {what} but is {_kind(value)}.")
    # One isinstance per distinct item type, not per item: vocabularies have 49k-262k entries.
    for item_type in set(map(type, value)):
        if not issubclass(item_type, items) or issubclass(item_type, bool):
            raise ModelError(f"GGUF metadata {key} should be an array of {what} but holds {item_type.__name__} items.")
    if n is not None and len(value) != n:
        raise ModelError(f"GGUF metadata {key} has {len(value)} entries for {n} tokens.")
    return list(value)


def _as_id(metadata: Mapping[str, Any], key: str, n_tokens: int) -> int | None:
    value = metadata.get(key)
    if value is None:
        return None
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise ModelError(f"GGUF metadata {key} should be a token id but is {_kind(value)}.")
    if not 0 <= value < n_tokens:
        raise ModelError(f"GGUF metadata {key} = {value} is outside the vocabulary of {n_tokens} tokens.")
    return int(value)


def _first_with_text(token_to_id: Mapping[str, int], texts: Sequence[str]) -> int | None:
    """llama.cpp takes whichever candidate its hash map yields first; take the lowest id (deterministic)."""
    found = [token_to_id[t] for t in texts if t in token_to_id]
    return min(found) if found else None


def _adjust_types_and_eog(
    tokens: list[str], types: list[int], token_to_id: Mapping[str, int], metadata: Mapping[str, Any]
) -> tuple[list[int], frozenset[int]]:
    """Reproduce llama.cpp's load-time fix-ups: which tokens end generation, and which tokens its
    text-based detection promotes to CONTROL (so they are cut out of text as one token)."""
    n = len(tokens)
    types = list(types)
    ids = {name: _as_id(metadata, f"tokenizer.ggml.{name}_token_id", n) for name in ("eos", "eot", "eom")}
    fim = {part: _as_id(metadata, f"tokenizer.ggml.fim_{part}_token_id", n) for part in _FIM_TEXTS}
    for part, old_key in (("pre", "prefix"), ("suf", "suffix"), ("mid", "middle")):  # deprecated keys
        if fim[part] is None:
            fim[part] = _as_id(metadata, f"tokenizer.ggml.{old_key}_token_id", n)

    def promote(token_id: int | None) -> None:
        if token_id is not None and types[token_id] != _CONTROL:
            types[token_id] = _CONTROL

    # Ids found by text (only where the metadata gave none) become CONTROL.
    if ids["eot"] is None:
        ids["eot"] = _first_with_text(token_to_id, _EOT_TEXTS)
        promote(ids["eot"])
    if ids["eom"] is None:
        ids["eom"] = _first_with_text(token_to_id, _EOM_TEXTS)
        promote(ids["eom"])
    for part, texts in _FIM_TEXTS.items():
        if fim[part] is None:
            fim[part] = _first_with_text(token_to_id, texts)
            promote(fim[part])

    eog = {fim[p] for p in ("pad", "rep", "sep") if fim[p] is not None}
    for text in _EOG_TEXTS:
        if text in token_to_id:
            eog.add(token_to_id[text])
            promote(token_to_id[text])
    for text in _FORCED_USER_DEFINED:  # gpt-oss: always rendered, never end of generation
        if text in token_to_id:
            types[token_to_id[text]] = _USER_DEFINED
    eog.update(i for i in ids.values() if i is not None)

    texts = {tokens[i]: i for i in eog}
    # o200k_harmony / solar-open: "<|end|>" ends a message, not the generation.
    if "<|end|>" in texts and (
        ("<|return|>" in texts and ("<|call|>" in texts or "<|calls|>" in texts))
        or (("<|call|>" in texts or "<|calls|>" in texts) and "<|flush|>" in texts)
    ):
        eog.discard(texts["<|end|>"])
        types[texts["<|end|>"]] = _USER_DEFINED
    # gemma4 / paddleocr: "</s>" is an ordinary tag there.
    if "<|tool_response>" in texts and "</s>" in texts:
        eog.discard(texts["</s>"])
        types[texts["</s>"]] = _NORMAL
    return types, frozenset(eog)


def spm_merges(token_to_id: Mapping[str, int], scores: Sequence[float]) -> list[tuple[str, str]]:
    """Every way to cut a vocabulary token into two vocabulary tokens, best-scoring whole first.

    llama.cpp's SPM tokenizer merges any adjacent pair whose concatenation is a token, preferring
    the highest score; ranking these pairs by that score (ties: lower id, then shorter left part)
    turns it into an ordinary ranked-merge BPE.

    Only cuts where both parts have the length of some token are sliced and looked up: slicing
    every cut of every token is quadratic in the token's length (minutes for one 1 MB token).
    """
    ranked: list[tuple[float, int, int, str, str]] = []
    append, known = ranked.append, token_to_id.__contains__
    length_set = {len(token) for token in token_to_id}
    lengths = sorted(length_set)  # a token of length n tries at most n - 1 of them: linear in the total length
    for token, token_id in token_to_id.items():
        n = len(token)
        neg_score = -float(scores[token_id])
        for cut in lengths:
            if cut >= n:
                break
            if n - cut in length_set:
                left = token[:cut]
                if known(left):
                    right = token[cut:]
                    if known(right):
                        append((neg_score, token_id, cut, left, right))
    ranked.sort()
    return [(left, right) for _, _, _, left, right in ranked]


def cached_spm_merges(tokens: Sequence[str], token_to_id: Mapping[str, int], scores: Sequence[float]) -> list[tuple[str, str]]:
    """spm_merges, kept on disk: they are a pure function of the vocabulary and its scores (1.6 s for Gemma-3's
    262k tokens, most of its load), so the cache key is a sha256 of exactly those (and of spm_merges' own code);
    the file holds each merge as the ids of its two parts. A missing, unreadable or implausible file is rebuilt."""
    h = hashlib.sha256(inspect.getsource(spm_merges).encode())
    h.update("\x00".join(tokens).encode("utf-8", "surrogatepass"))
    h.update(np.asarray(scores, dtype=np.float64).tobytes())
    path = cache_dir() / "tokenizers" / f"spm-merges-{h.hexdigest()[:24]}.npy"
    try:
        ids = np.load(path, allow_pickle=False)
        if ids.ndim == 2 and ids.shape[1] == 2 and ids.dtype == np.int32 and (ids.size == 0 or (0 <= ids.min() and ids.max() < len(tokens))):
            strings = np.array(tokens, dtype=object)  # fancy indexing in C: 10× a Python loop over 500k pairs
            return list(zip(strings[ids[:, 0]].tolist(), strings[ids[:, 1]].tolist()))
    except (OSError, ValueError):
        pass
    merges = spm_merges(token_to_id, scores)
    ids = np.array([(token_to_id[a], token_to_id[b]) for a, b in merges], dtype=np.int32).reshape(-1, 2)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{uuid.uuid4().hex}.tmp.npy")
        np.save(tmp, ids)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs the next load the 1.6 s again
    return merges


def _bpe_merges(raw: Sequence[Any], token_to_id: Mapping[str, int]) -> list[tuple[str, str]]:
    """The file's merges, in rank order, as llama.cpp reads them (cut at the first space after
    position 0; a repeated pair keeps its first rank).  Pairs whose parts or result are not in
    the vocabulary are dropped: they could never yield a token id."""
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for entry in raw:
        if isinstance(entry, bytes):
            entry = entry.decode("utf-8", "replace")
        cut = entry.find(" ", 1)
        if cut < 0:
            continue
        pair = (entry[:cut], entry[cut + 1 :])
        if pair in seen or pair[0] not in token_to_id or pair[1] not in token_to_id:
            continue
        if pair[0] + pair[1] not in token_to_id:
            continue
        seen.add(pair)
        merges.append(pair)
    return merges


class Tokenizer:
    """A GGUF model's tokenizer: ``encode`` gives llama.cpp's ids (``parse_special=True``),
    ``decode``/``decoder`` turn ids back into text.

    Build it with :meth:`from_metadata`.  Attributes: ``vocab_size``, ``bos_id``, ``eos_id``
    (``None`` when the file names none), ``add_bos`` (whether ``encode`` adds BOS by default),
    ``eos_ids`` (every id that ends generation -- llama.cpp's ``llama_vocab_is_eog`` set),
    ``model`` (``"gpt2"`` or ``"llama"``) and ``pre`` (``tokenizer.ggml.pre``).
    """

    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    add_bos: bool
    eos_ids: frozenset[int]

    def __init__(self, *, model: str, pre: str | None, tokens: list[str], types: list[int],
                 bos_id: int | None, eos_id: int | None, add_bos: bool, eos_ids: frozenset[int],
                 add_space_prefix: bool, backend: Any) -> None:
        self.model = model
        self.pre = pre
        self.vocab_size = len(tokens)
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.add_bos = add_bos
        self.eos_ids = eos_ids
        self._tokens = tokens
        self._types = types
        self._add_space_prefix = add_space_prefix
        self._backend = backend
        self._bytes: list[bytes | None] = [None] * len(tokens)

    # --- construction -----------------------------------------------------------------------
    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """Build the tokenizer from GGUF metadata (``{key: field.contents()}``).

        Raises ``UnsupportedError`` for a ``tokenizer.ggml.model`` other than ``gpt2``/``llama``
        or an unknown ``tokenizer.ggml.pre``, and ``ModelError`` for missing or inconsistent
        tokenizer metadata.
        """
        from tokenizers import AddedToken, Regex
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import models, normalizers, pre_tokenizers

        if not isinstance(metadata, Mapping):
            raise ModelError(f"Tokenizer metadata must be a mapping of GGUF keys, not {type(metadata).__name__}.")
        model = _scalar(metadata, "tokenizer.ggml.model", str)
        if model is None:
            raise ModelError("The GGUF metadata has no tokenizer.ggml.model, so it describes no tokenizer.")
        if model not in ("gpt2", "llama"):
            raise UnsupportedError(
                f"Tokenizer model {model!r} is not supported (only 'gpt2' byte-level BPE and 'llama' SentencePiece)."
            )
        raw_tokens = _array(metadata, "tokenizer.ggml.tokens", (str, bytes), "strings")
        if not raw_tokens:
            raise ModelError("The GGUF metadata has no tokenizer.ggml.tokens list.")
        n = len(raw_tokens)
        # llama.cpp renames empty tokens so that every text maps to one id.
        tokens = [
            (t.decode("utf-8", "replace") if isinstance(t, bytes) else t) or f"[EMPTY_{i}]"
            for i, t in enumerate(raw_tokens)
        ]
        # Any integer is a type: llama.cpp treats values it does not know as UNDEFINED, and so does _render.
        types = _array(metadata, "tokenizer.ggml.token_type", (numbers.Integral,), "integers", n)
        types = [_NORMAL] * n if types is None else [int(t) for t in types]
        token_to_id = {t: i for i, t in enumerate(tokens)}  # last one wins, as in llama.cpp

        types, eos_ids = _adjust_types_and_eog(tokens, types, token_to_id, metadata)
        bos_id = _as_id(metadata, "tokenizer.ggml.bos_token_id", n)
        eos_id = _as_id(metadata, "tokenizer.ggml.eos_token_id", n)
        unk_id = _as_id(metadata, "tokenizer.ggml.unknown_token_id", n)
        for unused in ("padding", "seperator", "mask"):  # unused here, but llama.cpp reads them: checked alike
            _as_id(metadata, f"tokenizer.ggml.{unused}_token_id", n)
        add_bos_value = _scalar(metadata, "tokenizer.ggml.add_bos_token", bool)

        pre_name = _scalar(metadata, "tokenizer.ggml.pre", str)
        try:
            if model == "gpt2":
                pre = _PRE_DEFAULT if pre_name is None else PRE_BY_NAME.get(pre_name)
                if pre is None:
                    raise UnsupportedError(
                        f"Pre-tokenizer {pre_name!r} (tokenizer.ggml.pre) is not supported; "
                        f"known: {', '.join(sorted(PRE_BY_NAME))}."
                    )
                raw_merges = _array(metadata, "tokenizer.ggml.merges", (str, bytes), "strings")
                if not raw_merges:
                    raise ModelError("A 'gpt2' tokenizer needs tokenizer.ggml.merges, and the GGUF metadata has none.")
                bpe = models.BPE(vocab=token_to_id, merges=_bpe_merges(raw_merges, token_to_id),
                                 ignore_merges=pre.ignore_merges, fuse_unk=False)
                backend = HFTokenizer(bpe)
                backend.pre_tokenizer = pre_tokenizers.Sequence(
                    [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre.regexes]
                    + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
                )
                default_add_bos = pre.add_bos
                add_space_prefix = False  # llama.cpp's BPE path never prefixes a space
            else:
                scores = _array(metadata, "tokenizer.ggml.scores", (numbers.Real,), "numbers", n)
                if scores is None:
                    scores = [0.0] * n
                elif any(math.isnan(score) for score in scores):  # ±inf still ranks; NaN makes the merge order arbitrary
                    raise ModelError("GGUF metadata tokenizer.ggml.scores holds NaN, so the merge order is undefined.")
                bpe = models.BPE(vocab=token_to_id, merges=cached_spm_merges(tokens, token_to_id, scores),
                                 byte_fallback=True, fuse_unk=False,
                                 unk_token=tokens[unk_id] if unk_id is not None else None)
                backend = HFTokenizer(bpe)
                add_space_prefix = _scalar(metadata, "tokenizer.ggml.add_space_prefix", bool) is not False
                escape = normalizers.Replace(" ", _SPM_SPACE)
                backend.normalizer = (
                    normalizers.Sequence([normalizers.Prepend(_SPM_SPACE), escape]) if add_space_prefix else escape
                )
                default_add_bos = True
            backend.add_special_tokens(
                [AddedToken(tokens[i], special=True, normalized=False) for i in range(n) if types[i] in _SPECIAL_TYPES]
            )
        except (UnsupportedError, ModelError):
            raise
        except Exception as exc:  # tokenizers raises plain Exception subclasses on bad vocabularies
            raise ModelError(f"Could not build the {model!r} tokenizer from the GGUF metadata: {exc}") from exc

        add_bos = default_add_bos if add_bos_value is None else add_bos_value
        if bos_id is None:
            add_bos = False
        return cls(model=model, pre=pre_name, tokens=tokens, types=types, bos_id=bos_id, eos_id=eos_id,
                   add_bos=add_bos, eos_ids=eos_ids, add_space_prefix=add_space_prefix, backend=backend)

    # --- encoding ---------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; special-token text (``<|im_start|>``) becomes that one token.

        ``add_bos=None`` follows the model (``tokenizer.ggml.add_bos_token``, else llama.cpp's
        default for the tokenizer type).
        """
        if not isinstance(text, str):
            raise InputError(f"Text to encode must be a str, not {type(text).__name__}.")
        want_bos = self.add_bos if add_bos is None else bool(add_bos)
        if want_bos and self.bos_id is None:
            raise InputError("This model's tokenizer has no BOS token, so add_bos=True cannot be honoured.")
        ids = [self.bos_id] if want_bos else []
        if text:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise InputError("Text to encode contains unpaired surrogates and is not valid Unicode.") from None
            ids.extend(self._backend.encode(text, add_special_tokens=False).ids)
        return ids

    # --- decoding ---------------------------------------------------------------------------
    def _check_id(self, token_id: Any) -> int:
        """The id as an int, or InputError. An id past the tokenizer is refused rather than shown as a
        placeholder: the tokenizer cannot tell an embedding row without a token (a file whose embedding
        is larger than its vocabulary) from an id that is simply wrong, and a placeholder would hide the
        second. The sampler never picks such rows, so only ids a caller passes in can get here."""
        try:
            index = operator.index(token_id)  # ints, numpy ints, 0-d integer tensors; not floats/strings
        except TypeError:
            raise InputError(f"Token id {token_id!r} is not an integer.") from None
        if not 0 <= index < self.vocab_size or isinstance(token_id, bool):
            raise InputError(
                f"Token id {token_id!r} is outside the vocabulary of this tokenizer's {self.vocab_size} tokens "
                f"(0..{self.vocab_size - 1})."
            )
        return index

    def _is_special(self, token_id: int) -> bool:
        return self._types[token_id] in _SPECIAL_TYPES

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes llama.cpp's ``token_to_piece(special=True)`` gives this token."""
        token_id = self._check_id(token_id)
        cached = self._bytes[token_id]
        if cached is None:
            cached = self._bytes[token_id] = self._render(token_id)
        return cached

    def _render(self, token_id: int) -> bytes:
        text, kind = self._tokens[token_id], self._types[token_id]
        if kind in _SPECIAL_TYPES:
            return text.encode("utf-8")
        if self.model == "llama":
            if kind == _NORMAL:
                return text.replace(_SPM_SPACE, " ").encode("utf-8")
            if kind == _BYTE:
                match = _BYTE_TOKEN.match(text)
                return bytes([int(match.group(1), 16)]) if match else b""
            return b""  # UNUSED / UNDEFINED: llama.cpp prints nothing
        if kind == _NORMAL:
            out = bytearray()
            for char in text:
                byte = _CHAR_TO_BYTE.get(char)
                if byte is None:  # not in the byte alphabet: keep the character itself
                    out += char.encode("utf-8")
                else:
                    out.append(byte)
            return bytes(out)
        return b""

    def _piece_bytes(self, token_id: int, skip_special: bool, after_special: bool) -> bytes:
        """One token's bytes inside a sequence (handles skipping and the SPM space prefix)."""
        if skip_special and self._types[token_id] in _SKIPPABLE_TYPES:
            return b""
        data = self.token_bytes(token_id)
        if after_special and self._add_space_prefix and not self._is_special(token_id) and data[:1] == b" ":
            data = data[1:]  # undo the space encode() put in front of this fragment
        return data

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Text of ``ids``.  Control tokens appear as their text (``<|im_end|>``) unless
        ``skip_special``; bytes that do not form valid UTF-8 become U+FFFD."""
        out = bytearray()
        after_special = True
        for token_id in ids:
            token_id = self._check_id(token_id)
            out += self._piece_bytes(token_id, skip_special, after_special)
            after_special = self._is_special(token_id)
        return out.decode("utf-8", "replace")

    def piece(self, token_id: int) -> str:
        """Readable text of one token, for tables and charts: its decoded text, control tokens as
        written (``<|im_start|>``), bytes that are not UTF-8 on their own as ``<0xE2>``."""
        token_id = self._check_id(token_id)
        data = self.token_bytes(token_id)
        if not data:
            return self._tokens[token_id]
        return data.decode("utf-8", "workbench.tokenizer.hexbytes")

    def decoder(self, skip_special: bool = False) -> IncrementalDecoder:
        """A fresh streaming decoder for this tokenizer."""
        return IncrementalDecoder(self, skip_special=skip_special)

    def __repr__(self) -> str:
        return (f"Tokenizer(model={self.model!r}, pre={self.pre!r}, vocab_size={self.vocab_size}, "
                f"bos_id={self.bos_id}, eos_ids={sorted(self.eos_ids)}, add_bos={self.add_bos})")


class IncrementalDecoder:
    """Turns ids into text one token at a time, holding back bytes of an unfinished UTF-8
    character until it completes.  The pushes plus :meth:`flush` add up to ``decode(ids)``."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._after_special = True

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly '')."""
        tok = self._tokenizer
        token_id = tok._check_id(token_id)
        data = tok._piece_bytes(token_id, self._skip_special, self._after_special)
        self._after_special = tok._is_special(token_id)
        return self._utf8.decode(data)

    def flush(self) -> str:
        """End of stream: return what is left (an unfinished character becomes U+FFFD)."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        self._after_special = True
        return text
