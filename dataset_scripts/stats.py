"""The numbers every build prints and stores in ``stats.json``: a dataset's shape without loading it."""


def dataset_stats(name, inter_users, inter_items, item_images, missing, errors):
    """The numbers every build prints and stores.

    ``inter_users``/``inter_items``: the user and item of each interaction; ``item_images``: each
    ``.item`` id to its image file or ''; ``missing``: the missing_images.txt entries; ``errors``:
    the :class:`LineErrors` of the raw files.
    """
    inter_users, inter_items = list(inter_users), list(inter_items)
    n_inter = len(inter_users)
    n_users, n_items = len(set(inter_users)), len(set(inter_items))
    return {
        "dataset": name,
        "users": n_users,
        "items": len(item_images),
        "interactions": n_inter,
        "density": n_inter / (n_users * n_items) if n_users and n_items else 0.0,
        "items_with_image": sum(1 for image in item_images.values() if image),
        "items_without_image": sum(1 for image in item_images.values() if not image),
        "rated_items": n_items,
        "rated_items_with_image": sum(1 for item in set(inter_items) if item_images.get(item)),
        "missing_images": len(missing),
        "malformed_lines": errors.counts,
        "repeated_pairs": repeated_pairs(inter_users, inter_items),
    }


def print_stats(stats):
    print(
        f"{stats['dataset']}: {stats['users']:,} users, {stats['items']:,} items, "
        f"{stats['interactions']:,} interactions, density {stats['density']:.4%}"
    )
    print(
        f"images: {stats['items_with_image']:,} items with an image, {stats['items_without_image']:,} text-only; "
        f"{stats['rated_items_with_image']:,} of {stats['rated_items']:,} rated items have one"
    )
    if "duplicates_choice" in stats:
        choice = stats["duplicates_choice"]
        print(f"duplicates: {stats['duplicates']:,} {'dropped' if choice == 'drop' else 'kept'} (--duplicates {choice})")
    if "repeated_pairs" in stats:
        repeated = stats["repeated_pairs"]
        print(f"repeated (user, item) pairs kept: {repeated:,} of {stats['interactions']:,} interactions"
              + (" (masking a user's earlier items can hide such a target)" if repeated else ""))
    for key, title in (("dropped", "dropped"), ("orphaned", "kept without a match")):
        counts = stats.get(key) or {}
        print(f"{title}: " + (", ".join(f"{n:,} {what}" for what, n in counts.items()) if any(counts.values()) else "none"))


def row_counts(**counts):
    """``{"malformed lines": 3, ...}`` from ``malformed_lines=3, ...``: the wording print_stats shows."""
    return {name.replace("_", " "): int(n) for name, n in counts.items()}


def repeated_pairs(users, items):
    """How many interactions repeat an earlier (user, item) pair (0 when every pair is unique)."""
    pairs = list(zip(users, items))
    return len(pairs) - len(set(pairs))
