"""How verbose cir-mine's logging is: one call a front end makes before a command runs."""

from __future__ import annotations

import logging
import sys


def configure_logging(verbose: bool = False, quiet: bool = False) -> None:
    """Warnings on stderr; with ``verbose`` also cir-mine's own INFO lines (what each stage does),
    never other libraries' (faiss.loader and the like stay at WARNING). ``quiet`` (a front end's: no
    progress bar, no notes) combines with ``verbose``: logs without a bar; it also silences Ray (its
    logger at ERROR, which the Ray engine passes on to Ray's own processes)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("cir_mine").setLevel(logging.INFO if verbose else logging.NOTSET)
    logging.getLogger("ray").setLevel(logging.ERROR if quiet else logging.NOTSET)
