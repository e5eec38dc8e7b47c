"""`SubscriptionTrie.match_values` finds exactly what `match` finds, in the same order."""

from __future__ import annotations

import random

from overlay.mqtt.topics import SubscriptionTrie

LEVELS = ["a", "b", "$sys", "+", "#", ""]


def test_match_values_is_match_without_names() -> None:
    rng = random.Random(11)
    for _ in range(300):
        trie: SubscriptionTrie[int, int] = SubscriptionTrie()
        for key in range(rng.randrange(0, 12)):
            levels = [rng.choice(LEVELS) for _ in range(rng.randrange(1, 4))]
            if "#" in levels:
                levels = levels[: levels.index("#") + 1]
            trie.insert("/".join(levels), key, key * 10)
        for _ in range(10):
            topic = "/".join(rng.choice(["a", "b", "$sys", ""]) for _ in range(rng.randrange(1, 4)))
            assert trie.match_values(topic) == [(k, v) for _, k, v in trie.match(topic)], topic
