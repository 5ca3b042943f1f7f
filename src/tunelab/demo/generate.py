"""Demo data written by us for the quickstart study: movie plots, labelled reviews, general
English, preference pairs and IFEval-style prompts (demo/instructions.py), generated from small
grammars with a fixed seed.

Real data lives in ../shared/data (IMDB, Wikipedia plots); these files only need to be
plausible enough that continued pretraining, sentiment and DPO each have something to learn.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tunelab.demo.instructions import instruction_prompts

FILES = (
    "plots.txt",
    "plots_test.txt",
    "general.txt",
    "reviews_train.jsonl",
    "reviews_test.jsonl",
    "preferences.jsonl",
    "instructions.jsonl",
)

HEROES = [
    "a retired lighthouse keeper",
    "a young courier",
    "an exiled chess champion",
    "a small-town detective",
    "a disgraced surgeon",
    "an estranged sister",
    "a travelling magician",
    "a rookie astronaut",
    "an aging boxer",
    "a shy librarian",
    "a former smuggler",
    "a stubborn farmer",
    "a teenage hacker",
    "a widowed baker",
]
PLACES = [
    "on a windswept island",
    "in a crowded city of the near future",
    "in a mining town",
    "aboard a failing space station",
    "in post-war Vienna",
    "in a desert border town",
    "in a snowbound mountain village",
    "along the Mississippi",
    "in a haunted hotel",
    "in 1920s Shanghai",
    "on a fishing trawler",
    "in a sprawling suburb",
]
INCIDENTS = [
    "finds a letter that predicts the future",
    "is mistaken for a spy",
    "inherits a debt to a dangerous family",
    "witnesses a murder no one believes",
    "discovers a map hidden in an old piano",
    "loses a bet with a powerful rival",
    "is asked to guard a mysterious child",
    "uncovers a forged painting",
]
TURNS = [
    "As storms cut off the roads,",
    "When an old friend returns,",
    "After a betrayal at a wedding,",
    "Chased through flooded tunnels,",
    "With the police closing in,",
    "During a week-long festival,",
]
ACTS = [
    "must decide whom to trust",
    "reopens a quarrel with the past",
    "forms an unlikely alliance with a rival",
    "races to expose the truth",
    "plans one last impossible heist",
    "learns the cost of an old promise",
]
ENDS = [
    "The film ends with a quiet reconciliation.",
    "In the final act, the truth comes out.",
    "A last confrontation leaves the town changed.",
    "The story closes on an open question.",
    "Everything is settled in a tense courtroom.",
    "A sacrifice saves those left behind.",
]

GOOD = [
    "a triumph",
    "wonderful",
    "moving and funny",
    "beautifully shot",
    "gripping from start to finish",
    "a joy to watch",
    "brilliant",
    "superbly acted",
    "heartfelt",
    "unforgettable",
]
BAD = [
    "a mess",
    "painfully dull",
    "boring and predictable",
    "badly acted",
    "a waste of time",
    "tedious",
    "clumsy",
    "forgettable",
    "lifeless",
    "an absolute disaster",
]
PARTS = [
    "The acting",
    "The script",
    "The soundtrack",
    "The ending",
    "The pacing",
    "The direction",
    "The cast",
    "The dialogue",
    "The photography",
    "The story",
]
# The verdict decides the label. Plain ones say it outright; most say it the way real reviews
# do, through what the writer did or would do, or a score, which a classifier learns from the
# training reviews but a prompted model has to infer.
VERDICT = {
    1: ["I loved it.", "Highly recommended.", "Ten out of ten."],
    0: ["I hated it.", "Avoid this one.", "Two out of ten."],
}
SUBTLE = {
    1: ["Time flew by.", "I am buying the DVD.", "It stayed with me for days.", "Eight out of ten.",
        "Worth every penny.", "I would go again tomorrow.", "I left smiling.",
        "My friends are tired of hearing about it.", "Seven out of ten.",
        "On balance, it works.", "Flawed, but worth your evening."],
    0: ["I checked my watch twice.", "I want those two hours back.", "Four out of ten.",
        "I fell asleep halfway through.", "Save your money.", "It felt twice as long as it was.",
        "I will have forgotten it by Friday.", "I left disappointed.", "Three out of ten.",
        "On balance, it does not work.", "A few nice moments, but not worth your evening."],
}  # fmt: skip

TOPICS = [
    "The river floods every spring, and farmers plant after the water recedes.",
    "Bread rises because yeast turns sugar into gas that the dough traps.",
    "The committee met on Tuesday to discuss the new budget for the library.",
    "Copper conducts electricity well, which is why it is used in wiring.",
    "Most birds migrate along the same routes each year, guided by the stars.",
    "The recipe asks for two eggs, a cup of flour and a pinch of salt.",
    "Trains from the capital leave every hour and take about three hours.",
    "Photosynthesis lets plants turn light, water and carbon dioxide into sugar.",
    "The museum reopened after repairs to its roof and heating system.",
    "A healthy diet includes vegetables, whole grains and enough water.",
    "The old bridge was replaced by a wider one with a cycle lane.",
    "Volcanoes form where molten rock escapes through cracks in the crust.",
]


def plots(n: int, rng: random.Random) -> list[str]:
    out = []
    for _ in range(n):
        hero, place = rng.choice(HEROES), rng.choice(PLACES)
        out.append(
            f"{hero[0].upper()}{hero[1:]} {place} {rng.choice(INCIDENTS)}. "
            f"{rng.choice(TURNS)} the hero {rng.choice(ACTS)}. {rng.choice(ENDS)}"
        )
    return out


def review(label: int, rng: random.Random) -> str:
    """A review whose verdict (last sentence) decides the label, after a plot sentence and
    remarks on three parts that only lean toward it (each agrees with the verdict 60% of the
    time, a fifth said through a negation, 'far from tedious'), so that the words of the review
    mislead often and the verdict is usually indirect, as in real reviews."""
    parts = rng.sample(PARTS, 3)

    def said(part: str, good: bool) -> str:
        if rng.random() < 0.2:  # the opposite word, negated
            return (
                f"{part} is {'far from' if good else 'hardly'} {rng.choice(BAD if good else GOOD)}."
            )
        return f"{part} is {rng.choice(GOOD if good else BAD)}."

    sentences = [said(p, bool(label) if rng.random() < 0.6 else not label) for p in parts]
    verdict = rng.choice(VERDICT[label] if rng.random() < 0.2 else SUBTLE[label])
    hero, place = rng.choice(HEROES), rng.choice(PLACES)
    return " ".join(
        [f"I saw this film about {hero} {place}, who {rng.choice(INCIDENTS)}.", *sentences, verdict]
    )


def preference(rng: random.Random) -> dict:
    """A question about a film; chosen answers politely and on topic, rejected rambles or sneers."""
    hero, place = rng.choice(HEROES), rng.choice(PLACES)
    prompt = f"In one sentence, what is a film about {hero} {place} likely to be about?"
    chosen = f"It probably follows {hero} who {rng.choice(INCIDENTS)} and {rng.choice(ACTS)}."
    rejected = rng.choice(
        [
            "Who cares, films like that are all the same.",
            f"I don't know. {rng.choice(TOPICS)}",
            "That is a stupid question, look it up yourself.",
        ]
    )
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def write_demo_data(out: str | Path, seed: int = 0, n: int = 300) -> dict[str, Path]:
    """Write plots.txt (train), plots_test.txt, general.txt, reviews_{train,test}.jsonl,
    preferences.jsonl and instructions.jsonl (IFEval's input format) to out."""
    out, rng = Path(out), random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    shipped = (Path(__file__).parent / "plots.txt").read_text().strip()
    files = {name: out / name for name in FILES}
    files["plots.txt"].write_text(shipped + "\n\n" + "\n\n".join(plots(n, rng)) + "\n")
    files["plots_test.txt"].write_text("\n\n".join(plots(n // 6, rng)) + "\n")
    general = [" ".join(rng.sample(TOPICS, 4)) for _ in range(n // 3)]
    files["general.txt"].write_text("\n\n".join(general) + "\n")
    for name, count in (("reviews_train.jsonl", n), ("reviews_test.jsonl", n // 3)):
        with open(files[name], "w") as f:
            for i in range(count):
                label = rng.randrange(2)
                row = {
                    "id": f"{name.split('_')[1][:-6]}-{i}",
                    "review": review(label, rng),
                    "sentiment": ["negative", "positive"][label],
                }
                f.write(json.dumps(row) + "\n")
    with open(files["preferences.jsonl"], "w") as f:
        for _ in range(n // 3):  # DPO's reference pass covers them all: keep the set small
            f.write(json.dumps(preference(rng)) + "\n")
    with open(files["instructions.jsonl"], "w") as f:  # its own seeded draws: the files above
        for record in instruction_prompts(n // 5, seed):  # stay as they were before it
            f.write(json.dumps(record) + "\n")
    return files
