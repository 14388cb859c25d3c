"""``python -m kangaroo_train experiment=NAME [overrides]``: see kangaroo_train/train.py and docs/training.md."""

from kangaroo_train.train import main

if __name__ == "__main__":
    main()
