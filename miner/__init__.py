"""The miner, by concern (dependencies point one way: core <- accel, encode, engine, inspection, positives).

- ``core``: scores, guards, strategies, mining, negatives tables, caption attributes, FAISS search
  (numpy, pyarrow and faiss only);
- ``accel``: the one device rule (embedding and search), exact search on a torch device (a GPU, or
  torch's CPU device) with every cut decided on exact host scores;
- ``encode``: open_clip image/text embedding, feature import, a workspace's saved index;
- ``engine``: search back-ends behind FAISS's interface (gallery shards in process or on Ray actors)
  and the Ray embedding stage (Ray is imported lazily, from the ``ray`` extra);
- ``inspection``: stats, read-only SQL, the HTML report, contact sheets (duckdb, matplotlib);
- ``positives``: scaled positives (pair finding, captioners, generation).
"""
