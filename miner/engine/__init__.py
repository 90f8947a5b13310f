"""Search back-ends behind the FAISS ``.search(xq, k) -> (D, I)`` interface that the mining core uses.

- ``shards``: a gallery cut into row ranges, one index per shard (flat, or IVF / IVF-PQ trained once
  on a sample and copied to every shard), exact re-ranking per shard and an exact merge of the
  per-shard top-k lists (numpy + faiss, in process);
- ``ray``: the same shards held by Ray actors (restarted and retried when one dies), and the Ray
  Data embedding stage (an actor pool of open_clip encoders writing gallery parts).
"""
