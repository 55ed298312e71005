"""The small world the demo model knows: a few hundred plain English facts, as tables.

Both build scripts read this file:
  * build_demo_model.py pretrains the shipped model on plain sentences stating EVERY fact
    (several phrasings each, plus scripts/demo_corpus/general.txt);
  * build_demo_data.py writes the instruction data: questions about MOST facts (train split)
    and questions about the rest (held out; the demo asks them before and after fine-tuning).

So fine-tuning teaches the format (question -> one-sentence answer, then stop), and the held-out
questions show that the format unlocks facts the model saw only as plain text in pretraining.
Everything here is deterministic: the same seed gives the same corpus and the same split.
"""
from __future__ import annotations

import random
from pathlib import Path

GENERAL_TEXT = Path(__file__).with_name("demo_corpus") / "general.txt"

# country, capital, continent, language
COUNTRIES = [
    ("France", "Paris", "Europe", "French"), ("Germany", "Berlin", "Europe", "German"),
    ("Italy", "Rome", "Europe", "Italian"), ("Spain", "Madrid", "Europe", "Spanish"),
    ("Portugal", "Lisbon", "Europe", "Portuguese"), ("Greece", "Athens", "Europe", "Greek"),
    ("Poland", "Warsaw", "Europe", "Polish"), ("Sweden", "Stockholm", "Europe", "Swedish"),
    ("Norway", "Oslo", "Europe", "Norwegian"), ("Finland", "Helsinki", "Europe", "Finnish"),
    ("Denmark", "Copenhagen", "Europe", "Danish"), ("Austria", "Vienna", "Europe", "German"),
    ("Hungary", "Budapest", "Europe", "Hungarian"), ("Ireland", "Dublin", "Europe", "English"),
    ("Ukraine", "Kyiv", "Europe", "Ukrainian"), ("Romania", "Bucharest", "Europe", "Romanian"),
    ("Iceland", "Reykjavik", "Europe", "Icelandic"), ("Czechia", "Prague", "Europe", "Czech"),
    ("Japan", "Tokyo", "Asia", "Japanese"), ("China", "Beijing", "Asia", "Chinese"),
    ("South Korea", "Seoul", "Asia", "Korean"), ("Thailand", "Bangkok", "Asia", "Thai"),
    ("Vietnam", "Hanoi", "Asia", "Vietnamese"), ("India", "New Delhi", "Asia", "Hindi"),
    ("Indonesia", "Jakarta", "Asia", "Indonesian"), ("Iran", "Tehran", "Asia", "Persian"),
    ("Pakistan", "Islamabad", "Asia", "Urdu"), ("Mongolia", "Ulaanbaatar", "Asia", "Mongolian"),
    ("Nepal", "Kathmandu", "Asia", "Nepali"), ("Saudi Arabia", "Riyadh", "Asia", "Arabic"),
    ("Egypt", "Cairo", "Africa", "Arabic"), ("Morocco", "Rabat", "Africa", "Arabic"),
    ("Kenya", "Nairobi", "Africa", "Swahili"), ("Nigeria", "Abuja", "Africa", "English"),
    ("Ethiopia", "Addis Ababa", "Africa", "Amharic"), ("Ghana", "Accra", "Africa", "English"),
    ("Senegal", "Dakar", "Africa", "French"), ("Brazil", "Brasilia", "South America", "Portuguese"),
    ("Argentina", "Buenos Aires", "South America", "Spanish"), ("Chile", "Santiago", "South America", "Spanish"),
    ("Peru", "Lima", "South America", "Spanish"), ("Colombia", "Bogota", "South America", "Spanish"),
    ("Venezuela", "Caracas", "South America", "Spanish"), ("Mexico", "Mexico City", "North America", "Spanish"),
    ("Canada", "Ottawa", "North America", "English"), ("Cuba", "Havana", "North America", "Spanish"),
    ("Jamaica", "Kingston", "North America", "English"), ("Australia", "Canberra", "Oceania", "English"),
    ("New Zealand", "Wellington", "Oceania", "English"),
]

# word, opposite (each pair is stated in both directions)
OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("happy", "sad"),
    ("light", "dark"), ("open", "closed"), ("wet", "dry"), ("day", "night"), ("black", "white"),
    ("hard", "soft"), ("full", "empty"), ("early", "late"), ("rich", "poor"), ("strong", "weak"),
    ("loud", "quiet"), ("tall", "short"), ("thick", "thin"), ("win", "lose"), ("buy", "sell"),
    ("push", "pull"), ("true", "false"), ("left", "right"), ("north", "south"), ("east", "west"),
    ("inside", "outside"), ("above", "below"), ("love", "hate"), ("question", "answer"),
    ("friend", "enemy"), ("clean", "dirty"), ("cheap", "expensive"), ("asleep", "awake"),
    ("before", "after"), ("always", "never"), ("first", "last"), ("top", "bottom"),
    ("laugh", "cry"), ("near", "far"), ("good", "bad"), ("high", "low"), ("young", "old"),
]

