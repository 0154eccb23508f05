"""Tokenizers the tiny test pipelines need, written locally (no hub, no sentencepiece).

CLIP: a byte-level BPE vocabulary with every byte as a token (with and without the
word-end mark) and no merges: 514 ids, read by ``CLIPTokenizer`` (:func:`write_clip_vocab`).

A T5 tokenizer is a Unigram model over SentencePiece-style pieces ("▁" marks a word
start) with ``</s>`` appended: built here with the ``tokenizers`` library as a
``tokenizer.json`` and loaded as transformers' (fast) ``T5Tokenizer``.  The same file,
saved with ``save_pretrained``, serves ``AutoTokenizer.from_pretrained`` (pipelines) and
SigLIP's text tower (also a SentencePiece tokenizer upstream).  Also imported by
``tests/peer/diffusers_swap.py`` for ``hf-internal-testing/tiny-random-t5``.
"""
from __future__ import annotations

import json
import math
import os
import string

PIECES = ["<pad>", "</s>", "<unk>"]  # T5's ids 0, 1, 2


def _bytes_to_unicode():
    """CLIP's byte-level alphabet (the same table CLIPTokenizer uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_clip_vocab(folder: str) -> None:
    """``vocab.json`` + ``merges.txt`` in ``folder`` (created): 514 tokens, ids 512/513 are
    ``<|startoftext|>``/``<|endoftext|>``."""
    os.makedirs(folder, exist_ok=True)
    chars = _bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")


def unigram_tokenizer_json(path: str) -> str:
    """Write ``tokenizer.json`` (about 190 pieces, every printable ASCII character with and
    without the word-start mark) and return its path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    chars = list(string.ascii_letters + string.digits + string.punctuation)
    pieces = PIECES + ["\u2581"] + ["\u2581" + c for c in chars] + chars
    # rising costs: the Viterbi search has one best segmentation, no ties
    vocab = [(p, 0.0 if i < len(PIECES) else -math.log(i + 1)) for i, p in enumerate(pieces)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    os.makedirs(path, exist_ok=True)
    out = os.path.join(path, "tokenizer.json")
    tok.save(out)
    return out


def t5_tokenizer(path: str, model_max_length: int = 512):
    """transformers' T5 tokenizer over :func:`unigram_tokenizer_json` (vocab below 1,000)."""
    from transformers import T5TokenizerFast

    return T5TokenizerFast(tokenizer_file=unigram_tokenizer_json(path), eos_token="</s>", unk_token="<unk>",
                           pad_token="<pad>", extra_ids=0, model_max_length=model_max_length)


def tiny_t5_config():
    """The shape of ``hf-internal-testing/tiny-random-t5`` (d_model 32, 4 heads of 8, 5 layers,
    vocab 1103), written out so that no download is needed."""
    from transformers import T5Config

    return T5Config(vocab_size=1103, d_model=32, d_kv=8, d_ff=37, num_layers=5, num_decoder_layers=5, num_heads=4,
                    relative_attention_num_buckets=8, dropout_rate=0.1, initializer_factor=0.002, is_encoder_decoder=True,
                    pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, feed_forward_proj="relu")
