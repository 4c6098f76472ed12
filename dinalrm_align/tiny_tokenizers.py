"""In-memory tokenizers of the tiny pipelines (no files): CLIP BPE, T5 unigram and a Qwen3-style byte-level BPE
with a chat template. They know the colour-world words (:data:`TINY_WORDS`) as whole tokens."""

from __future__ import annotations

import string
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from transformers import Qwen2Tokenizer

#: Words that the tiny tokenizers know as whole tokens (colour-world prompts use them).
TINY_WORDS: tuple[str, ...] = (
    "a", "an", "the", "of", "photo", "painting", "red", "green", "blue", "yellow", "cyan", "magenta",
    "white", "black", "orange", "purple", "cube", "ball", "car", "house", "tree", "cat", "dog", "flower",
    "bird", "boat", "cup", "chair", "apple", "hat", "sky", "girl",
)  # fmt: skip


#: Z-Image-style chat template: Qwen3's turn markers, ``add_generation_prompt`` and ``enable_thinking``
#: (``enable_thinking=False`` appends an empty think block, as Qwen3 does).
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and not enable_thinking -%}{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}{%- endif -%}"
)
_QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")


def _learn_merges(words: list[list[str]]) -> list[tuple[str, str]]:
    """BPE merges learned on ``words`` (symbol lists) until every word is one token.

    Plain BPE training (most frequent adjacent pair first, ties broken by the pair itself), so
    encoding any of the words with the merges in this order gives back the whole word.
    """
    words = [list(w) for w in words]
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for w in words:
            for pair in zip(w, w[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        for w in words:
            i = 0
            while i < len(w) - 1:
                if (w[i], w[i + 1]) == best:
                    w[i : i + 2] = [w[i] + w[i + 1]]
                i += 1


def _clip_tokenizer(whole_words: bool = False):
    """Character-level CLIP BPE tokenizer that knows TINY_WORDS.

    The default merges (kept for reproducibility of the SD3 pipeline) leave "green", "cyan" and
    "tree" split; ``whole_words=True`` uses learned merges that make every TINY_WORD one token.
    """
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for tok in ["<|startoftext|>", "<|endoftext|>"]:
        vocab[tok] = len(vocab)
    for ch in string.ascii_lowercase + string.digits + ".,!?'-":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    if whole_words:
        merges = _learn_merges([[*w[:-1], w[-1] + "</w>"] for w in TINY_WORDS])
        for a, b in merges:
            vocab.setdefault(a + b, len(vocab))
        return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    merges: list[tuple[str, str]] = []
    for word in TINY_WORDS:
        # Build each known word left to right from characters with one merge per character.
        prefix = word[0]
        for i, ch in enumerate(word[1:], start=1):
            piece = ch + "</w>" if i == len(word) - 1 else ch
            merged = prefix + piece
            if (prefix, piece) not in merges:
                merges.append((prefix, piece))
            vocab.setdefault(merged, len(vocab))
            prefix = merged
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def _t5_tokenizer():
    from transformers import T5Tokenizer

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w, -1.0) for w in TINY_WORDS]
    pieces += [("\u2581", -2.0)]
    pieces += [(ch, -3.0) for ch in string.ascii_lowercase + string.digits + ".,!?'-"]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def _qwen_tokenizer() -> Qwen2Tokenizer:
    """Byte-level BPE ``Qwen2Tokenizer``: all 256 byte symbols, TINY_WORDS (with and without a leading
    space) as whole tokens, Qwen3's special tokens and chat template; pads right with ``<|endoftext|>``."""
    from tokenizers import AddedToken
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}
    words = [*TINY_WORDS, "user", "assistant"]
    merges = _learn_merges([list(w) for w in words] + [["\u0120", *w] for w in words])
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    for tok in _QWEN_SPECIAL:
        vocab[tok] = len(vocab)
    tok = Qwen2Tokenizer(
        vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens=["<|im_start|>"], chat_template=QWEN_CHAT_TEMPLATE, model_max_length=1024,
    )  # fmt: skip
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<think>", "</think>")])
    return tok