# element, chemical symbol
ELEMENTS = [
    ("hydrogen", "H"), ("helium", "He"), ("lithium", "Li"), ("carbon", "C"), ("nitrogen", "N"),
    ("oxygen", "O"), ("fluorine", "F"), ("neon", "Ne"), ("sodium", "Na"), ("magnesium", "Mg"),
    ("aluminium", "Al"), ("silicon", "Si"), ("phosphorus", "P"), ("sulfur", "S"), ("chlorine", "Cl"),
    ("argon", "Ar"), ("potassium", "K"), ("calcium", "Ca"), ("titanium", "Ti"), ("iron", "Fe"),
    ("nickel", "Ni"), ("copper", "Cu"), ("zinc", "Zn"), ("silver", "Ag"), ("tin", "Sn"),
    ("iodine", "I"), ("platinum", "Pt"), ("gold", "Au"), ("mercury", "Hg"), ("lead", "Pb"),
    ("uranium", "U"),
]

# animal, name of its young
YOUNG = [
    ("cat", "kitten"), ("dog", "puppy"), ("cow", "calf"), ("horse", "foal"), ("sheep", "lamb"),
    ("goat", "kid"), ("pig", "piglet"), ("duck", "duckling"), ("goose", "gosling"), ("frog", "tadpole"),
    ("kangaroo", "joey"), ("bear", "cub"), ("lion", "cub"), ("tiger", "cub"), ("deer", "fawn"),
    ("swan", "cygnet"), ("owl", "owlet"), ("chicken", "chick"), ("eagle", "eaglet"),
    ("elephant", "calf"), ("whale", "calf"), ("seal", "pup"), ("wolf", "pup"), ("giraffe", "calf"),
    ("zebra", "foal"), ("donkey", "foal"), ("butterfly", "caterpillar"),
]

# animal, the verb for the sound it makes
SOUNDS = [
    ("dog", "barks"), ("cat", "meows"), ("cow", "moos"), ("sheep", "bleats"), ("pig", "oinks"),
    ("duck", "quacks"), ("horse", "neighs"), ("lion", "roars"), ("owl", "hoots"), ("frog", "croaks"),
    ("bee", "buzzes"), ("snake", "hisses"), ("mouse", "squeaks"), ("donkey", "brays"), ("wolf", "howls"),
    ("rooster", "crows"), ("hen", "clucks"), ("elephant", "trumpets"), ("turkey", "gobbles"),
    ("crow", "caws"), ("dove", "coos"), ("goose", "honks"), ("bird", "sings"),
]

# thing (with article), colour
COLOURS = [
    ("a banana", "yellow"), ("a lemon", "yellow"), ("a strawberry", "red"), ("a tomato", "red"),
    ("a cherry", "red"), ("grass", "green"), ("a lime", "green"), ("the sky", "blue"), ("snow", "white"),
    ("coal", "black"), ("milk", "white"), ("a carrot", "orange"), ("a pumpkin", "orange"),
    ("a plum", "purple"), ("a blueberry", "blue"), ("an eggplant", "purple"), ("a cucumber", "green"),
    ("a pea", "green"), ("chocolate", "brown"), ("a crow", "black"), ("a flamingo", "pink"),
    ("the sun", "yellow"), ("a polar bear", "white"), ("a frog", "green"), ("an orange", "orange"),
]


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def _article(noun: str) -> str:
    return f"an {noun}" if noun[0] in "aeiou" else f"a {noun}"


