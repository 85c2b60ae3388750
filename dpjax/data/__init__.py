"""Data, nothing private about it: readers of local files into plain arrays and records.

`text` (the RT sentences, tokenizers, padded token arrays), `tables` (your
own labelled CSV / JSONL / parquet / saved datasets, checked row by row) and
`shakespeare` (the plays as (play, character, speech) records). Samplers live
in `dpjax.core.sampling`: they decide what is private.
"""
