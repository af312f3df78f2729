"""Near-duplicate removal: exact and MinHash-LSH, one document kept per cluster (`phi-jax data dedup`).

    remove.py        `near_duplicates(records, threshold=0.8)` (in memory), `dedup_stage(...)` (a
                     stage over shards), `DedupConfig`
    shingles.py      `ngram_hashes`: word or character n-grams of normalised text (the words of
                     `core.text.normalize`) as 64-bit hashes, shared with decontamination
    minhash.py       `signatures` (rensa), `LshParams.choose(threshold, num_perm)`: the banding, its
                     S-curve, `band_keys`
    index.py         the whole-corpus passes as arrays on disk: sketches, band buckets, edges,
                     components, decisions (resumable, bounded in memory)
    beam_buckets.py  `beam_edges`: the band buckets as an Apache Beam GroupByKey (runner="beam")
"""
