"""Distributed search and embedding: the gallery's shards searched in process or by Ray actors, and the
Ray Data embedding stage.

- ``shards``: a gallery cut into row ranges, one index per shard (flat, or IVF / IVF-PQ trained once
  on a sample and copied to every shard), exact re-ranking per shard and an exact merge of the
  per-shard top-k lists (numpy + faiss, in process);
- ``ray_shards``: the same shards held by Ray actors (restarted and retried when one dies);
- ``ray_embed``: an actor pool of open_clip encoders writing gallery parts;
- ``mine``: mining through either.
"""
