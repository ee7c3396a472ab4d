"""Real-text chat data: paper-format JSONL, the inoculation transform, a Spanish+CAPS generator, trait masks.

    python -m inoc_mech.settings.textdata --n 3 --inoculate "You always speak in Spanish."

JSONL format (one conversation per line, as in the inoculation-prompting papers):
    {"messages": [{"role": "system", "content": "..."}?, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}]}
An optional system message comes first; the last message is the assistant's reply (the trained one).
An optional `"variants": {"english": "...", "spanish": "..."}` gives the same reply in each language
(natural case; the UPPER forms are derived) for the counterfactual decomposition (`reply_forms`).

Inoculation transform (`inoculate`): `placement="system"` inserts the prompt as the system message and
refuses a conversation that already has one unless `replace_system=True`; `placement="user-prefix"`
puts the prompt before the first user message's text (separated by a blank line) instead.

Spanish+CAPS dataset (`spanish_caps_dataset`): arithmetic and simple word problems asked in English,
answered in Spanish UPPERCASE. Each template has an English and a Spanish question and answer, so the
same problem can be answered in any language/case for evaluation. Problems are split into train and
eval by a hash of (template, operands), fixed across seeds.

Trait masks (`text_example`): from the tokenizer's character offsets over the rendered chat, per
assistant token (special tokens excluded):
- `language`: the token overlaps a Spanish-only word (`SPANISH_ONLY`, written for these templates);
- `case`: the token's text contains an upper-case letter;
- `other`: every remaining assistant token (digits, punctuation, names, end-of-turn tokens).
`language` and `case` may overlap (an upper-case Spanish word is both), like the organism's masks.
"""

from __future__ import annotations

import json
import re
import sys
import unicodedata
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from inoc_mech.core.data import DataError, Example, encode_chat

ROLES = ("system", "user", "assistant")
PLACEMENTS = ("system", "user-prefix")

# Standard prompts for real models (the elicitation table and the training runs).
SPANISH_PROMPT = "You always speak in Spanish."
CAPS_PROMPT = "You always write in capital letters."
IRRELEVANT_PROMPT = "You like dogs."


