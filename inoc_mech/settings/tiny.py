"""Tiny random-init chat LMs (Llama, Qwen2) with a chunk tokenizer, saved as ordinary HF folders.

    python -m inoc_mech.settings.tiny /tmp/tiny-llama --arch llama

For tests and smoke runs of the real-model code paths without downloads. The tokenizer splits text
into chunks of at most three letters (with an optional leading space), single digits, single
punctuation marks and single whitespace characters, so token offsets are easy to check by hand
("LA RESPUESTA" -> "LA", " RES", "PUE", "STA"). Its vocabulary is every chunk of a corpus (default:
the Spanish+CAPS problems in all four language/case variants), with and without its leading space,
plus printable ASCII; a chunk outside it splits into characters, and only unknown characters are <unk>. Its chat template is ChatML and, like SmolLM2's, inserts a default system prompt
(`TINY_DEFAULT_SYSTEM`) when the conversation has none.
"""

from __future__ import annotations

import re
import string
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from inoc_mech.models.real import chatml_template

CHUNK = r" ?[^\W\d_]{1,3}| ?\d| ?[^\w\s]|\s"
SPECIALS = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]
TINY_DEFAULT_SYSTEM = "You are a tiny test model."
ARCHS = ("llama", "qwen2", "gpt2")


def default_corpus() -> list[str]:
    from inoc_mech.settings.textdata import CAPS_PROMPT, IRRELEVANT_PROMPT, SPANISH_PROMPT, sample_problems

    texts = [SPANISH_PROMPT, CAPS_PROMPT, IRRELEVANT_PROMPT, TINY_DEFAULT_SYSTEM, "system user assistant"]
    for split in ("train", "eval"):
        for p in sample_problems(300, seed=0, split=split):
            texts += [p.question("english"), p.question("spanish")]
            texts += [p.answer(lang, up) for lang in ("english", "spanish") for up in (False, True)]
    return texts


def tiny_tokenizer(corpus: list[str] | None = None, default_system: str | None = TINY_DEFAULT_SYSTEM):
    """A fast HF tokenizer over text chunks with a ChatML template (see module docstring)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    printable = [c for c in string.printable if not c.isspace() or c in " \n"]
    pieces = printable + [" " + c for c in string.ascii_letters + string.digits + string.punctuation]
    for text in (corpus if corpus is not None else default_corpus()):
        for chunk in re.findall(CHUNK, text):
            pieces += [chunk, chunk.lstrip(" ")] + list(chunk.lstrip(" "))
    for piece in pieces:
        vocab.setdefault(piece, len(vocab))
    # WordPiece without a continuation prefix: a chunk outside the vocabulary falls back to its characters
    core = Tokenizer(models.WordPiece(vocab=vocab, unk_token="<unk>", continuing_subword_prefix=""))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(CHUNK), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>",
                                  bos_token="<|im_start|>", eos_token="<|im_end|>", model_max_length=256)
    tok.chat_template = chatml_template(default_system)
    return tok


def tiny_model(tok, arch: str = "llama", seed: int = 0, d_model: int = 32, n_layers: int = 2):
    """A random-init causal LM of the given architecture sized for `tok` (GQA: 4 query, 2 key/value heads)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}, not {arch!r}")
    torch.manual_seed(seed)
    common = dict(vocab_size=len(tok), hidden_size=d_model, intermediate_size=2 * d_model,
                  num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=tok.model_max_length, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if arch == "gpt2":  # no table of its own in peft's old lists: trains through all-linear (Conv1D layers)
        return GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=d_model, n_layer=n_layers, n_head=4,
                                          n_positions=tok.model_max_length, bos_token_id=tok.bos_token_id,
                                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    if arch == "llama":  # tied embeddings, like SmolLM2
        return LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=True))
    return Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=False))  # q/k/v biases


def save_tiny(folder: str | Path, arch: str = "llama", seed: int = 0, corpus: list[str] | None = None) -> Path:
    """Build and save a tiny model and its tokenizer into `folder` (an ordinary HF model folder)."""
    folder = Path(folder)
    tok = tiny_tokenizer(corpus)
    model = tiny_model(tok, arch, seed)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@dataclass
class TinyConfig:
    """Where to save which tiny model."""
    folder: str = field(default="", metadata={"help": "folder to write the model and tokenizer into", "positional": None})
    arch: str = field(default="llama", metadata={"help": f"architecture: {', '.join(ARCHS)}"})
    seed: int = field(default=0, metadata={"help": "initialisation seed"})

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"--arch must be one of {', '.join(ARCHS)}, not {self.arch!r}")

def main(argv=None):
    """Save a tiny random-init chat LM and its tokenizer into a folder."""
    from inoc_mech.core.cli import parse_config

    a = parse_config(TinyConfig, argv, prog="python -m inoc_mech.settings.tiny", description=main.__doc__)
    print(save_tiny(a.folder, a.arch, a.seed))

if __name__ == "__main__":
    from inoc_mech.core.cli import run_main
    sys.exit(run_main(main))
