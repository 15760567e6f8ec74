"""One tokenizer interface over HF ``tokenizers`` (``tokenizer.json``) and sentencepiece (``*.model``).

The synthetic world's word-level vocabulary is shipped as a HF ``tokenizers`` WordLevel ``tokenizer.json``
(``data/world_tasks.py``), so it goes through the same code path as a real tokenizer.

Choices (the paper states none of them; EOS must differ from PAD, Huang et al. 2024, detail 3):
- ``encode`` never adds special tokens (no BOS/EOS): callers append ``eos_id`` where a sequence ends.
- ``decode`` drops PAD ids and decodes everything else, EOS included (as its token text); it does not stop
  at EOS. ``decode_response`` is the "cut at the first EOS" view that scoring code wants.
- EOS: the ``eos_token`` argument, else ``tokenizer_config.json``'s ``eos_token``, else sentencepiece's
  ``eos_id``, else the first of ``EOS_CANDIDATES`` in the vocabulary; none found is an error.
- PAD: the ``pad_token`` argument, else ``tokenizer_config.json``'s ``pad_token``, else sentencepiece's
  ``pad_id``, else the first of ``PAD_CANDIDATES`` in the vocabulary, else **one extra id equal to the
  backend's vocabulary size** (``vocab_size`` then counts it). Borrowing EOS or UNK instead would make a real
  token indistinguishable from padding; the extra id never collides, and its embedding row is never trained
  because padded positions are masked. The model's vocab size must be >= ``Tokenizer.vocab_size``.
- EOS == PAD is an error (the model would never learn to stop; Huang et al. 2024, detail 3).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Callable, Iterable

EOS_CANDIDATES = ("<eos>", "</s>", "<|endoftext|>", "<|end_of_text|>", "<|im_end|>")
PAD_CANDIDATES = ("<pad>", "[PAD]", "<|pad|>", "<|finetune_right_pad_id|>")


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """Text <-> ids. Build with ``load_tokenizer``; ``kind`` is ``"hf"`` or ``"sentencepiece"``."""

    kind: str
    vocab_size: int
    pad_id: int
    eos_id: int
    bos_id: int | None
    _encode: Callable[[str], list[int]] = dataclasses.field(repr=False, compare=False)
    _decode: Callable[[list[int]], str] = dataclasses.field(repr=False, compare=False)

    def __post_init__(self):
        if self.eos_id == self.pad_id:
            raise ValueError(f"EOS and PAD are the same id ({self.eos_id}): the model could never learn to stop")
        for name, i in (("pad_id", self.pad_id), ("eos_id", self.eos_id)):
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"{name}={i} outside the vocabulary [0, {self.vocab_size})")

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no BOS/EOS is added."""
        return self._encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` with PAD ids dropped; EOS and other special tokens are decoded, nothing stops."""
        return self._decode([int(i) for i in ids if int(i) != self.pad_id])

    def decode_response(self, ids: Iterable[int]) -> tuple[str, bool]:
        """``(text before the first EOS, whether an EOS was found)``: a sampled response as scorers take it."""
        kept: list[int] = []
        for i in ids:
            if int(i) == self.eos_id:
                return self.decode(kept), True
            kept.append(int(i))
        return self.decode(kept), False


def _token_name(value) -> str | None:
    """A token from ``tokenizer_config.json``: a string or an AddedToken dict ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _pick(explicit: str | None, from_config: str | None, candidates: tuple[str, ...], lookup) -> int | None:
    """The id of the first named token that resolves; an explicitly named token that does not is an error."""
    for name in (explicit, from_config):
        if name is not None:
            if (i := lookup(name)) is None:
                raise ValueError(f"token {name!r} is not in the vocabulary")
            return i
    return next((i for i in map(lookup, candidates) if i is not None), None)


def _finish(kind, base_size, eos, pad, bos, encode, decode, path) -> Tokenizer:
    if eos is None:
        raise ValueError(f"{path}: no EOS token found (tried {EOS_CANDIDATES}); pass eos_token=")
    if pad is None:
        pad = base_size  # the extra-id rule of the module docstring
    return Tokenizer(kind, max(base_size, pad + 1), pad, eos, bos, encode, decode)


def _load_hf(path: pathlib.Path, eos_token: str | None, pad_token: str | None) -> Tokenizer:
    import tokenizers

    tok = tokenizers.Tokenizer.from_file(str(path))
    config_file = path.parent / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.exists() else {}
    lookup = tok.token_to_id
    eos = _pick(eos_token, _token_name(config.get("eos_token")), EOS_CANDIDATES, lookup)
    pad = _pick(pad_token, _token_name(config.get("pad_token")), PAD_CANDIDATES, lookup)
    bos_name = _token_name(config.get("bos_token"))
    bos = lookup(bos_name) if bos_name else None
    return _finish(
        "hf",
        tok.get_vocab_size(with_added_tokens=True),
        eos,
        pad,
        bos,
        lambda text: tok.encode(text, add_special_tokens=False).ids,
        lambda ids: tok.decode(ids, skip_special_tokens=False),
        path,
    )


def _load_sentencepiece(path: pathlib.Path, eos_token: str | None, pad_token: str | None) -> Tokenizer:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(path))
    size = sp.get_piece_size()

    def lookup(piece: str) -> int | None:
        i = sp.piece_to_id(piece)  # unknown pieces map to unk: check the round trip
        return i if sp.id_to_piece(i) == piece else None

    def native(i: int) -> str | None:  # sentencepiece reports -1 for "not defined"
        return sp.id_to_piece(i) if i >= 0 else None

    eos = _pick(eos_token, native(sp.eos_id()), EOS_CANDIDATES, lookup)
    pad = _pick(pad_token, native(sp.pad_id()), PAD_CANDIDATES, lookup)
    bos = sp.bos_id() if sp.bos_id() >= 0 else None
    # The extra pad id (if any) never reaches sentencepiece: Tokenizer.decode drops it first.
    return _finish("sentencepiece", size, eos, pad, bos, lambda t: sp.encode(t, out_type=int), sp.decode, path)


def load_tokenizer(
    path: str | pathlib.Path, *, eos_token: str | None = None, pad_token: str | None = None
) -> Tokenizer:
    """Load ``tokenizer.json`` (HF), a sentencepiece ``*.model``, or a directory holding one of them.

    A directory is searched for ``tokenizer.json`` first, then ``tokenizer.model``, then a single ``*.model``.
    ``tokenizer_config.json`` beside a ``tokenizer.json`` supplies EOS/PAD/BOS names when present.
    """
    path = pathlib.Path(path)
    if path.is_dir():
        models = sorted(path.glob("*.model"))
        if (path / "tokenizer.json").exists():
            path = path / "tokenizer.json"
        elif (path / "tokenizer.model").exists():
            path = path / "tokenizer.model"
        elif len(models) == 1:
            path = models[0]
        else:
            raise ValueError(f"{path}: no tokenizer.json and not exactly one *.model file")
    if not path.exists():
        raise FileNotFoundError(path)
    if path.suffix == ".json":
        return _load_hf(path, eos_token, pad_token)
    if path.suffix == ".model":
        return _load_sentencepiece(path, eos_token, pad_token)
    raise ValueError(f"{path}: unknown tokenizer file type (want tokenizer.json or *.model)")
