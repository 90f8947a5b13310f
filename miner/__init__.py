"""The miner, by concern (dependencies point one way: core <- encode, engine, inspection, positives).

- ``core``: scores, guards, strategies, mining, negatives tables, caption attributes, FAISS search
  (numpy, pyarrow and faiss only);
- ``encode``: open_clip image/text embedding, feature import, a workspace's saved index;
- ``engine``: search back-ends behind FAISS's interface (gallery shards in process or on Ray actors)
  and the Ray embedding stage (Ray is imported lazily, from the ``ray`` extra);
- ``inspection``: stats, read-only SQL, the HTML report, contact sheets (duckdb, matplotlib);
- ``positives``: scaled positives (pair finding, captioners, generation).
"""
