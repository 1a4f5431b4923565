"""Cut a seeded random subset of users out of a built dataset, as a dataset of its own.

Why: settings must hold beyond the dataset they were tuned on; a few hundred users of ML-1M is a small dataset of
the same kind (short epochs, few steps per epoch), on which a training budget counted in epochs shows whether it
leaves the popularity plateau. The subset keeps every interaction of the chosen users, the items they rated, their
``.user`` rows and the images of those items (hard links where the file system allows, else copies), and a
``<name>.yaml`` (the source's dataset YAML) so ``--dataset=<name> --data_path=<output>`` loads it::

    python scripts/cut_user_subset.py --data_path dataset --dataset ml-1m-mm --users 600 --name ml-1m-mm-u600
"""

import argparse
import os
import shutil
import sys
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent


def read_atomic(path):
    """``(header, rows)`` of an atomic file: the header line and the other lines, each split on tabs."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return lines[0], [line.split("\t") for line in lines[1:] if line]


def write_atomic(path, header, rows):
    path.write_text("\n".join([header, *("\t".join(row) for row in rows)]) + "\n", encoding="utf-8")


def dataset_yaml(data_path, dataset):
    """The YAML the plugin reads for ``dataset``: the shipped one, else the one beside the atomic files."""
    shipped = REPO_ROOT / "properties" / "dataset" / f"{dataset}.yaml"
    return shipped if shipped.is_file() else data_path / dataset / f"{dataset}.yaml"


def link_or_copy(source, target):
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def cut(data_path, dataset, users, seed, output, name):
    """Write ``<output>/<name>/``; returns ``(users, items, interactions)`` of the subset."""
    source = data_path / dataset
    header, inter = read_atomic(source / f"{dataset}.inter")
    all_users = sorted({row[0] for row in inter})
    if users >= len(all_users):
        raise ValueError(f"--users {users}: {dataset} has only {len(all_users)} users")
    chosen = set(np.random.default_rng(seed).choice(all_users, size=users, replace=False).tolist())
    target = output / name
    target.mkdir(parents=True, exist_ok=True)
    kept = [row for row in inter if row[0] in chosen]
    write_atomic(target / f"{name}.inter", header, kept)
    items = {row[1] for row in kept}
    if (source / f"{dataset}.user").is_file():
        user_header, user_rows = read_atomic(source / f"{dataset}.user")
        write_atomic(target / f"{name}.user", user_header, [row for row in user_rows if row[0] in chosen])
    if (source / f"{dataset}.item").is_file():
        item_header, item_rows = read_atomic(source / f"{dataset}.item")
        item_rows = [row for row in item_rows if row[0] in items]
        write_atomic(target / f"{name}.item", item_header, item_rows)
        image_column = next((k for k, f in enumerate(item_header.split("\t")) if f.split(":")[0] == "image"), None)
        if image_column is not None and (source / "images").is_dir():
            (target / "images").mkdir(exist_ok=True)
            for row in item_rows:
                image = source / "images" / row[image_column]
                if row[image_column] and image.is_file() and not (target / "images" / image.name).exists():
                    link_or_copy(image, target / "images" / image.name)
    yaml_source = dataset_yaml(data_path, dataset)
    if yaml_source.is_file():
        text = yaml_source.read_text(encoding="utf-8")
        (target / f"{name}.yaml").write_text(f"# {name}: {users} users of {dataset} drawn with seed {seed} "
                                              f"(scripts/cut_user_subset.py).\n{text}", encoding="utf-8")
    return len(chosen), len(items), len(kept)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_path", type=Path, required=True, help="folder holding the source dataset's folder")
    parser.add_argument("--dataset", required=True, help="source dataset name")
    parser.add_argument("--users", type=int, required=True, help="how many users to keep")
    parser.add_argument("--seed", type=int, default=0, help="seed of the user draw")
    parser.add_argument("--output", type=Path, help="output folder (default: --data_path)")
    parser.add_argument("--name", required=True, help="name of the new dataset")
    args = parser.parse_args(argv)
    if args.users < 1:
        parser.error("--users must be at least 1")
    if not (args.data_path / args.dataset / f"{args.dataset}.inter").is_file():
        parser.error(f"no file {args.data_path / args.dataset / (args.dataset + '.inter')}")
    try:
        users, items, interactions = cut(args.data_path, args.dataset, args.users, args.seed,
                                         args.output or args.data_path, args.name)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{args.name}: {users} users, {items} items, {interactions} interactions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
