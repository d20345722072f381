from __future__ import annotations

from .standin import main

main()
