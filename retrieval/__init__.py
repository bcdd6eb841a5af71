"""First-stage retrieval: BM25 (bm25s) and FAISS indexes (flat / IVF / HNSW, GPU when present)."""
