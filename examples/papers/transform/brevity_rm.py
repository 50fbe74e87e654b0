"""A second reward model for the real tier: brevity (concise, on-topic answers above
long-winded ones), built the way tests/real/build.py builds its helpfulness `rm`: the
base's frozen body (SmolLM2-135M-Instruct) and a one-label score head trained
Bradley-Terry on the last token's state of PAIRS below (hand-written).

Cached beside the other fixtures, in a folder of its own (build.cache_root() / "rm-brev"),
built once (about a minute), written to a temporary folder renamed into place.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "tests" / "real"))
import build  # noqa: E402  (tests/real/build.py: cache_root, chat, _save, HEAD_STEPS)

NAME = "rm-brev"
SEED = 4
# (prompt, concise answer, long-winded answer): both answer the question; the head learns
# to prefer the concise one
PAIRS = [
    ("What is the capital of Germany?", "Berlin.",
     "Well, that is a great question, and there is a lot one could say about it. Germany has many "
     "cities, and after thinking it over carefully, the capital, as far as I know, is Berlin."),
    ("How many minutes are in an hour?", "Sixty.",
     "Let me explain this in detail. Time is measured in many units, such as seconds, minutes and "
     "hours, and if we look at how they relate, an hour contains sixty minutes in total."),
    ("What colour is grass?", "Green.",
     "Grass, which grows in gardens, parks and fields all over the world in many varieties, is "
     "generally, in most cases and under normal conditions, green in colour."),
    ("What is 3 plus 4?", "7.",
     "To answer this we need to add the numbers together. Starting from three and counting four "
     "more steps, one, two, three, four, we arrive at the result, which is seven."),
    ("Name a fruit.", "An apple.",
     "There are so many fruits to choose from, such as bananas, oranges, grapes and many others, "
     "but if I have to name just one single fruit, I would say an apple."),
    ("Who wrote Hamlet?", "Shakespeare.",
     "Hamlet is a famous play that has been performed many times around the world over the "
     "centuries, and it was written, as most people know, by William Shakespeare."),
    ("What do fish breathe with?", "Gills.",
     "Fish live in water, which is very different from air, and so they have developed a special "
     "organ over millions of years of evolution that lets them breathe, called gills."),
    ("How many wheels does a bicycle have?", "Two.",
     "A bicycle, as the name suggests with the prefix bi meaning two, which comes from Latin, "
     "has, if we count them one by one, a total of two wheels."),
    ("Is ice cold?", "Yes.",
     "This is an interesting question to think about. Ice is frozen water, and water freezes "
     "at zero degrees Celsius, so yes, ice is indeed cold, generally speaking."),
    ("What is the opposite of up?", "Down.",
     "Directions can be described in many ways, and when thinking about opposites, which are "
     "words with contrary meanings, the opposite of up would be down."),
    ("Where is the Eiffel Tower?", "In Paris.",
     "The Eiffel Tower is one of the most famous landmarks in the whole world, visited by "
     "millions of tourists every year, and it is located in the city of Paris, in France."),
    ("How many legs does a dog have?", "Four.",
     "Dogs are four-legged animals, mammals in fact, that have lived alongside humans for "
     "thousands of years as pets and helpers, and they have, as I said, four legs."),
    ("What is frozen water called?", "Ice.",
     "When water gets cold enough, below its freezing point, the molecules arrange themselves "
     "into a solid structure, and this frozen form of water is what we call ice."),
    ("What animal says moo?", "A cow.",
     "Many animals make different sounds, dogs bark, cats meow, ducks quack and so on, and "
     "the animal that says moo, in case you were wondering, is the cow."),
    ("What is the first letter of the alphabet?", "A.",
     "The alphabet has twenty-six letters, starting at the beginning and going all the way "
     "through to the end at Z, and the very first letter of them all is A."),
    ("What do bees make?", "Honey.",
     "Bees are remarkable insects that live in colonies and visit many flowers every day, "
     "collecting nectar, and from that nectar, through a long process, they make honey."),
]


def train_head(root: Path, pairs, seed: int) -> None:
    """build.py's reward-model recipe on other pairs: the base's body, a score head trained
    Bradley-Terry (Adam, build.HEAD_STEPS steps) on the last real token's hidden state."""
    from transformers import AutoTokenizer

    base = build.ensure()["base"]
    tok = AutoTokenizer.from_pretrained(base)
    rm = build.score_head_model(base, tok, pairs, seed)
    build._save(rm, tok, root)


def ensure() -> Path:
    """The brevity reward model's folder, built if absent."""
    folder = build.cache_root() / NAME
    if (folder / "config.json").is_file():
        return folder
    tmp = folder.parent / f".{NAME}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        torch.manual_seed(0)
        train_head(tmp, PAIRS, SEED)
        try:
            tmp.rename(folder)
        except OSError:
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


if __name__ == "__main__":
    print(ensure())
