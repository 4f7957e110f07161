"""KV caches: pytrees passed into and out of the jitted steps, never module state."""

from lctx.cache.dense import KVCache, init_cache, abstract_cache

__all__ = ["KVCache", "init_cache", "abstract_cache"]
