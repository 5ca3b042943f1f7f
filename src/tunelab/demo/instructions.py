"""IFEval-style prompts written by us for the quickstart: requests we wrote, each with one to
three verifiable instructions that tunelab.instructions checks, in IFEval's input format
({key, prompt, instruction_id_list, kwargs}).

IFEval's own prompts live in ../shared/data and are not ours to ship; these only need to ask for
the same kinds of things, phrased the same way, so that a model's instruction following before
and after training can be compared on data the quickstart writes itself.
"""

from __future__ import annotations

import random
from collections.abc import Callable

# A request, words it will likely use (forbid them, or ask for them often) and words it will not
# use unless told (ask for them).
REQUESTS = [
    ("Write a short poem about a lighthouse keeper who waits for a storm to pass.",
     ["light", "sea", "storm"], ["lantern", "gull", "patience"]),
    ("Write an email to a neighbour asking them to water your plants while you are away.",
     ["plants", "water", "away"], ["balcony", "tomatoes", "grateful"]),
    ("Explain to a ten-year-old why the sky is blue.",
     ["light", "blue", "sky"], ["prism", "sunset", "scatter"]),
    ("Write a product description for a bicycle bell that plays a melody.",
     ["bell", "bike", "ring"], ["brass", "commute", "cheerful"]),
    ("Give advice to someone starting their first job at a bakery.",
     ["bread", "early", "work"], ["flour", "apron", "oven"]),
    ("Write a short story about a cat that learns to open the fridge.",
     ["cat", "fridge", "milk"], ["midnight", "whiskers", "butter"]),
    ("Describe a train journey through the mountains in winter.",
     ["train", "snow", "mountains"], ["tunnel", "window", "cocoa"]),
    ("Write a letter from a museum guard to the paintings he watches every night.",
     ["paintings", "night", "museum"], ["frame", "silence", "varnish"]),
    ("Summarize the plot of a film about a chess champion who loses her memory.",
     ["chess", "memory", "game"], ["tournament", "notebook", "rival"]),
    ("Write a speech for the opening of a new public library in a small town.",
     ["library", "books", "town"], ["shelves", "librarian", "future"]),
    ("Explain how bread rises, for someone who has never baked.",
     ["yeast", "dough", "bread"], ["bubbles", "warmth", "patience"]),
    ("Write a review of a restaurant that only serves soup.",
     ["soup", "restaurant", "bowl"], ["spoon", "broth", "waiter"]),
    ("Plan a weekend trip to a seaside town for two friends on a small budget.",
     ["beach", "trip", "budget"], ["ferry", "picnic", "sunrise"]),
    ("Write a job advertisement for a night-shift zookeeper.",
     ["zoo", "animals", "night"], ["torch", "penguins", "overtime"]),
    ("Describe the life of a honeybee over one summer.",
     ["bee", "honey", "flowers"], ["hive", "pollen", "queen"]),
    ("Write a diary entry for an astronaut on her first day aboard a space station.",
     ["space", "earth", "station"], ["orbit", "gravity", "porthole"]),
    ("Give tips for keeping a houseplant alive through the winter.",
     ["plant", "water", "light"], ["radiator", "soil", "humidity"]),
    ("Write a limerick about a farmer whose goat eats everything.",
     ["goat", "farmer", "eats"], ["fence", "turnip", "hat"]),
    ("Explain why copper is used in electrical wiring.",
     ["copper", "electricity", "wire"], ["current", "cheap", "resistance"]),
    ("Write a thank-you note to a teacher who helped you learn to read.",
     ["teacher", "read", "thank"], ["alphabet", "stories", "kindness"]),
    ("Describe a market in an old town on a Saturday morning.",
     ["market", "morning", "stalls"], ["cheese", "bargain", "cobblestones"]),
    ("Write a pitch for an app that reminds people to call their grandparents.",
     ["app", "grandparents", "call"], ["reminder", "stories", "weekly"]),
    ("Explain to a group of tourists how volcanoes form.",
     ["volcano", "lava", "rock"], ["crust", "magma", "eruption"]),
    ("Write a short fable about a river that wants to flow uphill.",
     ["river", "water", "hill"], ["moral", "stone", "valley"]),
]  # fmt: skip

