"""The ranker's prompt: the paper's instruction with chain-of-thought steps, as token ids plus soft slots.

The template (``prompts/ranker_<version>.txt``) is rendered through the tokenizer's chat template
once, with a sentinel in place of every field and soft-token marker. That fixes the constant text
pieces; a prompt is then the concatenation of constant pieces (tokenised once), field values
(tokenised once per distinct string and cached) and *slots* where soft embeddings go. The same
function builds training and test prompts, so the template can never differ between them.

A prompt has two parts: the user part (profile, temporal preference summary, evolution step, recent
items, user state), shared by every candidate of that user and encoded once, and the target part
(item text, image, item state, item analysis, match, answer cue), one per candidate.

Ablation switches drop whole lines: without chain-of-thought the ``Step`` lines go, without soft
tokens the ``Collaborative ...`` lines go, without images the ``<image>`` slot is empty, and without
temporal summaries the preference reads "unknown".
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field

from recbole_mllm.stages.prompts import PromptTemplate

SOFT_MARKERS = ("user_state", "image", "item_state", "match_state")
_SENTINEL = "\u2063{}\u2063"  # invisible separator around names: cannot occur in data text
_PIECE = re.compile("\u2063([a-z_]+)\u2063")
_SPLIT = "split_here"


@dataclass
class PromptPiece:
    """One piece of a prompt part: constant token ids, a field to fill, or a soft slot."""

    kind: str  # "const" | "field" | "soft"
    value: object  # token ids (const) or a field / marker name


@dataclass
class PromptLayout:
    """The two prompt parts as piece lists, plus the answer token ids."""

    user: list = field(default_factory=list)
    target: list = field(default_factory=list)
    yes_id: int = -1
    no_id: int = -1


def _keep_line(line: str, use_cot: bool, use_soft_tokens: bool, use_rank: bool) -> bool:
    if not use_cot and line.startswith("Step "):
        return False
    if not use_soft_tokens and line.startswith("Collaborative"):
        return False
    if not use_rank and line.startswith("Retrieval"):
        return False
    return True


def _section(template: PromptTemplate, name: str, use_cot: bool, use_soft_tokens: bool, use_rank: bool) -> str:
    lines = [line for line in template.sections[name].splitlines()
             if _keep_line(line, use_cot, use_soft_tokens, use_rank)]
    text = "\n".join(lines)
    if not use_soft_tokens:
        text = text.replace(" <match_state>", "")
    for marker in SOFT_MARKERS:
        text = text.replace(f"<{marker}>", _SENTINEL.format(marker))
    return re.sub(r"\{([a-z_]+)\}", lambda m: _SENTINEL.format(m.group(1)), text)


LIST_SECTIONS = ("system", "user", "line", "question", "assistant", "options")
"""Sections a list-wise template must have."""


def check_template(template: PromptTemplate, listwise: bool, use_rank: bool = True):
    """The checks of a ranker template that need no tokenizer, so a wrong ``ranker_prompt`` fails with the config
    (``MLLMSRec.check_config``), before the stages run, as well as when the layout is built."""
    if listwise:
        missing = [name for name in LIST_SECTIONS if name not in template.sections]
        if missing:
            raise ValueError(f"ranker_scoring: listwise needs a list prompt (ranker_prompt: list_v1); {template.name!r} "
                             f"has no [{'], ['.join(missing)}] section")
    elif not use_rank and not any(line.startswith("Retrieval")
                                  for line in template.sections.get("target", "").splitlines()):
        raise ValueError("ranker_use_rank: False needs a prompt whose rank has a line of its own (ranker_prompt: v3)")


def build_layout(template: PromptTemplate, tokenizer, use_cot=True, use_soft_tokens=True, use_rank=True) -> PromptLayout:
    """Render ``template`` through ``tokenizer``'s chat template into a :class:`PromptLayout`.

    ``use_rank=False`` drops the "Retrieval" line (the encoder's rank of the target); a template without one
    (v1, v2: the rank sits in the "Collaborative" line) cannot drop it alone, which is an error.
    """
    check_template(template, listwise=False, use_rank=use_rank)
    user = _section(template, "user", use_cot, use_soft_tokens, use_rank)
    target = _section(template, "target", use_cot, use_soft_tokens, use_rank)
    messages = [{"role": "system", "content": template.sections["system"]},
                {"role": "user", "content": f"{user}\n{_SENTINEL.format(_SPLIT)}{target}"}]
    chat = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    chat += template.sections["assistant"]
    user_text, split, target_text = chat.partition(_SENTINEL.format(_SPLIT))
    if not split:
        raise ValueError("the tokenizer's chat template dropped the user message; cannot build ranker prompts")

    yes = tokenizer(template.sections["yes"].strip("\n"), add_special_tokens=False).input_ids
    no = tokenizer(template.sections["no"].strip("\n"), add_special_tokens=False).input_ids
    if not yes or not no or yes[0] == no[0]:
        raise ValueError(f"the answers {template.sections['yes']!r} / {template.sections['no']!r} do not start "
                         f"with distinct tokens in this tokenizer")
    return PromptLayout(_pieces(user_text, tokenizer), _pieces(target_text, tokenizer), yes[0], no[0])


def _pieces(text, tokenizer):
    """Constant token ids, fields and soft slots of one rendered part, in order."""
    out = []
    for i, part in enumerate(_PIECE.split(text)):
        if i % 2 == 0:
            if part:
                out.append(PromptPiece("const", tokenizer(part, add_special_tokens=False).input_ids))
        else:
            out.append(PromptPiece("soft" if part in SOFT_MARKERS else "field", part))
    return out


OPTION_LETTERS = string.ascii_uppercase + string.ascii_lowercase
"""The options of a list-wise prompt: the letter of each listed item, in list order, A to Z and then a to z, so a list
holds up to 52 items (``rerank_top_k`` ≤ 52). Each must start with a token of its own (``build_list_layout`` checks):
digits do not, "12" is two tokens in SmolLM2's tokenizer, and the verbalizer scores one token per option."""


@dataclass
class ListLayout:
    """A list-wise prompt as piece lists: the user part, one candidate line, the tail after the list (the question,
    the end of the user turn and the answer cue), and the token id of each option letter."""

    user: list = field(default_factory=list)
    line: list = field(default_factory=list)
    tail: list = field(default_factory=list)
    option_ids: list = field(default_factory=list)


def build_list_layout(template: PromptTemplate, tokenizer, n_options: int, use_cot=True,
                      use_soft_tokens=True) -> ListLayout:
    """Render a list-wise ``template`` (sections ``line``, ``question``, ``options``) into a :class:`ListLayout` for
    lists of at most ``n_options`` items (``rerank_top_k``), each option scored by the first token of its answer."""
    check_template(template, listwise=True)
    if not 1 <= n_options <= len(OPTION_LETTERS):
        raise ValueError(f"rerank_top_k: a list-wise prompt letters at most {len(OPTION_LETTERS)} items, got {n_options}")
    user, line, question = (_section(template, name, use_cot, use_soft_tokens, True)
                            for name in ("user", "line", "question"))
    if not use_soft_tokens:  # a line keeps its item, without the item's soft token
        line = line.replace(" " + _SENTINEL.format("item_state"), "")
    first, second = _SENTINEL.format(_SPLIT), _SENTINEL.format(_SPLIT + "_tail")
    messages = [{"role": "system", "content": template.sections["system"]},
                {"role": "user", "content": f"{user}\n{first}{line}\n{second}{question}"}]
    chat = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    chat += template.sections["assistant"]
    user_text, split, rest = chat.partition(first)
    line_text, split_tail, tail_text = rest.partition(second)
    if not split or not split_tail:
        raise ValueError("the tokenizer's chat template dropped the user message; cannot build ranker prompts")
    option_ids = _option_ids(tokenizer, template.sections["options"].strip("\n"), OPTION_LETTERS[:n_options])
    if option_ids is None:
        raise ValueError(f"the options {template.sections['options']!r} do not start with distinct tokens for the "
                         f"options {OPTION_LETTERS[0]} to {OPTION_LETTERS[n_options - 1]} in this tokenizer")
    return ListLayout(_pieces(user_text, tokenizer), _pieces(line_text, tokenizer), _pieces(tail_text, tokenizer),
                      option_ids)


def _option_ids(tokenizer, pattern, letters):
    """The first token of each option's answer, ``pattern`` (``{option}`` is its letter) tokenized; where those are not
    distinct (a tokenizer that splits " A" into a space and a letter), the first token of the bare answer (``pattern``
    without its surrounding spaces); None when neither is."""
    for text in dict.fromkeys((pattern, pattern.strip())):
        ids = [tokenizer(text.format(option=letter), add_special_tokens=False).input_ids[:1] for letter in letters]
        if all(ids) and len({first for first, in ids}) == len(letters):
            return [first for first, in ids]
    return None


@dataclass(frozen=True)
class SoftSlot:
    """One soft embedding inside a field's value, e.g. a recent item's encoder state right after its title."""

    name: str


class PieceTokenizer:
    """Tokenises field values once per distinct string (item texts, titles and match lines repeat a lot)."""

    def __init__(self, tokenizer, max_cache: int = 500_000):
        self.tokenizer = tokenizer
        self.cache: dict = {}
        self.max_cache = max_cache

    def __call__(self, text: str, max_tokens: int | None = None) -> list:
        key = (text, max_tokens)
        ids = self.cache.get(key)
        if ids is None:
            ids = self.tokenizer(text, add_special_tokens=False).input_ids
            if max_tokens is not None:
                ids = ids[:max_tokens]
            if len(self.cache) < self.max_cache:
                self.cache[key] = ids
        return ids


def assemble(pieces, values: dict, soft_sizes: dict, tokenize: PieceTokenizer, max_field_tokens: dict):
    """Token ids of one prompt part and the positions of each soft slot.

    Returns ``(ids, slots)``: ``slots[name]`` is the list of positions (in ``ids``) to fill with that
    marker's soft embeddings; a soft marker of size 0 leaves no position at all. A field's value is a string, or a
    list of strings and :class:`SoftSlot` s (each string tokenised on its own, each slot one position, in order).
    """
    ids, slots = [], {}
    for piece in pieces:
        if piece.kind == "const":
            ids.extend(piece.value)
        elif piece.kind == "field":
            value = values[piece.value]
            for segment in value if isinstance(value, list) else [str(value)]:
                if isinstance(segment, SoftSlot):
                    slots.setdefault(segment.name, []).append(len(ids))
                    ids.append(0)
                else:
                    ids.extend(tokenize(segment, max_field_tokens.get(piece.value)))
        else:
            size = soft_sizes.get(piece.value, 0)
            slots[piece.value] = list(range(len(ids), len(ids) + size))
            ids.extend([0] * size)
    return ids, slots
