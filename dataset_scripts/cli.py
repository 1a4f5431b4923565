"""The converters' command line: the options they share, and a bad input as one line with exit status 2.

``--help`` shows the script's docstring as written, then every option with its default.
"""

import argparse
import sys
from pathlib import Path

if __package__:
    from .atomic_files import TIE_SEED
    from .errors import InputError, describe_os_error
    from .fingerprint import Build, fingerprint, run_build
else:  # run as a script: python dataset_scripts/<script>.py
    from atomic_files import TIE_SEED
    from errors import InputError, describe_os_error
    from fingerprint import Build, fingerprint, run_build

RECBOLE_BUNDLED = ("ml-100k",)  # RecBole sets data_path to its own copy of these (Config._set_default_parameters)
DUPLICATE_CHOICES = {
    "drop": "keep one (MovieLens: of identical rating lines; Amazon: of a user's reviews of one item, the earliest; "
            "sequences: of an item repeated in a user's sequence, the first)",
    "keep": "keep every one as an interaction of its own",
}


def run_main(main, argv=None):
    """Run a converter's ``main``; a bad input ends in one line on stderr and exit status 2.

    ``--debug`` lets the exception through, traceback included.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return main(argv)
    except (InputError, OSError) as error:
        if "--debug" in argv:
            raise
        named = isinstance(error, OSError) and error.filename is not None
        message = f"{error.filename}: {describe_os_error(error)}" if named else str(error)
        print(f"error: {message} (--debug shows the traceback)", file=sys.stderr)
        raise SystemExit(2) from None


def argument_parser(doc, example_name, images_help=None, ties=True):
    """A parser described by the script's docstring, with the arguments every converter has.

    ``--images`` only with an ``images_help``; ``--tie-seed`` only where interactions can share a timestamp (``ties``).
    """
    parser = argparse.ArgumentParser(description=doc, formatter_class=HelpFormatter)
    parser.add_argument(
        "--output",
        required=True,
        type=Path,
        help="output root: the dataset goes to <output>/<name>/ (RecBole's data_path)",
    )
    parser.add_argument(
        "--name", required=True, help=f"dataset name, e.g. {example_name} (file prefix; properties/dataset/<name>.yaml)"
    )
    if images_help is not None:
        parser.add_argument("--images", type=Path, default=None, help=images_help)
    parser.add_argument("--force", action="store_true", help="rebuild even when the output is up to date")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an input error")
    parser.add_argument(
        "--duplicates",
        choices=DUPLICATE_CHOICES,
        default="drop",
        help=f"repeated interactions: {'; '.join(f'{k}: {v}' for k, v in DUPLICATE_CHOICES.items())} "
        "(counted in the summary either way)",
    )
    if not ties:
        return parser
    parser.add_argument(
        "--tie-seed", "--tie_seed", dest="tie_seed", type=int, default=TIE_SEED,
        help="a user's interactions with the same timestamp are ordered by a hash of (this seed, user, item), not by "
        "item id: the last one is the leave-one-out test target, and item ids can tell something about the item "
        "(MovieLens ids follow release years, which titles show); 42%% of ML-1M users' last two ratings share a second",
    )
    return parser


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """``--help``: the script's docstring as written, then every option with its default (if it has one)."""

    def _get_help_string(self, action):
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def run_script(args, inputs, script, convert, ignored=()):
    """The converters' main: fingerprint what shapes the output, then convert or report "up to date".

    Every argument except ``--output``, ``--force`` and ``ignored`` (settings that cannot change the
    result, such as the number of download workers) is part of the fingerprint.
    """
    images = getattr(args, "images", False)  # False: the converter writes no images
    if images and not images.is_dir():
        raise InputError(args.images, "is not a folder (--images)")
    if args.name in RECBOLE_BUNDLED:
        raise InputError(args.name, "is a dataset RecBole bundles and reads from its own copy whatever --data_path says "
                                    f"(--name); choose another, e.g. {args.name}-mm")
    settings = {
        k: v.resolve() if isinstance(v, Path) else v
        for k, v in vars(args).items()
        if k not in {"output", "force", "debug", *ignored}
    }
    outputs = [f"{args.name}.inter", f"{args.name}.item", f"{args.name}.yaml"]
    outputs += ["images", "missing_images.txt"] if images is not False else []
    build = Build(args.output, args.name, fingerprint(settings, inputs, [script]), outputs)
    return run_build(build, lambda b: convert(args, b), args.force)
