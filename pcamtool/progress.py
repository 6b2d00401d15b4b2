"""Progress bars on stderr (data goes to stdout, never bars)."""
from __future__ import annotations

import sys
from typing import Iterable, Optional

from tqdm.auto import tqdm


def progress_bar(total: Optional[int] = None, desc: str = "", unit: str = "img",
                 enabled: bool = True, iterable: Optional[Iterable] = None) -> tqdm:
    """A tqdm bar on stderr showing ``unit``/s; a do-nothing bar when disabled."""
    return tqdm(iterable=iterable, total=total, desc=desc, unit=unit, unit_scale=True,
                file=sys.stderr, disable=not enabled, dynamic_ncols=True, leave=False,
                smoothing=0.1)
