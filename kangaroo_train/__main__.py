"""``python -m kangaroo_train experiment=NAME [overrides]``: see kangaroo_train/train.py and docs/training.md."""

import sys

try:
    from kangaroo_train.train import main
except ModuleNotFoundError as err:  # the trainer's dependencies are an extra: kangaroo_infer alone does not need them
    print(
        f"error: python -m kangaroo_train needs the 'train' extra (missing module {err.name!r}); install it with: "
        f"pip install -e '.[train]' (from a checkout) or pip install 'kangaroo[train]'",
        file=sys.stderr,
    )
    sys.exit(2)

if __name__ == "__main__":
    main()