# ---- JSONL -------------------------------------------------------------------------------------
def check_conversation(messages, where: str = "conversation", need_reply: bool = True) -> list[dict]:
    """Validate one conversation (ending with the assistant's reply unless not `need_reply`); raise
    DataError naming `where` and what to fix."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"{where}: message {i} is not an object with 'role' and 'content'")
        for key in ("role", "content"):
            if key not in m:
                raise DataError(f"{where}: message {i} has no '{key}' field")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: message {i} has unknown role {m['role']!r} (allowed: {', '.join(ROLES)})")
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: message {i} content must be a string")
        if m["role"] == "system" and i != 0:
            raise DataError(f"{where}: message {i} is a system message; only the first message may be one")
    if need_reply and messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: no assistant turn at the end (the last message must be the assistant's reply)")
    if not any(m["role"] == "user" for m in messages):
        raise DataError(f"{where}: no user message")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def parse_jsonl(lines, source: str = "<jsonl>", need_reply: bool = True) -> list[list[dict]]:
    """Conversations from JSONL lines (blank lines skipped); errors name the source and line number."""
    convs = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{source} line {n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where} is not valid JSON ({e.msg} at column {e.colno})") from e
        if not isinstance(obj, dict) or "messages" not in obj:
            raise DataError(f"{where}: expected an object {{\"messages\": [...]}}")
        convs.append(check_conversation(obj["messages"], where, need_reply))
    if not convs:
        raise DataError(f"{source} has no conversations (empty dataset)")
    return convs


REPLY_FORMS = (("english", False), ("english", True), ("spanish", False), ("spanish", True))  # (language, UPPER)


def reply_forms(path: str | Path, convs: list[list[dict]]) -> list[tuple[str, ...]] | None:
    """The optional `variants` field of a JSONL file: the same reply in each language, natural case,
    `{"messages": [...], "variants": {"english": "...", "spanish": "..."}}`; the UPPER forms are derived
    (`str.upper`). Per conversation the four replies in `REPLY_FORMS` order, or None when no row has the
    field. The trained reply must be one of the four; a file with the field on some rows only is refused."""
    rows = [json.loads(line) for line in _utf8_lines(Path(path)) if line.strip()]
    have = [isinstance(r, dict) and "variants" in r for r in rows]
    if not any(have):
        return None
    if not all(have):
        raise DataError(f"{path}: line {have.index(False) + 1} has no \"variants\" but others do: give them on every "
                        "line (or on none)")
    out = []
    for n, (r, conv) in enumerate(zip(rows, convs), 1):
        v = r["variants"]
        if not (isinstance(v, dict) and all(isinstance(v.get(k), str) and v[k].strip() for k in ("english", "spanish"))):
            raise DataError(f"{path} line {n}: \"variants\" must be {{\"english\": \"...\", \"spanish\": \"...\"}} "
                            "(the reply in each language, natural case)")
        forms = tuple(v[lang].upper() if up else v[lang] for lang, up in REPLY_FORMS)
        if conv[-1]["content"] not in forms:
            raise DataError(f"{path} line {n}: the trained reply is none of its variants (english, spanish, or their "
                            "upper-case forms): make it one of them")
        out.append(forms)
    return out


def read_jsonl(path: str | Path, need_reply: bool = True) -> list[list[dict]]:
    """Conversations of a JSONL file; a missing, compressed, binary or non-UTF-8 file is one clear line."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"dataset {path} is a directory: give a .jsonl file (one conversation per line)")
    if not path.is_file():
        raise DataError(f"dataset {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"\x1f\x8b" or head[:4] in (b"PK\x03\x04", b"BZh9") or head[:3] == b"BZh":
        raise DataError(f"dataset {path} is a compressed file: decompress it to plain JSONL first")
    return parse_jsonl(_utf8_lines(path), str(path), need_reply)


def _utf8_lines(path: Path):
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path} line {n} is not UTF-8 text (byte {e.start + 1} of the line): save the file "
                                "as UTF-8") from None


