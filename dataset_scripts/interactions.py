"""Interaction filters the converters share."""


def k_core(inter, k):
    """Iteratively drop users and items with fewer than ``k`` interactions until none is left."""
    if k <= 1:
        return inter
    while True:
        user_counts = inter["user_id"].map(inter["user_id"].value_counts())
        item_counts = inter["item_id"].map(inter["item_id"].value_counts())
        keep = (user_counts >= k) & (item_counts >= k)
        if keep.all():
            return inter
        inter = inter[keep]