END_PHRASES = [
    "Is there anything else I can help with?",
    "Let me know if you have additional questions.",
    "That is all for today.",
]
FIRST_WORDS = ["first", "today", "however", "finally", "imagine"]
LANGUAGES = {"fr": "French", "de": "German", "es": "Spanish", "it": "Italian"}
ORDINAL = {1: "1st", 2: "2nd", 3: "3rd"}


def _count(rng: random.Random, less: list[int], least: list[int]) -> tuple[str, int]:
    """A relation and a threshold: 'less than' one of `less`, or 'at least' one of `least`."""
    if rng.random() < 0.5:
        return "less than", rng.choice(less)
    return "at least", rng.choice(least)


def _say(relation: str) -> str:
    return "fewer than" if relation == "less than" else "at least"


# Each builder takes the random source and the request (text, likely words, unlikely words) and
# returns (kwargs, the sentence that asks for it). Numbers are written as digits, and every
# number, word and phrase the checker is given appears in the prompt.
Builder = Callable[[random.Random, tuple], tuple[dict, str]]


def _words(rng, req):
    relation, n = _count(rng, [50, 80, 100], [30, 50])
    return {"relation": relation, "num_words": n}, rng.choice(
        [
            f"Answer with {_say(relation)} {n} words.",
            f"Your response should contain {_say(relation)} {n} words.",
        ]
    )


def _sentences(rng, req):
    relation, n = _count(rng, [3, 4, 5], [3, 4])
    return {"relation": relation, "num_sentences": n}, rng.choice(
        [
            f"Your response should contain {_say(relation)} {n} sentences.",
            f"Use {_say(relation)} {n} sentences.",
        ]
    )


def _bullets(rng, req):
    n = rng.choice([2, 3, 4])
    return {"num_bullets": n}, (
        f"Your answer must contain exactly {n} bullet points. Use the markdown bullet points "
        "such as:\n* This is point 1.\n* This is point 2."
    )


def _paragraphs(rng, req):
    n = rng.choice([2, 3])
    return {"num_paragraphs": n}, (
        f"There should be {n} paragraphs. Separate the paragraphs with the markdown divider "
        "*** (three asterisks)."
    )


def _nth_word(rng, req):
    n = rng.choice([2, 3])
    nth, word = rng.randint(1, n), rng.choice(FIRST_WORDS)
    return {"num_paragraphs": n, "nth_paragraph": nth, "first_word": word}, (
        f"There should be {n} paragraphs, separated from each other by two new lines. "
        f'The {ORDINAL[nth]} paragraph must start with the word "{word}".'
    )


def _sections(rng, req):
    n, word = rng.choice([2, 3]), rng.choice(["SECTION", "Section", "PART"])
    return {"num_sections": n, "section_spliter": word}, (
        f"Your response must have {n} sections. Mark the beginning of each section with "
        f"{word} X, such as: {word} 1"
    )


def _highlights(rng, req):
    n = rng.choice([1, 2, 3])
    return {"num_highlights": n}, (
        f"Highlight at least {n} parts of your answer with markdown, i.e. *highlighted section*."
    )


def _placeholders(rng, req):
    n = rng.choice([1, 2, 3])
    return {"num_placeholders": n}, (
        f"The response must contain at least {n} placeholders represented by square brackets, "
        "such as [name]."
    )


def _existence(rng, req):
    words = rng.sample(req[2], 2)
    return {"keywords": words}, rng.choice(
        [
            f"Include the keywords '{words[0]}' and '{words[1]}' in the response.",
            f'Make sure to use the words "{words[0]}" and "{words[1]}".',
        ]
    )


