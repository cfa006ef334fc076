"""``async with`` for objects that own connections and close them with ``aclose()``."""

from __future__ import annotations

from typing import Self


class AsyncCloseable:
    """Entering gives the object itself; leaving, however it happens, awaits ``aclose``."""

    async def aclose(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
