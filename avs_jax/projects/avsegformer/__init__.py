"""AVSegFormer: transformer decoder with audio queries (docs/AVSEGFORMER.md)."""
