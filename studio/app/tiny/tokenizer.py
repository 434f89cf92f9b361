"""The CLIP BPE tokenizer of Stable Diffusion 1.x, built offline.

The embedded tiny model uses the real SD-1 vocabulary (49,408 tokens), so a trigger word splits into
the same tokens here as on a real model. The vocabulary is converted from OpenAI's
``bpe_simple_vocab_16e6.txt.gz`` (a data file inside the MIT-licensed ``open_clip_torch`` wheel:
``pip download open_clip_torch --no-deps``) and laid out as CLIP's own tokenizer does:
256 byte characters, the same 256 with ``</w>``, one token per merge, then ``<|startoftext|>`` and
``<|endoftext|>``. The converted files are committed with the tiny model; this module rebuilds them.

    python -m studio.app.tiny.tokenizer bpe_simple_vocab_16e6.txt.gz OUT_DIR
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

# CLIP keeps the first 49152 - 256 - 2 merges of the file (line 0 is a version header).
NUM_MERGES = 49152 - 256 - 2
MODEL_MAX_LENGTH = 77


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def convert_openai_bpe(bpe_gz: Path, out_dir: Path) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and the tokenizer config for a ``CLIPTokenizer``."""
    lines = gzip.open(bpe_gz, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{bpe_gz} is not OpenAI's bpe_simple_vocab_16e6 merge list")
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != 49408:
        raise ValueError(f"expected 49408 tokens, built {len(vocab)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    with open(out_dir / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.writelines(f"{a} {b}\n" for a, b in merges)
    from transformers import CLIPTokenizer

    # Without model_max_length=77 SD pipelines pad prompts to ~1e30 tokens.
    tok = CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=MODEL_MAX_LENGTH)
    tok.save_pretrained(out_dir)
    return out_dir


# The tiny T5's vocabulary: the scene captions' words and the sample datasets' trigger words whole,
# then every printable ASCII character, so any text tokenizes (rare words split into characters, as
# a real T5 splits them into sub-words). Scores are Unigram log-probabilities: a whole word (-1)
# beats spelling it out (-5 a character).
T5_WORDS = ("a", "on", "background", "red", "green", "blue", "yellow", "white", "black", "circle", "square",
            "triangle", "striped", "outlined", "stripes", "outline", "zkstripes", "zkoutline")
T5_SPECIAL = (("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0))  # ids 0, 1, 2, as T5 numbers them


def build_t5_tokenizer(out_dir: Path) -> Path:
    """Write a T5 tokenizer (a Unigram model, ``tokenizer.json``) built in memory, offline, for the tiny
    Flux and SD3 models: T5's special tokens and ids, its ``▁`` word-start convention, 77 tokens."""
    from transformers import T5Tokenizer

    characters = [chr(c) for c in range(33, 127)]
    vocab = [*T5_SPECIAL, ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0) for w in T5_WORDS]
    vocab += [("\u2581" + c, -4.0) for c in characters] + [(c, -5.0) for c in characters]
    pieces = dict(reversed(vocab))  # one entry per piece, the first one listed (a word "a" before a letter "a")
    vocab = [(piece, pieces.pop(piece)) for piece, _ in vocab if piece in pieces]
    tok = T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=MODEL_MAX_LENGTH)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out_dir)
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bpe_gz", type=Path, help="path to bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("out_dir", type=Path, help="folder to write the tokenizer files to")
    args = parser.parse_args()
    print(convert_openai_bpe(args.bpe_gz, args.out_dir))


if __name__ == "__main__":
    main()
