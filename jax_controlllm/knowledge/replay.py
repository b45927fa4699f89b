"""Replay text: the base model's own continuations of neutral openers, mixed into the new-knowledge corpus.

Continual pre-training on a narrow corpus moves a model's predictions everywhere, not only on the new facts
(the corpus's few templates leak into unrelated completions). Mixing in text the base model itself writes
("self-synthesised rehearsal") keeps the language-modelling loss, and Control LLM's divergence loss, anchored
on general text too, without any outside data. The openers below are everyday topics written for this
purpose; none of them asks for a fact (the retention probes of ``jax_controlllm.retention`` stay unseen).
Sampling is seeded, so the same base, openers and seed give the same documents.
"""
from __future__ import annotations

from typing import Sequence

OPENERS: tuple[str, ...] = (
    "Here is a simple way to bake bread at home.", "The best thing about a rainy afternoon is",
    "When you start learning to play the guitar,", "A good morning routine can include",
    "Gardening in small spaces is possible if", "The old bridge over the river was",
    "To keep a houseplant healthy,", "My grandmother used to tell us stories about",
    "Writing a clear email starts with", "On the first day of school, the children",
    "A walk in the forest in autumn", "Cooking rice properly takes",
    "The village market opens every Saturday and", "Learning a new language as an adult",
    "The small cafe on the corner serves", "Before a long hike, it is wise to",
    "Our team meeting this week focused on", "The recipe for a simple tomato soup",
    "Cats and dogs show affection in different ways:", "Saving money each month becomes easier when",
    "The museum's new exhibition shows", "A bicycle needs regular care, such as",
    "During the summer holidays, many families", "The library is a quiet place where",
    "Good sleep habits include", "The story begins on a cold winter night, when",
    "Painting a room yourself requires", "The neighbours organised a street party and",
    "Exercise helps the body and the mind because", "The train was late again, so",
    "A friendly letter usually starts with", "The children built a sandcastle that",
    "Packing for a short trip is simple if", "The recipe calls for two eggs,",
    "Many people enjoy fishing because", "The teacher asked the class to write about",
    "A healthy lunch might include", "The wind picked up in the evening and",
    "Repairing a leaking tap usually means", "The festival lights filled the square while",
    "Reading before bed can", "The farmer checked the fields early in the morning,",
    "A good conversation needs", "The kitchen smelled of fresh coffee as",
    "Planning a birthday party for a child", "The little boat drifted slowly towards",
    "Keeping a diary helps you", "The choir practised every Thursday evening,",
    "To make a paper airplane, first", "The puppy chewed on everything until",
    "The best advice I ever received was", "Snow covered the roofs of the town, and",
    "Cleaning up after a picnic is", "The artist mixed her paints carefully because",
    "Saturday mornings at the park are", "A simple way to stay organised is",
    "The old clock in the hall", "Baking cookies with friends",
    "The path up the hill was steep, but", "A quiet evening at home might mean",
    "Learning to swim takes patience:", "The bus driver greeted every passenger and",
    "Making a cup of tea the traditional way", "The shop window was full of",
)


# Openers on the kinds of thing a corpus teaches (its attributes), written the same way: everyday text about
# places, dates, studies and work that asks for no fact. With ``knowledge.replay_topics`` they come first, so the
# alignment text anchors the divergence on text of the new facts' kind too: what the model knows of other cities
# and companies is where learning new people's cities and employers interferes most.
TOPIC_OPENERS: dict[str, tuple[str, ...]] = {
    "city": ("Moving to a new city means", "The town where I grew up had", "Living in a big city can be",
             "A weekend trip to the coast", "The streets of the old town were", "Travelling by train between cities,",
             "Visiting a foreign country for the first time,", "The neighbourhood changed a lot after"),
    "company": ("Starting a new job at a large company", "Our office moved to a new building, and",
                "The company picnic this year was", "Working from home on Fridays",
                "Many small businesses begin when", "A good manager at work", "The factory on the edge of town",
                "After ten years with the same employer,"),
    "university": ("The first week at university", "The campus library stays open late, so",
                   "Choosing where to study is hard because", "Student life in a shared flat"),
    "major": ("Studying engineering takes", "A degree in history teaches you", "The biology lab smelled of",
              "Switching subjects in the second year"),
    "birth_date": ("Birthdays in our family always", "The year I was born, my parents", "A child born in winter",
                   "Celebrating a fortieth birthday"),
}


def openers_for(attributes: Sequence[str] = ()) -> tuple[str, ...]:
    """The topic openers of ``attributes`` (in that order), then the everyday ones."""
    return tuple(o for a in attributes for o in TOPIC_OPENERS.get(a, ())) + OPENERS


def replay_documents(config, params, tokenizer, n_documents: int, max_new_tokens: int = 64, seed: int = 0,
                     openers: Sequence[str] = OPENERS) -> list[str]:
    """``n_documents`` texts, each an opener (cycled) and the model's sampled continuation of it (temperature
    0.8, top-p 0.95, seeded). ``config, params``: the base model, in any dtype the generator takes."""
    from jax_controlllm.generate import Sampling, generate_text

    if n_documents < 1:
        return []
    prompts = [openers[i % len(openers)] for i in range(n_documents)]
    completions = generate_text(config, params, tokenizer, prompts, max_new_tokens,
                                Sampling(temperature=0.8, top_p=0.95, seed=seed), batch_size=64)
    return [(c.prompt + c.text).strip() for c in completions]
