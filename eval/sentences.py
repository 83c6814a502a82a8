"""Sentence sets written for duplex's scenarios: templates with slots (names, places, numbers,
topics, times) so that thousands of distinct utterances come out of a seed and a policy cannot
memorise them. Pure functions of a ``random.Random``."""

from __future__ import annotations

import random

__all__ = ["backchannel", "interruption", "long_pause_pair", "pause_pair", "question", "short_turn"]

_NAMES = ["Maria", "Tom", "Aisha", "Kenji", "Lucas", "Priya", "Olga", "Daniel", "Fatima", "Sven", "Chloe",
          "Mateo", "Grace", "Ibrahim", "Hannah", "Ravi", "Nora", "Pablo", "Yuki", "Ethan"]
_CITIES = ["Lisbon", "Chicago", "Nairobi", "Osaka", "Toronto", "Madrid", "Berlin", "Denver", "Sydney", "Dublin",
           "Seattle", "Vienna", "Lima", "Prague", "Boston", "Oslo", "Cairo", "Austin", "Glasgow", "Seoul"]
_TOPICS = ["black holes", "sourdough bread", "the Roman empire", "solar panels", "jazz piano", "honey bees",
           "electric cars", "the stock market", "volcanoes", "chess openings", "vitamin D", "coral reefs",
           "machine learning", "the French revolution", "houseplants", "marathon training", "tea ceremonies",
           "submarines", "the moon landing", "recycling plastic", "octopuses", "origami", "wind turbines"]
_FOODS = ["pasta", "curry", "tacos", "soup", "pancakes", "a salad", "fried rice", "a stew", "dumplings", "pizza"]
_THINGS = ["my laptop", "the printer", "my phone", "the dishwasher", "my bike", "the router", "the heater",
           "my headphones", "the car", "the coffee machine"]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday", "tomorrow", "tonight",
         "next week"]
_NUMBERS = ["two", "three", "four", "five", "six", "seven", "eight", "ten", "twelve", "twenty"]
_TIMES = ["seven", "half past six", "eight thirty", "noon", "nine", "a quarter to five", "ten", "three"]
_ANIMALS = ["cat", "dog", "parrot", "rabbit", "hamster", "turtle", "goldfish", "horse"]

_QUESTIONS = [
    "Can you explain how {topic} work?",
    "What should I know about {topic}?",
    "What is the weather usually like in {city} in the spring?",
    "How do I cook {food} for {number} people?",
    "My friend {name} is visiting {city} on {day}. What should she see there?",
    "Why does {thing} keep making a strange noise?",
    "Can you give me some tips for looking after a {animal}?",
    "What is a good way to get started with {topic}?",
    "I am flying to {city} {day}. What should I pack?",
    "How long would it take to drive from {city} to {city2}?",
    "Could you tell me a short story about a {animal} named {name}?",
    "What are the pros and cons of {topic}?",
    "How can I make {food} taste better?",
    "Is it worth learning about {topic} at my age?",
    "What would you plan for a weekend in {city} with {number} friends?",
    "Tell me something surprising about {topic}.",
    "How do I fix {thing} when it stops working?",
    "Can you help me write a birthday message for {name}?",
]

_PAUSE_PAIRS = [
    ("I'd like to book a table for", "{number} people at {time} on {day}."),
    ("My brother {name} wants to know whether", "{city} is worth visiting in the winter."),
    ("Can you remind me to call", "{name} {day} at {time}?"),
    ("I was thinking about cooking", "{food} for dinner, what do you think?"),
    ("The thing I really want to understand is", "how {topic} actually work."),
    ("So my plan for {day} is to", "take the train to {city} and meet {name}."),
    ("Could you tell me the best way to", "clean {thing} without breaking it?"),
    ("I need a gift for", "{name}, who loves {topic}."),
    ("What I usually do on {day} is", "go for a long walk with my {animal}."),
    ("I have been trying to learn about", "{topic} for {number} weeks now."),
    ("Do you think it would be better to", "fly or drive to {city}?"),
    ("Last year in {city} we", "spent {number} days just eating {food}."),
]

