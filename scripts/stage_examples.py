"""Print example stage outputs as Markdown: fused item summaries and users' preference-summary chains.

Reads the item fusion cache of the configuration (build it first) and runs each chosen user's
recurrent chain from the first window (not cached), then lists the cached summaries the split uses
for that user. Used to write ``docs/stage_examples.md``::

    python scripts/stage_examples.py --dataset=ml-1m-mm --data_path=dataset \\
        --example_items=1,260,1196 --example_users=1,10,100 --example_windows=6 [--key=value ...]

Every other ``--key=value`` must match the stage commands that built the caches (e.g. ``stage_batch_size``).
"""

import logging
import sys

from recbole_mllm.cli import exit_on_help, split_own_keys
from recbole_mllm.data import create_dataset, needed_positions, user_histories
from recbole_mllm.stages.common import load_backend, stage_config
from recbole_mllm.stages.item_fusion_cache import load_item_fusion
from recbole_mllm.stages.items import read_item_file
from recbole_mllm.stages.user_profile import summary_chain
from recbole_mllm.stages.user_profile_cache import open_user_summaries
from recbole_mllm.stages.user_text import Clock


DEFAULTS = {"example_items": None, "example_users": None, "example_windows": 6}
"""This script's own keys (kept from ``Config``, which rejects keys it does not know); the stage keys
(``python -m recbole_mllm.stages.item_fusion --help``) apply too."""


def _split(value):
    """``--example_items=1,260`` arrives read as a literal: a tuple, a single int, or a string."""
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [v for v in str(value if value is not None else "").split(",") if v]


def main(argv):
    exit_on_help(argv, __doc__, DEFAULTS)
    logging.basicConfig(level=logging.WARNING)
    own, argv = split_own_keys(argv, DEFAULTS)
    config = stage_config(argv)
    backend = load_backend(config)
    table = read_item_file(config["data_path"], config["dataset"])
    items = _split(own["example_items"])
    texts, _ = load_item_fusion(config, items, backend)
    print(f"# Stage examples: {config['dataset']}, backend `{backend.identity.name}`\n")
    print("## Fused item summaries (item fusion stage)\n")
    for token, text in zip(items, texts):
        row = table.rows[token]
        image = "poster" if row.get(config["item_image_field"] or "", "").strip() else "no poster (text only)"
        print(f"**{row.get(config['item_title_field'], token)}** (item {token}; {image})\n\n> {' '.join(text.split())}\n")
    histories = user_histories(create_dataset(config))
    summaries = open_user_summaries(config, backend, histories)
    clock = Clock(str(config["user_time_format"] or "unix_s"))
    print("## Preference summary chains (user profile stage)\n")
    for user in _split(own["example_users"]):
        history = histories[user]
        print(f"### User {user} ({len(history.items)} interactions)\n")
        print(f"Recurrent chain from the first window, window by window (W={config['user_window_size']}, "
              f"S={config['user_window_step']}):\n")
        for c, text in summary_chain(config, user, int(own["example_windows"] or 6), backend, histories):
            print(f"- after {c} items ({clock.end(history.timestamps, c)}): {' '.join(text.split())}")
        print(f"\nCached summaries the split uses (each from at most {config['user_summary_max_windows']} windows):\n")
        for t in needed_positions(len(history.items), config):
            print(f"- position {t} (covers {summaries.key(user, t)[1]} items): {summaries.texts([(user, t)])[0]}")
        print()


if __name__ == "__main__":
    main(sys.argv[1:])
