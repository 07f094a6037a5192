"""Data preparation: synthetic AVSBench and AVSBench -> TFDS TFRecord shards."""
