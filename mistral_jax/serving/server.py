"""uvicorn's server, with a shutdown that ends streams cleanly: on SIGTERM (or Ctrl-C) it stops
taking connections, lets running requests finish for `grace` seconds, then stops the engine,
which cancels what still runs, so every open stream ends with its last chunk (finish_reason
"cancelled") and [DONE] rather than being cut."""

from __future__ import annotations

import asyncio

import uvicorn

from mistral_jax.serving.engine import Engine


class Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine: Engine, grace: float):
        super().__init__(config)
        self.engine, self.grace = engine, grace

    async def shutdown(self, sockets=None) -> None:
        async def cancel_late():
            await asyncio.sleep(self.grace)
            await asyncio.to_thread(self.engine.stop)

        late = asyncio.create_task(cancel_late())
        try:
            await super().shutdown(sockets)
        finally:
            late.cancel()

    @property
    def port(self) -> int:
        """The port listened on (the one chosen, when asked for port 0); once started."""
        return self.servers[0].sockets[0].getsockname()[1]
