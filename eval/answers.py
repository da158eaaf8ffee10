"""Reading answers out of model replies.

- :func:`parse_choice`: the option letter a free-form reply picks, with the rule that decided it (so the
  unparsed rate and the way answers were read can be reported).
- :func:`mme_realworld_official_letter`: MME-RealWorld's own extraction rule, quirks included, to reproduce
  published numbers.
- :func:`normalize_vqa_answer`: the EvalAI / VQA answer normalisation used by TextVQA's soft accuracy.

The choice parser tries, in order (the first rule that yields exactly one valid letter wins):

1. ``bare``: the whole reply is a letter, optionally bracketed or followed by punctuation: ``B``, ``(b)``, ``B.``.
2. ``statement``: an explicit answer statement: ``The answer is B``, ``Answer: (C) blue``, ``the correct option
   is D``; statements with the word *answer* outrank those with *option* / *choice* / *I choose* / *B is
   correct*; within a rank the last statement wins ("option A is wrong, so the answer is C").
3. ``leading``: the reply starts with a letter and a separator: ``B. red``, ``(B) red``, ``C) ...``, ``D - ...``,
   ``B red``, or with a letter followed by that option's text (``A left``). A leading ``A`` followed by other
   words is an article ("A man is ..."), not a choice; a reply listing several options with their texts
   ("(A) blue (B) red") makes no leading choice.
4. ``parenthesised``: exactly one distinct ``(X)`` / ``[X]`` in the reply.
5. ``option_text``: the reply is, or contains, the text of exactly one option (whole words, case and
   punctuation ignored; an option contained in a longer matching option yields to it).
6. ``standalone``: exactly one distinct valid capital letter standing alone ("It's B, I think"; "答案是B").

Anything else is unparsed (``letter=None``): rule ``ambiguous`` when several letters were candidates, else
``unparsed``. Letters outside the question's options never count.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

DEFAULT_LETTERS = "ABCDE"
_THINK = re.compile(r"<think>.*?</think>", re.S | re.I)
_EMPHASIS = re.compile(r"\*\*|__|`")
_BARE = re.compile(r"[\(\[]?\s*([A-Za-z])\s*[\)\]]?\s*[.:,;!]?")
# A captured letter ``X`` is accepted when bracketed, or when followed by the end, punctuation or a space
# (upper case only for the space: "the answer is B because..." but not "the answer is a red car").
_LETTER = r"(?:[\(\[]\s*([A-Za-z])\s*[\)\]]|([A-Z])(?=$|[\s.,:;!?)\]'\"]|$)|([a-z])(?=$|[.,:;!?)\]'\"]))"
_ANSWER_STATEMENT = re.compile(
    r"(?i:\banswers?\b(?:\s+(?:is|would\s+be|should\s+be|will\s+be|must\s+be|seems\s+to\s+be|=))?"
    r"(?:\s*(?:probably|likely|clearly|definitely))?\s*[:\-=]?\s*(?:(?:option|choice|letter)\s*[:\-]?\s*)?)"
    + _LETTER
)
_OPTION_STATEMENT = re.compile(
    r"(?i:\b(?:option|choice)\b(?:\s+(?:is|would\s+be|should\s+be))?\s*[:\-]?\s*"
    r"|\b(?:choose|chose|pick|select|go\s+with)\s+(?:option\s+|choice\s+)?)" + _LETTER
)
_IS_CORRECT = re.compile(r"(?:[\(\[]([A-Z])[\)\]]|\b([A-Z]))\s+is\s+(?:the\s+)?(?:correct|right|best)\b")
_LEADING = re.compile(r"^[\(\[]?([A-Z])(?:[\)\]]|[.:,;](?!\d)|\s+[-\u2013\u2014]\s|$)")
_LEADING_WORDS = re.compile(r"^([A-Z])\s+(.+)$", re.S)
_LISTED = re.compile(r"(?:^|\s)[\(\[]([A-Z])[\)\]]|(?m:^([A-Z])[.:)])")
_CONNECTIVES = {"and", "or", "nor", "but", "vs", "versus", "is", "was", "seems", "looks", "then", "than"}
_PARENTHESISED = re.compile(r"[\(\[]([A-Z])[\)\]]")
_STANDALONE = re.compile(r"(?<![A-Za-z0-9'])([A-Z])(?![A-Za-z0-9'])")
_WORDS = re.compile(r"[^\w\s]", re.U)


@dataclass(frozen=True)
class ParsedChoice:
    """The letter a reply picks (``None`` when it picks none) and the rule that decided it."""

    letter: str | None
    rule: str

    @property
    def parsed(self) -> bool:
        return self.letter is not None


def option_map(options: Mapping[str, str] | Sequence[str] | None, letters: str | None = None) -> dict[str, str]:
    """``{"A": text, ...}`` from a mapping or a list (lettered A, B, ... in order); ``{}`` for ``None``."""
    if options is None:
        return {}
    if isinstance(options, Mapping):
        return {str(k).strip().upper(): str(v) for k, v in options.items()}
    return {string.ascii_uppercase[i]: str(text) for i, text in enumerate(options)}


def parse_choice(reply: str, options: Mapping[str, str] | Sequence[str] | None = None,
                 letters: str | None = None) -> ParsedChoice:
    """The option letter ``reply`` picks (see the module docstring for the rules).

    Args:
        reply: the model's answer.
        options: the options as ``{"A": "text"}`` or a list of texts; their letters are the valid ones.
        letters: the valid letters when no options are given (default ``ABCDE``).
    """
    opts = option_map(options)
    valid = set(opts) if opts else set(letters or DEFAULT_LETTERS)
    text = _clean(reply)
    if not text:
        return ParsedChoice(None, "unparsed")
    candidates: set[str] = set()
    for rule, finder in _RULES:
        found = finder(text, valid, opts)
        if isinstance(found, str):
            return ParsedChoice(found, rule)
        candidates |= found
    return ParsedChoice(None, "ambiguous" if len(candidates) > 1 else "unparsed")


# --- the rules: each returns the letter it decided, or the set of valid candidates it saw -------------------
def _clean(reply: str) -> str:
    text = _THINK.sub(" ", str(reply or ""))
    text = _EMPHASIS.sub("", text)
    return text.strip().strip("\"'").strip()


def _bare(text: str, valid: set[str], opts: dict[str, str]) -> str | set[str]:
    match = _BARE.fullmatch(text)
    if match and match.group(1).upper() in valid:
        return match.group(1).upper()
    return set()


def _pick_last(matches: list[str], valid: set[str]) -> str | set[str]:
    letters = [m.upper() for m in matches if m.upper() in valid]
    return letters[-1] if letters else set()


def _statement(text: str, valid: set[str], opts: dict[str, str]) -> str | set[str]:
    answer = [next(g for g in m.groups() if g) for m in _ANSWER_STATEMENT.finditer(text)]
    picked = _pick_last(answer, valid)
    if isinstance(picked, str):
        return picked
    other = [(m.start(), next(g for g in m.groups() if g)) for m in _OPTION_STATEMENT.finditer(text)]
    other += [(m.start(), next(g for g in m.groups() if g)) for m in _IS_CORRECT.finditer(text)]
    return _pick_last([letter for _, letter in sorted(other)], valid)


def _leading(text: str, valid: set[str], opts: dict[str, str]) -> str | set[str]:
    listed = _listed_options(text, valid, opts)
    if len(listed) > 1:  # the reply lists several options ("(A) blue (B) red"): no single leading choice
        return listed
    match = _LEADING.match(text)
    if match and match.group(1) in valid:
        return match.group(1)
    match = _LEADING_WORDS.match(text)
    if match and match.group(1) in valid:
        letter, rest = match.group(1), _normalise_words(match.group(2))
        if letter in opts and rest.startswith(_normalise_words(opts[letter])) and _normalise_words(opts[letter]):
            return letter
        if letter not in {"A", "I"}:  # "B red" picks B; "A man ..." is an article
            return letter
    return set()


def _listed_options(text: str, valid: set[str], opts: dict[str, str]) -> set[str]:
    """Letters whose marker is followed by their own option text (an echoed list of options)."""
    listed = set()
    for m in _LISTED.finditer(text):
        letter = m.group(1) or m.group(2)
        if letter not in valid:
            continue
        option = _normalise_words(opts.get(letter, ""))
        if not opts or (option and _normalise_words(text[m.end():]).startswith(option)):
            listed.add(letter)
    return listed


def _parenthesised(text: str, valid: set[str], opts: dict[str, str]) -> str | set[str]:
    found = {m for m in _PARENTHESISED.findall(text) if m in valid}
    return found.pop() if len(found) == 1 else found


def _option_text(text: str, valid: set[str], opts: dict[str, str]) -> str | set[str]:
    if not opts:
        return set()
    reply = _normalise_words(text)
    normalised = {k: _normalise_words(v) for k, v in opts.items() if k in valid}
    exact = [k for k, v in normalised.items() if v and v == reply]
    if len(exact) == 1:
        return exact[0]
    padded = f" {reply} "
    inside = {k: v for k, v in normalised.items() if v and f" {v} " in padded}
    # an option whose text lies inside another matching option's text ("red" in "dark red") yields to it
    kept = {k for k, v in inside.items() if not any(v != w and f" {v} " in f" {w} " for w in inside.values())}
    return kept.pop() if len(kept) == 1 else kept


def _standalone(text: str, valid: set[str], opts: dict[str, str]) -> str | set[str]:
    found = set()
    for m in _STANDALONE.finditer(text):
        letter = m.group(1)
        if letter not in valid:
            continue
        following = re.match(r"\s+([a-z]+)", text[m.end():])
        if letter in {"A", "I"} and following and following.group(1) not in _CONNECTIVES:
            continue  # "A man ..." / "I think ...": an article or a pronoun, not a choice
        found.add(letter)
    return found.pop() if len(found) == 1 else found


_RULES = [
    ("bare", _bare),
    ("statement", _statement),
    ("leading", _leading),
    ("parenthesised", _parenthesised),
    ("option_text", _option_text),
    ("standalone", _standalone),
]


def _normalise_words(text: str) -> str:
    """Lower case, punctuation to spaces, whitespace collapsed."""
    return " ".join(_WORDS.sub(" ", str(text).lower()).split())


# --- MME-RealWorld's official rule --------------------------------------------------------------------------
# The official list is missing two commas, so two pairs of prefixes are glued together and never match on
# their own ("The correct option is", "Best answer:" are not removed). Kept as published.
_MME_PREFIXES = (
    "The best answer is",
    "The correct answer is",
    "The answer is",
    "The answer",
    "The best option is" "The correct option is",
    "Best answer:" "Best option:",
)


def mme_realworld_official_letter(reply: str, choices: Sequence[str]) -> str:
    """The letter MME-RealWorld's official scorer reads from ``reply`` ('' for none).

    Rule: remove the (partly broken) answer prefixes; a reply of more than 10 words without any of A-E is
    unanswered; otherwise the first capital A-E *anywhere* in the reply (so "Based on ..." reads as B);
    failing that, the first choice string (``"(A) text"``) containing the whole reply, lower-cased, gives its
    letter -- which makes an empty reply count as A.
    """
    text = str(reply or "").strip()
    for prefix in _MME_PREFIXES:
        text = text.replace(prefix, "")
    has_letter = re.search(r"[ABCDE]", text)
    if len(text.split()) > 10 and not has_letter:
        return ""
    if has_letter:
        return has_letter.group(0)
    for choice in choices:
        if text.lower() in choice.lower():
            return choice[1] if len(choice) > 1 else ""
    return ""


# --- VQA answer normalisation (EvalAI) ----------------------------------------------------------------------
_VQA_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
                    ",", "?", "!"]
_VQA_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_VQA_ARTICLES = {"a", "an", "the"}
_PERIOD = re.compile(r"\.(?!\d)")
# Canonical contractions; a word equal to one of them with exactly one apostrophe missing is restored
# ("dont" -> "don't", "couldnt've" -> "couldn't've"), which is what the EvalAI table does. Forms the official
# table never restores are left out: "she's"/"let's" (keys only map to themselves), the I-forms (keys in
# capitals, never matched after lower-casing) and "somebody'd" (its entry is reversed).
_CONTRACTIONS = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd "
    "he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't must've "
    "needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've somebody'd've "
    "somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've something'll "
    "that's there'd there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've "
    "we've weren't what'll what're what's what've when's where'd where's where've who'd who'd've who'll who's "
    "who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've "
    "you'll you're you've"
).split()


def _contraction_table() -> dict[str, str]:
    table = {}
    for word in _CONTRACTIONS:
        for i, char in enumerate(word):
            if char == "'":
                table[word[:i] + word[i + 1:]] = word
    return table


VQA_CONTRACTIONS = _contraction_table()


def normalize_vqa_answer(answer: str) -> str:
    """The EvalAI answer normalisation (TextVQA / VQAv2 evaluation):

    lower case; drop ``,`` and ``?``; ``'s`` -> `` 's``; each punctuation mark of the VQA list is deleted when
    it touches a space in the answer and replaced by a space otherwise; periods not followed by a digit are
    deleted (at most 32, as in the reference, which passes ``re.UNICODE`` as the count); number words
    ``none``/``zero``..``ten`` become digits; articles are dropped; contractions get their apostrophes back.
    """
    text = str(answer).lower().replace(",", "").replace("?", "").replace("'s", " 's")
    text = text.replace("\n", " ").replace("\t", " ").strip()
    original = text
    for mark in _VQA_PUNCTUATION:
        touching = f"{mark} " in original or f" {mark}" in original
        text = text.replace(mark, "" if touching else " ")
    text = _PERIOD.sub("", text, count=32)
    words = [_VQA_NUMBERS.get(w, w) for w in text.split()]
    words = [VQA_CONTRACTIONS.get(w, w) for w in words if w not in _VQA_ARTICLES]
    return " ".join(words)


# --- the official extraction rules of other scorers ---------------------------------------------------------
# Each reproduces one published function's behaviour, quirks included; the docstring names the source and
# docs/evaluation.md the commit it was read at.
_VSTAR_PATTERNS = (
    re.compile(r"^([A-D])\s*[.)\]]*"),  # the reply starts with A-D (after upper-casing: "A man" and "Answer" too)
    re.compile(r"(?:THE\s+)?(?:ANSWER|CHOICE|OPTION)(?:\s+IS)?[\s:]+([A-D])"),
    re.compile(r"\(([A-D])\)"),
    re.compile(r"([A-D])\s*(?:\.|\)|])"),  # any A-D before ".", ")" or "]" ("IS RED." reads as D)
    re.compile(r"(?:^|\s)([A-D])(?:\s|$)"),
)


def lmms_eval_vstar_letter(reply: str) -> str | None:
    """The letter lmms-eval's ``vstar_bench`` task reads (``extract_answer_letter`` in
    ``lmms_eval/tasks/vstar_bench/utils.py``), or ``None``.

    The reply is stripped and upper-cased first, so every rule sees capitals: a reply starting with A-D gives
    that letter ("Answer: C" and "A man ..." read as A, "Based ..." as B, "Dark red" as D); then "ANSWER /
    CHOICE / OPTION (IS) X"; then "(X)"; then the first A-D followed by ``.``, ``)`` or ``]`` anywhere ("the
    car is red." reads as D); then a standalone A-D; then a reply whose only A-D character is one letter.
    Only A-D count, whatever the question's options are.
    """
    text = str(reply).strip().upper()
    for pattern in _VSTAR_PATTERNS:
        match = pattern.search(text)
        if match:
            return match.group(1)
    letters = re.findall(r"[A-D]", text)
    return letters[0] if len(letters) == 1 else None


_VLMEVALKIT_REJECTIONS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
                          "I'm sorry, but without the image provided", "Cannot determine the answer")
_VLMEVALKIT_VERBOSE = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")


def vlmevalkit_can_infer(reply: str, options: Mapping[str, str]) -> str | None:
    """The option VLMEvalKit's exact matching reads (``can_infer`` in ``vlmeval/utils/matching_util.py``):
    a letter of ``options``, ``"Z"`` (refused / "Z" answered) or ``None``.

    Letter step: ``.()[],:;!*#{}`` become spaces and the reply is split on whitespace; when exactly one of the
    option letters is a token (case-sensitive: a lower-case "b" is not one) and its first occurrence is among
    the last 4 tokens, that letter; no letter token but a "Z" token gives Z; then "(correct) answer is X"
    (any case, A-D). Text step: the reply, lower-cased and at most twice as long as all option texts together,
    contains exactly one option text (lower-cased, as a substring).
    """
    answer = str(reply)
    if "Failed to obtain answer via API" in answer:  # no letter step; the text step still runs
        return _vlmevalkit_text(answer.lower(), options)
    if any(err in answer for err in _VLMEVALKIT_REJECTIONS):
        return "Z"
    tokens = re.sub(r"[.()\[\],:;!*#{}]", " ", answer).split()
    present = [letter for letter in options if letter in tokens]
    if len(present) == 1 and tokens.index(present[0]) > len(tokens) - 5:
        return present[0]
    if not present and "Z" in tokens:
        return "Z"
    verbose = _VLMEVALKIT_VERBOSE.search(answer)
    if verbose and verbose.group(1).upper() in options:
        return verbose.group(1).upper()
    return _vlmevalkit_text(answer.lower(), options)


def _vlmevalkit_text(answer: str, options: Mapping[str, str]) -> str | None:
    if len(answer) > 2 * sum(len(str(v)) for v in options.values()):
        return None
    texts = {k: str(v).lower() for k, v in options.items()}
    found = [k for k, v in texts.items() if v in answer]
    return found[0] if len(found) == 1 else None


_MCQ_PHRASES = ("the answer is", "answer is", "the correct answer is", "correct answer is", "the best answer is",
                "best answer is", "the correct option is", "correct option is", "the best option is",
                "best option is", "the choice is", "choice is", "the correct choice is", "correct choice is",
                "i choose", "i select", "i pick", "my answer is", "my choice is", "옵션", "정답은", "답은", "답:",
                "答案是", "答案为", "选", "答えは")
_MCQ_MARKS = (("({})", 6), ("{}.", 5), ("{}:", 4), ("{})", 3), ("{} ", 2))


def lmms_eval_mcq_letter(reply: str, letters: str = "ABCDEFGH") -> str:
    """The letter of lmms-eval's shared extractor (``extract_mcq_answer`` in
    ``lmms_eval/tasks/_task_utils/mcq_extract.py``), or ``""``.

    Every way a letter can appear is a candidate with a priority: the reply starts with the letter (not
    followed by a letter) 10, ends with it 9, after an answer phrase ("the answer is", "I choose", ...) 7,
    ``(X)`` 6, ``X.`` 5, ``X:`` 4, ``X)`` 3, ``X `` 2; without any, the last occurrence of a letter anywhere
    0. The highest priority wins, then the later position. Case-sensitive except for the phrases.
    """
    if not reply or not str(reply).strip():
        return ""
    text = str(reply).strip()
    for char in ",.!?;:'\"":
        text = text.strip(char)
    text = f" {text} "
    candidates = []
    for mark, priority in _MCQ_MARKS:
        candidates += [(priority, text.rfind(mark.format(c)), c) for c in letters if mark.format(c) in text]
    lower = text.lower()
    for phrase in _MCQ_PHRASES:
        at = lower.find(phrase)
        if at != -1:
            after = at + len(phrase)
            candidates += [(7, text.find(c, after), c) for c in letters if text.find(c, after) != -1]
    stripped = text.strip()
    for c in letters:
        if stripped.startswith(c) and (len(stripped) == 1 or not stripped[1].isalpha()):
            candidates.append((10, 0, c))
        if stripped.endswith(c) and (len(stripped) == 1 or not stripped[-2].isalpha()):
            candidates.append((9, len(text) - 1, c))
    if not candidates:
        candidates = [(0, text.rfind(c), c) for c in letters if c in text]
    return max(candidates, key=lambda cand: (cand[0], cand[1]))[2] if candidates else ""


_NUMBER_WORDS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                 "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_QUESTION_CHOICE = re.compile(r"\b([A-Z])\.\s+([^\n]*)")


def realworldqa_legacy_prediction(reply: str, question: str) -> str:
    """What lmms-eval's former ``realworldqa`` filters made of a reply (its ``flexible-extract`` filter list:
    ``NumberWordsToDigitsFilter`` then ``MultiChoiceRegexFilter``, ``lmms_eval/tasks/realworldqa/utils.py``
    before commit 9ca4445), which was then compared with the answer lower-cased and stripped of a final ".".

    A reply that is a number word becomes its digit; punctuation is removed; the option texts listed in
    the question as ``X. text`` lines are searched in the cleaned reply (case-sensitive substrings, in
    listing order at each position, so "Not sure" contains the option "No"); a found text gives the letter
    of its line counted from A, else the cleaned reply is the prediction.
    """
    text = str(reply)
    text = _NUMBER_WORDS.get(text.lower(), text)
    cleaned = re.sub(r"[^\w\s]", "", text).strip()
    letters: dict[str, str] = {}
    for i, (_, choice) in enumerate(_QUESTION_CHOICE.findall(str(question))):
        letters[choice.strip()] = chr(ord("A") + i)
    if not letters:
        return cleaned
    match = re.search("|".join(re.escape(t) for t in letters), cleaned)
    return letters[match.group()] if match and match.group() in letters else cleaned
