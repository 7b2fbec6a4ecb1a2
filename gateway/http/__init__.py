"""The HTTP layer: the aiohttp app, its middlewares and every door (RPC proxy, /ipfs, REST)."""
