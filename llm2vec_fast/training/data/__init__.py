"""The training data pipeline: indexed files -> records -> reproducible sharded orders -> tokenized, packed
micro-batches.

`line_index` indexes files without loading them, `records` reads text lines and JSONL examples,
`sampling` walks reproducible per-process orders, `masking` picks MNTP targets, `batches` holds
the packed micro-batches and `sources` streams them, resumably, for each objective.
"""
