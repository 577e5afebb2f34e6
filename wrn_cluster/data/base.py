"""What the dataset modules share: the error a user can fix, and what a check of a dataset found."""

from __future__ import annotations

from typing import NamedTuple


class DataError(Exception):
    """A dataset problem the user can fix; the message names the URL and the fix."""


class Prepared(NamedTuple):
    """What prepare() found: training images (None where counting them is not cheap), and
    whether synthetic data was written (in a dry run: would be)."""

    train_images: int | None
    synthetic: bool
