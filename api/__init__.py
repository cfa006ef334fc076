"""The HTTP front-end: a stateless Starlette app serving the public API and SSE."""