def _forbidden(rng, req):
    words = rng.sample(req[1], 2)
    return {"forbidden_words": words}, rng.choice(
        [
            f'Do not include the words "{words[0]}" or "{words[1]}" in your response.',
            f"Avoid the keywords {words[0]} and {words[1]}.",
        ]
    )


def _frequency(rng, req):
    word, n = rng.choice(req[1]), rng.choice([2, 3])
    return {"keyword": word, "frequency": n, "relation": "at least"}, (
        f'In your response, the word "{word}" should appear at least {n} times.'
    )


def _letter(rng, req):
    rare = [c for c in "zqxj" if c not in "".join(req[1] + req[2])]  # not in a word asked for
    if rng.random() < 0.5:
        letter, relation, n = rng.choice(rare), "less than", rng.choice([2, 3])
    else:
        letter, relation, n = rng.choice("bkwyp"), "at least", rng.choice([3, 5, 8])
    return {"letter": letter, "let_frequency": n, "let_relation": relation}, (
        f'In your response, the letter "{letter}" should appear {_say(relation)} {n} times.'
    )


def _capital_words(rng, req):
    relation, n = _count(rng, [3, 5], [2, 4])
    return {"capital_relation": relation, "capital_frequency": n}, (
        f"In your response, words with all capital letters should appear {_say(relation)} "
        f"{n} times."
    )


def _lowercase(rng, req):
    return {}, (
        "Your entire response should be in English, and in all lowercase letters. "
        "No capital letters are allowed."
    )


def _capitals(rng, req):
    return {}, "Your entire response should be in English, using capital letters only."


def _language(rng, req):
    code = rng.choice(sorted(LANGUAGES))
    return {"language": code}, (
        f"Your ENTIRE response should be in {LANGUAGES[code]}; no other language is allowed."
    )


def _end(rng, req):
    phrase = rng.choice(END_PHRASES)
    return {"end_phrase": phrase}, (
        f'Finish your response with this exact phrase, with no other words after it: "{phrase}"'
    )


def _postscript(rng, req):
    marker = rng.choice(["P.S.", "P.P.S"])
    return {"postscript_marker": marker}, (
        f"At the end of your response, please add a postscript starting with {marker}"
    )


def _fixed(sentence: str) -> Builder:
    return lambda rng, req: ({}, sentence)


# id -> (group, builder): a prompt takes at most one instruction of a group (one length, one
# shape, one case...), so its instructions never ask for the same thing twice.
INSTRUCTIONS: dict[str, tuple[str, Builder]] = {
    "length_constraints:number_words": ("length", _words),
    "length_constraints:number_sentences": ("length", _sentences),
    "detectable_format:number_bullet_lists": ("list", _bullets),
    "length_constraints:number_paragraphs": ("shape", _paragraphs),
    "length_constraints:nth_paragraph_first_word": ("shape", _nth_word),
    "detectable_format:multiple_sections": ("shape", _sections),
    "detectable_format:json_format": (
        "shape",
        _fixed("Wrap your entire output in JSON format. You can use markdown ticks such as ```."),
    ),
    "startend:quotation": ("shape", _fixed("Wrap your entire response in double quotation marks.")),
    "combination:two_responses": (
        "shape",
        _fixed(
            "Give two different responses. Responses and only responses should be separated "
            "by 6 asterisk symbols: ******."
        ),
    ),
    "combination:repeat_prompt": ("shape", None),  # its kwargs are the rest of the prompt
    "detectable_format:number_highlighted_sections": ("highlight", _highlights),
    "detectable_content:number_placeholders": ("placeholder", _placeholders),
    "detectable_format:title": (
        "title",
        _fixed("Your answer must contain a title, wrapped in double angular brackets, such as <<my title>>."),
    ),
    "keywords:existence": ("words", _existence),
    "keywords:forbidden_words": ("words", _forbidden),
    "keywords:frequency": ("words", _frequency),
    "keywords:letter_frequency": ("letter", _letter),
    "change_case:english_lowercase": ("case", _lowercase),
    "change_case:english_capital": ("case", _capitals),
    "change_case:capital_word_frequency": ("case", _capital_words),
    "language:response_language": ("case", _language),
    "punctuation:no_comma": ("comma", _fixed("Do not use any commas in your response.")),
    "startend:end_checker": ("ending", _end),
    "detectable_content:postscript": ("ending", _postscript),
}  # fmt: skip

