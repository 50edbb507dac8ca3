"""CLIP and T5 tokenizers built in memory, offline and deterministically.

Real SD3 folders ship their own tokenizers; these stand in for them in tests and the demo.
The CLIP tokenizer is a byte-level BPE whose merges spell out a fixed English word list
(same ids on every machine, unlike a trained BPE); the T5 tokenizer is a Unigram model over
the same words plus single characters, so any text still tokenizes.
"""

from __future__ import annotations

from transformers import CLIPTokenizer, T5Tokenizer

CLIP_MAX_LENGTH = 77

# Words that demo captions, synthetic captions and test prompts use.
WORDS = """
a an the of and with in on at to from by for is are its this that there one two three four
photo photograph picture image close up view top side front small large big tiny little old
young man woman person people face portrait astronaut suit flag space rocket launch sky
cloud clouds cup coffee mug table cat dog animal fur eyes grey gray black white red green blue
yellow orange purple pink brown dark light bright colour color colours colors background
circle square triangle shape shapes star stars galaxy galaxies telescope deep field retina eye
medical scan camera cameraman tripod building city street tree trees flower flowers garden
temple china chinese roof pagoda hopper grace uniform navy officer motorcycle bike page text
book coins coin horse grass rock water sea lake river mountain hill snow sun moon night day
standing sitting holding wearing looking lying near next behind under over above below left
right center middle detailed description showing shows scene outdoor indoor building window
door wall floor road car blue-sky striped pattern texture plain simple colourful vivid soft
""".split()

SPECIAL_CLIP = ("<|startoftext|>", "<|endoftext|>")


def byte_alphabet() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes (GPT-2's mapping)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    extra = (b for b in range(256) if b not in printable)
    mapping = {b: chr(b) for b in printable}
    mapping.update({b: chr(256 + i) for i, b in enumerate(extra)})
    return [mapping[b] for b in range(256)]


def _clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn BPE merges on WORDS until every word is one token.

    Plain BPE training (most frequent pair first, ties broken by the pair itself) is
    deterministic, and applying its merges in rank order reproduces the training
    segmentation, so every listed word encodes to exactly one id.
    """
    byte_chars = byte_alphabet()
    vocab: dict[str, int] = {}
    for token in byte_chars + [c + "</w>" for c in byte_chars]:
        vocab.setdefault(token, len(vocab))
    words = [list(w[:-1]) + [w[-1] + "</w>"] for w in sorted(set(WORDS))]
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for symbols in words:
            for pair in zip(symbols, symbols[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        vocab.setdefault(best[0] + best[1], len(vocab))
        words = [_merge(symbols, best) for symbols in words]
    for special in SPECIAL_CLIP:
        vocab.setdefault(special, len(vocab))
    return vocab, merges


def _merge(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def build_clip_tokenizer() -> CLIPTokenizer:
    vocab, merges = _clip_vocab_and_merges()
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=CLIP_MAX_LENGTH,
        bos_token=SPECIAL_CLIP[0],
        eos_token=SPECIAL_CLIP[1],
        unk_token=SPECIAL_CLIP[1],
        pad_token=SPECIAL_CLIP[1],
    )


def build_t5_tokenizer(model_max_length: int = 512) -> T5Tokenizer:
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    for rank, word in enumerate(sorted(set(WORDS))):
        pieces.append(("\u2581" + word, -2.0 - rank * 1e-3))
    chars = sorted(set("".join(WORDS)) | set("abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"-()/&"))
    pieces.append(("\u2581", -8.0))
    for char in chars:
        pieces.append((char, -10.0))
        pieces.append(("\u2581" + char, -10.5))
    seen: set[str] = set()
    unique = [(p, s) for p, s in pieces if not (p in seen or seen.add(p))]
    return T5Tokenizer(vocab=unique, extra_ids=0, model_max_length=model_max_length)
