"""The miner, by concern (dependencies point one way: core <- encode, inspection, positives).

- ``core``: scores, guards, strategies, mining, negatives tables, caption attributes, FAISS search
  (numpy, pyarrow and faiss only);
- ``encode``: open_clip image/text embedding, feature import, a workspace's saved index;
- ``inspection``: stats, read-only SQL, the HTML report, contact sheets (duckdb, matplotlib);
- ``positives``: scaled positives (pair finding, captioners, generation).
"""