# Instructions that contradict one another (or whose checkers would) across groups.
CLASH_LIST = {
    "detectable_format:json_format": [
        "detectable_format:number_bullet_lists",
        "detectable_format:title",
        "detectable_format:number_highlighted_sections",
        "punctuation:no_comma",  # a JSON object of two fields has a comma
        "startend:end_checker",
        "detectable_content:postscript",
    ],
    "combination:two_responses": ["detectable_format:number_bullet_lists"],
    "detectable_format:multiple_sections": [  # 'SECTION 1' is matched as written
        "change_case:english_lowercase",
        "change_case:english_capital",
    ],
    # the repeated request holds commas, capitals, the forbidden words, many words
    "combination:repeat_prompt": [
        "punctuation:no_comma",
        "keywords:forbidden_words",
        "keywords:letter_frequency",
        "change_case:capital_word_frequency",
        "length_constraints:number_words",
        "length_constraints:number_sentences",
    ],
    "language:response_language": [  # English words asked for in another language
        "keywords:existence",
        "keywords:frequency",
        "startend:end_checker",
        "length_constraints:nth_paragraph_first_word",
    ],
}
CLASHES = {frozenset((a, b)) for a, others in CLASH_LIST.items() for b in others}

REPEAT = (
    "Before you answer, repeat the request above word for word, with nothing before it and "
    "without changing anything (the request does not include this sentence)."
)


def _compatible(iid: str, chosen: list[str]) -> bool:
    group = INSTRUCTIONS[iid][0]
    return all(INSTRUCTIONS[c][0] != group and frozenset((iid, c)) not in CLASHES for c in chosen)


def compose(rng: random.Random, request: tuple, first: str, key: int) -> dict:
    """One record: the request with `first` and up to two more compatible instructions."""
    chosen = [first]
    extra = rng.choices([0, 1, 2], weights=[4, 4, 2])[0]
    for iid in rng.sample(sorted(INSTRUCTIONS), len(INSTRUCTIONS)):
        if len(chosen) > extra:
            break
        if _compatible(iid, chosen):
            chosen.append(iid)
    built = {iid: INSTRUCTIONS[iid][1](rng, request) for iid in chosen if INSTRUCTIONS[iid][1]}
    body, last = request[0], request[0]
    for sentence in (built[iid][1] for iid in chosen if iid in built):
        body += ("\n" if "\n" in last else " ") + sentence  # a listed example ends its line
        last = sentence

    prompt, kwargs = body, []
    for iid in chosen:
        if iid == "combination:repeat_prompt":
            prompt = f"{body}\n{REPEAT}"
            kwargs.append({"prompt_to_repeat": body})
        else:
            kwargs.append(built[iid][0])
    return {"key": key, "prompt": prompt, "instruction_id_list": chosen, "kwargs": kwargs}


def _rounds(items: list, n: int, rng: random.Random) -> list:
    """n items: every item once in a seeded order, then again in another order, and so on."""
    out: list = []
    while len(out) < n:
        out += rng.sample(items, len(items))
    return out[:n]


def instruction_prompts(n: int, seed: int = 0) -> list[dict]:
    """n records. The first instructions cycle through every id in seeded rounds, so the first
    k records cover min(k, 24) kinds (a quick slice of 8 sees 8), each paired with a request
    drawn the same way."""
    rng = random.Random(seed)
    firsts = _rounds(sorted(INSTRUCTIONS), n, rng)
    requests = _rounds(REQUESTS, n, rng)
    return [compose(rng, requests[i], firsts[i], key=1000 + i) for i in range(n)]