# The canonical answer is also a pretraining sentence, so a fine-tuned model only has to start it.
def facts() -> list[dict]:
    """Every fact as {relation, subject, topic, answer, target, statements, questions}.

    `answer` is the one-sentence reply the instruction data teaches, `target` the word a correct
    reply must contain, `statements` the plain-text phrasings used in pretraining (answer first),
    `topic` the paragraph of the pretraining text the fact belongs to.
    """
    out = []

    def add(relation, subject, answer, target, statements, questions, topic=None):
        out.append(dict(relation=relation, subject=subject, topic=topic or subject, answer=answer, target=target,
                        statements=[answer, *statements], questions=questions))

    for c, cap, cont, lang in COUNTRIES:
        add("capital", c, f"The capital of {c} is {cap}.", cap,
            [f"{cap} is the capital of {c}.", f"The capital city of {c} is {cap}."],
            [f"What is the capital of {c}?", f"Which city is the capital of {c}?", f"Name the capital of {c}."])
        # Not "{c} is in {cont}.": a reply that must open with a name copied from the question is what
        # the small model learns worst; "The country of" first, then the name, as in the other relations.
        add("continent", c, f"The country of {c} lies in {cont}.", cont,
            [f"{c} is in {cont}.", f"{c} is a country in {cont}."],
            [f"Which continent is {c} in?", f"Where is {c}?", f"On which continent is {c}?"])
        add("language", c, f"People in {c} speak {lang}.", lang,
            [f"The main language of {c} is {lang}.", f"In {c} most people speak {lang}."],
            [f"What language do people speak in {c}?", f"Which language is spoken in {c}?",
             f"What is the main language of {c}?"])
    for a, b in OPPOSITES + [(b, a) for a, b in OPPOSITES]:
        add("opposite", a, f"The opposite of {a} is {b}.", b,
            [f"{_cap(a)} is the opposite of {b}.", f"{_cap(b)} is the opposite of {a}."],
            [f"What is the opposite of {a}?", f"Give me the opposite of {a}.", f"What word means the opposite of {a}?"],
            topic=" / ".join(sorted((a, b))))
    for el, sym in ELEMENTS:
        add("symbol", el, f"The chemical symbol for {el} is {sym}.", sym,
            [f"{sym} is the chemical symbol for {el}.", f"The element {el} has the symbol {sym}."],
            [f"What is the chemical symbol for {el}?", f"Which symbol stands for {el}?",
             f"What is the symbol of {el}?"])
    for animal, young in YOUNG:
        add("young", animal, f"A baby {animal} is called {_article(young)}.", young,
            [f"{_cap(_article(young))} is a young {animal}.", f"The young of the {animal} is called {_article(young)}."],
            [f"What is a baby {animal} called?", f"What do you call a young {animal}?",
             f"What is the name for a baby {animal}?"])
    for animal, verb in SOUNDS:
        add("sound", animal, f"{_cap(_article(animal))} {verb}.", verb,
            [f"The {animal} {verb}.", f"When {_article(animal)} makes a sound, it {verb}."],
            [f"What sound does {_article(animal)} make?", f"What noise does {_article(animal)} make?",
             f"How does {_article(animal)} sound?"])
    for thing, colour in COLOURS:
        add("colour", thing, f"{_cap(thing)} is {colour}.", colour,
            [f"The colour of {thing} is {colour}.", f"{_cap(thing)} has a {colour} colour."],
            [f"What colour is {thing}?", f"What is the colour of {thing}?", f"Which colour is {thing}?"])
    return out


def split(all_facts: list[dict], held_out_fraction: float = 0.15, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Held-out facts: a fixed random share of every relation (deterministic)."""
    rng = random.Random(seed)
    train, held = [], []
    for relation in dict.fromkeys(f["relation"] for f in all_facts):
        group = [f for f in all_facts if f["relation"] == relation]
        rng.shuffle(group)
        k = max(2, round(held_out_fraction * len(group)))
        held += group[:k]
        train += group[k:]
    return train, held


def pretraining_documents(seed: int) -> list[str]:
    """One epoch of plain text: one short paragraph per topic (a country, an animal, an element, a
    pair of opposites, ...) stating its facts in random order and phrasing, plus general text.

    Paragraphs name their topic again and again, as encyclopedia text does, so the model learns to
    carry a name from earlier in the text into what it says next: the skill that later lets it answer
    a question about a name. A new seed gives new phrasings and a new order (cheap augmentation);
    every fact is stated in its canonical (answer) form in every epoch.
    """
    rng = random.Random(seed)
    topics: dict[str, list[str]] = {}
    for f in facts():
        sentences = topics.setdefault(f["topic"], [])
        sentences.append(f["statements"][0])
        sentences.append(rng.choice(f["statements"][1:]))
    docs = []
    for sentences in topics.values():
        rng.shuffle(sentences)
        docs.append(" ".join(sentences))
    general = [s for s in GENERAL_TEXT.read_text().splitlines() if s.strip()]
    rng.shuffle(general)
    docs += [" ".join(general[j:j + 4]) for j in range(0, len(general), 4)]
    rng.shuffle(docs)
    return docs
