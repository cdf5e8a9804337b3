"""Small exercises with answers a program can compute: the material of the built-in demo datasets.

Each exercise carries a correct answer and a plausible wrong one (an arithmetic slip, the country's
best-known city instead of its capital), so the same list feeds SFT (answers) and DPO (answer vs slip).
Generated from a fixed seed: the same rows on every machine, nothing downloaded.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

SEED = 1234

# country, capital, a city people often mistake for it
CAPITALS = (
    ("France", "Paris", "Lyon"),
    ("Germany", "Berlin", "Munich"),
    ("Italy", "Rome", "Milan"),
    ("Spain", "Madrid", "Barcelona"),
    ("Portugal", "Lisbon", "Porto"),
    ("Ireland", "Dublin", "Cork"),
    ("Netherlands", "Amsterdam", "Rotterdam"),
    ("Belgium", "Brussels", "Antwerp"),
    ("Switzerland", "Bern", "Zurich"),
    ("Austria", "Vienna", "Salzburg"),
    ("Poland", "Warsaw", "Krakow"),
    ("Sweden", "Stockholm", "Gothenburg"),
    ("Norway", "Oslo", "Bergen"),
    ("Finland", "Helsinki", "Tampere"),
    ("Denmark", "Copenhagen", "Aarhus"),
    ("Greece", "Athens", "Thessaloniki"),
    ("Turkey", "Ankara", "Istanbul"),
    ("Egypt", "Cairo", "Alexandria"),
    ("Kenya", "Nairobi", "Mombasa"),
    ("Nigeria", "Abuja", "Lagos"),
    ("Morocco", "Rabat", "Casablanca"),
    ("Japan", "Tokyo", "Osaka"),
    ("China", "Beijing", "Shanghai"),
    ("India", "New Delhi", "Mumbai"),
    ("Australia", "Canberra", "Sydney"),
    ("Canada", "Ottawa", "Toronto"),
    ("Brazil", "Brasilia", "Rio de Janeiro"),
    ("Vietnam", "Hanoi", "Ho Chi Minh City"),
    ("South Korea", "Seoul", "Busan"),
    ("New Zealand", "Wellington", "Auckland"),
)
CAPITAL_QUESTIONS = ("What is the capital of {}?", "Which city is the capital of {}?", "Name the capital city of {}.")

WORDS = (
    "cat",
    "dog",
    "sun",
    "moon",
    "tree",
    "bird",
    "fish",
    "book",
    "lamp",
    "door",
    "chair",
    "table",
    "apple",
    "river",
    "stone",
    "cloud",
    "green",
    "house",
    "water",
    "light",
    "music",
    "paper",
    "train",
    "plant",
    "horse",
    "mouse",
    "bread",
    "honey",
    "candle",
    "garden",
    "window",
    "pencil",
    "rocket",
    "planet",
    "orange",
    "yellow",
    "silver",
    "winter",
    "summer",
    "forest",
    "island",
    "bridge",
    "castle",
    "dragon",
    "guitar",
    "jacket",
    "kitten",
    "ladder",
    "market",
    "number",
    "ocean",
    "pocket",
    "rabbit",
    "shadow",
    "ticket",
)


@dataclass(frozen=True)
class Exercise:
    question: str
    answer: str
    wrong: str


def _pairs(rng: random.Random, count: int, low: int, high: int) -> list[tuple[int, int]]:
    """``count`` distinct (a, b) pairs with low <= a, b <= high, in a seeded order."""
    pairs = [(a, b) for a in range(low, high + 1) for b in range(low, high + 1)]
    return rng.sample(pairs, count)


def _slip(rng: random.Random) -> int:
    return rng.choice((-10, -2, -1, 1, 2, 10))


def _arithmetic(rng: random.Random) -> list[Exercise]:
    items = []
    for a, b in _pairs(rng, 100, 2, 99):
        items.append(Exercise(f"What is {a} + {b}?", f"{a} + {b} = {a + b}.", f"{a} + {b} = {a + b + _slip(rng)}."))
    for a, b in _pairs(rng, 40, 2, 99):
        a, b = max(a, b), min(a, b)
        items.append(Exercise(f"What is {a} - {b}?", f"{a} - {b} = {a - b}.", f"{a} - {b} = {a - b + _slip(rng)}."))
    for a, b in _pairs(rng, 60, 2, 12):
        items.append(Exercise(f"What is {a} * {b}?", f"{a} * {b} = {a * b}.", f"{a} * {b} = {a * (b + 1)}."))
    return items


def _capitals() -> list[Exercise]:
    return [
        Exercise(question.format(country), f"The capital of {country} is {capital}.", f"The capital of {country} is {decoy}.")
        for question in CAPITAL_QUESTIONS
        for country, capital, decoy in CAPITALS
    ]


def _words() -> list[Exercise]:
    reverse = [Exercise(f"Reverse the word '{w}'.", f"The reversed word is '{w[::-1]}'.", f"The reversed word is '{w}'.") for w in WORDS]
    spell = [Exercise(f"Spell '{w}' letter by letter.", "-".join(w), "-".join(w[:1] + w[2:])) for w in WORDS]
    return reverse + spell


def exercises() -> list[Exercise]:
    """About 400 exercises of six kinds, in a fixed shuffled order (so any prefix mixes the kinds)."""
    rng = random.Random(SEED)
    items = _arithmetic(rng) + _capitals() + _words()
    rng.shuffle(items)
    return items