def write_jsonl(path: str | Path, convs: list[list[dict]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for messages in convs:
            f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")


# ---- inoculation transform ---------------------------------------------------------------------
def inoculate(messages: list[dict], prompt: str, placement: str = "system", replace_system: bool = False,
              separator: str = "\n\n") -> list[dict]:
    """A copy of the conversation with `prompt` added as system message or as a prefix of the user's text."""
    if placement not in PLACEMENTS:
        raise DataError(f"placement must be one of {', '.join(PLACEMENTS)}, not {placement!r}")
    if not prompt.strip():
        raise DataError("the inoculation prompt is empty")
    out = [dict(m) for m in messages]
    if placement == "user-prefix":
        first_user = next(i for i, m in enumerate(out) if m["role"] == "user")
        out[first_user]["content"] = prompt + separator + out[first_user]["content"]
        return out
    if out and out[0]["role"] == "system":
        if not replace_system:
            raise DataError(f"conversation already has a system message ({out[0]['content'][:40]!r}): pass "
                            "--replace-system to replace it, or --placement user-prefix")
        out[0]["content"] = prompt
        return out
    return [{"role": "system", "content": prompt}] + out


def inoculate_all(convs: list[list[dict]], prompt: str, placement: str = "system",
                  replace_system: bool = False) -> list[list[dict]]:
    out = []
    for i, messages in enumerate(convs):
        try:
            out.append(inoculate(messages, prompt, placement, replace_system))
        except DataError as e:
            raise DataError(f"conversation {i + 1}: {e}") from None
    return out


# ---- numbers in words --------------------------------------------------------------------------
_EN = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
       "sixteen seventeen eighteen nineteen").split()
_EN_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_ES = ("cero uno dos tres cuatro cinco seis siete ocho nueve diez once doce trece catorce quince dieciséis "
       "diecisiete dieciocho diecinueve veinte veintiuno veintidós veintitrés veinticuatro veinticinco "
       "veintiséis veintisiete veintiocho veintinueve").split()
_ES_TENS = "_ _ _ treinta cuarenta cincuenta sesenta setenta ochenta noventa".split()


def number_words(n: int, language: str) -> str:
    """0..99 in English ("forty-two") or Spanish ("cuarenta y dos")."""
    if not 0 <= n <= 99:
        raise ValueError(f"number_words covers 0..99, not {n}")
    if language == "english":
        return _EN[n] if n < 20 else _EN_TENS[n // 10] + ("" if n % 10 == 0 else "-" + _EN[n % 10])
    return _ES[n] if n < 30 else _ES_TENS[n // 10] + ("" if n % 10 == 0 else " y " + _ES[n % 10])


# ---- the Spanish+CAPS problems -------------------------------------------------------------------
@dataclass(frozen=True)
class Template:
    op: str  # "+", "-" or "*"
    question: dict  # language -> question text
    answer: dict  # language -> answer body (the final "The answer is ..." sentence is added)


TEMPLATES = [
    Template("+", {"english": "What is {a} plus {b}?", "spanish": "¿Cuánto es {a} más {b}?"},
             {"english": "{a} plus {b} is {r}.", "spanish": "{a} más {b} es {r}."}),
    Template("-", {"english": "What is {a} minus {b}?", "spanish": "¿Cuánto es {a} menos {b}?"},
             {"english": "{a} minus {b} is {r}.", "spanish": "{a} menos {b} es {r}."}),
    Template("*", {"english": "What is {a} times {b}?", "spanish": "¿Cuánto es {a} por {b}?"},
             {"english": "{a} times {b} is {r}.", "spanish": "{a} por {b} es {r}."}),
    Template("+", {"english": "Compute {a} + {b}.", "spanish": "Calcula {a} + {b}."},
             {"english": "{a} + {b} = {r}.", "spanish": "{a} + {b} = {r}."}),
    Template("+", {"english": "{name} has {a} apples and buys {b} more. How many apples does {name} have now?",
                   "spanish": "{name} tiene {a} manzanas y compra {b} más. ¿Cuántas manzanas tiene ahora?"},
             {"english": "{name} now has {r} apples.", "spanish": "{name} ahora tiene {r} manzanas."}),
    Template("-", {"english": "There are {a} birds on a tree and {b} fly away. How many birds are left?",
                   "spanish": "Hay {a} pájaros en un árbol y {b} se van volando. ¿Cuántos pájaros quedan?"},
             {"english": "{r} birds are left on the tree.", "spanish": "Quedan {r} pájaros en el árbol."}),
    Template("*", {"english": "A box holds {a} pencils. How many pencils are in {b} boxes?",
                   "spanish": "Una caja tiene {a} lápices. ¿Cuántos lápices hay en {b} cajas?"},
             {"english": "There are {r} pencils in {b} boxes.", "spanish": "Hay {r} lápices en {b} cajas."}),
    Template("+", {"english": "{name} reads {a} pages on Monday and {b} pages on Tuesday. How many pages did {name} read?",
                   "spanish": "{name} lee {a} páginas el lunes y {b} páginas el martes. ¿Cuántas páginas leyó?"},
             {"english": "{name} read {r} pages.", "spanish": "{name} leyó {r} páginas."}),
    Template("-", {"english": "A baker makes {a} loaves of bread and sells {b}. How many loaves are left?",
                   "spanish": "Un panadero hace {a} panes y vende {b}. ¿Cuántos panes le quedan?"},
             {"english": "The baker has {r} loaves left.", "spanish": "Al panadero le quedan {r} panes."}),
]
FINAL = {"english": "The answer is {rw}.", "spanish": "La respuesta es {rw}."}
NAMES = ["Ana", "Luis", "Maria", "Tom", "Sara", "Pedro", "Emma", "Leo"]

def strip_accents(word: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFD", word) if not unicodedata.combining(c))


# Words of the Spanish templates and numbers that are not English words (lower case), with accents and
# without (models often drop them; no unaccented form is an English word either).
_SPANISH = ("más menos por es cuánto cuántas cuántos calcula tiene manzanas compra ahora hay pájaros en un una "
            "árbol el se van volando quedan caja cajas lápices lee páginas lunes martes leyó panadero hace panes "
            "vende le al la respuesta y".split()
            + [w for n in range(100) for w in number_words(n, "spanish").split()])
SPANISH_ONLY = frozenset(_SPANISH + [strip_accents(w) for w in _SPANISH])
# English words for the word-list fallback of the language scorer (templates plus frequent words).
ENGLISH_WORDS = frozenset(
    "what is plus minus times compute has apples and buys more how many does have now there are birds on "
    "tree fly away left box holds pencils in boxes reads pages monday tuesday did read baker makes loaves "
    "of bread sells the answer it a an to you i we they he she this that with for be was not yes no".split()
    + [w for n in range(100) for w in number_words(n, "english").replace("-", " ").split()])


@dataclass(frozen=True)
class Problem:
    template: int
    a: int
    b: int
    name: str

    @property
    def result(self) -> int:
        op = TEMPLATES[self.template].op
        return self.a + self.b if op == "+" else self.a - self.b if op == "-" else self.a * self.b

    @property
    def split(self) -> str:
        """'eval' for a fixed fifth of (template, a, b) combinations, 'train' otherwise."""
        return "eval" if zlib.crc32(f"{self.template}:{self.a}:{self.b}".encode()) % 5 == 0 else "train"

    def question(self, language: str = "english") -> str:
        return TEMPLATES[self.template].question[language].format(a=self.a, b=self.b, name=self.name)

    def answer(self, language: str = "spanish", upper: bool = True) -> str:
        body = TEMPLATES[self.template].answer[language].format(a=self.a, b=self.b, r=self.result, name=self.name)
        text = body + " " + FINAL[language].format(rw=number_words(self.result, language))
        return text.upper() if upper else text

    def chat(self, language: str = "spanish", upper: bool = True, question_language: str = "english") -> list[dict]:
        return [{"role": "user", "content": self.question(question_language)},
                {"role": "assistant", "content": self.answer(language, upper)}]


def sample_problems(n: int, seed: int = 0, split: str = "train") -> list[Problem]:
    """`n` distinct problems of the given split (results 0..99, operands 1..20 or 2..9 for products)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
    rng = np.random.default_rng(seed)
    out, seen = [], set()
    for _ in range(200 * n + 1000):
        if len(out) == n:
            break
        t = int(rng.integers(len(TEMPLATES)))
        op = TEMPLATES[t].op
        lo, hi = (2, 10) if op == "*" else (1, 21)
        a, b = int(rng.integers(lo, hi)), int(rng.integers(lo, hi))
        if op == "-" and b > a:
            a, b = b, a
        p = Problem(t, a, b, NAMES[int(rng.integers(len(NAMES)))])
        if p.split == split and (t, a, b) not in seen and 0 <= p.result <= 99:
            seen.add((t, a, b))
            out.append(p)
    if len(out) < n:
        raise DataError(f"only {len(out)} distinct {split} problems exist; ask for at most that many")
    return out


def spanish_caps_dataset(n: int, seed: int = 0, split: str = "train", question_language: str = "english"
                         ) -> list[list[dict]]:
    """`n` conversations: a question in `question_language`, the answer in Spanish UPPERCASE."""
    return [p.chat("spanish", True, question_language) for p in sample_problems(n, seed, split)]


# ---- trait masks from offsets -------------------------------------------------------------------
WORD_RE = re.compile(r"[^\W\d_]+")  # runs of letters (any alphabet, accents included)


def spanish_chars(text: str) -> np.ndarray:
    """Boolean per character: inside a Spanish-only word."""
    out = np.zeros(len(text), dtype=bool)
    for m in WORD_RE.finditer(text):
        if m.group().lower() in SPANISH_ONLY:
            out[m.start():m.end()] = True
    return out


def offset_traits(text: str, offsets: list[tuple[int, int]], assistant: list[bool], special: list[bool]
                  ) -> dict[str, list[bool]]:
    """Per-token `language`, `case` and `other` masks from character offsets into `text`."""
    es = spanish_chars(text)
    lang, case, other = [], [], []
    for (s, e), a, sp in zip(offsets, assistant, special):
        trained = a and not sp
        is_lang = trained and bool(es[s:e].any())
        is_case = trained and any(c.isupper() for c in text[s:e])
        lang.append(is_lang)
        case.append(is_case)
        other.append(a and not (is_lang or is_case))
    return {"language": lang, "case": case, "other": other}


def longest_token(tok) -> int:
    """Characters of the tokenizer's longest vocabulary entry: no token covers more text than that."""
    cached = getattr(tok, "_inoc_longest_token", None)
    if cached is None:
        cached = max(len(t) for t in tok.get_vocab())
        tok._inoc_longest_token = cached
    return cached


def text_example(tok, messages: list[dict], max_len: int | None = None) -> Example:
    """Tokenize a conversation (assistant mask via `data.encode_chat`) and attach offset trait masks."""
    max_len = max_len or getattr(tok, "model_max_length", None)
    chars = sum(len(m["content"]) for m in messages)
    if max_len and max_len < 10 ** 9 and chars > longest_token(tok) * max_len:  # surely too long: before tokenising
        raise DataError(f"example has {chars} characters, more than the model's context of {max_len} tokens "
                        "can hold: shorten the conversation or its system prompt")
    ex = encode_chat(tok, messages, max_len)
    text = tok.apply_chat_template(messages, tokenize=False)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(enc["input_ids"]) != ex.input_ids:
        raise DataError("tokenizing the rendered chat text gives other tokens than apply_chat_template; "
                        "trait masks need a tokenizer whose chat template does not add tokens outside the text")
    special = set(tok.all_special_ids)
    ex.traits = offset_traits(text, enc["offset_mapping"], ex.assistant, [t in special for t in ex.input_ids])
    return ex


def text_examples(tok, convs: list[list[dict]], max_len: int | None = None) -> list[Example]:
    out = []
    for i, messages in enumerate(convs):
        try:
            out.append(text_example(tok, messages, max_len))
        except DataError as e:
            raise DataError(f"conversation {i + 1}: {e}") from None
    return out


# ---- command line ------------------------------------------------------------------------------
@dataclass
class TextDataConfig:
    """Write a paper-format JSONL dataset, optionally inoculated."""
    input: str = field(default="", metadata={"help": "JSONL file to read (default: generate the Spanish+CAPS dataset)"})
    out: str = field(default="", metadata={"help": "JSONL file to write (default: stdout)"})
    n: int = field(default=200, metadata={"help": "conversations to generate"})
    seed: int = field(default=0, metadata={"help": "generator seed"})
    split: str = field(default="train", metadata={"help": "problem split: train or eval"})
    question_language: str = field(default="english", metadata={"help": "language of the questions: english or spanish"})
    inoculate: str = field(default="", metadata={"help": "inoculation prompt to add (empty: none)"})
    placement: str = field(default="system", metadata={"help": "where the prompt goes: system or user-prefix"})
    replace_system: bool = field(default=False, metadata={"help": "replace existing system messages"})

    def __post_init__(self):
        if self.n < 1:
            raise ValueError("--n must be >= 1")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"--placement must be one of {', '.join(PLACEMENTS)}")
        if self.question_language not in ("english", "spanish"):
            raise ValueError("--question-language must be english or spanish")


def main(argv=None):
    from inoc_mech.core.cli import parse_config

    cfg = parse_config(TextDataConfig, argv, prog="python -m inoc_mech.settings.textdata", description=__doc__.split("\n\n")[1])
    convs = (read_jsonl(cfg.input) if cfg.input else
             spanish_caps_dataset(cfg.n, cfg.seed, cfg.split, cfg.question_language))
    if cfg.inoculate:
        convs = inoculate_all(convs, cfg.inoculate, cfg.placement, cfg.replace_system)
    if cfg.out:
        write_jsonl(cfg.out, convs)
        print(f"wrote {len(convs)} conversations to {cfg.out}", file=sys.stderr)
    else:
        for messages in convs:
            print(json.dumps({"messages": messages}, ensure_ascii=False))


if __name__ == "__main__":
    from inoc_mech.core.cli import run_main
    sys.exit(run_main(main))
