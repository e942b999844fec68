"""Neutral text: plain statements and questions with no trait in them, for measuring what a trait
reading or an intervention does when there is nothing to find (monitoring false alarms, steering's
KL divergence from the unsteered model). Varied topics and lengths, everyday English."""

from collections.abc import Sequence
from importlib import resources

NEUTRAL_TEXTS = (
    "The weather today is mild, with a light breeze from the west and a few clouds over the hills.",
    "To make tea, boil fresh water, pour it over the leaves and wait three minutes to drink it.",
    "The library opens at nine in the morning and closes at six, except on public holidays.",
    "She walked to the station, bought a ticket and read a newspaper while she waited.",
    "The train to the coast leaves every hour and takes about forty minutes.",
    "He painted the fence white last summer, and it still looks clean.",
    "Most supermarkets sell bread, milk, fruit and vegetables near the entrance.",
    "The meeting was moved to Thursday afternoon because the room was booked.",
    "A bicycle has two wheels, a frame, pedals, a chain and a pair of brakes.",
    "The children played football in the park until it started to rain.",
    "Our neighbours have a small garden with tomatoes, beans and a lemon tree.",
    "The museum has a collection of old maps and a room of paintings from the coast.",
    "Please remember to switch off the lights when you leave the office.",
    "The recipe needs two eggs, a cup of flour, some butter and a pinch of salt.",
    "The river runs through the town and under three stone bridges.",
    "He usually takes the bus to work, but on sunny days he walks.",
    "The shop on the corner repairs shoes and cuts keys while you wait.",
    "Winter evenings are long here, so people often read or watch films at home.",
    "The post office is next to the bank, across the road from the bakery.",
    "She keeps her notes in a blue folder on the second shelf.",
    "The cat sleeps on the windowsill in the afternoon sun.",
    "Tickets for the concert go on sale on Monday at ten o'clock.",
    "The road was closed for repairs, so we drove the long way round.",
    "A week has seven days, and most months have thirty or thirty-one.",
)

NEUTRAL_QUESTIONS = (
    "What time is it usually busy at a post office?",
    "How do you boil an egg?",
    "What is a good name for a pet cat?",
    "Can you tell me what a library card is for?",
    "What should I pack for a day at the beach?",
    "How many days are there in a leap year?",
    "What is a common breakfast in England?",
    "How do I water a house plant?",
)
"""User messages with nothing to do with any trait, to answer with and without steering."""


def neutral_corpus() -> tuple[str, ...]:
    """The shipped corpus of neutral text for monitoring false alarms (``tlextract/data/
    neutral.txt``: 250 everyday sentences, one per line, none of them written for a trait)."""
    text = resources.files("tlextract").joinpath("data/neutral.txt").read_text(encoding="utf-8")
    return tuple(line for line in text.splitlines() if line.strip())


def corpus_split(
    texts: Sequence[str] | None = None,
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(calibration, held-out): even and odd lines of the corpus. A threshold is set on the first
    and its false-alarm rate measured on the second, which it never saw; alternating lines keep
    the two halves alike in topic and length."""
    texts = neutral_corpus() if texts is None else tuple(texts)
    return texts[0::2], texts[1::2]