# Complete turns of one to seven words (most of two to five; "Remind me at a quarter to five." is
# the longest). Without them, every complete turn in a scenario set was a long question and every
# short utterance the unfinished half of a pause, so a turn model could learn "few words: keep
# listening" (the learned policy did: it answered short turns after 2.1 s on average).
_SHORT_TURNS = [
    "What time is it?",
    "Tell me a joke.",
    "Why?",
    "How are you?",
    "Good morning!",
    "Thanks a lot.",
    "Who is {name}?",
    "Where is {city}?",
    "Sing me a song.",
    "Any ideas?",
    "Say that again.",
    "Is it raining in {city}?",
    "Explain {topic}.",
    "Yes, please.",
    "No, thanks.",
    "Okay, go on.",
    "Really?",
    "I love {food}.",
    "Surprise me.",
    "What about {city2}?",
    "Hello there.",
    "Help me cook {food}.",
    "Call {name} {day}.",
    "Is {city} far?",
    "I feel tired.",
    "Describe {topic}.",
    "Do you like {food}?",
    "Name {number} cities.",
    "Count to {number}.",
    "Remind me at {time}.",
    "Where is my {animal}?",
    "I fixed {thing}.",
    "Recommend a book.",
    "How old is {name}?",
    "What is {topic}?",
    "Good night.",
]

# Unfinished first halves as long as a whole question (seven words or more), for the same reason
# the other way round: a long utterance is not always a finished one.
_LONG_PAUSE_PAIRS = [
    ("I have been thinking about what you said yesterday and I wonder whether",
     "{city} would still be a good idea."),
    ("When my friend {name} and I went to {city} last spring we found out that",
     "everything we ate there was better than at home."),
    ("The main reason I am asking you about all of this right now is that",
     "I have to decide by {day}."),
    ("If it is not too much trouble, could you please help me figure out",
     "how to cook {food} for {number} people?"),
    ("What I would really like to know before we go any further is",
     "whether {topic} are hard to learn."),
    ("My cousin {name} told me that the best time to visit {city} is",
     "early in the morning, is that right?"),
    ("Before I forget, I wanted to ask you whether it makes sense to",
     "buy a new {animal} cage {day}."),
    ("The last time I tried to repair {thing} on my own I ended up",
     "calling a technician for help."),
]

_BACKCHANNELS = ["mm-hm", "yeah", "right", "okay", "uh-huh", "I see", "mhm", "sure", "yeah yeah", "oh right"]

_INTERRUPTIONS = [
    "Wait, actually, can you tell me about {topic} instead?",
    "Sorry, I meant {city}, not that.",
    "Hold on, what about {food}?",
    "Stop, stop. Let's talk about {topic}.",
    "No, no, I asked about {city2}.",
    "Actually, never mind. How is the weather in {city}?",
    "Sorry to cut in, but can you say that more simply?",
    "Wait, how many {animal}s did you say?",
    "Excuse me, can we switch to planning {day} instead?",
    "Hang on, my friend {name} has a question about {topic}.",
]


def _fill(template: str, rng: random.Random) -> str:
    city, city2 = rng.sample(_CITIES, 2)
    return template.format(name=rng.choice(_NAMES), city=city, city2=city2, topic=rng.choice(_TOPICS),
                           food=rng.choice(_FOODS), thing=rng.choice(_THINGS), day=rng.choice(_DAYS),
                           number=rng.choice(_NUMBERS), time=rng.choice(_TIMES), animal=rng.choice(_ANIMALS))


def question(rng: random.Random) -> str:
    """A complete user turn that invites a reply of several sentences."""
    return _fill(rng.choice(_QUESTIONS), rng)


def _fill_pair(pairs: list[tuple[str, str]], rng: random.Random) -> tuple[str, str]:
    """One of ``pairs`` with both halves filled from the same slot draw (a name stays one name)."""
    first, second = rng.choice(pairs)
    filled = _fill(first + "|" + second, rng).split("|")
    return filled[0], filled[1]


def pause_pair(rng: random.Random) -> tuple[str, str]:
    """An utterance split where a speaker hesitates: the first half is clearly unfinished."""
    return _fill_pair(_PAUSE_PAIRS, rng)


def short_turn(rng: random.Random) -> str:
    """A complete user turn of one to seven words."""
    return _fill(rng.choice(_SHORT_TURNS), rng)


def long_pause_pair(rng: random.Random) -> tuple[str, str]:
    """Like :func:`pause_pair`, with a first half as long as a whole question."""
    return _fill_pair(_LONG_PAUSE_PAIRS, rng)


def backchannel(rng: random.Random) -> str:
    return rng.choice(_BACKCHANNELS)


def interruption(rng: random.Random) -> str:
    """A barge-in that clearly takes the floor (a new request, a correction, a stop)."""
    return _fill(rng.choice(_INTERRUPTIONS), rng)
