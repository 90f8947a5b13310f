"""The one progress-callback shape of the library.

``progress(n, total=None)``: ``n`` more items are done; ``total``, when given, is the number of items
of the whole job (passed once it is known, e.g. with the first call). Library functions that run
long take an optional ``progress`` of this shape and never print; the CLI's progress bars are one.
"""

from __future__ import annotations

from typing import Callable, Optional

Progress = Optional[Callable[..., None]]
