"""Word lists, question templates and the closed vocabulary of the synthetic tasks.

Every question is lowercase, words are separated by single spaces and the
question ends with the separate token ``"?"``, so ``question.split()`` is a
complete tokenization.  Answers are always exactly one vocabulary token.
"""

from __future__ import annotations

import string

COLOR_NAMES: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange", "black")
SHAPE_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond")
SHAPE_PLURALS: dict[str, str] = {name: name + "s" for name in SHAPE_NAMES}

# Short, concrete nouns: answers of `ocr`, word values of `docs`, bar labels of `charts`.
WORDS: tuple[str, ...] = (
    "ant", "apple", "bear", "bell", "bike", "bird", "boat", "book", "bread", "cake",
    "camel", "card", "chair", "cloud", "coat", "corn", "cow", "crab", "deer", "desk",
    "door", "drum", "duck", "eagle", "farm", "fish", "flag", "fox", "frog", "gate",
    "ghost", "goat", "grape", "hat", "horse", "house", "iron", "jam", "king", "kite",
    "lamp", "leaf", "lemon", "lion", "map", "milk", "moon", "mouse", "nest", "night",
    "nut", "ocean", "olive", "owl", "paint", "pear", "pen", "piano", "pig", "pipe",
    "plane", "plum", "pond", "queen", "rain", "river", "road", "robot", "rock", "rope",
    "rose", "salt", "sand", "ship", "shoe", "snow", "sock", "soup", "spoon", "stone",
    "sugar", "sun", "table", "tea", "tent", "tiger", "toast", "tower", "train", "tree",
    "truck", "tulip", "vase", "wall", "whale", "wheel", "wind", "wolf", "wood", "zebra",
)

# Bar labels must fit under a bar of a 6-bar chart, hence at most 4 letters.
CHART_LABELS: tuple[str, ...] = tuple(w for w in WORDS if len(w) <= 4)

# Document keys whose values are words versus numbers.
DOC_WORD_KEYS: tuple[str, ...] = ("name", "city", "item", "code", "team", "pet")
DOC_NUMBER_KEYS: tuple[str, ...] = ("total", "age", "room", "price", "score", "level")
DOC_KEYS: tuple[str, ...] = DOC_WORD_KEYS + DOC_NUMBER_KEYS

# Numbers used as document values (digits 0..9 double as counting/chart answers).
NUMBERS: tuple[str, ...] = tuple(str(i) for i in range(100))

YES, NO = "yes", "no"

# Question templates; placeholders are filled with words from the lists above.
TEMPLATES: dict[str, str] = {
    "scene_color": "what color is the {shape} ?",
    "scene_relation": "is the {color1} {shape1} {direction} of the {color2} {shape2} ?",
    "scene_neighbor": "what shape is {direction} of the {color} {shape} ?",
    "pope": "is there {article} {color} {shape} in the image ?",
    "counting": "how many {shapes} are there ?",
    "ocr": "what word is written in the image ?",
    "docs": "what is the {key} ?",
    "chart_value": "what is the value of {label} ?",
    "chart_tallest": "which bar is the tallest ?",
    "chart_compare": "is {label1} higher than {label2} ?",
}

# Words that only ever fill template placeholders.
_FILLERS: tuple[str, ...] = ("left", "right", "a", "an")


def tokenize(text: str) -> list[str]:
    """Split a question or answer into vocabulary tokens.

    Lowercases, detaches every ``"?"`` into its own token and splits on
    whitespace, so ``tokenize("What is it?") == ["what", "is", "it", "?"]``.
    """
    return text.lower().replace("?", " ? ").split()


def vocabulary() -> list[str]:
    """Return every token that can occur in a synthetic question or answer.

    The list is sorted, has no duplicates, is lowercase and includes the
    punctuation token ``"?"``.  Digits and the numbers ``"10"``..``"99"`` are
    tokens of their own.
    """
    words: set[str] = set()
    for template in TEMPLATES.values():
        # Literal words of the template; placeholders are covered by the lists below.
        words.update(tok for tok in template.split() if not tok.startswith("{"))
    words.update(_FILLERS)
    words.update(COLOR_NAMES)
    words.update(SHAPE_NAMES)
    words.update(SHAPE_PLURALS.values())
    words.update(WORDS)
    words.update(CHART_LABELS)
    words.update(DOC_KEYS)
    words.update(NUMBERS)
    words.update((YES, NO))
    return sorted(words)


_TRAILING = string.punctuation + " \t\r\n"


def normalize_answer(text: str) -> str:
    """Normalize an answer for comparison: lowercase, strip whitespace and trailing punctuation.

    ``normalize_answer("  Yes. ") == "yes"``.
    """
    return text.strip().lower().rstrip(_TRAILING).strip()


def is_correct(prediction: str, answer: str) -> bool:
    """Return whether ``prediction`` equals ``answer`` exactly after :func:`normalize_answer`."""
    return normalize_answer(prediction) == normalize_answer(answer)
